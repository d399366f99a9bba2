"""Bundle files: the manifest, the weight file read into memory we own, and their checks.

A bundle is a directory: ``model.onnx`` (no weight bytes inside), ``weights.safetensors``, ``manifest.json``
(format and version, parameter name -> ONNX tensor, layout, shape, dtype; inputs/outputs; fingerprint) and,
when packaged, ``adapters/``. Every file is untrusted: each check names the file and tensor at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import AdapterFormatError
from runtime.fingerprint import structure_hash

FORMAT = "shira-onnx-bundle"
VERSION = 1
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
ADAPTERS_DIR = "adapters"
LAYOUTS = ("identity", "transposed")
DTYPES = {"float32": "F32", "float16": "F16"}  # manifest dtype -> safetensors dtype
ALIGN = 64
MAX_HEADER = 100 << 20
CHUNK = 1 << 24
MAX_EXAMPLE = 1 << 20  # elements of one probe input


class BundleError(AdapterFormatError):
    """A bundle directory is missing, truncated, corrupted or edited; the message names the file and tensor."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- manifest --
def read_manifest(bundle: Path) -> dict:
    """The bundle's manifest, with every field the backend relies on checked."""
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle directory (no such directory)")
    path = bundle / MANIFEST_FILE
    try:
        m = json.loads(read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else m!r})")
    if m.get("version") != VERSION:
        raise BundleError(f"{path}: format version {m.get('version')!r}; this runtime reads version {VERSION}")
    for key, typ in (
        ("graph", str),
        ("weights", str),
        ("inputs", list),
        ("outputs", list),
        ("parameters", dict),
        ("fingerprint", dict),
    ):
        if not isinstance(m.get(key), typ):
            raise BundleError(f"{path}: field {key!r} is missing or not a {typ.__name__}")
    for key in ("graph", "weights"):
        if Path(m[key]).name != m[key] or m[key] in ("", ".", ".."):
            raise BundleError(f"{path}: {key} file {m[key]!r} must be a plain file name inside the bundle")
    for key in ("structure", "weights_sha256", "graph_sha256"):
        if not isinstance(m["fingerprint"].get(key), str):
            raise BundleError(f"{path}: fingerprint field {key!r} is missing")
    for kind in ("inputs", "outputs"):
        for io in m[kind]:
            if not (isinstance(io, dict) and isinstance(io.get("name"), str) and isinstance(io.get("shape"), list)):
                raise BundleError(f"{path}: malformed {kind} entry {io!r}")
            try:
                np.dtype(io.get("dtype"))
            except TypeError:
                raise BundleError(f"{path}: {kind} {io['name']!r} has unknown dtype {io.get('dtype')!r}") from None
        if kind == "inputs":
            for io in m[kind]:
                ex = io.get("example_shape")
                if not (isinstance(ex, list) and len(ex) == len(io["shape"]) and all(_is_dim(d) for d in ex)):
                    raise BundleError(f"{path}: input {io['name']!r} has no valid example_shape")
                if math.prod(ex) > MAX_EXAMPLE:
                    raise BundleError(f"{path}: input {io['name']!r}: example_shape {ex} is too large for the probe")
    for name, p in m["parameters"].items():
        where = f"{path}: parameter {name!r}"
        if not isinstance(p, dict) or not isinstance(p.get("onnx"), str):
            raise BundleError(f"{where}: malformed entry {p!r}")
        if p.get("layout") not in LAYOUTS:
            raise BundleError(f"{where}: layout {p.get('layout')!r}, expected one of {LAYOUTS}")
        if p.get("dtype") not in DTYPES:
            raise BundleError(f"{where}: dtype {p.get('dtype')!r}, expected one of {sorted(DTYPES)}")
        shape = p.get("shape")
        if not (isinstance(shape, list) and all(_is_dim(d) for d in shape)):
            raise BundleError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if p["layout"] == "transposed" and len(shape) != 2:
            raise BundleError(f"{where}: layout 'transposed' needs a 2-D shape, got {shape}")
    got = structure_hash({n: tuple(p["shape"]) for n, p in m["parameters"].items()})
    if got != m["fingerprint"]["structure"]:
        raise BundleError(
            f"{path}: parameter names/shapes do not match the fingerprint (structure hash {got} != "
            f"{m['fingerprint']['structure']}): the manifest was edited or belongs to another base"
        )
    return m


def _is_dim(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def storage_layout(manifest: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """ONNX tensor name -> (dtype, storage shape); names of one tied group must agree."""
    storage, first = {}, {}
    for name, p in manifest["parameters"].items():
        shape = tuple(p["shape"][::-1] if p["layout"] == "transposed" else p["shape"])
        entry = (p["dtype"], shape)
        if p["onnx"] in storage and storage[p["onnx"]] != entry:
            raise BundleError(
                f"{MANIFEST_FILE}: parameters {first[p['onnx']]!r} and {name!r} share ONNX tensor {p['onnx']!r} "
                f"but differ in dtype/layout/shape"
            )
        storage[p["onnx"]] = entry
        first.setdefault(p["onnx"], name)
    return storage


def check_graph(path: Path, graph: Any, manifest: dict, storage: dict) -> None:
    from onnx import helper

    inputs = {v.name: v for v in graph.graph.input}
    wanted = [i["name"] for i in manifest["inputs"]] + list(storage)
    missing = [n for n in wanted if n not in inputs]
    extra = [n for n in inputs if n not in wanted]
    if missing or extra:
        raise BundleError(f"{path}: graph inputs do not match the manifest (missing {missing}, unknown {extra})")
    outputs = [v.name for v in graph.graph.output]
    if outputs != [o["name"] for o in manifest["outputs"]]:
        raise BundleError(f"{path}: graph outputs {outputs} differ from the manifest's")
    for name, (dtype, shape) in storage.items():
        tt = inputs[name].type.tensor_type
        got_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
        got_shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        if got_dtype != dtype or got_shape != shape:
            raise BundleError(
                f"{path}: weight input {name!r} is {got_dtype}{list(got_shape)} in the graph, "
                f"{dtype}{list(shape)} in the manifest"
            )
    if graph.graph.initializer and any(i.name in storage for i in graph.graph.initializer):
        raise BundleError(f"{path}: weights are embedded as initializers; they would not be live")


# -- weights: a safetensors file read into memory we own --
def read_weights(
    path: Path, storage: dict[str, tuple[str, tuple[int, ...]]], sha256: str | None
) -> dict[str, np.ndarray]:
    """Every tensor of ``storage`` from ``path``, as writable 64-byte-aligned C-contiguous arrays.

    The whole file is hashed while it is read when ``sha256`` is given.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise BundleError(f"{path}: cannot open the weight file ({exc.strerror})") from None
    with f:
        size = f.seek(0, 2)
        f.seek(0)
        h = hashlib.sha256()
        head = f.read(8)
        if len(head) < 8:
            raise BundleError(f"{path}: truncated ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise BundleError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated or corrupt")
        raw = f.read(n)
        h.update(head + raw)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path}: header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise BundleError(f"{path}: header is not a JSON object")
        header.pop("__metadata__", None)
        unknown = sorted(set(header) - set(storage))
        missing = sorted(set(storage) - set(header))
        if unknown or missing:
            raise BundleError(f"{path}: tensors do not match the manifest (missing {missing}, unknown {unknown})")
        spans = []
        for name, (dtype, shape) in storage.items():
            e = header[name]
            offsets = e.get("data_offsets") if isinstance(e, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_dim(o) for o in offsets)):
                raise BundleError(f"{path}: tensor {name!r}: malformed header entry {e!r}")
            if e.get("dtype") != DTYPES[dtype] or e.get("shape") != list(shape):
                raise BundleError(
                    f"{path}: tensor {name!r} is {e.get('dtype')}{e.get('shape')}, the manifest says "
                    f"{DTYPES[dtype]}{list(shape)}"
                )
            begin, end = offsets
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
            if end - begin != nbytes:
                raise BundleError(f"{path}: tensor {name!r}: data_offsets span {end - begin} bytes, expected {nbytes}")
            if 8 + n + end > size:
                raise BundleError(f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end}, file has {size}")
            spans.append((begin, end, name))
        spans.sort()
        arrays, pos = {}, 0
        for begin, end, name in spans:
            if begin < pos:
                raise BundleError(f"{path}: tensor {name!r} overlaps the previous tensor's data")
            if begin > pos:  # a gap: hashed, not used
                h.update(f.read(begin - pos))
            dtype, shape = storage[name]
            arr = _aligned(shape, np.dtype(dtype))
            view = memoryview(arr.reshape(-1).view(np.uint8))
            for at in range(0, end - begin, CHUNK):
                part = view[at : at + CHUNK]
                if f.readinto(part) != len(part):
                    raise BundleError(f"{path}: truncated inside tensor {name!r}")
                h.update(part)
            arrays[name] = arr
            pos = end
        while chunk := f.read(CHUNK):
            h.update(chunk)
    if sha256 is not None and h.hexdigest() != sha256:
        raise BundleError(f"{path}: sha256 differs from the manifest's fingerprint (weights edited or corrupted)")
    return arrays


def _aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    off = -buf.ctypes.data % ALIGN
    return buf[off : off + nbytes].view(dtype).reshape(shape)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None
