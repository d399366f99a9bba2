"""Runs: an index list's stretches of consecutive indices, described once so the kernels need not read them.

A run is ``(position, first index, length)``: entries ``position .. position + length - 1`` of an index list hold
the indices ``first .. first + length - 1``. ``runs_of`` finds them in a sorted list (done when an adapter is
registered); the verbs take them per tensor (``runs`` / ``out_runs`` / ``in_runs``, int64 ``[n, 3]``) and the
kernel core then copies or requantizes each run as one stretch without reading its indices (a block mask's
switch streams 24 bytes per run instead of 4-8 per entry). The index list stays what counts: ``fault`` is the
check every path makes (all runs against the list with ``validate``, else the first and last run's bounds).

numpy only: the device path (no torch) uses it too.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_RUN", "fault", "runs_of"]

# Shortest stretch described: 8 entries (32 bytes of int32 indices) against a run's 24 bytes. Shorter stretches
# stay in the list (a random mask has almost none; a block mask's are 16-64 long).
MIN_RUN = 8


def runs_of(idx: np.ndarray, min_run: int = MIN_RUN) -> np.ndarray:
    """The maximal stretches of consecutive indices of at least ``min_run`` entries in ``idx`` (any order:
    a stretch is consecutive positions holding consecutive ascending indices), as int64 ``[n, 3]``."""
    idx = np.asarray(idx).reshape(-1)
    if idx.size < min_run:
        return np.zeros((0, 3), dtype=np.int64)
    step = np.diff(idx.astype(np.int64)) == 1
    # stretch boundaries: where the step breaks
    edges = np.flatnonzero(np.diff(np.concatenate(([False], step, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2] + 1  # positions [start, end) of each stretch
    keep = ends - starts >= min_run
    starts, ends = starts[keep], ends[keep]
    out = np.empty((starts.size, 3), dtype=np.int64)
    out[:, 0] = starts
    out[:, 1] = idx[starts]
    out[:, 2] = ends - starts
    return out


def fault(idx: np.ndarray, runs: np.ndarray, numel: int, validate: bool) -> str | None:
    """What is wrong with ``runs`` as a description of ``idx`` (an index list into ``numel`` elements), in the
    kernel core's words; None when nothing is. ``validate``: every run, against the list; else the first and the
    last run's bounds only (the caller promises the rest, as it promises sorted lists)."""
    n = len(runs)
    if n == 0:
        return None
    count = idx.size
    runs = np.asarray(runs, dtype=np.int64)
    rows = np.arange(n) if validate else np.unique([0, n - 1])
    p, f, k = runs[rows, 0], runs[rows, 1], runs[rows, 2]
    end = np.zeros_like(p)
    if validate:
        end[1:] = p[:-1] + k[:-1]
    ok = (k >= 1) & (p >= end) & (p <= count - k) & (f >= 0) & (f <= numel - k)
    first_bad = int(np.argmin(ok)) if not ok.all() else len(rows)  # the core checks run by run: what comes first
    if validate and first_bad:
        kk = k[:first_bad]
        offset = np.arange(int(kk.sum()), dtype=np.int64) - np.repeat(np.cumsum(kk) - kk, kk)
        pos, want = np.repeat(p[:first_bad], kk) + offset, np.repeat(f[:first_bad], kk) + offset
        held = idx.reshape(-1)[pos].astype(np.int64)
        bad = np.flatnonzero(held != want)
        if bad.size:
            b = int(bad[0])
            return (
                f"run {int(np.searchsorted(np.cumsum(kk), b, side='right'))} says index {int(want[b])} at entry "
                f"{int(pos[b])}, the index list holds {int(held[b])}"
            )
    if first_bad < len(rows):
        r = first_bad
        what = f"run {int(rows[r])} (position {int(p[r])}, first index {int(f[r])}, length {int(k[r])})"
        if k[r] < 1:
            return f"{what} is empty"
        if p[r] < end[r]:
            return f"{what} overlaps the run before it, which ends at entry {int(end[r])}"
        return f"{what} does not fit {count} entries of a weight of {numel} elements"
    return None
