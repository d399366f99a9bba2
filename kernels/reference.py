"""Pure-torch reference of the switching verbs.

Every verb works on lists of tensors (one call per switch). For tensor ``t``:

- ``weights[t]``: the live weight, any shape, C-contiguous, fp32/fp16/bf16; addressed flat (row-major).
- ``indices[t]``: int32 or int64 flat indices, ``[N]``, unique (the caller guarantees it; duplicates
  would make the write order undefined).
- ``deltas[t]``: fp32 ``[N]``, already multiplied by adapter weight and scale.
- ``saved[t]``: ``[N]`` in the weight's dtype: the values that were there before the apply.

The C++ extension implements the same verbs and must give bit-identical results.
"""

from __future__ import annotations

import torch

from kernels.checks import check_apply, check_restore


def restore_(
    weights: list[torch.Tensor],
    indices: list[torch.Tensor],
    saved: list[torch.Tensor],
    validate: bool = True,
) -> None:
    """In place: ``weights[t].flat[indices[t]] = saved[t]`` for every t."""
    check_restore("restore_", weights, indices, saved, with_bounds=validate)
    for w, idx, s in zip(weights, indices, saved):
        if idx.numel():
            w.view(-1).index_copy_(0, idx.long(), s)


def apply_(
    weights: list[torch.Tensor],
    indices: list[torch.Tensor],
    deltas: list[torch.Tensor],
    saved: list[torch.Tensor],
    validate: bool = True,
) -> None:
    """In place: ``saved[t] = w.flat[idx]``, then ``w.flat[idx] = dtype(fp32(saved) + delta)``."""
    check_apply("apply_", weights, indices, deltas, saved, with_bounds=validate)
    for w, idx, d, s in zip(weights, indices, deltas, saved):
        if not idx.numel():
            continue
        flat = w.view(-1)
        idx = idx.long()
        torch.index_select(flat, 0, idx, out=s)
        flat.index_copy_(0, idx, (s.float() + d).to(w.dtype))


def switch_(
    out_weights: list[torch.Tensor],
    out_indices: list[torch.Tensor],
    out_saved: list[torch.Tensor],
    in_weights: list[torch.Tensor],
    in_indices: list[torch.Tensor],
    in_deltas: list[torch.Tensor],
    in_saved: list[torch.Tensor],
    validate: bool = True,
) -> None:
    """One switch: restore the outgoing state, then apply the incoming one (which may touch the same tensors).

    Everything is checked before the first write, so a refused call writes nothing.
    """
    check_restore("switch_", out_weights, out_indices, out_saved, with_bounds=validate)
    check_apply("switch_", in_weights, in_indices, in_deltas, in_saved, with_bounds=validate)
    restore_(out_weights, out_indices, out_saved, validate=False)
    apply_(in_weights, in_indices, in_deltas, in_saved, validate=False)
