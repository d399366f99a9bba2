"""benchmarks.real_decode --quick on the real model: the transformers row and the fp32 bundle's, measured in the
run; llama.cpp's row or the reason it is skipped."""

from __future__ import annotations

import json

import pytest

from benchmarks import real_decode

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")


@pytest.mark.slow
def test_quick_rows(smollm2_dir, tmp_path):
    out = tmp_path / "d.json"
    real_decode.main(["--quick", "--formats", "fp32", "--cache", str(tmp_path / "b"), "--json", str(out)])
    doc = json.loads(out.read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert list(rows)[:2] == ["transformers fp32 (torch)", "bundle fp32 (onnxruntime)"]
    for r in rows.values():
        assert r["first_token_ms"] > 0 and r["tokens_per_s"] > 0
    assert rows["transformers fp32 (torch)"]["x_transformers"] == 1.0
    b = rows["bundle fp32 (onnxruntime)"]
    assert b["switch_ms"] > 0 and b["first_token_after_switch_ms"] > 0 and b["first_switch_and_token_once_ms"] > 0
    assert ("llama.cpp Q4_1 (llama-cpp-python)" in rows) != ("llama.cpp Q4_1" in doc["skipped"])
    assert (tmp_path / "b" / "smollm2-fp32" / "manifest.json").is_file()  # built once into the cache given
