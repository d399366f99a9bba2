"""Pure mutations of hostile inputs: ``bytes -> bytes`` and ``dict -> dict``, no I/O.

A safetensors file is ``u64 little-endian header length | JSON header | data``; the header maps tensor keys to
``{"dtype", "shape", "data_offsets"}`` (offsets relative to the data) and ``__metadata__`` to str -> str.
Parsing it here (not through safetensors) lets a mutation produce any byte-level variant.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

from tests.fuzz import compat

META = "__metadata__"
JsonPath = tuple  # a JSON path: keys and list indices


# -- the safetensors layout --
def parse(raw: bytes) -> tuple[dict, bytes]:
    """(header, data) of a well-formed safetensors file."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def serialize(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header and data; the header is space-padded to 8 bytes as safetensors does."""
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def header_end(raw: bytes) -> int:
    """Offset of the first data byte."""
    return 8 + struct.unpack("<Q", raw[:8])[0]


def tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != META)


def tensor_span(header: dict, key: str) -> tuple[int, int]:
    begin, end = header[key]["data_offsets"]
    return begin, end


def edit_header(fn: Callable[[dict], dict]) -> Callable[[bytes], bytes]:
    """Lift a header edit to a file edit (the data is kept byte for byte)."""

    def run(raw: bytes) -> bytes:
        header, data = parse(raw)
        return serialize(fn(copy.deepcopy(header)), data)

    return run


def edit_file(fn: Callable[[dict, bytes], tuple[dict, bytes]]) -> Callable[[bytes], bytes]:
    """Lift an edit of (header, data) to a file edit."""

    def run(raw: bytes) -> bytes:
        header, data = parse(raw)
        return serialize(*fn(copy.deepcopy(header), data))

    return run


def chain(*fns: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(x: Any) -> Any:
        for fn in fns:
            x = fn(x)
        return x

    return run


# -- bytes -> bytes --
def flip(pos: int, mask: int) -> Callable[[bytes], bytes]:
    """XOR the byte at ``pos`` with ``mask`` (1..255)."""

    def run(raw: bytes) -> bytes:
        b = bytearray(raw)
        b[pos] ^= mask
        return bytes(b)

    return run


def truncate(length: int) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:length]


def append(extra: bytes) -> Callable[[bytes], bytes]:
    return lambda raw: raw + extra


def set_header_length(n: int) -> Callable[[bytes], bytes]:
    """Overwrite the 8-byte little-endian header length with ``n`` (taken modulo 2**64)."""
    return lambda raw: struct.pack("<Q", n % 2**64) + raw[8:]


# -- header dict -> header dict --
def set_entry(key: str, field: str, value: Any) -> Callable[[dict], dict]:
    """Set ``field`` (dtype, shape, data_offsets) of tensor ``key``'s header entry."""

    def run(header: dict) -> dict:
        header[key][field] = value
        return header

    return run


def swap_entries(k1: str, k2: str) -> Callable[[dict], dict]:
    """Relabel: tensor ``k1`` gets ``k2``'s dtype/shape/bytes and the other way round (a key only one of them
    has moves to the other; neither: nothing)."""

    def run(header: dict) -> dict:
        a, b = header.pop(k1, None), header.pop(k2, None)
        if b is not None:
            header[k1] = b
        if a is not None:
            header[k2] = a
        return header

    return run


def swap_offsets(k1: str, k2: str) -> Callable[[dict], dict]:
    def run(header: dict) -> dict:
        a, b = header[k1]["data_offsets"], header[k2]["data_offsets"]
        header[k1]["data_offsets"], header[k2]["data_offsets"] = b, a
        return header

    return run


def set_meta(field: str, value: Any) -> Callable[[dict], dict]:
    """Set a metadata field (any JSON value: safetensors wants strings, a hostile writer need not)."""

    def run(header: dict) -> dict:
        header.setdefault(META, {})[field] = value
        return header

    return run


def drop_meta(field: str) -> Callable[[dict], dict]:
    def run(header: dict) -> dict:
        header.get(META, {}).pop(field, None)
        return header

    return run


def edit_meta_json(field: str, fn: Callable[[Any], Any]) -> Callable[[dict], dict]:
    """Edit a metadata field that holds JSON text (shapes, fingerprint, checksums) as a JSON value."""

    def run(header: dict) -> dict:
        header[META][field] = json.dumps(fn(json.loads(header[META][field])))
        return header

    return run


def set_whole_meta(value: Any) -> Callable[[dict], dict]:
    def run(header: dict) -> dict:
        header[META] = value
        return header

    return run


def refresh_meta_checksum(header: dict) -> dict:
    """What a hostile writer does after editing the metadata: recompute ``meta_checksum``."""
    meta = header.get(META)
    if isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()):
        meta["meta_checksum"] = compat.meta_checksum(meta)
    return header


# -- (header, data) -> (header, data) --
def write_element(key: str, index: int, value: bytes) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Overwrite element ``index`` of tensor ``key`` with the raw bytes ``value`` (one element's width)."""

    def run(header: dict, data: bytes) -> tuple[dict, bytes]:
        begin, _ = tensor_span(header, key)
        at = begin + index * len(value)
        return header, data[:at] + value + data[at + len(value) :]

    return run


def scale_element(key: str, index: int, fn: Callable[[float], float]) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Replace element ``index`` of an F32 tensor ``key`` by ``fn(old)``."""

    def run(header: dict, data: bytes) -> tuple[dict, bytes]:
        begin, _ = tensor_span(header, key)
        at = begin + 4 * index
        (old,) = struct.unpack("<f", data[at : at + 4])
        return header, data[:at] + struct.pack("<f", fn(old)) + data[at + 4 :]

    return run


def refresh_checksums(header: dict, data: bytes) -> tuple[dict, bytes]:
    """Recompute every tensor checksum the format stores (then the metadata checksum): a consistent liar."""
    meta = header.get(META) or {}
    sums = {}
    for key in tensor_keys(header):
        e = header[key]
        begin, end = e["data_offsets"]
        try:
            sums[key] = compat.tensor_checksum(key, e["dtype"], e["shape"], data[begin:end])
        except (KeyError, ValueError, RuntimeError, TypeError):
            sums[key] = "0" * 32  # an entry the edit made inconsistent: safetensors refuses the file anyway
    if "checksums" in meta:
        meta["checksums"] = json.dumps(dict(sorted(sums.items())))
    return refresh_meta_checksum(header), data


# -- JSON documents (manifest.json, adapter_config.json) --
def paths(obj: Any, prefix: JsonPath = ()) -> Iterator[JsonPath]:
    """Every key path in a JSON value, parents before children."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


def get_path(obj: Any, path: JsonPath) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def set_path(path: JsonPath, value: Any) -> Callable[[Any], Any]:
    def run(obj: Any) -> Any:
        obj = copy.deepcopy(obj)
        get_path(obj, path[:-1])[path[-1]] = copy.deepcopy(value)
        return obj

    return run


def del_path(path: JsonPath) -> Callable[[Any], Any]:
    def run(obj: Any) -> Any:
        obj = copy.deepcopy(obj)
        del get_path(obj, path[:-1])[path[-1]]
        return obj

    return run


def edit_path(path: JsonPath, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def run(obj: Any) -> Any:
        obj = copy.deepcopy(obj)
        parent = get_path(obj, path[:-1])
        parent[path[-1]] = fn(parent[path[-1]])
        return obj

    return run


def json_bytes(fn: Callable[[Any], Any]) -> Callable[[bytes], bytes]:
    """Lift a JSON-document edit to a file edit."""
    return lambda raw: json.dumps(fn(json.loads(raw)), indent=2).encode()


# values of every JSON type, to retype a field with
RETYPES = (None, True, 0, -1, 1.5, 2**64, "", "x", [], [1], {}, {"x": 1})


def other_types(value: Any) -> list[Any]:
    """Replacement values whose JSON type differs from ``value``'s."""
    kind = _json_kind(value)
    return [v for v in RETYPES if _json_kind(v) != kind]


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__
