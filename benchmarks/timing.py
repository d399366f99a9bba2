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

    @property
    def overhead(self) -> float:
        """The method's batch median over the base's (1.0 = none)."""
        return self.batch.median_ms / self.base_batch.median_ms

    def as_base(self) -> InferTiming:
        """These timings as the base's own: the overhead is 1 by definition."""
        return replace(self, base_batch=self.batch)


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
        """The ``new`` tokens after the first, per second of the time they added (medians); None where the medians
        do not resolve that time (the whole took no longer than the first token: too few tokens or repeats)."""
        added = self.total.median_ms - self.first.median_ms
        return self.new / (added / 1e3) if added > 0 else None


def generation(generate: Callable[[int], object], new: int, repeats: int) -> GenTiming:
    """Time ``generate(n)`` (n tokens after a fixed prompt) for one token and for ``1 + new``, the two taking
    turns, ``repeats`` timed calls each after a warm-up."""
    t = cycles({"first": [lambda: generate(1)], "total": [lambda: generate(1 + new)]}, repeats)
    return GenTiming(t["first"], t["total"], new)
