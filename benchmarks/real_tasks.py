"""Text tasks for adapters trained on the real model (SmolLM2-135M-Instruct, ``shira_runtime.pretrained``).

Each task is a rule over a small input space that the base model does not already follow, in a format of its
own (the fusion experiment's lesson: adapters whose tasks share one input format overwrite each other's):

- ``reverse``: ``"Reverse 4729:"`` -> ``" 9274"`` (four digits; digits are single tokens in this tokenizer)
- ``caesar``: ``"Caesar c a t e:"`` -> ``" d b u f"`` (four lowercase letters, each shifted by one, z -> a)
- ``date``: ``"Date 2024-03-17 as day/month:"`` -> ``" 17/03"`` (an ISO date, answered day/month)

Prompts are plain text (no chat template), answers are the tokens of the answer string followed by the
tokenizer's end token. Every prompt of a task tokenizes to the same length, so an evaluation set is one batch.
Held-out evaluation: ``eval_set`` draws inputs that ``Sampler`` never trains on (checked by input string).
Accuracy is exact match of the greedy answer tokens (``benchmarks.training.accuracy``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from benchmarks.fusion_tasks import EvalSet
from benchmarks.training import train

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _reverse(r: random.Random) -> tuple[str, str, str]:
    x = "".join(r.choice("0123456789") for _ in range(4))
    return x, f"Reverse {x}:", f" {x[::-1]}"


def _caesar(r: random.Random) -> tuple[str, str, str]:
    x = [r.choice(LETTERS) for _ in range(4)]
    y = [LETTERS[(LETTERS.index(c) + 1) % 26] for c in x]
    return "".join(x), f"Caesar {' '.join(x)}:", " " + " ".join(y)


def _date(r: random.Random) -> tuple[str, str, str]:
    y, m, d = r.randint(1950, 2049), r.randint(1, 12), r.randint(1, 28)
    return f"{y}-{m:02d}-{d:02d}", f"Date {y}-{m:02d}-{d:02d} as day/month:", f" {d:02d}/{m:02d}"


MAKERS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "reverse": _reverse,
    "caesar": _caesar,
    "date": _date,
}
TASKS = tuple(MAKERS)


class Tasks:
    """The tasks over one tokenizer: seeded evaluation sets and training batches that never meet them."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tok = tokenizer
        self.seed = seed
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.held_out: dict[str, set[str]] = {}

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def example(self, task: str, r: random.Random) -> tuple[str, list[int], list[int]]:
        key, prompt, answer = MAKERS[task](r)
        return key, self.ids(prompt), self.ids(answer)

    def eval_set(self, task: str, n: int) -> EvalSet:
        """``n`` distinct held-out examples of ``task`` (seeded); later batches never train on their inputs."""
        r = random.Random(f"{self.seed}/{task}/eval")
        keys, prompts, answers = set(), [], []
        while len(prompts) < n:
            key, p, a = self.example(task, r)
            if key in keys:
                continue
            keys.add(key)
            prompts.append(p)
            answers.append(a)
        if len({len(p) for p in prompts}) != 1 or len({len(a) for a in answers}) != 1:
            raise ValueError(f"task {task!r}: prompts or answers of different token lengths under this tokenizer")
        self.held_out.setdefault(task, set()).update(keys)
        return EvalSet(task, torch.tensor(prompts), torch.tensor(answers))

    def sampler(self, tasks: Sequence[str], seed: int = 0, weights: Sequence[float] | None = None) -> Sampler:
        return Sampler(self, tasks, seed, weights)


@dataclass
class Sampler:
    """Training batches ``(ids, labels)`` of a mixture of tasks, right-padded; labels are -100 except on the
    answer and the end token. Inputs held out by the ``Tasks``' evaluation sets are never drawn."""

    tasks: Tasks
    names: Sequence[str]
    seed: int = 0
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        self.r = random.Random(f"{self.tasks.seed}/{self.seed}/{'+'.join(self.names)}/train")

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for task in self.r.choices(list(self.names), weights=self.weights, k=size):
            banned = self.tasks.held_out.get(task, set())
            while True:
                key, p, a = self.tasks.example(task, self.r)
                if key not in banned:
                    break
            seq = p + a + [self.tasks.eos]
            rows.append(seq)
            labels.append([-100] * len(p) + a + [self.tasks.eos])
        width = max(map(len, rows))
        ids = torch.full((size, width), self.tasks.pad, dtype=torch.long)
        lab = torch.full((size, width), -100, dtype=torch.long)
        for i, (s, lb) in enumerate(zip(rows, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(lb)] = torch.tensor(lb)
        return ids, lab


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = {"shira": 5e-3, "lora": 3e-3}  # benchmarks.fusion.REAL's rates (a small sweep for single accuracy)


def train_adapter(
    base,
    tasks: Tasks,
    task: str,
    kind: str = "shira",
    steps: int = 30,
    batch: int = 8,
    rank: int = 4,
    seed: int = 0,
    threads: int = 1,
):
    """A PEFT model over a copy of ``base`` with one adapter (``kind`` shira: PEFT's random mask, or lora; r /
    rank ``rank``: 1.15% of SmolLM2's adapted weights) trained ``steps`` steps on ``task``; returned in eval mode.
    Runs on ``threads`` torch threads (restored after): one thread kept training robust on a shared 2-vCPU machine
    (two were 1.4x faster quiet, over 2.3x slower with the other vCPU busy)."""
    import copy
    import warnings

    import peft

    if kind == "shira":
        cfg = peft.ShiraConfig(r=rank, target_modules=list(TARGETS), random_seed=seed)
    elif kind == "lora":
        cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), lora_dropout=0.0)
    else:
        raise ValueError(f"kind must be shira or lora, got {kind!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: SHiRA's sparse tensors are a beta API of torch
            pm = peft.get_peft_model(copy.deepcopy(base), cfg)
            torch.manual_seed(seed)
            params = [p for p in pm.parameters() if p.requires_grad]
            train(pm, params, tasks.sampler([task], seed), steps, LR[kind], batch)
    finally:
        torch.set_num_threads(before)
    return pm.eval()
