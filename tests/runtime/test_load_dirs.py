"""Runtime.load of a directory: a transformers model directory loads on the torch backend; a directory that is
neither a bundle nor a transformers model, and a model directory without weights, are refused naming what was
expected. load_base raises the project's errors (never SystemExit)."""

from __future__ import annotations

import pytest
import torch
from shira_runtime import Runtime, ShiraError
from shira_runtime.bundle import BundleError
from shira_runtime.errors import BaseLoadError
from shira_runtime.models import TARGETS, load_base
from shira_runtime.synthetic import random_shira

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[5, 9, 17, 3], [3, 4, 5, 6]])


def tiny_llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None  # every generation runs its full length
    return model


def test_a_transformers_model_directory_loads_on_the_torch_backend(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    rt = Runtime.load(str(tmp_path))
    assert rt.backend.kind == "torch" and type(rt.backend.module) is transformers.LlamaForCausalLM
    loaded = rt.backend.module
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    want = model.generate(IDS, max_new_tokens=6, do_sample=False)
    assert torch.equal(rt.generate(IDS, max_new_tokens=6), want) and want.shape == (2, 10)
    # adapters address the model by its state_dict names, switch in place and revert bit for bit
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    rt.add_adapter("a", random_shira(loaded, TARGETS, 0.05, seed=1, std=0.5))
    rt.switch("a")
    assert not torch.equal(rt.generate(IDS, max_new_tokens=6), want)
    rt.switch(None)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(Runtime.load(tmp_path).generate(IDS, max_new_tokens=6), want)  # a Path works too


def test_a_transformers_directory_keeps_the_dtype_it_was_saved_in(tmp_path):
    tiny_llama(torch.bfloat16).save_pretrained(tmp_path)
    rt = Runtime.load(tmp_path)
    assert {p.dtype for p in rt.backend.module.parameters()} == {torch.bfloat16}


def test_a_directory_that_is_neither_a_bundle_nor_a_model_is_refused_naming_both(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match=r"neither a bundle \(no manifest.json.*shira-package.*\) nor a transformers"):
        Runtime.load(tmp_path)
    with pytest.raises(BundleError, match=r"it holds notes.txt"):
        Runtime.load(tmp_path)
    with pytest.raises(BundleError, match="not a bundle directory"):  # no such directory: as before
        Runtime.load(tmp_path / "nothing")


def test_a_model_directory_without_weights_is_refused_naming_it(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)  # config.json only
    with pytest.raises(BaseLoadError, match=f"{tmp_path}: not a loadable transformers model directory"):
        Runtime.load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(BaseLoadError, match=f"{tmp_path}: not a loadable transformers model directory"):
        Runtime.load(tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-preset", "not a preset"),
        ("os:getcwd", "returned str, not an nn.Module"),
        ("shira_runtime.no_such_module:build", "no callable 'build' in module 'shira_runtime.no_such_module'"),
        ("shira_runtime.models:no_such_fn", "no callable 'no_such_fn'"),
    ],
)
def test_load_base_raises_the_projects_error_not_system_exit(spec, message):
    with pytest.raises(BaseLoadError, match=message) as info:
        load_base(spec)
    assert isinstance(info.value, ShiraError) and isinstance(info.value, ValueError)


def test_load_base_of_a_model_directory_without_weights(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(BaseLoadError, match=str(tmp_path)):
        load_base(str(tmp_path))
