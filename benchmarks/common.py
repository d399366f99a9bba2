"""What the benchmarks measure besides time: the copy bandwidth and the memory floor it sets, peak RSS."""

from __future__ import annotations

import sys
import threading
import time

import psutil
import torch

from benchmarks.timing import time_ms

CACHE_LINE = 64


def copy_bandwidth_gbps(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Measured memory bandwidth of a large tensor copy, counting bytes read plus bytes written (GB/s)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def touched_lines(indices: torch.Tensor, element_size: int, base_offset: int = 0) -> int:
    """Distinct cache lines that the flat ``indices`` of a tensor with ``element_size``-byte elements touch.

    ``base_offset`` is the byte offset of element 0 within its cache line (0 for aligned tensors).
    """
    if indices.numel() == 0:
        return 0
    lines = (indices.long() * element_size + base_offset) // CACHE_LINE
    return int(torch.unique(lines).numel())


def memory_floor_ms(lines: int, copy_gbps: float) -> float:
    """Lower bound on a scatter that reads and writes ``lines`` cache lines, at the measured copy bandwidth."""
    return lines * CACHE_LINE * 2 / (copy_gbps * 1e9) * 1e3


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


class PeakRSS:
    """Peak resident memory, sampled every 10 ms by a daemon thread (psutil)."""

    def __init__(self) -> None:
        self._proc, self._peak, self._lock = psutil.Process(), 0, threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            rss = self._proc.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)
            time.sleep(0.01)

    def take(self) -> float:
        """The peak (MB) since the previous ``take``: one method's measurement."""
        with self._lock:
            now = self._proc.memory_info().rss
            peak, self._peak = max(self._peak, now), now
        return peak / 2**20


_PEAK: PeakRSS | None = None


def rss_mb() -> float:
    """Peak RSS in MB since the previous call (each row takes it right after its method ran)."""
    global _PEAK
    if _PEAK is None:
        _PEAK = PeakRSS()
    return _PEAK.take()
