"""Inference threads running while another thread switches never see a mixed state."""

from __future__ import annotations

import threading
import time

import torch

from runtime import Runtime
from runtime.models import TARGETS, build
from runtime.synthetic import random_lora, random_shira


def test_inference_never_sees_a_half_switched_model():
    m = build("small", torch.float32, seed=2)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.02, seed=1, std=0.05))
    rt.add_adapter("b", random_shira(m, TARGETS, 0.02, seed=2, std=0.05))
    rt.add_adapter("l", random_lora(m, ["q_proj", "up_proj"], rank=4, seed=3))
    x = torch.randint(0, 4096, (1, 16))
    states = [None, "a", "b", ["a", "b"], "l"]
    expected = []
    for s in states:
        rt.switch(s)
        expected.append(rt(x))
    for i in range(len(expected)):
        for j in range(i):
            assert not torch.allclose(expected[i], expected[j], atol=1e-4)

    stop = threading.Event()
    seen, errors = [0] * len(states), []

    def infer():
        while not stop.is_set():
            y = rt(x)
            hits = [k for k, e in enumerate(expected) if torch.allclose(y, e, atol=1e-5, rtol=0)]
            if len(hits) != 1:
                errors.append("inference saw a state that is none of the switch targets")
                return
            seen[hits[0]] += 1

    def switcher():
        k = 0
        while not stop.is_set():
            rt.switch(states[k % len(states)])
            k += 1

    threads = [threading.Thread(target=infer) for _ in range(3)] + [threading.Thread(target=switcher)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(1 for c in seen if c) < len(states):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sum(1 for c in seen if c) >= 3, f"inference saw too few distinct states: {seen}"


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
