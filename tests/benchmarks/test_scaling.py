"""benchmarks.scaling: the bare-kernel cycle leaves the weights as it found them, the floor counts the lines A and B
touch, and the quick run, the threshold run and the soak run end to end (no time is asserted)."""

from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest
import torch
from shira_runtime import Runtime, SparseAdapter
from torch import nn

from benchmarks import scaling
from tests.conftest import assert_bit_identical, bits, snapshot


def test_the_bare_kernel_cycle_leaves_the_weights_as_they_were():
    model = scaling.model_for(2000, seed=0)
    rt = Runtime.load(model)
    for k, name in enumerate("ab"):
        rt.add_adapter(name, scaling.random_shira(model, scaling.NAMES, scaling.DENSITY, seed=k + 1))
    before = snapshot(model)
    for repeats in (3, 4):
        assert scaling.bare_kernel(rt, "a", "b", repeats) > 0
        assert_bit_identical(model, before)


def test_the_floor_counts_the_distinct_lines_a_and_b_touch():
    model = nn.ModuleDict({"q_proj": nn.Linear(64, 4, bias=False)})  # 256 fp32: 16 lines of 16 elements
    rt = Runtime.load(model)
    rt.add_adapter("a", SparseAdapter({"q_proj.weight": torch.tensor([0, 1, 17])}, {"q_proj.weight": torch.ones(3)}))
    rt.add_adapter("b", SparseAdapter({"q_proj.weight": torch.tensor([2, 40])}, {"q_proj.weight": torch.ones(2)}))
    floor, streams, entries = scaling.floors(rt, "a", "b", "fp32", 1.0)  # lines 0, 1 (A) and 0, 2 (B): 3
    assert entries == 5
    assert floor == pytest.approx(3 * 64 * 2 / 1e9 * 1e3)
    assert streams == pytest.approx(floor + 5 * scaling.STREAM_BYTES["fp32"] / 1e9 * 1e3)


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "s.json"
    scaling.main(["--quick", "--max", "1e4", "--repeats", "4", "--json", str(out)])
    points = json.loads(out.read_text())["points"]
    assert {(p["mask"], p["entries"]) for p in points} == {(m, n) for m in ("rand", "block") for n in (1000, 10000)}
    for p in points:
        assert p["written"] >= p["entries"] and p["switch_ms"] > 0 and p["floor_ms"] > 0
        assert p["kernel_ms"] > 0 and p["atomic_ratio"] > 0  # fp32: the bare kernel on either kernel path
        assert p["visits_ms"] > 0 and p["visits_ratio"] > 0  # the line-visit floor, in the same rounds
    assert "switch / floor" in capsys.readouterr().out


def test_soak_and_threshold_runs_end_to_end(capsys):
    scaling.main(["--soak", "50"])
    assert "other vCPU busy" in capsys.readouterr().out
    keep = scaling.torch_backend.DENSE_SERIAL_BELOW
    rows = scaling.dense_threshold((32, 64), 4)
    assert [r[:2] for r in rows] == [[32, 1024], [64, 4096]]
    assert scaling.torch_backend.DENSE_SERIAL_BELOW == keep  # put back


def test_int8_bundle_points_switch_the_stored_copies():
    """``--dtypes int8-bundle``: the base exported to an int8 bundle (its weights the stored uint8 copies), block
    masks as lines of those copies: the floor counts the copies' lines (far fewer for blocks than for random
    positions), and the bundle's folder is removed afterwards."""
    before = set(os.listdir(tempfile.gettempdir()))
    floors = {}
    for mask in ("rand", "block"):
        p = scaling.point(10_000, mask, "int8-bundle", 4, busy=False)
        assert p["written"] >= p["entries"] and p["switch_ms"] > 0 and p["floor_ms"] > 0 and "kernel_ms" not in p
        assert p["visits_ms"] > 0  # the copies' lines, visited in place (their pages already the runtime's)
        floors[mask] = p["floor_ms"]
    assert floors["block"] * 4 < floors["rand"]
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("scaling-")}


def test_huge_pages_points_report_what_moved(capsys):
    p = scaling.point(10_000, "rand", "fp32", 4, busy=False, huge=True)
    assert 0 <= p["huge_mb"] <= 4 * 1_000_000 / 2**20 and p["switch_ms"] > 0 and p["visits_ms"] > 0  # 1 M fp32
    row = scaling.huge_ab(10_000, "block", "fp32", 4, rounds=2)
    assert row[:3] == ["fp32", "block", 10_000] and row[3] > 0 and row[4] > 0 and row[5] > 0
    scaling.main(["--max", "1e3", "--masks", "rand", "--dtypes", "fp32", "--repeats", "4", "--huge-pages"])
    assert "weights on huge pages:" in capsys.readouterr().out


def test_per_tensor_rows():
    rows = scaling.per_tensor((2, 5), 4)
    assert [r[0] for r in rows] == [2, 5] and all(r[1] > 0 and r[2] > 0 and r[3] == r[2] / r[0] for r in rows)
    assert all(len(r) == 12 and r[4] > 0 and r[5] == r[4] / r[0] for r in rows)  # the bundle's columns
    assert all(r[6] > 0 and r[7] > 0 for r in rows)  # cold caches
    assert all(x > 0 for r in rows for x in r[8:12])  # int8 and fp8: warm and cold
    busy = scaling.per_tensor((3,), 4, busy=True)
    assert len(busy[0]) == 14 and all(x > 0 for x in busy[0][8:])


def test_cold_switches_end_where_they_started():
    """``cold_us`` flushes the caches between switches, outside the timing, and leaves the runtime at A (an odd
    count is rounded up to an even one)."""
    import numpy as np

    with scaling.runtime_for(1000, "rand", "fp32") as (rt, _):
        rt.switch("a")
        junk = np.zeros(1 << 20, np.uint8)
        assert scaling.cold_us(rt, 3, junk) > 0
        assert rt.active == (("a", 1.0),) and int(junk[0]) == 4  # four switches, each after a flush


def test_mask_ab_rows(tmp_path, capsys):
    """``--mask-ab``: random and block runtimes of one size in one process, interleaved (as a function and from
    the command line, on an int8 bundle)."""
    row = scaling.mask_ab(10_000, "fp32", 4, rounds=2)
    assert row[:2] == ["fp32", 10_000] and row[2] > 0 and row[3] > 0 and row[4] > 0
    out = tmp_path / "ab.json"
    scaling.main(["--mask-ab", "--min", "1e3", "--max", "1e3", "--dtypes", "int8-bundle", "--repeats", "4",
                  "--json", str(out)])  # fmt: skip
    (rows,) = json.loads(out.read_text()).values()
    assert [r[:2] for r in rows] == [["int8-bundle", 1000]] and all(v > 0 for v in rows[0][2:])
    assert "random against block masks" in capsys.readouterr().out


def test_interleaved_leaves_each_runtime_at_the_base():
    with scaling.runtime_for(1000, "rand", "fp32") as (a, _), scaling.runtime_for(1000, "block", "bf16") as (b, _):
        before = [{k: bits(v).clone() for k, v in rt.backend.tensors.items()} for rt in (a, b)]
        times = scaling.interleaved([a, b], 3, rounds=2)
        assert [len(t) for t in times] == [2, 2] and all(v > 0 for t in times for v in t)
        for rt, snap in zip((a, b), before):
            assert not rt.active
            assert all(torch.equal(bits(v), snap[k]) for k, v in rt.backend.tensors.items())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a bundle's pages are handed back on Linux only")
def test_from_base_rows(tmp_path, capsys):
    """``--from-base``: a bundle's switch from the base after switch(None), its pages made private first against
    faulted in by the writes, interleaved (as a function, fp32 and block, and from the command line, int8)."""
    row = scaling.from_base(10_000, "block", "fp32-bundle", rounds=2)
    assert row[:3] == ["fp32-bundle", "block", 10_000]
    pages, populate_ms, faulting_ms, ratio, faults_populate, faults_faulting, ab = row[3:]
    assert pages > 0 and populate_ms > 0 and faulting_ms > 0 and ratio > 0 and ab > 0
    # each page is faulted in once either way: by the advice, or by the kernel's first write to it
    assert faults_populate >= pages and faults_faulting >= pages
    out = tmp_path / "fb.json"
    scaling.main(["--from-base", "--min", "1e3", "--max", "1e3", "--masks", "rand", "--dtypes", "int8-bundle",
                  "--json", str(out)])  # fmt: skip
    (rows,) = json.loads(out.read_text()).values()
    assert [r[:3] for r in rows] == [["int8-bundle", "rand", 1000]] and rows[0][3] > 0
    assert "from the base after switch(None)" in capsys.readouterr().out


def test_fp8_points_count_the_compute_copy():
    """An FP8 point's floors and line visits take the bf16 compute copy's lines beside the codes' (the switch
    writes both), while its entries (the adapter's streams) are the codes' alone."""
    with scaling.runtime_for(10_000, "rand", "fp8") as (rt, _):
        ps = scaling.parts(rt, "a", "b")
        copies = [w for w, _ in ps if w.dtype == torch.bfloat16]
        codes = [w for w, _ in ps if w.dtype == torch.float8_e4m3fn]
        assert len(copies) == len(codes) == len(scaling.NAMES)
        floor, streams, written = scaling.floors(rt, "a", "b", "fp8", 50.0)
        entries = sum(int(torch.as_tensor(i).numel()) for w, idx in ps if w.dtype == torch.float8_e4m3fn for i in idx)
        assert written == entries
        without = scaling.memory_floor_ms(
            sum(scaling.touched_lines(torch.cat([torch.as_tensor(i).long() for i in idx]), 1, w.data_ptr() % 64)
                for w, idx in ps if w.dtype == torch.float8_e4m3fn), 50.0)  # fmt: skip
        assert floor > 2 * without  # a bf16 line holds 32 of the copy's entries, a codes line 64
    row = scaling.point(10_000, "rand", "fp8", 4, False)
    assert row["dtype"] == "fp8" and row["switch_ms"] > 0 and row["visits_ms"] > 0
