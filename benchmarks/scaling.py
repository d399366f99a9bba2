"""Switch time against adapter size: does a switch cost what it touches, from 1e3 to 1e7 entries?

    python -m benchmarks.scaling                       # 1e3 .. 1e7 entries; rand, block; fp32, bf16, int8
    python -m benchmarks.scaling --quick               # 1e3 .. 1e5, fp32 (seconds)
    python -m benchmarks.scaling --busy                # also each size up to 1e5 with the other vCPU kept busy
    python -m benchmarks.scaling --dense               # the threshold for whole-tensor work on one thread
    python -m benchmarks.scaling --soak 20000          # the tiny preset: switch times and a mixed soak, quiet/busy
    python -m benchmarks.scaling --huge-pages          # each torch point's weights on huge pages (Runtime.huge_pages)
    python -m benchmarks.scaling --per-tensor          # a small switch's fixed cost against the tensors it touches
    python -m benchmarks.scaling --huge-ab --min 1e6   # 4 KiB against huge pages, interleaved in one process
    python -m benchmarks.scaling --mask-ab --min 1e6   # random against block masks, interleaved in one process
    python -m benchmarks.scaling --from-base --min 1e5 # a bundle's switch from the base after switch(None)

For each size N, a model of four linears holding 100 N weights (the adapter's density is 1%, as a SHiRA adapter on
a model of that size) gets two random adapters A and B of N entries each (``rand``: uniform positions; ``block``:
``shira_runtime.masks``' random 64-byte blocks of the base's own storage: 16 fp32, 32 bf16, 64 int8 elements,
``line_dtype``). Timed: ``Runtime.switch`` A -> B -> A (end to end: Python, the registered adapter's checks,
lock, plan, kernel, stats; median of the timed switches, ``benchmarks.timing``), in ``ROUNDS`` rounds that also
time the line visits below and, on fp32/bf16, the bare kernel call (``kernels.switch_`` on the same arrays and
preallocated saved buffers: no transaction, no plan, no stats; the runs found at registration passed as the
switch passes them). Beside them the
memory floor (the distinct 64-byte weight lines A and B touch, read and written once at the memory bandwidth read
just before and just after the point's switches, the better of the two: ``benchmarks.common.copy_bandwidth_gbps``,
the better of a 512 MB copy and an in-place update. This shared machine's bandwidth moves by up to 2x within a run,
so a point's floor is read beside it, not at another moment's bandwidth) and the streams floor (the floor plus the
adapter's own arrays: per entry the saved value twice, an fp32 delta and the int32 index twice), and the
line-visit floor (``benchmarks.line_visits``: a plain C++ loop visiting the same lines in the same order, timed on
the same weights: what scattered lines cost on this machine, where the memory floor prices them as streamed).
"x visits" and "switch / kernel" are medians of each round's ratio: the machine's speed drifts between rounds.

An int8 base is the fp32 model quantized (``shira_runtime.quantization``, per-channel scales), the adapters made
on the fp32 model; ``int8-baked`` (``--dtypes int8-baked``) the same adapters baked for that base
(``quantization.bake``: the new codes themselves, so the switch is a byte swap with no grid math);
``int8-bundle`` the int8 base exported to a bundle (``export_onnx``: each weight stored as the transposed uint8
copy its graph reads, which the switch writes) and loaded with ``Runtime.load(bundle)``, its blocks lines of that
copy (``line_dtype="int8", transposed=True``); ``fp8`` the fp32 model quantized to FP8 e4m3, whose switch writes
each layer's bf16 compute copy beside its codes (those lines count in the floors and the visits). ``--busy``: a
second process spinning in Python for the duration of the busy rows (on a 2-vCPU machine: the other vCPU busy, as
on a phone running other work). The chart on stdout is text (no plotting
dependency): one bar per point, its length the switch time over the floor.

``--dense`` measures instead what sets ``shira_runtime.torch_backend.DENSE_SERIAL_BELOW``: a fused LoRA switch
(rank 8, A -> B) on one n x n linear, the mean over a run of switches (a stall shows in the mean, not the median),
with the switch's torch work kept on the calling thread (the runtime's rule for small tensors) against torch's
default threads, quiet and with the other vCPU busy.

``--from-base`` times a bundle's switch base -> A right after ``switch(None)`` handed its pages back (``fp32-bundle``
and ``int8-bundle`` by default, ``--masks``, sizes from ``--min`` to ``--max``): the pages it writes made private
first (``OnnxBackend.before_write``, the default) against the kernels' writes faulting them in, in interleaved
rounds, with the minor faults of each and the A -> B switch beside (docs/device.md).

``--soak N`` runs the tiny preset (fp32, ``shira_runtime.models``) with two fused LoRA adapters (rank
8) and two SHiRA adapters (1%): the median A -> B switch of each kind, then N switches cycling LoRA A, LoRA B,
SHiRA A, SHiRA B, the base; quiet, then with the other vCPU busy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from shira_runtime import Runtime, kernels, torch_backend
from shira_runtime.quantization import bake, quantize
from shira_runtime.synthetic import random_lora, random_shira
from shira_runtime.table import print_table
from torch import nn

from benchmarks.common import copy_bandwidth_gbps, memory_floor_ms, progress, touched_lines
from benchmarks.line_visits import LineVisits
from benchmarks.timing import cycle

NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")  # four linears, PEFT-style names (the adapters' targets)
DENSITY = 0.01
ROUNDS = 3  # rounds of switches, line visits and bare kernel calls per point
# per entry: saved x2, delta (fp32; a baked adapter's new code: 1 byte), index x2
STREAM_BYTES = {
    "fp32": 2 * 4 + 12,
    "bf16": 2 * 2 + 12,
    "int8": 2 * 1 + 12,
    "int8-baked": 2 * 1 + 1 + 8,
    "int8-bundle": 2 * 1 + 12,
    "fp32-bundle": 2 * 4 + 12,
    "fp8": 2 * 1 + 12,  # its bf16 compute copy's lines are weight lines (``parts``)
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int8-baked": torch.int8,
               "int8-bundle": torch.int8, "fp32-bundle": torch.float32, "fp8": torch.int8}  # fmt: skip
CHOICES = ("fp32", "bf16", "int8", "int8-baked", "int8-bundle", "fp32-bundle", "fp8")


class Linears(nn.ModuleDict):
    """``model_for``'s linears with a forward (the sum of their outputs), so that it exports to a bundle."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(lin(x) for lin in self.values())


def model_for(entries: int, seed: int) -> nn.Module:
    """Four linears of ``entries / DENSITY`` weights in all, columns a multiple of 64 (whole cache lines)."""
    per = entries / DENSITY / len(NAMES)
    cols = min(2048, max(64, round(math.sqrt(per) / 64) * 64))
    rows = max(1, round(per / cols))
    torch.manual_seed(seed)
    m = Linears({n: nn.Linear(cols, rows, bias=False) for n in NAMES})
    for lin in m.values():
        nn.init.normal_(lin.weight, std=0.02)
    return m


@contextlib.contextmanager
def busy_cpu(on: bool) -> Iterator[None]:
    """A second process spinning in Python while the block runs (``on``), killed after it."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()


def parts(rt: Runtime, a: str, b: str) -> list[tuple[object, list]]:
    """Each weight A or B writes (its storage: a tensor, or a bundle's numpy array) with A's and B's indices, and
    the copy a switch writes beside it at the same indices (an FP8 layer's bf16 compute copy), if any."""
    out = []
    for t, w in rt.backend.tensors.items():
        idx = [rt._get(n).sparse[t][0] for n in (a, b) if t in rt._get(n).sparse]
        if idx:
            out.append((w, idx))
            if (m := rt.backend.mirror(t)) is not None:
                out.append((m, idx))
    return out


def floors(rt: Runtime, a: str, b: str, dtype: str, gbps: float) -> tuple[float, float, int]:
    """The memory floor and the streams floor (ms) of a switch A -> B, and the entries it writes (a copy written
    beside a weight adds its lines, not entries: the adapter's streams are the weight's)."""
    lines = entries = 0
    ops = rt.backend.ops  # torch tensors, or a bundle's numpy arrays (views of the mapped file)
    weights = {id(w) for w in rt.backend.tensors.values()}
    for w, parts_ in parts(rt, a, b):
        idx = torch.cat([torch.as_tensor(p).long() for p in parts_])
        lines += touched_lines(idx, ops.itemsize(w), ops.region(w)[0] % 64)
        entries += idx.numel() if id(w) in weights else 0
    floor = memory_floor_ms(lines, gbps)
    return floor, floor + entries * STREAM_BYTES[dtype] / (gbps * 1e9) * 1e3, entries


def bare_kernel(rt: Runtime, a: str, b: str, repeats: int) -> float:
    """Median ms of the kernel call alone for A -> B -> A, on the runtime's tensors and adapter arrays (the runtime
    at the base: the bare calls apply and restore themselves; the weights end as they started)."""
    tensors = rt.backend.tensors
    pa, pb = rt._get(a), rt._get(b)
    ts = [t for t in tensors if t in pa.sparse and t in pb.sparse]
    saved = {n: [torch.empty(len(p.sparse[t][0]), dtype=tensors[t].dtype) for t in ts] for n, p in ((a, pa), (b, pb))}
    none = torch.zeros(0, 3, dtype=torch.int64)  # the runs found at registration, as the switch passes them
    runs = {n: [p.runs.get(t, none) for t in ts] for n, p in ((a, pa), (b, pb))}

    def sw(src: str, dst: str) -> None:
        ps, pd = rt._get(src), rt._get(dst)
        kernels.switch_(
            [tensors[t] for t in ts],
            [ps.sparse[t][0] for t in ts],
            saved[src],
            [tensors[t] for t in ts],
            [pd.sparse[t][0] for t in ts],
            [pd.sparse[t][1] for t in ts],
            saved[dst],
            validate=False,
            out_runs=runs[src],
            in_runs=runs[dst],
        )

    kernels.switch_([], [], [], [tensors[t] for t in ts], [pa.sparse[t][0] for t in ts],
                    [pa.sparse[t][1] for t in ts], saved[a], validate=False, in_runs=runs[a])  # fmt: skip
    t = cycle([lambda: sw(a, b), lambda: sw(b, a)], repeats)  # 1 + repeats calls from A: ends in B when even
    if repeats % 2 == 0:
        sw(b, a)
    kernels.switch_([tensors[t] for t in ts], [pa.sparse[t][0] for t in ts], saved[a], [], [], [], [],
                    validate=False, out_runs=runs[a])  # fmt: skip
    return t.median_ms


def bandwidth() -> float:
    """One reading of the memory bandwidth beside a point (GB/s): two rounds, a few seconds' tenths."""
    return copy_bandwidth_gbps(repeats=3, rounds=2)


@contextlib.contextmanager
def runtime_for(entries: int, mask: str, dtype: str, huge: bool = False) -> Iterator[tuple[Runtime, int]]:
    """A runtime over ``model_for(entries)`` in ``dtype`` with the two adapters "a" and "b" registered (``mask``
    positions), and the bytes ``huge_pages`` moved (``huge``; 0 otherwise). ``int8-bundle`` / ``fp32-bundle``: the
    base exported to a bundle in a temporary folder, removed when the block ends."""
    model = model_for(entries, seed=0)
    line = None if mask == "rand" else LINE_DTYPES[dtype]  # blocks are lines of the base's own storage
    bundle = dtype.endswith("-bundle")  # int8: the transposed copy, its blocks runs of rows in a column
    adapters = {n: random_shira(model, NAMES, DENSITY, seed=k + 1, mask=None if mask == "rand" else mask,
                                line_dtype=line, transposed=dtype == "int8-bundle" and line is not None)
                for k, n in enumerate("ab")}  # fmt: skip
    if dtype.startswith("int8"):
        model = quantize(model, "int8")
        if dtype == "int8-baked":  # the codes a switch writes, computed once for this base: a byte swap
            adapters = {n: bake(ad, model) for n, ad in adapters.items()}
    elif dtype == "fp8":  # e4m3 codes with the bf16 compute copy each switch writes beside them
        model = quantize(model, "fp8_e4m3")
    elif dtype not in ("fp32", "fp32-bundle"):
        model = model.to(DTYPES[dtype])
    with contextlib.ExitStack() as stack:
        if bundle:
            from shira_runtime.exporters import export_onnx

            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="scaling-"))
            cols = model["q_proj"].in_features
            rt = Runtime.load(export_onnx(model, (torch.zeros(1, cols),), Path(folder) / "bundle", verify=False,
                                          progress=False))  # fmt: skip
        else:
            rt = Runtime.load(model)
        moved = rt.huge_pages() if huge else 0  # Runtime.huge_pages: the weights on 2 MiB pages where it can
        for n, ad in adapters.items():
            rt.add_adapter(n, ad)
        yield rt, moved


def point(entries: int, mask: str, dtype: str, repeats: int, busy: bool, huge: bool = False) -> dict:
    bundle = dtype.endswith("-bundle")  # a bundle's pages are its mapped file's: no huge pages there
    with runtime_for(entries, mask, dtype, huge and not bundle) as (rt, moved):
        out = _point(rt, entries, mask, dtype, repeats, busy)
    return out if bundle else {**out, "huge_mb": moved / 2**20}


def _point(rt: Runtime, entries: int, mask: str, dtype: str, repeats: int, busy: bool) -> dict:
    rt.switch("a")
    # the same lines visited by a plain loop, in the switch's state (a bundle's pages already the runtime's)
    visits = LineVisits(parts(rt, "a", "b"))
    threads, prefetch, _ = visits.best(repeats)
    before = bandwidth()
    out = {"entries": entries, "mask": mask, "dtype": dtype}
    # ROUNDS rounds of: the switches, the line visits, the bare kernel (from the base, back to A after): each
    # ratio is the median of its rounds' ratios, so a drift of the machine's speed between them cancels out
    switch, visit, kernel = [], [], []
    for _ in range(ROUNDS):
        switch.append(cycle([lambda: rt.switch("b"), lambda: rt.switch("a")], repeats).median_ms)
        visit.append(visits.time_ms(prefetch, repeats, threads))
        if dtype in DTYPES:
            rt.switch(None)
            kernel.append(bare_kernel(rt, "a", "b", repeats))
            rt.switch("a")
    out["gbps"] = max(before, bandwidth())  # a floor is a lower bound: the better of the two readings
    rt.switch(None)
    out["floor_ms"], out["streams_ms"], out["written"] = floors(rt, "a", "b", dtype, out["gbps"])
    floor, streams = out["floor_ms"], out["streams_ms"]
    out["switch_ms"], out["visits_ms"] = statistics.median(switch), statistics.median(visit)
    if kernel:
        out["kernel_ms"] = statistics.median(kernel)
        out["atomic_ratio"] = statistics.median(s / k for s, k in zip(switch, kernel))
    if busy:
        with busy_cpu(True):
            rt.switch("a")
            out["busy_ms"] = cycle([lambda: rt.switch("b"), lambda: rt.switch("a")], repeats).median_ms
            rt.switch(None)
    out["floor_ratio"] = out["switch_ms"] / floor if floor else None
    out["streams_ratio"] = out["switch_ms"] / streams if streams else None
    out["visits_ratio"] = statistics.median(s / v for s, v in zip(switch, visit)) if visits.lines else None
    return out


def chart(points: list[dict]) -> None:
    """One text bar per point: its length the switch time over the memory floor (log scale, 1x .. 100x)."""
    print("\n## switch / floor (log scale: | = 1x, each # a factor of 10^0.1)")
    for p in points:
        r = p["floor_ratio"] or 1.0
        bar = "#" * max(0, round(10 * math.log10(max(r, 1.0))))
        print(f"{p['dtype']:>4} {p['mask']:>5} {p['entries']:>9.0e} |{bar} {r:.2f}x")


def dense_threshold(sides: tuple[int, ...], switches: int) -> list[list[object]]:
    """Mean ms of a fused LoRA switch on one n x n linear, serial vs torch's threads, quiet and busy."""
    rows = []
    keep = torch_backend.DENSE_SERIAL_BELOW
    try:
        for n in sides:
            model = nn.ModuleDict({"q_proj": nn.Linear(n, n, bias=False)})
            rt = Runtime.load(model)
            for k, name in enumerate("ab"):
                rt.add_adapter(name, random_lora(model, ("q_proj",), 8, seed=k + 1), mode="fused")
            row: list[object] = [n, n * n]
            for busy in (False, True):
                with busy_cpu(busy):
                    for serial in (True, False):
                        torch_backend.DENSE_SERIAL_BELOW = (n * n + 1) if serial else 0
                        rt.switch("a")
                        t = cycle([lambda r=rt: r.switch("b"), lambda r=rt: r.switch("a")], switches)
                        row.append(statistics.mean(t.samples_ms))
                rt.switch(None)
            rows.append([*row, row[3] / row[2], row[5] / row[4]])
            progress(f"dense {n} x {n}: {row[2:]}")
    finally:
        torch_backend.DENSE_SERIAL_BELOW = keep
    return rows


def soak(switches: int) -> list[list[object]]:
    """The tiny preset's switches and a mixed soak, quiet and busy: [condition, LoRA ms, SHiRA ms, soak s]."""
    from shira_runtime.models import TARGETS, load_base

    model = load_base("tiny")
    rt = Runtime.load(model)
    for k, name in enumerate(("la", "lb")):
        rt.add_adapter(name, random_lora(model, TARGETS, 8, seed=k + 1), mode="fused")
    for k, name in enumerate(("sa", "sb")):
        rt.add_adapter(name, random_shira(model, TARGETS, DENSITY, seed=k + 3))
    rows = []
    for busy in (False, True):
        with busy_cpu(busy):
            row: list[object] = ["other vCPU busy" if busy else "quiet"]
            for a, b in (("la", "lb"), ("sa", "sb")):
                rt.switch(a)
                row.append(cycle([lambda b=b: rt.switch(b), lambda a=a: rt.switch(a)], 300).median_ms)
            names = ("la", "lb", "sa", "sb", None)
            t = time.perf_counter()
            for k in range(switches):
                rt.switch(names[k % len(names)])
            row.append(time.perf_counter() - t)
            rt.switch(None)
        rows.append(row)
        progress(f"tiny: {row}")
    return rows


FLUSH_BYTES = 64 << 20  # rewritten before each cold switch: twice the largest L3 of the machines we measure on


def cold_us(rt: Runtime, switches: int, junk) -> float:
    """Median us of a switch A <-> B (from A) with the caches flushed before each, outside the timing (``junk``,
    a ``FLUSH_BYTES`` numpy array, rewritten): a switch as an app makes it after inference, which streams the
    weights through the caches, where a loop of switches alone keeps the interpreter's and the kernel's lines
    warm."""
    times = []
    for k in range(switches + switches % 2):  # an even count: back at A
        junk += 1
        t = time.perf_counter()
        rt.switch("b" if k % 2 == 0 else "a")
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def per_tensor(counts: tuple[int, ...], switches: int, busy: bool = False) -> list[list[object]]:
    """A small switch's fixed cost against the number of tensors it touches: ``n`` linears of 256 x 256, two random
    adapters of 0.1% (65 entries per tensor), the median A -> B switch on the torch backend and on the same linears
    exported to a bundle (the device path: numpy arrays over the mapped file), in a loop of switches (warm caches),
    with the caches flushed before each switch (``cold_us``), and with the other vCPU kept busy (``busy``), and on
    the linears quantized to int8 and to FP8 e4m3 (torch backend, warm and cold; an FP8 switch writes each layer's
    bf16 compute copy too): [tensors, entries, torch us, us/tensor, bundle us, bundle us/tensor, cold: torch us,
    cold: bundle us, (busy: torch us, bundle us,) int8 us, cold: int8 us, fp8 us, cold: fp8 us]."""
    import copy

    import numpy as np
    from shira_runtime.exporters import export_onnx

    junk = np.ones(FLUSH_BYTES, np.uint8)
    rows = []
    for n in counts:
        names = [f"l{k}" for k in range(n)]
        torch.manual_seed(0)
        model = Linears({name: nn.Linear(256, 256, bias=False) for name in names})
        adapters = {name: random_shira(model, names, 0.001, seed=k + 1) for k, name in enumerate("ab")}
        with tempfile.TemporaryDirectory(prefix="per-tensor-") as folder:
            bundle = export_onnx(model, (torch.zeros(1, 256),), Path(folder) / "bundle", verify=False, progress=False)
            rts = [Runtime.load(model), Runtime.load(bundle)]
            rts += [Runtime.load(quantize(copy.deepcopy(model), fmt)) for fmt in ("int8", "fp8_e4m3")]
            for rt in rts:
                for name, ad in adapters.items():
                    rt.add_adapter(name, ad)
                rt.switch("a")
            entries = sum(int(i.numel()) for i, _ in rts[0]._get("a").sparse.values())
            row: list[object] = [n, entries]
            def warm_us(rt: Runtime) -> float:
                return cycle([lambda: rt.switch("b"), lambda: rt.switch("a")], switches).median_ms * 1e3

            for load in (False, True) if busy else (False,):
                with busy_cpu(load):
                    us = [warm_us(rt) for rt in rts[:2]]
                if load:
                    row += us
                else:
                    row += [us[0], us[0] / n, us[1], us[1] / n, *(cold_us(rt, switches, junk) for rt in rts[:2])]
            for rt in rts[2:]:  # int8, fp8
                row += [warm_us(rt), cold_us(rt, switches, junk)]
            for rt in rts:
                rt.switch(None)
            del rts
        rows.append(row)
        progress(f"{n} tensors: torch {row[2]:.0f} us, bundle {row[4]:.0f} us, int8 {row[-4]:.0f} us, fp8 "
                 f"{row[-2]:.0f} us; cold {row[6]:.0f}, {row[7]:.0f}, {row[-3]:.0f} and {row[-1]:.0f} us")  # fmt: skip
    return rows


def interleaved(rts: list[Runtime], repeats: int, rounds: int) -> list[list[float]]:
    """Each runtime's A -> B switch (median ms of ``repeats``) in ``rounds`` interleaved rounds, so that a drift of
    the machine's speed reaches every arm alike; the runtimes are left at the base."""
    for rt in rts:
        rt.switch("a")
    times: list[list[float]] = [[] for _ in rts]
    for _ in range(rounds):
        for k, rt in enumerate(rts):
            times[k].append(cycle([lambda r=rt: r.switch("b"), lambda r=rt: r.switch("a")], repeats).median_ms)
    for rt in rts:
        rt.switch(None)
    return times


def huge_ab(entries: int, mask: str, dtype: str, repeats: int, rounds: int = 5) -> list[object]:
    """Two runtimes over two copies of the same model, one on huge pages (``Runtime.huge_pages``), their A -> B
    switches in interleaved rounds: [dtype, mask, entries, 4 KiB ms, huge ms, huge / 4 KiB (median of the
    rounds' ratios), MB moved]."""
    with runtime_for(entries, mask, dtype) as (small, _), runtime_for(entries, mask, dtype, True) as (huge, moved):
        times = interleaved([small, huge], repeats, rounds)
    ratio = statistics.median(h / s for s, h in zip(*times))
    return [dtype, mask, entries, statistics.median(times[0]), statistics.median(times[1]), ratio, moved / 2**20]


def mask_ab(entries: int, dtype: str, repeats: int, rounds: int = 5) -> list[object]:
    """Random against block masks of the same size, two runtimes in one process, their A -> B switches in
    interleaved rounds (separate points are minutes apart, and the machine's speed drifts between them):
    [dtype, entries, rand ms, block ms, rand / block (the median of the rounds' ratios)]."""
    with runtime_for(entries, "rand", dtype) as (rand, _), runtime_for(entries, "block", dtype) as (block, _):
        times = interleaved([rand, block], repeats, rounds)
    ratio = statistics.median(r / b for r, b in zip(*times))
    return [dtype, entries, statistics.median(times[0]), statistics.median(times[1]), ratio]


def from_base(entries: int, mask: str, dtype: str, rounds: int = 5) -> list[object]:
    """A bundle's switch base -> A right after ``switch(None)`` handed its pages back (docs/device.md), with the
    pages made private first in one call per run (``OnnxBackend.before_write``, the default) against the kernels'
    writes faulting them in (``_populate`` off: the behaviour before it), in interleaved rounds in one process:
    [dtype, mask, entries, pages, populate ms, faulting ms, faulting / populate (the median of the rounds' ratios),
    minor faults per switch (populate, faulting), A -> B ms (pages already private)]."""
    with runtime_for(entries, mask, dtype) as (rt, _):
        backend = rt.backend
        rt.switch("a")
        rt.switch(None)  # the first switch's one-time costs paid; the pages handed back
        pages = int(backend._pages_of(*_incoming(rt, "a")).size)
        times: dict[bool, list[float]] = {True: [], False: []}
        faults: dict[bool, list[int]] = {True: [], False: []}
        for _ in range(rounds):
            for populate in (True, False):
                backend._populate = populate
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                rt.switch("a")
                times[populate].append((time.perf_counter() - t0) * 1e3)
                faults[populate].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                rt.switch(None)
        backend._populate = True
        ab = statistics.median(interleaved([rt], 8, 1)[0])
    ratio = statistics.median(f / p for p, f in zip(times[True], times[False]))
    return [dtype, mask, entries, pages, statistics.median(times[True]), statistics.median(times[False]), ratio,
            int(statistics.median(faults[True])), int(statistics.median(faults[False])), ab]  # fmt: skip


def _incoming(rt: Runtime, name: str) -> tuple[tuple[str, ...], list]:
    """Adapter ``name``'s tensors and storage indices, as a switch to it hands them to ``Backend.before_write``."""
    sparse = rt._get(name).sparse
    return tuple(sparse), [idx for idx, _ in sparse.values()]


def report(path: Path | None, key: str, title: str, cols: list[str], rows: list[list[object]]) -> None:
    """A run's table on stdout under ``# title``, and ``{key: rows}`` as JSON at ``path`` when given."""
    print(f"# {title}")
    print_table(cols, rows)
    if path:
        path.write_text(json.dumps({key: rows}, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1e3 .. 1e5 entries, fp32, rand and block (seconds)")
    p.add_argument("--min", type=float, default=1e3, help="the smallest size (entries; default 1e3)")
    p.add_argument("--max", type=float, default=1e7, help="the largest size (entries; default 1e7)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=CHOICES)
    p.add_argument("--masks", nargs="+", default=["rand", "block"], choices=["rand", "block"])
    p.add_argument("--busy", action="store_true", help="also time each size up to 1e5 with the other vCPU busy")
    p.add_argument("--repeats", type=int, default=None, help="timed switches per point (default 40; --quick 20)")
    p.add_argument("--dense", action="store_true", help="measure the one-thread threshold for whole-tensor work")
    p.add_argument("--soak", type=int, default=0, help="the tiny preset's switches and an N-switch mixed soak")
    p.add_argument("--per-tensor", action="store_true",
                   help="a small switch's fixed cost against the tensors it touches (4 .. 210 linears)")
    p.add_argument("--huge-ab", action="store_true",
                   help="each point twice in one process, 4 KiB pages against huge pages, in interleaved rounds")
    p.add_argument("--mask-ab", action="store_true",
                   help="each size with random and with block masks in one process, in interleaved rounds")
    p.add_argument("--from-base", action="store_true",
                   help="a bundle's switch from the base after switch(None): pages made private first or faulted")
    p.add_argument("--huge-pages", action="store_true",
                   help="Runtime.huge_pages() on each torch-backend point's weights (Linux: transparent huge pages)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.soak:
        title = (f"tiny preset: median switch ms and a {args.soak}-switch mixed soak; torch threads "
                 f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")  # fmt: skip
        cols = ["condition", "LoRA fused A -> B ms", "SHiRA A -> B ms", "soak s"]
        return report(args.json, "soak", title, cols, soak(args.soak))
    if args.per_tensor:
        rows = per_tensor((4, 28, 112, 210), args.repeats or 300, args.busy)
        title = (f"a small switch against the tensors it touches (SmolLM2-135M: 210 linears), median us; kernels "
                 f"{kernels.backend()}, torch threads {torch.get_num_threads()}")  # fmt: skip
        cols = ["tensors", "entries", "torch us", "us per tensor", "bundle us", "bundle us per tensor",
                "cold: torch us", "cold: bundle us"]  # fmt: skip
        cols += ["busy: torch us", "busy: bundle us"] if args.busy else []
        cols += ["int8 us", "cold: int8 us", "fp8 us", "cold: fp8 us"]
        return report(args.json, "per_tensor", title, cols, rows)
    if args.dense:
        rows = dense_threshold((64, 128, 256, 362, 512, 724, 1024), args.repeats or 200)
        title = (f"fused LoRA switch (rank 8) on one n x n linear, mean ms; torch threads {torch.get_num_threads()}, "
                 f"{os.cpu_count()} CPUs; DENSE_SERIAL_BELOW = {torch_backend.DENSE_SERIAL_BELOW}")  # fmt: skip
        cols = ["n", "elements", "one thread", "torch threads", "busy: one thread", "busy: torch threads",
                "threads / one", "busy: threads / one"]  # fmt: skip
        return report(args.json, "dense", title, cols, rows)
    top = min(args.max, 1e5) if args.quick else args.max
    sizes = [int(10**k) for k in range(3, 8) if args.min <= 10**k <= top]
    dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16", "int8"])
    repeats = args.repeats or (20 if args.quick else 40)
    if args.huge_ab:
        torch_dtypes = [d for d in dtypes if d in ("fp32", "bf16", "int8")]  # a bundle's pages are its file's
        rows = [huge_ab(n, mask, dtype, max(4, repeats // max(1, n // 1_000_000)))
                for dtype in torch_dtypes for mask in args.masks for n in sizes]  # fmt: skip
        title = ("4 KiB pages against huge pages (Runtime.huge_pages), interleaved rounds in one process; "
                 f"kernels {kernels.backend()}")  # fmt: skip
        cols = ["dtype", "mask", "entries", "4 KiB ms", "huge ms", "huge / 4 KiB", "MB moved"]
        return report(args.json, "huge_ab", title, cols, rows)
    if args.from_base:
        rows = []
        for dtype in args.dtypes or ["fp32-bundle", "int8-bundle"]:
            for mask in args.masks:
                for n in sizes:
                    progress(f"{dtype} {mask} {n:.0e} entries: base -> A after switch(None)")
                    rows.append(from_base(n, mask, dtype))
        title = ("a bundle's switch from the base after switch(None) handed its pages back: pages made private "
                 f"first (default) against the kernels' writes faulting them in; interleaved rounds; "
                 f"kernels {kernels.backend()}")  # fmt: skip
        cols = ["dtype", "mask", "entries", "pages", "populate ms", "faulting ms", "faulting / populate",
                "faults (populate)", "faults (faulting)", "A -> B ms"]  # fmt: skip
        return report(args.json, "from_base", title, cols, rows)
    if args.mask_ab:
        rows = []
        for dtype in dtypes:
            for n in sizes:
                progress(f"{dtype} rand against block, {n:.0e} entries")
                rows.append(mask_ab(n, dtype, max(4, repeats // max(1, n // 1_000_000))))
        title = f"random against block masks, interleaved rounds in one process; kernels {kernels.backend()}"
        return report(args.json, "mask_ab", title, ["dtype", "entries", "rand ms", "block ms", "rand / block"], rows)
    progress(f"kernels: {kernels.backend()}")
    points = []
    for dtype in dtypes:
        for mask in args.masks:
            for n in sizes:
                progress(f"{dtype} {mask} {n:.0e} entries")
                points.append(point(n, mask, dtype, max(4, repeats // max(1, n // 1_000_000)),
                                    args.busy and n <= 100_000, args.huge_pages))  # fmt: skip
    gbps = [q["gbps"] for q in points]
    print(f"# scaling: {os.cpu_count()} CPUs, memory bandwidth {min(gbps):.1f}-{max(gbps):.1f} GB/s (read beside "
          f"each point: its floors use its own), kernels {kernels.backend()}, density {DENSITY}"
          + (f"; weights on huge pages: {sum(q.get('huge_mb', 0) for q in points):.0f} MB in all" if args.huge_pages
             else ""))  # fmt: skip
    cols = ["dtype", "mask", "entries", "written", "GB/s", "switch ms", "floor ms", "x floor", "+ streams ms", "x",
            "visits ms", "x visits", "kernel ms", "switch / kernel"] + (["busy ms"] if args.busy else [])  # fmt: skip
    print_table(
        cols,
        [
            [
                q["dtype"],
                q["mask"],
                q["entries"],
                q["written"],
                q["gbps"],
                q["switch_ms"],
                q["floor_ms"],
                q["floor_ratio"],
                q["streams_ms"],
                q["streams_ratio"],
                q["visits_ms"],
                q["visits_ratio"],
                q.get("kernel_ms"),
                q.get("atomic_ratio"),
            ]
            + ([q.get("busy_ms")] if args.busy else [])
            for q in points
        ],  # fmt: skip
    )
    chart(points)
    if args.json:
        args.json.write_text(json.dumps({"points": points}, indent=1))
        progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
