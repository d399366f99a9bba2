"""rt.generate: greedy and seeded sampling, eos, on the torch backend (a transformers model runs its own generate)
and on a bundle; a switch never lands inside a generation."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from shira_runtime import Runtime
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_shira

IDS = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(0))


def greedy_reference(model, ids, n):
    """Argmax decoding written out by hand on the module itself."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_on_the_builtin_decoder_matches_a_hand_loop_with_the_adapter_applied():
    m = build("tiny", torch.float32, seed=1)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1, std=0.2))
    base_out = rt.generate(IDS, max_new_tokens=8)
    assert base_out.shape == (2, 14) and torch.equal(base_out[:, :6], IDS)
    rt.switch("a")
    out = rt.generate(IDS, max_new_tokens=8)
    assert torch.equal(out, greedy_reference(m, IDS, 8))
    assert not torch.equal(out, base_out)  # the adapter changes what is generated
    rt.switch(None)
    assert torch.equal(rt.generate(IDS, max_new_tokens=8), base_out)


def test_sampling_is_seeded_and_its_filters_work():
    rt = Runtime.load(build("tiny", torch.float32, seed=1))
    greedy = rt.generate(IDS, max_new_tokens=10)
    s1 = rt.generate(IDS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7)
    s2 = rt.generate(IDS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7)
    s3 = rt.generate(IDS, max_new_tokens=10, do_sample=True, temperature=1.5, seed=8)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1, greedy)
    assert torch.equal(rt.generate(IDS, max_new_tokens=10, do_sample=True, top_k=1, seed=1), greedy)
    assert torch.equal(rt.generate(IDS, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=1), greedy)
    for bad in ({"temperature": 0.0}, {"top_k": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            rt.generate(IDS, max_new_tokens=2, do_sample=True, **bad)
    with pytest.raises(ValueError, match="input_ids"):
        rt.generate(torch.rand(2, 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        rt.generate(IDS, max_new_tokens=-1)


def test_eos_stops_rows_and_the_finished_rows_repeat_it():
    rt = Runtime.load(build("tiny", torch.float32, seed=1))
    greedy = rt.generate(IDS, max_new_tokens=10)
    eos = int(greedy[0, 8])  # the third new token of row 0
    out = rt.generate(IDS, max_new_tokens=10, eos_token_id=eos)
    row0 = out[0, 6:].tolist()
    stop = row0.index(eos)
    assert row0[: stop + 1] == greedy[0, 6 : 7 + stop].tolist() and set(row0[stop:]) == {eos}


def test_a_switch_waits_for_a_running_generation():
    m = build("tiny", torch.float32, seed=1)
    rt = Runtime.load(m)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1, std=0.2))
    steps, started = [], threading.Event()

    def slow(module, args, out):
        steps.append(time.monotonic())
        started.set()
        time.sleep(0.02)

    handle = m.register_forward_hook(slow)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", rt.generate(IDS, max_new_tokens=12)))
    worker.start()
    started.wait(5)
    rt.switch("a")
    switched_at = time.monotonic()
    worker.join()
    handle.remove()
    assert len(steps) == 12 and switched_at > steps[-1]  # every step ran before the switch
    rt.switch(None)
    assert torch.equal(result["out"], rt.generate(IDS, max_new_tokens=12))  # all of it on the base


def test_bundle_generates_like_the_torch_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from shira_runtime.exporters import export_onnx

    m = build("tiny", torch.float32, seed=1)
    adapter = random_shira(m, TARGETS, 0.05, seed=1, std=0.2)
    rt_torch = Runtime.load(m)
    rt_torch.add_adapter("a", adapter)
    rt = Runtime.load(export_onnx(m, (IDS[:1],), tmp_path / "b"))
    rt.add_adapter("a", adapter)
    for state in ("a", None):
        rt.switch(state)
        rt_torch.switch(state)
        assert torch.equal(rt.generate(IDS, max_new_tokens=8), rt_torch.generate(IDS, max_new_tokens=8))
        sampled = dict(do_sample=True, top_k=20, temperature=0.7, seed=5)
        assert torch.equal(rt.generate(IDS, 8, **sampled), rt_torch.generate(IDS, 8, **sampled))
    with pytest.raises(ValueError, match="padding"):
        rt.generate(IDS, 4, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))


def test_transformers_model_with_a_peft_adapter_generates_like_the_merged_model(tmp_path):
    """On the torch backend a transformers model runs its own generate over the switched weights: the same tokens
    as PEFT's merged model, for a batch of two prompts of different lengths (left padding, attention mask)."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.runtime.test_peft_interop import tiny_hf_llama

    base = tiny_hf_llama()
    base.generation_config.pad_token_id = 0
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.ShiraConfig(r=4, target_modules=list(TARGETS), init_weights=False)
    )
    pm.save_pretrained(str(tmp_path / "shira"))
    merged = pm.merge_and_unload().eval()
    ids = torch.tensor([[0, 0, 5, 9, 17], [3, 4, 5, 6, 7]])  # row 0 is left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    rt = Runtime.load(copy.deepcopy(base))
    rt.add_adapter("s", tmp_path / "shira")
    base_out = rt.generate(ids, max_new_tokens=16, attention_mask=mask)
    rt.switch("s")
    got = rt.generate(ids, max_new_tokens=16, attention_mask=mask)
    want = merged.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want) and got.shape[1] > ids.shape[1]
    assert not torch.equal(got, base_out)
    sampled = dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.8, seed=4)
    assert torch.equal(
        rt.generate(ids, 8, attention_mask=mask, **sampled), rt.generate(ids, 8, attention_mask=mask, **sampled)
    )


class Pooled(torch.nn.Module):
    """Takes token ids but returns one vector per sequence [B, D]: no logits per position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 8)

    def forward(self, ids):
        return self.embed(ids).mean(1)


def test_a_module_that_cannot_generate_raises_the_projects_error_naming_what_is_missing():
    from shira_runtime.errors import CannotGenerateError, ShiraError

    with pytest.raises(CannotGenerateError, match=r"Linear cannot generate: its forward fails on token ids") as info:
        Runtime.load(torch.nn.Linear(6, 6)).generate(IDS, max_new_tokens=2)
    assert isinstance(info.value, ShiraError) and isinstance(info.value.__cause__, RuntimeError)
    assert "forward(input_ids int64 [2, 6]) -> logits [batch, seq, vocab]" in str(info.value)
    with pytest.raises(CannotGenerateError, match=r"Pooled cannot generate: its forward returned a torch.float32 "):
        Runtime.load(Pooled()).generate(IDS, max_new_tokens=2)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    with pytest.raises(CannotGenerateError, match=r"BertModel cannot generate: .*no 'logits'.*AutoModelForCausalLM"):
        Runtime.load(transformers.BertModel(cfg).eval()).generate(IDS, max_new_tokens=2)
