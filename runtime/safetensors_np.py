"""Reading safetensors files into numpy arrays, without torch: the adapter files and PEFT directories on a device
that has numpy, ml_dtypes and onnxruntime only.

``safetensors.numpy`` refuses BF16 and the FP8 dtypes, so the format is parsed here: an 8-byte little-endian
header length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str:
str}}``, then the data, every tensor's bytes at its offsets. Every file is untrusted; this reader refuses what
``safetensors.safe_open`` (0.8) refuses, each as an ``AdapterFormatError`` naming the file:

- a file under 8 bytes, a header length over 100 MB or past the end of the file, a header that is not UTF-8 or
  not one JSON object (leading and trailing whitespace allowed; NaN/Infinity, lone surrogate escapes and
  trailing bytes refused), a duplicated ``dtype``/``shape``/``data_offsets`` field or ``__metadata__``;
- metadata that is not an object of strings (``null`` reads as no metadata);
- an entry that is not an object with a known ``dtype``, a ``shape`` of non-negative integers below 2**64 and
  ``data_offsets`` of exactly two such integers;
- offsets that, sorted, do not tile the data from 0 without gap or overlap, a byte count other than
  ``prod(shape) * itemsize`` (overflow past 2**64 refused), or data that does not end exactly at the end of
  the file.

Like safetensors, a tensor name given twice keeps its last entry, a metadata key likewise, and unknown fields
of an entry are ignored. Stricter than safetensors: an entry written as a JSON array (serde would read it as a
tuple), the packed 4/6-bit dtypes (``F4``, ``F6_*``) and dimensions of 2**63 or more (torch refused those too).

Arrays are C-contiguous and writable: views of one private buffer the data was read into (independent of the
file), copied where an offset leaves them misaligned. BF16 and FP8 come back as ``ml_dtypes`` dtypes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from shira_runtime.errors import AdapterFormatError

MAX_HEADER = 100_000_000  # safetensors' own limit
METADATA = "__metadata__"
_U64 = 2**64 - 1
_FIELDS = ("dtype", "shape", "data_offsets")

# safetensors code -> (numpy dtype: a numpy spec, or an ml_dtypes type's name; torch's name of it: what messages
# and checksums say). ml_dtypes is imported only for a file that holds one of its types: importing it costs
# ~0.6 s, which a device's cold start would pay for nothing (adapters and bundles are fp32/fp16/int).
DTYPES: dict[str, tuple[str, str]] = {
    "BOOL": ("bool", "torch.bool"),
    "U8": ("<u1", "torch.uint8"),
    "I8": ("<i1", "torch.int8"),
    "F8_E5M2": ("float8_e5m2", "torch.float8_e5m2"),
    "F8_E4M3": ("float8_e4m3fn", "torch.float8_e4m3fn"),
    "F8_E8M0": ("float8_e8m0fnu", "torch.float8_e8m0fnu"),
    "I16": ("<i2", "torch.int16"),
    "U16": ("<u2", "torch.uint16"),
    "F16": ("<f2", "torch.float16"),
    "BF16": ("bfloat16", "torch.bfloat16"),
    "I32": ("<i4", "torch.int32"),
    "U32": ("<u4", "torch.uint32"),
    "F32": ("<f4", "torch.float32"),
    "C64": ("<c8", "torch.complex64"),
    "F64": ("<f8", "torch.float64"),
    "I64": ("<i8", "torch.int64"),
    "U64": ("<u8", "torch.uint64"),
}
ML_DTYPES = frozenset(("float8_e5m2", "float8_e4m3fn", "float8_e8m0fnu", "bfloat16"))  # names; not numpy's own
_NAME = {code: spec if spec in ML_DTYPES else np.dtype(spec).name for code, (spec, _) in DTYPES.items()}
CODE = {name: code for code, name in _NAME.items()}  # numpy dtype name -> safetensors code
TORCH_NAME = {_NAME[code]: tname for code, (_, tname) in DTYPES.items()}  # numpy dtype name -> torch's name
FLOATING = frozenset(_NAME[c] for c in ("F8_E5M2", "F8_E4M3", "F8_E8M0", "F16", "BF16", "F32", "F64"))
_RESOLVED: dict[str, np.dtype] = {}


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype of safetensors code ``code`` (bf16 and fp8: ml_dtypes' types, imported here)."""
    dt = _RESOLVED.get(code)
    if dt is None:
        spec = DTYPES[code][0]
        if spec in ML_DTYPES:
            import ml_dtypes

            dt = np.dtype(getattr(ml_dtypes, spec))
        else:
            dt = np.dtype(spec)
        _RESOLVED[code] = dt
    return dt


def numpy_of(torch_name: str) -> np.dtype | None:
    """The numpy dtype of torch's dtype name (``"torch.bfloat16"``), None for one no file can hold."""
    code = next((c for c, (_, t) in DTYPES.items() if t == torch_name), None)
    return numpy_dtype(code) if code is not None else None


def torch_name(dtype: np.dtype) -> str:
    """torch's name of a numpy dtype (``"torch.bfloat16"``): messages and checksums read as they did with torch."""
    dtype = np.dtype(dtype)
    return TORCH_NAME.get(dtype.name, str(dtype))


def is_floating(dtype: np.dtype) -> bool:
    """torch's ``is_floating_point`` for the dtypes a file can hold (ml_dtypes' report kind ``V``, not ``f``)."""
    return np.dtype(dtype).name in FLOATING


def read(path: str | Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """``(metadata, tensors)`` of the safetensors file at ``path``, tensors sorted by name; anything malformed
    is an ``AdapterFormatError`` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _Bad("header too small")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER:
                raise _Bad("header too large")
            if n + 8 > size:
                raise _Bad(f"invalid header length {n} for a file of {size} bytes")
            text = f.read(n)
            if len(text) != n:
                raise _Bad("the file changed while it was read")
            meta, entries = _parse_header(text)
            end = _validate(entries)
            if end + 8 + n != size:
                raise _Bad("incomplete metadata, file not fully covered")
            data = np.empty(end, dtype=np.uint8)
            if f.readinto(memoryview(data)) != end:
                raise _Bad("the file changed while it was read")
    except _Bad as exc:
        raise AdapterFormatError(f"{path}: unreadable safetensors file ({exc})") from None
    except (OSError, MemoryError) as exc:
        raise AdapterFormatError(f"{path}: unreadable safetensors file ({exc})") from None
    tensors = {}
    for name in sorted(entries):
        dtype, shape, (begin, stop) = entries[name]
        a = data[begin:stop].view(dtype).reshape(shape)
        tensors[name] = a if a.flags.aligned else a.copy()
    return meta, tensors


class _Bad(Exception):
    """A reason the file is refused (becomes the AdapterFormatError's parenthesis)."""


class _Object(dict):
    """A JSON object that remembers which keys it saw more than once."""

    dups: frozenset = frozenset()


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj, dups = _Object(), set()
    for key, value in pairs:
        _no_surrogates(key)
        if key in obj:
            dups.add(key)
        obj[key] = value
    obj.dups = frozenset(dups)
    return obj


def _no_surrogates(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad("invalid JSON in header: a lone surrogate escape") from None


def _no_constant(name: str) -> Any:
    raise _Bad(f"invalid JSON in header: {name} is not JSON")


def _parse_header(raw: bytes) -> tuple[dict[str, str], dict[str, tuple[np.dtype, tuple[int, ...], tuple[int, int]]]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad(f"invalid UTF-8 in header: {exc}") from None
    try:
        header = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _Bad(f"invalid JSON in header: {exc}") from None
    if not isinstance(header, dict):
        raise _Bad(f"invalid JSON in header: a {type(header).__name__}, expected an object")
    if METADATA in header.dups:
        raise _Bad(f"invalid JSON in header: duplicate field `{METADATA}`")
    raw_meta = header.pop(METADATA, None)
    if raw_meta is None:
        meta = {}
    elif not isinstance(raw_meta, dict):
        raise _Bad(f"invalid JSON in header: {METADATA} is a {type(raw_meta).__name__}, expected a map")
    else:
        for key, value in raw_meta.items():
            if not isinstance(value, str):
                raise _Bad(f"invalid JSON in header: metadata {key!r} is {value!r}, expected a string")
            _no_surrogates(value)
        meta = dict(raw_meta)
    entries = {}
    for name, info in header.items():
        entries[name] = _entry(name, info)
    return meta, entries


def _entry(name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    where = f"tensor `{name}`"
    if not isinstance(info, dict):
        raise _Bad(f"invalid JSON in header: {where} is a {type(info).__name__}, expected a map")
    for field in _FIELDS:
        if field in info.dups:
            raise _Bad(f"invalid JSON in header: {where}: duplicate field `{field}`")
        if field not in info:
            raise _Bad(f"invalid JSON in header: {where}: missing field `{field}`")
    code, shape, offsets = (info[f] for f in _FIELDS)
    if not isinstance(code, str) or code not in DTYPES:
        raise _Bad(f"invalid JSON in header: {where}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_u64(d) for d in shape):
        raise _Bad(f"invalid JSON in header: {where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_u64(o) for o in offsets)):
        raise _Bad(f"invalid JSON in header: {where}: data_offsets {offsets!r} are not two non-negative integers")
    return numpy_dtype(code), tuple(shape), (offsets[0], offsets[1])


def _u64(x: Any) -> bool:
    return type(x) is int and 0 <= x <= _U64


def _validate(entries: dict[str, tuple[np.dtype, tuple[int, ...], tuple[int, int]]]) -> int:
    """safetensors' rule: sorted by offsets, the tensors tile ``[0, end)`` exactly, each with
    ``prod(shape) * itemsize`` bytes (no intermediate product past 2**64). Returns ``end``."""
    start = 0
    for name, (dtype, shape, (begin, stop)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if begin != start or stop < begin:
            raise _Bad(f"invalid offset for tensor `{name}`")
        start = stop
        count = 1
        for d in shape:
            count *= d
            if count > _U64:
                raise _Bad(f"overflow computing buffer size from the shape of tensor `{name}`")
        if count * dtype.itemsize > _U64:
            raise _Bad(f"overflow computing buffer size from the shape of tensor `{name}`")
        if count * dtype.itemsize != stop - begin:
            raise _Bad(
                f"tensor `{name}`: {CODE[dtype.name]}{list(shape)} needs {count * dtype.itemsize} bytes, "
                f"its offsets give {stop - begin}"
            )
        if any(d >= 2**63 for d in shape):
            raise _Bad(f"tensor `{name}`: a dimension of {list(shape)} is too large")
    return start
