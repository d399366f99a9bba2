"""Pure-torch reference of the switching verbs.

Every verb works on lists of tensors (one call per switch). For tensor ``t``:

- ``weights[t]``: the live weight, any shape, C-contiguous, fp32/fp16/bf16, or 1-byte codes of a quantized base
  (int8 / float8_e4m3fn / float8_e5m2, see ``shira_runtime.kernels.qformats``); addressed flat (row-major).
- ``indices[t]``: int32 or int64 flat indices, ``[N]``, unique (the caller guarantees it; duplicates
  would make the write order undefined).
- ``deltas[t]``: fp32 ``[N]``, already multiplied by adapter weight and scale.
- ``saved[t]``: ``[N]`` in the weight's dtype: the values that were there before the apply.
- ``scales[t]`` (apply only, optional list): fp32 ``[rows]``, the per-row scales of a 1-byte weight whose flat
  length is ``rows * row_len``; an empty tensor for a float weight. A 1-byte weight is written on its grid:
  ``code = Q(fp32(code) * scale[row] + delta)`` with ``Q(v) = clamp(round_to_grid(v / scale[row]), +-max)``
  (nearest, ties to even; ``shira_runtime.kernels.qformats``), every step one fp32 operation.
- A uint8 weight holds int8 codes as ``code + 128`` (zero point 128) with its scales along the LAST axis: the
  scale of flat index ``j`` is ``scales[j % len(scales)]``. It is an int8 weight ``[rows, cols]`` kept only as its
  transposed copy ``[cols, rows]`` (the B input of an int8 bundle's ``MatMulInteger``,
  ``shira_runtime.exporters.quant_graph``), switched at transposed indices: the same grid math on ``byte - 128``.
- A 1-byte weight's ``deltas[t]`` may instead be codes of its own dtype (an adapter baked for this base): they are
  written as they are (the old codes saved), no grid math, no scales needed.
- ``saturated`` (apply only, optional): int64 ``[len(weights)]``; for each 1-byte weight the number of entries
  whose nearest grid point lies beyond ``max`` (clamped) is added to its slot.
- ``mirrors[t]`` (optional list, every verb): a copy of the 1-byte weight that each entry written also updates in
  the same visit, or an empty tensor for none; contiguous, not overlapping the weight. Either bf16 of the
  weight's numel (any shape): ``mirror.flat[j] = bf16(code value)`` (exact: int8 and fp8 values are bf16
  values; an FP8 layer's compute copy, ``shira_runtime.quantization.QuantLinear``); or, for 2-D int8 codes ``[rows,
  cols]``,
  uint8 ``[cols, rows]``: ``mirror[c, r] = code ^ 0x80`` (``code + 128`` with zero point 128, transposed: the B
  input of an int8 bundle's ``MatMulInteger``, ``shira_runtime.exporters.quant_graph``).

- ``runs[t]`` (optional list, every verb): int64 ``[n, 3]`` rows ``(position, first index, length)`` describing
  stretches of consecutive indices of ``indices[t]`` (``shira_runtime.kernels.runs``), or an empty tensor for
  none. They change no result: the core may read a run's indices from it instead of the list. Checked against
  the list with ``validate`` (bounds of the first and last run without).
- ``orders[t]`` (optional list, every verb; only with a uint8 mirror): the entries of ``indices[t]`` by ascending
  position in that mirror (``shira_runtime.kernels.orders``), of the indices' dtype and length, or an empty tensor
  for none. They change no result: the core then writes the mirror in a second pass, in that order. Checked with
  ``validate`` (every entry in range, positions strictly ascending; the first and last entry's range without).

Restoring 1-byte weights is a plain byte scatter. The C++ extension implements the same verbs and must give
bit-identical results.
"""

from __future__ import annotations

import torch
from shira_runtime.kernels.checks import (
    QUANT_DTYPES,
    check_apply,
    check_mirrors,
    check_orders,
    check_restore,
    check_runs,
)
from shira_runtime.kernels.qformats import quant_format, round_to_grid
from shira_runtime.kernels.verbs import VERBS


def restore_(
    weights: list[torch.Tensor],
    indices: list[torch.Tensor],
    saved: list[torch.Tensor],
    validate: bool = True,
    mirrors: list[torch.Tensor] | None = None,
    runs: list[torch.Tensor] | None = None,
    orders: list[torch.Tensor] | None = None,
) -> None:
    check_restore("restore_", weights, indices, saved, with_bounds=validate)
    check_mirrors("restore_", weights, mirrors)
    check_runs("restore_", weights, indices, runs, validate)
    check_orders("restore_", weights, indices, mirrors, orders, validate)
    for t, (w, idx, s) in enumerate(zip(weights, indices, saved)):
        if idx.numel():
            _raw(w).view(-1).index_copy_(0, idx.long(), _raw(s))
            _mirror(mirrors, t, idx, s)


def _mirror(mirrors: list[torch.Tensor] | None, t: int, idx: torch.Tensor, codes: torch.Tensor) -> None:
    if mirrors is None or not mirrors[t].numel():
        return
    m, idx = mirrors[t], idx.long()
    if m.dtype == torch.uint8:  # [cols, rows]: entry (r, c) of the codes at [c, r], as code + 128
        rows, cols = m.shape[1], m.shape[0]
        m.view(-1).index_copy_(0, (idx % cols) * rows + idx // cols, codes.view(torch.uint8) ^ 0x80)
    else:
        m.view(-1).index_copy_(0, idx, codes.to(torch.bfloat16))


def apply_(
    weights: list[torch.Tensor],
    indices: list[torch.Tensor],
    deltas: list[torch.Tensor],
    saved: list[torch.Tensor],
    validate: bool = True,
    scales: list[torch.Tensor] | None = None,
    saturated: torch.Tensor | None = None,
    mirrors: list[torch.Tensor] | None = None,
    runs: list[torch.Tensor] | None = None,
    orders: list[torch.Tensor] | None = None,
) -> None:
    check_apply("apply_", weights, indices, deltas, saved, scales, saturated, with_bounds=validate)
    check_mirrors("apply_", weights, mirrors)
    check_runs("apply_", weights, indices, runs, validate)
    check_orders("apply_", weights, indices, mirrors, orders, validate)
    for t, (w, idx, d, s) in enumerate(zip(weights, indices, deltas, saved)):
        if not idx.numel():
            continue
        flat = _raw(w).view(-1)
        idx = idx.long()
        torch.index_select(flat, 0, idx, out=_raw(s))
        if w.dtype in QUANT_DTYPES and d.dtype == w.dtype:
            new = d  # baked codes: a byte swap
        elif w.dtype in QUANT_DTYPES:
            scale = scales[t]
            at = idx % scale.numel() if w.dtype == torch.uint8 else idx // (w.numel() // scale.numel())
            new, sat = requantize(s, scale[at], d)
            if saturated is not None:
                saturated[t] += sat
        else:
            new = (s.float() + d).to(w.dtype)
        flat.index_copy_(0, idx, _raw(new))
        _mirror(mirrors, t, idx, new)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """1-byte codes as uint8 (torch has no index_copy_/index_select for fp8): the same bytes, copied as bytes."""
    return t.view(torch.uint8) if t.dtype in QUANT_DTYPES else t


def requantize(codes: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Q(fp32(codes) * scale + delta), saturated)`` on the codes' grid; ``scale`` per entry (fp32).

    Each step is one fp32 operation, as in the C++ kernel: ``x = (code * scale + delta) / scale``, rounded to the
    nearest grid point (ties to even), clamped to ``+-max``; ``saturated`` counts the clamped entries. uint8
    codes are int8 codes + 128: the same math on ``byte - 128``."""
    u8 = codes.dtype == torch.uint8
    fmt = quant_format(torch.int8 if u8 else codes.dtype)
    x = ((codes.int() - 128).float() if u8 else codes.float()) * scale
    x = (x + delta) / scale
    r = round_to_grid(x, fmt)
    sat = r.abs() > fmt.max
    r = r.clamp_(-fmt.max, fmt.max)
    return (r.to(torch.int32) + 128).to(torch.uint8) if u8 else r.to(codes.dtype), int(sat.sum())


def switch_(
    out_weights: list[torch.Tensor],
    out_indices: list[torch.Tensor],
    out_saved: list[torch.Tensor],
    in_weights: list[torch.Tensor],
    in_indices: list[torch.Tensor],
    in_deltas: list[torch.Tensor],
    in_saved: list[torch.Tensor],
    validate: bool = True,
    in_scales: list[torch.Tensor] | None = None,
    saturated: torch.Tensor | None = None,
    out_mirrors: list[torch.Tensor] | None = None,
    in_mirrors: list[torch.Tensor] | None = None,
    out_runs: list[torch.Tensor] | None = None,
    in_runs: list[torch.Tensor] | None = None,
    out_orders: list[torch.Tensor] | None = None,
    in_orders: list[torch.Tensor] | None = None,
) -> None:
    check_restore("switch_", out_weights, out_indices, out_saved, with_bounds=validate)
    check_apply("switch_", in_weights, in_indices, in_deltas, in_saved, in_scales, saturated, with_bounds=validate)
    check_mirrors("switch_", out_weights, out_mirrors, "outgoing ")
    check_mirrors("switch_", in_weights, in_mirrors, "incoming ")
    check_runs("switch_", out_weights, out_indices, out_runs, validate, "outgoing ")
    check_runs("switch_", in_weights, in_indices, in_runs, validate, "incoming ")
    check_orders("switch_", out_weights, out_indices, out_mirrors, out_orders, validate, "outgoing ")
    check_orders("switch_", in_weights, in_indices, in_mirrors, in_orders, validate, "incoming ")
    restore_(out_weights, out_indices, out_saved, validate=False, mirrors=out_mirrors)
    apply_(in_weights, in_indices, in_deltas, in_saved, False, in_scales, saturated, in_mirrors)


for _verb in (restore_, apply_, switch_):  # each verb's doc is declared once, with its schema
    _verb.__doc__ = VERBS[_verb.__name__].doc
