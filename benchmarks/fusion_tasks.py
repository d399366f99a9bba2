"""Synthetic sequence tasks for ``benchmarks.fusion``: a tiny vocabulary, seeded example sets, batches.

Every example is ``[TASK] x1 .. xn [SEP] y1 .. ym [EOS]``: a task token says what to do with the input, the
answer follows the separator. Inputs have a fixed length per held-out task, so a task's prompts stack into one
batch without padding (greedy evaluation feeds the prompts ``[TASK] x [SEP]`` as they are).

- Base tasks (the base model's general skill, trained first): ``copy``, ``increment`` (each digit + 1 mod 10),
  ``rotate`` (first element moved to the end), ``max`` (of digits), ``next`` (distinct symbols, then one of
  them: the symbol after it); inputs of 3 to 8 digits or letters.
- Held-out tasks (one adapter each, never seen by the base): ``reverse`` (6 digits), ``sort`` (6 letters),
  ``recall`` (4 letter-digit pairs, then a letter: its digit), ``modadd`` (``a_i + b_i`` mod 10 for two strings of
  4 digits). The inputs of reverse, sort and recall differ in alphabet or shape, as the paper's tasks (BoolQ,
  PIQA, ARC-e) differ in format: when every task saw the same inputs and only the task token told them apart,
  fused adapters answered no task at all (each adapter rewrites the whole input space; measured). modadd reached
  no accuracy with this model's adapters (a 100-entry addition table), so the default run leaves it out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PAD, SEP, EOS = 0, 1, 2
DIGIT0 = 3  # digits 0..9 are tokens 3..12
N_DIGITS, N_LETTERS = 10, 16
LETTER0 = DIGIT0 + N_DIGITS  # letters a..p are tokens 13..28
BASE_TASKS = ("copy", "increment", "rotate", "max", "next")
HELD_OUT = ("reverse", "sort", "recall", "modadd")
_FIRST_TASK = LETTER0 + N_LETTERS
TASK_TOKEN = {name: _FIRST_TASK + i for i, name in enumerate(BASE_TASKS + HELD_OUT)}
VOCAB = _FIRST_TASK + len(TASK_TOKEN)

Example = tuple[list[int], list[int]]  # (input tokens, answer tokens), without task token, SEP, EOS


def _digits(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, N_DIGITS, (n,), generator=g).tolist()


def _symbols(g: torch.Generator, n: int) -> list[int]:
    """Digits and letters mixed (tokens), so the base also learns the letters' embeddings."""
    return (DIGIT0 + torch.randint(0, N_DIGITS + N_LETTERS, (n,), generator=g)).tolist()


def _tok(digits: Sequence[int]) -> list[int]:
    return [DIGIT0 + d for d in digits]


def _copy(g: torch.Generator, n: int) -> Example:
    x = _symbols(g, n)
    return x, list(x)


def _increment(g: torch.Generator, n: int) -> Example:
    x = _digits(g, n)
    return _tok(x), _tok([(d + 1) % N_DIGITS for d in x])


def _rotate(g: torch.Generator, n: int) -> Example:
    x = _symbols(g, n)
    return x, x[1:] + x[:1]


def _max(g: torch.Generator, n: int) -> Example:
    x = _digits(g, n)
    return _tok(x), _tok([max(x)])


def _next(g: torch.Generator, n: int) -> Example:
    x = (DIGIT0 + torch.randperm(N_DIGITS + N_LETTERS, generator=g)[:n]).tolist()
    q = int(torch.randint(0, n - 1, (1,), generator=g))
    return [*x, x[q]], [x[q + 1]]


def _reverse(g: torch.Generator, n: int) -> Example:
    x = _digits(g, n)
    return _tok(x), _tok(x[::-1])


def _sort(g: torch.Generator, n: int) -> Example:
    x = (LETTER0 + torch.randint(0, N_LETTERS, (n,), generator=g)).tolist()
    return x, sorted(x)


def _modadd(g: torch.Generator, n: int) -> Example:
    half = n // 2
    a, b = _digits(g, half), _digits(g, half)
    return _tok(a + b), _tok([(u + v) % N_DIGITS for u, v in zip(a, b)])


def _recall(g: torch.Generator, n: int) -> Example:
    pairs = n // 2
    keys = torch.randperm(N_LETTERS, generator=g)[:pairs].tolist()  # distinct keys
    values = _digits(g, pairs)
    q = int(torch.randint(0, pairs, (1,), generator=g))
    x = [t for k, v in zip(keys, values) for t in (LETTER0 + k, DIGIT0 + v)] + [LETTER0 + keys[q]]
    return x, [DIGIT0 + values[q]]


MAKERS: dict[str, Callable[[torch.Generator, int], Example]] = {
    "copy": _copy,
    "increment": _increment,
    "rotate": _rotate,
    "max": _max,
    "next": _next,
    "reverse": _reverse,
    "sort": _sort,
    "modadd": _modadd,
    "recall": _recall,
}
INPUT_LENGTH = {"reverse": 6, "sort": 6, "modadd": 8, "recall": 8}  # held-out tasks: fixed lengths
BASE_LENGTHS = (3, 8)  # base tasks: input lengths drawn from this range (inclusive)


def sequence(task: str, ex: Example) -> list[int]:
    """The full training sequence of one example."""
    x, y = ex
    return [TASK_TOKEN[task], *x, SEP, *y, EOS]


def _seed(seed: int, task: str, split: str) -> int:
    return seed * 1_000_003 + (sum(map(ord, task)) * 7919 + sum(map(ord, split))) % 1_000_003


@dataclass(frozen=True)
class EvalSet:
    """Held-out examples of one task: ``prompts`` ``[N, 1 + n + 1]`` (task, input, SEP), ``answers`` ``[N, m]``."""

    task: str
    prompts: torch.Tensor
    answers: torch.Tensor


def eval_set(task: str, n: int, seed: int) -> EvalSet:
    """``n`` distinct examples of a held-out task (seeded); ``Sampler`` never trains on them."""
    g = torch.Generator().manual_seed(_seed(seed, task, "eval"))
    seen: set[tuple[int, ...]] = set()
    prompts, answers = [], []
    tries = 0
    while len(prompts) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"eval_set({task!r}): could not draw {n} distinct examples")
        x, y = MAKERS[task](g, INPUT_LENGTH[task])
        if tuple(x) in seen:
            continue
        seen.add(tuple(x))
        prompts.append([TASK_TOKEN[task], *x, SEP])
        answers.append(y)
    return EvalSet(task, torch.tensor(prompts), torch.tensor(answers))


class Sampler:
    """Seeded training batches of ``tasks`` (a mixture, uniform or by ``weights``), never an input of the
    ``exclude`` eval sets.

    A batch is ``(ids [B, L], labels [B, L])``, right-padded; ``labels`` is -100 except on the answer and EOS
    (the loss trains the answer given the prompt, as the evaluation asks)."""

    def __init__(
        self, tasks: Sequence[str], seed: int, exclude: Sequence[EvalSet] = (), weights: Sequence[float] | None = None
    ) -> None:
        self.tasks = tuple(tasks)
        self.weights = torch.tensor([1.0] * len(self.tasks) if weights is None else list(weights), dtype=torch.float64)
        self.g = torch.Generator().manual_seed(_seed(seed, "+".join(self.tasks), "train"))
        self.banned = {(e.task, tuple(p[1:-1].tolist())) for e in exclude for p in e.prompts}

    def example(self, task: str) -> Example:
        while True:
            n = INPUT_LENGTH.get(task) or int(
                torch.randint(BASE_LENGTHS[0], BASE_LENGTHS[1] + 1, (1,), generator=self.g)
            )
            x, y = MAKERS[task](self.g, n)
            if (task, tuple(x)) not in self.banned:
                return x, y

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.multinomial(self.weights, size, replacement=True, generator=self.g).tolist()
        rows, labels = [], []
        for i in picks:
            task = self.tasks[i]
            x, y = self.example(task)
            seq = sequence(task, (x, y))
            rows.append(seq)
            answer_from = len(x) + 2  # the answer's first token (after task token, input, SEP)
            labels.append([-100] * answer_from + seq[answer_from:])
        width = max(map(len, rows))
        ids = torch.full((size, width), PAD, dtype=torch.long)
        lab = torch.full((size, width), -100, dtype=torch.long)
        for r, (seq, lb) in enumerate(zip(rows, labels)):
            ids[r, : len(seq)] = torch.tensor(seq)
            lab[r, : len(lb)] = torch.tensor(lb)
        return ids, lab
