"""Mirror orders (``shira_runtime.kernels.orders``): an int8 weight's uint8 mirror written in a second pass, in the
order of its transposed positions. Orders change no result: codes, saved codes, saturation counts and mirrors are
the reference's (which ignores them) bit for bit, in every plan, threaded or not, with the orders on one side, both
or neither; a bad order is refused with the same words on every path, before any write.

The C++ cases are skipped (not failed) when the extension cannot be built here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shira_runtime.kernels import KernelInputError, orders, reference, reference_np
from shira_runtime.kernels import core as np_core

from tests.kernels.test_quantized_kernels import (
    assert_bytes_equal,
    clone,
    gen,
    quant_deltas,
    quant_weight,
    rand_indices,
    u8t,
)

SHAPES = [(40, 96), (17, 333), (3, 2000), (1, 7)]  # row counts and lengths that are no multiple of a line
IDX_DTYPES = [torch.int32, torch.int64]


def mirror_order(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(orders.mirror_order(idx.numpy(), *w.shape))


def block_indices(numel: int, n: int, idx_dtype, g) -> torch.Tensor:
    """Runs of 16 consecutive indices (a block mask's layout: the runs paths of the first pass)."""
    starts = torch.randperm(max(1, numel // 16), generator=g)[: max(1, n // 16)] * 16
    idx = (starts[:, None] + torch.arange(16)).reshape(-1)
    return idx[idx < numel].sort().values.to(idx_dtype)


def int8_state(idx_dtype, seed, mask):
    g = gen(seed)
    ws, scales = zip(*(quant_weight(s, "int8", g) for s in SHAPES))
    pick = block_indices if mask == "block" else rand_indices
    a_idx = [pick(w.numel(), max(1, w.numel() // 4), idx_dtype, g) for w in ws]
    b_idx = [pick(w.numel(), max(1, w.numel() // 5), idx_dtype, g) for w in ws]
    a_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, a_idx)]
    b_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, b_idx)]
    # a baked adapter's codes on one tensor (the second pass reads them as they are)
    b_d[1] = torch.randint(-127, 128, (b_idx[1].numel(),), generator=g, dtype=torch.int8)
    return list(ws), list(scales), a_idx, a_d, b_idx, b_d


def test_mirror_order_sorts_by_transposed_position():
    g = np.random.default_rng(0)
    for rows, cols in [(40, 96), (1, 7), (7, 1), (300, 5)]:
        idx = np.sort(g.choice(rows * cols, size=max(1, rows * cols // 3), replace=False)).astype(np.int32)
        order = orders.mirror_order(idx, rows, cols)
        assert order.dtype == idx.dtype and sorted(order.tolist()) == list(range(idx.size))
        pos = [(int(j) % cols) * rows + int(j) // cols for j in idx[order]]
        assert pos == sorted(pos) and len(set(pos)) == len(pos)
        assert orders.fault(idx, order, rows, cols, True) is None


@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
@pytest.mark.parametrize("mask", ["rand", "block"])
@pytest.mark.parametrize("sides", ["both", "out", "in"])
def test_orders_change_no_result(ext, knobs, idx_dtype, threaded, plan, mask, sides):
    """apply A, switch A -> B, restore, each with orders (on both sides of the switch, or on one only): the same
    bytes as the reference everywhere, every mirror the transposed copy of its codes, the base back at the end."""
    knobs(threaded=threaded, chunk=29, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan])
    ws, scales, a_idx, a_d, b_idx, b_d = int8_state(idx_dtype, seed=21, mask=mask)
    a_ord = [mirror_order(i, w) for i, w in zip(a_idx, ws)]
    b_ord = [mirror_order(i, w) for i, w in zip(b_idx, ws)]
    none = [torch.empty(0, dtype=idx_dtype)] * len(ws)
    out_ord = a_ord if sides in ("both", "out") else none
    in_ord = b_ord if sides in ("both", "in") else none
    base = clone(ws)
    results = {}
    for name, impl in (("reference", reference), ("cpp", ext)):
        w = clone(ws)
        ms = [u8t(x) for x in w]
        sa = [torch.zeros(i.numel(), dtype=torch.int8) for i in a_idx]
        sb = [torch.zeros(i.numel(), dtype=torch.int8) for i in b_idx]
        sat = torch.zeros(len(ws), dtype=torch.int64)
        impl.apply_(w, a_idx, a_d, sa, scales=scales, saturated=sat, mirrors=ms, orders=a_ord)
        assert all(torch.equal(m, u8t(x)) for m, x in zip(ms, w)), f"{name}: mirrors after apply"
        impl.switch_(w, a_idx, sa, w, b_idx, b_d, sb, in_scales=scales, saturated=sat, out_mirrors=ms,
                     in_mirrors=ms, out_orders=out_ord, in_orders=in_ord)  # fmt: skip
        assert all(torch.equal(m, u8t(x)) for m, x in zip(ms, w)), f"{name}: mirrors after switch"
        after = clone(w)
        impl.restore_(w, b_idx, sb, mirrors=ms, orders=in_ord)
        assert all(torch.equal(m, u8t(x)) for m, x in zip(ms, w)), f"{name}: mirrors after restore"
        assert_bytes_equal(w, base, f"{name} restored")
        results[name] = (after, sa, sb, sat)
    assert ext.tuning()["last_plan"] == {"threaded": threaded, "plan": plan}
    for x, y in zip(results["cpp"][:3], results["reference"][:3]):
        assert_bytes_equal(x, y, "cpp against reference")
    assert torch.equal(results["cpp"][3], results["reference"][3]) and int(results["cpp"][3].sum()) > 0


def test_orders_with_aliased_weights(ext, knobs):
    """The same weight twice in one list (the ordered plan: one entry after another, each one's second pass right
    after its first): the mirror ends as the transposed copy of the codes, as in the reference."""
    knobs(threaded=True, chunk=17)
    ws, scales, a_idx, a_d, b_idx, b_d = int8_state(torch.int64, seed=5, mask="rand")
    w0, s0 = ws[0], scales[0]
    half = [a_idx[0][::2].contiguous(), a_idx[0][1::2].contiguous()]
    deltas = [a_d[0][::2].contiguous(), a_d[0][1::2].contiguous()]
    out = {}
    for name, impl in (("reference", reference), ("cpp", ext)):
        w = w0.clone()
        m = u8t(w)
        saved = [torch.zeros(i.numel(), dtype=torch.int8) for i in half]
        impl.apply_([w, w], half, deltas, saved, scales=[s0, s0], mirrors=[m, m],
                    orders=[mirror_order(i, w) for i in half])  # fmt: skip
        assert torch.equal(m, u8t(w)), name
        out[name] = (w, *saved)
    assert ext.tuning()["last_plan"]["plan"] == "ordered"
    assert_bytes_equal(list(out["cpp"]), list(out["reference"]), "cpp against reference")


def _bad_order(kind: str, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, str, bool]:
    """(order, message, refused without validate too)."""
    o = mirror_order(idx, w)
    if kind == "out-of-range":
        o[3] = idx.numel()
        return o, rf"mirror order entry 3 names entry {idx.numel()}, out of range for {idx.numel()} entries", False
    if kind == "last-out-of-range":
        o[-1] = -1
        return o, rf"mirror order entry {idx.numel() - 1} names entry -1, out of range", True
    if kind == "swapped":
        o[[4, 5]] = o[[5, 4]]
        return o, r"mirror order entry 5 \(entry \d+, index \d+\) is at transposed position \d+, not after", False
    if kind == "repeated":
        o[6] = o[5]
        return o, r"mirror order entry 6 \(entry \d+, index \d+\) is at transposed position \d+, not after", False
    if kind == "dtype":
        return o.long() if o.dtype == torch.int32 else o.int(), r"the mirror order must be a contiguous", True
    if kind == "length":
        return o[:-1].contiguous(), r"the mirror order must be a contiguous", True
    raise AssertionError(kind)


@pytest.mark.parametrize("impl_name", ["reference", "cpp", "numpy-core", "numpy-reference"])
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("kind", ["out-of-range", "last-out-of-range", "swapped", "repeated", "dtype", "length",
                                  "no-mirror"])  # fmt: skip
def test_bad_orders_refused_before_any_write(request, impl_name, validate, kind):
    """Every path refuses a bad order with the core's words and writes nothing (an order is checked entry by entry
    with ``validate``; without, its first and last entries' range, as the list's ends are)."""
    g = gen(3)
    w, s = quant_weight((40, 96), "int8", g)
    idx = rand_indices(w.numel(), 300, torch.int32, g)
    d = quant_deltas(w, s, idx, g)
    m = u8t(w)
    if kind == "no-mirror":
        o, message, always = mirror_order(idx, w), r"a mirror order given without a uint8 mirror", True
        m = torch.empty(0, dtype=torch.uint8)
    else:
        o, message, always = _bad_order(kind, idx, w)
    if not (validate or always):
        pytest.skip("trusted without validate (as an unsorted list is)")
    if impl_name == "cpp":
        impl = request.getfixturevalue("ext")
    elif impl_name.startswith("numpy"):
        impl = np_core if impl_name == "numpy-core" else reference_np
        w, s, idx, d, m, o = (x.numpy() for x in (w, s, idx, d, m, o))
    else:
        impl = reference
    saved = (np.zeros if impl_name.startswith("numpy") else torch.zeros)(idx.shape[0], dtype=w.dtype)
    before = [x.copy() if isinstance(x, np.ndarray) else x.clone() for x in (w, m, saved)]
    calls = {
        "apply_": lambda: impl.apply_([w], [idx], [d], [saved], validate, [s], None, [m], None, [o]),
        "restore_": lambda: impl.restore_([w], [idx], [saved], validate, [m], None, [o]),
        "switch_": lambda: impl.switch_([w], [idx], [saved], [], [], [], [], validate, None, None, [m], None, None,
                                        None, [o], None),  # fmt: skip
    }
    for verb, call in calls.items():
        with pytest.raises(KernelInputError, match=rf"{verb}: .*tensor 0: {message}"):
            call()
        for x, y in zip((w, m, saved), before):
            assert bytes(memoryview(np.ascontiguousarray(np.asarray(x)).view(np.uint8))) == bytes(
                memoryview(np.ascontiguousarray(np.asarray(y)).view(np.uint8))
            ), f"{verb}: written"


def test_numpy_core_with_orders_matches_the_numpy_reference():
    """The device path (numpy arrays, no torch in the call): the core with orders and the numpy reference give the
    same bytes after apply, switch and restore."""
    g = np.random.default_rng(9)
    shapes = [(64, 200), (5, 3000)]
    res = {}
    for name, impl in (("core", np_core), ("reference", reference_np)):
        rng = np.random.default_rng(1)
        ws = [rng.integers(-127, 128, size=sh, dtype=np.int8) for sh in shapes]
        ms = [np.ascontiguousarray((w.view(np.uint8) ^ 0x80).T) for w in ws]
        sc = [np.full(sh[0], 0.02, np.float32) for sh in shapes]
        lists = []
        for k in range(2):
            gg = np.random.default_rng(10 + k)
            idx = [np.sort(gg.choice(w.size, w.size // 7, replace=False)).astype(np.int32) for w in ws]
            dl = [(gg.standard_normal(i.size) * 0.05).astype(np.float32) for i in idx]
            lists.append((idx, dl, [orders.mirror_order(i, *w.shape) for i, w in zip(idx, ws)]))
        (ai, ad, ao), (bi, bd, bo) = lists
        sa = [np.zeros(i.size, np.int8) for i in ai]
        sb = [np.zeros(i.size, np.int8) for i in bi]
        impl.apply_(ws, ai, ad, sa, True, sc, None, ms, None, ao)
        impl.switch_(ws, ai, sa, ws, bi, bd, sb, True, sc, None, ms, ms, None, None, ao, bo)
        assert all(np.array_equal(m, (w.view(np.uint8) ^ 0x80).T) for m, w in zip(ms, ws)), name
        res[name] = [w.copy() for w in ws] + sa + sb
        impl.restore_(ws, bi, sb, True, ms, None, bo)
        assert all(np.array_equal(m, (w.view(np.uint8) ^ 0x80).T) for m, w in zip(ms, ws)), name
    assert g is not None and all(np.array_equal(x, y) for x, y in zip(res["core"], res["reference"]))
