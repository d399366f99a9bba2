"""Described runs (``shira_runtime.kernels.runs``): the kernel core takes a run's indices from its description.

Results with runs equal the reference's (which ignores them) bit for bit, in every dtype (fp32/fp16/bf16, int8 and
fp8 codes on their grid, baked codes), every plan, serial and threaded, with chunks that cut runs; runs of any
length, runs covering part of a list, and lists in any order. Hostile runs are refused before any write, with the
same message on the core and the numpy reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shira_runtime.kernels import KernelInputError, core, reference, reference_np
from shira_runtime.kernels.runs import MIN_RUN, fault, runs_of

from tests.kernels.test_quantized_kernels import quant_deltas, quant_weight

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
CODES = ["int8", "fp8_e4m3", "fp8_e5m2"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block_indices(numel: int, g, sort: bool = True) -> torch.Tensor:
    """Stretches of every length (1 .. 150: shorter and longer than a run, a line, a row) at random places, some
    adjacent (they merge), plus single entries; unique, sorted, or in shuffled order of stretches."""
    parts = []
    for _ in range(max(1, numel // 150)):
        start = int(torch.randint(0, numel, (1,), generator=g))
        parts.append(torch.arange(start, min(numel, start + int(torch.randint(1, 150, (1,), generator=g)))))
    parts.append(torch.randint(0, numel, (max(1, numel // 100),), generator=g))
    idx = torch.cat(parts).unique()
    if sort:
        return idx
    pieces = torch.tensor_split(idx, (torch.nonzero(idx.diff() != 1).squeeze(1) + 1).tolist())
    return torch.cat([pieces[k] for k in torch.randperm(len(pieces), generator=g).tolist()])


def runs_t(idx: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(runs_of(idx.numpy()))


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_same(got, want, what):
    for t, (x, y) in enumerate(zip(got, want)):
        assert torch.equal(raw(x), raw(y)), f"{what} {t} differs"


def test_runs_of_finds_maximal_stretches():
    idx = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 30, 31, 40, 41, 42, 43, 44, 45,
                    46, 47, 48], dtype=np.int32)  # fmt: skip
    assert runs_of(idx).tolist() == [[0, 0, 8], [8, 9, 9], [19, 40, 9]]
    assert runs_of(idx, min_run=2).tolist() == [[0, 0, 8], [8, 9, 9], [17, 30, 2], [19, 40, 9]]
    assert runs_of(np.arange(5)).shape == (0, 3) and runs_of(np.zeros(0, np.int64)).shape == (0, 3)
    shuffled = np.array([5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # order counts, not sorting
    assert runs_of(shuffled).tolist() == [[0, 5, 8], [8, 1, 9]]
    for seed in range(5):  # a random layout: every described entry is what the list holds
        idx = block_indices(5000, gen(seed), sort=seed % 2 == 0).numpy()
        r = runs_of(idx)
        assert fault(idx, r, 5000, validate=True) is None
        for p, f, n in r:
            assert n >= MIN_RUN and (idx[p : p + n] == np.arange(f, f + n)).all()


def floats_state(dtype, shapes, g, sort=True):
    ws = [(torch.randn(s, generator=g) * 3).to(dtype) for s in shapes]
    idx = [block_indices(w.numel(), g, sort).to(torch.int32) for w in ws]
    ds = [torch.randn(i.numel(), generator=g) for i in idx]
    return ws, idx, ds


@pytest.mark.parametrize("kind", [*FLOATS, *CODES, "baked"], ids=lambda k: str(k).removeprefix("torch."))
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
@pytest.mark.parametrize("knob", [1, 0], ids=["runs", "runs-off"])
def test_runs_match_reference(ext, knobs, kind, threaded, plan, knob):
    """apply A, switch A -> B, restore, with runs on both lists: weights, saved values and saturation counts equal
    the reference's; the restore gives the base back."""
    knobs(threaded=threaded, chunk=29, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan], runs=knob)
    g = gen(7)
    sort = plan != "phased"
    shapes = [(12, 200), (5, 333), (1, 3000)]  # rows that end mid-line; one long row
    if kind in FLOATS:
        ws, a_idx, a_d = floats_state(kind, shapes, g, sort)
        _, b_idx, b_d = floats_state(kind, shapes, g, sort)
        scales = None
    else:
        fmt = "int8" if kind == "baked" else kind
        ws, scales = map(list, zip(*(quant_weight(s, fmt, g) for s in shapes)))
        a_idx = [block_indices(w.numel(), g, sort).to(torch.int32) for w in ws]
        b_idx = [block_indices(w.numel(), g, sort).to(torch.int32) for w in ws]
        a_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, a_idx)]
        b_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, b_idx)]
        if kind == "baked":  # new codes of the weight's dtype: a byte swap
            a_d = [torch.randint(-127, 128, (i.numel(),), generator=g).to(torch.int8) for i in a_idx]
            b_d = [torch.randint(-127, 128, (i.numel(),), generator=g).to(torch.int8) for i in b_idx]
            scales = None
    a_runs, b_runs = [runs_t(i) for i in a_idx], [runs_t(i) for i in b_idx]
    assert sum(r.shape[0] for r in a_runs) > 20
    a_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, a_idx)]
    b_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, b_idx)]
    base = [w.clone() for w in ws]
    w_ref = [w.clone() for w in ws]
    a_ref, b_ref = [s.clone() for s in a_saved], [s.clone() for s in b_saved]
    n = len(ws)
    sat_ref, sat = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    q = {"scales": scales, "saturated": sat} if scales is not None else {}
    q_ref = {"scales": scales, "saturated": sat_ref} if scales is not None else {}
    reference.apply_(w_ref, a_idx, a_d, a_ref, **q_ref)
    ext.apply_(ws, a_idx, a_d, a_saved, validate=not sort, runs=a_runs, **q)
    assert_same(ws + a_saved, w_ref + a_ref, "after apply: tensor")
    assert torch.equal(sat, sat_ref)
    qs = {"in_scales": scales, "saturated": sat} if scales is not None else {}
    qs_ref = {"in_scales": scales, "saturated": sat_ref} if scales is not None else {}
    reference.switch_(w_ref, a_idx, a_ref, w_ref, b_idx, b_d, b_ref, **qs_ref)
    ext.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved, validate=not sort, out_runs=a_runs, in_runs=b_runs, **qs)
    assert ext.tuning()["last_plan"] == {"threaded": threaded, "plan": plan}
    assert_same(ws + b_saved, w_ref + b_ref, "after switch: tensor")
    assert torch.equal(sat, sat_ref)
    ext.restore_(ws, b_idx, b_saved, validate=not sort, runs=b_runs)
    assert_same(ws, base, "restored weight")


@pytest.mark.parametrize("kind", [*FLOATS, *CODES], ids=lambda k: str(k).removeprefix("torch."))
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("described", ["none", "some"])
def test_a_described_list_is_not_searched_again(ext, knobs, kind, threaded, described):
    """A description replaces the core's own search for lines of consecutive indices (shira_core.h, "Runs"): lists
    full of such lines, described as holding none (empty runs: the core then visits every entry alone) or only
    every other run (the rest visited entry by entry), switch to the reference's bytes all the same."""
    knobs(threaded=threaded, chunk=29)
    g = gen(11)
    shapes = [(12, 200), (1, 3000)]
    if kind in FLOATS:
        ws, a_idx, a_d = floats_state(kind, shapes, g)
        _, b_idx, b_d = floats_state(kind, shapes, g)
        scales = None
    else:
        ws, scales = map(list, zip(*(quant_weight(s, kind, g) for s in shapes)))
        a_idx = [block_indices(w.numel(), g).to(torch.int32) for w in ws]
        b_idx = [block_indices(w.numel(), g).to(torch.int32) for w in ws]
        a_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, a_idx)]
        b_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, b_idx)]

    def describe(idx):
        r = runs_t(idx)
        return r[:0] if described == "none" else r[::2].contiguous()

    a_runs, b_runs = [describe(i) for i in a_idx], [describe(i) for i in b_idx]
    assert all(runs_t(i).shape[0] > 2 for i in a_idx)  # lines the search would have found
    base, w_ref = [w.clone() for w in ws], [w.clone() for w in ws]
    a_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, a_idx)]
    b_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, b_idx)]
    a_ref, b_ref = [x.clone() for x in a_saved], [x.clone() for x in b_saved]
    sat, sat_ref = torch.zeros(len(ws), dtype=torch.int64), torch.zeros(len(ws), dtype=torch.int64)
    q = {"scales": scales, "saturated": sat} if scales is not None else {}
    q_ref = {"scales": scales, "saturated": sat_ref} if scales is not None else {}
    reference.apply_(w_ref, a_idx, a_d, a_ref, **q_ref)
    ext.apply_(ws, a_idx, a_d, a_saved, validate=False, runs=a_runs, **q)
    assert_same(ws + a_saved, w_ref + a_ref, "after apply: tensor")
    qs = {"in_scales": scales, "saturated": sat} if scales is not None else {}
    qs_ref = {"in_scales": scales, "saturated": sat_ref} if scales is not None else {}
    reference.switch_(w_ref, a_idx, a_ref, w_ref, b_idx, b_d, b_ref, **qs_ref)
    ext.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved, validate=False, out_runs=a_runs, in_runs=b_runs, **qs)
    assert ext.tuning()["last_plan"]["threaded"] == threaded
    assert_same(ws + b_saved, w_ref + b_ref, "after switch: tensor")
    assert torch.equal(sat, sat_ref)
    ext.restore_(ws, b_idx, b_saved, validate=False, runs=b_runs)
    assert_same(ws, base, "restored weight")


def test_runs_on_numpy_arrays_match_the_numpy_reference(core_np):
    g = gen(3)
    w = (torch.randn(40, 130, generator=g)).numpy()
    idx = block_indices(w.size, g).to(torch.int32).numpy()
    d = torch.randn(idx.size, generator=g).numpy()
    runs = runs_of(idx)
    got, want = w.copy(), w.copy()
    s1, s2 = np.zeros(idx.size, np.float32), np.zeros(idx.size, np.float32)
    core.apply_([got], [idx], [d], [s1], validate=False, runs=[runs])
    reference_np.apply_([want], [idx], [d], [s2], validate=True, runs=[runs])
    assert np.array_equal(got.view(np.int32), want.view(np.int32)) and np.array_equal(s1, s2)


@pytest.fixture
def core_np():
    try:
        core.load()
    except Exception as exc:
        pytest.skip(f"kernel core unavailable: {exc}")


def hostile(idx: np.ndarray, runs: np.ndarray, case: str) -> np.ndarray:
    r = runs.copy()
    if case == "wrong index":
        r[1, 1] += 1
    elif case == "past the list":
        r[-1, 2] = idx.size - r[-1, 0] + 1
    elif case == "past the weight":
        r[-1, 1] = 10**9
    elif case == "overlap":
        r[1, 0] = r[0, 0] + 1
    elif case == "empty run":
        r[2, 2] = 0
    elif case == "negative":
        r[0, 1] = -1
    return r


CASES = {
    "wrong index": r"run 1 says index \d+ at entry \d+, the index list holds \d+",
    "past the list": r"run \d+ \(position \d+, first index \d+, length \d+\) does not fit \d+ entries",
    "past the weight": r"run \d+ \(position \d+, first index 1000000000, length \d+\) does not fit",
    "overlap": r"run 1 \(position \d+, .*\) overlaps the run before it, which ends at entry \d+",
    "empty run": r"run 2 \(position \d+, first index \d+, length 0\) is empty",
    "negative": r"run 0 \(position \d+, first index -1, length \d+\) does not fit",
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["core", "reference_np", "torch-core", "torch-reference"])
def test_hostile_runs_refused_before_any_write(core_np, ext, case, impl):
    """Every path refuses the same hostile runs with validate=True, the same words, nothing written; without
    validate the core still refuses a first or last run out of bounds (it trusts the rest, as it trusts order)."""
    g = gen(5)
    w = torch.randn(30, 200, generator=g)
    idx = block_indices(w.numel(), g).to(torch.int32)
    d = torch.randn(idx.numel(), generator=g)
    runs = hostile(idx.numpy(), runs_of(idx.numpy()), case)
    before = w.clone()
    saved = torch.zeros(idx.numel())
    with pytest.raises(KernelInputError, match=CASES[case]):
        if impl == "core":
            core.apply_([w.numpy()], [idx.numpy()], [d.numpy()], [saved.numpy()], validate=True, runs=[runs])
        elif impl == "reference_np":
            reference_np.apply_([w.numpy()], [idx.numpy()], [d.numpy()], [saved.numpy()], validate=True, runs=[runs])
        elif impl == "torch-core":
            ext.switch_([], [], [], [w], [idx], [d], [saved], validate=True, in_runs=[torch.from_numpy(runs)])
        else:
            reference.switch_([], [], [], [w], [idx], [d], [saved], validate=True, in_runs=[torch.from_numpy(runs)])
    assert torch.equal(w, before)
    if case in ("past the list", "past the weight"):  # the last run's bounds are checked without validate too
        with pytest.raises(KernelInputError, match=CASES[case]):
            core.apply_([w.numpy()], [idx.numpy()], [d.numpy()], [saved.numpy()], validate=False, runs=[runs])
        assert torch.equal(w, before)


def test_malformed_runs_refused(core_np):
    w, idx = np.zeros(100, np.float32), np.arange(10, dtype=np.int32)
    d, s = np.zeros(10, np.float32), np.zeros(10, np.float32)
    with pytest.raises(KernelInputError, match=r"tensor 0: runs must be int64 \[n, 3\].*got int32\[2, 3\]"):
        core.apply_([w], [idx], [d], [s], runs=[np.zeros((2, 3), np.int32)])
    with pytest.raises(KernelInputError, match=r"1 run tensors for 2 weights"):
        core.apply_([w, w.copy()], [idx, idx], [d, d], [s, s.copy()], runs=[np.zeros((0, 3), np.int64)])
