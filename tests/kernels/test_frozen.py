"""``kernels.core.Frozen``: a side whose lists are all Frozen is checked and packed once, then reused while its
weights stay where they were; a weight whose storage moved is packed anew (the write lands in its new storage);
plain lists are checked at every call; a Frozen side that fails its checks is refused and not kept; ``release``
forgets a list's rows. The runtime's switches pass Frozen lists: after the first switches of a cycle nothing is
packed again, and a removed adapter's arrays are not kept by any cache."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from shira_runtime import Runtime, kernels
from shira_runtime.kernels import core
from shira_runtime.kernels.core import Frozen
from shira_runtime.synthetic import random_shira
from torch import nn

pytestmark = pytest.mark.skipif(kernels.backend() != "cpp", reason="the kernel core's packing")


def _counting(monkeypatch) -> list:
    calls = []
    real = core._side
    monkeypatch.setattr(core, "_side", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_frozen_sides_are_packed_once_and_anew_when_a_weight_moves(monkeypatch):
    calls = _counting(monkeypatch)
    w = torch.zeros(64)
    idx, delta = torch.tensor([1, 5], dtype=torch.int32), torch.tensor([1.0, 2.0])
    saved = torch.empty(2)
    args = [Frozen([w]), Frozen([idx]), Frozen([delta]), Frozen([saved])]
    for _ in range(3):
        kernels.apply_(*args, validate=False)
        kernels.restore_(args[0], args[1], args[3], validate=False)
    assert len(calls) == 2  # one pack per side (apply, restore), reused twice each
    w.set_(torch.zeros(128).untyped_storage())  # the weight's storage moves: the rows would point at freed memory
    kernels.apply_(*args, validate=False)
    assert len(calls) == 3 and w[1] == 1.0 and w[5] == 2.0  # packed anew, written in the new storage
    kernels.apply_([w], [idx], [delta], [torch.empty(2)], validate=False)  # plain lists: checked every time
    kernels.apply_([w], [idx], [delta], [torch.empty(2)], validate=False)
    assert len(calls) == 5
    core.release(args)
    assert not any(v is args[0] for _, vals, _ in core._PACKED.values() for v in vals)


def test_a_frozen_side_that_fails_its_checks_is_refused_and_not_kept(monkeypatch):
    w = torch.zeros(8)
    bad = [Frozen([w]), Frozen([torch.tensor([1.0])]), Frozen([torch.ones(1)]), Frozen([torch.empty(1)])]
    before = dict(core._PACKED)
    for _ in range(2):
        with pytest.raises(kernels.KernelInputError, match="indices dtype"):
            kernels.apply_(*bad, validate=False)
    assert core._PACKED == before and not w.any()


def _runtime(n: int):
    names = [f"l{k}" for k in range(n)]
    model = nn.ModuleDict({name: nn.Linear(64, 64, bias=False) for name in names})
    rt = Runtime.load(model)
    for k, name in enumerate("ab"):
        rt.add_adapter(name, random_shira(model, names, 0.02, seed=k + 1))
    return rt, model, names


def test_a_cycle_of_switches_packs_nothing_after_its_first_round(monkeypatch):
    rt, _, _ = _runtime(12)
    for s in ("a", "b", "a", "b"):  # plans, arenas and their slices made; every side packed once
        rt.switch(s)
    calls = _counting(monkeypatch)
    for s in ("a", "b") * 5:
        rt.switch(s)
    assert calls == []
    rt.switch(None)


def test_a_removed_adapters_arrays_are_not_kept(monkeypatch):
    rt, model, names = _runtime(6)
    rt.switch("a")
    rt.switch("b")
    rt.switch("a")
    arrays = [weakref.ref(d) for _, d in rt._switcher.plan.sparse.values()]  # the plan's deltas for "a"
    rt.switch(None)
    rt.remove_adapter("a")
    rt.add_adapter("c", random_shira(model, names, 0.02, seed=9))  # made on the base
    for s in ("c", "b", None, "c"):
        rt.switch(s)
    gc.collect()
    assert all(r() is None for r in arrays)
