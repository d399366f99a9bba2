"""benchmarks.switch_rows.Row: the one row type of the switch table, built the same way for both backends."""

from __future__ import annotations

import pytest

from benchmarks.switch_rows import Row
from benchmarks.timing import InferTiming, Timing


def test_row_of_a_switch_and_its_inference():
    infer = InferTiming(one=Timing.of([2.0, 3.0, 4.0]), batch=Timing.of([30.0]), base_batch=Timing.of([20.0]))
    r = Row.of("shira", "onnxruntime/live", "fp32", Timing.of([1.0, 2.0, 9.0]), 128, "n", infer, floor_ms=0.5)
    assert (r.switch_ms, r.switch_p90_ms, r.floor_ms, r.floor_ratio) == (2.0, 9.0, 0.5, 4.0)
    assert (r.infer_ms, r.infer_b1_ms, r.infer_overhead) == (30.0, 3.0, 1.5)
    assert (r.bytes_written, r.note) == (128, "n") and r.rss_mb > 0


def test_base_row_has_no_switch_and_overhead_one():
    infer = InferTiming(one=Timing.of([2.0]), batch=Timing.of([21.0]), base_batch=Timing.of([20.0]))
    r = Row.of("base", "torch", "bf16", None, 0, "no adapter", infer.as_base())
    assert (r.switch_ms, r.switch_p90_ms, r.floor_ms, r.floor_ratio) == (0.0, 0.0, None, None)
    assert r.infer_ms == 21.0 and r.infer_overhead == 1.0


def test_with_infer_fills_only_the_inference_columns():
    r = Row.of("lora_fused", "torch/unmerge-merge", "fp32", Timing.of([5.0]), 10, "x")
    assert r.infer_ms is None
    infer = InferTiming(one=Timing.of([1.0]), batch=Timing.of([8.0]), base_batch=Timing.of([4.0]))
    r2 = r.with_infer(infer)
    assert (r2.infer_ms, r2.infer_b1_ms, r2.infer_overhead) == (8.0, 1.0, pytest.approx(2.0))
    assert (r2.switch_ms, r2.rss_mb, r2.note) == (r.switch_ms, r.rss_mb, r.note)
