"""Kernel benchmark: one full adapter switch A -> B on Llama-3.2-1B linear shapes, reference vs C++ fast path.

Run: ``python -m benchmarks.kernels [--quick]``; ``--per-call`` instead times what each binding costs per call
on a switch of 16 entries (the fixed cost a small switch pays: argument marshalling, checks, the call itself).
For each weight dtype and mask density it times ``switch_``
over A -> B -> A cycles (``benchmarks.timing.cycle``: each switch timed, first call excluded), asserts that
both paths leave bit-identical weights and saved buffers, and compares with the memory floor: the cache lines
one switch's restore and apply touch (A's and B's), read and written, at the copy bandwidth measured just
before each timed switch.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from dataclasses import dataclass

import torch
from shira_runtime.kernels import extension, reference
from shira_runtime.kernels.dtypes import by_short
from shira_runtime.table import print_table

from benchmarks.common import copy_bandwidth_gbps, memory_floor_ms, progress, touched_lines
from benchmarks.timing import Timing, cycle

# Linear weights of one Llama-3.2-1B decoder layer: q, k, v, o, gate, up, down ([out, in]).
LAYER_SHAPES = ((2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192))


@dataclass(frozen=True)
class Config:
    layers: int = 16
    shapes: tuple[tuple[int, int], ...] = LAYER_SHAPES  # of one layer
    densities: tuple[float, ...] = (0.01, 0.02)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    ref_repeats: int = 3
    fast_repeats: int = 7
    seed: int = 0


@dataclass(frozen=True)
class Result:
    dtype: str
    density: float
    elements: int  # entries written per switch (A's restore + B's apply)
    ref: Timing
    fast: Timing
    fast_validated: Timing  # the same switch with validate=True (full bounds scan first)
    copy_gbps: float  # median copy bandwidth, measured between the fast path's timed switches
    floor_ms: float  # at copy_gbps
    floor_ratio: float  # median over the timed switches of time / floor at the bandwidth measured just before
    gbps: float  # fast path, counting the floor's bytes (touched lines read + written)


@dataclass
class Adapter:
    indices: list[torch.Tensor]  # [N] int32, sorted, unique
    deltas: list[torch.Tensor]  # [N] fp32


def make_adapter(shapes: list[tuple[int, int]], density: float, gen: torch.Generator) -> Adapter:
    indices, deltas = [], []
    for rows, cols in shapes:
        mask = torch.rand(rows * cols, generator=gen) < density
        idx = mask.nonzero().flatten().to(torch.int32)  # sorted ascending, unique
        indices.append(idx)
        deltas.append(torch.randn(idx.numel(), generator=gen) * 0.02)
    return Adapter(indices, deltas)


class Path:
    """One copy of the weights with adapter state, switched by one implementation (reference or fast)."""

    def __init__(self, impl, weights: list[torch.Tensor], a: Adapter, b: Adapter):
        self.impl, self.w, self.a, self.b = impl, weights, a, b
        dtype = weights[0].dtype
        self.saved = {id(x): [torch.empty(i.numel(), dtype=dtype) for i in x.indices] for x in (a, b)}
        impl.apply_(self.w, a.indices, a.deltas, self.saved[id(a)], validate=False)  # start in state A
        self.state = a

    def to(self, dst: Adapter, validate: bool = False) -> None:
        """Switch from the current state to ``dst``'s (one ``switch_`` call)."""
        src = self.state
        self.impl.switch_(
            self.w,
            src.indices,
            self.saved[id(src)],
            self.w,
            dst.indices,
            dst.deltas,
            self.saved[id(dst)],
            validate=validate,
        )
        self.state = dst

    def time_switch(self, repeats: int, validate: bool = False, bandwidth: list[float] | None = None) -> Timing:
        """A -> B -> A ... (from state A, reached untimed), each switch timed, the first not counted. Ends in A.

        With ``bandwidth``, the copy bandwidth is measured before every timed switch and appended to it,
        so the floor sees the same machine state as the switch (this shared VM's bandwidth drifts).
        """
        if self.state is not self.a:
            self.to(self.a)

        def measure_bandwidth() -> None:
            bandwidth.append(copy_bandwidth_gbps(256 << 20, repeats=3))

        t = cycle(
            [lambda: self.to(self.b, validate), lambda: self.to(self.a, validate)],
            repeats,
            before=measure_bandwidth if bandwidth is not None else None,
        )
        if self.state is not self.a:
            self.to(self.a)
        return t


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same(ref: Path, fast: Path) -> None:
    for t, (x, y) in enumerate(zip(ref.w, fast.w)):
        assert torch.equal(bits(x), bits(y)), f"weight {t}: fast path differs from the reference"
    for key in ref.saved:
        for t, (x, y) in enumerate(zip(ref.saved[key], fast.saved[key])):
            assert torch.equal(bits(x), bits(y)), f"saved {t}: fast path differs from the reference"


def run_case(cfg: Config, dtype_name: str, density: float) -> Result:
    dtype = by_short(dtype_name).torch
    shapes = [s for _ in range(cfg.layers) for s in cfg.shapes]
    gen = torch.Generator().manual_seed(cfg.seed)
    progress(f"{dtype_name} {density:.0%}: weights and masks")
    weights = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    a, b = make_adapter(shapes, density, gen), make_adapter(shapes, density, gen)
    fast = Path(extension.load(), [w.clone() for w in weights], a, b)  # two weight copies alive at most
    ref = Path(reference, weights, a, b)
    del weights

    progress(f"{dtype_name} {density:.0%}: reference")
    t_ref = ref.time_switch(cfg.ref_repeats)
    progress(f"{dtype_name} {density:.0%}: fast path")
    bandwidth: list[float] = []
    t_fast = fast.time_switch(cfg.fast_repeats, bandwidth=bandwidth)
    copy_gbps = statistics.median(bandwidth)
    assert_same(ref, fast)  # both in state A
    t_val = fast.time_switch(cfg.fast_repeats, validate=True)
    ref.to(b)  # not timed: both in state B
    fast.to(b)
    assert_same(ref, fast)

    esize = dtype.itemsize
    lines = sum(touched_lines(i, esize) for i in a.indices) + sum(touched_lines(i, esize) for i in b.indices)
    floor = memory_floor_ms(lines, copy_gbps)
    # each timed switch against the floor at the bandwidth measured just before it
    ratio = statistics.median(t / memory_floor_ms(lines, bw) for t, bw in zip(t_fast.samples_ms, bandwidth))
    elements = sum(i.numel() for i in a.indices) + sum(i.numel() for i in b.indices)
    gbps = lines * 64 * 2 / (t_fast.median_ms * 1e-3) / 1e9
    return Result(dtype_name, density, elements, t_ref, t_fast, t_val, copy_gbps, floor, ratio, gbps)


def per_call(calls: int = 3000, rounds: int = 7) -> list[list[object]]:
    """Microseconds per ``switch_`` of 16 entries (one fp32 tensor of 4096) through each binding: the median over
    ``rounds`` of ``calls`` back-to-back calls, the bindings interleaved round by round."""
    import time

    import numpy as np
    from shira_runtime import kernels
    from shira_runtime.kernels import core, reference_np

    n, k = 4096, 16
    idx = np.sort(np.random.default_rng(0).choice(n, k, replace=False)).astype(np.int32)
    delta = np.full(k, 0.5, np.float32)
    w, saved_a, saved_b = np.zeros(n, np.float32), np.empty(k, np.float32), np.empty(k, np.float32)
    tw, tidx, tdelta = torch.from_numpy(w), torch.from_numpy(idx), torch.from_numpy(delta)
    tsa, tsb = torch.from_numpy(saved_a), torch.from_numpy(saved_b)
    core.apply_([w], [idx], [delta], [saved_a])  # state A active; each call swaps A and B (same entries)
    np_args = ([w], [idx], [saved_a], [w], [idx], [delta], [saved_b])
    t_args = ([tw], [tidx], [tsa], [tw], [tidx], [tdelta], [tsb])
    paths = {
        "C core via ctypes (numpy)": lambda: core.switch_(*np_args, validate=False),
        "C core via ctypes (numpy), validate": lambda: core.switch_(*np_args),
        "shira_runtime.kernels.switch_ (numpy)": lambda: kernels.switch_(*np_args, validate=False),
        "torch op, eager (extension)": lambda: extension.switch_(*t_args, validate=False),
        "torch op via dispatcher (torch.ops.shira)": lambda: torch.ops.shira.switch_(*t_args, False),
        "shira_runtime.kernels.switch_ (torch)": lambda: kernels.switch_(*t_args, validate=False),
        "numpy reference": lambda: reference_np.switch_(*np_args, validate=False),
        "torch reference": lambda: reference.switch_(*t_args, validate=False),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return [[name, statistics.median(t), min(t)] for name, t in times.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 16")
    ap.add_argument("--per-call", action="store_true", help="the cost of one call through each binding instead")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extension.load()
    if args.per_call:
        print(f"\nswitch_ of 16 entries (one fp32 tensor of 4096), {torch.get_num_threads()} threads: us per call")
        print_table(["binding", "median us", "min us"], per_call(calls=500 if args.quick else 3000))
        return
    cfg = Config(layers=2, ref_repeats=5, fast_repeats=15) if args.quick else Config()
    progress(f"{torch.get_num_threads()} threads, {cfg.layers} layers")

    results = []
    for dtype_name in cfg.dtypes:
        for density in cfg.densities:
            results.append(run_case(cfg, dtype_name, density))
            gc.collect()

    print(
        f"\nswitch A -> B, {cfg.layers} layers of Llama-3.2-1B linear shapes, {torch.get_num_threads()} threads, "
        "fast path bit-identical to the reference (checked)"
    )
    print_table(
        [
            "dtype",
            "density",
            "entries",
            "ref ms",
            "fast ms",
            "speedup",
            "copy GB/s",
            "floor ms",
            "fast/floor",
            "GB/s",
            "validate ms",
        ],
        [
            [
                r.dtype,
                f"{r.density:.0%}",
                f"{r.elements / 1e6:.1f}M",
                r.ref.median_ms,
                r.fast.median_ms,
                r.ref.median_ms / r.fast.median_ms,
                r.copy_gbps,
                r.floor_ms,
                r.floor_ratio,
                r.gbps,
                r.fast_validated.median_ms,
            ]
            for r in results
        ],
    )


if __name__ == "__main__":
    main()
