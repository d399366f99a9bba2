"""The C++ fast path against the reference, bit for bit, in every dispatch branch; its input checks.

Skipped (not failed) when the extension cannot be built here.
"""

from __future__ import annotations

import pytest
import torch
from shira_runtime.kernels import KernelInputError, reference

from tests.conftest import bits

IDX_DTYPES = [torch.int32, torch.int64]
SIZES = [(1,), (7,), (10, 100), (4099,), (33, 2000)]  # flat sizes not multiples of any block or chunk


def last_plan(ext) -> dict:
    return ext.tuning()["last_plan"]


# ---- inputs ----------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_weight(shape, dtype, g) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 10 ** torch.empty(shape).uniform_(-3, 3, generator=g)).to(dtype)


def rand_indices(numel: int, n: int, idx_dtype, g, sort: bool = True) -> torch.Tensor:
    idx = torch.randperm(numel, generator=g)[:n]
    return (idx.sort().values if sort else idx).to(idx_dtype)


def rand_deltas(w: torch.Tensor, idx: torch.Tensor, g) -> torch.Tensor:
    """Deltas from 1e-8 to 1e4 in magnitude, a third of them exact rounding ties for the weight dtype."""
    n = idx.numel()
    d = torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-8, 4, generator=g)
    old = w.reshape(-1)[idx.long()]
    int_view = {4: torch.int32, 2: torch.int16}[w.element_size()]
    neighbour = (old.view(int_view) + 1).view(w.dtype)  # next representable value away from zero
    tie = (neighbour.float() - old.float()) / 2
    use_tie = (torch.rand(n, generator=g) < 1 / 3) & torch.isfinite(tie)
    return torch.where(use_tie, tie, d).float()


def state(shapes, dtype, idx_dtype, density, seed, sort=True, counts=None):
    """weights, indices, deltas, saved for one adapter over fresh random weights."""
    g = gen(seed)
    ws = [rand_weight(s, dtype, g) for s in shapes]
    idx = []
    for k, w in enumerate(ws):
        n = counts[k] if counts is not None else max(1, round(density * w.numel()))
        idx.append(rand_indices(w.numel(), min(n, w.numel()), idx_dtype, g, sort))
    ds = [rand_deltas(w, i, g) for w, i in zip(ws, idx)]
    saved = [torch.full((i.numel(),), 7, dtype=dtype) for i in idx]
    return ws, idx, ds, saved


def clone(ts):
    return [t.clone() for t in ts]


def assert_bits_equal(got, want, what):
    assert len(got) == len(want)
    for t, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(bits(x), bits(y)), f"{what} {t} differs from the reference"


# ---- parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
def test_apply_then_restore(ext, knobs, dtype, idx_dtype, threaded):
    knobs(threaded=threaded, chunk=37)
    ws, idx, ds, saved = state(SIZES, dtype, idx_dtype, 0.2, seed=1)
    w_ref, s_ref = clone(ws), clone(saved)
    reference.apply_(w_ref, idx, ds, s_ref)
    ext.apply_(ws, idx, ds, saved)
    assert last_plan(ext) == {"threaded": threaded, "plan": "fused"}
    assert_bits_equal(ws, w_ref, "weight")
    assert_bits_equal(saved, s_ref, "saved")

    base = state(SIZES, dtype, idx_dtype, 0.2, seed=1)[0]
    ext.restore_(ws, idx, saved)
    assert_bits_equal(ws, base, "restored weight")


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
def test_switch_overlapping(ext, knobs, dtype, idx_dtype, threaded, plan):
    """A -> B where B shares tensors and elements with A, lists in different orders, one tensor A-only."""
    knobs(threaded=threaded, chunk=29, force_plan=2 if plan == "ordered" else 0)
    unsorted = plan == "phased"  # unsorted lists are only accepted (and then phased) with validate=True
    ws, a_idx, a_d, a_saved = state(SIZES, dtype, idx_dtype, 0.3, seed=2, sort=not unsorted)
    g = gen(3)
    b_idx = []
    for w, ai in zip(ws, a_idx):  # half of A's elements plus as many others
        keep = ai[torch.randperm(ai.numel(), generator=g)[: (ai.numel() + 1) // 2]]
        fresh = rand_indices(w.numel(), max(1, ai.numel() // 2), idx_dtype, g)
        both = torch.cat([keep, fresh]).unique()
        b_idx.append(both if not unsorted else both[torch.randperm(both.numel(), generator=g)])
    order = [3, 0, 4, 1]  # B's lists: permuted, tensor 2 absent (restored only)
    b_w = [ws[k] for k in order]
    b_idx = [b_idx[k] for k in order]
    b_d = [rand_deltas(w, i, g) for w, i in zip(b_w, b_idx)]
    b_saved = [torch.zeros(i.numel(), dtype=dtype) for i in b_idx]

    reference.apply_(ws, a_idx, a_d, a_saved)  # state A, shared by both paths
    w_ref, a_ref, b_ref = clone(ws), clone(a_saved), clone(b_saved)
    reference.switch_(w_ref, a_idx, a_ref, [w_ref[k] for k in order], b_idx, b_d, b_ref)
    ext.switch_(ws, a_idx, a_saved, b_w, b_idx, b_d, b_saved, validate=True)
    assert last_plan(ext) == {"threaded": threaded, "plan": plan}
    assert_bits_equal(ws, w_ref, "weight")
    assert_bits_equal(b_saved, b_ref, "incoming saved")
    assert_bits_equal(a_saved, a_ref, "outgoing saved")


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
def test_switch_sorted_unvalidated(ext, knobs, dtype, idx_dtype):
    """The runtime's call: sorted lists, validate=False, same weight list on both sides."""
    knobs(threaded=True, chunk=53)
    ws, a_idx, a_d, a_saved = state(SIZES, dtype, idx_dtype, 0.25, seed=4)
    _, b_idx, b_d, b_saved = state(SIZES, dtype, idx_dtype, 0.25, seed=5)
    reference.apply_(ws, a_idx, a_d, a_saved)
    w_ref, b_ref = clone(ws), clone(b_saved)
    reference.switch_(w_ref, a_idx, clone(a_saved), w_ref, b_idx, b_d, b_ref, validate=False)
    ext.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved, validate=False)
    assert last_plan(ext)["plan"] == "fused"
    assert_bits_equal(ws, w_ref, "weight")
    assert_bits_equal(b_saved, b_ref, "incoming saved")


def run_indices(numel: int, run: int, idx_dtype, g, sort: bool = True) -> torch.Tensor:
    """A cache-line mask's layout and its edge cases: aligned runs of ``run`` elements, unaligned runs, runs one
    short or one long, and single entries between them."""
    starts = rand_indices(numel // run, max(1, numel // run // 4), torch.int64, g) * run
    pieces = []
    for k, s in enumerate(starts.tolist()):
        kind = k % 5
        if kind == 0 or kind == 1:
            pieces.append(torch.arange(s, s + run))  # aligned run
        elif kind == 2:
            pieces.append(torch.arange(s + 3, s + 3 + run))  # unaligned run
        elif kind == 3:
            pieces.append(torch.arange(s, s + run - 1 + 2 * (k % 2)))  # one short or one long
        else:
            pieces.append(torch.tensor([s, s + 2, s + 5]))  # singles
    idx = torch.cat(pieces).clamp(max=numel - 1).unique()
    return (idx if sort else idx[torch.randperm(idx.numel(), generator=g)]).to(idx_dtype)


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
@pytest.mark.parametrize("runs", [1, 0], ids=["runs", "no-runs"])
def test_contiguous_runs(ext, knobs, dtype, idx_dtype, threaded, plan, runs):
    """Block-mask layouts (runs of one cache line, copied as blocks) agree with the reference bit for bit,
    whatever the chunking cuts (chunk sizes that split runs), in every plan, for apply, switch and restore."""
    knobs(threaded=threaded, chunk=45, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan], runs=runs)
    run = 64 // torch.empty(0, dtype=dtype).element_size()
    g = gen(21)
    shapes = [(64, 96), (3000,), (17, 33)]
    ws = [rand_weight(s, dtype, g) for s in shapes]
    unsorted = plan == "phased"
    a_idx = [run_indices(w.numel(), run, idx_dtype, g, sort=not unsorted) for w in ws]
    b_idx = [run_indices(w.numel(), run, idx_dtype, g, sort=not unsorted) for w in ws]
    a_d = [rand_deltas(w, i, g) for w, i in zip(ws, a_idx)]
    b_d = [rand_deltas(w, i, g) for w, i in zip(ws, b_idx)]
    a_saved = [torch.empty(i.numel(), dtype=dtype) for i in a_idx]
    b_saved = [torch.empty(i.numel(), dtype=dtype) for i in b_idx]
    base = clone(ws)
    w_ref, a_ref, b_ref = clone(ws), clone(a_saved), clone(b_saved)
    reference.apply_(w_ref, a_idx, a_d, a_ref)
    ext.apply_(ws, a_idx, a_d, a_saved)
    assert_bits_equal(ws + a_saved, w_ref + a_ref, "after apply: tensor")
    reference.switch_(w_ref, a_idx, a_ref, w_ref, b_idx, b_d, b_ref)
    ext.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved)
    assert last_plan(ext) == {"threaded": threaded, "plan": plan}
    assert_bits_equal(ws + b_saved, w_ref + b_ref, "after switch: tensor")
    ext.restore_(ws, b_idx, b_saved)
    assert_bits_equal(ws, base, "restored weight")


def test_same_weight_twice_in_a_list_keeps_list_order(ext, knobs, dtype):
    """Two incoming entries on one weight with shared elements: the second sees the first's write."""
    knobs(threaded=True, chunk=16)
    g = gen(6)
    w = rand_weight((3000,), dtype, g)
    i1 = rand_indices(3000, 900, torch.int32, g)
    i2 = torch.cat([i1[::2], rand_indices(3000, 300, torch.int32, g)]).unique()
    d1, d2 = rand_deltas(w, i1, g), rand_deltas(w, i2, g)
    s1, s2 = torch.empty(i1.numel(), dtype=dtype), torch.empty(i2.numel(), dtype=dtype)
    w_ref, s1_ref, s2_ref = w.clone(), s1.clone(), s2.clone()
    reference.apply_([w_ref, w_ref], [i1, i2], [d1, d2], [s1_ref, s2_ref])
    ext.apply_([w, w], [i1, i2], [d1, d2], [s1, s2])
    assert last_plan(ext)["plan"] == "ordered"
    assert_bits_equal([w, s1, s2], [w_ref, s1_ref, s2_ref], "tensor")


def test_views_of_one_buffer(ext, knobs, dtype):
    """Weights that are disjoint views of one buffer (a fused qkv) are independent tensors."""
    knobs(threaded=True, chunk=16)
    g = gen(7)
    buf = rand_weight((3, 500), dtype, g)
    ws = list(buf.unbind(0))
    idx = [rand_indices(500, 100, torch.int64, g) for _ in ws]
    ds = [rand_deltas(w, i, g) for w, i in zip(ws, idx)]
    saved = [torch.empty(100, dtype=dtype) for _ in ws]
    buf_ref = buf.clone()
    s_ref = clone(saved)
    reference.apply_(list(buf_ref.unbind(0)), idx, ds, s_ref)
    ext.apply_(ws, idx, ds, saved)
    assert last_plan(ext)["plan"] == "fused"
    assert_bits_equal([buf, *saved], [buf_ref, *s_ref], "tensor")


@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
def test_empty_and_single(ext, knobs, dtype, threaded):
    knobs(threaded=threaded)
    ext.apply_([], [], [], [])
    ext.restore_([], [], [])
    ext.switch_([], [], [], [], [], [], [])
    ws, idx, ds, saved = state([(5,), (1,), (0,), (4, 4)], dtype, torch.int32, 0, seed=8, counts=[0, 1, 0, 1])
    w_ref, s_ref = clone(ws), clone(saved)
    reference.apply_(w_ref, idx, ds, s_ref)
    ext.apply_(ws, idx, ds, saved)
    assert_bits_equal(ws, w_ref, "weight")
    assert_bits_equal(saved, s_ref, "saved")
    ext.switch_(ws, idx, saved, ws, idx, ds, saved)  # restore and re-apply the same adapter
    assert_bits_equal(ws, w_ref, "weight")


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
def test_large_default_knobs(ext, knobs, dtype, idx_dtype):
    """Big enough to take the threaded branch with the default chunk size and prefetch."""
    knobs()
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    shapes = [(700, 300), (300, 777)]  # 2 x 44k entries per adapter, over the 32k threshold
    ws, a_idx, a_d, a_saved = state(shapes, dtype, idx_dtype, 0.2, seed=9)
    _, b_idx, b_d, b_saved = state(shapes, dtype, idx_dtype, 0.2, seed=10)
    w_ref, a_ref, b_ref = clone(ws), clone(a_saved), clone(b_saved)
    reference.apply_(w_ref, a_idx, a_d, a_ref)
    reference.switch_(w_ref, a_idx, a_ref, w_ref, b_idx, b_d, b_ref)
    ext.apply_(ws, a_idx, a_d, a_saved, validate=False)
    ext.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved, validate=False)
    assert last_plan(ext) == {"threaded": True, "plan": "fused"}
    assert_bits_equal(ws, w_ref, "weight")
    assert_bits_equal(a_saved + b_saved, a_ref + b_ref, "saved")


def test_prefetch_off_and_far(ext, knobs, dtype):
    for prefetch in (0, 1, 1000):
        knobs(threaded=True, chunk=64, prefetch=prefetch)
        ws, idx, ds, saved = state(SIZES, dtype, torch.int64, 0.3, seed=11)
        w_ref, s_ref = clone(ws), clone(saved)
        reference.apply_(w_ref, idx, ds, s_ref)
        ext.apply_(ws, idx, ds, saved)
        assert_bits_equal(ws, w_ref, "weight")
        assert_bits_equal(saved, s_ref, "saved")


def test_version_counters_move(ext):
    w, s = torch.zeros(10), torch.empty(2)
    v_w, v_s = w._version, s._version
    ext.apply_([w], [torch.tensor([1, 2])], [torch.ones(2)], [s])
    assert w._version > v_w and s._version > v_s


def test_fake_impl_traces(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w, idx, d, s = torch.empty(10), torch.tensor([1, 2]), torch.empty(2), torch.empty(2)
        torch.ops.shira.apply_([w], [idx], [d], [s])
        torch.ops.shira.restore_([w], [idx], [s])
        torch.ops.shira.switch_([w], [idx], [s], [w], [idx], [d], [s])
    args = ([torch.zeros(10)], [torch.tensor([1, 2])], [torch.ones(2)], [torch.empty(2)])
    torch.library.opcheck(torch.ops.shira.apply_.default, args, test_utils=("test_schema", "test_faketensor"))


# ---- refusals --------------------------------------------------------------------------------------


def _calls(ext, ws, idx, ds, saved):
    return {
        "apply_": lambda v: ext.apply_(ws, idx, ds, saved, validate=v),
        "restore_": lambda v: ext.restore_(ws, idx, saved, validate=v),
        "switch_": lambda v: ext.switch_(ws, idx, saved, ws, idx, ds, saved, validate=v),
    }


@pytest.mark.parametrize("verb", ["apply_", "restore_", "switch_"])
@pytest.mark.parametrize("bad", [-1, -(2**31), 1000, 2**40], ids=["neg", "neg-big", "numel", "huge"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_out_of_range_refused_before_any_write(ext, knobs, dtype, verb, bad, where):
    knobs(threaded=True, chunk=8)
    ws, idx, ds, saved = state([(50,), (10, 100), (30,)], dtype, torch.int64, 0.2, seed=12)
    pos = {"first": 0, "middle": idx[1].numel() // 2, "last": -1}[where]
    idx[1][pos] = bad
    if bad == -(2**31):
        idx[1] = idx[1].to(torch.int32)
    before_w, before_s = clone(ws), clone(saved)
    with pytest.raises(KernelInputError, match=rf"^shira::{verb}: (outgoing )?tensor 1: index {bad} out of range"):
        _calls(ext, ws, idx, ds, saved)[verb](True)
    assert_bits_equal(ws, before_w, "weight")
    assert_bits_equal(saved, before_s, "saved")
    if where != "middle":  # validate=False still guards the ends (the caller promised sorted lists)
        with pytest.raises(KernelInputError, match=rf"^shira::{verb}: .*index {bad} out of range"):
            _calls(ext, ws, idx, ds, saved)[verb](False)
        assert_bits_equal(ws, before_w, "weight")


def test_switch_refused_on_incoming_writes_nothing(ext):
    ws, idx, ds, saved = state([(100,), (200,)], torch.float32, torch.int32, 0.1, seed=13)
    ext.apply_(ws, idx, ds, saved)
    before = clone(ws)
    bad_idx = [idx[0], idx[1].clone()]
    bad_idx[1][3] = 200
    with pytest.raises(KernelInputError, match=r"^shira::switch_: incoming tensor 1: index 200 out of range"):
        ext.switch_(ws, idx, saved, ws, bad_idx, ds, clone(saved))
    assert_bits_equal(ws, before, "weight")  # the outgoing restore did not run either


def _broken(kind: str):
    ws, idx, ds, saved = state([(20,), (30,)], torch.float32, torch.int32, 0.2, seed=14)
    if kind == "lengths":
        saved = saved[:1]
    elif kind == "deltas-length":
        ds = ds[:1]
    elif kind == "weight-dtype":
        ws[1] = ws[1].double()
    elif kind == "weight-contiguity":
        ws[1] = torch.zeros(60)[::2]
    elif kind == "index-dtype":
        idx[1] = idx[1].to(torch.int16)
    elif kind == "index-shape":
        idx[1] = idx[1].reshape(2, -1)
    elif kind == "saved-dtype":
        saved[1] = saved[1].half()
    elif kind == "saved-shape":
        saved[1] = saved[1][:-1]
    elif kind == "delta-dtype":
        ds[1] = ds[1].double()
    elif kind == "delta-shape":
        ds[1] = ds[1][:-1]
    return ws, idx, ds, saved


@pytest.mark.parametrize(
    "kind, message",
    [
        ("lengths", r"list lengths differ"),
        ("deltas-length", r"list lengths differ"),
        ("weight-dtype", r"tensor 1: weight dtype Double"),
        ("weight-contiguity", r"tensor 1: weight is not contiguous"),
        ("index-dtype", r"tensor 1: indices dtype Short"),
        ("index-shape", r"tensor 1: indices must be 1-D"),
        ("saved-dtype", r"tensor 1: saved dtype Half differs"),
        ("saved-shape", r"tensor 1: saved shape"),
        ("delta-dtype", r"tensor 1: delta dtype Double"),
        ("delta-shape", r"tensor 1: delta shape"),
    ],
)
def test_malformed_inputs_refused(ext, kind, message):
    ws, idx, ds, saved = _broken(kind)
    before = clone(ws)
    with pytest.raises(KernelInputError, match=rf"^shira::apply_: .*{message}"):
        ext.apply_(ws, idx, ds, saved)
    assert_bits_equal(ws, before, "weight")
    if kind not in ("deltas-length", "delta-dtype", "delta-shape"):
        with pytest.raises(KernelInputError, match=rf"^shira::switch_: outgoing .*{message}"):
            ext.switch_(ws, idx, saved, [], [], [], [])


def test_non_finite(ext, dtype):
    """Inf and NaN deltas: same bits as the reference, except the sign/payload of a bf16 NaN (NaN either way:
    torch's own .to(bf16) writes 0xFFFF in its vector body and 0x7FC0 in its scalar tail)."""
    n = 100
    w = torch.randn(n).to(dtype)
    d = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30]).repeat(n // 5)
    idx = torch.arange(n)
    w_ref, s_ref, s = w.clone(), torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    reference.apply_([w_ref], [idx], [d], [s_ref])
    ext.apply_([w], [idx], [d], [s])
    assert_bits_equal([s], [s_ref], "saved")
    nan = torch.isnan(w_ref)
    assert torch.equal(nan, torch.isnan(w))
    keep = ~nan if dtype == torch.bfloat16 else torch.ones(n, dtype=torch.bool)
    assert_bits_equal([w[keep]], [w_ref[keep]], "weight")
    ext.restore_([w], [idx], [s])  # the revert is exact whatever was written
    assert_bits_equal([w], [s_ref], "restored weight")
