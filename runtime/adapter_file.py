"""Our adapter file: a safetensors file with JSON-able metadata.

Format ``shira-runtime/sparse``, version 2 (written; version 1 still loads):
- ``<name>::gaps``: the sorted flat indices as gaps (``idx[0]``, then ``idx[i] - idx[i-1] - 1``) in uint8, or
  int16 read as uint16, whichever is smaller for that tensor; the largest value of the width is an escape,
  whose gap is the next entry of ``<name>::escapes`` (int32, int64 past 2**31). Decoding is a few
  vectorized ops and a cumsum.
- ``<name>::values``: fp32, fp16 or bf16 (chosen when saving);
- ``<name>::probe``: fp32, the fingerprint's base values (when the adapter has a fingerprint);
- metadata ``format``, ``version``, ``scale``, ``mask_kind``, ``shapes`` (JSON name -> shape), ``fingerprint``
  (JSON, optional), ``checksums`` (JSON tensor key -> sha256 of its bytes, checked on load).
Version 1 stored ``<name>::indices`` (int32/int64 flat) instead of gaps, and no checksums.
Every file is treated as untrusted: anything unexpected is an ``AdapterFormatError`` naming file and tensor.
"""

from __future__ import annotations

import hashlib
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
VERSION = 2
READS = ("1", "2")
SEP = "::"
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# gap width -> (stored dtype, escape value, mask to read it unsigned)
WIDTHS = {1: (torch.uint8, 0xFF, 0xFF), 2: (torch.int16, 0xFFFF, 0xFFFF)}


def encode_gaps(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique flat indices -> (gaps in the smaller of uint8/uint16 with escapes, escaped gaps int64)."""
    idx = idx.long()
    gaps = torch.diff(idx, prepend=torch.tensor([-1])) - 1  # >= 0
    best = None
    for dtype, esc, _ in WIDTHS.values():
        big = gaps >= esc
        size = gaps.numel() * torch.empty(0, dtype=dtype).element_size() + int(big.sum()) * 4
        if best is None or size < best[0]:
            best = (size, dtype, esc, big)
    _, dtype, esc, big = best
    escapes = gaps[big].contiguous()
    if not escapes.numel() or int(escapes.max()) < 2**31:
        escapes = escapes.to(torch.int32)
    small = torch.where(big, esc, gaps)
    small = small.to(torch.uint8) if dtype == torch.uint8 else small.to(torch.int32).to(torch.int16)
    return small.contiguous(), escapes


def decode_gaps(gaps: torch.Tensor, escapes: torch.Tensor, where: str) -> torch.Tensor:
    """Inverse of ``encode_gaps``: flat int64 indices (vectorized)."""
    width = {torch.uint8: 1, torch.int16: 2}.get(gaps.dtype)
    if width is None or gaps.dim() != 1 or escapes.dtype not in (torch.int32, torch.int64) or escapes.dim() != 1:
        raise AdapterFormatError(f"{where}: gaps must be uint8/int16 [N] and escapes int32/int64 [E]")
    _, esc, mask = WIDTHS[width]
    g = gaps.to(torch.int64) & mask
    big = g == esc
    if int(big.sum()) != escapes.numel():
        raise AdapterFormatError(f"{where}: {int(big.sum())} escaped gaps but {escapes.numel()} escape values")
    if escapes.numel() and int(escapes.min()) < esc:
        raise AdapterFormatError(f"{where}: an escape value is smaller than the escape marker {esc}")
    g[big] = escapes.long()
    return torch.cumsum(g + 1, 0) - 1


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def _meta_checksum(meta: dict[str, str]) -> str:
    body = json.dumps({k: v for k, v in sorted(meta.items()) if k != "meta_checksum"})
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def save_sparse(adapter: SparseAdapter, path: str | Path, values: str | None = None) -> None:
    """Write ``adapter`` in format version 2; ``values``: ``"fp32"``/``"fp16"``/``"bf16"`` or None (keep)."""
    if values is not None and values not in VALUE_DTYPES:
        raise ValueError(f"values={values!r}: expected one of {sorted(VALUE_DTYPES)} or None")
    tensors: dict[str, torch.Tensor] = {}
    for name in adapter.indices:
        if name not in adapter.shapes:
            raise AdapterValueError(f"cannot save tensor {name!r}: its base shape is unknown (set shapes)")
        idx, val = adapter.flat(name, adapter.shapes[name], adapter="<save>")
        gaps, escapes = encode_gaps(idx)
        tensors[f"{name}{SEP}gaps"] = gaps
        tensors[f"{name}{SEP}escapes"] = escapes
        tensors[f"{name}{SEP}values"] = val.to(VALUE_DTYPES[values]) if values else val
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
    meta["checksums"] = json.dumps({k: _checksum(t) for k, t in sorted(tensors.items())})
    meta["meta_checksum"] = _meta_checksum(meta)
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
    if version not in READS:
        raise AdapterFormatError(f"{path}: format version {version!r} is not supported (this runtime reads {READS})")
    if version != "1":
        if meta.get("meta_checksum") != _meta_checksum(meta):
            raise AdapterFormatError(f"{path}: the metadata is corrupted (checksum mismatch)")
        try:
            checksums = json.loads(meta["checksums"])
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterFormatError(f"{path}: bad metadata (checksums: {exc!r})") from exc
        if not isinstance(checksums, dict) or set(checksums) != set(tensors):
            raise AdapterFormatError(f"{path}: the checksums do not list exactly the tensors stored")
        for key, t in tensors.items():
            if _checksum(t) != checksums[key]:
                raise AdapterFormatError(f"{path}: tensor {key!r} is corrupted (checksum mismatch)")
    try:
        scale = float(meta["scale"])
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
        fp_meta = meta.get("fingerprint")
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterFormatError(f"{path}: bad metadata ({exc!r})") from exc
    if not math.isfinite(scale):
        raise AdapterFormatError(f"{path}: scale {scale} is not finite")
    indices, values, probes, gaps, escapes = {}, {}, {}, {}, {}
    parts = {"values": values, "probe": probes}
    parts.update({"indices": indices} if version == "1" else {"gaps": gaps, "escapes": escapes})
    for key, t in tensors.items():
        name, _, part = key.rpartition(SEP)
        target = parts.get(part)
        if target is None or not name:
            raise AdapterFormatError(f"{path}: unexpected tensor {key!r}")
        target[name] = t
    for name in sorted(set(gaps) | set(escapes)):
        if name not in gaps or name not in escapes:
            raise AdapterFormatError(f"{path}: tensor {name!r} lacks its gaps or its escapes")
        indices[name] = decode_gaps(gaps[name], escapes[name], f"{path}: tensor {name!r}")
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
