"""Our adapter file: a safetensors file with JSON-able metadata.

Format ``shira-runtime/sparse`` version 1:
- tensors ``<name>::indices`` (int32/int64 flat, sorted, unique), ``<name>::values`` (fp32/fp16/bf16),
  ``<name>::probe`` (fp32, the fingerprint's base values, when the adapter has a fingerprint);
- metadata ``format``, ``version``, ``scale``, ``mask_kind``, ``shapes`` (JSON name -> shape),
  ``fingerprint`` (JSON, optional).
Every file is treated as untrusted: anything unexpected is an ``AdapterFormatError`` naming file and tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from runtime.errors import AdapterFormatError, AdapterValueError
from runtime.fingerprint import Fingerprint
from runtime.sparse import SparseAdapter

FORMAT = "shira-runtime/sparse"
VERSION = 1
SEP = "::"


def save_sparse(adapter: SparseAdapter, path: str | Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name in adapter.indices:
        if name not in adapter.shapes:
            raise AdapterValueError(f"cannot save tensor {name!r}: its base shape is unknown (set shapes)")
        idx, val = adapter.flat(name, adapter.shapes[name], adapter="<save>")
        tensors[f"{name}{SEP}indices"] = idx
        tensors[f"{name}{SEP}values"] = val
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "scale": repr(float(adapter.scale)),
        "mask_kind": adapter.mask_kind,
        "shapes": json.dumps({n: list(s) for n, s in adapter.shapes.items() if n in adapter.indices}),
    }
    if adapter.fingerprint is not None:
        meta["fingerprint"] = adapter.fingerprint.to_meta()
        for name, probe in adapter.fingerprint.probes.items():
            tensors[f"{name}{SEP}probe"] = probe.contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """All tensors and the metadata of a safetensors file, with errors that name the file."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{path}: unreadable safetensors file ({exc})") from exc
    return meta, tensors


def load_sparse(path: str | Path) -> SparseAdapter:
    path = Path(path)
    meta, tensors = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
    version = meta.get("version")
    if version != str(VERSION):
        raise AdapterFormatError(f"{path}: format version {version!r} is not supported (this runtime reads {VERSION})")
    try:
        scale = float(meta["scale"])
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
        fp_meta = meta.get("fingerprint")
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterFormatError(f"{path}: bad metadata ({exc!r})") from exc
    if not math.isfinite(scale):
        raise AdapterFormatError(f"{path}: scale {scale} is not finite")
    indices, values, probes = {}, {}, {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(SEP)
        target = {"indices": indices, "values": values, "probe": probes}.get(part)
        if target is None or not name:
            raise AdapterFormatError(f"{path}: unexpected tensor {key!r}")
        target[name] = t
    for name in sorted(set(indices) | set(values)):
        if name not in indices or name not in values:
            raise AdapterFormatError(f"{path}: tensor {name!r} lacks its indices or its values")
        if name not in shapes:
            raise AdapterFormatError(f"{path}: tensor {name!r} has no recorded shape")
        if indices[name].dtype not in (torch.int32, torch.int64) or indices[name].dim() != 1:
            raise AdapterFormatError(f"{path}: tensor {name!r}: indices must be int32/int64 [N]")
    fingerprint = None
    if fp_meta is not None:
        try:
            fingerprint = Fingerprint.from_meta(fp_meta, probes)
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterFormatError(f"{path}: bad fingerprint ({exc!r})") from exc
    return SparseAdapter(indices, values, shapes, scale, fingerprint, meta.get("mask_kind", "random"))
