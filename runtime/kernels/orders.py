"""Mirror orders: an int8 weight's adapter entries in the order of its transposed uint8 copy.

Kernel API (C ABI 3) for a caller that keeps beside int8 codes ``[rows, cols]`` a uint8 copy ``[cols, rows]`` (an
int8 bundle's MatMulInteger input), written by the kernels with the codes. The runtime's bundles no longer do:
since ABI 4 they switch the copy itself as a uint8 weight (``shira_runtime.kernels.reference``), so no runtime
path makes mirror orders any more. Entry ``j = r * cols + c`` of the weight lands at ``c * rows + r``
of the copy: written in the index list's order (ascending ``j``), those writes jump a row of the copy apart, each
on a line of its own. ``mirror_order`` sorts an adapter's entries by that position once, when it is registered;
the verbs take it per tensor (``orders`` / ``out_orders`` / ``in_orders``) and the kernel core then writes the
codes first and the copy in a second pass that walks it forwards. ``fault`` is the check every path makes, in the
core's words (every entry with ``validate``, else the first and the last one's range).

numpy only: the device path (no torch) uses it too.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fault", "mirror_order", "transposed"]


def transposed(idx: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Positions in the ``[cols, rows]`` copy of flat indices ``idx`` into a ``[rows, cols]`` weight (int64)."""
    j = np.asarray(idx, dtype=np.int64).reshape(-1)
    return (j % cols) * rows + j // cols


def mirror_order(idx: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The entries of ``idx`` (flat, into a ``[rows, cols]`` weight) by ascending position in the transposed copy,
    as entry positions of ``idx``'s own dtype (stable: equal positions keep their order)."""
    idx = np.asarray(idx)
    return np.argsort(transposed(idx, rows, cols), kind="stable").astype(idx.dtype, copy=False)


def fault(idx: np.ndarray, order: np.ndarray, rows: int, cols: int, validate: bool) -> str | None:
    """What is wrong with ``order`` as the mirror order of ``idx`` (indices already in range), in the kernel core's
    words; None when nothing is. ``validate``: every entry in range and the positions strictly ascending (so it is
    a permutation); else the first and the last entry's range only (the caller promises the rest)."""
    n = int(np.asarray(idx).size)
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if n == 0:
        return None
    ks = np.arange(n) if validate else np.unique([0, n - 1])
    p = order[ks]
    bad = (p < 0) | (p >= n)
    pos = transposed(np.asarray(idx).reshape(-1)[np.where(bad, 0, p)], rows, cols) if validate else None
    # the core checks entry by entry: the first fault in order (out of range, or not after the one before it)
    first_range = int(np.argmax(bad)) if bad.any() else n
    first_step = n
    if validate and n > 1:
        steps = np.flatnonzero(pos[1:] <= pos[:-1])
        steps = steps[steps + 1 < first_range]
        if steps.size:
            first_step = int(steps[0]) + 1
    if first_range <= first_step and first_range < len(ks):
        k = int(ks[first_range])
        return f"mirror order entry {k} names entry {int(order[k])}, out of range for {n} entries"
    if first_step < n:
        k = first_step
        return (
            f"mirror order entry {k} (entry {int(order[k])}, index {int(np.asarray(idx).reshape(-1)[order[k]])}) is "
            f"at transposed position {int(pos[k])}, not after the one before it ({int(pos[k - 1])}): the order must "
            f"sort the entries by column, then row, each once"
        )
    return None
