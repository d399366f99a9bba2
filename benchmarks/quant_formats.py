"""8-bit formats for weights, after Kuzmin et al. 2022 (arXiv 2208.09225), on our own numbers; and how fast a
quantized linear runs on this CPU.

    python -m benchmarks.quant_formats                  # llama-1b shapes
    python -m benchmarks.quant_formats --quick          # small shapes, few repeats
    python -m benchmarks.quant_formats --plot sqnr.png --json out.json

Part 1, formats: weight tensors of llama-1b shapes drawn from distributions of increasing outlier weight
(Gaussian; Student-t with 30, 10, 5, 3 degrees of freedom; Gaussian with 0.1% of the entries planted at 8, 20,
50 sigma), quantized with per-output-channel scales (``amax / max``: the scale plays the exponent bias) to INT8,
FP8 E5M2 and E4M3 (torch's dtypes) and the simulated E3M4 and E2M5 grids (``shira_runtime.kernels.qformats``).
Printed: the
SQNR (dB) of each format, the best one, and what ``quantize(..., "auto")`` picks (among int8/E4M3/E5M2).

Part 2, speed: one llama-1b-shape linear, every candidate path for 8-bit weights on the CPU at 1 and 64 tokens
(and 256 for the int8 crossover), interleaved rounds, medians, against the fp32 and bf16 base in the same run:
``torch._weight_int8pack_mm`` (bf16 or fp32 activations), dequantize + GEMM, fbgemm's dynamic int8 linear (a
prepacked copy), ``torch._int_mm``, ``torch._scaled_mm`` on FP8, an FP8 bf16 compute copy, and ``QuantLinear``
itself (the path ``shira_runtime.quantization`` chose per format and token count).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from shira_runtime.kernels.qformats import AUTO_CANDIDATES, choose_format, fake_quant, sqnr_db
from shira_runtime.quantization import BF16_GEMM, QuantLinear, int8mm_max_tokens
from shira_runtime.table import print_table

from benchmarks.common import progress
from benchmarks.timing import Timing, cycles, once

FORMATS = ("int8", "e2m5", "e3m4", "fp8_e4m3", "fp8_e5m2")  # by exponent bits: 0 (int), 2, 3, 4, 5
DISTS = ("gauss", "t30", "t10", "t5", "t3", "gauss+8sd", "gauss+20sd", "gauss+50sd")
LLAMA_SHAPES = ((2048, 2048), (8192, 2048), (2048, 8192))  # [out, in]: q/o, gate/up, down
QUICK_SHAPES = ((256, 512),)
OUTLIER_RATE = 1e-3


@dataclass(frozen=True)
class Config:
    shapes: tuple[tuple[int, int], ...]
    dists: tuple[str, ...]
    speed_shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    repeats: int
    slow: bool  # time the emulated/slow candidates too (_scaled_mm, _int_mm, fp32 int8mm)
    seed: int


@dataclass(frozen=True)
class FormatRow:
    shape: str
    dist: str
    kurtosis: float  # excess kurtosis of the tensor: how heavy its tails are
    sqnr_db: dict[str, float]
    best: str
    auto: str


@dataclass(frozen=True)
class SpeedRow:
    shape: str
    tokens: int
    path: str
    median_ms: float
    p90_ms: float
    vs_fp32: float  # median / the fp32 base's median, same rounds
    vs_bf16: float
    extra_bytes_per_weight: float  # memory besides the 1-byte codes (a compute or packed copy)


def sample(dist: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A weight of ``shape`` from ``dist`` (unit scale times 0.02, like an initialised linear)."""
    rng = np.random.default_rng(seed)
    if dist.startswith("t"):
        w = rng.standard_t(int(dist[1:]), size=shape)
    else:
        w = rng.standard_normal(shape)
        if "+" in dist:
            k = float(dist.split("+")[1].removesuffix("sd"))
            hit = rng.random(shape) < OUTLIER_RATE
            w[hit] = k * np.sign(rng.standard_normal(int(hit.sum())))
    return torch.from_numpy((0.02 * w).astype(np.float32))


def excess_kurtosis(w: torch.Tensor) -> float:
    x = w.double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2 - 3)


def format_rows(cfg: Config) -> list[FormatRow]:
    rows = []
    for shape in cfg.shapes:
        for i, dist in enumerate(cfg.dists):
            progress(f"formats {shape} {dist}")
            w = sample(dist, shape, cfg.seed + i)
            db = {f: sqnr_db(w, fake_quant(w, f)) for f in FORMATS}
            best = max(FORMATS, key=lambda f: db[f])
            auto = choose_format(w, AUTO_CANDIDATES)
            rows.append(FormatRow(f"{shape[0]}x{shape[1]}", dist, excess_kurtosis(w), db, best, auto))
    return rows


def _candidates(w: torch.Tensor, tokens: int, slow: bool) -> dict[str, tuple[Callable[[torch.Tensor], object], float]]:
    """path -> (fn(x fp32), extra bytes per weight beyond the 1-byte codes) for one weight ``[out, in]``."""
    out_f = w.shape[0]
    wb = w.bfloat16()
    q8 = QuantLinear.from_linear(_linear(w), "int8")
    codes8, s8, ones = q8.weight, q8.weight_scale, torch.ones(out_f, dtype=torch.bfloat16)
    layers = {f: QuantLinear.from_linear(_linear(w), f) for f in ("fp8_e4m3", "fp8_e5m2")}
    e4 = layers["fp8_e4m3"]
    c: dict[str, tuple[Callable, float]] = {
        "fp32 base": (lambda x: F.linear(x, w), 0.0),
        "bf16 base": (lambda x: F.linear(x.bfloat16(), wb), 0.0),
        "QuantLinear int8": (q8, 0.0),
        "QuantLinear fp8_e4m3": (e4, 2.0),
        "QuantLinear fp8_e5m2": (layers["fp8_e5m2"], 2.0),
        "int8: _weight_int8pack_mm bf16 act": (lambda x: torch._weight_int8pack_mm(x.bfloat16(), codes8, ones), 0.0),
        "int8: dequant fp32 + GEMM": (lambda x: F.linear(x, codes8.float()) * s8, 0.0),
        "int8: codes -> bf16 + bf16 GEMM": (lambda x: F.linear(x.bfloat16(), codes8.bfloat16()).float() * s8, 0.0),
        "fp8: dequant fp32 + GEMM": (lambda x: F.linear(x, e4.weight.float()) * e4.weight_scale, 0.0),
        "fp8: bf16 copy, bf16 GEMM": (lambda x: F.linear(x.bfloat16(), e4.weight_compute), 2.0),
        "fp8: bf16 copy -> fp32 GEMM": (lambda x: F.linear(x, e4.weight_compute.float()), 2.0),
    }
    with warnings.catch_warnings():  # torch.ao quantized tensors are deprecated (still the fbgemm path)
        warnings.simplefilter("ignore")
        zeros = torch.zeros(out_f, dtype=torch.long)
        packed, pack_ms = once(
            torch.ops.quantized.linear_prepack,
            torch._make_per_channel_quantized_tensor(codes8, s8.double(), zeros, 0),
            None,
        )
    progress(f"fbgemm prepack of {tuple(w.shape)}: {pack_ms:.1f} ms (a full repack after any code write)")
    c["int8: fbgemm dynamic (prepacked copy)"] = (lambda x: torch.ops.quantized.linear_dynamic(x, packed, True), 1.0)
    if slow and tokens == 1:
        c["int8: _weight_int8pack_mm fp32 act"] = (lambda x: torch._weight_int8pack_mm(x, codes8, s8), 0.0)
        one = torch.tensor(1.0)
        c["fp8: torch._scaled_mm (emulated)"] = (
            lambda x: torch._scaled_mm(x.to(torch.float8_e4m3fn), e4.weight.t(), one, one, out_dtype=torch.float32),
            0.0,
        )
    if slow and tokens > 1:
        codes_t = codes8.t()
        c["int8: torch._int_mm (int8 act)"] = (lambda x: torch._int_mm(x.to(torch.int8), codes_t), 0.0)
    return c


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    return lin


def speed_rows(cfg: Config) -> list[SpeedRow]:
    rows = []
    gen = torch.Generator().manual_seed(cfg.seed)
    for shape in cfg.speed_shapes:
        w = torch.randn(shape, generator=gen) * 0.02
        for tokens in cfg.tokens:
            progress(f"speed {shape} tokens={tokens}")
            x = torch.randn(tokens, shape[1], generator=gen)
            cands = _candidates(w, tokens, cfg.slow)
            if tokens > 128:  # the crossover question only: int8 paths against the base
                cands = {k: v for k, v in cands.items() if "base" in k or "int8" in k}
            heavy = {k for k in cands if "_scaled_mm" in k or "_int_mm" in k or "fp32 act" in k}
            steps = {k: [lambda f=f, x=x: f(x)] for k, (f, _) in cands.items() if k not in heavy}
            with torch.inference_mode():
                t = cycles(steps, cfg.repeats)
                for k in heavy:  # seconds per call: a few runs, not interleaved
                    t[k] = cycles({k: [lambda f=cands[k][0], x=x: f(x)]}, 2)[k]
            for k, (_, extra) in cands.items():
                rows.append(_speed_row(shape, tokens, k, t[k], t["fp32 base"], t["bf16 base"], extra))
    return rows


def _speed_row(shape, tokens, path, t: Timing, fp32: Timing, bf16: Timing, extra: float) -> SpeedRow:
    return SpeedRow(
        f"{shape[0]}x{shape[1]}",
        tokens,
        path,
        t.median_ms,
        t.p90_ms,
        t.median_ms / fp32.median_ms,
        t.median_ms / bf16.median_ms,
        extra,
    )


def plot(rows: list[FormatRow], path: Path) -> bool:
    """SQNR against the distribution, one line per format and one panel per shape; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written", flush=True)
        return False
    shapes = sorted({r.shape for r in rows}, key=[r.shape for r in rows].index)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r.shape == shape]
        for f in FORMATS:
            ax.plot([r.dist for r in sub], [r.sqnr_db[f] for r in sub], marker="o", label=f)
        ax.set_title(f"weight {shape} (per-channel scales)")
        ax.set_ylabel("SQNR (dB)")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_formats", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats, no slow candidates")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speed", action="store_true", help="the format table only")
    p.add_argument("--no-formats", action="store_true", help="the speed table only")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts of the speed rows")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of SQNR per format (needs matplotlib)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    quick = args.quick
    cfg = Config(
        shapes=() if args.no_formats else QUICK_SHAPES if quick else LLAMA_SHAPES,
        dists=DISTS,
        speed_shapes=() if args.no_speed else ((256, 512),) if quick else ((8192, 2048), (2048, 8192)),
        tokens=tuple(args.tokens or ((1, 64) if quick else (1, 64, 256))),
        repeats=args.repeats or (3 if quick else 9),
        slow=not quick,
        seed=args.seed,
    )
    print(f"# quant_formats: {cfg}  (torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True)
    frows = format_rows(cfg)
    if frows:
        print("\nSQNR (dB) per format, per-output-channel scales; best of all, and auto's pick (int8/E4M3/E5M2)")
        print_table(
            ["shape", "dist", "kurtosis", *FORMATS, "best", "auto"],
            [[r.shape, r.dist, r.kurtosis, *(r.sqnr_db[f] for f in FORMATS), r.best, r.auto] for r in frows],
        )
    srows = speed_rows(cfg)
    if srows:
        print(
            f"\nInference of one linear [out x in], medians of interleaved rounds (QuantLinear on this CPU: int8 "
            f"kernel up to {int8mm_max_tokens()} tokens, native bf16 GEMM {'yes' if BF16_GEMM else 'no'})"
        )
        print_table(
            ["shape", "tokens", "path", "median ms", "p90 ms", "x fp32", "x bf16", "extra B/weight"],
            [
                [r.shape, r.tokens, r.path, r.median_ms, r.p90_ms, r.vs_fp32, r.vs_bf16, r.extra_bytes_per_weight]
                for r in srows
            ],
        )
    if args.plot and frows:
        plot(frows, args.plot)
    if args.json:
        doc = {"config": asdict(cfg), "formats": [asdict(r) for r in frows], "speed": [asdict(r) for r in srows]}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
