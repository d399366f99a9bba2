"""benchmarks.real_survival --quick on the real model: a row per base format with SHiRA on the grid, LoRA fused
the PEFT way and LoRA unfused, measured in the run; trained adapters kept and reused."""

from __future__ import annotations

import json

import pytest

from benchmarks import real_survival

pytest.importorskip("peft")


@pytest.mark.slow
def test_quick_rows_per_format_and_adapters_reused(smollm2_dir, tmp_path):
    args = ["--quick", "--formats", "fp32", "int8", "--keep", str(tmp_path / "a"), "--json", str(tmp_path / "s.json")]
    real_survival.main(args)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert [r["format"] for r in doc["rows"]] == ["fp32", "int8"]
    for r in doc["rows"]:
        for k in ("shira_acc", "lora_fused_acc", "lora_unfused_acc", "shira_unmoved"):
            assert 0.0 <= r[k] <= 1.0, (r["format"], k)
        assert r["shira_switch_ms"] > 0 and r["lora_fused_switch_ms"] > 0
        assert 0 <= r["shira_saturated"] < r["shira_entries"]
        assert 0.01 < r["shira_entries"] / 106_168_320 < 0.02  # r 4 on SmolLM2's adapted linears
    int8 = doc["rows"][1]
    assert int8["shira_unmoved"] > 0  # some deltas are finer than the int8 grid: counted, not hidden
    kept = sorted(p.parent.name + "/" + p.name for p in (tmp_path / "a").glob("*/*"))
    assert kept == ["lora/reverse", "shira/reverse"]
    mtime = (tmp_path / "a" / "shira" / "reverse" / "adapter_model.safetensors").stat().st_mtime_ns
    # a second run reuses the trained adapters
    real_survival.main(["--quick", "--formats", "fp32", "--keep", str(tmp_path / "a")])
    assert (tmp_path / "a" / "shira" / "reverse" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
