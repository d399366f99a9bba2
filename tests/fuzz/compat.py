"""The one place this suite reaches into format internals: the checksums a hostile writer recomputes.

The format modules are being reorganised, so each function is looked up in a list of homes, newest first.
When one moves or is renamed, edit ``HOMES`` and nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

import torch

HOMES: dict[str, list[tuple[str, str]]] = {
    # metadata dict (str -> str) -> str, stored under "meta_checksum"
    "meta_checksum": [("shira_runtime.shira_file", "meta_checksum")],
    # (key, tensor) -> str, stored in the "checksums" metadata field
    "tensor_checksum": [("shira_runtime.shira_file", "tensor_checksum")],
    # a bundle manifest's fingerprint.structure, from its "parameters" object
    "structure_of": [("shira_runtime.manifest", "structure_of")],
    # a manifest's JSON with its "checksum" recomputed over every other top-level field
    "seal": [("shira_runtime.manifest", "Manifest")],
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
    t = torch.frombuffer(bytearray(raw), dtype=tdtype).reshape(shape) if raw else torch.empty(shape, dtype=tdtype)
    return _find("tensor_checksum")(key, t)


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
            fp["structure"] = _find("structure_of")(params)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # the edit broke what the structure is computed from: left stale
    if "checksum" in m and not touched(("checksum",)):
        m["checksum"] = _find("seal").seal(m)["checksum"]
    return m
