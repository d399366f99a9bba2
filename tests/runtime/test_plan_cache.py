"""The switcher keeps the plans of its last few switches (``Switcher.make_plan``): a switch back to a recent
adapter reuses its plan and writes what a fresh runtime writes, bit for bit; a removed adapter's plans go with it
(an adapter registered again under its name is switched with its own values); weights -0.0 and 0.0 are two plans;
the stats count what the plans hold."""

from __future__ import annotations

import gc
import weakref

import torch
from shira_runtime import Runtime
from shira_runtime.models import TARGETS, build
from shira_runtime.switcher import PLANS_KEPT
from shira_runtime.synthetic import random_lora, random_shira

from tests.conftest import assert_bit_identical, snapshot


def _pair(seed: int = 0):
    m = build("tiny", torch.float32, seed=seed)
    return m, {n: random_shira(m, TARGETS, 0.05, seed=k + 1) for k, n in enumerate("abc")}


def test_a_switch_back_reuses_its_plan_and_writes_what_a_fresh_runtime_writes():
    m, ads = _pair()
    rt = Runtime.load(m)
    for n, a in ads.items():
        rt.add_adapter(n, a)
    states = ["a", "b", ["a", "b"], "a", None, ["a", "b"], "b", "a"]
    seen, snaps = {}, []
    for s in states:
        rt.switch(s, [1.0, 0.5] if isinstance(s, list) else None)
        key = str(s)
        if s is not None and key in seen:
            assert rt._switcher.plan is seen[key]  # the kept plan, not a new one
        seen[key] = rt._switcher.plan
        snaps.append(snapshot(m))
    fresh, _ = _pair()
    rt2 = Runtime.load(fresh)
    for n, a in ads.items():
        rt2.add_adapter(n, a)
    for s, snap in zip(states, snaps):
        rt2.switch(s, [1.0, 0.5] if isinstance(s, list) else None)  # a new runtime: every plan made anew
        assert_bit_identical(fresh, snap)


def test_a_removed_adapter_takes_its_plans_and_its_name_gets_the_new_values():
    m, ads = _pair()
    base = snapshot(m)
    rt = Runtime.load(m)
    rt.add_adapter("a", ads["a"])
    rt.add_adapter("b", ads["b"])
    rt.switch("a")
    rt.switch("b")
    prep = weakref.ref(rt._get("a"))
    rt.remove_adapter("a")
    gc.collect()
    assert prep() is None  # no kept plan holds it
    rt.add_adapter("a", ads["c"])  # the name again, other values
    rt.switch("a")
    want, _ = _pair()
    rt2 = Runtime.load(want)
    rt2.add_adapter("c", ads["c"])
    rt2.switch("c")
    assert_bit_identical(m, snapshot(want))
    rt.switch(None)
    assert_bit_identical(m, base)


def test_negative_zero_is_a_plan_of_its_own():
    m = build("tiny", torch.float32, seed=0)
    w = m.get_submodule(f"model.layers.0.self_attn.{TARGETS[0]}").weight
    with torch.no_grad():
        w.view(-1)[:64] = -0.0  # base values where -0.0 + (-0.0 * delta) keeps the sign and +0.0 does not
    ad = random_shira(m, TARGETS, 0.5, seed=1)
    want = {}
    for weight in (0.0, -0.0):
        fresh = build("tiny", torch.float32, seed=0)
        fresh.load_state_dict(m.state_dict())
        rt = Runtime.load(fresh)
        rt.add_adapter("a", ad)
        rt.switch("a", weight)
        want[weight.hex()] = snapshot(fresh)
    rt = Runtime.load(m)
    rt.add_adapter("a", ad)
    for weight in (0.0, -0.0, 0.0, -0.0):
        rt.switch("a", weight)
        assert_bit_identical(m, want[weight.hex()])


def test_only_the_last_few_plans_are_kept_and_stats_count_what_is_written():
    m = build("tiny", torch.float32, seed=0)
    rt = Runtime.load(m)
    rt.add_adapter("s", random_shira(m, TARGETS, 0.05, seed=1))
    rt.add_adapter("l", random_lora(m, TARGETS, 4, seed=2), mode="fused")
    for k in range(PLANS_KEPT + 3):
        rt.switch("s", 1.0 + k)
    assert len(rt._switcher._plans) == PLANS_KEPT
    n = sum(i.numel() for i, _ in rt._switcher.plan.sparse.values())
    tensors = rt.backend.tensors
    st = rt.switch("s", 0.5)
    assert st.elements_written == 2 * n  # out of one, into the other
    st = rt.switch("l")
    dense = sum(tensors[t].numel() for t in rt._switcher.plan.dense)
    assert st.elements_written == n + dense
    assert st.bytes_touched == 2 * n * 4 + 2 * dense * 4
    st = rt.switch(None)
    assert st.elements_written == dense and st.bytes_touched == 2 * dense * 4


def test_the_least_recently_used_plan_goes_first_and_own_bytes_are_bounded(monkeypatch):
    from shira_runtime import switcher as switcher_mod

    m = build("tiny", torch.float32, seed=0)
    rt = Runtime.load(m)
    rt.add_adapter("s", random_shira(m, TARGETS, 0.05, seed=1))
    rt.switch("s")
    mine = rt._switcher.plan
    for k in range(2 * PLANS_KEPT):  # a plan used every other switch stays
        rt.switch("s", 2.0 + k)
        rt.switch("s")
        assert rt._switcher.plan is mine
    sw = rt._switcher
    own = [b for _, b, _ in sw._plans.values()]
    assert 0 in own and max(own) > 0  # weight 1: the adapter's own arrays; weighted: scaled copies of its own
    assert set(sw._lists) <= {id(v[2]) for v in sw._plans.values()} | {id(sw.state.plan)}
    monkeypatch.setattr(switcher_mod, "PLAN_BYTES", max(own) + 1)  # room for one weighted plan at most
    for k in range(3):
        rt.switch("s", 0.5 + k)
    assert sum(b for _, b, _ in sw._plans.values()) <= max(own) + 1
    assert any(p is mine for _, _, p in sw._plans.values())  # shared plans cost nothing
