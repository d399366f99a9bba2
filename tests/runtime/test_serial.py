"""Threads only where they pay: a small switch enters no parallel region.

A fused LoRA merge or base copy of small tensors runs with torch set to one intra-op thread for the switch
(``shira_runtime.torch_backend.DENSE_SERIAL_BELOW``), and a small sparse switch stays on the calling thread in
the kernel core (its ``last_plan``). Checked by what the ops see (torch's thread count inside the merge, the
core's plan bit), never by a time."""

from __future__ import annotations

import pytest
import torch
from shira_runtime import Runtime, kernels
from shira_runtime.kernels import core
from shira_runtime.synthetic import random_lora, random_shira
from shira_runtime.torch_backend import DENSE_SERIAL_BELOW
from torch import nn

from tests.conftest import assert_bit_identical, snapshot


@pytest.fixture
def two_threads():
    keep = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(keep)


def runtime(side: int, lora: bool) -> Runtime:
    model = nn.ModuleDict({"q_proj": nn.Linear(side, side, bias=False), "v_proj": nn.Linear(side, side, bias=False)})
    rt = Runtime.load(model)
    for k, name in enumerate("ab"):
        if lora:
            rt.add_adapter(name, random_lora(model, ("q_proj", "v_proj"), 4, seed=k + 1), mode="fused")
        else:
            rt.add_adapter(name, random_shira(model, ("q_proj", "v_proj"), 0.01, seed=k + 1))
    return rt


def threads_seen_by_addmm(monkeypatch, rt: Runtime, names: list) -> list[int]:
    seen: list[int] = []
    real = torch.addmm

    def addmm(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", addmm)
    for name in names:
        rt.switch(name)
    monkeypatch.setattr(torch, "addmm", real)
    return seen


def test_a_small_fused_lora_switch_merges_on_one_thread_and_restores_the_count(two_threads, monkeypatch):
    rt = runtime(64, lora=True)
    seen = threads_seen_by_addmm(monkeypatch, rt, ["a", "b", None, "a"])
    assert seen and set(seen) == {1}, seen
    assert torch.get_num_threads() == 2


def test_a_large_fused_lora_switch_keeps_torchs_threads(two_threads, monkeypatch):
    side = 512
    assert side * side >= DENSE_SERIAL_BELOW
    rt = runtime(side, lora=True)
    seen = threads_seen_by_addmm(monkeypatch, rt, ["a", "b"])
    assert seen and set(seen) == {2}, seen


def test_a_failed_small_switch_restores_the_thread_count_and_the_weights(two_threads, monkeypatch):
    rt = runtime(64, lora=True)
    rt.switch("a")
    before = snapshot(rt.backend.module)

    real, calls = torch.addmm, []

    def boom(*args, **kwargs):  # the first merge fails; the rollback's merges (of "a" again) run
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault in the merge")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", boom)
    with pytest.raises(RuntimeError, match="injected"):
        rt.switch("b")
    monkeypatch.undo()
    assert torch.get_num_threads() == 2
    assert rt.active == (("a", 1.0),)
    assert_bit_identical(rt.backend.module, before)


@pytest.mark.skipif(kernels.backend() != "cpp", reason="the kernel core's plan bits (the C++ build)")
def test_a_small_sparse_switch_stays_on_the_calling_thread_and_a_large_one_threads(two_threads):
    serial_below = core.tuning()["serial_below"]
    small = runtime(64, lora=False)  # 2 x 41 entries
    small.switch("a")
    small.switch("b")
    assert core.tuning()["last_plan"]["threaded"] is False
    side = 2048  # 2 x 41,943 entries per adapter: above the core's threshold
    assert 2 * round(0.01 * side * side) >= serial_below
    large = runtime(side, lora=False)
    large.switch("a")
    large.switch("b")
    assert core.tuning()["last_plan"]["threaded"] is True
