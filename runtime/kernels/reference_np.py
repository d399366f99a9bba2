"""Pure-numpy reference of the switching verbs, for numpy arrays where the kernel core is unavailable.

The semantics of ``shira_runtime.kernels.reference``, formula for formula and bit for bit, on the dtypes numpy has:
fp32 and fp16 weights; int8 codes with per-row fp32 scales (``saturated`` counts, baked codes, the transposed
uint8 mirror); uint8 weights (int8 codes + 128, per-column scales). bf16 and fp8 weights (``ml_dtypes`` arrays)
are refused here: the core switches them. Inputs are checked as the core checks them, with its messages, before
the first write.
"""

from __future__ import annotations

import numpy as np
from shira_runtime.kernels import core
from shira_runtime.kernels import orders as mirror_orders
from shira_runtime.kernels.runs import fault
from shira_runtime.kernels.verbs import APPLY_LISTS, RESTORE_LISTS, VERBS, KernelInputError

__all__ = ["apply_", "restore_", "switch_"]


def _check(op: str, label: str, lists: dict, apply: bool, validate: bool) -> None:
    """The core's checks: arrays (``core._side``), then dtypes numpy can compute, scales, mirrors and bounds."""
    core._side(op, label, core._Numpy, lists, apply)
    scales, mirrors, orders = lists.get("scales"), lists["mirrors"], lists.get("orders")
    for t, w in enumerate(lists["weights"]):
        where = f"shira::{op}: {label}tensor {t}: "
        name = w.dtype.name
        if name not in ("float32", "float16", "int8", "uint8"):
            raise KernelInputError(where + f"the numpy reference has no {name} weights (the kernel core has)")
        q = name in ("int8", "uint8")
        axis = "column" if name == "uint8" else "row"
        if apply and not (q and lists["deltas"][t].dtype == w.dtype):
            sc = scales[t] if scales is not None else None
            has = sc is not None and sc.size > 0
            if q and not has:
                raise KernelInputError(where + f"a {name} weight needs its per-{axis} scales")
            if q and w.size % sc.size:
                raise KernelInputError(
                    where + f"{sc.size} scales do not divide a weight of {w.size} elements into {axis}s"
                )
            if not q and has:
                raise KernelInputError(
                    where + f"scales given for a {name} weight (only 1-byte quantized weights take scales)"
                )
        m = mirrors[t] if mirrors is not None else None
        o = orders[t] if orders is not None else None
        if o is not None and o.size and (m is None or m.dtype != np.uint8 or not m.size):
            raise KernelInputError(
                where + "a mirror order given without a uint8 mirror (it orders the transposed copy's second pass)"
            )
        if m is not None and m.size:
            if name == "uint8":
                raise KernelInputError(where + "a mirror given for a uint8 weight (it is the copy itself: no mirror)")
            if name != "int8":
                raise KernelInputError(
                    where + f"a mirror given for a {name} weight (only 1-byte codes have a bf16 mirror)"
                )
            if m.dtype != np.uint8:
                raise KernelInputError(where + "the numpy reference has no bf16 mirrors (the kernel core has)")
            if np.shares_memory(m, w):
                raise KernelInputError(where + "the mirror overlaps its weight")
    runs = lists.get("runs")
    for t, (w, i) in enumerate(zip(lists["weights"], lists["indices"])):
        r = runs[t] if runs is not None else None
        msg = fault(i, r, w.size, validate) if r is not None and r.size else None
        if msg:
            raise KernelInputError(f"shira::{op}: {label}tensor {t}: {msg}")
        if not i.size:
            continue
        ends = i if validate else i[[0, -1]]
        bad = (ends < 0) | (ends >= w.size)
        if bad.any():
            raise KernelInputError(
                f"shira::{op}: {label}tensor {t}: index {int(ends[np.argmax(bad)])} out of range for {w.size} elements"
            )
    for t, (w, i) in enumerate(zip(lists["weights"], lists["indices"])):
        o = orders[t] if orders is not None else None
        msg = mirror_orders.fault(i, o, *w.shape, validate) if o is not None and o.size else None
        if msg:
            raise KernelInputError(f"shira::{op}: {label}tensor {t}: {msg}")


def _mirror(m, w: np.ndarray, idx: np.ndarray, codes: np.ndarray) -> None:
    if m is None or not m.size:
        return
    rows, cols = w.shape  # [cols, rows]: entry (r, c) of the codes at [c, r], as code + 128
    m.reshape(-1)[(idx % cols) * rows + idx // cols] = codes.view(np.uint8) ^ 0x80


def _restore(ws, idx, saved, mirrors) -> None:
    for t, (w, i, s) in enumerate(zip(ws, idx, saved)):
        if i.size:
            w.reshape(-1)[i] = s
            _mirror(mirrors[t] if mirrors is not None else None, w, i.astype(np.int64), s)


def requantize(codes: np.ndarray, scale: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, int]:
    """int8 ``(Q(fp32(codes) * scale + delta), saturated)``: each step one fp32 operation, rounded half to even,
    clamped to +-127 (``shira_runtime.kernels.reference.requantize``); uint8 codes: int8 codes + 128."""
    u8 = codes.dtype == np.uint8
    x = ((codes.astype(np.int32) - 128) if u8 else codes).astype(np.float32) * scale
    x = (x + delta) / scale
    r = np.rint(x)
    sat = int(np.count_nonzero(np.abs(r) > 127))
    r = np.clip(r, -127, 127)
    return ((r.astype(np.int32) + 128).astype(np.uint8) if u8 else r.astype(np.int8)), sat


def _apply(ws, idx, deltas, saved, scales, saturated, mirrors) -> None:
    for t, (w, i, d, s) in enumerate(zip(ws, idx, deltas, saved)):
        if not i.size:
            continue
        flat = w.reshape(-1)
        s[...] = flat[i]
        if w.dtype in (np.int8, np.uint8) and d.dtype == w.dtype:
            new = d  # baked codes: a byte swap
        elif w.dtype in (np.int8, np.uint8):
            sc = scales[t]
            new, sat = requantize(s, sc[i % sc.size if w.dtype == np.uint8 else i // (w.size // sc.size)], d)
            if saturated is not None:
                saturated[t] += sat
        else:
            new = (s.astype(np.float32) + d).astype(w.dtype)
        flat[i] = new
        _mirror(mirrors[t] if mirrors is not None else None, w, i.astype(np.int64), new)


def _lists(values: dict, prefix: str, apply: bool) -> dict:
    names = APPLY_LISTS if apply else RESTORE_LISTS
    return {k: values.get(prefix + k) for k in names}


def _run(name: str, args: tuple, kwargs: dict) -> None:
    verb = VERBS[name]
    values = verb.bind(args, kwargs)
    validate = bool(values["validate"])
    two = verb.restore is not None and verb.apply is not None
    out = _lists(values, verb.restore, False) if verb.restore is not None else None
    inc = _lists(values, verb.apply, True) if verb.apply is not None else None
    if out is not None:
        _check(name, "outgoing " if two else "", out, False, validate)
    if inc is not None:
        _check(name, "incoming " if two else "", inc, True, validate)
        sat = values["saturated"]
        n = len(inc["weights"])
        if sat is not None and (sat.dtype != np.int64 or sat.shape != (n,) or not sat.flags.c_contiguous):
            raise KernelInputError(f"shira::{name}: saturated must be int64 [{n}], got {sat.dtype}{list(sat.shape)}")
    if out is not None:
        _restore(out["weights"], out["indices"], out["saved"], out["mirrors"])
    if inc is not None:
        _apply(inc["weights"], inc["indices"], inc["deltas"], inc["saved"], inc["scales"], values["saturated"],
               inc["mirrors"])  # fmt: skip


def restore_(*args, **kwargs) -> None:
    """In place: ``weights[t].flat[indices[t]] = saved[t]`` (and the mirrors)."""
    _run("restore_", args, kwargs)


def apply_(*args, **kwargs) -> None:
    """In place: ``saved = w.flat[idx]``, then ``w.flat[idx] = dtype(fp32(saved) + delta)`` (int8: on its grid)."""
    _run("apply_", args, kwargs)


def switch_(*args, **kwargs) -> None:
    """Restore the outgoing lists, then apply the incoming ones; everything checked before the first write."""
    _run("switch_", args, kwargs)


for _name in ("restore_", "apply_", "switch_"):
    globals()[_name].__signature__ = VERBS[_name].signature
