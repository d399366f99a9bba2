"""The one timer of the benchmarks: every figure they print is a ``Timing`` taken here, one way.

- ``cycles`` / ``cycle``: switches A -> B -> A ..., each switch timed on its own, the first call (warm-up) not
  counted; several subjects (runtimes, kernel paths) take turns at each step, so a slow spell hits them alike.
  ``time_ms`` is a cycle of one function: the same loop for anything timed by repetition.
- ``Inference``: a method's inference (one token, and a batch) timed against the base's on the same backend,
  round by round, for the torch backend and the onnxruntime backend alike.
- ``generation``: what a user of a generating model feels: the first token after a prompt, and the decode rate
  of the tokens after it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    runs: int
    samples_ms: tuple[float, ...] = ()  # in the order they were taken

    @staticmethod
    def of(samples_ms: Sequence[float]) -> Timing:
        s = sorted(samples_ms)
        p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
        return Timing(statistics.median(s), p90, len(s), tuple(samples_ms))


def once(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn(*args, **kwargs)``'s result and its wall time in ms: the one clock reading every timing is made of."""
    t0 = perf_counter()
    out = fn(*args, **kwargs)
    return out, (perf_counter() - t0) * 1e3


def cycles(
    steps: dict[str, Sequence[Callable[[], object]]], repeats: int, before: Callable[[], object] | None = None
) -> dict[str, Timing]:
    """Each subject's steps in turn (A -> B -> A ...), ``repeats`` timed calls each, the subjects taking turns.

    The first call of each subject (its ``steps[0]``) is a warm-up, not counted; the timed calls continue the
    cycle from there (``steps[1]``, ``steps[2]`` ...). ``before`` runs untimed before every timed call.
    """
    for fns in steps.values():
        fns[0]()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(repeats):
        for k, fns in steps.items():
            if before is not None:
                before()
            samples[k].append(once(fns[(i + 1) % len(fns)])[1])
    return {k: Timing.of(v) for k, v in samples.items()}


def cycle(steps: Sequence[Callable[[], object]], repeats: int, before: Callable[[], object] | None = None) -> Timing:
    """One subject's ``cycles``: time each switch of an A -> B -> A ... cycle; the first call is not counted."""
    return cycles({"": steps}, repeats, before)[""]


def time_ms(fn: Callable[[], object], repeats: int) -> Timing:
    """``repeats`` timed calls of ``fn`` after one warm-up call (a cycle of one step)."""
    return cycle([fn], repeats)


@dataclass(frozen=True)
class InferTiming:
    """A method's inference against the base's, timed in the same rounds."""

    one: Timing  # one token
    batch: Timing  # a batch of tokens
    base_batch: Timing  # the base, the same batch, interleaved with ``batch``
    paired: float | None = None  # the median of the batch / base batch ratios, sample by sample (``interleave``)

    @property
    def overhead(self) -> float:
        """The method's batch time over the base's (1.0 = none): the paired ratio, or the ratio of the medians."""
        return self.paired if self.paired is not None else self.batch.median_ms / self.base_batch.median_ms

    def as_base(self) -> InferTiming:
        """These timings as the base's own: the overhead is 1 by definition."""
        return replace(self, base_batch=self.batch, paired=None)


class Inference:
    """Inference timings (one token, and a batch, full-sequence forward) of a method against the base.

    ``base`` is a runtime (a callable with ``switch``) left at its base state; ``one`` and ``batch`` are its
    inputs. A method's timings interleave with the base's, round by round (the switches between them are not
    timed), so a slow spell of a noisy machine hits both alike.
    """

    def __init__(self, base: Any, one: Any, batch: Any, repeats: int) -> None:
        self.base, self.one, self.batch, self.repeats = base, one, batch, repeats

    def measure(
        self, state: str | None = None, run: Any = None, on: Any = None, rounds: int | None = None
    ) -> InferTiming:
        """Time ``run`` (default: ``on``) with ``state`` switched in on ``on`` (default: the base runtime).

        Each round switches ``on`` to the base and times ``repeats // rounds`` runs of the base, then switches
        ``state`` in and times as many runs of the method; the first run after each switch is not counted (it
        pays for cold caches). The default is one run per round (fully interleaved); a method whose switch moves
        gigabytes (fused LoRA) takes one round, because that traffic, untimed, still slows the runs right after
        it. ``on`` is left at the base.
        """
        on = on if on is not None else self.base
        run = run if run is not None else on
        rounds = rounds or self.repeats
        per = max(1, self.repeats // rounds)
        base_one: list[float] = []
        base_batch: list[float] = []
        one: list[float] = []
        batch: list[float] = []
        sides = ((self.base, None, base_one, base_batch), (run, state, one, batch))
        for _ in range(rounds):
            for fn, target, into_one, into_batch in sides:
                if state is not None:
                    on.switch(target)
                fn(self.one)  # untimed
                for _ in range(per):
                    into_one.append(once(fn, self.one)[1])
                    into_batch.append(once(fn, self.batch)[1])
        if state is not None:
            on.switch(None)
        return InferTiming(Timing.of(one), Timing.of(batch), Timing.of(base_batch))


@dataclass(frozen=True)
class GenTiming:
    """A generation after a prompt: the first new token, and the whole of ``1 + new`` tokens."""

    first: Timing  # the prompt's prefill and the first token
    total: Timing  # 1 + new tokens
    new: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        """The ``new`` tokens after the first, per second of the time they added (the median of the paired
        differences, else of the medians'); None where neither resolves that time (too few tokens or repeats)."""
        pairs = zip(self.total.samples_ms, self.first.samples_ms)
        added = statistics.median(t - f for t, f in pairs) if self.total.samples_ms and self.first.samples_ms else 0.0
        added = added if added > 0 else self.total.median_ms - self.first.median_ms
        return self.new / (added / 1e3) if added > 0 else None


def generation(generate: Callable[[int], object], new: int, repeats: int) -> GenTiming:
    """Time ``generate(n)`` (n tokens after a fixed prompt) for one token and for ``1 + new``, the two taking
    turns, ``repeats`` timed calls each after a warm-up."""
    t = cycles({"first": [lambda: generate(1)], "total": [lambda: generate(1 + new)]}, repeats)
    return GenTiming(t["first"], t["total"], new)


@dataclass(frozen=True)
class Subject:
    """One state of a model that ``interleave`` visits: how to get there (untimed), and what it runs there."""

    name: str
    enter: Callable[[], object]  # e.g. switch the method in
    infer: Callable[[Any], object]  # one forward over an input
    generate: Callable[[int], object] | None = None  # n new tokens after a fixed prompt (None: no generation)
    leave: Callable[[], object] | None = None  # undo ``enter`` where the next subject's ``enter`` cannot


@dataclass(frozen=True)
class Measured:
    """What ``interleave`` measured for one subject: inference against the base, and generation."""

    infer: InferTiming
    gen: GenTiming | None
    decode_x_base: float | None = None  # median over the rounds of this decode rate / the base's (paired)


def interleave(
    subjects: Sequence[Subject],
    one: Any,
    batch: Any,
    rounds: int,
    new: int,
    on_visit: Callable[[str], object] | None = None,
) -> dict[str, Measured]:
    """Inference and generation of every subject, the subjects taking turns, so that a slow spell of the
    machine hits them alike; medians over the rounds, and ratios to the base paired round by round.

    ``subjects[0]`` is the base that every ratio compares against. Each round times one token, then the batch,
    then a generation (the first token, and ``1 + new`` tokens) of every subject in turn, the order rotating
    each round: a subject's sample and the base's are seconds apart at most. Each visit enters the subject and
    warms it up untimed (one token: the caches after a switch; in the first round also a whole generation)."""
    kinds = {"one": [], "batch": [], "first": [], "total": []}
    samples: dict[str, dict[str, list[float]]] = {s.name: {k: [] for k in kinds} for s in subjects}
    for r in range(rounds):
        k = r % len(subjects)
        order = [*subjects[k:], *subjects[:k]]
        for kind in ("one", "batch", "gen"):
            for s in order:
                if kind == "gen" and s.generate is None:
                    continue
                if on_visit is not None:
                    on_visit(s.name)
                s.enter()
                try:
                    s.infer(one)
                    into = samples[s.name]
                    if kind == "gen":
                        if r == 0:
                            s.generate(1 + new)
                        into["first"].append(once(s.generate, 1)[1])
                        into["total"].append(once(s.generate, 1 + new)[1])
                    else:
                        into[kind].append(once(s.infer, one if kind == "one" else batch)[1])
                finally:
                    if s.leave is not None:
                        s.leave()
    base = samples[subjects[0].name]
    out = {}
    for s in subjects:
        t = samples[s.name]
        ratio = statistics.median(x / b for x, b in zip(t["batch"], base["batch"]))
        infer = InferTiming(Timing.of(t["one"]), Timing.of(t["batch"]), Timing.of(base["batch"]), ratio)
        gen, decode = None, None
        if t["first"]:
            gen = GenTiming(Timing.of(t["first"]), Timing.of(t["total"]), new)
            rates = [
                (b1 - b0) / (x1 - x0)
                for x0, x1, b0, b1 in zip(t["first"], t["total"], base["first"], base["total"])
                if x1 > x0 and b1 > b0  # rounds whose decode time a slow first token did not swallow
            ]
            decode = statistics.median(rates) if rates else None
        out[s.name] = Measured(infer, gen, decode)
    return out


def spread(t: Timing) -> float:
    """How far a subject's repeated samples scatter: their median absolute deviation over their median (0:
    identical runs; robust to one slow run in five)."""
    if not t.samples_ms or not t.median_ms:
        return 0.0
    return statistics.median(abs(x - t.median_ms) for x in t.samples_ms) / t.median_ms
