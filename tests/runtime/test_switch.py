"""Switching semantics: values, fusion, exact revert over many switches, stats, using()."""

from __future__ import annotations

import math
import random

import pytest
import torch
from shira_runtime import Runtime, ShiraError, SparseAdapter
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_lora, random_shira

from tests.conftest import assert_bit_identical, bits, snapshot


def expected_sparse(base: dict, adapters: list[tuple[SparseAdapter, float]], name: str, dtype) -> torch.Tensor:
    """dtype(base_fp32 + sum_i fp32(w_i * s_i) * delta_i), the sum in fp32 in order: the documented formula."""
    w = base[name].float().clone().reshape(-1)
    total = torch.zeros_like(w)
    for ad, weight in adapters:
        if name in ad.indices:
            alpha = float(torch.tensor(weight * ad.scale, dtype=torch.float32))
            total.index_add_(0, ad.indices[name].long(), ad.values[name].float() * alpha)
    return (w + total).to(dtype).reshape(base[name].shape)


def test_single_and_fused_values_match_formula(dtype):
    m = build("tiny", dtype, seed=1)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    a = random_shira(m, TARGETS, 0.1, seed=1, std=0.05)
    b = random_shira(m, TARGETS, 0.1, seed=2, std=0.05)  # overlaps a on ~1% of positions
    b.scale = 0.5
    rt = Runtime.load(m)
    rt.add_adapter("a", a)
    rt.add_adapter("b", b)
    for names, weights in ((["a"], [1.0]), (["a", "b"], [1.0, 0.7]), (["b", "a"], [-0.3, 2.0]), (["b"], [1.0])):
        rt.switch(names, weights)
        assert rt.active == tuple(zip(names, weights))
        ads = [({"a": a, "b": b}[n], w) for n, w in zip(names, weights)]
        for name in a.indices:
            assert torch.equal(bits(m.state_dict()[name]), bits(expected_sparse(base, ads, name, dtype))), name
    rt.switch(None)
    assert rt.active == ()
    assert_bit_identical(m, {k: bits(v) for k, v in base.items()})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_soak_1000_random_switches_then_base_bit_for_bit(dtype):
    m = build("tiny", dtype, seed=3)
    snap = snapshot(m)
    rt = Runtime.load(m)
    names = []
    for i in range(4):
        rt.add_adapter(f"s{i}", random_shira(m, TARGETS, 0.05, seed=10 + i, std=0.02))
        names.append(f"s{i}")
    rt.add_adapter("lora", random_lora(m, ["q_proj", "down_proj"], rank=2, seed=5))
    names.append("lora")
    rng = random.Random(0)
    for step in range(1000):
        r = rng.random()
        if r < 0.15:
            rt.switch(None)
            want = ()
        elif r < 0.6:
            one = rng.choice(names[:4])
            rt.switch(one)
            want = ((one, 1.0),)
        else:
            chosen = rng.sample(names, rng.randint(2, 3))
            weights = [rng.uniform(-1.5, 1.5) for _ in chosen]
            rt.switch(chosen, weights)
            want = tuple(zip(chosen, weights))
        assert rt.active == want, f"step {step}"
    rt.switch(None)
    assert_bit_identical(m, snap)


def test_lora_fused_equals_dense_formula_and_reverts_exactly(dtype):
    m = build("tiny", dtype, seed=4)
    snap = snapshot(m)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    lora = random_lora(m, TARGETS, rank=4, seed=2)
    rt = Runtime.load(m)
    rt.add_adapter("l", lora)
    rt.switch("l", 0.5)
    for name in lora.A:
        alpha = float(torch.tensor(0.5 * lora.scaling[name], dtype=torch.float32))
        want = (
            base[name].float() + torch.addmm(torch.zeros(base[name].shape), lora.B[name], lora.A[name], alpha=alpha)
        ).to(dtype)
        assert torch.equal(bits(m.state_dict()[name]), bits(want)), name
    rt.switch(None)
    assert_bit_identical(m, snap)


def test_stats_using_and_remove():
    m = build("tiny", torch.float32)
    rt = Runtime.load(m)
    a = random_shira(m, TARGETS, 0.05, seed=1)
    rt.add_adapter("a", a)
    rt.add_adapter("b", random_shira(m, TARGETS, 0.05, seed=2))
    stats = rt.switch("a")
    assert stats.elements_written == a.nnz and stats.bytes_touched == 2 * 4 * a.nnz
    assert math.isfinite(stats.ms) and stats.ms > 0 and stats.kernels in ("cpp", "torch")
    assert stats.active == (("a", 1.0),)
    with rt.using("b") as s:
        assert rt.active == (("b", 1.0),) and s.elements_written == 2 * a.nnz
    assert rt.active == (("a", 1.0),)
    with pytest.raises(ShiraError, match="'a' is active"):
        rt.remove_adapter("a")
    assert rt.adapters == ("a", "b") and rt.active == (("a", 1.0),)  # the refused removal changed nothing
    rt.remove_adapter("b")
    assert rt.adapters == ("a",)
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        rt.switch("b")


def test_zero_overhead_after_switch_outputs_match_merged_module():
    """After a sparse switch the module runs its own code path on the fused weights."""
    m = build("tiny", torch.float32, seed=7)
    ref = build("tiny", torch.float32, seed=7)
    a = random_shira(m, TARGETS, 0.05, seed=3, std=0.05)
    rt = Runtime.load(m)
    rt.add_adapter("a", a)
    rt.switch("a")
    with torch.no_grad():
        for name in a.indices:
            p = ref.get_parameter(name)
            p.view(-1).index_add_(0, a.indices[name].long(), a.values[name])
    x = torch.randint(0, 256, (2, 9))
    assert torch.equal(rt(x), ref(x))
    assert type(m).forward is type(ref).forward and not m._forward_hooks


def test_tied_weights_are_written_once():
    m = build("tiny", torch.float32)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    rt = Runtime.load(m)
    idx = torch.tensor([0, 5, 9], dtype=torch.int32)
    before = m.lm_head.weight.detach().reshape(-1)[idx.long()].clone()
    rt.add_adapter("tied", SparseAdapter({"lm_head.weight": idx}, {"lm_head.weight": torch.ones(3)}))
    rt.switch("tied")
    assert torch.equal(m.model.embed_tokens.weight.detach().reshape(-1)[idx.long()], before + 1)
    rt.switch(None)
    assert torch.equal(m.lm_head.weight.detach().reshape(-1)[idx.long()], before)


def test_lora_unfused_matches_fused_and_leaves_weights_alone():
    m = build("tiny", torch.float32, seed=5)
    snap = snapshot(m)
    lora = random_lora(m, TARGETS, rank=4, seed=6, std=0.05)
    rt = Runtime.load(m)
    rt.add_adapter("fused", lora)
    rt.add_adapter("unfused", lora, mode="unfused")
    rt.add_adapter("s", random_shira(m, TARGETS, 0.05, seed=1))
    x = torch.randint(0, 256, (2, 7))
    base_out = rt(x)
    for names, weights in (("fused", 0.5), (["s", "fused"], [1.0, 0.5])):
        rt.switch(names, weights)
        want = rt(x)
        rt.switch([n.replace("fused", "unfused") for n in ([names] if isinstance(names, str) else names)], weights)
        torch.testing.assert_close(rt(x), want, atol=1e-5, rtol=1e-4)
        if names == "fused":
            assert_bit_identical(m, snap)  # unfused: the weights are the base's
    rt.switch(None)
    assert torch.equal(rt(x), base_out)
    assert_bit_identical(m, snap)
    with pytest.raises(ValueError, match="always fused"):
        rt.add_adapter("x", random_shira(m, TARGETS, 0.05, seed=1), mode="unfused")
