"""Switch latency: SHiRA (sparse scatter) against LoRA fused and LoRA unfused, on one model, in one run.

    python -m benchmarks.switch_latency                  # llama-1b shapes, fp32
    python -m benchmarks.switch_latency --quick          # tiny preset, few repeats
    python -m benchmarks.switch_latency --dtype fp32 bf16 --json out.json --plot out.png

Every figure is measured in this run: switch medians (and p90) over A -> B -> A cycles, first call excluded;
inference medians at 1 token and at a batch of tokens, with whatever the method leaves active, against the base.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import kernels
from benchmarks.common import (
    Timing,
    copy_bandwidth_gbps,
    cycle,
    memory_floor_ms,
    progress,
    rss_mb,
    touched_lines,
)
from benchmarks.switch_report import package_version, plot, report
from runtime import Runtime, load_adapter
from runtime.models import PRESETS, TARGETS, build
from runtime.synthetic import random_lora, random_shira

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Config:
    preset: str
    dtypes: tuple[str, ...]
    density: float
    rank: int
    repeats: int
    infer_repeats: int
    tokens: int = 64
    seed: int = 0
    hf: str | None = None  # a transformers model directory instead of a preset
    shira: tuple[str, ...] = ()  # user adapters (PEFT dirs or our files) instead of random ones
    lora: tuple[str, ...] = ()
    targets: tuple[str, ...] = TARGETS
    no_onnx: bool = False


@dataclass
class Row:
    method: str
    backend: str
    dtype: str
    switch_ms: float
    switch_p90_ms: float
    floor_ms: float | None
    rss_mb: float
    bytes_written: int
    note: str = ""
    infer_ms: float | None = None  # a batch of cfg.tokens tokens
    infer_b1_ms: float | None = None  # one token
    infer_overhead: float | None = None  # infer_ms / the base's infer_ms (1.0 = none)

    @property
    def floor_ratio(self) -> float | None:
        return self.switch_ms / self.floor_ms if self.floor_ms else None


def make_row(method, backend, dtype, switch_ms, p90_ms, floor_ms, nbytes, note, b1_ms, infer_ms, overhead) -> Row:
    return Row(method, backend, dtype, switch_ms, p90_ms, floor_ms, rss_mb(), nbytes, note, infer_ms, b1_ms, overhead)


def _switch_cols(t: Timing, nbytes: int, floor_ms: float | None = None) -> tuple:
    """The switch columns of a ``Row``: median, p90, floor, peak RSS, bytes written."""
    return t.median_ms, t.p90_ms, floor_ms, rss_mb(), nbytes


def onnx_unavailable(cfg: Config, dtype: str) -> str | None:
    """Why the onnxruntime rows cannot run for ``dtype`` (None: they can)."""
    from benchmarks.switch_onnx import ONNX_DTYPES

    if cfg.no_onnx:
        return "--no-onnx given"
    if dtype not in ONNX_DTYPES:
        return f"the exporter writes {'/'.join(ONNX_DTYPES)} only (onnxruntime's CPU kernels lack {dtype})"
    if cfg.hf:
        return "--hf models run on the torch backend only in this benchmark"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -e '.[onnx]'"
    return None


class Inference:
    """Inference timings (one token, and a batch of ``tokens`` tokens, full-sequence forward) against the base.

    A method's timings interleave with the base's, round by round (the switch between them is not timed), so a
    slow spell of a noisy machine hits both alike; ``infer_overhead`` is the ratio of the two medians.
    """

    def __init__(self, cfg: Config, rt, vocab: int, numpy: bool = False) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        self.rt, self.repeats = rt, cfg.infer_repeats
        self.one = torch.randint(0, vocab, (1, 1), generator=gen)
        self.batch = torch.randint(0, vocab, (max(1, cfg.tokens // 16), min(16, cfg.tokens)), generator=gen)
        if numpy:
            self.one, self.batch = self.one.numpy(), self.batch.numpy()

    def _once(self, fn, x) -> float:
        t0 = time.perf_counter()
        fn(x)
        return (time.perf_counter() - t0) * 1e3

    def measure(self, row: Row, state=None, run=None, rounds: int | None = None) -> Row:
        """Time ``run`` (default: the runtime) with ``state`` switched in, against the base, in ``rounds``.

        Each round times ``repeats // rounds`` runs of the base, switches, then as many of the method. The
        default is one run per round (fully interleaved); a method whose switch moves gigabytes (fused LoRA)
        takes one round, because that traffic, untimed, still slows the runs right after it.
        """
        run = run or self.rt
        rounds = rounds or self.repeats
        per = max(1, self.repeats // rounds)
        base1, baset, one, batch = [], [], [], []
        for _ in range(rounds):
            for fn, into1, intot, target in ((self.rt, base1, baset, None), (run, one, batch, state)):
                if state is not None:
                    self.rt.switch(target)
                self._once(fn, self.one)  # untimed: the first run after a switch pays for cold caches
                for _ in range(per):
                    into1.append(self._once(fn, self.one))
                    intot.append(self._once(fn, self.batch))
        row.infer_b1_ms, row.infer_ms = Timing.of(one).median_ms, Timing.of(batch).median_ms
        row.infer_overhead = row.infer_ms / Timing.of(baset).median_ms
        if state is not None:
            self.rt.switch(None)
        return row


def load_model(cfg: Config, dtype: str) -> tuple[torch.nn.Module, int]:
    """The model and its vocabulary size: a built-in preset, or a transformers directory (``--hf``)."""
    if cfg.hf:
        from runtime.models import load_base

        model = load_base(cfg.hf, DTYPES[dtype])
        return model, int(model.config.vocab_size)
    model = build(cfg.preset, DTYPES[dtype], seed=cfg.seed)
    return model, model.config.vocab


def pair(paths: tuple[str, ...], make: Callable[[int], object]) -> tuple[object, object, str]:
    """Adapters A and B: the user's (the first two; one is switched against itself), or two random ones."""
    if not paths:
        return make(1), make(2), "random"
    a = load_adapter(paths[0])
    b = load_adapter(paths[1]) if len(paths) > 1 else a
    return a, b, "user" if len(paths) > 1 else "user, A -> A"


def shira_rows(cfg: Config, rt: Runtime, model, dtype: str, copy_gbps: float, infer: Inference, ctx: dict) -> list[Row]:
    a, b, origin = pair(cfg.shira, lambda k: random_shira(model, cfg.targets, cfg.density, seed=cfg.seed + k))
    rt.add_adapter("shira_a", a)
    rt.add_adapter("shira_b", b)
    tensors = rt.backend.tensors
    lines, nbytes = 0, 0
    for ad in (a, b):
        for n in ad.indices:
            t = rt.backend.canonical(n, "benchmark")
            idx, _ = ad.flat(n, rt.backend.shapes[t])
            lines += touched_lines(idx, tensors[t].element_size(), tensors[t].data_ptr() % 64)
            nbytes += idx.numel() * tensors[t].element_size()
    floor = memory_floor_ms(lines, copy_gbps)
    ctx.update(shira_a=a, shira_b=b, floor=floor, shira_bytes=nbytes)
    rows = []
    paths = [kernels.backend()] + (["torch"] if kernels.backend() != "torch" else [])
    for path in paths:
        os.environ["SHIRA_KERNELS"] = path
        kernels.reset()
        progress(f"{dtype}: shira switch A -> B ({path} kernels), {cfg.repeats} repeats")
        t = cycle([lambda: rt.switch("shira_a"), lambda: rt.switch("shira_b")], cfg.repeats)
        label = ("fast path" if path == "cpp" else "pure-torch reference") + f", {origin} adapters"
        rows.append(Row("shira", f"torch/{path}", dtype, *_switch_cols(t, nbytes, floor), label))
    os.environ.pop("SHIRA_KERNELS", None)
    kernels.reset()
    progress(f"{dtype}: inference with shira_a applied, interleaved with the base")
    infer.measure(rows[0], "shira_a")
    for r in rows[1:]:  # same weights, same code path: one measurement serves every kernel path
        r.infer_b1_ms, r.infer_ms, r.infer_overhead = rows[0].infer_b1_ms, rows[0].infer_ms, rows[0].infer_overhead
    rt.switch(None)
    rt.remove_adapter("shira_a")
    rt.remove_adapter("shira_b")
    return rows


def lora_rows(cfg: Config, rt: Runtime, model, dtype: str, infer: Inference, ctx: dict) -> list[Row]:
    la, lb, _ = pair(cfg.lora, lambda k: random_lora(model, cfg.targets, cfg.rank, seed=cfg.seed + 2 + k))
    ctx.update(lora_a=la, lora_b=lb)
    if la.fan_in_fan_out or set(la.A) != set(lb.A):
        raise SystemExit("--lora: the two adapters must target the same nn.Linear weights (no fan_in_fan_out)")
    names = list(la.A)
    weights = [rt.backend.tensors[n] for n in names]
    nbytes = 2 * sum(w.numel() * w.element_size() for w in weights)
    reps = max(3, cfg.repeats // 4)
    rows = []

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
    rows.append(Row("lora_fused", "torch/unmerge-merge", dtype, *_switch_cols(t, nbytes), "PEFT-style, not exact"))
    for w, s in zip(weights, snapshot):
        w.copy_(s)
    del snapshot

    # (2) the runtime's exact fused LoRA switch: restore the saved base copy, merge B
    rt.add_adapter("lora_a", la)
    rt.add_adapter("lora_b", lb)
    progress(f"{dtype}: lora fused, runtime exact switch, {reps} repeats")
    t = cycle([lambda: rt.switch("lora_a"), lambda: rt.switch("lora_b")], reps)
    row = Row("lora_fused", "torch/runtime-exact", dtype, *_switch_cols(t, nbytes), "exact revert, keeps a base copy")
    rows.append(infer.measure(row, "lora_a", rounds=1))
    rows[0].infer_b1_ms, rows[0].infer_ms, rows[0].infer_overhead = row.infer_b1_ms, row.infer_ms, row.infer_overhead

    # (3) unfused: switching swaps the extra x @ A.T @ B.T * s paths; weights untouched, inference pays
    rt.add_adapter("lora_ua", la, mode="unfused")
    rt.add_adapter("lora_ub", lb, mode="unfused")
    progress(f"{dtype}: lora unfused, {cfg.repeats} repeats")
    t = cycle([lambda: rt.switch("lora_ua"), lambda: rt.switch("lora_ub")], cfg.repeats)
    row = Row("lora_unfused", "torch/hooks", dtype, *_switch_cols(t, 0), "extra matmuls at inference")
    rows.append(infer.measure(row, "lora_ua"))
    for n in ("lora_a", "lora_b", "lora_ua", "lora_ub"):
        rt.remove_adapter(n)
    return rows


def run(cfg: Config) -> dict:
    progress(f"measuring copy bandwidth; kernels: {kernels.backend()}")
    copy_gbps = copy_bandwidth_gbps()
    rows: list[Row] = []
    skipped: list[str] = []
    for dtype in cfg.dtypes:
        progress(f"building {cfg.hf or cfg.preset} in {dtype}")
        model, vocab = load_model(cfg, dtype)
        rt = Runtime.load(model)
        infer = Inference(cfg, rt, vocab)
        progress(f"{dtype}: base inference, {cfg.infer_repeats} repeats")
        base = infer.measure(Row("base", "torch", dtype, 0.0, 0.0, None, rss_mb(), 0, "no adapter"))
        base.infer_overhead = 1.0  # by definition; the rows below are timed interleaved with it
        rows.append(base)
        ctx: dict = {"vocab": vocab}
        rows += shira_rows(cfg, rt, model, dtype, copy_gbps, infer, ctx)
        rows += lora_rows(cfg, rt, model, dtype, infer, ctx)
        del rt, infer
        gc.collect()
        why = onnx_unavailable(cfg, dtype)
        if why:
            skipped.append(f"onnxruntime rows for {dtype}: {why}")
        else:
            from benchmarks.switch_onnx import onnx_rows

            with tempfile.TemporaryDirectory(prefix="switch_latency_") as tmp:
                rows += onnx_rows(cfg, model, dtype, ctx, ctx["floor"], Path(tmp), make_row)
        del model, ctx
        gc.collect()
    return {
        "config": asdict(cfg),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "kernels": kernels.backend(),
            "onnxruntime": package_version("onnxruntime"),
        },
        "copy_gbps": copy_gbps,
        "skipped": skipped,
        "results": [asdict(r) | {"floor_ratio": r.floor_ratio} for r in rows],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.switch_latency", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20, help="switches timed per method (LoRA fused: a quarter)")
    p.add_argument("--infer-repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64, help="tokens in the batched inference")
    p.add_argument("--quick", action="store_true", help="tiny preset, few repeats (well under a minute)")
    p.add_argument("--hf", metavar="DIR", help="a transformers causal-LM directory instead of --preset")
    p.add_argument("--shira", nargs="+", default=[], metavar="PATH", help="your SHiRA adapters (A, B)")
    p.add_argument("--lora", nargs="+", default=[], metavar="PATH", help="your LoRA adapters (A, B)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), help="module names for random adapters")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: switch latency (log) and inference overhead")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.repeats, args.infer_repeats = "tiny", min(args.repeats, 8), min(args.infer_repeats, 3)
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
    )
    t0 = time.perf_counter()
    out = run(cfg)
    out["elapsed_s"] = time.perf_counter() - t0
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
