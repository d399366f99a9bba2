"""The one place this suite reaches into format internals: the checksums a hostile writer recomputes.

The format modules are being reorganised, so each function is looked up in a list of homes, newest first.
When one moves or is renamed, edit ``HOMES`` and nothing else.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import cache

import torch

HOMES: dict[str, list[tuple[str, str]]] = {
    # metadata dict (str -> str) -> str, stored under "meta_checksum"
    "meta_checksum": [
        ("runtime.shira_file", "meta_checksum"),
        ("runtime.adapter_file", "meta_checksum"),
        ("runtime.adapter_file", "_meta_checksum"),
    ],
    # (key, tensor) -> str, or (tensor) -> str in format version 2; stored in the "checksums" metadata field
    "tensor_checksum": [
        ("runtime.shira_file", "tensor_checksum"),
        ("runtime.adapter_file", "tensor_checksum"),
        ("runtime.adapter_file", "_checksum"),
    ],
    # a bundle manifest's fingerprint.structure: from its "parameters" object (format 2) ...
    "structure_of": [("runtime.bundle", "structure_of")],
    # ... or from {parameter name: shape} (format 1)
    "structure_hash": [("runtime.bundle", "structure_hash"), ("runtime.fingerprint", "structure_hash")],
    # a manifest's "checksum" (format 2), over every other top-level field
    "manifest_checksum": [("runtime.bundle", "manifest_checksum"), ("runtime.bundle", "_checksum")],
}

# safetensors dtype letters -> torch dtype (to rebuild a tensor from header + bytes for its checksum)
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@cache
def _find(name: str) -> Callable:
    tried = []
    for module, attr in HOMES[name]:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            tried.append(f"{module}.{attr}")
    raise ImportError(f"tests/fuzz/compat.py: {name} not found in {tried}; update HOMES")


def meta_checksum(meta: dict[str, str]) -> str:
    return _find("meta_checksum")(meta)


def tensor_checksum(key: str, dtype: str, shape: list[int], raw: bytes) -> str:
    """The format's checksum of the tensor a safetensors header entry + its bytes describe."""
    tdtype = ST_DTYPES[dtype]
    if raw:
        t = torch.frombuffer(bytearray(raw), dtype=tdtype).reshape(shape)
    else:
        t = torch.empty(shape, dtype=tdtype)
    fn = _find("tensor_checksum")
    return fn(key, t) if len(inspect.signature(fn).parameters) == 2 else fn(t)


def _maybe(name: str) -> Callable | None:
    try:
        return _find(name)
    except ImportError:
        return None


def resum_manifest(m: dict, edited: tuple = ()) -> dict:
    """Recompute the integrity fields of a bundle manifest the way its format writes them, as a consistent liar
    would after editing it: the fingerprint's structure, then the checksum if the manifest has one. A field on
    the ``edited`` path (or holding it) is left as edited, so the edit is not undone."""

    def touched(field: tuple) -> bool:
        n = min(len(field), len(edited))
        return bool(edited) and edited[:n] == field[:n]

    fp, params = m.get("fingerprint"), m.get("parameters")
    if isinstance(fp, dict) and isinstance(params, dict) and not touched(("fingerprint", "structure")):
        try:
            if (structure_of := _maybe("structure_of")) is not None:
                fp["structure"] = structure_of(params)
            else:
                fp["structure"] = _find("structure_hash")({n: tuple(p["shape"]) for n, p in params.items()})
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # the edit broke what the structure is computed from: left stale
    if "checksum" in m and not touched(("checksum",)) and (checksum := _maybe("manifest_checksum")) is not None:
        m["checksum"] = checksum({k: v for k, v in m.items() if k != "checksum"})
    return m
