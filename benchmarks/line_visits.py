"""The line-visit floor: what the memory system charges for visiting a switch's weight lines in its order, timed.

The memory floor (``benchmarks.common.memory_floor_ms``) prices each touched 64-byte line at the streaming
bandwidth, as if the lines were contiguous. A switch of random entries visits them scattered (sorted, a few
lines apart), and on the machines we measure a scattered line costs more than a streamed one: the DRAM pages
opened, the prefetchers that cannot guess the next line. ``LineVisits.floor_ms`` times a plain C++ loop
(``benchmarks/csrc/line_visits.cpp``) that visits the same lines of the same tensors in the same order, each once,
read and written back (one byte added), on one thread or the kernel's thread count and at a few software prefetch
distances, the fastest of these: no adapter arrays, no arithmetic, no transaction. A switch at 1x its line-visit
floor costs what merely touching its lines costs; the gap to the memory floor is then the machine's, not the
switch's.

The loop is compiled on first use with the kernel core's compiler and flags (``shira_runtime.kernels.core``),
into the same cache. Each timed pass adds 1 or 255 to the first byte of every line, in pairs: the weights end as
they started, bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from shira_runtime.arrays import ops_for
from shira_runtime.kernels import core

from benchmarks.common import CACHE_LINE
from benchmarks.timing import cycle

SOURCE = Path(__file__).parent / "csrc" / "line_visits.cpp"
PREFETCH = (0, 32, 64, 128, 256)  # lines ahead; the floor is the best of these
_SEGMENT = np.dtype({"names": ["base", "offsets", "count"], "formats": ["u8", "u8", "i8"], "itemsize": 24})
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The compiled loop (built once per source, compiler and flags)."""
    global _lib
    if _lib is None:
        sid = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
        lib = ctypes.CDLL(str(core.compile_library(SOURCE, "libshira_line_visits.so", [], sid, "the line-visit loop")))
        fn = lib.shira_line_visits
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64, ctypes.c_int32]
        _lib = lib
    return _lib


def _address(w: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """A weight's first byte and its element size."""
    ops = ops_for(w)
    return ops.region(w)[0], ops.itemsize(w)


class LineVisits:
    """The distinct lines that flat ``indices`` touch in each weight, sorted, ready to be visited.

    ``parts``: ``(weight, [index arrays])`` pairs, the weights' storage (a torch tensor or a numpy array, C
    contiguous) and the flat indices into it (a switch A -> B: A's and B's).
    """

    def __init__(self, parts: Iterable[tuple[torch.Tensor | np.ndarray, Sequence]]) -> None:
        self.keep: list = []  # the weights and line arrays the segments point into
        rows = []
        merged: dict[int, tuple] = {}  # one segment per weight: two threads never add to the same byte
        for w, indices in parts:
            key = _address(w)[0]
            if key in merged:
                w0, idx0 = merged[key]
                if _address(w0) != _address(w) or tuple(w0.shape) != tuple(w.shape):
                    raise ValueError("line visits: two weights share storage (tied or overlapping): list it once")
                merged[key] = (w0, [*idx0, *indices])
            else:
                merged[key] = (w, list(indices))
        for w, indices in merged.values():
            idx = [torch.as_tensor(i).long().reshape(-1) for i in indices]
            if not idx or not sum(i.numel() for i in idx):
                continue
            addr, size = _address(w)
            if not isinstance(w, torch.Tensor):
                w = torch.from_numpy(w)
            if not w.is_contiguous():
                raise ValueError("line visits need C-contiguous weights (their flat indices are storage order)")
            flat = torch.cat(idx)
            if int(flat.min()) < 0 or int(flat.max()) >= w.numel():
                raise IndexError(f"an index is out of range for a weight of {w.numel()} elements")
            # each line's first byte inside the weight (a weight need not start on a line)
            lines = torch.unique((flat * size + addr % CACHE_LINE) // CACHE_LINE)
            offsets = (lines * CACHE_LINE - addr % CACHE_LINE).clamp_(min=0).numpy().astype(np.int64)
            self.keep += [w, offsets]
            rows.append((addr, offsets.ctypes.data, len(offsets)))
        self.segments = np.array(rows, dtype=_SEGMENT)
        self.lines = int(self.segments["count"].sum()) if rows else 0

    def visit(self, threads: int, prefetch: int, add: int) -> None:
        """One pass: add ``add`` (mod 256) to one byte of every line (its first byte in the weight)."""
        library().shira_line_visits(self.segments.ctypes.data, len(self.segments), threads, prefetch, add)

    def time_ms(self, prefetch: int, repeats: int = 8, threads: int | None = None) -> float:
        """The median pass at one prefetch distance (the warm-up pass adds 1, the timed ones 255, 1, ... 255: an
        even count in all, so the bytes end as they started)."""
        if not self.lines:
            return 0.0
        n = threads or torch.get_num_threads()
        return cycle([lambda: self.visit(n, prefetch, 1), lambda: self.visit(n, prefetch, 255)], repeats | 1).median_ms

    def best(self, repeats: int = 8, threads: int | None = None) -> tuple[int, int, float]:
        """The fastest way to visit: ``(threads, prefetch, median ms)`` over one thread and ``threads`` (default
        torch's), and the ``PREFETCH`` distances. The loop starts its threads at every pass (~30-40 us on the
        2-vCPU machine of docs/results/scaling.md), which one thread does not pay: below ~1e5 lines it wins."""
        n = threads or torch.get_num_threads()
        ways = [(k, pf) for k in sorted({1, n}) for pf in PREFETCH]
        return min(((k, pf, self.time_ms(pf, repeats, k)) for k, pf in ways), key=lambda x: x[2])

    def floor_ms(self, repeats: int = 8, threads: int | None = None) -> float:
        """The line-visit floor: the median pass of the fastest way (``best``)."""
        return self.best(repeats, threads)[2]
