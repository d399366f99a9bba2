"""Our adapter file: compact v2 round trips, size per nonzero, golden bytes, v1 compatibility, tampering."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from runtime import AdapterFormatError, Runtime, SparseAdapter
from runtime.models import TARGETS, build
from runtime.shira_file import decode_gaps, encode_gaps
from runtime.synthetic import random_indices, random_shira
from tests.conftest import assert_bit_identical, snapshot


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.3])
def test_gap_codec_round_trip(density):
    gen = torch.Generator().manual_seed(1)
    n = 1 << 20
    idx = random_indices(n, max(1, int(density * n)), gen)
    for case in (idx, idx[:1], torch.tensor([0, 1, 2, n - 1]), torch.tensor([70000]), idx[:0]):
        gaps, esc = encode_gaps(case)
        assert torch.equal(decode_gaps(gaps, esc, "t", n), case.long())


def test_round_trip_values_dtypes(tmp_path):
    m = build("tiny", torch.float32, seed=1)
    a = random_shira(m, TARGETS, 0.05, seed=2)
    for values, dtype in ((None, torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        path = tmp_path / f"{values}.safetensors"
        a.save(path, values=values)
        b = SparseAdapter.load(path)
        assert b.scale == a.scale and b.shapes == a.shapes and b.fingerprint.structure == a.fingerprint.structure
        for n in a.indices:
            assert torch.equal(b.indices[n], a.indices[n].long())
            assert b.values[n].dtype == dtype
            assert torch.equal(b.values[n], a.values[n].to(dtype))  # fp16/bf16: round to nearest, once


def test_bytes_per_nonzero_with_fp16_values(tmp_path):
    """Scaled case of the llama-1b shapes (one layer's 7 projections at 1%): at most 3.5 bytes per nonzero."""
    shapes = {
        "q": (2048, 2048),
        "k": (512, 2048),
        "v": (512, 2048),
        "o": (2048, 2048),
        "gate": (8192, 2048),
        "up": (8192, 2048),
        "down": (2048, 8192),
    }
    gen = torch.Generator().manual_seed(0)
    indices, values = {}, {}
    for n, (r, c) in shapes.items():
        indices[n] = random_indices(r * c, r * c // 100, gen)
        values[n] = torch.randn(indices[n].numel(), generator=gen) * 0.01
    a = SparseAdapter(indices, values, shapes)
    path = tmp_path / "a.safetensors"
    a.save(path, values="fp16")
    per_nnz = path.stat().st_size / a.nnz
    peft_per_nnz = 12  # fp32 value + int32 row + int32 col
    assert per_nnz <= 3.5, per_nnz
    assert peft_per_nnz / per_nnz > 3.4


def golden_adapter() -> SparseAdapter:
    idx = torch.tensor([0, 3, 300, 301, 70000], dtype=torch.int32)
    return SparseAdapter({"w": idx}, {"w": torch.tensor([0.5, -1.0, 2.0, 0.25, -0.125])}, {"w": (512, 256)}, 0.5)


def test_golden_bytes_pin_the_format(tmp_path):
    path = tmp_path / "g.safetensors"
    golden_adapter().save(path, values="fp16")
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.pop("__metadata__")
    assert meta["format"] == "shira-runtime/sparse" and meta["version"] == "3" and meta["scale"] == "0.5"
    assert header["w::gaps"]["dtype"] == "U8" and header["w::gaps"]["shape"] == [5]
    assert header["w::escapes"]["dtype"] == "I32" and header["w::escapes"]["shape"] == [2]  # gaps 296, 69698
    assert header["w::values"]["dtype"] == "F16"
    body = data[8 + header_len :]
    gaps = body[slice(*header["w::gaps"]["data_offsets"])]
    assert list(gaps) == [0, 2, 255, 0, 255]
    # the tensor bytes are pinned whole (the header's metadata order is not stable across writers)
    assert hashlib.sha256(body).hexdigest() == GOLDEN_BODY_SHA256
    torch_dtype = {"U8": "torch.uint8", "I32": "torch.int32", "F16": "torch.float16"}
    sums = {}
    for k, v in header.items():  # each checksum binds the tensor's key, dtype and shape to its bytes
        h = hashlib.sha256(json.dumps([k, torch_dtype[v["dtype"]], v["shape"]]).encode())
        h.update(body[slice(*v["data_offsets"])])
        sums[k] = h.hexdigest()[:32]
    assert json.loads(meta["checksums"]) == sums


GOLDEN_BODY_SHA256 = "041c39b0f8947980cb5d60c7f8985f7cd03d6a32f533206aed48d226216a62c1"


def test_version_1_files_still_load(tmp_path):
    a = golden_adapter()
    path = tmp_path / "v1.safetensors"
    save_file(
        {"w::indices": a.indices["w"], "w::values": a.values["w"]},
        str(path),
        metadata={
            "format": "shira-runtime/sparse",
            "version": "1",
            "scale": "0.5",
            "mask_kind": "random",
            "shapes": json.dumps({"w": [512, 256]}),
        },
    )
    b = SparseAdapter.load(path)
    assert torch.equal(b.indices["w"], a.indices["w"]) and torch.equal(b.values["w"], a.values["w"])


def test_every_tampered_byte_is_refused_and_nothing_changes(tmp_path):
    m = build("tiny", torch.float32, seed=1)
    a = random_shira(m, ["q_proj"], 0.01, seed=2)
    path = tmp_path / "a.safetensors"
    a.save(path, values="fp16")
    data = path.read_bytes()
    rt = Runtime.load(m)
    snap = snapshot(m)
    bad = tmp_path / "bad.safetensors"
    for pos in range(len(data)):
        blob = bytearray(data)
        blob[pos] ^= 0xFF
        bad.write_bytes(bytes(blob))
        with pytest.raises(AdapterFormatError):
            SparseAdapter.load(bad)
    for cut in (1, 8, 100, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(AdapterFormatError, match="bad.safetensors"):
            rt.add_adapter("x", bad)
    assert rt.adapters == ()
    assert_bit_identical(m, snap)
