"""benchmarks.atomic_cost runs, prints both rows, and leaves the switcher's buffer allocation as shipped."""

from __future__ import annotations

from shira_runtime.switcher import Switcher

from benchmarks.atomic_cost import main


def test_atomic_cost_runs_and_restores_the_switcher(capsys):
    shipped = Switcher._ungathered
    main(["--preset", "tiny", "--repeats", "3"])
    out = capsys.readouterr().out
    assert "marker-filled, reused (shipped)" in out and "fresh, unfilled (before)" in out
    assert Switcher._ungathered is shipped
