"""The fuzz harness itself: a hanging case is cut off and counted as a failure, never waited for."""

from __future__ import annotations

import time

from tests.fuzz.harness import TALLIES, Case, Outcome, run_family


def test_a_hanging_case_is_interrupted_and_fails():
    cases = [Case("guard_selftest", 0, {"op": "sleep 30 s"}, lambda p: None)]
    t0 = time.perf_counter()
    tally = run_family("guard_selftest", cases, lambda case: (time.sleep(30), Outcome("equal"))[1], budget_s=0.5)
    del TALLIES["guard_selftest"]  # not a fuzz family: keep it out of the summary
    assert time.perf_counter() - t0 < 5
    assert tally.cases == 1 and tally.equal == 0
    assert [out.group for _, out in tally.failures] == ["hang: the case ran past its budget"]
