"""benchmarks.atomic_cost runs, prints both rows with their figures, and leaves the switcher's buffer allocation as
shipped."""

from __future__ import annotations

import math

import pytest
from shira_runtime.switcher import Switcher

from benchmarks.atomic_cost import main

ROWS = ("marked, reused (shipped)", "fresh, unfilled (before)")


def test_atomic_cost_prints_both_rows_with_consistent_figures(capsys):
    shipped = Switcher._ungathered
    main(["--preset", "tiny", "--repeats", "3"])
    out = capsys.readouterr().out
    assert Switcher._ungathered is shipped
    figures = {}
    for label in ROWS:
        line = next(line for line in out.splitlines() if line.startswith(label))
        figures[label] = [float(x) for x in line[len(label) :].split()]  # switch ms, p90 ms, x unguarded
    for switch_ms, p90_ms, ratio in figures.values():
        assert all(math.isfinite(x) and x > 0 for x in (switch_ms, p90_ms, ratio))
        assert p90_ms >= switch_ms
    (shipped_ms, _, shipped_ratio), (before_ms, _, before_ratio) = figures[ROWS[0]], figures[ROWS[1]]
    assert before_ratio == 1.0
    # the printed ratio is the printed times' (to their 3 significant figures)
    assert shipped_ratio == pytest.approx(shipped_ms / before_ms, rel=0.02)
