"""benchmarks.line_visits: the plain loop visits exactly the lines a switch touches (one byte of each, added), and
a timed floor leaves the weights bit for bit as they were, on torch tensors and numpy arrays alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.common import touched_lines
from benchmarks.line_visits import LineVisits


def test_a_pass_adds_to_one_byte_of_each_touched_line_and_nothing_else():
    for shift in (0, 3):  # a weight on a line boundary, and one 12 bytes into a line
        store = torch.zeros(16 * 17)
        w = store[shift:shift + 256]  # 16 lines' worth of fp32
        off = w.data_ptr() % 64
        idx = [torch.tensor([0, 1, 17]), torch.tensor([2, 40, 255])]
        lines = sorted({(i * 4 + off) // 64 for i in (0, 1, 17, 2, 40, 255)})
        lv = LineVisits([(w, idx)])
        assert lv.lines == len(lines) == touched_lines(torch.cat(idx), 4, off)
        want = [max(k * 64 - off, 0) for k in lines]  # each line's first byte inside the weight
        for threads in (1, 2, 3):
            lv.visit(threads, 32, 1)
            raw = store.view(torch.uint8)
            assert torch.nonzero(raw).reshape(-1).tolist() == [shift * 4 + b for b in want]
            assert raw[[shift * 4 + b for b in want]].tolist() == [1] * len(want)
            lv.visit(threads, 0, 255)
            assert not raw.any()


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_the_floor_leaves_the_weights_as_they_were(kind):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(300, 128, generator=g), torch.randn(64, 100, generator=g).to(torch.bfloat16)]
    if kind == "numpy":
        ws = [ws[0].numpy(), np.random.default_rng(0).integers(0, 256, 7000, dtype=np.uint8)]
    before = [bytes(np.asarray(w.view(torch.uint8) if isinstance(w, torch.Tensor) else w).tobytes()) for w in ws]
    parts = [(w, [torch.randint(0, w.size if isinstance(w, np.ndarray) else w.numel(), (500,), generator=g)])
             for w in ws]  # fmt: skip
    lv = LineVisits(parts)
    assert lv.lines > 0
    for repeats in (2, 3):
        assert lv.floor_ms(repeats) > 0
    after = [bytes(np.asarray(w.view(torch.uint8) if isinstance(w, torch.Tensor) else w).tobytes()) for w in ws]
    assert after == before


def test_nothing_to_visit_and_bad_indices():
    w = torch.zeros(100)
    assert LineVisits([(w, [torch.tensor([], dtype=torch.long)])]).floor_ms() == 0.0
    with pytest.raises(IndexError, match="out of range"):
        LineVisits([(w, [torch.tensor([100])])])
    with pytest.raises(ValueError, match="C-contiguous"):
        LineVisits([(torch.zeros(10, 10).t(), [torch.tensor([1])])])


def test_a_weight_listed_twice_is_one_segment():
    w = torch.zeros(256)
    lv = LineVisits([(w, [torch.tensor([0, 20])]), (w, [torch.tensor([40, 200])])])
    assert len(lv.segments) == 1 and lv.lines == touched_lines(torch.tensor([0, 20, 40, 200]), 4, w.data_ptr() % 64)
    assert lv.floor_ms(3) > 0 and not w.view(torch.uint8).any()
