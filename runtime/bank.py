"""Turning adapters (files, PEFT directories, in-memory objects) into ``Prepared`` entries for one backend.

Everything that can be wrong with an adapter is found here, before any switch writes a byte.
"""

from __future__ import annotations

import math

import numpy as np
from shira_runtime.adapters import CodesAdapter, LoraAdapter, SparseAdapter
from shira_runtime.arrays import as_ops, copy_bytes, dtype_name, int8_codes
from shira_runtime.backend import Array, Backend
from shira_runtime.errors import AdapterMismatchError, BaseMismatchError
from shira_runtime.fingerprint import PROBES, codes_base_hash
from shira_runtime.switcher import Prepared, Switcher

FORMAT_NAMES = {"int8": "int8", "float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}  # qformats' names

MODES = ("fused", "unfused")


def prepare(
    backend: Backend, switcher: Switcher, name: str, adapter: SparseAdapter | LoraAdapter, mode: str | None = None
) -> Prepared:
    """Validate ``adapter`` against ``backend``. ``mode``: LoRA only, ``"fused"`` (default) or ``"unfused"``."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"adapter {name!r}: mode {mode!r} is not one of {MODES}")
    if isinstance(adapter, CodesAdapter):
        if mode is not None and mode != "fused":
            raise ValueError(f"adapter {name!r}: an adapter of codes is always written into the weights")
        return _prepare_codes(backend, switcher, name, adapter)
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
    prep, seen, logical, ops = Prepared(name, float(adapter.scale)), {}, {}, backend.ops
    if not math.isfinite(adapter.scale):
        raise AdapterMismatchError(f"adapter {name!r}: scale {adapter.scale} is not finite")
    for tensor in adapter.indices:
        canon = _claim(backend, seen, tensor, name, adapter.label(name))
        idx, val = (as_ops(x, ops) for x in adapter.flat(tensor, backend.shapes[canon], name))
        logical[tensor] = (canon, idx)
        delta = ops.to_fp32(val)
        if canon in backend.transposed:
            idx, delta = _storage_order(ops, backend.storage_index(canon, idx), idx, delta)
        prep.sparse[canon] = (idx, delta)
        switcher.describe(canon, idx, prep.runs, prep.orders)
        prep.absmax[canon] = ops.absmax(delta)
        if canon in backend.scales:
            _check_codes(backend, switcher, canon, idx, adapter.label(name))
        else:
            switcher.base_absmax(canon)  # computed (and cached) now, not in the first switch
    if adapter.fingerprint is not None:
        shapes = {t: backend.shapes[c] for t, (c, _) in logical.items()}
        probes, slack = {}, {}
        for t, (c, idx) in logical.items():
            if t not in adapter.fingerprint.probes:
                continue
            sidx = backend.storage_index(c, idx[:PROBES])
            probes[t] = switcher.base_values(c, sidx)
            if c in backend.scales:  # a quantized copy of the base: its grid values, within half a step
                scale = backend.scales_at(c, sidx)
                probes[t], slack[t] = ops.decode(probes[t], scale), ops.half_step(probes[t], scale)
        adapter.fingerprint.check(adapter.label(name), shapes, probes, slack)
    return prep


def _prepare_codes(backend: Backend, switcher: Switcher, name: str, adapter: CodesAdapter) -> Prepared:
    """An adapter of codes fits only the quantized base it was baked for: same tensors, shapes, formats, scales
    and base codes under its indices (``codes_base_hash``); anything else is refused here, before any write."""
    prep, seen, label, ops = Prepared(name, 1.0, baked=True), {}, adapter.label(name), backend.ops
    for tensor in adapter.indices:
        canon = _claim(backend, seen, tensor, name, label)
        where = f"adapter {label!r}: tensor {tensor!r}"
        if canon not in backend.scales:
            raise AdapterMismatchError(f"{where}: an adapter of codes needs a quantized weight; this one is not")
        w = backend.tensors[canon]
        codes, idx = as_ops(adapter.codes[tensor], ops), as_ops(adapter.indices[tensor], ops)
        copy = dtype_name(w) == "uint8"  # an int8 bundle's transposed copy (code + 128): int8 codes to it
        if dtype_name(codes) != ("int8" if copy else dtype_name(w)):
            raise BaseMismatchError(f"{where}: baked for {_fmt(codes)} codes, this base holds {_fmt(w)}")
        if tuple(adapter.shapes[tensor]) != backend.shapes[canon]:
            raise BaseMismatchError(
                f"{where}: baked for shape {adapter.shapes[tensor]}, the base has {backend.shapes[canon]}"
            )
        sidx = backend.storage_index(canon, idx)
        base = switcher.base_values(canon, sidx)
        if copy:
            base = ops.from_numpy(int8_codes(ops.to_numpy(base)))
        want = codes_base_hash(_fmt(w), backend.shapes[canon], backend.scales[canon], base)
        if want != adapter.base[tensor]:
            raise BaseMismatchError(
                f"{where}: baked for another quantized base (its scales or the codes under the adapter differ)"
            )
        _check_codes(backend, switcher, canon, sidx, label)
        if copy:  # the copy's indices in its order, as the kernels take them; its bytes, code + 128
            idx, codes = _storage_order(ops, sidx, idx, ops.from_numpy(copy_bytes(ops.to_numpy(codes))))
        prep.sparse[canon] = (idx, codes)
        switcher.describe(canon, idx, prep.runs, prep.orders)
        prep.absmax[canon] = 0.0
    return prep


def _storage_order(ops, sidx: Array, idx: Array, values: Array) -> tuple[Array, Array]:
    """Storage indices ``sidx`` sorted (the kernels' order), of ``idx``'s dtype, and ``values`` in that order."""
    sidx, order = ops.sort(sidx)
    return (sidx.astype(idx.dtype) if ops.kind == "numpy" else sidx.to(idx.dtype)), values[order]


def _fmt(codes: Array) -> str:
    """The 1-byte format's name (``shira_runtime.kernels.qformats``) of ``codes``' dtype (uint8: an int8 bundle's
    copy of int8 codes)."""
    name = "int8" if dtype_name(codes) == "uint8" else dtype_name(codes)
    return FORMAT_NAMES.get(name, name)


def _check_codes(backend: Backend, switcher: Switcher, t: str, idx: Array, adapter: str) -> None:
    """The base codes an adapter touches must be points of the grid: finite FP8, int8 in [-127, 127]."""
    codes = switcher.base_values(t, idx)
    ops = backend.ops
    bad = ops.bad_codes(codes)
    if bool(bad.any()):
        i = ops.first(bad)
        raise AdapterMismatchError(
            f"adapter {adapter!r}: tensor {t!r}: the base code at {_where(backend, t, int(idx[i]))} is not a point "
            f"of the {_fmt(codes)} grid ({_code_value(ops, codes[i : i + 1])}); cannot switch it"
        )


def _where(backend: Backend, t: str, sidx: int) -> str:
    """Storage index ``sidx`` of tensor ``t`` as the adapter names it: its logical index (and the copy's position
    where the tensor is stored transposed)."""
    if t not in backend.transposed:
        return f"index {sidx}"
    rows, cols = backend.shapes[t]
    return f"index {(sidx % rows) * cols + sidx // rows} (position {sidx} of the transposed copy)"


def _code_value(ops, code: Array) -> float:
    if dtype_name(code) == "uint8":
        return float(int8_codes(ops.to_numpy(code))[0])
    return float(ops.to_fp32(code)[0])


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
        if canon in backend.scales:
            raise AdapterMismatchError(
                f"adapter {name!r}: tensor {canon!r} is quantized ({_fmt(backend.tensors[canon])}): "
                f"a fused LoRA would change every code and its scales (no switch on the grid); register it "
                f"with mode='unfused' (an extra x @ A.T @ B.T path at inference, weights untouched)"
            )
        if adapter.fan_in_fan_out:  # delta is [out, in] while the tensor is [in, out]: swap roles
            a, b = _transposed(b), _transposed(a)
        prep.lora[canon] = (a, b, float(adapter.scaling[tensor]))
    return prep


def _transposed(x: Array) -> Array:
    """A C-contiguous transposed copy of a 2-D numpy array or torch tensor."""
    return np.ascontiguousarray(x.T) if isinstance(x, np.ndarray) else x.t().contiguous()
