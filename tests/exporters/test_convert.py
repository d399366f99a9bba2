"""PEFT SHiRA <-> our file: round trips, with PEFT itself loading what we write."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import PeftModel, ShiraConfig, get_peft_model  # noqa: E402
from shira_runtime import AdapterFormatError, SparseAdapter  # noqa: E402
from shira_runtime.exporters.convert import main as convert_main  # noqa: E402
from shira_runtime.exporters.convert import peft_to_ours  # noqa: E402
from shira_runtime.models import TARGETS, build  # noqa: E402
from shira_runtime.synthetic import random_shira  # noqa: E402


def peft_shira(base, path, seed=1):
    torch.manual_seed(seed)
    pm = get_peft_model(
        copy.deepcopy(base), ShiraConfig(r=2, target_modules=list(TARGETS), init_weights=False, random_seed=seed)
    )
    pm.save_pretrained(str(path))
    return pm.merge_and_unload().eval()


def test_peft_to_ours_to_peft_is_identical_in_fp32_and_peft_loads_it(tmp_path):
    base = build("tiny", torch.float32, seed=1)
    merged = peft_shira(base, tmp_path / "peft")
    ours = peft_to_ours(tmp_path / "peft", tmp_path / "a.safetensors", base, values="fp32")
    back = SparseAdapter.load(tmp_path / "a.safetensors").to_peft(tmp_path / "back")
    orig = SparseAdapter.from_peft(tmp_path / "peft")
    again = SparseAdapter.from_peft(back)
    for n in orig.indices:
        assert torch.equal(again.indices[n], orig.indices[n])
        assert torch.equal(again.values[n], orig.values[n])
    assert ours.nnz == orig.nnz
    # PEFT itself reads our PEFT directory and merges to the same model
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(back)).merge_and_unload().eval()
    x = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(x), merged(x))


def test_fp16_values_round_to_nearest_once(tmp_path):
    base = build("tiny", torch.float32, seed=1)
    peft_shira(base, tmp_path / "peft")
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    peft_to_ours(tmp_path / "peft", tmp_path / "a16.safetensors", base, values="fp16")
    orig = SparseAdapter.from_peft(tmp_path / "peft")
    half = SparseAdapter.load(tmp_path / "a16.safetensors")
    for n in orig.indices:
        flat, val = orig.flat(n, shapes[n])
        assert torch.equal(half.indices[n], flat.long())
        assert torch.equal(half.values[n], val.to(torch.float16))


def test_to_peft_refuses_what_peft_could_not_load(tmp_path):
    base = build("tiny", torch.float32, seed=1)
    a = random_shira(base, TARGETS, 0.013, seed=1)  # nonzero counts are not r * (out + in)
    with pytest.raises(AdapterFormatError, match="PEFT could not load"):
        a.to_peft(tmp_path / "p")
    a.to_peft(tmp_path / "p", strict=False)
    assert SparseAdapter.from_peft(tmp_path / "p").nnz == a.nnz


def test_convert_cli(tmp_path, capsys):
    base = build("tiny", torch.float32, seed=0)
    peft_shira(base, tmp_path / "peft")
    convert_main(
        ["to-ours", str(tmp_path / "peft"), str(tmp_path / "a.safetensors"), "--base", "tiny", "--values", "fp16"]
    )
    assert "bytes/nonzero" in capsys.readouterr().out
    convert_main(["to-peft", str(tmp_path / "a.safetensors"), str(tmp_path / "back")])
    assert (tmp_path / "back" / "adapter_config.json").is_file()
