"""The concept-loss experiment (SHiRA paper, arXiv 2406.13175, multi-adapter fusion) at laptop scale.

A small transformers Llama is trained on a mixture of synthetic base tasks (copy, increment, rotate, max), so it
knows the format ``[TASK] input [SEP] answer [EOS]``; then one adapter per held-out task (reverse, sort, modadd,
recall; see ``benchmarks.fusion_tasks``) is trained with PEFT: LoRA, and SHiRA with each mask of
``shira_runtime.masks``,
the masks of a method's adapters overlapping or disjoint (the paper's two fusion variants). Every accuracy is
measured through our runtime: ``rt.switch(task)`` for the single adapter, ``rt.switch([all tasks], weights=1)`` for
the fused ones, then greedy ``rt.generate`` on held-out examples (exact match of the answer tokens).

    python -m benchmarks.fusion                       # 13 methods x 3 tasks (~10 minutes on a busy 2-core box)
    python -m benchmarks.fusion --quick --json f.json # 3 tasks, 2 masks, tiny: seconds
    python -m benchmarks.fusion --hf smollm2          # the real model (SmolLM2-135M-Instruct): see REAL below

With ``--hf`` the base is a real trained decoder and the tasks are ``benchmarks.real_tasks`` (text rules the base
does not follow), at the paper's density (r 4: 1.15% of SmolLM2's adapted weights), over three seeds (``REAL``).

Budgets match: LoRA rank r and SHiRA r train the same ``r * (out + in)`` entries per target layer (rank 8 on the
default 64-wide model is 21% of the adapted weights, far denser than the paper's ~1-2% on LLaMA-7B). Both train
with AdamW and a one-cycle schedule for the same steps, one learning rate per family (LoRA 1e-2, SHiRA 2e-2:
the best of a small sweep for single accuracy). An adapter's batches mix in 25% base-task examples (replay).
Memory is the process's peak RSS (psutil, sampled every 10 ms) while a method trained and was evaluated.
Training runs on one thread (``Config.threads``): on a shared 2-core machine two threads spin and ran 10-25x
slower per step (measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from shira_runtime import Runtime
from shira_runtime.masks import KINDS, shira_masks
from shira_runtime.table import print_table
from torch import nn

from benchmarks.common import progress, rss_mb
from benchmarks.fusion_tasks import (
    BASE_TASKS,
    EOS,
    HELD_OUT,
    MAKERS,
    PAD,
    SEP,
    TASK_TOKEN,
    VOCAB,
    EvalSet,
    Sampler,
    eval_set,
)
from benchmarks.real_tasks import TASKS as REAL_TASKS
from benchmarks.real_tasks import Tasks
from benchmarks.training import accuracy, train

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The paper's Table (multi-adapter fusion, LLaMA-7B, BoolQ/PIQA/ARC-e): average drop single -> fused, points.
PAPER_DROP = {("lora", None, None): 11.08, ("shira", "wm", True): 4.43, ("shira", "wm", False): 3.62}


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = ("reverse", "sort", "recall")
    masks: tuple[str, ...] = KINDS
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    base_steps: int = 800
    base_lr: float = 3e-3
    steps: int = 400  # per adapter
    lora_lr: float = 1e-2
    shira_lr: float = 2e-2
    batch: int = 32
    replay: float = 0.25  # share of base-task examples in each adapter's training batches
    rank: int = 8  # LoRA rank; SHiRA r (r * (out + in) trainable entries per layer: the same count)
    eval_n: int = 200
    seed: int = 0
    threads: int = 1
    targets: tuple[str, ...] = TARGETS
    # the real model: a transformers decoder directory or a name of shira_runtime.pretrained (None: the toy Llama)
    hf: str | None = None
    seeds: tuple[int, ...] = ()  # run every method once per seed: mean and spread over seeds (empty: (seed,))


QUICK = Config(
    tasks=("reverse", "sort", "recall"), masks=("rand", "wm"), hidden=32, base_steps=60, steps=15, rank=2, eval_n=24
)
# SmolLM2-135M-Instruct (--hf smollm2): the tasks of benchmarks.real_tasks, r 4 = 1.15% of the adapted weights (the
# paper's 1-2%), 30 steps of 8 examples per adapter (one learning rate per family, from a small sweep for single
# accuracy), no replay (there are no base tasks), three seeds. Training on one thread: two threads were 1.4x
# faster on a quiet machine (0.93 vs 1.30 s/step) and over 2.3x slower with the other vCPU busy (measured).
REAL = Config(
    tasks=REAL_TASKS,
    masks=("wm", "rand"),
    steps=30,
    batch=8,
    rank=4,
    lora_lr=3e-3,
    shira_lr=5e-3,
    replay=0.0,
    eval_n=50,
    hf="smollm2",
    seeds=(0, 1, 2),
)
REAL_QUICK = replace(REAL, masks=("wm",), steps=3, eval_n=6, seeds=(0,))


@dataclass(frozen=True)
class Row:
    """One adapter of one method: its task's accuracy alone and fused with the method's other adapters."""

    method: str  # lora | shira
    mask: str | None  # the SHiRA mask kind; None for LoRA
    overlap: bool | None  # SHiRA masks of the method's adapters may overlap; None for LoRA
    task: str
    single_acc: float
    fused_acc: float
    trainable_params: int  # of this adapter
    train_s: float  # this adapter's optimizer steps
    setup_s: float  # the method's masks (gradient passes) and PEFT wrapping, for all its adapters
    peak_rss_mb: float  # the process, while the method trained and was evaluated
    single_tok_acc: float = 0.0  # answer tokens right (greedy), alone
    fused_tok_acc: float = 0.0  # and fused
    fused_active: tuple[str, ...] = field(default=())  # rt.active while fused_acc was measured
    seed: int = 0

    @property
    def drop(self) -> float:
        return self.single_acc - self.fused_acc

    @property
    def label(self) -> str:
        return "lora" if self.method == "lora" else f"shira-{self.mask}-{'overlap' if self.overlap else 'disjoint'}"


def base_model(cfg: Config) -> nn.Module:
    """A transformers Llama of ``cfg``'s shapes, random from ``cfg.seed``."""
    import transformers

    lc = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=cfg.hidden,
        intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = transformers.LlamaForCausalLM(lc)
    model.config.use_cache = False
    return model


def pretrain(cfg: Config) -> tuple[nn.Module, dict[str, float], float]:
    """The base: trained on the base tasks; its greedy accuracy on them (it learned the format) and the time."""
    model = base_model(cfg)
    t0 = time.perf_counter()
    train(model, list(model.parameters()), Sampler(BASE_TASKS, cfg.seed), cfg.base_steps, cfg.base_lr, cfg.batch)
    took = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    acc = {}
    for task in BASE_TASKS:
        ev = _base_eval(task, 6, min(cfg.eval_n, 100), cfg.seed)
        acc[task] = accuracy(model.generate, ev)[0]
    return model, acc, took


def _base_eval(task: str, n_in: int, n: int, seed: int) -> EvalSet:
    s = Sampler([task], seed + 10_000)
    prompts, answers = [], []
    for _ in range(n):
        x, y = MAKERS[task](s.g, n_in)
        prompts.append([TASK_TOKEN[task], *x, SEP])
        answers.append(y)
    return EvalSet(task, torch.tensor(prompts), torch.tensor(answers))


@dataclass
class Setting:
    """What every method trains and is measured on: the base (frozen), the held-out sets, a training sampler per
    task, a batch per task for the gradient-scored masks, and the end token greedy answers stop at."""

    base: nn.Module
    evals: dict[str, EvalSet]
    sampler: Callable[[str], Any]  # task -> an object whose .batch(n) gives (ids, labels)
    mask_batch: Callable[[str], dict]
    eos: int
    about: dict  # the base's own figures, for the report


def toy_setting(cfg: Config) -> Setting:
    """The toy Llama pretrained on the base tasks (``cfg.seed``); adapters replay the base tasks."""
    progress(f"pretraining the base ({cfg.base_steps} steps on {', '.join(BASE_TASKS)})")
    base, base_acc, base_s = pretrain(cfg)
    evals = {t: eval_set(t, cfg.eval_n, cfg.seed) for t in cfg.tasks}

    def mask_batch(task: str) -> dict:
        ids, _ = Sampler([task], cfg.seed + 1).batch(cfg.batch)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long()}

    about = {"acc_base_tasks": base_acc, "train_s": base_s, "model": f"toy Llama hidden {cfg.hidden}"}
    return Setting(base, evals, lambda task: adapter_sampler(cfg, task, evals[task]), mask_batch, EOS, about)


def real_base(name: str) -> tuple[nn.Module, Any]:
    """A real trained decoder, frozen, and its tokenizer: ``name`` is a directory or a ``shira_runtime.pretrained``
    name (fetched once into the cache)."""
    import transformers
    from shira_runtime import pretrained
    from shira_runtime.models import load_base

    path = pretrained.fetch(name) if name in pretrained.MODELS else Path(name)
    base = load_base(str(path)).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base, transformers.AutoTokenizer.from_pretrained(path)


def real_setting(cfg: Config, base: nn.Module, tokenizer: Any) -> Setting:
    """The text tasks of ``benchmarks.real_tasks`` over a real model's tokenizer, seeded by ``cfg.seed``."""
    tasks = Tasks(tokenizer, cfg.seed)
    evals = {t: tasks.eval_set(t, cfg.eval_n) for t in cfg.tasks}  # before any sampler: they are held out

    def mask_batch(task: str) -> dict:
        ids, _ = tasks.sampler([task], cfg.seed + 1).batch(cfg.batch)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # right padding: causal, harmless

    about = {"model": f"{cfg.hf} ({type(base).__name__}, {sum(p.numel() for p in base.parameters())} parameters)"}
    return Setting(base, evals, lambda task: tasks.sampler([task], cfg.seed), mask_batch, tasks.eos, about)


def methods(cfg: Config) -> list[tuple[str, str | None, bool | None]]:
    return [("lora", None, None)] + [("shira", k, ov) for k in cfg.masks for ov in (True, False)]


def peft_configs(
    cfg: Config, method: str, mask: str | None, overlap: bool | None, model: nn.Module, setting: Setting
) -> list:
    """One PEFT config per task; SHiRA ones carry their mask functions (gradient kinds: one batch per task)."""
    import peft

    targets = list(cfg.targets)
    if method == "lora":
        return [
            peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=targets, lora_dropout=0.0)
            for _ in cfg.tasks
        ]
    scored = mask in ("grad", "snip", "block")
    batches = [setting.mask_batch(task) for task in cfg.tasks] if scored else None
    fns = shira_masks(
        mask, len(cfg.tasks), model if scored else None, batches, seed=cfg.seed, overlap=overlap, targets=targets
    )
    configs = []
    for fn in fns:
        c = peft.ShiraConfig(r=cfg.rank, target_modules=targets)
        c.mask_fn = fn
        configs.append(c)
    return configs


def adapter_sampler(cfg: Config, task: str, ev: EvalSet) -> Sampler:
    """An adapter's training data: its task, and with probability ``cfg.replay`` the base tasks (so the adapter
    learns to act on its task token and to leave other prompts as the base answers them)."""
    share = cfg.replay / len(BASE_TASKS)
    return Sampler([task, *BASE_TASKS], cfg.seed, exclude=[ev], weights=[1 - cfg.replay] + [share] * len(BASE_TASKS))


def run_method(
    cfg: Config,
    rt: Runtime,
    setting: Setting,
    method: str,
    mask: str | None,
    overlap: bool | None,
    out_dir: Path,
) -> list[Row]:
    """Train the method's adapters (one per task) with PEFT, save them, load them into ``rt``; evaluate each
    task alone (``rt.switch(task)``) and fused (``rt.switch(all, weights=1)``). ``rt`` is left at the base."""
    import peft

    rss_mb()  # the peak since here is this method's
    t0 = time.perf_counter()
    model = copy.deepcopy(setting.base)
    configs = peft_configs(cfg, method, mask, overlap, model, setting)
    tasks = list(cfg.tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "mask_type" is a label for a custom mask_fn
        pm = peft.get_peft_model(model, configs[0], adapter_name=tasks[0])
        for task, c in zip(tasks[1:], configs[1:]):
            pm.add_adapter(task, c)
    setup_s = time.perf_counter() - t0
    train_s, params = {}, {}
    for i, task in enumerate(tasks):
        pm.set_adapter(task)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        params[task] = sum(p.numel() for p in trainable)
        torch.manual_seed(cfg.seed + i)
        t1 = time.perf_counter()
        lr = cfg.lora_lr if method == "lora" else cfg.shira_lr
        train(pm, trainable, setting.sampler(task), cfg.steps, lr, cfg.batch)
        train_s[task] = time.perf_counter() - t1
    pm.save_pretrained(str(out_dir))  # adapters not named "default" go to out_dir/<name>
    del pm, model
    names = [f"{_tag(method, mask, overlap)}/s{cfg.seed}/{t}" for t in tasks]
    for name, task in zip(names, tasks):
        rt.add_adapter(name, out_dir / task)
    single, fused = {}, {}
    for name, task in zip(names, tasks):
        rt.switch(name)
        single[task] = accuracy(rt.generate, setting.evals[task], setting.eos)
    rt.switch(names, weights=[1.0] * len(names))
    active = tuple(n for n, _ in rt.active)
    for task in tasks:
        fused[task] = accuracy(rt.generate, setting.evals[task], setting.eos)
    rt.switch(None)
    for name in names:
        rt.remove_adapter(name)
    peak = rss_mb()
    return [
        Row(
            method,
            mask,
            overlap,
            t,
            single[t][0],
            fused[t][0],
            params[t],
            train_s[t],
            setup_s,
            peak,
            single[t][1],
            fused[t][1],
            active,
            cfg.seed,
        )
        for t in tasks
    ]


def _tag(method: str, mask: str | None, overlap: bool | None) -> str:
    return "lora" if method == "lora" else f"shira-{mask}-{'overlap' if overlap else 'disjoint'}"


def summary(rows: Sequence[Row]) -> list[dict]:
    """Per method: mean single and fused accuracy and the average drop (points), beside the paper's drop."""
    out = []
    for key in dict.fromkeys((r.method, r.mask, r.overlap) for r in rows):
        rs = [r for r in rows if (r.method, r.mask, r.overlap) == key]
        n = len(rs)
        per_seed = {}
        for r in rs:
            per_seed.setdefault(r.seed, []).append(100 * r.drop)
        drops = [sum(d) / len(d) for d in per_seed.values()]  # the average drop of each seed
        spread = statistics.stdev(drops) if len(drops) > 1 else 0.0
        out.append(
            {
                "method": rs[0].label,
                "single_acc": sum(r.single_acc for r in rs) / n,
                "fused_acc": sum(r.fused_acc for r in rs) / n,
                "avg_drop_points": 100 * sum(r.drop for r in rs) / n,
                "drop_sd_points": spread,  # sample standard deviation of the seeds' average drops
                "seeds": len(drops),
                "single_tok_acc": sum(r.single_tok_acc for r in rs) / n,
                "fused_tok_acc": sum(r.fused_tok_acc for r in rs) / n,
                "paper_avg_drop_points": PAPER_DROP.get(key),
                "trainable_params": rs[0].trainable_params,
                "train_s": sum(r.train_s for r in rs) + rs[0].setup_s,
                "peak_rss_mb": rs[0].peak_rss_mb,
            }
        )
    return out


def run(cfg: Config, out_dir: Path | None = None) -> dict:
    """The whole experiment, once per seed; returns the JSON document. ``out_dir`` keeps the PEFT adapters
    (default: temp)."""
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    rows: list[Row] = []
    held_out_base: dict[str, list[float]] = {}
    real = real_base(cfg.hf) if cfg.hf else None  # loaded once; the tasks' data follow the seed
    for seed in cfg.seeds or (cfg.seed,):
        scfg = replace(cfg, seed=seed)
        setting = real_setting(scfg, *real) if real else toy_setting(scfg)
        base = setting.base
        adapted = sum(m.weight.numel() for n, m in base.named_modules() if n.endswith(cfg.targets))
        rt = Runtime.load(base)
        for t in cfg.tasks:
            held_out_base.setdefault(t, []).append(accuracy(rt.generate, setting.evals[t], setting.eos)[0])
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(out_dir) if out_dir is not None else Path(tmp)
            for method, mask, overlap in methods(cfg):
                tag = _tag(method, mask, overlap)
                progress(f"seed {seed}, {tag}: training {len(cfg.tasks)} adapters ({cfg.steps} steps each)")
                rows += run_method(scfg, rt, setting, method, mask, overlap, root / f"s{seed}" / tag)
        del rt
    return {
        "config": asdict(cfg),
        "base": {**setting.about, "acc_held_out": {t: sum(v) / len(v) for t, v in held_out_base.items()}},
        "adapted_weights": adapted,  # entries of the target linears; an adapter trains rows[i].trainable_params
        "rows": [{**asdict(r), "drop": r.drop} for r in rows],
        "summary": summary(rows),
        "total_s": time.perf_counter() - t0,
        "memory": "peak RSS of the process (psutil, sampled every 10 ms) while the method trained and was evaluated",
    }


def report(doc: dict) -> None:
    cfg, base = doc["config"], doc["base"]
    seeds = cfg["seeds"] or [cfg["seed"]]
    print(
        f"\n# fusion: {base['model']}, rank/r {cfg['rank']}, {cfg['steps']} steps of {cfg['batch']} per adapter, "
        f"{cfg['eval_n']} held-out examples per task, seeds {', '.join(map(str, seeds))}"
    )
    params = doc["rows"][0]["trainable_params"]
    print(
        f"trainable per adapter: {params} (LoRA rank {cfg['rank']} = SHiRA r {cfg['rank']}), "
        f"{100 * params / doc['adapted_weights']:.1f}% of the {doc['adapted_weights']} adapted weights"
    )
    if "acc_base_tasks" in base:
        print("base accuracy, base tasks: " + ", ".join(f"{k} {v:.2f}" for k, v in base["acc_base_tasks"].items()))
    print("base accuracy, held-out tasks: " + ", ".join(f"{k} {v:.2f}" for k, v in base["acc_held_out"].items()))
    print()
    print_table(
        ["method", "seed", "task", "single", "fused", "drop", "single tok", "fused tok", "params", "train s"],
        [
            [
                _tag(r["method"], r["mask"], r["overlap"]),
                r["seed"],
                r["task"],
                r["single_acc"],
                r["fused_acc"],
                r["drop"],
                r["single_tok_acc"],
                r["fused_tok_acc"],
                r["trainable_params"],
                r["train_s"],
            ]
            for r in doc["rows"]
        ],
    )
    print()
    print_table(
        [
            "method",
            "single",
            "fused",
            "avg drop (pts)",
            "sd (seeds)",
            "paper's drop (pts)",
            "single tok",
            "fused tok",
            "params",
            "train s",
            "peak RSS MB",
        ],
        [
            [
                s["method"],
                s["single_acc"],
                s["fused_acc"],
                s["avg_drop_points"],
                s["drop_sd_points"],
                s["paper_avg_drop_points"],
                s["single_tok_acc"],
                s["fused_tok_acc"],
                s["trainable_params"],
                s["train_s"],
                s["peak_rss_mb"],
            ]
            for s in doc["summary"]
        ],
    )
    print("(paper's drop: LLaMA-7B, BoolQ/PIQA/ARC-e, arXiv 2406.13175; ours: this run)")
    print(f"total {doc['total_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fusion", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, 3 tasks, 2 masks, few steps (seconds); with "
        "--hf: one mask, 3 steps, one seed (a smoke run of the real path, ~1-2 min)",
    )
    p.add_argument(
        "--hf",
        default=None,
        help="a real trained decoder: smollm2 (SmolLM2-135M-Instruct, fetched once) "
        "or a transformers directory; its tasks are benchmarks.real_tasks (default: the toy Llama)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per seed; mean and spread")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default 1)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="keep the PEFT adapter directories here")
    p.add_argument("--masks", nargs="+", choices=KINDS, default=None)
    p.add_argument("--tasks", nargs="+", choices=HELD_OUT + REAL_TASKS, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    if args.hf:
        cfg = replace(REAL_QUICK if args.quick else REAL, hf=args.hf)
        bad = [t for t in args.tasks or () if t not in REAL_TASKS]
    else:
        cfg = QUICK if args.quick else Config()
        bad = [t for t in args.tasks or () if t not in HELD_OUT]
    if bad:
        p.error(f"tasks {bad} are not tasks of this model (toy: {HELD_OUT}; --hf: {REAL_TASKS})")
    over = {"masks": args.masks, "tasks": args.tasks, "steps": args.steps, "seed": args.seed, "seeds": args.seeds}
    over["threads"] = args.threads
    if args.seed is not None and args.seeds is None:
        over["seeds"] = (args.seed,)  # one seed asked for: that one only
    cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items() if v is not None})
    doc = run(cfg, args.keep)
    report(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
