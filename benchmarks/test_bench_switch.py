"""pytest-benchmark suite for the switch paths on the tiny preset; every timed call checks its result.

python -m pytest benchmarks/ --benchmark-enable          # timed (plain `pytest` runs each case once)
"""

from __future__ import annotations

import pytest
import torch
from shira_runtime import Runtime, kernels
from shira_runtime.kernels.dtypes import SHORT
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_lora, random_shira


@pytest.fixture(params=sorted(SHORT))
def setup(request):
    m = build("tiny", SHORT[request.param].torch, seed=0)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.02, seed=1))
    rt.add_adapter("b", random_shira(m, TARGETS, 0.02, seed=2))
    rt.add_adapter("la", random_lora(m, TARGETS, 8, seed=3))
    rt.add_adapter("lb", random_lora(m, TARGETS, 8, seed=4))
    rt.add_adapter("ua", random_lora(m, TARGETS, 8, seed=3), mode="unfused")
    rt.add_adapter("ub", random_lora(m, TARGETS, 8, seed=4), mode="unfused")
    states = {}
    for name in ("a", "b", "la", "lb"):
        rt.switch(name)
        states[name] = {k: v.clone() for k, v in m.state_dict().items()}
    rt.switch(None)
    states[None] = {k: v.clone() for k, v in m.state_dict().items()}
    return m, rt, states


def check(m, want):
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_shira_switch(benchmark, setup, path, monkeypatch):
    monkeypatch.setenv("SHIRA_KERNELS", path)
    kernels.reset()
    if path == "cpp" and kernels.backend() != "cpp":
        pytest.skip("C++ extension unavailable")
    m, rt, states = setup
    rt.switch("a")

    def a_to_b_to_a():
        rt.switch("b")
        rt.switch("a")

    benchmark(a_to_b_to_a)
    check(m, states["a"])
    rt.switch(None)
    check(m, states[None])
    kernels.reset()


def test_lora_fused_switch(benchmark, setup):
    m, rt, states = setup
    rt.switch("la")
    benchmark(lambda: (rt.switch("lb"), rt.switch("la")))
    check(m, states["la"])


def test_lora_unfused_switch(benchmark, setup):
    m, rt, states = setup
    rt.switch("ua")
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    benchmark(lambda: (rt.switch("ub"), rt.switch("ua")))
    check(m, states[None])  # unfused: the weights stay the base's
    got = rt(x)
    rt.switch("la")
    want = rt(x)
    # fused rounds W + s*B@A to the weight dtype once (bf16: 2^-8 relative), unfused adds in the activations:
    # the two differ by rounding, which scales with the logits' size
    tol = 2e-2 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=tol, rtol=2e-2)
