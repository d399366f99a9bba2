"""Switches of block-mask adapters take their runs (``kernels.runs``) from registration: the weights equal the
reference path's bit for bit at every step (one adapter, fused adapters whose runs are found at planning, int8
codes), and the base comes back bit for bit."""

from __future__ import annotations

import pytest
import torch
from shira_runtime import Runtime, kernels
from shira_runtime.kernels import core
from shira_runtime.models import TARGETS, build
from shira_runtime.quantization import quantize
from shira_runtime.synthetic import random_shira

from tests.conftest import assert_bit_identical, snapshot

STATES = ["k", "j", ["k", "j"], "r", ["k", "r"], None, "k"]


def run_states(dtype: str) -> tuple[list[dict], Runtime]:
    m = build("tiny", torch.float32, seed=4)
    ads = {
        "k": random_shira(m, TARGETS, 0.05, seed=1, mask="block", line_dtype=torch.int8),
        "j": random_shira(m, TARGETS, 0.05, seed=2, mask="block"),  # fp32 lines: quarter lines on int8
        "r": random_shira(m, TARGETS, 0.05, seed=3),  # random: no runs
    }
    if dtype == "int8":
        m = quantize(m, "int8")
    elif dtype != "fp32":
        m = m.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    rt = Runtime.load(m)
    base = snapshot(m)
    for n, a in ads.items():
        rt.add_adapter(n, a)
    snaps = []
    for s in STATES:
        rt.switch(s, [1.0, -0.5] if isinstance(s, list) else None)
        snaps.append(snapshot(m))
    rt.switch(None)
    assert_bit_identical(m, base)
    return snaps, rt


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_block_adapters_switch_like_the_reference(dtype, monkeypatch):
    try:
        core.load()
    except Exception as exc:
        pytest.skip(f"kernel core unavailable: {exc}")
    monkeypatch.setenv("SHIRA_KERNELS", "torch")
    kernels.reset()
    want, _ = run_states(dtype)
    monkeypatch.setenv("SHIRA_KERNELS", "cpp")
    kernels.reset()
    try:
        got, rt = run_states(dtype)
        prepared = rt._switcher  # the registered adapters' runs
        assert rt._get("k").runs and rt._get("j").runs and not rt._get("r").runs
        fused = prepared.make_plan([(rt._get("k"), 1.0), (rt._get("j"), -0.5)])
        assert fused.runs  # the union's runs, found at planning
        for step, (g, w) in enumerate(zip(got, want)):
            for k in w:
                assert torch.equal(g[k], w[k]), f"step {step} ({STATES[step]}): {k}"
    finally:
        kernels.reset()
