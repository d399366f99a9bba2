"""A switch is atomic under faults: whatever raises, wherever (inside or after the kernel, in the dense LoRA
writes, in the unfused slots, at the commit; a real KeyboardInterrupt at a random moment), the weights and
``rt.active`` are exactly as before the call, and the next switch is exact."""

from __future__ import annotations

import _thread
import random
import signal
import statistics
import threading
import time

import numpy as np
import pytest
import shira_runtime.switcher as switcher_mod
import torch
from shira_runtime import Runtime, kernels
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_lora, random_shira

from tests.conftest import as_torch, assert_bit_identical, bits, snapshot


class Fault(Exception):
    """The injected failure."""


@pytest.fixture(params=["torch", "cpp"])
def kernel_path(request, monkeypatch):
    """Run the test on the pure-torch reference and on the C++ fast path (skipped where it cannot build)."""
    monkeypatch.setenv("SHIRA_KERNELS", request.param)
    kernels.reset()
    try:
        kernels.backend()
    except RuntimeError as exc:
        pytest.skip(f"C++ extension unavailable: {exc}")
    yield request.param
    kernels.reset()


STATES = [None, "a", "b", ["a", "b"], "l", ["a", "l"]]


def make(dtype):
    m = build("tiny", dtype, seed=3)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1))
    rt.add_adapter("b", random_shira(m, TARGETS, 0.05, seed=2))
    rt.add_adapter("l", random_lora(m, ["q_proj", "down_proj"], rank=4, seed=3))
    expected = {}
    for s in STATES:
        rt.switch(s)
        expected[repr(s)] = snapshot(m)
    rt.switch(None)
    return m, rt, expected


def check_next_switches_exact(m, rt, expected):
    for s in STATES[::-1]:
        rt.switch(s)
        assert_bit_identical(m, expected[repr(s)])


def partial_kernel(k: int, restore: bool, real):
    """A ``kernels.switch_`` that restores (or not), applies the first ``k`` incoming tensors, then fails."""

    def fake(out_w, out_i, out_s, in_w, in_i, in_d, in_s, validate=True, **_):  # runs, scales: not needed
        if restore:
            kernels.restore_(out_w, out_i, out_s, validate=False)
        kernels.apply_(in_w[:k], in_i[:k], in_d[:k], in_s[:k], validate=False)
        raise Fault(f"after {k} tensors")

    return fake


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fault_at_every_kernel_step_rolls_back(kernel_path, dtype, monkeypatch):
    m, rt, expected = make(dtype)
    real = kernels.switch_
    n_in = len([t for t in rt._switcher.plan.sparse]) or 14  # tiny: 2 layers x 7 projections
    for before, after in [(None, "a"), ("a", "b"), ("b", ["a", "b"]), (["a", "b"], "a"), ("l", "b"), ("a", "l")]:
        rt.switch(before)
        snap = snapshot(m)
        for k in [0, 1, 2, n_in // 2, n_in]:
            for restore in (True, False):
                monkeypatch.setattr(switcher_mod.kernels, "switch_", partial_kernel(k, restore, real))
                with pytest.raises(Fault):
                    rt.switch(after)
                monkeypatch.setattr(switcher_mod.kernels, "switch_", real)
                assert_bit_identical(m, snap)
                assert rt.active == tuple((n, 1.0) for n in ([before] if isinstance(before, str) else before or []))

        def full_then_fail(*args, **kw):  # the kernel finished, then something raised (an interrupt, say)
            real(*args, **kw)
            raise KeyboardInterrupt

        monkeypatch.setattr(switcher_mod.kernels, "switch_", full_then_fail)
        with pytest.raises(KeyboardInterrupt):
            rt.switch(after)
        monkeypatch.setattr(switcher_mod.kernels, "switch_", real)
        assert_bit_identical(m, snap)
    check_next_switches_exact(m, rt, expected)
    rt.switch(None)
    assert_bit_identical(m, expected["None"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_or_nothing_kernel_marks_first_entries_and_rolls_back(kernel_path, dtype, monkeypatch):
    """With the kernel core (all of a call or none of it), the switch marks only each saved buffer's first entry;
    a fault right after the kernel returned, or right before it ran, still rolls back bit for bit."""
    m, rt, expected = make(dtype)
    real = kernels.switch_
    assert switcher_mod._all_or_nothing(real) == (kernel_path == "cpp")
    seen = []

    def after(*args, **kw):
        real(*args, **kw)
        seen.append([s.clone() for s in args[6]])
        raise KeyboardInterrupt

    def before(*args, **kw):
        seen.append([s.clone() for s in args[6]])
        raise Fault("before the kernel")

    # fresh arenas filled with zeros: an uninitialized one may hold an earlier buffer's markers (a reference
    # path's, marked whole), which would read as marks this switch made
    ops = rt._switcher.ops
    monkeypatch.setattr(ops, "empty", lambda n, d, empty=ops.empty: empty(n, d).zero_())
    for fake in (after, before):
        fake.all_or_nothing = real.all_or_nothing  # an all-or-nothing kernel that fails outside its call
        for old, new in [(None, "a"), ("a", "b"), ("b", ["a", "b"]), ("l", "a"), (["a", "l"], "b")]:
            rt.switch(old)
            snap = snapshot(m)
            monkeypatch.setattr(switcher_mod.kernels, "switch_", fake)
            with pytest.raises((KeyboardInterrupt, Fault)):
                rt.switch(new)
            monkeypatch.setattr(switcher_mod.kernels, "switch_", real)
            assert_bit_identical(m, snap)
            if fake is before:  # marked: every entry on the references, the first of each buffer on the core
                for buf in seen[-1]:
                    marked = ~kernels_gathered(buf)
                    assert bool(marked[0])
                    assert bool(marked.all()) == (kernel_path != "cpp") or buf.numel() == 1
    check_next_switches_exact(m, rt, expected)


def kernels_gathered(buf: torch.Tensor) -> torch.Tensor:
    from shira_runtime.arrays import ops_for

    return ops_for(buf).gathered(buf)


def test_fault_in_dense_lora_writes_unfused_and_commit_rolls_back(kernel_path, monkeypatch):
    m, rt, expected = make(torch.bfloat16)
    real_dense = switcher_mod._apply_dense
    calls = {"n": 0}

    def dense_then_fail(backend, plan, copies):  # the switch's call writes one dense tensor, then fails once
        if plan.active == rt.active:  # the rollback re-applying the old state: let it run
            return real_dense(backend, plan, copies)
        first = dict(list(plan.dense.items())[:1])
        real_dense(backend, switcher_mod.Plan(plan.active, {}, first, []), copies)
        raise MemoryError("injected")

    def fail_state(*a, **k):
        calls["n"] += 1
        raise Fault("at the commit")

    for before, after in [(None, "l"), ("a", ["a", "l"]), ("l", ["a", "l"]), (["a", "l"], "b")]:
        rt.switch(before)
        snap, active = snapshot(m), rt.active
        with monkeypatch.context() as mp:
            mp.setattr(switcher_mod, "_apply_dense", dense_then_fail)
            if after != "b":  # "b" has no dense part: the dense writer is not called
                with pytest.raises(MemoryError):
                    rt.switch(after)
                assert_bit_identical(m, snap)
                assert rt.active == active
        with monkeypatch.context() as mp:
            mp.setattr(switcher_mod, "State", fail_state)
            with pytest.raises(Fault):
                rt.switch(after)
        assert_bit_identical(m, snap)
        assert rt.active == active
    assert calls["n"] == 4
    check_next_switches_exact(m, rt, expected)


def test_fault_in_unfused_hooks_rolls_back(monkeypatch):
    m = build("tiny", torch.float32, seed=3)
    rt = Runtime.load(m)
    rt.add_adapter("u", random_lora(m, ["q_proj", "v_proj"], rank=4, seed=1), mode="unfused")
    rt.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1))
    x = torch.randint(0, 256, (1, 6))
    rt.switch("a")
    y_a, snap = rt(x), snapshot(m)
    real = rt.backend.set_unfused

    def partial(entries):  # fails once; the rollback's own call goes through
        monkeypatch.setattr(rt.backend, "set_unfused", real)
        real(entries[:1])
        raise Fault("half the hooks")

    monkeypatch.setattr(rt.backend, "set_unfused", partial)
    with pytest.raises(Fault):
        rt.switch(["a", "u"])
    monkeypatch.setattr(rt.backend, "set_unfused", real)
    assert rt.active == (("a", 1.0),)
    assert_bit_identical(m, snap)
    assert torch.equal(rt(x), y_a)  # no hook left behind
    rt.switch(["a", "u"])
    assert not torch.equal(rt(x), y_a)


def test_fault_in_onnx_lora_slots_rolls_back(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from shira_runtime.exporters import export_onnx

    m = build("tiny", torch.float32, seed=3)
    ids = torch.randint(0, 256, (1, 6))
    path = export_onnx(m, (ids,), tmp_path / "b", lora_rank=8, lora_targets=["q_proj", "v_proj"])
    rt = Runtime.load(path)
    rt.add_adapter("u", random_lora(m, ["q_proj", "v_proj"], rank=4, seed=1), mode="unfused")
    rt.add_adapter("v", random_lora(m, ["q_proj", "v_proj"], rank=4, seed=2), mode="unfused")
    rt.switch("u")
    y_u = rt(ids)
    slots = {n: as_torch(t).clone() for n, t in rt.backend.tensors.items()}
    real = rt.backend.set_unfused

    def partial(entries):  # writes v's factors into one slot pair, then fails (once)
        monkeypatch.setattr(rt.backend, "set_unfused", real)
        real(entries[:1])
        raise Fault("one slot written")

    monkeypatch.setattr(rt.backend, "set_unfused", partial)
    with pytest.raises(Fault):
        rt.switch("v")
    monkeypatch.setattr(rt.backend, "set_unfused", real)
    assert rt.active == (("u", 1.0),)
    for n, t in rt.backend.tensors.items():
        assert torch.equal(bits(as_torch(t)), bits(slots[n])), n
    assert np.array_equal(rt(ids), y_u)


@pytest.mark.parametrize("at", ["before", "after"])
def test_interrupt_inside_the_lock_release_after_the_commit(kernel_path, at, monkeypatch):
    """A KeyboardInterrupt that lands while the switch releases its lock (the commit is done): the call raises it,
    the weights and ``rt.active`` are the state it switched to, and the lock is free for the next call."""
    from shira_runtime.rwlock import RWLock

    m, rt, expected = make(torch.float32)
    real = RWLock._release_write
    fired = []

    def release_interrupted(self):
        if not fired:  # once: the release is retried to the end, as after a real signal
            fired.append(at)
            if at == "after":
                real(self)
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(RWLock, "_release_write", release_interrupted)
    with pytest.raises(KeyboardInterrupt):
        rt.switch(["a", "b"])
    monkeypatch.setattr(RWLock, "_release_write", real)
    assert fired == [at]
    assert rt.active == (("a", 1.0), ("b", 1.0))
    assert_bit_identical(m, expected[repr(["a", "b"])])
    assert not rt._lock._writer and not rt._lock._readers
    check_next_switches_exact(m, rt, expected)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["torch", "cpp"])
def test_real_keyboard_interrupts_during_switches(path, monkeypatch, capsys):
    """``_thread.interrupt_main`` at random moments during back-to-back switches on ``small``: after each
    KeyboardInterrupt the weights are exactly those of ``rt.active``, which is the state before that call
    (or, for an interrupt that lands in the lock's release after the commit, the state the call switched to).

    An extra beside the deterministic fault tests above: how many timer interrupts land inside a switch depends
    on the machine's load, so the count is reported, never asserted. SIGINT's Python handler is installed for
    the test: a process started in the background (nohup, a job runner) ignores SIGINT, and then
    ``interrupt_main`` does nothing."""
    monkeypatch.setenv("SHIRA_KERNELS", path)
    kernels.reset()
    try:
        kernels.backend()
    except RuntimeError as exc:
        pytest.skip(f"C++ extension unavailable: {exc}")
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupted, committed = _interrupt_switches()
    finally:
        signal.signal(signal.SIGINT, previous)
        kernels.reset()
    with capsys.disabled():
        print(f"\n[{path}] {interrupted} timer interrupts landed inside a switch ({committed} after its commit)")


def _interrupt_switches() -> tuple[int, int]:
    m = build("small", torch.bfloat16, seed=5)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.02, seed=1))
    rt.add_adapter("b", random_shira(m, TARGETS, 0.02, seed=2))
    rt.add_adapter("l", random_lora(m, ["q_proj"], rank=4, seed=3))
    states = [None, "a", "b", ["a", "b"], "l"]
    expected = {}
    durations = []  # of switches that ran to the end: the interrupts aim inside the current switch time
    for s in states:
        t0 = time.perf_counter()
        rt.switch(s)
        durations.append(time.perf_counter() - t0)
        expected[repr(tuple(n for n, _ in rt.active))] = snapshot(m)
    rng = random.Random(0)
    interrupted, committed = 0, 0
    for i in range(40):
        target = states[i % len(states)]
        before, returned = rt.active, False
        per_switch = statistics.median(durations[-9:])
        timer = threading.Timer(rng.uniform(0, 1.5 * per_switch), _thread.interrupt_main)
        try:
            timer.start()
            t0 = time.perf_counter()
            rt.switch(target)
            durations.append(time.perf_counter() - t0)
            returned = True
            timer.join()  # an interrupt that lands after the switch returned is caught below
        except KeyboardInterrupt:
            timer.join()
            if not returned:  # it interrupted the switch: rolled back, unless it landed after the commit
                interrupted += 1
                after = tuple(n for n, _ in rt.active)
                want = tuple([target] if isinstance(target, str) else target or [])
                assert rt.active == before or after == want
                committed += after != tuple(n for n, _ in before)
        except BaseException:
            timer.cancel()
            raise
        assert_bit_identical(m, expected[repr(tuple(n for n, _ in rt.active))])
    rt.switch(None)
    assert_bit_identical(m, expected["()"])
    return interrupted, committed


def test_add_remove_list_while_switching_and_inferring():
    m = build("tiny", torch.float32, seed=4)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1))
    rt.add_adapter("b", random_shira(m, TARGETS, 0.05, seed=2))
    extra = random_shira(m, TARGETS, 0.05, seed=3)
    x = torch.randint(0, 256, (1, 5))
    stop, errors = threading.Event(), []

    def guard(fn):
        def run():
            try:
                while not stop.is_set():
                    fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        return run

    k = {"n": 0}

    def churn():
        name = f"x{k['n'] % 3}"
        k["n"] += 1
        rt.add_adapter(name, extra, lazy=k["n"] % 2 == 0)
        rt.remove_adapter(name)

    def listing():
        names = rt.adapters
        assert len(names) == len(set(names)), names
        assert {"a", "b"} <= set(names)
        repr(rt)

    def switching():
        rt.switch(random.choice([None, "a", "b", ["a", "b"]]))

    threads = [threading.Thread(target=guard(f)) for f in (churn, listing, listing, switching, lambda: rt(x))]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert k["n"] > 10
    assert set(rt.adapters) == {"a", "b"}
