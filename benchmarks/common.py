"""What the benchmarks measure besides time: the copy bandwidth and the memory floor it sets, peak RSS, the CPU
that other processes took meanwhile; and the progress bar they show."""

from __future__ import annotations

import os
import resource
import sys
import time

import torch
from tqdm import tqdm

from benchmarks.timing import time_ms

CACHE_LINE = 64


def copy_bandwidth_gbps(nbytes: int = 512 << 20, repeats: int = 5, rounds: int = 3) -> float:
    """Measured memory bandwidth (GB/s, bytes read plus bytes written) of streaming over a large tensor with torch's
    threads: the better of a copy and an in-place update (``x += 1``: each line read and written once, the traffic a
    floor counts), each the best of ``rounds`` medians. A floor is a lower bound on time, so it takes the bandwidth
    the machine reached, not a slow spell's (on a shared 2-vCPU machine one round in a few reads 40-60% low). A copy
    alone can read 1.5x low: where its stores are not streaming, each destination line is also read before it is
    written, traffic the count leaves out (this AMD EPYC, 2026-12-06: copy 44 GB/s, in-place update 63-67 GB/s,
    and switches at 0.6-0.9x a floor taken from the copy)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = min(time_ms(lambda: dst.copy_(src), repeats).median_ms for _ in range(max(1, rounds)))
    update = min(time_ms(lambda: dst.add_(1.0), repeats).median_ms for _ in range(max(1, rounds)))
    return 2 * nbytes / (min(copy, update) * 1e-3) / 1e9


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


class Steps:
    """A tqdm bar over the phases of a run, on stderr: ``step(msg)`` starts the next phase, ``progress(msg)``
    (anywhere below) names what the current phase is doing."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="phase", file=sys.stderr, dynamic_ncols=True, leave=True)
        self.started = False

    def step(self, msg: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(msg, refresh=True)

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.close()

    def __enter__(self) -> Steps:
        global _STEPS
        _STEPS = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _STEPS
        _STEPS = None
        self.close()


_STEPS: Steps | None = None


def progress(msg: str) -> None:
    """What the run is doing: the active ``Steps`` bar's postfix, or a line on stderr where no bar is active."""
    if _STEPS is not None:
        _STEPS.bar.set_postfix_str(msg.strip(), refresh=True)
    else:
        print(f"  .. {msg}", file=sys.stderr, flush=True)


def step(msg: str) -> None:
    """The next phase of the active ``Steps`` bar, named ``msg`` (a line on stderr where no bar is active)."""
    if _STEPS is not None:
        _STEPS.step(msg)
    else:
        progress(msg)


def rss_mb() -> float:
    """Peak RSS in MB since the previous call (each row takes it right after its method ran).

    Read from the kernel (``VmHWM`` in ``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs``),
    so no sampler thread competes with the timed threads for the CPUs; elsewhere the process's peak so far."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return hwm / 1024
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class CpuWatch:
    """The CPUs other processes (and the hypervisor: steal) kept busy while this process ran a block: the
    noise a timing cannot see in its own samples. Linux (``/proc/stat``); elsewhere ``others`` is None."""

    def __init__(self) -> None:
        self.others: float | None = None

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        tick = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return (user + nice + system + irq + softirq + steal) / tick, t.user + t.system, time.perf_counter()

    def __enter__(self) -> CpuWatch:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        if self._start is not None and end is not None and end[2] > self._start[2]:
            busy, mine = end[0] - self._start[0], end[1] - self._start[1]
            self.others = max(0.0, (busy - mine) / (end[2] - self._start[2]))
