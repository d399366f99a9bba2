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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import atomic_write
from runtime.dtypes import BUNDLE, NUMPY, SHORT
from runtime.errors import AdapterFormatError

FORMAT = "shira-onnx-bundle"
VERSION = 2  # 1: no manifest checksum, a structure hash of names and shapes only
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
ADAPTERS_DIR = "adapters"
LAYOUTS = ("identity", "transposed")
ADAPTER_KINDS = ("shira", "lora")
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


def structure_of(parameters: dict[str, dict]) -> str:
    """Hash of every parameter's name, ONNX tensor, layout, shape and dtype: what the switcher relies on."""
    items = sorted((n, p["onnx"], p["layout"], list(p["shape"]), p["dtype"]) for n, p in parameters.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]


@dataclass
class Manifest:
    """The bundle's ``manifest.json``: the one type that writes it (exporter, packager) and reads it (runtime).

    ``parameters``: state_dict name -> ``{"onnx", "layout", "shape", "dtype"}``; ``inputs``/``outputs``:
    ``{"name", "dtype", "shape"}`` (inputs add ``example_shape``, the probe's input); ``adapters``: name ->
    ``{"kind", "path", "nonzeros", "bytes"}``. The file carries a hash of the parameters' structure and a
    checksum of its whole content: an edit by hand is an error (edit through this type, then ``write``).
    """

    inputs: list[dict]
    outputs: list[dict]
    parameters: dict[str, dict]
    weights_sha256: str
    graph_sha256: str
    adapters: dict[str, dict] = field(default_factory=dict)
    graph: str = GRAPH_FILE
    weights: str = WEIGHTS_FILE
    info: dict = field(default_factory=dict)  # exporter, opset, unused parameters: for people, not checked

    def to_json(self) -> dict:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "graph": self.graph,
            "weights": self.weights,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "parameters": self.parameters,
            "adapters": self.adapters,
            "info": self.info,
            "fingerprint": {
                "structure": structure_of(self.parameters),
                "weights_sha256": self.weights_sha256,
                "graph_sha256": self.graph_sha256,
            },
        }
        return Manifest.seal(body)

    @staticmethod
    def seal(body: dict) -> dict:
        """``body`` (a manifest's JSON) with its checksum recomputed: what a deliberate edit must do."""
        body = {k: v for k, v in body.items() if k != "checksum"}
        return body | {"checksum": _checksum(body)}

    def write(self, bundle: Path) -> None:
        """Write ``bundle/manifest.json`` atomically (temp file + rename): readers see the old or the new one."""
        text = json.dumps(self.to_json(), indent=1)
        atomic_write(bundle / MANIFEST_FILE, lambda tmp: tmp.write_text(text))

    @staticmethod
    def read(bundle: Path) -> Manifest:
        """The bundle's manifest, with every field checked that can be checked without the graph."""
        if not bundle.is_dir():
            raise BundleError(f"{bundle}: not a bundle directory (no such directory)")
        path = bundle / MANIFEST_FILE
        try:
            m = json.loads(read_bytes(path))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            got = m.get("format") if isinstance(m, dict) else type(m).__name__
            raise BundleError(f"{path}: not a {FORMAT} manifest (format={got!r})")
        if m.get("version") != VERSION:
            raise BundleError(
                f"{path}: format version {m.get('version')!r}; this runtime reads version {VERSION} (re-export it)"
            )
        if m.get("checksum") != _checksum({k: v for k, v in m.items() if k != "checksum"}):
            raise BundleError(f"{path}: checksum mismatch: the manifest was edited or corrupted")
        for key, typ in (("graph", str), ("weights", str), ("inputs", list), ("outputs", list)):
            _expect(path, key, m.get(key), typ)
        for key in ("parameters", "fingerprint", "adapters", "info"):
            _expect(path, key, m.get(key), dict)
        for key in ("graph", "weights"):
            if Path(m[key]).name != m[key] or m[key] in ("", ".", ".."):
                raise BundleError(f"{path}: {key} file {m[key]!r} must be a plain file name inside the bundle")
        fp = m["fingerprint"]
        for key in ("structure", "weights_sha256", "graph_sha256"):
            _expect(path, f"fingerprint.{key}", fp.get(key), str)
        _check_io(path, m["inputs"], "inputs")
        _check_io(path, m["outputs"], "outputs")
        for name, p in m["parameters"].items():
            _check_parameter(path, name, p)
        for name, p in m["parameters"].items():  # ONNX tensors are named after a parameter (the first of a tied group)
            owner = m["parameters"].get(p["onnx"])
            if owner is None or owner["onnx"] != p["onnx"]:
                raise BundleError(
                    f"{path}: parameter {name!r} reads ONNX tensor {p['onnx']!r}, which is no parameter's own"
                )
        if structure_of(m["parameters"]) != fp["structure"]:
            raise BundleError(
                f"{path}: the parameters' names, ONNX tensors, layouts or shapes differ from the structure hash"
            )
        for name, entry in m["adapters"].items():
            _check_adapter(bundle, path, name, entry)
        return Manifest(
            m["inputs"],
            m["outputs"],
            m["parameters"],
            fp["weights_sha256"],
            fp["graph_sha256"],
            m["adapters"],
            m["graph"],
            m["weights"],
            m["info"],
        )

    def storage(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """ONNX tensor name -> (dtype, storage shape); names of one tied group must agree."""
        storage, first = {}, {}
        for name, p in self.parameters.items():
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

    def check_graph(self, path: Path, graph: Any) -> None:
        """The graph's inputs and outputs are exactly the manifest's: names, element types, fixed dims."""
        from onnx import helper

        inputs = {v.name: v for v in graph.graph.input}
        storage = self.storage()
        wanted = [i["name"] for i in self.inputs] + list(storage)
        missing = [n for n in wanted if n not in inputs]
        extra = [n for n in inputs if n not in wanted]
        if missing or extra:
            raise BundleError(f"{path}: graph inputs do not match the manifest (missing {missing}, unknown {extra})")
        outputs = {v.name: v for v in graph.graph.output}
        if list(outputs) != [o["name"] for o in self.outputs]:
            raise BundleError(f"{path}: graph outputs {list(outputs)} differ from the manifest's")

        def typed(v) -> tuple[str, list]:
            tt = v.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
            return dtype, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]

        for name, (dtype, shape) in storage.items():
            got_dtype, got_shape = typed(inputs[name])
            if got_dtype != dtype or tuple(got_shape) != shape:
                raise BundleError(
                    f"{path}: weight input {name!r} is {got_dtype}{got_shape} in the graph, {dtype}{list(shape)} "
                    f"in the manifest"
                )
        ios = [(i, inputs[i["name"]]) for i in self.inputs] + [(o, outputs[o["name"]]) for o in self.outputs]
        for io, v in ios:
            got_dtype, got_shape = typed(v)
            dims = [d if isinstance(d, int) else None for d in io["shape"]]
            if got_dtype != io["dtype"] or got_shape != dims:
                raise BundleError(
                    f"{path}: {io['name']!r} is {got_dtype}{got_shape} in the graph, the manifest says "
                    f"{io['dtype']}{io['shape']}"
                )
        if any(i.name in storage for i in graph.graph.initializer):
            raise BundleError(f"{path}: weights are embedded as initializers; they would not be live")


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _expect(path: Path, key: str, value: Any, typ: type) -> None:
    if not isinstance(value, typ):
        raise BundleError(f"{path}: field {key!r} is missing or not a {typ.__name__}")


def _check_io(path: Path, entries: list, kind: str) -> None:
    names = set()
    for io in entries:
        if not (isinstance(io, dict) and isinstance(io.get("name"), str) and isinstance(io.get("shape"), list)):
            raise BundleError(f"{path}: malformed {kind} entry {io!r}")
        if io["name"] in names or not io["name"]:
            raise BundleError(f"{path}: {kind} name {io['name']!r} is empty or appears twice")
        names.add(io["name"])
        if not all(isinstance(d, str) or _is_dim(d) for d in io["shape"]):
            raise BundleError(f"{path}: {kind} {io['name']!r} has a malformed shape {io['shape']!r}")
        try:
            if not isinstance(io.get("dtype"), str):
                raise TypeError
            np.dtype(io["dtype"])
        except TypeError:
            raise BundleError(f"{path}: {kind} {io['name']!r} has unknown dtype {io.get('dtype')!r}") from None
        if kind == "inputs":
            ex = io.get("example_shape")
            ok = isinstance(ex, list) and len(ex) == len(io["shape"]) and all(_is_dim(d) and d > 0 for d in ex)
            if not ok or any(isinstance(d, int) and d != e for d, e in zip(io["shape"], ex)):
                raise BundleError(f"{path}: input {io['name']!r}: example_shape {ex!r} does not fit {io['shape']}")
            if math.prod(ex) > MAX_EXAMPLE:
                raise BundleError(f"{path}: input {io['name']!r}: example_shape {ex} is too large for the probe")


def _check_parameter(path: Path, name: str, p: Any) -> None:
    where = f"{path}: parameter {name!r}"
    if not name or not isinstance(p, dict) or not isinstance(p.get("onnx"), str) or not p["onnx"]:
        raise BundleError(f"{where}: malformed entry {p!r}")
    if p.get("layout") not in LAYOUTS:
        raise BundleError(f"{where}: layout {p.get('layout')!r}, expected one of {LAYOUTS}")
    if not isinstance(p.get("dtype"), str) or p["dtype"] not in NUMPY or NUMPY[p["dtype"]].short not in BUNDLE:
        raise BundleError(f"{where}: dtype {p.get('dtype')!r}, expected one of {[SHORT[d].numpy for d in BUNDLE]}")
    shape = p.get("shape")
    if not (isinstance(shape, list) and all(_is_dim(d) for d in shape)):
        raise BundleError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if p["layout"] == "transposed" and len(shape) != 2:
        raise BundleError(f"{where}: layout 'transposed' needs a 2-D shape, got {shape}")


def _check_adapter(bundle: Path, path: Path, name: str, entry: Any) -> None:
    where = f"{path}: adapter {name!r}"
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise BundleError(f"{where}: the name must be a non-empty plain name")
    if not isinstance(entry, dict) or entry.get("kind") not in ADAPTER_KINDS or not isinstance(entry.get("path"), str):
        raise BundleError(f"{where}: malformed entry {entry!r} (kind in {ADAPTER_KINDS}, path)")
    try:
        full = (bundle / entry["path"]).resolve()
        inside = (bundle / ADAPTERS_DIR).resolve() in full.parents
        present = full.is_file() if entry["kind"] == "shira" else full.is_dir()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise BundleError(f"{where}: path {entry['path']!r} cannot be resolved ({exc})") from None
    if not inside:
        raise BundleError(f"{where}: path {entry['path']!r} is not inside {ADAPTERS_DIR}/")
    if not present:
        raise BundleError(f"{where}: {full} is missing or not a {'file' if entry['kind'] == 'shira' else 'directory'}")


def _is_dim(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


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
            code = NUMPY[dtype].safetensors
            if e.get("dtype") != code or e.get("shape") != list(shape):
                raise BundleError(
                    f"{path}: tensor {name!r} is {e.get('dtype')}{e.get('shape')}, the manifest says "
                    f"{code}{list(shape)}"
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
