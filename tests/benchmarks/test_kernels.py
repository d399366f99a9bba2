"""benchmarks.kernels: its switch cycle starts and ends in state A, and a small case runs end to end."""

from __future__ import annotations

import pytest
import torch
from shira_runtime.kernels import reference

from benchmarks import kernels as bench


class Recording:
    """The reference kernels, recording each switch as (from, to, validate)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names, self.calls = names, []

    def apply_(self, *args, **kwargs):
        return reference.apply_(*args, **kwargs)

    def switch_(self, w, out_idx, out_saved, w2, in_idx, in_deltas, in_saved, validate):
        self.calls.append((self.names[id(out_idx)], self.names[id(in_idx)], validate))
        return reference.switch_(w, out_idx, out_saved, w2, in_idx, in_deltas, in_saved, validate=validate)


def setup(shapes=((32, 16), (8, 32))):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    a, b = bench.make_adapter(list(shapes), 0.2, gen), bench.make_adapter(list(shapes), 0.2, gen)
    rec = Recording({id(a.indices): "A", id(b.indices): "B"})
    return weights, a, b, rec


@pytest.mark.parametrize("repeats", [2, 3])
def test_time_switch_cycles_from_a_and_ends_in_a(repeats, monkeypatch):
    gbps = iter(range(1, 100))
    monkeypatch.setattr(bench, "copy_bandwidth_gbps", lambda *a, **k: float(next(gbps)))
    weights, a, b, rec = setup()
    want = bench.Path(reference, [w.clone() for w in weights], a, b).w  # state A
    p = bench.Path(rec, weights, a, b)
    bandwidth: list[float] = []
    t = p.time_switch(repeats, validate=True, bandwidth=bandwidth)
    timed = [("B", "A", True), ("A", "B", True)] * 2
    back = [("B", "A", False)] if repeats % 2 == 0 else []  # an untimed switch back to A
    assert rec.calls == [("A", "B", True)] + timed[:repeats] + back
    assert t.runs == repeats and bandwidth == [float(i) for i in range(1, repeats + 1)]  # one before each timed
    assert p.state is a
    for x, y in zip(p.w, want):
        assert torch.equal(x, y)


def test_time_switch_from_b_goes_to_a_first():
    weights, a, b, rec = setup()
    p = bench.Path(rec, weights, a, b)
    p.to(b)
    p.time_switch(1)
    assert rec.calls == [("A", "B", False), ("B", "A", False), ("A", "B", False), ("B", "A", False)]


def test_run_case_on_small_shapes():
    try:
        from shira_runtime.kernels import extension

        extension.load()
    except Exception as exc:  # any build failure: this benchmark needs the fast path
        pytest.skip(f"C++ extension unavailable: {exc}")
    cfg = bench.Config(layers=2, shapes=((64, 48), (16, 64)), densities=(0.05,), ref_repeats=2, fast_repeats=3)
    for dtype in cfg.dtypes:
        r = bench.run_case(cfg, dtype, 0.05)  # asserts the fast path bit-identical to the reference
        assert (r.dtype, r.ref.runs, r.fast.runs, r.fast_validated.runs) == (dtype, 2, 3, 3)
        assert r.floor_ms > 0 and r.copy_gbps > 0 and r.elements > 0
