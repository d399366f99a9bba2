"""Switching on quantized bases, kernel level: the SHiRA switch on 1-byte codes against its memory floor, and the
size of adapter files of codes.

    python -m benchmarks.quant_switch                  # llama-1b shapes (16 layers), int8 / fp8_e4m3 / fp32
    python -m benchmarks.quant_switch --quick          # one layer, few repeats

Switch: two random 1% adapters A -> B -> A on the C++ path (``benchmarks.timing.cycle``: each switch timed, the
first excluded), the weights as int8 or FP8 codes with per-row scales (the grid write ``Q(deq(code) + delta)``),
and as fp32 with the same masks for comparison; the floor is the union of the 64-byte lines A and B touch, read and
written, at the copy bandwidth measured before the cycle. Checked inside the run: the reference path writes the
same bytes. FP8 gets two rows: the codes alone, and the codes with their bf16 compute copy written by the kernel
in the same visit (``mirrors``: what the runtime's FP8 switch does; its floor adds the copy's touched lines, and
the copy is checked against the codes after the cycle). The codes-only row also times the alternative the mirror
replaced: refreshing the copy's touched entries after the switch with torch index ops.

Sizes: one llama-1b layer's seven projections at 1% (random and ``block`` masks), the bytes per nonzero of an
adapter of codes (``shira_runtime.quantization.bake``, file version 5) against the delta file with fp16 values.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from shira_runtime import quantize
from shira_runtime.adapters import save_adapter
from shira_runtime.kernels import extension, qformats, reference
from shira_runtime.quantization import bake
from shira_runtime.synthetic import random_shira
from shira_runtime.table import print_table
from torch import nn

from benchmarks.common import copy_bandwidth_gbps, memory_floor_ms, progress, touched_lines
from benchmarks.kernels import LAYER_SHAPES
from benchmarks.timing import cycle, time_ms


def random_masks(shapes, density: float, gen: torch.Generator) -> list[torch.Tensor]:
    return [(torch.rand(r * c, generator=gen) < density).nonzero().flatten().to(torch.int32) for r, c in shapes]


def switch_rows(layer: list, layers: int, density: float, repeats: int, formats: list[str]) -> list[list]:
    gen = torch.Generator().manual_seed(0)
    shapes = list(layer) * layers
    idx = (random_masks(shapes, density, gen), random_masks(shapes, density, gen))
    rows = []
    for fmt in formats:
        for mirror in (False, True) if fmt.startswith("fp8") else (False,):
            what = " + bf16 copy (mirror)" if mirror else ""
            progress(f"{fmt}{what}: {sum(r * c for r, c in shapes) / 1e6:.0f}M weights, {repeats} switches each way")
            rows.append(one_format(fmt, shapes, idx, repeats, gen, mirror))
    return rows


def one_format(fmt: str, shapes, idx, repeats: int, gen: torch.Generator, mirror: bool = False) -> list:
    ext = extension.load()
    quant = fmt != "fp32"
    ws, scales = [], []
    for r, c in shapes:
        w = torch.randn(r, c, generator=gen) * 0.02
        if quant:
            s = qformats.channel_scales(w, fmt)
            w = qformats.encode(w, s, fmt)[0]
            scales.append(s)
        ws.append(w)
    sc = scales if quant else None
    sat = torch.zeros(len(ws), dtype=torch.int64) if quant else None
    deltas = [[torch.randn(i.numel(), generator=gen) * 0.002 for i in ix] for ix in idx]
    saved = [[torch.empty(i.numel(), dtype=w.dtype) for w, i in zip(ws, ix)] for ix in idx]
    ms = [w.to(torch.bfloat16) for w in ws] if mirror else None
    ext.apply_(ws, idx[0], deltas[0], saved[0], validate=False, scales=sc, saturated=sat, mirrors=ms)
    state = [0]

    def switch() -> None:
        o, n = state[0], 1 - state[0]
        ext.switch_(
            ws, idx[o], saved[o], ws, idx[n], deltas[n], saved[n], validate=False, in_scales=sc, saturated=sat,
            out_mirrors=ms, in_mirrors=ms,
        )  # fmt: skip
        state[0] = n

    lines = sum(
        touched_lines(torch.cat([ia, ib]), ws[0].element_size()) + (touched_lines(torch.cat([ia, ib]), 2) if ms else 0)
        for ia, ib in zip(*idx)
    )
    bw = copy_bandwidth_gbps(256 << 20, repeats=3)
    t = cycle([switch, switch], repeats)
    floor = memory_floor_ms(lines, bw)
    # the reference restores the same bytes as the fast path, from the state the cycle left
    cur = state[0]
    w_ref, w_fast = ws[0].clone(), ws[0].clone()
    reference.restore_([w_ref], [idx[cur][0]], [saved[cur][0].clone()])
    ext.restore_([w_fast], [idx[cur][0]], [saved[cur][0].clone()])
    assert torch.equal(w_ref.view(torch.uint8), w_fast.view(torch.uint8)), "fast and reference paths differ"
    if ms is not None:  # the kernel kept every copy in step with its codes
        assert all(torch.equal(m, w.to(torch.bfloat16)) for m, w in zip(ms, ws)), "a mirror left its codes"
    refresh = None
    if fmt.startswith("fp8") and not mirror:  # the alternative: the copy's touched entries in torch index ops
        copies = [w.to(torch.bfloat16) for w in ws]

        def refresh_copies() -> None:
            for w, c, ia, ib in zip(ws, copies, *idx):
                for i in (ia.long(), ib.long()):
                    c.view(-1).index_copy_(0, i, w.view(-1).index_select(0, i).to(torch.bfloat16))

        refresh = time_ms(refresh_copies, 3).median_ms
    saturated = int(sat.sum()) if quant else None
    name = f"{fmt}+bf16copy" if mirror else fmt
    return [name, t.median_ms, t.p90_ms, lines * 64 / 1e6, floor, t.median_ms / floor, refresh, saturated]


def size_rows(layer: list, density: float) -> list[list]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    torch.manual_seed(0)
    net = nn.Sequential()
    for n, (o, i) in zip(names, layer):
        lin = nn.Linear(i, o, bias=False)
        nn.init.normal_(lin.weight, std=0.02)
        net.add_module(n, lin)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mask in ("rand", "block"):
            progress(f"adapter files of codes, {mask} masks")
            a = random_shira(net, names, density=density, seed=1, std=0.002, mask=mask)
            deltas = save_adapter(a, Path(tmp) / "d.safetensors", values="fp16").stat().st_size
            for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
                c = bake(a, quantize(copy.deepcopy(net), fmt))
                size = save_adapter(c, Path(tmp) / "c.safetensors").stat().st_size
                rows.append([mask, fmt, c.nnz / a.nnz, size / max(c.nnz, 1), size / a.nnz, deltas / a.nnz])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_switch", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--formats", nargs="+", default=["int8", "fp8_e4m3", "fp32"])
    p.add_argument("--quick", action="store_true", help="one layer of quarter-size shapes, 2 repeats")
    args = p.parse_args(argv)
    layer = list(LAYER_SHAPES)
    if args.quick:
        args.layers, args.repeats = 1, 2
        layer = [(r // 4, c // 4) for r, c in layer]
    rows = switch_rows(layer, args.layers, args.density, args.repeats, args.formats)
    what = "quarter-size " if args.quick else ""
    print(
        f"\nswitch A -> B, {what}llama-1b linear shapes x {args.layers} layers, {args.density:.0%} random masks, "
        "C++ path"
    )
    cols = ["weights", "switch ms", "p90 ms", "floor MB", "floor ms", "x floor", "copy refresh ms", "saturated"]
    print_table(cols, rows)
    print("fp8+bf16copy: the FP8 compute copy written by the kernel in the same visit (the runtime's FP8 switch);")
    print("copy refresh: what refreshing the copy's touched entries after the switch would cost instead")
    print(f"\nadapter files of codes ({args.density:.0%}, one {what}llama-1b layer, deltas of std 0.1x the weights')")
    cols = ["mask", "format", "codes changed", "B per stored entry", "B per nonzero", "fp16 delta file B/nnz"]
    print_table(cols, size_rows(layer, args.density))


if __name__ == "__main__":
    main()
