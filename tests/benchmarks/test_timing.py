"""The shared timer (benchmarks.timing) on a fake clock: which calls it counts, in what order, and its statistics."""

from __future__ import annotations

import pytest

from benchmarks import timing
from benchmarks.timing import Inference, InferTiming, Timing, cycle, cycles, once, time_ms


class Clock:
    """A fake ``perf_counter``: time moves only when a test function says it took ``ms``."""

    def __init__(self) -> None:
        self.s = 0.0

    def __call__(self) -> float:
        return self.s

    def spend(self, ms: float) -> None:
        self.s += ms / 1e3


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(timing, "perf_counter", c)
    return c


def test_timing_of_known_samples():
    t = Timing.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.p90_ms, t.runs) == (3.0, 5.0, 5)  # p90: sorted[round(0.9 * 4)] = sorted[4]
    assert t.samples_ms == (5.0, 1.0, 4.0, 2.0, 3.0)  # in the order taken
    t = Timing.of([float(x) for x in range(10, 0, -1)])
    assert (t.median_ms, t.p90_ms) == (5.5, 9.0)  # p90: sorted[round(8.1)] = sorted[8]
    assert Timing.of([7.0]) == Timing(7.0, 7.0, 1, (7.0,))


def test_once_reads_the_clock_around_the_call(clock):
    def work(x, y=0):
        clock.spend(12.5)
        return x + y

    assert once(work, 1, y=2) == (3, pytest.approx(12.5))


def test_cycle_excludes_the_first_call_and_alternates(clock):
    calls = []
    durations = {"A": iter([1000.0, 1.0, 1.0]), "B": iter([3.0, 3.0])}  # the warm-up A is slow: not counted

    def step(name):
        calls.append(name)
        clock.spend(next(durations[name]))

    t = cycle([lambda: step("A"), lambda: step("B")], 4)
    assert calls == ["A", "B", "A", "B", "A"]  # warm-up A, then B, A, B, A timed
    assert t.samples_ms == pytest.approx((3.0, 1.0, 3.0, 1.0))
    assert t.runs == 4 and t.median_ms == pytest.approx(2.0) and t.p90_ms == pytest.approx(3.0)


def test_cycles_take_turns_and_before_is_untimed(clock):
    calls = []

    def step(name, ms):
        def fn():
            calls.append(name)
            clock.spend(ms)

        return fn

    def before():
        calls.append("before")
        clock.spend(500.0)

    t = cycles({"x": [step("xA", 1.0), step("xB", 2.0)], "y": [step("yA", 10.0), step("yB", 20.0)]}, 2, before)
    assert calls == ["xA", "yA", "before", "xB", "before", "yB", "before", "xA", "before", "yA"]
    assert t["x"].samples_ms == pytest.approx((2.0, 1.0))
    assert t["y"].samples_ms == pytest.approx((20.0, 10.0))


def test_time_ms_is_a_cycle_of_one(clock):
    durations = iter([100.0, 1.0, 2.0, 3.0])
    t = time_ms(lambda: clock.spend(next(durations)), 3)
    assert t.samples_ms == pytest.approx((1.0, 2.0, 3.0))


class FakeRuntime:
    """A runtime whose run time depends on the state switched in: the base 10 ms per token row, ``m`` 15."""

    def __init__(self, clock: Clock, log: list) -> None:
        self.clock, self.log, self.state = clock, log, None

    def switch(self, name):
        self.log.append(("switch", name))
        self.clock.spend(1000.0)  # a slow switch: must never be timed
        self.state = name

    def __call__(self, x):
        self.log.append(("run", self.state, x))
        self.clock.spend((15.0 if self.state == "m" else 10.0) * x)


def test_inference_interleaves_with_the_base_and_skips_the_first_run(clock):
    log: list = []
    rt = FakeRuntime(clock, log)
    inf = Inference(rt, 1, 4, repeats=2).measure("m")
    assert log == 2 * [
        ("switch", None),
        ("run", None, 1),  # untimed: the first run after a switch
        ("run", None, 1),
        ("run", None, 4),
        ("switch", "m"),
        ("run", "m", 1),
        ("run", "m", 1),
        ("run", "m", 4),
    ] + [("switch", None)]  # left at the base
    assert (inf.one.median_ms, inf.batch.median_ms, inf.base_batch.median_ms) == pytest.approx((15.0, 60.0, 40.0))
    assert inf.one.runs == inf.batch.runs == 2
    assert inf.overhead == pytest.approx(1.5)
    assert rt.state is None


def test_inference_in_one_round_and_on_another_runtime(clock):
    log: list = []
    base, other = FakeRuntime(clock, log), FakeRuntime(clock, log)
    inf = Inference(base, 1, 2, repeats=2).measure("m", on=other, rounds=1)
    runs = [(e[1], e[2]) for e in log if e[0] == "run"]
    # one block of the base (warm-up + 2 x (one, batch)), then one of the method on ``other``
    assert runs == [
        (None, 1),
        (None, 1),
        (None, 2),
        (None, 1),
        (None, 2),
        ("m", 1),
        ("m", 1),
        ("m", 2),
        ("m", 1),
        ("m", 2),
    ]
    assert base.state is None and other.state is None
    assert inf.overhead == pytest.approx(1.5)


def test_base_inference_needs_no_switch_and_as_base_is_exactly_one(clock):
    log: list = []
    rt = FakeRuntime(clock, log)
    inf = Inference(rt, 1, 1, repeats=3).measure()
    assert not [e for e in log if e[0] == "switch"]
    assert isinstance(inf, InferTiming) and inf.as_base().overhead == 1.0


def test_interleave_takes_turns_pairs_ratios_and_warms_up_untimed(clock):
    """Subjects visited in turns (the order rotating each round), each visit warmed up untimed; ratios to the
    base paired sample by sample; a slow spell that hits the base and the method alike leaves ratios at 1."""
    state = {"active": None, "slow": 1.0}
    visits: list[str] = []

    def model(cost: float):
        def infer(x):
            clock.spend(cost * x * state["slow"])

        def generate(n):
            clock.spend((10 + 2 * cost * (n - 1)) * state["slow"])

        return infer, generate

    def subject(name, cost, gen=True):
        infer, generate = model(cost)
        return timing.Subject(name, lambda: state.update(active=name), infer, generate if gen else None)

    subjects = [subject("base", 1.0), subject("same", 1.0), subject("slower", 1.5, gen=False)]

    def on_visit(name):
        visits.append(name)
        state["slow"] = 3.0 if len(visits) > 8 else 1.0  # a slow spell: the second round

    out = timing.interleave(subjects, 1, 4, rounds=2, new=5, on_visit=on_visit)
    # per round: one token, the batch, then generation, each subject in turn (no generation: skipped)
    assert visits[:8] == ["base", "same", "slower"] * 2 + ["base", "same"]
    assert visits[8:11] == ["same", "slower", "base"]  # the second round starts one further
    same, slower = out["same"], out["slower"]
    assert same.infer.batch.samples_ms == pytest.approx((4.0, 12.0))
    assert same.infer.one.samples_ms == pytest.approx((1.0, 3.0))
    assert same.infer.overhead == pytest.approx(1.0) and same.decode_x_base == pytest.approx(1.0)
    assert slower.infer.overhead == pytest.approx(1.5) and slower.gen is None and slower.decode_x_base is None
    # 5 tokens after the first at 2 ms each (6 ms in the slow round): 5 / 10 ms = 500 tokens/s, paired
    assert out["base"].gen.first.samples_ms == pytest.approx((10.0, 30.0))
    assert out["base"].gen.decode_tokens_per_s == pytest.approx(5 / ((10 + 30) / 2 / 1e3))


def test_spread_is_the_relative_median_deviation():
    assert timing.spread(Timing.of([10.0, 10.0, 10.0])) == 0.0
    assert timing.spread(Timing.of([9.0, 10.0, 11.0, 10.0, 50.0])) == pytest.approx(0.1)
