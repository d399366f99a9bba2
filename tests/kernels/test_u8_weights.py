"""uint8 weights: int8 codes kept as ``code + 128`` with per-COLUMN scales, i.e. an int8 weight ``[rows, cols]``
held only as its transposed copy ``[cols, rows]`` (what an int8 bundle's graph reads and its switch writes).

The semantics are pinned to the int8 path: switching the copy at transposed indices must give exactly the copy of
the int8 result (bytes, saved codes, saturation counts), in the torch and numpy references and in the core, in
every plan and dispatch branch (listed entries, lines of the vectorized loop, described runs); refusals come
before any write.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shira_runtime.kernels import KernelInputError, reference, reference_np
from shira_runtime.kernels.runs import runs_of

from tests.kernels.test_quantized_kernels import (
    assert_bytes_equal,
    clone,
    gen,
    line_indices,
    quant_deltas,
    quant_weight,
    rand_indices,
)

SHAPES = [(1, 7), (40, 96), (17, 333), (130, 20)]  # (rows, cols) of the int8 weight; copies [cols, rows]


def as_u8(codes: torch.Tensor) -> torch.Tensor:
    """The transposed zero-point-128 copy ``[cols, rows]`` of int8 codes ``[rows, cols]``."""
    return (codes.view(torch.uint8) ^ 0x80).t().contiguous()


def to_copy(idx: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of int8 codes ``[rows, cols]`` -> the same entries' indices in the copy ``[cols, rows]``, sorted;
    and the permutation that sorts them (apply it to deltas and saved values)."""
    t = (idx.long() % cols) * rows + idx.long() // cols
    t, order = t.sort()
    return t.to(idx.dtype), order


def copy_state(seed: int, idx_dtype, density: float = 0.3, lines: bool = False):
    """int8 codes, scales, indices and deltas on SHAPES, and the same on their uint8 copies."""
    g = gen(seed)
    codes, scales = map(list, zip(*(quant_weight(s, "int8", g) for s in SHAPES)))
    if lines:  # block layouts in the COPY (lines of 64 bytes, runs across a copy row's end), mapped back
        copy_idx = [line_indices(c, r, 6, torch.int64, g) if r * c >= 70 else torch.arange(r * c) for r, c in SHAPES]
        idx = [((t % r) * c + t // r).sort().values.to(idx_dtype) for t, (r, c) in zip(copy_idx, SHAPES)]
    else:
        idx = [rand_indices(w.numel(), max(1, round(density * w.numel())), idx_dtype, g) for w in codes]
    ds = [quant_deltas(w, s, i, g) for w, s, i in zip(codes, scales, idx)]
    u8 = [as_u8(w) for w in codes]
    moved = [to_copy(i, *w.shape) for i, w in zip(idx, codes)]
    u_idx = [t for t, _ in moved]
    u_ds = [d[o] for d, (_, o) in zip(ds, moved)]
    return codes, scales, idx, ds, u8, u_idx, u_ds, [o for _, o in moved]


@pytest.mark.parametrize("lines", [False, True], ids=["rand", "lines"])
def test_reference_switches_the_copy_as_the_codes(lines):
    """apply then restore on the copy == the copy of apply then restore on the int8 codes (bytes, saved,
    saturation); byte 0 (code -128) is never written."""
    codes, scales, idx, ds, u8, u_idx, u_ds, orders = copy_state(1, torch.int64, lines=lines)
    base = clone(u8)
    saved = [torch.empty(i.numel(), dtype=torch.int8) for i in idx]
    u_saved = [torch.empty(i.numel(), dtype=torch.uint8) for i in u_idx]
    sat, u_sat = torch.zeros(len(codes), dtype=torch.int64), torch.zeros(len(codes), dtype=torch.int64)
    reference.apply_(codes, idx, ds, saved, scales=scales, saturated=sat)
    reference.apply_(u8, u_idx, u_ds, u_saved, scales=scales, saturated=u_sat)
    assert_bytes_equal(u8, [as_u8(w) for w in codes], "copy after apply")
    assert_bytes_equal(u_saved, [as_u8(s[None])[:, 0][o] for s, o in zip(saved, orders)], "saved")
    assert torch.equal(sat, u_sat) and int(sat.sum()) > 0
    assert all(int(w.min()) >= 1 for w in u8 if w.numel())
    reference.restore_(u8, u_idx, u_saved)
    assert_bytes_equal(u8, base, "restored copy")


def test_numpy_reference_agrees():
    codes, scales, idx, ds, u8, u_idx, u_ds, _ = copy_state(2, torch.int32)
    base = [w.numpy().copy() for w in u8]
    ws_np = [w.numpy().copy() for w in u8]
    saved_np = [np.empty(i.numel(), np.uint8) for i in u_idx]
    sat_np = np.zeros(len(u8), np.int64)
    idx_np, ds_np, sc_np = [i.numpy() for i in u_idx], [d.numpy() for d in u_ds], [s.numpy() for s in scales]
    reference_np.apply_(ws_np, idx_np, ds_np, saved_np, scales=sc_np, saturated=sat_np)
    saved = [torch.empty(i.numel(), dtype=torch.uint8) for i in u_idx]
    sat = torch.zeros(len(u8), dtype=torch.int64)
    reference.apply_(u8, u_idx, u_ds, saved, scales=scales, saturated=sat)
    assert_bytes_equal([torch.from_numpy(w) for w in ws_np], u8, "numpy copy")
    assert_bytes_equal([torch.from_numpy(s) for s in saved_np], saved, "numpy saved")
    assert sat_np.tolist() == sat.tolist()
    reference_np.restore_(ws_np, idx_np, saved_np)
    assert all(np.array_equal(w, b) for w, b in zip(ws_np, base))


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
@pytest.mark.parametrize("layout", ["rand", "lines", "described", "listed"])
def test_core_matches_reference(ext, knobs, idx_dtype, threaded, plan, layout):
    """apply A, switch A -> B, restore on the copies: the core (torch tensors and numpy arrays) equals the
    reference byte for byte, saturation counts too; ``lines``: whole 64-byte lines of the copy (the vectorized
    loop, runs crossing a copy row's end), ``described``: the same with their runs passed (stretches); ``listed``:
    random entries described as holding no run (the runtime's call: the fused plan then merges each chunk's restore
    and apply into one pass)."""
    knobs(threaded=threaded, chunk=37, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan], merge_above=0)
    lines = layout in ("lines", "described")
    _, scales, _, _, u8, a_idx, a_d, _ = copy_state(3, idx_dtype, lines=lines)
    _, _, _, _, _, b_idx, b_d, _ = copy_state(4, idx_dtype, density=0.2, lines=lines)
    if plan == "phased":  # unsorted lists
        g = gen(5)
        perms = [torch.randperm(i.numel(), generator=g) for i in a_idx]
        a_idx, a_d = [i[p] for i, p in zip(a_idx, perms)], [d[p] for d, p in zip(a_d, perms)]
    runs = {}
    if layout == "described":
        runs = {
            "out_runs": [torch.from_numpy(runs_of(i.numpy())) for i in a_idx],
            "in_runs": [torch.from_numpy(runs_of(i.numpy())) for i in b_idx],
        }
        assert sum(r.shape[0] for r in runs["in_runs"]) > 0
    elif layout == "listed":
        runs = {k: [torch.zeros((0, 3), dtype=torch.int64) for _ in a_idx] for k in ("out_runs", "in_runs")}
    a_saved = [torch.empty(i.numel(), dtype=torch.uint8) for i in a_idx]
    b_saved = [torch.empty(i.numel(), dtype=torch.uint8) for i in b_idx]
    base = clone(u8)
    w_ref, a_ref, b_ref = clone(u8), clone(a_saved), clone(b_saved)
    sat_ref, sat = torch.zeros(len(u8), dtype=torch.int64), torch.zeros(len(u8), dtype=torch.int64)
    reference.apply_(w_ref, a_idx, a_d, a_ref, scales=scales, saturated=sat_ref)
    ext.apply_(u8, a_idx, a_d, a_saved, scales=scales, saturated=sat, runs=runs.get("out_runs"))
    assert_bytes_equal(u8 + a_saved, w_ref + a_ref, "after apply: tensor")
    assert torch.equal(sat, sat_ref) and int(sat.sum()) > 0
    sat_ref.zero_(), sat.zero_()
    reference.switch_(w_ref, a_idx, a_ref, w_ref, b_idx, b_d, b_ref, in_scales=scales, saturated=sat_ref)
    np_w = [w.numpy().copy() for w in u8]
    np_saved = [np.empty(i.numel(), np.uint8) for i in b_idx]
    ext.switch_(u8, a_idx, a_saved, u8, b_idx, b_d, b_saved, in_scales=scales, saturated=sat, **runs)
    assert ext.tuning()["last_plan"] == {"threaded": threaded, "plan": plan}
    if layout in ("rand", "listed"):
        assert ext.tuning()["last_merged"] is (layout == "listed" and plan == "fused")
    assert_bytes_equal(u8 + b_saved, w_ref + b_ref, "after switch: tensor")
    assert torch.equal(sat, sat_ref)
    from shira_runtime.kernels import core  # the same call through ctypes on numpy arrays

    core.switch_(np_w, [i.numpy() for i in a_idx], [s.numpy() for s in a_saved], np_w, [i.numpy() for i in b_idx],
                 [d.numpy() for d in b_d], np_saved, in_scales=[s.numpy() for s in scales],
                 **{k: [r.numpy() for r in v] for k, v in runs.items()})  # fmt: skip
    assert_bytes_equal([torch.from_numpy(w) for w in np_w], u8, "numpy core: tensor")
    ext.restore_(u8, b_idx, b_saved, runs=runs.get("in_runs"))
    assert_bytes_equal(u8, base, "restored copy")


@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
def test_baked_codes_and_restore_are_byte_copies(ext, knobs, threaded):
    """Baked uint8 codes are written as they are (no scales), in the core as in the reference."""
    knobs(threaded=threaded, chunk=37)
    _, _, _, _, u8, idx, _, _ = copy_state(6, torch.int32)
    g = gen(7)
    new = [torch.randint(1, 256, (i.numel(),), generator=g, dtype=torch.uint8) for i in idx]
    w_ref, s_ref = clone(u8), [torch.empty(i.numel(), dtype=torch.uint8) for i in idx]
    saved = clone(s_ref)
    base = clone(u8)
    reference.apply_(w_ref, idx, new, s_ref)
    ext.apply_(u8, idx, new, saved)
    assert_bytes_equal(u8 + saved, w_ref + s_ref, "tensor")
    assert all(torch.equal(w.view(-1)[i.long()], n) for w, i, n in zip(u8, idx, new))
    ext.restore_(u8, idx, saved)
    assert_bytes_equal(u8, base, "restored")


@pytest.mark.parametrize("impl_name", ["reference", "reference_np", "cpp", "core"])
@pytest.mark.parametrize(
    "kind, message",
    [
        ("no-scales", r"tensor 0: a (torch\.)?(uint8|Byte) weight needs its per-column scales"),
        ("scale-cols", r"tensor 0: 7 scales do not divide a weight of 40 elements into columns"),
        ("scale-rows", r"tensor 0: 10 scales for a uint8 weight \[10, 4\]: a 2-D weight with one scale per column"),
        ("flat", r"tensor 0: 4 scales for a uint8 weight \[40\]: a 2-D weight with one scale per column"),
        ("mirror", r"tensor 0: a mirror given for a (torch\.)?(uint8|Byte) weight"),
        ("out-of-range", r"tensor 0: index 40 out of range"),
    ],
)
def test_malformed_u8_inputs_refused_before_any_write(request, impl_name, kind, message):
    w = torch.full((10, 4), 128, dtype=torch.uint8)
    idx, d, saved = torch.tensor([3, 39]), torch.ones(2), torch.empty(2, dtype=torch.uint8)
    scales, mirrors = [torch.ones(4)], None
    if kind == "no-scales":
        scales = None
    elif kind == "scale-cols":
        scales = [torch.ones(7)]
    elif kind == "scale-rows":  # divides the weight, but per row: the wrong axis for a uint8 copy
        scales = [torch.ones(10)]
    elif kind == "flat":
        w = w.view(-1)
    elif kind == "mirror":
        mirrors = [torch.empty(4, 10, dtype=torch.uint8)]
    else:
        idx = torch.tensor([3, 40])
    args = ([w], [idx], [d], [saved])
    kw = {"scales": scales, "mirrors": mirrors}
    if impl_name in ("reference_np", "core"):
        from shira_runtime.kernels import core

        impl = reference_np if impl_name == "reference_np" else core
        args = tuple([x.numpy() for x in a] for a in args)
        kw = {k: [x.numpy() for x in v] if v is not None else None for k, v in kw.items()}
    else:
        impl = reference if impl_name == "reference" else request.getfixturevalue("ext")
    before = w.clone()
    with pytest.raises(KernelInputError, match=message):
        impl.apply_(*args, **kw)
    assert torch.equal(w, before) and (impl_name in ("reference", "cpp") or np.array_equal(args[0][0], before))
