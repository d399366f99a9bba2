"""Switch latency: SHiRA (sparse scatter) against LoRA fused and LoRA unfused, on one model, in one run.

    python -m benchmarks.switch_latency                  # the medium preset (94M parameters), fp32: ~2 min
    python -m benchmarks.switch_latency --quick          # tiny preset, few repeats: ~20 s
    python -m benchmarks.switch_latency --preset llama-1b   # Llama-3.2-1B shapes: ~15 min, ~21 GB
    python -m benchmarks.switch_latency --dtype fp32 bf16 --json out.json --plot out.png
    python -m benchmarks.switch_latency --mask rand block struct wm snip   # switch rows per SHiRA mask kind
    python -m benchmarks.switch_latency --dtype int8 fp8_e4m3 fp8_e5m2     # quantized bases
    (shira_runtime.quantization)

Every figure is measured in this run: switch medians (and p90) over A -> B -> A cycles, first call excluded;
then inference (1 token, a batch) and generation (first token, decode rate) of the base and every method in
interleaved rounds (``benchmarks.timing.interleave``), each visit warmed up untimed, medians and paired ratios to
the base. SHiRA runs the base's code path, so its ratios must read 1.00 +- 0.05: the run checks that, and warns
when the machine was too noisy to trust (the base's own scatter, other processes' CPU). OpenMP waits are passive
(``OMP_WAIT_POLICY``, unless set): spinning threads make a shared machine 3-30x slower and noisy.
Both are taken by ``benchmarks.timing``, the same loops for the torch rows (here) and the onnxruntime rows
(``benchmarks.switch_onnx``); every row is a ``benchmarks.switch_rows.Row``.

A quantized ``--dtype`` (``int8``, ``fp8_e4m3``, ``fp8_e5m2``): the fp32 model is built, the random adapters are
made on it, then it is quantized in place (``shira_runtime.quantization.quantize``, every linear but the LM head). SHiRA
switches on the grid (the floor counts the touched lines of the 1-byte codes, and for FP8 those of the bf16
compute copy the kernel writes beside them); the fused LoRA row is the PEFT way
(``benchmarks.baselines.RequantLora``: dequantize, merge, requantize whole tensors with new scales; the
runtime refuses fused LoRA on quantized weights); unfused LoRA runs through the runtime. ``int8`` also gets
onnxruntime rows on an int8 bundle (``shira_runtime.exporters.quant_graph``: SHiRA switched live on the transposed
uint8 copies the bundle stores, LoRA unfused in slots beside them); FP8 bases have no bundle (onnxruntime's CPU
provider has no FP8 matmul). Skipped, said in
``skipped``: the PEFT rows (PEFT cannot merge into our ``QuantLinear``) and every fused-LoRA row but the PEFT way's.
"""

from __future__ import annotations

import os
import sys

# OpenMP threads that spin while they wait make a shared 2-core machine 3-30x slower and noisy (measured: a
# 64-token forward of the medium preset 140 ms alone, 970 ms while other processes kept one core busy; with
# passive waits 240 ms, and as fast as spinning on a quiet machine). libgomp reads it when torch loads.
if "torch" in sys.modules:
    OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "default (torch was loaded first)")
else:
    OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import platform
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch
from shira_runtime import Runtime, kernels
from shira_runtime.kernels.dtypes import SHORT
from shira_runtime.kernels.qformats import FORMATS
from shira_runtime.masks import KINDS
from shira_runtime.models import PRESETS, TARGETS
from shira_runtime.quantization import QuantLinear, quantize
from shira_runtime.synthetic import random_lora, random_shira

from benchmarks.baselines import RequantLora, RequantSwitch, code_bytes
from benchmarks.common import Steps, copy_bandwidth_gbps, memory_floor_ms, progress, step, touched_lines
from benchmarks.switch_onnx import export_bundles, onnx_rows, onnx_unavailable
from benchmarks.switch_peft import peft_rows, peft_unavailable
from benchmarks.switch_report import package_version, plot, report
from benchmarks.switch_rows import Config, Row, consistency, inputs, load_model, measure, pair, prompt, subject
from benchmarks.timing import Subject, cycle, once


def shira_adapters(cfg: Config, model, mask: str, calibration: torch.Tensor | None, line_dtype=None):
    """Adapters A and B: the user's, or random ones with ``mask``'s positions (``grad``/``snip``: gradients
    of one calibration batch of random tokens). ``line_dtype``: a block is a 64-byte line of the base it is
    switched on (64 codes of a quantized base made on the fp32 model; None: the model's own weights)."""
    batch = calibration if mask in ("grad", "snip") else None
    if batch is not None:
        progress(f"{mask} masks: one forward/backward on a calibration batch of random tokens")
    return pair(
        cfg.shira,
        lambda k: random_shira(model, cfg.targets, cfg.density, seed=cfg.seed + k, mask=mask, batch=batch,
                               line_dtype=line_dtype if mask == "block" else None),  # fmt: skip
    )


def shira_rows(cfg: Config, rt: Runtime, model, dtype: str, copy_gbps: float, ctx: dict, mask: str) -> list[Row]:
    """Switch rows of one mask kind (both kernel paths). The first mask's adapters stay registered as ``shira_a``
    and ``shira_b`` for the inference rounds, and serve the onnxruntime and PEFT rows (``ctx``)."""
    first = "shira_a" not in ctx
    if mask in ctx.get("made", {}):  # a quantized base: made on the fp32 model before quantizing
        a, b, origin = ctx["made"][mask]
    else:
        progress(f"{dtype}: making two SHiRA adapters, {mask} masks, density {cfg.density}")
        a, b, origin = shira_adapters(cfg, model, mask, ctx.get("calibration"))
    mask = mask if origin == "random" else "user"
    names = ("shira_a", "shira_b") if first else (f"shira_{mask}_a", f"shira_{mask}_b")
    rt.add_adapter(names[0], a)
    rt.add_adapter(names[1], b)
    tensors = rt.backend.tensors
    nbytes, streams = 0, 0
    touched: dict[str, list[torch.Tensor]] = {}  # tensor -> the indices of A and of B
    for ad in (a, b):
        for n in ad.indices:
            t = rt.backend.canonical(n, "benchmark")
            idx, _ = ad.flat(n, rt.backend.shapes[t])
            touched.setdefault(t, []).append(idx.long())
            size = tensors[t].element_size()
            nbytes += idx.numel() * size
            # a switch into `ad` writes its saved values and reads its fp32 deltas and int32 indices; the
            # switch out of it reads the saved values and the indices again
            streams += idx.numel() * (2 * size + 4 + 2 * 4)
    # a switch A -> B reads and writes every line that A or B touches, once (the fused plan restores A and
    # applies B range by range): the union, not the sum (they differ where the masks share lines: wm, struct)
    lines = sum(
        touched_lines(torch.cat(ix).unique(), tensors[t].element_size(), tensors[t].data_ptr() % 64)
        for t, ix in touched.items()
    )
    # an FP8 layer's bf16 compute copy is written beside its codes (the kernels' mirror): its lines and bytes too
    for t, ix in touched.items():
        mirror = rt.backend.mirror(t)
        if mirror is not None:
            lines += touched_lines(torch.cat(ix).unique(), 2, mirror.data_ptr() % 64)
            nbytes += sum(i.numel() for i in ix) * 2
    floor = memory_floor_ms(lines, copy_gbps)
    streams_floor = floor + streams / 2 / (copy_gbps * 1e9) * 1e3  # per switch: half of the A->B->A cycle
    if first:
        ctx.update(shira_a=a, shira_b=b, floor=floor, shira_bytes=nbytes, shira_mask=mask, copy_gbps=copy_gbps)
    rows = []
    paths = [kernels.backend()] + (["torch"] if kernels.backend() != "torch" else [])
    for path in paths:
        os.environ["SHIRA_KERNELS"] = path
        kernels.reset()
        progress(f"{dtype}: shira switch A -> B, {mask} masks ({path} kernels), {cfg.repeats} repeats")
        t = cycle([lambda: rt.switch(names[0]), lambda: rt.switch(names[1])], cfg.repeats)
        label = ("fast path" if path == "cpp" else "pure-torch reference") + f", {origin} adapters"
        row = Row.of("shira", f"torch/{path}", dtype, t, nbytes, label, None, floor)
        rows.append(replace(row, mask=mask, streams_floor_ms=streams_floor))
    os.environ.pop("SHIRA_KERNELS", None)
    kernels.reset()
    rt.switch(None)
    if not first:
        for n in names:
            rt.remove_adapter(n)
    return rows


def lora_pair(cfg: Config, model):
    return pair(cfg.lora, lambda k: random_lora(model, cfg.targets, cfg.rank, seed=cfg.seed + 2 + k))


def lora_requant_rows(cfg: Config, rt: Runtime, model, dtype: str, la, lb, names: list[str]) -> tuple[Row, tuple]:
    """Fused LoRA on a quantized base, the PEFT way (the runtime refuses it): timed by the same ``cycle``; and
    its subject for the inference rounds (entering merges A, leaving unmerges it: the requantizations drift,
    the caller puts the base's bytes back)."""
    req = RequantLora(model, names)
    # a switch unmerges A and merges B: every code and scale of the targets written twice
    nbytes = 2 * sum(m.weight.numel() + m.weight_scale.numel() * 4 for m in req.layers)
    reps = max(3, cfg.repeats // 4)
    progress(f"{dtype}: lora fused the PEFT way (dequantize, merge, requantize; drifts), {reps} repeats")
    sw = RequantSwitch(req, {"a": la, "b": lb})
    sw.switch("a")
    t = cycle([lambda: sw.switch("b"), lambda: sw.switch("a")], reps)
    sw.switch(None)
    note = "PEFT way: dequantize, merge, requantize (new scales); not exact"
    row = Row.of("lora_fused", "torch/requantize", dtype, t, nbytes, note)
    return row, (lambda: sw.switch("a"), lambda: sw.switch(None))


def restore_codes(model, snapshot: dict[str, torch.Tensor]) -> None:
    """The base's code and scale bytes back (the PEFT way's requantize round trips drifted)."""
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.weight.view(torch.uint8).view(-1).copy_(snapshot[f"{n}.weight"])
            m.weight_scale.view(torch.uint8).view(-1).copy_(snapshot[f"{n}.weight_scale"])
            m.refresh_rows()


def lora_rows(cfg: Config, rt: Runtime, model, dtype: str, ctx: dict) -> list[Row]:
    """The LoRA switch rows (fused: PEFT-style and the runtime's exact switch, or the PEFT way on a quantized
    base; unfused); ``lora_a`` (fused) and ``lora_ua`` (unfused) stay registered for the inference rounds, and
    ``ctx["lora_requant"]`` holds how to enter and leave the fused state of a quantized base."""
    la, lb, _ = ctx.pop("lora_made") if "lora_made" in ctx else lora_pair(cfg, model)
    ctx.update(lora_a=la, lora_b=lb)
    if la.fan_in_fan_out or set(la.A) != set(lb.A):
        raise SystemExit("--lora: the two adapters must target the same nn.Linear weights (no fan_in_fan_out)")
    names = list(la.A)
    weights = [rt.backend.tensors[n] for n in names]
    nbytes = 2 * sum(w.numel() * w.element_size() for w in weights)
    reps = max(3, cfg.repeats // 4)
    if dtype in FORMATS:
        row, ctx["lora_requant"] = lora_requant_rows(cfg, rt, model, dtype, la, lb, names)
        return [row, lora_unfused_row(cfg, rt, dtype, la, lb)]

    # (1) PEFT-style: unmerge A then merge B in place (W -= s B_a A_a; W += s B_b A_b), fp32 math
    def unmerge_merge(old, new):
        def run():
            for n, w in zip(names, weights):
                if w.dtype == torch.float32:
                    w.addmm_(old.B[n], old.A[n], alpha=-old.scaling[n])
                    w.addmm_(new.B[n], new.A[n], alpha=new.scaling[n])
                else:
                    d = torch.addmm(w.float(), old.B[n], old.A[n], alpha=-old.scaling[n])
                    w.copy_(d.addmm_(new.B[n], new.A[n], alpha=new.scaling[n]))

        return run

    progress(f"{dtype}: lora fused, in-place unmerge/merge (drifts), {reps} repeats")
    snapshot = [w.clone() for w in weights]
    for n, w in zip(names, weights):  # start with A merged
        w.copy_(torch.addmm(w.float(), la.B[n], la.A[n], alpha=la.scaling[n]).to(w.dtype))
    t = cycle([unmerge_merge(la, lb), unmerge_merge(lb, la)], reps)
    rows = [Row.of("lora_fused", "torch/unmerge-merge", dtype, t, nbytes, "PEFT-style, not exact")]
    for w, s in zip(weights, snapshot):
        w.copy_(s)
    del snapshot

    # (2) the runtime's exact fused LoRA switch: restore the saved base copy, merge B (the same fused weights
    # as the PEFT-style row: one inference measurement serves both)
    rt.add_adapter("lora_a", la)
    rt.add_adapter("lora_b", lb)
    progress(f"{dtype}: lora fused, runtime exact switch, {reps} repeats")
    t = cycle([lambda: rt.switch("lora_a"), lambda: rt.switch("lora_b")], reps)
    rt.switch(None)
    rt.remove_adapter("lora_b")
    rows.append(Row.of("lora_fused", "torch/runtime-exact", dtype, t, nbytes, "exact revert, keeps a base copy"))
    return [*rows, lora_unfused_row(cfg, rt, dtype, la, lb)]


def lora_unfused_row(cfg: Config, rt: Runtime, dtype: str, la, lb) -> Row:
    """(3) unfused: switching swaps the extra x @ A.T @ B.T * s paths; weights untouched, inference pays."""
    rt.add_adapter("lora_ua", la, mode="unfused")
    rt.add_adapter("lora_ub", lb, mode="unfused")
    progress(f"{dtype}: lora unfused, {cfg.repeats} repeats")
    t = cycle([lambda: rt.switch("lora_ua"), lambda: rt.switch("lora_ub")], cfg.repeats)
    rt.switch(None)
    rt.remove_adapter("lora_ub")
    return Row.of("lora_unfused", "torch/hooks", dtype, t, 0, "extra matmuls at inference")


def torch_subjects(rt: Runtime, ctx: dict) -> list[Subject]:
    """The states the torch rows' inference rounds visit, the base first: SHiRA A, fused LoRA A, unfused LoRA A."""

    def to(name: str | None):
        return lambda: rt.switch(name)

    ids = ctx["prompt"]
    requant = ctx.get("lora_requant")  # a quantized base: the PEFT way's merge (generation runs through rt)
    return [
        subject("base", rt, ids, to(None)),
        subject("shira", rt, ids, to("shira_a")),
        subject("lora_fused", rt, ids, *requant) if requant else subject("lora_fused", rt, ids, to("lora_a")),
        subject("lora_unfused", rt, ids, to("lora_ua")),
    ]


def quantized_skips(cfg: Config, dtype: str) -> list[str]:
    """The rows a quantized base does not get, and why (the onnxruntime rows: ``onnx_unavailable``)."""
    peft = "--no-peft given" if cfg.no_peft else "PEFT cannot merge into the runtime's QuantLinear"
    return [
        f"peft rows for {dtype}: {peft}",
        f"lora_fused torch/runtime-exact for {dtype}: the runtime refuses fused LoRA on quantized weights "
        "(every code and scale would change); the torch/requantize row is PEFT's way instead",
    ]


TIMES = """how long a run takes (2 shared vCPUs, AMD EPYC, torch + onnxruntime + PEFT rows):
  (no flags)           the medium preset (94M parameters), fp32: 2-2.5 min, 1.5-2 GB peak RSS (measured)
  --quick              the tiny preset: ~20 s, 0.6 GB (measured; most of it the two onnx exports)
  --preset llama-1b    Llama-3.2-1B shapes: ~15 min, ~21 GB peak RSS (earlier runs; needs a 24 GB machine)
  --hf DIR             a transformers model directory: its size decides (135M parameters: about the default)
"""


def torch_rows(cfg: Config, model, dtype: str, copy_gbps: float, ctx: dict, noise: dict) -> list[Row]:
    """Every torch row of ``dtype``: the switch cycles of each method, then their inference and generation in
    interleaved rounds with the base's."""
    quantized = dtype in FORMATS
    rt = Runtime.load(model)
    if cfg.huge_pages:
        step(f"{dtype}: the weights onto huge pages")
        progress(f"{dtype}: {rt.huge_pages() / 2**20:.0f} MB of weights on huge pages")
    rows = [Row.of("base", "torch", dtype, None, 0, "quantized base, no adapter" if quantized else "no adapter")]
    for mask in cfg.masks if not cfg.shira else cfg.masks[:1]:
        step(f"{dtype}: SHiRA switches, {mask} masks")
        rows += shira_rows(cfg, rt, model, dtype, copy_gbps, ctx, mask)
        gc.collect()
    step(f"{dtype}: LoRA switches")
    snapshot = code_bytes(model) if quantized else None
    rows += lora_rows(cfg, rt, model, dtype, ctx)
    step(f"{dtype}: torch inference and generation, {cfg.infer_repeats} interleaved rounds")
    one, batch = inputs(cfg, ctx["vocab"])
    measured, noise["torch"] = measure(cfg, torch_subjects(rt, ctx), one, batch, "torch")
    rt.switch(None)
    if snapshot is not None:
        restore_codes(model, snapshot)
    first = rows[1].mask if len(rows) > 1 else None  # the first mask's SHiRA rows are the ones measured
    rows = [r.with_measured(measured.get(r.method)) if r.mask in (None, first) else r for r in rows]
    rows[0] = replace(rows[0], infer_overhead=1.0)
    del rt
    gc.collect()
    return rows


def run(cfg: Config) -> dict:
    rows: list[Row] = []
    skipped: list[str] = []
    noise: dict[str, dict] = {}
    live_vs_prepacked: dict = {}
    with Steps(phases(cfg), "switch_latency"):
        step(f"measuring copy bandwidth; kernels: {kernels.backend()}")
        copy_gbps = copy_bandwidth_gbps(128 << 20)
        for dtype in cfg.dtypes:
            quantized = dtype in FORMATS
            step(f"{dtype}: building {cfg.hf or cfg.preset}")
            model, vocab = load_model(cfg, "fp32" if quantized else dtype)
            ctx: dict = {"vocab": vocab, "prompt": prompt(cfg, vocab)}
            if any(m in ("grad", "snip") for m in cfg.masks):
                gen = torch.Generator().manual_seed(cfg.seed)
                ctx["calibration"] = torch.randint(0, vocab, (2, 32), generator=gen)
            if quantized:  # the random adapters address nn.Linear weights: made on the fp32 model, then quantize
                masks = cfg.masks if not cfg.shira else cfg.masks[:1]
                progress(f"{dtype}: making the SHiRA adapters ({', '.join(masks)} masks) and LoRA on the fp32 model")
                # blocks of 64 one-byte codes: a line of the quantized base (16 fp32 elements would be a quarter)
                ctx["made"] = {m: shira_adapters(cfg, model, m, ctx.get("calibration"), torch.int8) for m in masks}
                ctx["lora_made"] = lora_pair(cfg, model)
                progress(f"{dtype}: quantizing every linear but the LM head")
                quantize(model, dtype)
            dnoise = noise.setdefault(dtype, {})
            rows += torch_rows(cfg, model, dtype, copy_gbps, ctx, dnoise)
            if quantized:
                skipped += quantized_skips(cfg, dtype)
            why = onnx_unavailable(cfg, dtype)
            if why:
                skipped.append(f"onnxruntime rows for {dtype}: {why}")
            else:
                with tempfile.TemporaryDirectory(prefix="switch_latency_") as tmp:
                    step(f"{dtype}: exporting the bundles (onnxruntime rows)")
                    export_bundles(model, dtype, ctx, Path(tmp))
                    del model  # the onnxruntime rows hold two bundles and a rebuilt session: free the torch copy
                    gc.collect()
                    rows += onnx_rows(cfg, dtype, ctx, Path(tmp), dnoise)
                if "live_vs_prepacked" in ctx:
                    live_vs_prepacked[dtype] = ctx["live_vs_prepacked"]
                if quantized:
                    skipped.append(
                        f"lora_fused onnxruntime/rebuild for {dtype}: the runtime refuses fused LoRA on quantized "
                        "weights; the torch/requantize row is PEFT's way"
                    )
                else:
                    model, _ = load_model(cfg, dtype)  # the same weights again (seeded, or the same directory)
            if quantized:
                model = ctx = None
                gc.collect()
                continue
            why = peft_unavailable(cfg, model)
            if why:
                skipped.append(f"peft rows for {dtype}: {why}")
            else:
                step(f"{dtype}: PEFT's own switches")
                rows += peft_rows(cfg, model, dtype, ctx)  # last: PEFT wraps the model in place
            del model, ctx
            gc.collect()
        # a shared machine's bandwidth can move during a run (a 2-vCPU EPYC read 45-91 GB/s within an hour): every
        # floor at the better of the two readings, since a floor is a lower bound on time
        readings = [copy_gbps, copy_bandwidth_gbps(128 << 20)]
        progress(f"copy bandwidth at the end {readings[1]:.1f} GB/s (at the start {readings[0]:.1f})")
        copy_gbps = max(readings)
        rows = [at_bandwidth(r, readings[0] / copy_gbps) for r in rows]
    return {
        "config": asdict(cfg),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": OMP_WAIT_POLICY,
            "kernels": kernels.backend(),
            "onnxruntime": package_version("onnxruntime"),
        },
        "copy_gbps": copy_gbps,
        "copy_readings": readings,
        "skipped": skipped,
        "results": [
            asdict(r) | {"floor_ratio": r.floor_ratio, "streams_floor_ratio": r.streams_floor_ratio} for r in rows
        ],
        "noise": noise,
        "consistency": consistency(rows, noise),
        # live / default prepacked onnxruntime session of the same graph: the first dtype's, and each dtype's
        "live_vs_prepacked": next(({"dtype": k, **v} for k, v in live_vs_prepacked.items()), None),
        "live_vs_prepacked_by_dtype": live_vs_prepacked,
    }


def at_bandwidth(row: Row, factor: float) -> Row:
    """``row`` with its floors times ``factor`` (the ratio of two bandwidths: a floor scales as its inverse)."""
    scaled = {k: getattr(row, k) * factor for k in ("floor_ms", "streams_floor_ms") if getattr(row, k)}
    return replace(row, **scaled) if scaled else row


def phases(cfg: Config) -> int:
    """How many ``step``s ``run`` takes (the progress bar's length)."""
    n = 1
    for dtype in cfg.dtypes:
        n += 1 + len(cfg.masks if not cfg.shira else cfg.masks[:1]) + 2 + cfg.huge_pages
        n += 0 if cfg.no_onnx or onnx_unavailable(cfg, dtype) else 4
        n += 0 if cfg.no_peft or dtype in FORMATS else 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.switch_latency",
        description=__doc__.split("\n")[0],
        epilog=TIMES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="medium", choices=sorted(PRESETS), help="model shapes (default: %(default)s)")
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["fp32"],
        choices=sorted(SHORT) + list(FORMATS),
        help="weight dtypes; int8 / fp8_e4m3 / fp8_e5m2: the fp32 model quantized (shira_runtime.quantization)",
    )
    p.add_argument("--density", type=float, default=0.01, help="SHiRA nonzeros per weight (default: %(default)s)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="switches timed per method (LoRA fused: a quarter)")
    p.add_argument(
        "--infer-repeats",
        type=int,
        default=5,
        help="interleaved rounds of inference and generation, every method once per round (default: %(default)s)",
    )
    p.add_argument("--tokens", type=int, default=64, help="tokens in the batched inference and the prompt")
    p.add_argument("--quick", action="store_true", help="tiny preset, few repeats and tokens: seconds")
    p.add_argument("--hf", metavar="DIR", help="a transformers causal-LM directory instead of --preset")
    p.add_argument("--shira", nargs="+", default=[], metavar="PATH", help="your SHiRA adapters (A, B)")
    p.add_argument("--lora", nargs="+", default=[], metavar="PATH", help="your LoRA adapters (A, B)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), help="module names for random adapters")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    p.add_argument("--no-peft", action="store_true", help="skip the rows timing PEFT's own switch")
    p.add_argument("--new-tokens", type=int, default=16, help="decode tokens timed after the first (default: 16)")
    p.add_argument("--gen-repeats", type=int, default=3, help="generations timed per PEFT row (default: 3)")
    p.add_argument(
        "--mask",
        nargs="+",
        default=["rand", "block"],
        choices=list(KINDS),
        help="mask kinds of the random SHiRA adapters, one pair of switch rows each (grad/snip: a calibration "
        "pass on random tokens); the first also runs the inference, onnxruntime and PEFT rows",
    )
    p.add_argument("--huge-pages", action="store_true",
                   help="the torch rows' weights on transparent huge pages first (Runtime.huge_pages; Linux)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: switch latency (log) and inference overhead")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.repeats, args.infer_repeats = "tiny", min(args.repeats, 8), min(args.infer_repeats, 3)
        args.new_tokens, args.gen_repeats = min(args.new_tokens, 8), min(args.gen_repeats, 2)
    cfg = Config(
        args.preset,
        tuple(args.dtype),
        args.density,
        args.rank,
        args.repeats,
        args.infer_repeats,
        args.tokens,
        hf=args.hf,
        shira=tuple(args.shira),
        lora=tuple(args.lora),
        targets=tuple(args.targets),
        no_onnx=args.no_onnx,
        new_tokens=args.new_tokens,
        gen_repeats=args.gen_repeats,
        no_peft=args.no_peft,
        masks=tuple(dict.fromkeys(args.mask)),
        huge_pages=args.huge_pages,
    )
    out, elapsed_ms = once(lambda: run(cfg))
    out["elapsed_s"] = elapsed_ms / 1e3
    report(out)
    command = " ".join(["python -m benchmarks.switch_latency", *(argv if argv is not None else sys.argv[1:])])
    print(f"measured in {out['elapsed_s'] / 60:.1f} min by: {command}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(out, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
