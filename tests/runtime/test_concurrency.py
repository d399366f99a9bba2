"""Inference threads running while another thread switches never see a mixed state."""

from __future__ import annotations

import threading
import time

import torch
from shira_runtime import Runtime
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_lora, random_shira

from tests.conftest import stress_switching


def test_inference_never_sees_a_half_switched_model():
    m = build("small", torch.float32, seed=2)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.02, seed=1, std=0.05))
    rt.add_adapter("b", random_shira(m, TARGETS, 0.02, seed=2, std=0.05))
    rt.add_adapter("l", random_lora(m, ["q_proj", "up_proj"], rank=4, seed=3))
    x = torch.randint(0, 4096, (1, 16))
    states = [None, "a", "b", ["a", "b"], "l"]
    outs = []
    for st in states:
        rt.switch(st)
        outs.append(rt(x))
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j], atol=1e-4)  # every state is told apart
    stress_switching(rt, states, lambda: rt(x), lambda y, e: torch.allclose(y, e, atol=1e-5, rtol=0))


def test_switch_waits_for_running_inference():
    """A switch never starts while an inference holds the model (the lock is real, not advisory)."""
    m = build("tiny", torch.float32)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1))
    order = []
    inside = threading.Event()
    release = threading.Event()

    def slow_forward(module, args):
        inside.set()
        release.wait(5)
        order.append("inference done")

    h = m.register_forward_pre_hook(slow_forward)
    t = threading.Thread(target=lambda: rt(torch.zeros(1, 4, dtype=torch.long)))
    t.start()
    inside.wait(5)
    s = threading.Thread(target=lambda: (rt.switch("a"), order.append("switch done")))
    s.start()
    time.sleep(0.2)
    assert order == []  # the switch is waiting
    release.set()
    t.join()
    s.join()
    h.remove()
    assert order == ["inference done", "switch done"]


def test_an_interrupt_while_releasing_the_write_lock_still_releases_it(monkeypatch):
    from shira_runtime.rwlock import RWLock

    lock = RWLock()
    real = lock._cond.notify_all
    calls = []

    def interrupted_once():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real()

    monkeypatch.setattr(lock._cond, "notify_all", interrupted_once)
    try:
        with lock.write():
            pass
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the KeyboardInterrupt was swallowed")
    assert len(calls) == 2 and not lock._writer
    with lock.read():  # would block forever if the lock were still held
        pass
