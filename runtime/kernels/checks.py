"""Input checks shared by both kernel paths; messages name the verb and the tensor position at fault."""

from __future__ import annotations

import torch
from shira_runtime.kernels.dtypes import FLOATS as FLOAT_DTYPES
from shira_runtime.kernels.qformats import FORMATS
from shira_runtime.kernels.verbs import KernelInputError

# 1-byte codes of a quantized base; uint8: int8 codes + 128 with per-COLUMN scales (an int8 weight's transposed copy,
# the form an int8 bundle's graph reads and its switch writes: ``shira_runtime.kernels.reference``)
QUANT_DTYPES = tuple(f.dtype for f in FORMATS.values() if f.dtype is not None) + (torch.uint8,)
SUPPORTED_DTYPES = FLOAT_DTYPES + QUANT_DTYPES
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(op: str, t: int, msg: str) -> None:
    raise KernelInputError(f"{op}: tensor {t}: {msg}")


def _check_common(op: str, weights, indices, saved, with_bounds: bool) -> None:
    if not (len(weights) == len(indices) == len(saved)):
        raise KernelInputError(
            f"{op}: list lengths differ (weights {len(weights)}, indices {len(indices)}, saved {len(saved)})"
        )
    for t, (w, idx, s) in enumerate(zip(weights, indices, saved)):
        if w.dtype not in SUPPORTED_DTYPES:
            _fail(op, t, f"weight dtype {w.dtype} is not one of fp32/fp16/bf16/int8/float8_e4m3fn/float8_e5m2/uint8")
        if not w.is_contiguous():
            _fail(op, t, "weight is not contiguous")
        if idx.dtype not in INDEX_DTYPES:
            _fail(op, t, f"indices dtype {idx.dtype} is not int32/int64")
        if idx.dim() != 1 or not idx.is_contiguous():
            _fail(op, t, f"indices must be 1-D contiguous, got shape {tuple(idx.shape)}")
        if s.dtype != w.dtype:
            _fail(op, t, f"saved dtype {s.dtype} differs from weight dtype {w.dtype}")
        if s.shape != idx.shape or not s.is_contiguous():
            _fail(op, t, f"saved shape {tuple(s.shape)} does not match indices shape {tuple(idx.shape)}")
        if with_bounds and idx.numel():
            lo, hi = torch.aminmax(idx)
            if lo.item() < 0 or hi.item() >= w.numel():
                bad = int(lo) if lo.item() < 0 else int(hi)
                _fail(op, t, f"index {bad} out of range for a weight of {w.numel()} elements")


def check_restore(op: str, weights, indices, saved, with_bounds: bool = True) -> None:
    _check_common(op, weights, indices, saved, with_bounds)


def check_apply(
    op: str, weights, indices, deltas, saved, scales=None, saturated=None, with_bounds: bool = True
) -> None:
    _check_common(op, weights, indices, saved, with_bounds)
    if len(deltas) != len(weights):
        raise KernelInputError(f"{op}: {len(deltas)} delta tensors for {len(weights)} weights")
    if scales is not None and len(scales) != len(weights):
        raise KernelInputError(f"{op}: {len(scales)} scale tensors for {len(weights)} weights")
    if saturated is not None and (
        saturated.dtype != torch.int64 or saturated.shape != (len(weights),) or not saturated.is_contiguous()
    ):
        raise KernelInputError(
            f"{op}: saturated must be int64 [{len(weights)}], got {saturated.dtype}{list(saturated.shape)}"
        )
    for t, (w, idx, d) in enumerate(zip(weights, indices, deltas)):
        codes = w.dtype in QUANT_DTYPES and d.dtype == w.dtype  # the new codes themselves: a byte swap
        if d.dtype != torch.float32 and not codes:
            _fail(op, t, f"delta dtype {d.dtype} is not float32")
        if d.shape != idx.shape or not d.is_contiguous():
            _fail(op, t, f"delta shape {tuple(d.shape)} does not match indices shape {tuple(idx.shape)}")
        s = scales[t] if scales is not None else None
        if codes:
            continue  # no grid math: scales, if given, are not used
        if w.dtype in QUANT_DTYPES:
            axis = "column" if w.dtype == torch.uint8 else "row"
            if s is None or s.numel() == 0:
                _fail(op, t, f"a {w.dtype} weight needs its per-{axis} scales")
            if s.dtype != torch.float32 or s.dim() != 1 or not s.is_contiguous():
                _fail(op, t, f"scales must be fp32 1-D contiguous, got {s.dtype}{list(s.shape)}")
            if w.numel() % s.numel():
                _fail(op, t, f"{s.numel()} scales do not divide a weight of {w.numel()} elements into {axis}s")
            if w.dtype == torch.uint8 and (w.dim() != 2 or s.numel() != w.shape[1]):
                _fail(
                    op, t, f"{s.numel()} scales for a uint8 weight {list(w.shape)}: a 2-D weight with one scale per "
                    "column expected",
                )
        elif s is not None and s.numel():
            _fail(op, t, f"scales given for a {w.dtype} weight (only 1-byte quantized weights take scales)")


def check_mirrors(op: str, weights, mirrors, list_name: str = "") -> None:
    """``mirrors``: None, or one tensor per weight: empty (no mirror), bf16 of the weight's numel, or uint8
    ``[cols, rows]`` of 2-D int8 codes; contiguous, for a 1-byte weight only, not overlapping it."""
    if mirrors is None:
        return
    if len(mirrors) != len(weights):
        raise KernelInputError(f"{op}: {list_name}{len(mirrors)} mirror tensors for {len(weights)} weights")
    for t, (w, m) in enumerate(zip(weights, mirrors)):
        if not m.numel():
            continue
        where = f"{list_name}tensor {t}"
        if w.dtype == torch.uint8:
            raise KernelInputError(
                f"{op}: {where}: a mirror given for a uint8 weight (it is the copy itself: no mirror)"
            )
        if w.dtype not in QUANT_DTYPES:
            raise KernelInputError(
                f"{op}: {where}: a mirror given for a {w.dtype} weight (only 1-byte codes have a bf16 mirror)"
            )
        if m.dtype == torch.uint8:
            ok = w.dtype == torch.int8 and w.dim() == 2 and m.is_contiguous() and m.shape == (w.shape[1], w.shape[0])
            if not ok:
                want = list(reversed(w.shape)) if w.dim() == 2 else "?"
                raise KernelInputError(
                    f"{op}: {where}: a uint8 mirror is the transposed copy of 2-D int8 codes: expected {want} "
                    f"for a {w.dtype}{list(w.shape)} weight, got {list(m.shape)}"
                )
        elif m.dtype != torch.bfloat16 or not m.is_contiguous() or m.numel() != w.numel():
            raise KernelInputError(
                f"{op}: {where}: the mirror must be a contiguous bf16 tensor of the weight's {w.numel()} elements, "
                f"got {m.dtype}{list(m.shape)}"
            )
        lo, wlo = m.data_ptr(), w.data_ptr()
        if lo < wlo + w.numel() * w.element_size() and wlo < lo + m.numel() * m.element_size():
            raise KernelInputError(f"{op}: {where}: the mirror overlaps its weight")


def check_runs(op: str, weights, indices, runs, validate: bool, list_name: str = "") -> None:
    """``runs``: None, or one int64 ``[n, 3]`` tensor per weight (empty: none) describing its index list
    (``shira_runtime.kernels.runs``): checked as the core checks them."""
    if runs is None:
        return
    from shira_runtime.kernels.runs import fault

    if len(runs) != len(weights):
        raise KernelInputError(f"{op}: {list_name}{len(runs)} run tensors for {len(weights)} weights")
    for t, (w, idx, r) in enumerate(zip(weights, indices, runs)):
        if not r.numel():
            continue
        if r.dtype != torch.int64 or r.dim() != 2 or r.shape[1] != 3 or not r.is_contiguous():
            raise KernelInputError(
                f"{op}: {list_name}tensor {t}: runs must be int64 [n, 3] (position, first index, length), "
                f"got {r.dtype}{list(r.shape)}"
            )
        msg = fault(idx.numpy(), r.numpy(), w.numel(), validate)
        if msg:
            raise KernelInputError(f"{op}: {list_name}tensor {t}: {msg}")


def check_orders(op: str, weights, indices, mirrors, orders, validate: bool, list_name: str = "") -> None:
    """``orders``: None, or one tensor per weight (empty: none): the entries of its index list by ascending position
    in its uint8 mirror (``shira_runtime.kernels.orders``), of the indices' dtype and length; checked as the core
    checks them."""
    if orders is None:
        return
    from shira_runtime.kernels.orders import fault

    if len(orders) != len(weights):
        raise KernelInputError(f"{op}: {list_name}{len(orders)} mirror order tensors for {len(weights)} weights")
    for t, (w, idx, o) in enumerate(zip(weights, indices, orders)):
        if not o.numel():
            continue
        where = f"{op}: {list_name}tensor {t}: "
        if o.dtype != idx.dtype or o.shape != idx.shape or not o.is_contiguous():
            raise KernelInputError(
                where + f"the mirror order must be a contiguous {idx.dtype} tensor of the indices' {idx.numel()} "
                f"entries, got {o.dtype}{list(o.shape)}"
            )
        m = mirrors[t] if mirrors is not None else None
        if m is None or m.dtype != torch.uint8 or not m.numel():
            raise KernelInputError(
                where + "a mirror order given without a uint8 mirror (it orders the transposed copy's second pass)"
            )
        msg = fault(idx.numpy(), o.numpy(), w.shape[0], w.shape[1], validate)
        if msg:
            raise KernelInputError(where + msg)
