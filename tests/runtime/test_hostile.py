"""Bad input: each case raises a specific, clear error and leaves every weight bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from shira_runtime import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterValueError,
    BaseMismatchError,
    LoraAdapter,
    Runtime,
    SparseAdapter,
)
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_shira

from tests.conftest import assert_bit_identical, snapshot

Q = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] in the tiny preset


@pytest.fixture
def setup(dtype):
    m = build("tiny", dtype, seed=1)
    rt = Runtime.load(m)
    rt.add_adapter("good", random_shira(m, TARGETS, 0.05, seed=1))
    rt.switch("good")  # failures must also leave an applied state untouched
    return m, rt, snapshot(m)


def one(idx, val, shape=None, name=Q):
    return SparseAdapter(
        {name: torch.tensor(idx)}, {name: torch.tensor(val, dtype=torch.float32)}, {name: shape} if shape else {}
    )


CASES = {
    "out_of_range": (one([1, 4096], [0.1, 0.2]), AdapterMismatchError, r"index 4096 at position 1 out of range"),
    "negative": (one([-1, 3], [0.1, 0.2]), AdapterMismatchError, r"index -1 at position 0 out of range"),
    "duplicate": (one([7, 3, 7], [0.1, 0.2, 0.3]), AdapterValueError, r"index 7 appears more than once"),
    "nan": (one([1, 2], [0.1, float("nan")]), AdapterValueError, r"position 1 \(index 2\) is not finite"),
    "inf": (one([1, 2], [float("inf"), 0.0]), AdapterValueError, r"not finite"),
    "wrong_shape": (one([1], [0.1], shape=(32, 128)), AdapterMismatchError, r"made for shape \(32, 128\)"),
    "unknown_name": (
        one([1], [0.1], name="model.layers.9.self_attn.q_proj.weight"),
        AdapterMismatchError,
        r"'model.layers.9.self_attn.q_proj.weight' is not a weight of this base.*similar names",
    ),
    "length_mismatch": (
        SparseAdapter({Q: torch.tensor([1, 2])}, {Q: torch.tensor([0.1])}),
        AdapterMismatchError,
        r"2 indices but 1 values",
    ),
    "float_indices": (
        SparseAdapter({Q: torch.tensor([1.0])}, {Q: torch.tensor([0.1])}),
        AdapterMismatchError,
        r"indices have dtype float32",
    ),
    "int_values": (
        SparseAdapter({Q: torch.tensor([1])}, {Q: torch.tensor([1])}),
        AdapterMismatchError,
        r"values have dtype int64",
    ),
    "lora_shape": (
        LoraAdapter({Q: torch.ones(2, 64)}, {Q: torch.ones(32, 2)}),
        AdapterMismatchError,
        r"B @ A has shape \(32, 64\)",
    ),
    "lora_nan": (
        LoraAdapter({Q: torch.full((2, 64), float("nan"))}, {Q: torch.ones(64, 2)}),
        AdapterValueError,
        r"NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_is_refused_and_nothing_changes(setup, case):
    m, rt, snap = setup
    adapter, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern) as info:
        rt.add_adapter("bad", adapter)
    assert "'bad'" in str(info.value)
    assert rt.adapters == ("good",) and rt.active == (("good", 1.0),)
    assert_bit_identical(m, snap)


def test_adapter_for_another_base_is_refused(setup, tmp_path):
    m, rt, snap = setup
    other_same_shapes = build("tiny", torch.float32, seed=99)
    a = random_shira(other_same_shapes, TARGETS, 0.05, seed=3)
    with pytest.raises(BaseMismatchError, match="other weights at the adapter's indices"):
        rt.add_adapter("other", a)
    other_shapes = build("small", torch.float32, seed=1)
    b = random_shira(other_shapes, ["q_proj"], 0.01, seed=3)
    with pytest.raises(AdapterMismatchError, match="made for shape"):
        rt.add_adapter("other2", b)
    b.shapes = {}  # even without recorded shapes the fingerprint's structure catches it
    with pytest.raises(AdapterMismatchError):
        rt.add_adapter("other3", b)
    assert_bit_identical(m, snap)


def test_fingerprint_accepts_16bit_copy_of_the_same_base():
    m32 = build("tiny", torch.float32, seed=1)
    a = random_shira(m32, TARGETS, 0.05, seed=4)
    for dt in (torch.bfloat16, torch.float16):
        rt = Runtime.load(build("tiny", dt, seed=1))
        rt.add_adapter("a", a)  # no error
        rt.switch("a")


def test_overflow_in_fp16_is_refused_before_writing():
    m = build("tiny", torch.float16, seed=1)
    rt = Runtime.load(m)
    rt.add_adapter("good", random_shira(m, TARGETS, 0.05, seed=1))
    rt.switch("good")
    snap = snapshot(m)
    rt.add_adapter("huge", one([1, 2], [1e5, 0.0]))
    with pytest.raises(AdapterValueError, match="beyond what torch.float16 holds"):
        rt.switch("huge")
    big_lora = LoraAdapter({Q: torch.full((1, 64), 300.0)}, {Q: torch.full((64, 1), 300.0)})
    rt.add_adapter("huge_lora", big_lora)
    with pytest.raises(AdapterValueError, match="overflow torch.float16"):
        rt.switch(["good", "huge_lora"])  # fails mid-way, after sparse writes: rolled back
    assert rt.active == (("good", 1.0),)
    assert_bit_identical(m, snap)


def write_good_file(tmp_path, m):
    a = random_shira(m, TARGETS, 0.05, seed=8)
    path = tmp_path / "a.safetensors"
    a.save(path)
    return a, path


def test_file_round_trip_and_corruptions(setup, tmp_path):
    m, rt, snap = setup
    a, path = write_good_file(tmp_path, m)
    b = SparseAdapter.load(path)
    assert set(b.indices) == set(a.indices) and b.fingerprint is not None
    for n in a.indices:
        assert torch.equal(b.indices[n], a.indices[n]) and torch.equal(b.values[n], a.values[n])
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": b"\x00\x01garbage" * 50,
        "header_len_lies": (10**9).to_bytes(8, "little") + data[8:],
    }
    for label, blob in cases.items():
        bad = tmp_path / f"{label}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(AdapterFormatError, match=str(bad.name)):
            rt.add_adapter(label, bad)
    with pytest.raises(AdapterFormatError, match="no such file"):
        rt.add_adapter("missing", tmp_path / "nope.safetensors")
    assert rt.adapters == ("good",)
    assert_bit_identical(m, snap)


def test_file_with_wrong_format_or_version(tmp_path):
    from safetensors.torch import save_file

    m = build("tiny", torch.float32, seed=1)
    _, path = write_good_file(tmp_path, m)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value, pattern in (
        ("version", "99", "version '99' is not supported"),
        ("format", "other", "not a shira-runtime/sparse file"),
        ("shapes", "{not json", "metadata is corrupted"),
    ):
        bad = tmp_path / f"{key}.safetensors"
        save_file(tensors, str(bad), metadata={**meta, key: value})
        with pytest.raises(AdapterFormatError, match=pattern):
            SparseAdapter.load(bad)
    extra = tmp_path / "extra.safetensors"
    save_file({**tensors, "stray": torch.ones(1)}, str(extra), metadata=meta)
    with pytest.raises(AdapterFormatError, match="checksums do not list exactly the tensors stored"):
        SparseAdapter.load(extra)


def test_bad_peft_directories(tmp_path):
    m = build("tiny", torch.float32)
    rt = Runtime.load(m)
    snap = snapshot(m)
    d = tmp_path / "p"
    d.mkdir()
    with pytest.raises(AdapterFormatError, match="not a PEFT adapter"):
        rt.add_adapter("x", d)
    (d / "adapter_config.json").write_text("{broken")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        rt.add_adapter("x", d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterFormatError, match="'IA3' is not supported"):
        rt.add_adapter("x", d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "SHIRA"}))
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors"):
        rt.add_adapter("x", d)
    (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        rt.add_adapter("x", d)
    assert rt.adapters == ()
    assert_bit_identical(m, snap)


def test_bad_switch_arguments_change_nothing(setup):
    m, rt, snap = setup
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        rt.switch(["good", "nope"])
    with pytest.raises(ValueError, match="2 adapter names but 1 weights"):
        rt.switch(["good", "good2"], [1.0])
    with pytest.raises(ValueError, match="named twice"):
        rt.switch(["good", "good"])
    with pytest.raises(ValueError, match="not finite"):
        rt.switch("good", float("nan"))
    with pytest.raises(ValueError, match="already registered"):
        rt.add_adapter("good", random_shira(m, TARGETS, 0.05, seed=1))
    assert rt.active == (("good", 1.0),)
    assert_bit_identical(m, snap)


def test_lazy_adapter_with_a_bad_file_fails_its_first_switch_and_changes_nothing(setup, tmp_path):
    m, rt, snap = setup
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    rt.add_adapter("lazy", bad, lazy=True)
    assert "lazy" in rt.adapters
    with pytest.raises(AdapterFormatError, match="bad.safetensors"):
        rt.switch(["good", "lazy"])
    assert rt.active == (("good", 1.0),)
    assert_bit_identical(m, snap)
    good = tmp_path / "good.safetensors"
    # made on a fresh copy of the base: the module now has "good" applied, and a fingerprint records the base
    random_shira(build("tiny", torch.float32, seed=1), TARGETS, 0.05, seed=5).save(good)
    rt.add_adapter("lazy_ok", good, lazy=True)
    rt.switch("lazy_ok")
    rt.switch("good")
    assert_bit_identical(m, snap)
