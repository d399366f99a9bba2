"""The load test's pieces without Ray: the workload it sends, and how it counts switches and wrong replies."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from benchmarks.serve_load import QUICK, Arrival, Outcome, summarize, workload

NAMES = [f"shira{i:02d}" for i in range(8)]


def test_workload_is_seeded_poisson_with_zipf_popularity():
    cfg = replace(QUICK, rate_rps=20.0, duration_s=30.0)
    pool, arrivals = workload(cfg, NAMES, cfg.duration_s)
    assert (pool, arrivals) == workload(cfg, NAMES, cfg.duration_s)  # the same sequence for every run
    assert len(pool) == cfg.prompts and all(len(p) == cfg.prompt for p in pool)
    times = [a.at_s for a in arrivals]
    assert times == sorted(times) and 0 < times[0] and times[-1] < cfg.duration_s
    assert 0.8 * 600 < len(arrivals) < 1.2 * 600  # 20 rps for 30 s (Poisson: sd ~25)
    counts = Counter(a.adapter for a in arrivals)
    assert counts.most_common(1)[0][0] == "shira00"  # rank 1 is the most popular
    assert counts["shira00"] > 3 * counts.get("shira07", 0)  # Zipf 1.1: 8 ** 1.1 ~ 10x apart
    other = workload(replace(cfg, seed=1), NAMES, cfg.duration_s)[1]
    assert other != arrivals


def reply(adapter, tokens, replica="r1", seq=1, switched=True, batch=1):
    return {
        "adapter": adapter,
        "tokens": tokens,
        "replica": replica,
        "switch_seq": seq,
        "switched": switched,
        "switch_ms": 2.0,
        "batch": batch,
    }


def test_summary_counts_switches_once_and_every_wrong_reply():
    table = {("a", 0): [1, 2], (None, 0): [3, 4], ("b", 0): [5, 6]}
    outcomes = [
        # one group of two on r1 after one switch: one switch, not two
        Outcome(Arrival(0.0, "a", 0), reply("a", [1, 2], "r1", 1, True, 2), done_s=0.1, attempts=1),
        Outcome(Arrival(0.0, "a", 0), reply("a", [1, 2], "r1", 1, True, 2), done_s=0.1, attempts=1),
        # the same switch count on another replica is another switch
        Outcome(Arrival(0.1, "b", 0), reply("b", [5, 6], "r2", 1, True), done_s=0.3, attempts=2),
        # no switch: the adapter was active
        Outcome(Arrival(0.2, "b", 0), reply("b", [5, 6], "r2", 1, False), done_s=0.4, attempts=1),
        # wrong: another adapter answered; wrong: the right name with another adapter's tokens
        Outcome(Arrival(0.3, "a", 0), reply("b", [5, 6], "r2", 1, False), done_s=0.5, attempts=1),
        Outcome(Arrival(0.4, "a", 0), reply("a", [3, 4], "r1", 2, True), done_s=1.0, attempts=1),
        # no answer after the retries
        Outcome(Arrival(0.5, "a", 0), None, done_s=2.0, attempts=3, error="ActorDiedError: gone"),
    ]
    row = summarize("affinity", [outcomes[:3], outcomes[3:]], table)
    assert (row.requests, row.failed, row.retried) == (6, 1, 1)
    assert row.switches == 3 and row.switch_ms == pytest.approx(6.0)
    assert row.switches_per_request == pytest.approx(0.5)
    assert row.wrong == 2
    # two runs: 0 s -> 0.3 s (first arrival -> last answer) and 0.2 s -> 1 s (a failed request is no answer)
    assert row.throughput_rps == pytest.approx(6 / (0.3 + 0.8))
    assert row.p50_ms == pytest.approx(200.0)  # latencies 100 100 200 200 200 600
    assert row.busiest_share == pytest.approx(3 / 6)  # r1 and r2 answered 3 each
    assert row.distinct == pytest.approx(1.0)  # every right answer differs from the base's
