"""Turning adapters (files, PEFT directories, in-memory objects) into ``Prepared`` entries for one backend.

Everything that can be wrong with an adapter is found here, before any switch writes a byte.
"""

from __future__ import annotations

import torch

from runtime.adapters import LoraAdapter, SparseAdapter
from runtime.backend import Backend
from runtime.errors import AdapterMismatchError
from runtime.fingerprint import PROBES
from runtime.switcher import Prepared, Switcher

MODES = ("fused", "unfused")


def prepare(
    backend: Backend, switcher: Switcher, name: str, adapter: SparseAdapter | LoraAdapter, mode: str | None = None
) -> Prepared:
    """Validate ``adapter`` against ``backend``. ``mode``: LoRA only, ``"fused"`` (default) or ``"unfused"``."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"adapter {name!r}: mode {mode!r} is not one of {MODES}")
    if isinstance(adapter, SparseAdapter):
        if mode == "unfused":
            raise ValueError(f"adapter {name!r}: sparse adapters are always fused (zero inference overhead)")
        return _prepare_sparse(backend, switcher, name, adapter)
    return _prepare_lora(backend, name, adapter, unfused=mode == "unfused")


def _claim(backend: Backend, seen: dict[str, str], tensor: str, adapter: str, label: str) -> str:
    canon = backend.canonical(tensor, label)
    if canon in seen:
        raise AdapterMismatchError(
            f"adapter {adapter!r}: tensors {seen[canon]!r} and {tensor!r} are the same (tied) weight"
        )
    seen[canon] = tensor
    backend.check_writable(canon, adapter)
    return canon


def _prepare_sparse(backend: Backend, switcher: Switcher, name: str, adapter: SparseAdapter) -> Prepared:
    prep, seen, logical = Prepared(name, float(adapter.scale)), {}, {}
    if not torch.isfinite(torch.tensor(adapter.scale)):
        raise AdapterMismatchError(f"adapter {name!r}: scale {adapter.scale} is not finite")
    for tensor in adapter.indices:
        canon = _claim(backend, seen, tensor, name, adapter.label(name))
        idx, val = adapter.flat(tensor, backend.shapes[canon], name)
        logical[tensor] = (canon, idx)
        delta = val.to(torch.float32).contiguous()
        if canon in backend.transposed:
            sidx, order = torch.sort(backend.storage_index(canon, idx))
            idx, delta = sidx.to(idx.dtype), delta[order]
        prep.sparse[canon] = (idx, delta)
        prep.absmax[canon] = float(delta.abs().max()) if delta.numel() else 0.0
        switcher.base_absmax(canon)  # computed (and cached) now, not in the first switch
    if adapter.fingerprint is not None:
        shapes = {t: backend.shapes[c] for t, (c, _) in logical.items()}
        probes = {
            t: switcher.base_values(c, backend.storage_index(c, idx[:PROBES]))
            for t, (c, idx) in logical.items()
            if t in adapter.fingerprint.probes
        }
        adapter.fingerprint.check(adapter.label(name), shapes, probes)
    return prep


def _prepare_lora(backend: Backend, name: str, adapter: LoraAdapter, unfused: bool) -> Prepared:
    prep, seen = Prepared(name, 1.0), {}
    for tensor in adapter.A:
        canon = _claim(backend, seen, tensor, name, adapter.label(name))
        a, b = adapter.factors(tensor, backend.shapes[canon], name)
        if unfused:
            if adapter.fan_in_fan_out:
                raise AdapterMismatchError(f"adapter {name!r}: unfused mode needs nn.Linear layout (no fan_in_fan_out)")
            prep.unfused[backend.check_unfused(tensor, name)] = (a, b, float(adapter.scaling[tensor]))
            continue
        if adapter.fan_in_fan_out:  # delta is [out, in] while the tensor is [in, out]: swap roles
            a, b = b.t().contiguous(), a.t().contiguous()
        prep.lora[canon] = (a, b, float(adapter.scaling[tensor]))
    return prep
