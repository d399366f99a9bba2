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
    assert not any(v is args[0] for call in core._CALLS.values() for v in call.vals)


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
    assembled = []
    real = core._assemble
    monkeypatch.setattr(core, "_assemble", lambda *a, **k: assembled.append(a[0]) or real(*a, **k))
    for s in ("a", "b") * 5:
        rt.switch(s)
    assert calls == [] and assembled == []  # each call's rows, and the call around them, reused
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


def test_a_call_bumps_each_written_version_counter_once():
    w = torch.zeros(64)
    arena = torch.zeros(8)
    out_saved, in_saved = arena[:2], arena[2:4]
    idx = torch.tensor([1, 5], dtype=torch.int32)
    delta = torch.tensor([1.0, 2.0])
    kernels.apply_(Frozen([w]), Frozen([idx]), Frozen([delta]), Frozen([out_saved]), validate=False)
    values = core.VERBS["switch_"].bind(
        (Frozen([w]), Frozen([idx]), Frozen([out_saved]), Frozen([w]), Frozen([idx]), Frozen([delta]),
         Frozen([in_saved])), {"validate": False})  # fmt: skip
    written = core.written(core.VERBS["switch_"], values)
    assert len(written) == 2 and written[0] is w and written[1] is arena  # one weight, one arena for its views
    plain = core.written(core.VERBS["switch_"], {**values, "in_saved": [in_saved]})
    assert len(plain) == 3  # lists not all Frozen: every written array as given
    before = (w._version, in_saved._version, arena._version)
    kernels.switch_(*(values[k] for k in list(values)[:7]), validate=False)
    after = (w._version, in_saved._version, arena._version)
    assert all(a > b for a, b in zip(after, before))  # autograd sees the weight and the saved values written
    assert w[1] == 1.0 and w[5] == 2.0 and in_saved.tolist() == [0.0, 0.0]
    core.release([v for v in values.values() if type(v) is Frozen])
    assert not any(v is values["in_saved"] for call in core._CALLS.values() for v in call.vals)


def test_numpy_frozen_sides_are_not_read_again(monkeypatch):
    np = pytest.importorskip("numpy")
    w = np.zeros(64, dtype=np.float32)
    args = [Frozen([w]), Frozen([np.array([1, 5], dtype=np.int32)]), Frozen([np.ones(2, dtype=np.float32)])]
    saved = Frozen([np.empty(2, dtype=np.float32)])
    kernels.apply_(*args, saved, validate=False)
    kernels.restore_(args[0], args[1], saved, validate=False)
    reads = []
    real = core._Numpy.ptr
    monkeypatch.setattr(core._Numpy, "ptr", staticmethod(lambda a: reads.append(a) or real(a)))
    for _ in range(3):
        kernels.apply_(*args, saved, validate=False)
        kernels.restore_(args[0], args[1], saved, validate=False)
    assert reads == [] and not w.any()  # rows reused without reading an address; every apply restored
    kernels.apply_(*args, saved, validate=False)
    assert w[1] == 1.0 and w[5] == 1.0
    core.release([*args, saved])


def test_plans_over_the_same_tensors_share_their_weights_and_keep_their_rows(monkeypatch):
    rt, model, names = _runtime(8)
    rt.add_adapter("c", random_shira(model, names, 0.02, seed=7))
    for s in ("a", "b", "c", "a", "b", "c"):
        rt.switch(s)
    lists = [v[1] for v in rt._switcher._lists.values()]
    assert len({id(x["weights"]) for x in lists if x["names"]}) == 1  # one weights list for every plan
    rt.switch("a")
    rt.remove_adapter("c")  # its rows go; a's and b's, which used the same weights list, stay
    calls = _counting(monkeypatch)
    for s in ("b", "a") * 3:
        rt.switch(s)
    assert calls == []
    rt.switch(None)


def _switch_state(make, n_tensors: int, seed: int, quantized: bool):
    """Weights, two sorted index lists per tensor (A applied, B incoming), B's deltas, saved buffers and, for int8
    codes, per-row scales: ``make(numpy array)`` turns each array into the flavour under test."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, cols = 8, 16
    ws, a_idx, b_idx, b_d, a_saved, b_saved, scales = [], [], [], [], [], [], []
    for k in range(n_tensors):
        if quantized:
            ws.append(rng.integers(-100, 100, rows * cols).astype(np.int8))
            scales.append(rng.uniform(0.01, 0.05, rows).astype(np.float32))
        else:
            ws.append(rng.standard_normal(rows * cols).astype(np.float32))
        n = [0, 1, 7, 40][k % 4]  # empty lists too
        a = np.sort(rng.choice(rows * cols, n, replace=False)).astype(np.int32)
        b = np.sort(rng.choice(rows * cols, n, replace=False)).astype(np.int64 if k % 2 else np.int32)
        a_idx.append(a)
        b_idx.append(b)
        b_d.append((rng.standard_normal(n) * (0.5 if quantized else 1.0)).astype(np.float32))
        a_saved.append(ws[-1][a].copy())
        b_saved.append(np.empty(n, ws[-1].dtype))
    out = [Frozen(make(x) for x in xs) for xs in (ws, a_idx, a_saved, (), b_idx, b_d, b_saved)]
    out[3] = out[0]  # one weights list on both sides, as the runtime passes it
    return out, (Frozen(make(x) for x in scales) if quantized else None)


@pytest.mark.parametrize("flavour", ["torch", "numpy"])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_a_prepared_switch_runs_as_the_call_does(flavour, quantized):
    """``kernels.switch_.prepare(...)`` then ``run(saturated)``, over and over, leaves weights, saved values and
    saturation counts as the same calls of ``kernels.switch_`` do, bit for bit (empty lists, both index widths,
    int8 codes on their grid); a torch weight whose storage moves between runs is written in its new storage."""
    import numpy as np

    make = torch.from_numpy if flavour == "torch" else (lambda a: a)
    zeros = (lambda n: torch.zeros(n, dtype=torch.int64)) if flavour == "torch" else (lambda n: np.zeros(n, np.int64))
    (a, scales), (b, _) = (_switch_state(make, 6, 3, quantized) for _ in range(2))
    extra = {"in_scales": scales} if quantized else {}
    extra_b = {"in_scales": Frozen(make(x.numpy() if flavour == "torch" else x) for x in scales)} if quantized else {}
    run = kernels.switch_.prepare(*a, validate=False, **extra)
    for _ in range(3):  # A -> B, then B -> B again (restore B's saved, apply B): the same calls on both
        sat_a, sat_b = zeros(6), zeros(6)
        run(sat_a if quantized else None)
        kernels.switch_(*b, validate=False, **extra_b, **({"saturated": sat_b} if quantized else {}))
        for x, y in zip([*a[0], *a[6]], [*b[0], *b[6]]):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        assert np.asarray(sat_a).tolist() == np.asarray(sat_b).tolist()
        for side in (a, b):  # B's saved values become the next run's outgoing ones
            for s_out, s_in in zip(side[2], side[6]):
                s_out[:] = s_in
    if flavour == "torch":  # a weight's storage moves: the rows are packed anew, the write lands in the new one
        w = a[0][1]
        moved = w.clone()
        w.set_(moved.untyped_storage(), 0, w.shape)
        run(zeros(6) if quantized else None)
        kernels.switch_(*b, validate=False, **extra_b, **({"saturated": zeros(6)} if quantized else {}))
        assert w.numpy().tobytes() == b[0][1].numpy().tobytes()
    core.release([*a, *b, *([scales] if quantized else [])])


def test_a_refused_prepare_raises_and_a_cycle_prepares_once(monkeypatch):
    """A call the core refuses is refused by ``prepare`` itself (nothing written); the runtime prepares one call
    per pair of plans and reuses it for every switch after."""
    w = torch.zeros(8)
    bad = [Frozen([w]), Frozen([torch.tensor([1.0])]), Frozen([torch.empty(1)])] * 2 + [Frozen([torch.empty(1)])]
    with pytest.raises(kernels.KernelInputError, match="indices dtype"):
        kernels.switch_.prepare(*bad, validate=False)
    assert not w.any()
    rt, _, _ = _runtime(6)
    for s in ("a", "b", "a", "b"):
        rt.switch(s)
    made = []
    real = core.prepared
    monkeypatch.setattr(core, "prepared", lambda *a, **k: made.append(a[0].name) or real(*a, **k))
    for s in ("a", "b") * 4:
        rt.switch(s)
    assert made == []
    rt.switch(None)
    assert made == ["switch_"]  # into a new pair of plans: prepared once


def test_a_kept_call_follows_the_chosen_path(monkeypatch):
    """A call prepared on the core is not run once ``kernels.reset()`` chose the references: the next switches run
    there (the core's runs made to fail), and land on the same weights."""
    rt, model, _ = _runtime(4)
    for s in ("a", "b", "a", "b"):
        rt.switch(s)
    at_b = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def boom(*args, **kwargs):
        raise AssertionError("the core ran")

    monkeypatch.setenv("SHIRA_KERNELS", "torch")
    kernels.reset()
    monkeypatch.setattr(core, "_run", boom)
    try:
        rt.switch("a")
        rt.switch("b")
    finally:
        monkeypatch.undo()
        kernels.reset()
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in at_b.items())
    rt.switch(None)
