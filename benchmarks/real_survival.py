"""Trained adapters on 8-bit bases, on the real model: do their answers survive, and at what switch cost?

    python -m benchmarks.real_survival                    # SmolLM2-135M-Instruct, 3 tasks, fp32/int8/fp8: ~10 min
    python -m benchmarks.real_survival --quick            # one task, 3 training steps, few prompts: ~2 min
    python -m benchmarks.real_survival --keep adapters/   # keep (and next time reuse) the trained PEFT adapters

One SHiRA adapter (PEFT's random mask, r 4: 1.15% of the adapted weights) and one LoRA adapter (rank 4: the same
trainable count) per task of ``benchmarks.real_tasks``, trained here with PEFT (``real_tasks.train_adapter``). Then
per base format (fp32, and ``shira_runtime.quantize``'s int8, fp8_e4m3, fp8_e5m2 of every linear but the LM
head), greedy exact-match accuracy on the task's held-out prompts for:

- **SHiRA switched on the grid** (``rt.switch``): the adapter's entries rounded onto the base's fixed grid, the
  base restored bit for bit by ``switch(None)``; with the share of touched codes that did not move (the delta
  rounded away), the saturated codes (``SwitchStats.saturated``) and the switch time.
- **LoRA fused the PEFT way** (``benchmarks.baselines.RequantLora``: dequantize every adapted tensor, merge,
  requantize with new scales; no exact revert): accuracy and the time of that merge.
- **LoRA unfused** (``mode="unfused"``: the factors beside the quantized base, an extra matmul per layer).

The fp32 rows are the reference the quantized ones are read against. Switch times are medians of
``--repeats`` switches base -> adapter (each followed by ``switch(None)``, untimed) in this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from shira_runtime import LoraAdapter, Runtime, SparseAdapter
from shira_runtime.quantization import QuantLinear, quantize
from shira_runtime.table import print_table

from benchmarks.baselines import RequantLora
from benchmarks.common import progress
from benchmarks.fusion import real_base
from benchmarks.real_tasks import TASKS, Tasks, train_adapter
from benchmarks.training import accuracy

FORMATS = ("fp32", "int8", "fp8_e4m3", "fp8_e5m2")


def adapters(base, tasks: Tasks, names, steps: int, keep: Path) -> dict[tuple[str, str], Path]:
    """PEFT adapter directories ``keep/<kind>/<task>``, trained unless a complete one is there already."""
    out = {}
    for kind in ("shira", "lora"):
        for task in names:
            d = keep / kind / task
            if not (d / "adapter_config.json").is_file():
                progress(f"training {kind} on {task} ({steps} steps)")
                train_adapter(base, tasks, task, kind, steps=steps).save_pretrained(str(d))
            out[kind, task] = d
    return out


def _switch_ms(rt: Runtime, name: str, repeats: int) -> tuple[float, object]:
    times, stats = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = rt.switch(name)
        times.append((time.perf_counter() - t0) * 1e3)
        rt.switch(None)
    return statistics.median(times), stats


def unmoved(qmodel, rt: Runtime, name: str, adapter: SparseAdapter) -> float:
    """Share of the adapter's touched codes that a switch leaves as they were (the delta rounded away)."""
    layers = {f"{n}.weight": m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    before = {t: layers[t].weight.view(torch.uint8).flatten().clone() for t in adapter.indices}
    rt.switch(name)
    same = total = 0
    for t in adapter.indices:
        idx, _ = adapter.flat(t, tuple(layers[t].weight.shape))
        idx = idx.long()
        same += int((layers[t].weight.view(torch.uint8).flatten()[idx] == before[t][idx]).sum())
        total += idx.numel()
    rt.switch(None)
    return same / total if total else 0.0


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base, tok = real_base(args.hf)
    tasks = Tasks(tok, seed=0)
    evals = {t: tasks.eval_set(t, args.eval_n) for t in args.tasks}  # held out before any training batch
    keep = args.keep
    dirs = adapters(base, tasks, args.tasks, args.steps, keep)
    rows = []
    for fmt in args.formats:
        progress(f"{fmt}: SHiRA on the grid, LoRA fused (requantized) and unfused")
        model = copy.deepcopy(base)
        if fmt != "fp32":
            quantize(model, fmt)
        rt = Runtime.load(model)
        for task in args.tasks:
            sp = SparseAdapter.from_peft(dirs["shira", task])
            rt.add_adapter(f"shira/{task}", sp)
            rt.add_adapter(f"lora-unfused/{task}", dirs["lora", task], mode="unfused")
            ms, stats = _switch_ms(rt, f"shira/{task}", args.repeats)
            rt.switch(f"shira/{task}")
            shira_acc = accuracy(rt.generate, evals[task], tasks.eos)[0]
            rt.switch(f"lora-unfused/{task}")
            unfused_acc = accuracy(rt.generate, evals[task], tasks.eos)[0]
            rt.switch(None)
            row = {
                "format": fmt,
                "task": task,
                "shira_acc": shira_acc,
                "shira_switch_ms": ms,
                "shira_saturated": sum(stats.saturated.values()),
                "shira_entries": sp.nnz,
                "shira_unmoved": unmoved(model, rt, f"shira/{task}", sp) if fmt != "fp32" else 0.0,
                "lora_unfused_acc": unfused_acc,
            }
            lora = LoraAdapter.from_peft(dirs["lora", task])
            if fmt == "fp32":
                rt.add_adapter(f"lora-fused/{task}", lora, mode="fused")
                lms, _ = _switch_ms(rt, f"lora-fused/{task}", args.repeats)
                rt.switch(f"lora-fused/{task}")
                row["lora_fused_acc"] = accuracy(rt.generate, evals[task], tasks.eos)[0]
                rt.switch(None)
            else:  # the PEFT way on a quantized base: requantize whole tensors (the runtime refuses fused LoRA)
                saved = {k: v.clone() for k, v in model.state_dict().items()}
                merger = RequantLora(model, sorted(lora.A))
                t0 = time.perf_counter()
                merger.merge(lora)
                lms = (time.perf_counter() - t0) * 1e3
                row["lora_fused_acc"] = accuracy(rt.generate, evals[task], tasks.eos)[0]
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        v.copy_(saved[k])  # back to the base (RequantLora's unmerge drifts)
                for m in model.modules():
                    if isinstance(m, QuantLinear):
                        m.refresh_rows()
            row["lora_fused_switch_ms"] = lms
            row["lora_fused_x_shira"] = lms / ms if ms else None
            rows.append(row)
        del rt, model
    return {
        "model": args.hf,
        "tasks": list(args.tasks),
        "steps": args.steps,
        "eval_n": args.eval_n,
        "repeats": args.repeats,
        "rows": rows,
        "base_acc": {t: accuracy(_hf_generate(base), evals[t], tasks.eos)[0] for t in args.tasks},
    }


def _hf_generate(model):
    def gen(ids, **kw):
        return model.generate(ids, do_sample=False, pad_token_id=kw.get("eos_token_id"), **kw)

    return gen


def report(doc: dict) -> None:
    print(
        f"\n# real_survival: {doc['model']}, tasks {', '.join(doc['tasks'])}, {doc['steps']} training steps per "
        f"adapter, {doc['eval_n']} held-out prompts per task (exact match), switch medians of {doc['repeats']}"
    )
    print("base model alone: " + ", ".join(f"{t} {a:.2f}" for t, a in doc["base_acc"].items()))
    print_table(
        ["base", "task", "SHiRA", "LoRA fused", "LoRA unfused", "SHiRA ms", "LoRA fused ms", "x", "saturated",
         "unmoved"],
        [
            [r["format"], r["task"], r["shira_acc"], r["lora_fused_acc"], r["lora_unfused_acc"], r["shira_switch_ms"],
             r["lora_fused_switch_ms"], r["lora_fused_x_shira"], f"{r['shira_saturated']} / {r['shira_entries']}",
             r["shira_unmoved"]]
            for r in doc["rows"]
        ],
    )  # fmt: skip
    print("(LoRA fused on 8-bit bases: dequantize, merge, requantize every adapted tensor, the PEFT way; "
          "'unmoved': touched codes the switch left as they were)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_survival", description=__doc__.split("\n")[0])
    p.add_argument("--hf", default="smollm2", help="smollm2 (fetched once) or a transformers directory")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--steps", type=int, default=30, help="training steps per adapter")
    p.add_argument("--eval-n", type=int, default=50, help="held-out prompts per task")
    p.add_argument("--repeats", type=int, default=5, help="switches timed per adapter")
    p.add_argument("--keep", type=Path, default=None, help="keep the PEFT adapters here (reused when present)")
    p.add_argument("--quick", action="store_true", help="one task, 3 steps, 8 prompts, 2 repeats")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.steps, args.eval_n, args.repeats = args.tasks[:1], 3, 8, 2
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if args.keep is None:
            args.keep = Path(tmp)
        doc = run(args)
    report(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
