"""How much of an adapter survives a quantized base: SHiRA switched on the grid against the two LoRA baselines.

    python -m benchmarks.quant_survival                  # small preset, int8 / fp8_e4m3 / fp8_e5m2
    python -m benchmarks.quant_survival --quick          # tiny preset, few repeats
    python -m benchmarks.quant_survival --preset llama-1b --no-lora --no-logits   # per-tensor stats only

Measured in this run, per format:

- **SHiRA on the grid** (``Runtime.load(quantized)``, ``rt.switch``), per tensor and summed: the fraction of
  touched entries whose code did not change, the saturated codes, how far the delta the grid kept is from the
  adapter's (``|deq(new) - deq(base) - delta| / |delta|``), and the error of the switched weights against the
  fp32 result ``W + delta`` (relative RMS over the touched entries and over the whole tensor), next to the
  base's own quantization error.
- **LoRA fused the PEFT way** (``benchmarks.baselines.RequantLora``: dequantize the whole tensor, merge,
  requantize it with new per-row scales; the runtime refuses this): switch time, the fraction of code and scale
  bytes a switch changes, and the drift after ``--cycles`` A -> B -> A cycles (bytes that differ from the base, and
  the largest weight error) against the SHiRA switch's (exact revert).
- **LoRA unfused** (``mode="unfused"``): inference time against the quantized base, interleaved rounds.
- **Logits** against the fp32 model with the same adapter (random tokens): the quantized base with SHiRA
  switched in vs the fp32 base with SHiRA, next to the quantized base alone vs the fp32 base alone, and the
  error of the adapter's own effect on the logits.

The random SHiRA deltas have std ``--delta-rel`` x the median std of the target weights (printed).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from dataclasses import asdict, dataclass

import torch
from shira_runtime import Runtime
from shira_runtime.kernels.qformats import FORMATS
from shira_runtime.models import PRESETS, TARGETS, build
from shira_runtime.quantization import QuantLinear, quantize
from shira_runtime.synthetic import random_lora, random_shira, target_weights
from shira_runtime.table import print_table

from benchmarks.baselines import RequantLora, bytes_changed, code_bytes
from benchmarks.common import progress
from benchmarks.timing import Inference, cycle, once

SURVIVAL_FORMATS = tuple(f for f in ("int8", "fp8_e4m3", "fp8_e5m2") if f in FORMATS)


@dataclass(frozen=True)
class Config:
    preset: str = "small"
    formats: tuple[str, ...] = SURVIVAL_FORMATS
    density: float = 0.01
    delta_rel: float = 0.1  # SHiRA delta std / median weight std
    rank: int = 32
    repeats: int = 10
    infer_repeats: int = 5
    cycles: int = 100
    tokens: int = 64
    seed: int = 0
    lora: bool = True
    logits: bool = True
    per_tensor: bool = True


def deq_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.dequantize_weight() for n, m in module.named_modules() if isinstance(m, QuantLinear)}


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt()) if x.numel() else 0.0


def shira_survival(model32, qmodel, rt: Runtime, name: str, adapter) -> tuple[list[dict], dict, int]:
    """Per-tensor survival of ``adapter`` switched in on ``rt`` (over ``qmodel``), against fp32 ``W + delta``;
    returns (rows, summed row, saturated codes). Leaves ``rt`` at the base."""
    w32 = target_weights(model32, TARGETS)
    base_deq = deq_weights(qmodel)
    base_codes = {n: m.weight.clone() for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    stats = rt.switch(name)
    now = {f"{n}.weight": m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    rows, acc = [], dict.fromkeys(("n", "same", "sat", "dk", "d", "et", "rt", "ew", "rw", "eb"), 0.0)
    for t in adapter.indices:
        layer = now[t]
        idx, val = adapter.flat(t, tuple(layer.weight.shape))
        idx = idx.long()
        delta = val.float() * adapter.scale
        ref = w32[t].detach().float().flatten().clone()
        ref[idx] += delta  # the fp32 result W + delta
        sw = layer.dequantize_weight().flatten()
        old_codes = base_codes[t.removesuffix(".weight")].view(torch.uint8).flatten()[idx]
        same = int((layer.weight.view(torch.uint8).flatten()[idx] == old_codes).sum())
        kept = sw[idx] - base_deq[t].flatten()[idx]  # the delta the grid holds
        sat = stats.saturated.get(t, 0)
        sq = {
            "dk": float((kept - delta).double().pow(2).sum()),
            "d": float(delta.double().pow(2).sum()),
            "et": float((sw[idx] - ref[idx]).double().pow(2).sum()),
            "rt": float(ref[idx].double().pow(2).sum()),
            "ew": float((sw - ref).double().pow(2).sum()),
            "rw": float(ref.double().pow(2).sum()),
            "eb": float((base_deq[t].flatten() - w32[t].detach().float().flatten()).double().pow(2).sum()),
        }
        for k, v in sq.items():
            acc[k] += v
        acc["n"] += idx.numel()
        acc["same"] += same
        acc["sat"] += sat
        rows.append(_survival_row(t, idx.numel(), same, sat, sq, w32[t].numel()))
    rt.switch(None)
    total = _survival_row("all", int(acc["n"]), int(acc["same"]), int(acc["sat"]), acc, None)
    return rows, total, int(acc["sat"])


def _survival_row(tensor: str, n: int, same: int, sat: int, sq: dict, numel: int | None) -> dict:
    return {
        "tensor": tensor,
        "touched": n,
        "codes_unchanged": same / n if n else 0.0,
        "saturated": sat,
        "delta_error_rel": (sq["dk"] / sq["d"]) ** 0.5 if sq["d"] else 0.0,  # |kept - delta| / |delta|
        "rel_rms_touched": (sq["et"] / sq["rt"]) ** 0.5 if sq["rt"] else 0.0,  # against W + delta, touched
        "rel_rms_tensor": (sq["ew"] / sq["rw"]) ** 0.5 if sq["rw"] else 0.0,  # against W + delta, whole tensor
        "base_rel_rms_tensor": (sq["eb"] / sq["rw"]) ** 0.5 if sq["rw"] else 0.0,  # the base's own error
    }


def lora_fused_requant(cfg: Config, qmodel, la, lb, rt: Runtime) -> dict:
    """The PEFT-way fused LoRA on ``qmodel``: switch time, bytes changed per switch, drift after cycles;
    and the SHiRA switch on the same base over as many cycles (``rt`` holds ``shira_a``/``shira_b``)."""
    names = list(la.A)
    req = RequantLora(qmodel, names)
    orig = code_bytes(qmodel)
    orig_deq = deq_weights(qmodel)
    req.merge(la)
    t = cycle([lambda: req.switch(la, lb), lambda: req.switch(lb, la)], max(2, cfg.repeats // 2))
    # t leaves A or B merged: bring A back, then measure one switch's changed bytes
    state_b = len(t.samples_ms) % 2 == 1  # the warm-up (A -> B) plus an odd count ends in B
    if state_b:
        req.switch(lb, la)
    before = code_bytes(qmodel)
    req.switch(la, lb)
    changed, total = bytes_changed(before, qmodel)
    req.switch(lb, la)
    progress(f"  lora fused (requantize): {cfg.cycles} cycles A -> B -> A, then unmerge A")
    for _ in range(cfg.cycles):
        req.switch(la, lb)
        req.switch(lb, la)
    req.switch(la, None)
    drift, _ = bytes_changed(orig, qmodel)
    now = deq_weights(qmodel)
    max_err = max(float((now[n] - orig_deq[n]).abs().max()) for n in names)
    for n, m in qmodel.named_modules():  # the base back, byte for byte, for what follows
        if isinstance(m, QuantLinear):
            m.weight.view(torch.uint8).view(-1).copy_(orig[f"{n}.weight"])
            m.weight_scale.view(torch.uint8).view(-1).copy_(orig[f"{n}.weight_scale"])
            m.refresh_rows()
    # SHiRA on the same grid: one switch's bytes, its time, and its drift after the same cycles
    ts = cycle([lambda: rt.switch("shira_a"), lambda: rt.switch("shira_b")], cfg.repeats)
    rt.switch("shira_a")
    before = code_bytes(qmodel)
    rt.switch("shira_b")
    s_changed, _ = bytes_changed(before, qmodel)
    for _ in range(cfg.cycles):
        rt.switch("shira_a")
        rt.switch("shira_b")
    rt.switch(None)
    s_drift, _ = bytes_changed(orig, qmodel)
    s_err = max(float((m.dequantize_weight() - orig_deq[n]).abs().max()) for n, m in _qlayers(qmodel))
    return {
        "lora_switch_ms": t.median_ms,
        "lora_bytes_changed": changed / total,
        "lora_drift_bytes": drift,
        "lora_drift_bytes_frac": drift / total,
        "lora_drift_max_err": max_err,
        "shira_switch_ms": ts.median_ms,
        "shira_bytes_changed": s_changed / total,
        "shira_drift_bytes": s_drift,
        "shira_drift_max_err": s_err,
        "bytes_total": total,
        "requant_over_shira": t.median_ms / ts.median_ms,
    }


def _qlayers(module):
    return [(f"{n}.weight", m) for n, m in module.named_modules() if isinstance(m, QuantLinear)]


def logits_error(logits: dict[str, torch.Tensor], fmt: str) -> dict:
    def d(a, b):
        x = (logits[a] - logits[b]).abs()
        return float(x.max()), float(x.mean())

    q_s, q_b = f"{fmt}+shira", f"{fmt}"
    adapter_effect_err = ((logits[q_s] - logits[q_b]) - (logits["fp32+shira"] - logits["fp32"])).abs()
    return {
        "adapted_max": d(q_s, "fp32+shira")[0],
        "adapted_mean": d(q_s, "fp32+shira")[1],
        "base_max": d(q_b, "fp32")[0],
        "base_mean": d(q_b, "fp32")[1],
        "adapter_effect_err_max": float(adapter_effect_err.max()),
        "adapter_effect_err_mean": float(adapter_effect_err.mean()),
        "adapter_effect_fp32_mean": float((logits["fp32+shira"] - logits["fp32"]).abs().mean()),
    }


def run(cfg: Config) -> dict:
    progress(f"building {cfg.preset} (fp32)")
    model = build(cfg.preset, torch.float32, seed=cfg.seed)
    weights = target_weights(model, TARGETS)
    w_std = float(torch.tensor([float(w.detach().std()) for w in weights.values()]).median())
    std = cfg.delta_rel * w_std
    progress(f"two random SHiRA adapters, density {cfg.density}, delta std {std:.3g} ({cfg.delta_rel} x weight std)")
    sa = random_shira(model, TARGETS, cfg.density, seed=cfg.seed + 1, std=std)
    sb = random_shira(model, TARGETS, cfg.density, seed=cfg.seed + 2, std=std)
    la = random_lora(model, TARGETS, cfg.rank, seed=cfg.seed + 3)
    lb = random_lora(model, TARGETS, cfg.rank, seed=cfg.seed + 4)
    vocab = model.config.vocab
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    ids = torch.randint(0, vocab, (2, cfg.tokens), generator=gen)
    logits: dict[str, torch.Tensor] = {}
    if cfg.logits:
        rt32 = Runtime.load(copy.deepcopy(model))
        rt32.add_adapter("shira_a", sa)
        logits["fp32"] = rt32(ids).float()
        rt32.switch("shira_a")
        logits["fp32+shira"] = rt32(ids).float()
        del rt32
    out: dict = {"weight_std": w_std, "delta_std": std, "formats": {}}
    for fmt in cfg.formats:
        progress(f"{fmt}: quantizing a copy of the base")
        qmodel, q_ms = once(lambda f=fmt: quantize(copy.deepcopy(model), f))
        rt = Runtime.load(qmodel)
        rt.add_adapter("shira_a", sa)
        rt.add_adapter("shira_b", sb)
        res: dict = {"quantize_ms": q_ms}
        progress(f"{fmt}: SHiRA survival per tensor")
        res["tensors"], res["shira"], _ = shira_survival(model, qmodel, rt, "shira_a", sa)
        if cfg.logits:
            logits[fmt] = rt(ids).float()
            rt.switch("shira_a")
            logits[f"{fmt}+shira"] = rt(ids).float()
            rt.switch(None)
            res["logits"] = logits_error(logits, fmt)
        if cfg.lora:
            progress(f"{fmt}: LoRA fused the PEFT way (requantize), {cfg.cycles} cycles")
            res["lora_fused"] = lora_fused_requant(cfg, qmodel, la, lb, rt)
            progress(f"{fmt}: LoRA unfused and SHiRA inference against the quantized base, interleaved")
            rt.add_adapter("lora_u", la, mode="unfused")
            infer = Inference(rt, ids[:1, :1], ids, cfg.infer_repeats)
            u = infer.measure("lora_u")
            s = infer.measure("shira_a")
            res["lora_unfused"] = {
                "infer_ms": u.batch.median_ms,
                "base_infer_ms": u.base_batch.median_ms,
                "overhead": u.overhead,
                "one_token_ms": u.one.median_ms,
            }
            res["shira_infer"] = {
                "infer_ms": s.batch.median_ms,
                "overhead": s.overhead,
                "one_token_ms": s.one.median_ms,
            }
        out["formats"][fmt] = res
        del rt, qmodel
        gc.collect()
    return out


def report(cfg: Config, out: dict) -> None:
    print(
        f"\nadapter survival on quantized bases, {cfg.preset}, SHiRA density {cfg.density}, delta std "
        f"{out['delta_std']:.3g} = {cfg.delta_rel} x median weight std {out['weight_std']:.3g}; LoRA rank {cfg.rank}"
    )
    cols = ["codes unchanged", "saturated", "|kept-delta|/|delta|", "rel rms touched", "rel rms tensor", "base rel rms"]
    keys = [
        "codes_unchanged",
        "saturated",
        "delta_error_rel",
        "rel_rms_touched",
        "rel_rms_tensor",
        "base_rel_rms_tensor",
    ]
    if cfg.per_tensor:
        for fmt, res in out["formats"].items():
            print(f"\nSHiRA switched on the {fmt} grid, per tensor (errors against fp32 W + delta):")
            print_table(
                ["tensor", "touched", *cols],
                [[r["tensor"], r["touched"], *(r[k] for k in keys)] for r in res["tensors"]],
            )
    print("\nSHiRA on the grid, summed over tensors:")
    print_table(
        ["format", "touched", *cols],
        [[f, r["shira"]["touched"], *(r["shira"][k] for k in keys)] for f, r in out["formats"].items()],
    )
    if cfg.logits:
        print(f"\nlogits against the fp32 model (random tokens, {cfg.tokens} per row, 2 rows):")
        print_table(
            [
                "format",
                "q+shira vs fp32+shira max",
                "mean",
                "q base vs fp32 base max",
                "mean",
                "adapter effect err max",
                "mean",
                "adapter effect (fp32) mean",
            ],
            [
                [
                    f,
                    L["adapted_max"],
                    L["adapted_mean"],
                    L["base_max"],
                    L["base_mean"],
                    L["adapter_effect_err_max"],
                    L["adapter_effect_err_mean"],
                    L["adapter_effect_fp32_mean"],
                ]
                for f, r in out["formats"].items()
                if (L := r.get("logits"))
            ],
        )
    if cfg.lora:
        print(
            "\nLoRA fused the PEFT way (dequantize, merge, requantize whole tensors) vs SHiRA on the grid; "
            f"drift after {cfg.cycles} A -> B -> A cycles:"
        )
        print_table(
            [
                "format",
                "method",
                "switch ms",
                "bytes changed / switch",
                f"drift bytes ({cfg.cycles} cycles)",
                "drift max err",
                "x shira",
            ],
            [
                row
                for f, r in out["formats"].items()
                if (L := r.get("lora_fused"))
                for row in (
                    [
                        f,
                        "lora fused (requant)",
                        L["lora_switch_ms"],
                        L["lora_bytes_changed"],
                        L["lora_drift_bytes"],
                        L["lora_drift_max_err"],
                        L["requant_over_shira"],
                    ],
                    [
                        f,
                        "shira (grid)",
                        L["shira_switch_ms"],
                        L["shira_bytes_changed"],
                        L["shira_drift_bytes"],
                        L["shira_drift_max_err"],
                        1.0,
                    ],
                )
            ],
        )
        print(f"\ninference ({cfg.tokens} tokens x 2 rows) against the quantized base, interleaved, medians:")
        print_table(
            ["format", "base ms", "lora unfused ms", "x base", "shira ms", "x base"],
            [
                [
                    f,
                    r["lora_unfused"]["base_infer_ms"],
                    r["lora_unfused"]["infer_ms"],
                    r["lora_unfused"]["overhead"],
                    r["shira_infer"]["infer_ms"],
                    r["shira_infer"]["overhead"],
                ]
                for f, r in out["formats"].items()
                if "lora_unfused" in r
            ],
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_survival", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--formats", nargs="+", default=list(SURVIVAL_FORMATS), choices=list(SURVIVAL_FORMATS))
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--delta-rel", type=float, default=0.1, help="SHiRA delta std / median weight std")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--infer-repeats", type=int, default=5)
    p.add_argument("--cycles", type=int, default=100, help="A -> B -> A cycles for the drift")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA baselines")
    p.add_argument("--no-logits", action="store_true", help="skip the logits comparison")
    p.add_argument("--no-per-tensor", action="store_true", help="print the summed SHiRA rows only")
    p.add_argument("--quick", action="store_true", help="tiny preset, few repeats and cycles")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.repeats, a.infer_repeats, a.cycles, a.tokens = "tiny", 3, 2, min(a.cycles, 5), 16
    cfg = Config(
        a.preset,
        tuple(a.formats),
        a.density,
        a.delta_rel,
        a.rank,
        a.repeats,
        a.infer_repeats,
        a.cycles,
        a.tokens,
        lora=not a.no_lora,
        logits=not a.no_logits,
        per_tensor=not a.no_per_tensor,
    )
    out, ms = once(lambda: run(cfg))
    out["elapsed_s"] = ms / 1e3
    out["config"] = asdict(cfg)
    report(cfg, out)
    command = " ".join(["python -m benchmarks.quant_survival", *(argv if argv is not None else sys.argv[1:])])
    print(f"\nmeasured in {ms / 1e3:.1f} s by: {command}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
