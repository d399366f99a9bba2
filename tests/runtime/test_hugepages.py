"""``Runtime.huge_pages``: the weights moved onto transparent huge pages where the OS allows. The values do not
change, switches after it write what a runtime without it writes (bit for bit), the bytes it reports are on huge
pages (``/proc/self/smaps``), a bundle's mapped file is left as it is, and where the OS cannot it reports 0."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch
from shira_runtime import Runtime, hugepages
from shira_runtime.exporters import export_onnx
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_shira
from torch import nn

from tests.conftest import assert_bit_identical, snapshot


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.ModuleDict({n: nn.Linear(1024, 2048, bias=False) for n in ("q_proj", "v_proj")})  # 8 MB each


def _huge_kb_over(regions: list[tuple[int, int]]) -> int:
    """AnonHugePages (bytes) of the mappings that overlap the regions (each counted once)."""
    total, vma = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                vma = (lo, hi) if any(a < hi and a + n > lo for a, n in regions) else None
            elif head == "AnonHugePages:" and vma is not None:
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages: Linux")
def test_weights_keep_their_values_and_the_bytes_reported_are_on_huge_pages():
    m = _model()
    ads = {n: random_shira(m, ("q_proj", "v_proj"), 0.02, seed=k + 1) for k, n in enumerate("ab")}
    before = snapshot(m)
    rt = Runtime.load(m)
    for n, a in ads.items():
        rt.add_adapter(n, a)
    regions = [(w.data_ptr(), w.numel() * w.element_size()) for w in rt.backend.tensors.values()]
    moved = rt.huge_pages()
    assert 0 <= moved <= sum(n for _, n in regions) and moved % hugepages.huge_page_size() == 0
    assert_bit_identical(m, before)
    if moved == 0:
        pytest.skip("this kernel moved nothing onto huge pages (THP off, or no MADV_COLLAPSE): nothing to check")
    assert _huge_kb_over(regions) >= moved  # what it reports is true of the mappings
    print(f"moved {moved / 2**20:.0f} MB onto huge pages")
    ref = _model()
    rt2 = Runtime.load(ref)
    for n, a in ads.items():
        rt2.add_adapter(n, a)
    for state in ("a", "b", ["a", "b"], None):
        rt.switch(state)
        rt2.switch(state)
        assert_bit_identical(m, snapshot(ref))


def test_where_the_os_cannot_it_reports_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages, "_madvise", lambda: lambda *a: calls.append(a) or -1)  # every call refused
    m = _model()
    before = snapshot(m)
    assert Runtime.load(m).huge_pages() == 0 and calls  # asked, refused: 0 bytes, values unchanged
    assert_bit_identical(m, before)
    calls.clear()
    assert hugepages.collapse([(4096, 100)]) == 0 and not calls  # a region smaller than a huge page: not asked
    monkeypatch.setattr(hugepages, "_madvise", lambda: None)  # no madvise at all (another OS)
    assert Runtime.load(_model()).huge_pages() == 0


def test_a_bundle_file_is_left_as_it_is(tmp_path):
    m = build("tiny", torch.float32, seed=0)
    path = export_onnx(m, (torch.zeros(1, 8, dtype=torch.long),), tmp_path / "b", verify=False, progress=False)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.is_file()}
    ad = random_shira(m, TARGETS, 0.05, seed=1)
    rt = Runtime.load(path)
    rt.add_adapter("a", ad)
    ids = np.arange(1, 9, dtype=np.int64).reshape(1, 8)
    base = rt(ids)
    moved = rt.huge_pages()  # a map of the file: the kernel usually declines; values never change either way
    assert isinstance(moved, int) and moved <= sum(a.nbytes for a in rt.backend.tensors.values())
    rt.switch("a")
    rt.switch(None)
    np.testing.assert_array_equal(rt(ids), base)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.is_file()} == files
