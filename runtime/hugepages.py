"""Weights on huge pages (Linux): a switch's scattered lines then miss the TLB far less often.

A switch visits its weight lines sorted but far apart: on 4 KiB pages most visits need a page walk (a 400 MB fp32
weight set is 100,000 pages, more than any TLB holds). ``collapse`` asks the kernel to move the 2 MiB-aligned
interior of each region onto transparent huge pages now (``madvise(MADV_COLLAPSE)``, Linux 6.1+; a synchronous
copy: ~1-1.6 s per GB on the machine of docs/results/scaling.md), after ``MADV_HUGEPAGE`` so that the pages stay
huge. The contents do not change. Where the kernel declines (an older kernel, THP disabled, most file-backed
mappings such as a bundle's mapped weights, another OS) the region counts 0 bytes: it is a hint, never an error.

Measured with ``python -m benchmarks.scaling --huge-ab`` (two runtimes over the same model in one process, one
collapsed, their switches in interleaved rounds): docs/results/scaling.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterable
from pathlib import Path

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
_PMD = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")


def huge_page_size() -> int:
    """The transparent huge page size in bytes (2 MiB on x86-64; the kernel's own figure where it gives one)."""
    try:
        return int(_PMD.read_text())
    except (OSError, ValueError):
        return 2 << 20


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def collapse(regions: Iterable[tuple[int, int]]) -> int:
    """Put the huge-page-aligned interior of each ``(address, nbytes)`` region on huge pages; returns the bytes
    the kernel moved (0 where it could not: see the module's docstring)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    huge, done = huge_page_size(), 0
    for addr, nbytes in regions:
        lo = -(-addr // huge) * huge
        hi = (addr + nbytes) // huge * huge
        if hi <= lo:
            continue
        madvise(lo, hi - lo, MADV_HUGEPAGE)  # keep them huge (khugepaged, later faults); refused where THP is off
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
    return done
