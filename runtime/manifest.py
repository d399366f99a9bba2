"""The bundle manifest, the one owner of ``manifest.json``: the exporter and the packager write through
``Manifest``, the runtime reads through it, and every check of it lives here."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shira_runtime.atomic import atomic_write
from shira_runtime.bundle import (
    ADAPTER_KINDS,
    ADAPTERS_DIR,
    FORMAT,
    GRAPH_FILE,
    LAYOUTS,
    MANIFEST_FILE,
    MAX_EXAMPLE,
    READS,
    VERSION,
    WEIGHTS_FILE,
    BundleError,
    is_dim,
    read_bytes,
)
from shira_runtime.kernels.dtypes import BUNDLE, NUMPY, SHORT


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
    decoder: dict = field(default_factory=dict)  # a decoder with a KV cache: its graph names (_check_decoder)
    # the live graphs prepared by the packager (``onnx_backend.write_live``; _check_live): loading needs no onnx
    live: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        body = {
            "format": FORMAT,
            "version": VERSION if any(_copy16(e) for e in self.parameters.values()) else 2,
            "graph": self.graph,
            "weights": self.weights,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "parameters": self.parameters,
            "adapters": self.adapters,
            "info": self.info,
            **({"decoder": self.decoder} if self.decoder else {}),
            **({"live": self.live} if self.live else {}),
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
        v = m.get("version")
        if type(v) is not int or v not in READS:  # not bool, not float: JSON's 2.0 and true are not versions
            reads = f"versions {READS[0]}-{READS[-1]}"
            if type(v) is int and v > VERSION:
                raise BundleError(
                    f"{path}: format version {v}, written by a newer exporter; this runtime reads {reads} "
                    "(upgrade shira-runtime)"
                )
            raise BundleError(f"{path}: format version {v!r}; this runtime reads {reads} (re-export it)")
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
        for name, p in m["parameters"].items():  # a quantized weight's scales: an fp32 [rows] parameter of its own
            scale = m["parameters"].get(p["quant"]["scale"]) if "quant" in p else None
            if "quant" in p and (
                scale is None or scale["dtype"] != "float32" or scale["shape"] != p["shape"][:1] or "quant" in scale
            ):
                raise BundleError(
                    f"{path}: parameter {name!r}: its scale {p['quant']['scale']!r} is not a float32 "
                    f"[{p['shape'][0] if p['shape'] else '?'}] parameter of the bundle"
                )
        mirrors = [(name, p["quant"]["u8t"]) for name, p in m["parameters"].items() if "u8t" in p.get("quant", {})]
        taken = {p["onnx"] for p in m["parameters"].values()} | {i["name"] for i in m["inputs"]}
        seen: set[str] = set()
        for name, u8t in mirrors:  # the transposed uint8 copy the runtime builds: a graph input of its own
            if u8t in taken or u8t in seen or len(m["parameters"][name]["shape"]) != 2:
                raise BundleError(
                    f"{path}: parameter {name!r}: its u8t input {u8t!r} is another tensor's name, or the weight "
                    f"is not 2-D"
                )
            seen.add(u8t)
        if structure_of(m["parameters"]) != fp["structure"]:
            raise BundleError(
                f"{path}: the parameters' names, ONNX tensors, layouts or shapes differ from the structure hash"
            )
        for name, entry in m["adapters"].items():
            _check_adapter(bundle, path, name, entry)
        decoder = m.get("decoder", {})
        if decoder:
            _check_decoder(path, decoder, m["inputs"], m["outputs"])
        live = m.get("live", {})
        if live:
            _check_live(path, live, m["inputs"])
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
            decoder,
            live,
        )

    def mirrors(self) -> dict[str, tuple[str, tuple[int, int]]]:
        """Graph inputs the runtime builds from the int8 codes (``shira_runtime.exporters.quant_graph``): name -> (the
        codes'
        ONNX name, uint8 shape ``[in, out]``)."""
        return {
            p["quant"]["u8t"]: (p["onnx"], (p["shape"][1], p["shape"][0]))
            for p in self.parameters.values()
            if "u8t" in p.get("quant", {})
        }

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

    def check_io(self, path: Path, inputs: list, outputs: list, initializers: list) -> None:
        """A session's graph (``path``) takes exactly the manifest's inputs and outputs: names, element types,
        fixed dims. ``inputs`` / ``outputs``: ``(name, numpy dtype name, dims)`` (a dim not fixed: None), as
        onnxruntime reports them; ``initializers``: the inputs that carry an embedded value."""
        storage = self.storage()
        storage |= {name: ("uint8", shape) for name, (_, shape) in self.mirrors().items()}
        embedded = [n for n in initializers if n in storage]
        if embedded:
            raise BundleError(f"{path}: weights are embedded as initializers; they would not be live ({embedded[:4]})")
        got_in = {name: (dtype, dims) for name, dtype, dims in inputs}
        got_out = {name: (dtype, dims) for name, dtype, dims in outputs}
        wanted = [i["name"] for i in self.inputs] + list(storage)
        missing = [n for n in wanted if n not in got_in]
        extra = [n for n in got_in if n not in wanted]
        if missing or extra:
            raise BundleError(f"{path}: graph inputs do not match the manifest (missing {missing}, unknown {extra})")
        if list(got_out) != [o["name"] for o in self.outputs]:
            raise BundleError(f"{path}: graph outputs {list(got_out)} differ from the manifest's")
        for name, (dtype, shape) in storage.items():
            got_dtype, got_shape = got_in[name]
            if got_dtype != dtype or tuple(got_shape) != tuple(shape):
                raise BundleError(
                    f"{path}: weight input {name!r} is {got_dtype}{got_shape} in the graph, {dtype}{list(shape)} "
                    f"in the manifest"
                )
        ios = [(i, got_in[i["name"]]) for i in self.inputs] + [(o, got_out[o["name"]]) for o in self.outputs]
        for io, (got_dtype, got_shape) in ios:
            dims = [d if isinstance(d, int) else None for d in io["shape"]]
            if got_dtype != io["dtype"] or list(got_shape) != dims:
                raise BundleError(
                    f"{path}: {io['name']!r} is {got_dtype}{got_shape} in the graph, the manifest says "
                    f"{io['dtype']}{io['shape']}"
                )


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
        if not all(isinstance(d, str) or is_dim(d) for d in io["shape"]):
            raise BundleError(f"{path}: {kind} {io['name']!r} has a malformed shape {io['shape']!r}")
        try:
            if not isinstance(io.get("dtype"), str):
                raise TypeError
            np.dtype(io["dtype"])
        except TypeError:
            raise BundleError(f"{path}: {kind} {io['name']!r} has unknown dtype {io.get('dtype')!r}") from None
        if kind == "inputs":
            ex = io.get("example_shape")
            ok = isinstance(ex, list) and len(ex) == len(io["shape"]) and all(is_dim(d) and d > 0 for d in ex)
            if not ok or any(isinstance(d, int) and d != e for d, e in zip(io["shape"], ex)):
                raise BundleError(f"{path}: input {io['name']!r}: example_shape {ex!r} does not fit {io['shape']}")
            if math.prod(ex) > MAX_EXAMPLE:
                raise BundleError(f"{path}: input {io['name']!r}: example_shape {ex} is too large for the probe")


def _check_live(path: Path, live: Any, inputs: list[dict]) -> None:
    _expect(path, "live", live, dict)
    for key, typ in (("graph", str), ("graph_sha256", str), ("gemm_a_min", int), ("rewritten", int)):
        _expect(path, f"live.{key}", live.get(key), typ)
    _expect(path, "live.indexed_rows", live.get("indexed_rows"), dict)
    files = [live["graph"]]
    one_row = (live.get("one_row", 0), live.get("one_row_sha256", 0))  # both None (no decoder) or both strings
    if one_row != (None, None):
        _expect(path, "live.one_row", one_row[0], str)
        _expect(path, "live.one_row_sha256", one_row[1], str)
        files.append(live["one_row"])
    for name in files:
        if Path(name).name != name or name in ("", ".", "..", MANIFEST_FILE):
            raise BundleError(f"{path}: live graph file {name!r} must be a plain file name inside the bundle")
    names = {i["name"] for i in inputs}
    for name, rows in live["indexed_rows"].items():
        if name not in names or type(rows) is not int or rows < 0:
            raise BundleError(f"{path}: live.indexed_rows[{name!r}] = {rows!r}: not a row count of a graph input")
    if isinstance(live["rewritten"], bool) or live["rewritten"] < 0:
        raise BundleError(f"{path}: live.rewritten = {live['rewritten']!r}: not a count")


def _check_decoder(path: Path, d: Any, inputs: list[dict], outputs: list[dict]) -> None:
    """The ``decoder`` section names graph inputs and outputs of the right kinds: ids and mask (integers),
    positions and the logits positions to keep (integers, or null), logits, and per layer a past key/value
    input ``[batch, heads, past, dim]`` (heads and dim fixed) with its present output."""
    where = f"{path}: decoder"
    if not isinstance(d, dict) or not isinstance(d.get("cache"), list) or not d["cache"]:
        raise BundleError(f"{where}: malformed section (needs a non-empty 'cache' list)")
    ins, outs = {i["name"]: i for i in inputs}, {o["name"]: o for o in outputs}

    def named(key: str, table: dict, kind: str, optional: bool = False) -> dict | None:
        name = d.get(key)
        if name is None and optional:
            return None
        if not isinstance(name, str) or name not in table:
            raise BundleError(f"{where}: {key} {name!r} is not one of the graph's {kind}")
        return table[name]

    for key, rank in (("input_ids", 2), ("attention_mask", 2), ("position_ids", 2), ("logits_to_keep", 1)):
        io = named(key, ins, "inputs", optional=key in ("position_ids", "logits_to_keep"))
        if io is not None and (np.dtype(io["dtype"]).kind not in "iu" or len(io["shape"]) != rank):
            raise BundleError(f"{where}: {key} must be an integer input of rank {rank}, got {io['dtype']}{io['shape']}")
    named("logits", outs, "outputs")
    for i, layer in enumerate(d["cache"]):
        if not (isinstance(layer, list) and len(layer) == 4 and all(isinstance(n, str) for n in layer)):
            raise BundleError(f"{where}: cache layer {i} must name [past key, past value, present key, present value]")
        for name in layer[:2]:
            io = ins.get(name)
            if io is None or len(io["shape"]) != 4 or not all(is_dim(x) and x > 0 for x in io["shape"][1::2]):
                raise BundleError(f"{where}: cache input {name!r} is not a graph input [batch, heads, past, dim]")
        for name in layer[2:]:
            if name not in outs:
                raise BundleError(f"{where}: cache output {name!r} is not a graph output")
    for key in ("eos_token_id", "pad_token_id"):
        v = d.get(key)
        ok = v is None or is_dim(v) or (isinstance(v, list) and v and all(is_dim(x) for x in v))
        if not ok:
            raise BundleError(f"{where}: {key} {v!r} is not a token id, a list of them, or null")


def _check_parameter(path: Path, name: str, p: Any) -> None:
    where = f"{path}: parameter {name!r}"
    if not name or not isinstance(p, dict) or not isinstance(p.get("onnx"), str) or not p["onnx"]:
        raise BundleError(f"{where}: malformed entry {p!r}")
    if p.get("layout") not in LAYOUTS:
        raise BundleError(f"{where}: layout {p.get('layout')!r}, expected one of {LAYOUTS}")
    quant = p.get("quant")
    if quant is not None:
        ok = isinstance(quant, dict) and quant.get("format") == "int8" and isinstance(quant.get("scale"), str)
        ok = ok and set(quant) <= {"format", "scale", "u8t"}
        ok = ok and ("u8t" not in quant or (isinstance(quant["u8t"], str) and bool(quant["u8t"])))
        codes = p.get("dtype") == "int8" and p.get("layout") == "identity"
        copy = p.get("dtype") == "uint8" and p.get("layout") == "transposed" and "u8t" not in quant
        if not ok or not (codes or copy):
            raise BundleError(
                f"{where}: quant {quant!r} with dtype {p.get('dtype')!r}, layout {p.get('layout')!r}: a quantized "
                f"weight is int8 codes in the identity layout with {{'format': 'int8', 'scale': <parameter>}} "
                f"and optionally 'u8t': <graph input>, or their transposed uint8 copy (code + 128) in the "
                f"transposed layout with {{'format': 'int8', 'scale': <parameter>}}"
            )
    elif p.get("dtype") in ("int8", "uint8"):
        raise BundleError(
            f"{where}: dtype {p['dtype']!r} (quantized codes) without their 'quant' entry (format and scale)"
        )
    elif not isinstance(p.get("dtype"), str) or p["dtype"] not in NUMPY or NUMPY[p["dtype"]].short not in BUNDLE:
        raise BundleError(f"{where}: dtype {p.get('dtype')!r}, expected one of {[SHORT[d].numpy for d in BUNDLE]}")
    shape = p.get("shape")
    if not (isinstance(shape, list) and all(is_dim(d) for d in shape)):
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


def _copy16(entry: Any) -> bool:
    """A parameter stored as an int8 weight's transposed uint8 copy (the exporter's ``copy16`` form)."""
    return isinstance(entry, dict) and entry.get("dtype") == "uint8" and "quant" in entry
