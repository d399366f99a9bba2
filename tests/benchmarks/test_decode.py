"""benchmarks.decode --quick: an int8 bundle's decode step and prefill on live weights against a prepacked session,
and with ``--spin`` the same sessions with spinning threads, timed in blocks alternating with them."""

from __future__ import annotations

import json

from benchmarks import decode


def test_quick_int8_with_spinning_sessions(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert decode.main(["--quick", "--dtype", "int8", "--spin", "--repeats", "2", "--past", "8", "--prompt", "8",
                        "--json", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "live spinning ms" in printed and "default spinning ms" in printed
    doc = json.loads(out.read_text())
    assert doc["config"]["spin"] is True and doc["config"]["dtypes"] == ["int8"]
    rows = {r["phase"]: r for r in doc["rows"]}
    assert set(rows) == {"decode_step", "prefill_8"}
    for r in rows.values():
        assert r["dtype"] == "int8" and r["ratio"] > 0
        assert r["live_spin_ms"] > 0 and r["default_spin_ms"] > 0  # timed, not left empty
