"""What a replica loads, without Ray: a transformers model directory is served on the torch backend; the
command-line server refuses a directory it cannot serve before any cluster starts."""

from __future__ import annotations

import pytest
import torch
from shira_runtime.models import TARGETS
from shira_runtime.serve import RuntimeSpec, Synthetic, expected, main
from shira_runtime.synthetic import random_shira

transformers = pytest.importorskip("transformers")


def test_a_transformers_model_directory_is_served_on_the_torch_backend(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "model")
    random_shira(model, TARGETS, 0.05, seed=1, std=0.5).save(tmp_path / "a.safetensors")
    spec = RuntimeSpec(str(tmp_path / "model"), (("a", str(tmp_path / "a.safetensors")),), synthetic=Synthetic(2))
    assert spec.is_model_dir() and not spec.is_bundle()
    assert spec.adapter_names() == ["a", "shira00", "shira01"]
    threads = torch.get_num_threads()
    try:
        rt = spec.resolved().build()
    finally:
        torch.set_num_threads(threads)  # build() set this process's threads
    assert rt.backend.kind == "torch" and rt.adapters == ("shira00", "shira01", "a")
    prompts = [[5, 9, 17], [3, 4, 5]]
    want = model.generate(torch.tensor(prompts), max_new_tokens=4, do_sample=False)[:, 3:].tolist()
    assert expected(rt, None, prompts, 4) == want
    assert expected(rt, "a", prompts, 4) != want


def test_the_server_refuses_a_directory_it_cannot_serve_before_starting_ray(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: neither a bundle") and "Traceback" not in err
