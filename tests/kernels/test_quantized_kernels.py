"""1-byte quantized weights in the kernels: both paths against the grid oracle (``shira_runtime.kernels.qformats``)
and each
other, bit for bit, in every dispatch branch; saturation counts; byte-exact restore; refusals before any write.

The C++ cases are skipped (not failed) when the extension cannot be built here.
"""

from __future__ import annotations

import pytest
import torch
from shira_runtime.kernels import KernelInputError, qformats, reference

FORMATS = ["int8", "fp8_e4m3", "fp8_e5m2"]
IDX_DTYPES = [torch.int32, torch.int64]
SHAPES = [(1, 7), (40, 96), (17, 333), (3, 2000)]  # row lengths that are no multiple of a cache line or chunk


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def quant_weight(shape, fmt: str, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and per-row scales of a random weight whose rows span 6 decades; half the rows get power-of-two
    scales (so that exact grid midpoints can be built as deltas); the largest, smallest and zero codes appear."""
    rows, cols = shape
    w = torch.randn(shape, generator=g) * 10 ** torch.empty(rows, 1).uniform_(-3, 3, generator=g)
    scale = qformats.channel_scales(w, fmt)
    pow2 = torch.arange(rows) % 2 == 0
    scale = torch.where(pow2, 2.0 ** torch.round(torch.log2(scale)), scale)
    codes, _ = qformats.encode(w.clamp(-scale[:, None] * 400, scale[:, None] * 400), scale, fmt)
    f = qformats.quant_format(fmt)
    flat = codes.view(-1)
    extremes = torch.tensor([f.max, -f.max, 0.0, -0.0, 1.0, -1.0, 2.0 ** (1 - f.bias - f.man_bits)]).to(codes.dtype)
    flat[: min(flat.numel(), extremes.numel())] = extremes[: flat.numel()]
    return codes, scale.float()


def rand_indices(numel: int, n: int, idx_dtype, g, sort: bool = True) -> torch.Tensor:
    idx = torch.randperm(numel, generator=g)[:n]
    return (idx.sort().values if sort else idx).to(idx_dtype)


def quant_deltas(codes: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, g) -> torch.Tensor:
    """Deltas of every size: tiny (no code change), grid-sized, exact midpoints between two grid points (ties, on
    power-of-two-scale rows), and huge (saturation either way)."""
    n = idx.numel()
    cols = codes.shape[1]
    rows = idx.long() // cols
    s = scale[rows]
    old = codes.view(-1)[idx.long()].float()
    d = torch.randn(n, generator=g) * s * 10 ** torch.empty(n).uniform_(-4, 2.5, generator=g)
    # a midpoint: half a step of the grid at (old + k steps), k small
    f = qformats.quant_format(codes.dtype)
    k = torch.randint(-3, 4, (n,), generator=g).float()
    target = qformats.round_to_grid(old + k * _step(old, f), f)
    tie = (target + _step(target, f) / 2 - old) * s
    huge = torch.where(torch.rand(n, generator=g) < 0.5, 1e30, -1e30)
    pick = torch.rand(n, generator=g)
    pow2 = rows % 2 == 0
    d = torch.where((pick < 0.3) & pow2 & torch.isfinite(tie), tie, d)
    d = torch.where(pick > 0.95, huge, d)
    return d.float()


def _step(v: torch.Tensor, f) -> torch.Tensor:
    if f.is_int:
        return torch.ones_like(v)
    _, exp = torch.frexp(v.abs())
    e = torch.clamp(exp - 1, min=1 - f.bias)
    return 2.0 ** (e - f.man_bits).float()


def state(fmt, idx_dtype, density, seed, sort=True, shapes=SHAPES):
    g = gen(seed)
    ws, scales = zip(*(quant_weight(s, fmt, g) for s in shapes))
    idx = [rand_indices(w.numel(), max(1, round(density * w.numel())), idx_dtype, g, sort) for w in ws]
    ds = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, idx)]
    saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, idx)]
    return list(ws), list(scales), idx, ds, saved


def clone(ts):
    return [t.clone() for t in ts]


def assert_bytes_equal(got, want, what):
    assert len(got) == len(want)
    for t, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(raw(x), raw(y)), f"{what} {t} differs"


def oracle(codes: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor):
    """What the grid says: ``encode(decode(code) + delta)`` at idx with the row's scale (qformats)."""
    rows = idx.long() // codes.shape[1]
    old = codes.view(-1)[idx.long()]
    return qformats.encode(qformats.decode(old, scale[rows]) + delta, scale[rows], qformats.quant_format(codes))


# ---- the reference against the grid -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_is_the_grid(fmt):
    ws, scales, idx, ds, saved = state(fmt, torch.int64, 0.3, seed=1)
    base = clone(ws)
    sat = torch.zeros(len(ws), dtype=torch.int64)
    reference.apply_(ws, idx, ds, saved, scales=scales, saturated=sat)
    for t, (w, b, s, i, d) in enumerate(zip(ws, base, scales, idx, ds)):
        want, n_sat = oracle(b, s, i, d)
        assert torch.equal(raw(w.view(-1)[i]), raw(want)), f"tensor {t}: codes off the grid's answer"
        assert int(sat[t]) == n_sat
        untouched = torch.ones(w.numel(), dtype=torch.bool)
        untouched[i] = False
        assert torch.equal(raw(w.view(-1)[untouched]), raw(b.view(-1)[untouched])), "a neighbour changed"
    assert int(sat.sum()) > 0  # the huge deltas did saturate
    assert_bytes_equal(saved, [b.view(-1)[i] for b, i in zip(base, idx)], "saved")
    reference.restore_(ws, idx, saved)
    assert_bytes_equal(ws, base, "restored")


def test_ties_go_to_even_by_hand():
    """int8, scale 1: 2.5 -> 2, 3.5 -> 4, -2.5 -> -2; 126.6 + 0.5 -> 127 (no clamp); 127 + 0.6 -> 127 saturated."""
    w = torch.tensor([[2, 3, -2, 126, 127, -127]], dtype=torch.int8)
    d = torch.tensor([0.5, 0.5, -0.5, 0.5, 0.6, -0.4])
    sat = torch.zeros(1, dtype=torch.int64)
    reference.apply_(
        [w], [torch.arange(6)], [d], [torch.empty(6, dtype=torch.int8)], scales=[torch.ones(1)], saturated=sat
    )
    assert w.tolist() == [[2, 4, -2, 126, 127, -127]]
    assert int(sat) == 1
    # e4m3 at scale 1: between 1.0 and 1.125 the midpoint 1.0625 goes to 1.0 (even mantissa); 1.1875 -> 1.25
    f = torch.tensor([[1.0, 1.125]]).to(torch.float8_e4m3fn)
    reference.apply_(
        [f],
        [torch.arange(2)],
        [torch.tensor([0.0625, 0.0625])],
        [torch.empty(2, dtype=f.dtype)],
        scales=[torch.ones(1)],
    )
    assert f.float().tolist() == [[1.0, 1.25]]


# ---- C++ against the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
@pytest.mark.parametrize("runs", [1, 0], ids=["runs", "no-runs"])
def test_switch_matches_reference(ext, knobs, fmt, idx_dtype, threaded, plan, runs):
    """apply A, switch A -> B (B shares elements with A), restore: bytes, saved codes and saturation counts equal
    the reference's in every plan; the restore gives the base back byte for byte."""
    knobs(threaded=threaded, chunk=37, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan], runs=runs)
    unsorted = plan == "phased"
    ws, scales, a_idx, a_d, a_saved = state(fmt, idx_dtype, 0.25, seed=2, sort=not unsorted)
    g = gen(3)
    b_idx = []
    for w, ai in zip(ws, a_idx):
        keep = ai[torch.randperm(ai.numel(), generator=g)[: (ai.numel() + 1) // 2]]
        both = torch.cat([keep, rand_indices(w.numel(), max(1, ai.numel() // 2), idx_dtype, g)]).unique()
        b_idx.append(both[torch.randperm(both.numel(), generator=g)] if unsorted else both)
    b_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, b_idx)]
    b_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, b_idx)]
    base = clone(ws)

    w_ref, a_ref, b_ref = clone(ws), clone(a_saved), clone(b_saved)
    sat_ref, sat = torch.zeros(len(ws), dtype=torch.int64), torch.zeros(len(ws), dtype=torch.int64)
    reference.apply_(w_ref, a_idx, a_d, a_ref, scales=scales, saturated=sat_ref)
    ext.apply_(ws, a_idx, a_d, a_saved, scales=scales, saturated=sat)
    assert_bytes_equal(ws + a_saved, w_ref + a_ref, "after apply: tensor")
    assert torch.equal(sat, sat_ref) and int(sat.sum()) > 0

    sat_ref.zero_(), sat.zero_()
    reference.switch_(w_ref, a_idx, a_ref, w_ref, b_idx, b_d, b_ref, in_scales=scales, saturated=sat_ref)
    ext.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved, in_scales=scales, saturated=sat)
    assert ext.tuning()["last_plan"] == {"threaded": threaded, "plan": plan}
    assert_bytes_equal(ws + b_saved, w_ref + b_ref, "after switch: tensor")
    assert torch.equal(sat, sat_ref)
    assert_bytes_equal(b_saved, [b.view(-1)[i.long()] for b, i in zip(base, b_idx)], "incoming saved (the base)")

    ext.restore_(ws, b_idx, b_saved)
    assert_bytes_equal(ws, base, "restored weight")


def line_indices(rows: int, cols: int, lines: int, idx_dtype, g) -> torch.Tensor:
    """A block mask's layout on 1-byte codes: whole 64-code lines aligned within rows, unaligned runs of 64, runs
    that cross a row end (not one scale: the kernel's vectorized loop must not take them), short runs, and single
    entries; sorted and unique."""
    numel = rows * cols
    starts = torch.randint(0, max(1, cols // 64), (lines,), generator=g) * 64 + torch.randint(0, rows, (lines,),
                                                                                            generator=g) * cols
    parts = [s + torch.arange(64) for s in starts.tolist()]  # aligned lines
    parts += [s + torch.arange(64) for s in torch.randint(0, numel - 64, (lines // 2,), generator=g).tolist()]
    parts += [r * cols - 20 + torch.arange(64) for r in range(1, rows, max(1, rows // 4))]  # across a row end
    parts += [s + torch.arange(int(n)) for s, n in zip(torch.randint(0, numel - 70, (lines,), generator=g).tolist(),
                                                       torch.randint(1, 70, (lines,), generator=g).tolist())]
    parts.append(torch.randint(0, numel, (lines * 4,), generator=g))
    idx = torch.cat(parts).unique()
    return idx[(idx >= 0) & (idx < numel)].to(idx_dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("runs", [1, 0], ids=["runs", "no-runs"])
def test_lines_of_codes_match_reference(ext, knobs, fmt, idx_dtype, threaded, runs):
    """Block-mask layouts on 1-byte bases (int8's whole lines go through a vectorized loop): apply, switch and
    restore equal the reference byte for byte, saturation counts too, whatever the chunking cuts (chunk 37 splits
    lines), with ties and saturating deltas in every line."""
    knobs(threaded=threaded, chunk=37, runs=runs)
    g = gen(11)
    shapes = [(8, 256), (6, 200), (3, 1000)]  # rows of whole lines; rows that end mid-line
    ws, scales = map(list, zip(*(quant_weight(s, fmt, g) for s in shapes)))
    a_idx = [line_indices(r, c, 12, idx_dtype, g) for r, c in shapes]
    b_idx = [line_indices(r, c, 12, idx_dtype, g) for r, c in shapes]
    a_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, a_idx)]
    b_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, b_idx)]
    a_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, a_idx)]
    b_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, b_idx)]
    base = clone(ws)
    w_ref, a_ref, b_ref = clone(ws), clone(a_saved), clone(b_saved)
    sat_ref, sat = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    reference.apply_(w_ref, a_idx, a_d, a_ref, scales=scales, saturated=sat_ref)
    ext.apply_(ws, a_idx, a_d, a_saved, validate=False, scales=scales, saturated=sat)
    assert_bytes_equal(ws + a_saved, w_ref + a_ref, "after apply: tensor")
    assert torch.equal(sat, sat_ref) and int(sat.sum()) > 0
    sat_ref.zero_(), sat.zero_()
    reference.switch_(w_ref, a_idx, a_ref, w_ref, b_idx, b_d, b_ref, in_scales=scales, saturated=sat_ref)
    ext.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved, validate=False, in_scales=scales, saturated=sat)
    assert ext.tuning()["last_plan"] == {"threaded": threaded, "plan": "fused"}
    assert_bytes_equal(ws + b_saved, w_ref + b_ref, "after switch: tensor")
    assert torch.equal(sat, sat_ref)
    ext.restore_(ws, b_idx, b_saved, validate=False)
    assert_bytes_equal(ws, base, "restored weight")


@pytest.mark.parametrize("fmt", FORMATS)
def test_large_default_knobs_and_mixed_lists(ext, knobs, fmt):
    """Threaded with the default knobs; one switch over fp32, bf16 and 1-byte weights together."""
    knobs()
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    g = gen(4)
    qs, scales, q_idx, q_d, q_saved = state(fmt, torch.int32, 0.2, seed=5, shapes=[(300, 500), (500, 300)])
    fs = [torch.randn(200, 300, generator=g), torch.randn(300, 200, generator=g).bfloat16()]
    f_idx = [rand_indices(w.numel(), 20000, torch.int32, g) for w in fs]
    f_d = [torch.randn(i.numel(), generator=g) for i in f_idx]
    f_saved = [torch.empty(i.numel(), dtype=w.dtype) for w, i in zip(fs, f_idx)]
    ws, idx, ds = qs + fs, q_idx + f_idx, q_d + f_d
    sc = scales + [torch.empty(0), torch.empty(0)]
    w_ref, s_ref = clone(ws), clone(q_saved + f_saved)
    sat_ref, sat = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    reference.apply_(w_ref, idx, ds, s_ref, scales=sc, saturated=sat_ref)
    saved = q_saved + f_saved
    ext.apply_(ws, idx, ds, saved, validate=False, scales=sc, saturated=sat)
    assert ext.tuning()["last_plan"] == {"threaded": True, "plan": "fused"}
    assert_bytes_equal(ws + saved, w_ref + s_ref, "tensor")
    assert torch.equal(sat, sat_ref) and int(sat[2:].sum()) == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
def test_empty_and_single(ext, knobs, fmt, threaded):
    knobs(threaded=threaded)
    ws, scales, _, _, _ = state(fmt, torch.int32, 0.1, seed=6, shapes=[(1, 1), (2, 5), (0, 4)])
    idx = [torch.tensor([0], dtype=torch.int32), torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)]
    ds = [torch.tensor([1e6]), torch.empty(0), torch.empty(0)]
    scales[2] = torch.ones(1)  # a [0, 4] weight: any row count divides it
    saved = [torch.empty(i.numel(), dtype=ws[0].dtype) for i in idx]
    w_ref, s_ref = clone(ws), clone(saved)
    sat_ref, sat = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    reference.apply_(w_ref, idx, ds, s_ref, scales=scales, saturated=sat_ref)
    ext.apply_(ws, idx, ds, saved, scales=scales, saturated=sat)
    assert_bytes_equal(ws + saved, w_ref + s_ref, "tensor")
    assert sat.tolist() == sat_ref.tolist() == [1, 0, 0]
    assert float(ws[0].float().view(-1)[0]) == qformats.quant_format(fmt).max


def test_saturated_is_optional_and_accumulates(ext):
    for impl in (reference, ext):
        w = torch.zeros(2, 4, dtype=torch.int8)
        idx, d, s = torch.arange(8), torch.full((8,), 1e9), torch.ones(2)
        impl.apply_([w], [idx], [d], [torch.empty(8, dtype=torch.int8)], scales=[s])  # no counter: still clamps
        assert w.eq(127).all()
        sat = torch.tensor([5], dtype=torch.int64)
        impl.apply_([w], [idx], [-d], [torch.empty(8, dtype=torch.int8)], scales=[s], saturated=sat)
        assert w.eq(-127).all() and int(sat) == 13


# ---- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl_name", ["reference", "cpp"])
@pytest.mark.parametrize(
    "kind, message",
    [
        ("no-scales", r"tensor 1: a (torch\.)?(int8|Char) weight needs its per-row scales"),
        ("empty-scale", r"tensor 1: a (torch\.)?(int8|Char) weight needs its per-row scales"),
        ("scale-dtype", r"tensor 1: scales must be fp32 1-D contiguous"),
        ("scale-rows", r"tensor 1: 7 scales do not divide a weight of 40 elements into rows"),
        ("scale-on-float", r"tensor 0: scales given for a (torch\.)?(float32|Float) weight"),
        ("scales-length", r"1 scale tensors for 2 weights"),
        ("saturated-shape", r"saturated must be int64 \[2\]"),
    ],
)
def test_malformed_quant_inputs_refused(request, impl_name, kind, message):
    impl = reference if impl_name == "reference" else request.getfixturevalue("ext")
    ws = [torch.randn(30), torch.zeros(4, 10, dtype=torch.int8)]
    idx = [torch.tensor([1, 2]), torch.tensor([3, 39])]
    ds = [torch.ones(2), torch.ones(2)]
    saved = [torch.empty(2), torch.empty(2, dtype=torch.int8)]
    scales, sat = [torch.empty(0), torch.ones(4)], torch.zeros(2, dtype=torch.int64)
    if kind == "no-scales":
        scales = None
    elif kind == "empty-scale":
        scales[1] = torch.empty(0)
    elif kind == "scale-dtype":
        scales[1] = torch.ones(4, dtype=torch.float64)
    elif kind == "scale-rows":
        scales[1] = torch.ones(7)
    elif kind == "scale-on-float":
        scales[0] = torch.ones(3)
    elif kind == "scales-length":
        scales = scales[:1]
    elif kind == "saturated-shape":
        sat = torch.zeros(3, dtype=torch.int64)
    before = clone(ws)
    with pytest.raises(KernelInputError, match=rf"apply_: .*{message}"):
        impl.apply_(ws, idx, ds, saved, scales=scales, saturated=sat)
    assert_bytes_equal(ws, before, "weight")
    with pytest.raises(KernelInputError, match=rf"switch_: .*{message}"):
        impl.switch_([], [], [], ws, idx, ds, saved, in_scales=scales, saturated=sat)
    assert_bytes_equal(ws, before, "weight")


@pytest.mark.parametrize("impl_name", ["reference", "cpp"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("verb", ["apply_", "restore_", "switch_"])
@pytest.mark.parametrize("bad", [-1, 1000, 2**40], ids=["neg", "numel", "huge"])
def test_out_of_range_refused_before_any_write(request, impl_name, fmt, verb, bad):
    impl = reference if impl_name == "reference" else request.getfixturevalue("ext")
    if impl_name == "cpp":
        request.getfixturevalue("knobs")(threaded=True, chunk=8)
    ws, scales, idx, ds, saved = state(fmt, torch.int64, 0.2, seed=7, shapes=[(5, 10), (10, 100), (3, 10)])
    idx[1][idx[1].numel() // 2] = bad
    before_w, before_s = clone(ws), clone(saved)
    calls = {
        "apply_": lambda: impl.apply_(ws, idx, ds, saved, scales=scales),
        "restore_": lambda: impl.restore_(ws, idx, saved),
        "switch_": lambda: impl.switch_(ws, idx, saved, ws, idx, ds, saved, in_scales=scales),
    }
    with pytest.raises(KernelInputError, match=rf"{verb}: (outgoing )?tensor 1: index {bad} out of range"):
        calls[verb]()
    assert_bytes_equal(ws, before_w, "weight")
    assert_bytes_equal(saved, before_s, "saved")


def test_fake_impl_traces_with_scales(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w, idx, d, s = (
            torch.empty(2, 5, dtype=torch.int8),
            torch.tensor([1, 2]),
            torch.empty(2),
            torch.empty(2, dtype=torch.int8),
        )
        sat = torch.zeros(1, dtype=torch.int64)
        torch.ops.shira.apply_([w], [idx], [d], [s], True, [torch.ones(2)], sat)
        torch.ops.shira.switch_([w], [idx], [s], [w], [idx], [d], [s], True, [torch.ones(2)], sat)
    args = (
        [torch.zeros(2, 5, dtype=torch.int8)],
        [torch.tensor([1, 2])],
        [torch.ones(2)],
        [torch.empty(2, dtype=torch.int8)],
        True,
        [torch.ones(2)],
        torch.zeros(1, dtype=torch.int64),
    )
    torch.library.opcheck(torch.ops.shira.apply_.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
def test_baked_codes_are_a_byte_swap(ext, knobs, fmt, threaded, plan):
    """Deltas given as codes of the weight's dtype (an adapter baked for this base) are written as they are, the
    old codes saved; the same in both paths, mixed with grid-math tensors in one switch."""
    knobs(threaded=threaded, chunk=29, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan])
    ws, scales, a_idx, a_d, a_saved = state(fmt, torch.int64, 0.2, seed=8, sort=plan != "phased")
    g = gen(9)
    new = [torch.randint(0, 256, (i.numel(),), generator=g, dtype=torch.uint8).view(w.dtype) for w, i in zip(ws, a_idx)]
    new = [torch.where(torch.isnan(c.float()), torch.zeros_like(c), c) if c.dtype != torch.int8 else c for c in new]
    deltas = [new[0], a_d[1], new[2], a_d[3]]  # baked codes and fp32 deltas side by side
    base = clone(ws)
    w_ref, s_ref = clone(ws), clone(a_saved)
    sat_ref, sat = torch.zeros(len(ws), dtype=torch.int64), torch.zeros(len(ws), dtype=torch.int64)
    reference.apply_(w_ref, a_idx, deltas, s_ref, scales=scales, saturated=sat_ref)
    ext.apply_(ws, a_idx, deltas, a_saved, scales=scales, saturated=sat)
    assert_bytes_equal(ws + a_saved, w_ref + s_ref, "tensor")
    assert torch.equal(sat, sat_ref) and int(sat[0]) == int(sat[2]) == 0
    for t in (0, 2):
        assert torch.equal(raw(ws[t].view(-1)[a_idx[t]]), raw(new[t]))
    ext.restore_(ws, a_idx, a_saved)
    assert_bytes_equal(ws, base, "restored")


# ---- a restore and an apply of one weight in one merged pass -------------------------------------------


def merge_lists(ws, idx_dtype, g) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A's and B's sorted lists, one layout per weight: one entry against every element; B half of A plus as many
    others (shared elements); B wholly after A; B wholly before A with many more entries."""
    a, b = [], []
    for t, w in enumerate(ws):
        n, h = w.numel(), w.numel() // 2
        if t == 0:
            ai, bi = torch.tensor([h]), torch.arange(n)
        elif t == 1:
            ai = rand_indices(n, n // 4, torch.int64, g)
            keep = ai[torch.randperm(ai.numel(), generator=g)[: ai.numel() // 2]]
            bi = torch.cat([keep, rand_indices(n, n // 8, torch.int64, g)]).unique()
        elif t == 2:
            ai, bi = rand_indices(h, n // 8, torch.int64, g), h + rand_indices(n - h, n // 8, torch.int64, g)
        else:
            ai, bi = h + rand_indices(n - h, 5, torch.int64, g), rand_indices(h, n // 3, torch.int64, g)
        a.append(ai.to(idx_dtype))
        b.append(bi.to(idx_dtype))
    return a, b


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("chunk", [7, 101, 1 << 14])  # a task's restore shorter than one step (32), or not
@pytest.mark.parametrize("side", ["grid", "baked", "mirrored"])
def test_merged_pass_matches_reference(ext, knobs, fmt, idx_dtype, threaded, chunk, side):
    """The runtime's switch on 1-byte weights (sorted lists, each described with no run: entry by entry) restores
    and applies each chunk in one merged pass (``last_merged``); codes, saved codes, saturation counts and mirrors
    equal the reference's and the phased plan's two passes bit for bit, whatever the lists' overlap and lengths
    and wherever the chunks cut them; the restore then gives the base back."""
    g = gen(40)
    ws, scales, _, _, _ = state(fmt, idx_dtype, 0.25, seed=41)
    a_idx, b_idx = merge_lists(ws, idx_dtype, g)
    a_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, a_idx)]
    if side == "baked":  # B's new codes as they are (a byte swap)
        b_d = [torch.randint(0, 256, (i.numel(),), generator=g, dtype=torch.uint8) for i in b_idx]
        b_d = [c.view(w.dtype) for c, w in zip(b_d, ws)]
        b_d = [torch.where(torch.isnan(c.float()), torch.zeros_like(c), c) if c.dtype != torch.int8 else c for c in b_d]
    else:
        b_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, b_idx)]
    base = clone(ws)
    sat = torch.zeros(len(ws), dtype=torch.int64)
    a_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, a_idx)]
    reference.apply_(ws, a_idx, a_d, a_saved, scales=scales, saturated=sat)  # state A, for every path
    none = [torch.zeros((0, 3), dtype=torch.int64) for _ in ws]  # described: no run of a line in any list
    results = {}
    for name in ("reference", "merged", "phased"):
        w, sa = clone(ws), clone(a_saved)
        sb = [torch.zeros(i.numel(), dtype=x.dtype) for x, i in zip(w, b_idx)]
        ms = mirrors_of(w, without=-1) if side == "mirrored" else None
        sat = torch.zeros(len(ws), dtype=torch.int64)
        kw = {"in_scales": scales, "saturated": sat, **({"out_mirrors": ms, "in_mirrors": ms} if ms else {})}
        if name == "reference":
            reference.switch_(w, a_idx, sa, w, b_idx, b_d, sb, **kw)
        else:
            knobs(threaded=threaded, chunk=chunk, force_plan=0 if name == "merged" else 1, merge_above=0)
            ext.switch_(w, a_idx, sa, w, b_idx, b_d, sb, out_runs=none, in_runs=none, **kw)
            assert ext.tuning()["last_merged"] is (name == "merged")
        if ms:
            assert_mirrors(w, ms, f"{name} after switch")
        results[name] = (w, sb, sat)
        ext.restore_(w, b_idx, sb, **({"mirrors": ms} if ms else {}))
        assert_bytes_equal(w, base, f"{name}: restored")
    want_w, want_sb, want_sat = results["reference"]
    assert side == "baked" or int(want_sat.sum()) > 0
    for name in ("merged", "phased"):
        got_w, got_sb, got_sat = results[name]
        assert_bytes_equal(got_w + got_sb, want_w + want_sb, f"{name} against the reference: tensor")
        assert torch.equal(got_sat, want_sat), name


@pytest.mark.parametrize("case", ["fp32", "small"])
def test_merged_only_on_large_1_byte_switches(ext, knobs, case):
    """fp32 weights share few lines between two adapters, and a call whose weights fit in half the last-level cache
    (``merge_above``, default from the cache's size) keeps its lines there between the passes: neither is merged
    (docs/kernels.md), the same int8 call is once ``merge_above`` is at its size."""
    assert ext.tuning()["merge_above"] > 0
    g = gen(42)
    w = [torch.randn(4000, generator=g)] if case == "fp32" else [torch.randint(-127, 128, (4000,), dtype=torch.int8)]
    a_idx, b_idx = [rand_indices(4000, 400, torch.int32, g)], [rand_indices(4000, 400, torch.int32, g)]
    dt = w[0].dtype
    d = [torch.randint(-127, 128, (400,), dtype=torch.int8)] if dt == torch.int8 else [torch.randn(400, generator=g)]
    a_saved, b_saved = [torch.zeros(400, dtype=dt)], [torch.zeros(400, dtype=dt)]
    ext.apply_(w, a_idx, d, a_saved)
    none = [torch.zeros((0, 3), dtype=torch.int64)]
    for limit, merged in ((4000 * w[0].element_size() + 1, False), (4000 * w[0].element_size(), case != "fp32")):
        knobs(merge_above=limit)
        ext.switch_(w, a_idx, a_saved, w, b_idx, d, b_saved, out_runs=none, in_runs=none)
        assert ext.tuning()["last_plan"]["plan"] == "fused" and ext.tuning()["last_merged"] is merged
        ext.switch_(w, b_idx, b_saved, w, a_idx, d, a_saved, out_runs=none, in_runs=none)  # back to A


# ---- mirrors: a bf16 copy of the code values written in the same visit ----------------------------------


def u8t(w: torch.Tensor) -> torch.Tensor:
    """The transposed zero-point-128 uint8 copy of 2-D int8 codes (an int8 bundle's MatMulInteger B)."""
    return (w.view(torch.uint8) ^ 0x80).t().contiguous()


def mirrors_of(ws, without: int):
    """A mirror per weight, in step with its codes (int8: the transposed uint8 kind on every other weight, bf16
    otherwise), but an empty one (no mirror) at ``without``."""
    return [
        torch.empty(0, dtype=torch.bfloat16)
        if t == without
        else u8t(w)
        if w.dtype == torch.int8 and t % 2 == 0
        else w.to(torch.bfloat16)
        for t, w in enumerate(ws)
    ]


def assert_mirrors(ws, ms, what):
    for t, (w, m) in enumerate(zip(ws, ms)):
        if m.dtype == torch.uint8:
            assert torch.equal(m, u8t(w)), f"{what}: uint8 mirror {t}"
        elif m.numel():
            assert torch.equal(m.view(torch.int16), w.to(torch.bfloat16).view(torch.int16)), f"{what}: mirror {t}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
def test_mirrors_follow_the_codes_in_both_paths(ext, knobs, fmt, idx_dtype, threaded, plan):
    """apply A (grid writes and baked codes side by side, saturation included), switch A -> B, restore: the codes,
    saved codes and saturation counts are the reference's, and every mirror equals bf16(codes) bit for bit in
    both paths; a weight without a mirror (empty) is switched as before."""
    knobs(threaded=threaded, chunk=31, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan])
    unsorted = plan == "phased"
    ws, scales, a_idx, a_d, a_saved = state(fmt, idx_dtype, 0.25, seed=11, sort=not unsorted)
    g = gen(12)
    baked = torch.randint(0, 256, (a_idx[2].numel(),), generator=g, dtype=torch.uint8).view(ws[2].dtype)
    if baked.dtype != torch.int8:
        baked = torch.where(torch.isnan(baked.float()), torch.zeros_like(baked), baked)
    a_d[2] = baked
    b_idx = [rand_indices(w.numel(), max(1, w.numel() // 5), idx_dtype, g, sort=not unsorted) for w in ws]
    b_d = [quant_deltas(w, s, i, g) for w, s, i in zip(ws, scales, b_idx)]
    b_saved = [torch.zeros(i.numel(), dtype=w.dtype) for w, i in zip(ws, b_idx)]
    base = clone(ws)
    runs = {}
    for name, impl in (("reference", reference), ("cpp", ext)):
        w, sa, sb, ms = clone(ws), clone(a_saved), clone(b_saved), mirrors_of(ws, without=1)
        sat = torch.zeros(len(ws), dtype=torch.int64)
        impl.apply_(w, a_idx, a_d, sa, scales=scales, saturated=sat, mirrors=ms)
        assert_mirrors(w, ms, f"{name} after apply")
        impl.switch_(w, a_idx, sa, w, b_idx, b_d, sb, in_scales=scales, saturated=sat, out_mirrors=ms, in_mirrors=ms)
        assert_mirrors(w, ms, f"{name} after switch")
        after_switch = clone(w)
        impl.restore_(w, b_idx, sb, mirrors=ms)
        assert_mirrors(w, ms, f"{name} after restore")
        assert_bytes_equal(w, base, f"{name} restored")
        runs[name] = (after_switch, sa, sb, sat)
    assert int(runs["cpp"][3].sum()) > 0
    assert ext.tuning()["last_plan"] == {"threaded": threaded, "plan": plan}
    for x, y in zip(runs["cpp"][:3], runs["reference"][:3]):
        assert_bytes_equal(x, y, "cpp against reference")
    assert torch.equal(runs["cpp"][3], runs["reference"][3])


@pytest.mark.parametrize("impl_name", ["reference", "cpp"])
@pytest.mark.parametrize(
    "kind, message",
    [
        ("on-float", r"tensor 0: a mirror given for a (torch\.)?(float32|Float) weight"),
        ("dtype", r"tensor 1: the mirror must be a contiguous bf16 tensor of the weight's 40 elements"),
        ("numel", r"tensor 1: the mirror must be a contiguous bf16 tensor of the weight's 40 elements"),
        ("count", r"1 mirror tensors for 2 weights"),
        ("overlap", r"tensor 1: the mirror overlaps its weight"),
        ("u8-shape", r"tensor 1: a uint8 mirror is the transposed copy of 2-D int8 codes: expected \[10, 4\]"),
        ("u8-on-fp8", r"tensor 1: a uint8 mirror is the transposed copy of 2-D int8 codes"),
    ],
)
def test_malformed_mirrors_refused_before_any_write(request, impl_name, kind, message):
    impl = reference if impl_name == "reference" else request.getfixturevalue("ext")
    buf = torch.zeros(200, dtype=torch.uint8)
    ws = [torch.randn(30), buf[:40].view(torch.int8).view(4, 10)]
    idx = [torch.tensor([1, 2]), torch.tensor([3, 39])]
    ds, scales = [torch.ones(2), torch.ones(2)], [torch.empty(0), torch.ones(4)]
    saved = [torch.empty(2), torch.empty(2, dtype=torch.int8)]
    ms = [torch.empty(0, dtype=torch.bfloat16), torch.zeros(40, dtype=torch.bfloat16)]
    if kind == "on-float":
        ms[0] = torch.zeros(30, dtype=torch.bfloat16)
    elif kind == "dtype":
        ms[1] = torch.zeros(40, dtype=torch.float16)
    elif kind == "numel":
        ms[1] = torch.zeros(41, dtype=torch.bfloat16)
    elif kind == "count":
        ms = ms[:1]
    elif kind == "overlap":
        ms[1] = buf[20:100].view(torch.bfloat16)
    elif kind == "u8-shape":
        ms[1] = torch.zeros(4, 10, dtype=torch.uint8)  # not transposed
    elif kind == "u8-on-fp8":
        ws[1] = ws[1].view(torch.float8_e4m3fn)
        saved[1] = saved[1].view(torch.float8_e4m3fn)
        ms[1] = torch.zeros(10, 4, dtype=torch.uint8)
    before, before_m = clone(ws), clone(ms)
    calls = {
        "apply_": lambda: impl.apply_(ws, idx, ds, saved, scales=scales, mirrors=ms),
        "restore_": lambda: impl.restore_(ws, idx, saved, mirrors=ms),
        "switch_": lambda: impl.switch_([], [], [], ws, idx, ds, saved, in_scales=scales, in_mirrors=ms),
    }
    for verb, call in calls.items():
        with pytest.raises(KernelInputError, match=rf"{verb}: .*{message}"):
            call()
        assert_bytes_equal(ws + ms, before + before_m, "tensor")


def test_fake_impl_and_schema_with_mirrors(ext):
    def args():  # int8: opcheck's own comparisons have no fp8 kernels
        w, m = torch.zeros(2, 5, dtype=torch.int8), torch.zeros(10, dtype=torch.bfloat16)
        idx, s = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int8)
        return ([w], [idx], [s], [w], [idx], [torch.ones(2)], [s], True, [torch.ones(2)], None, [m], [m])

    torch.library.opcheck(torch.ops.shira.switch_.default, args(), test_utils=("test_schema", "test_faketensor"))
    a = args()
    torch.ops.shira.switch_(*a)
    (w,), (m,) = a[0], a[-1]
    assert torch.equal(m, w.view(-1).to(torch.bfloat16)) and m[1] == 1  # the op wrote the codes and the mirror
