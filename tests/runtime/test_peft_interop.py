"""Real PEFT adapters (SHiRA and LoRA) made by PEFT itself: our switch equals PEFT's merge_and_unload()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, ShiraConfig, get_peft_model  # noqa: E402
from shira_runtime import LoraAdapter, Runtime, SparseAdapter  # noqa: E402

from tests.conftest import assert_bit_identical, snapshot  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_hf_llama(seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 40)
        self.mid = nn.Sequential(nn.Linear(40, 40), nn.GELU())
        self.down = nn.Linear(40, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.mid(torch.relu(self.up(x))))


def make_peft_dir(base: nn.Module, config, path, seed: int):
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), config)
    if isinstance(config, LoraConfig):  # PEFT zero-inits B; give it values so the delta is real
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    pm.save_pretrained(str(path))
    return pm.merge_and_unload().eval()


def shira_cfg(targets, seed):
    return ShiraConfig(r=2, target_modules=targets, init_weights=False, random_seed=seed)


def lora_cfg(targets, **kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["shira", "lora", "rslora"])
def test_hf_llama_switch_equals_peft_merge(tmp_path, kind):
    base = tiny_hf_llama()
    cfg = {
        "shira": shira_cfg(LLAMA_TARGETS, 3),
        "lora": lora_cfg(LLAMA_TARGETS),
        "rslora": lora_cfg(LLAMA_TARGETS, use_rslora=True),
    }[kind]
    merged = make_peft_dir(base, cfg, tmp_path / kind, seed=1)
    snap = snapshot(base)
    rt = Runtime.load(base)
    rt.add_adapter(kind, tmp_path / kind)
    ids = torch.randint(0, 128, (2, 10))
    before = hf_logits(base, ids)
    rt.switch(kind)
    assert not torch.allclose(hf_logits(base, ids), before, atol=1e-4), "the adapter must change the outputs"
    torch.testing.assert_close(rt(ids).logits, hf_logits(merged, ids), atol=1e-5, rtol=1e-5)
    for name, w in merged.state_dict().items():
        torch.testing.assert_close(base.state_dict()[name], w, atol=1e-6, rtol=1e-6)
    rt.switch(None)
    assert_bit_identical(base, snap)


def test_plain_module_shira_and_lora_and_fusion(tmp_path):
    torch.manual_seed(0)
    base = Plain().eval()
    merged_s = make_peft_dir(base, shira_cfg(["up", "mid.0", "down"], 5), tmp_path / "s", seed=2)
    merged_l = make_peft_dir(base, lora_cfg(["up", "down"]), tmp_path / "l", seed=3)
    sa = SparseAdapter.from_peft(tmp_path / "s")
    la = LoraAdapter.from_peft(tmp_path / "l")
    assert set(sa.indices) == {"up.weight", "mid.0.weight", "down.weight"}
    assert set(la.A) == {"up.weight", "down.weight"} and la.scaling["up.weight"] == 2.0
    snap = snapshot(base)
    x = torch.randn(5, 12)
    rt = Runtime.load(base)
    rt.add_adapter("s", tmp_path / "s")
    rt.add_adapter("l", tmp_path / "l")
    rt.switch("s")
    torch.testing.assert_close(rt(x), merged_s(x), atol=1e-5, rtol=1e-5)
    rt.switch("l")
    torch.testing.assert_close(rt(x), merged_l(x), atol=1e-5, rtol=1e-5)
    # fused: the dense reference is base + 0.5 * shira delta + 0.25 * lora delta
    rt.switch(["s", "l"], [0.5, 0.25])
    base_sd = {k: v.view(torch.float32) for k, v in snap.items()}
    dense = Plain().eval()
    dense.load_state_dict(
        {
            k: base_sd[k]
            + 0.5 * (merged_s.state_dict()[k] - base_sd[k])
            + 0.25 * (merged_l.state_dict()[k] - base_sd[k])
            for k in base_sd
        }
    )
    torch.testing.assert_close(rt(x), dense(x), atol=1e-5, rtol=1e-5)
    rt.switch(None)
    assert_bit_identical(base, snap)


def test_peft_shira_float_indices_are_accepted(tmp_path):
    """Some writers store shira_indices as float: they load as the same integer coordinates."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = Plain().eval()
    make_peft_dir(base, shira_cfg(["up"], 1), tmp_path / "s", seed=1)
    f = tmp_path / "s" / "adapter_model.safetensors"
    sd = load_file(f)
    save_file({k: (v.float() if k.endswith("indices") else v) for k, v in sd.items()}, f)
    a = SparseAdapter.from_peft(tmp_path / "s")
    assert torch.equal(a.indices["up.weight"], sd["base_model.model.up.shira_indices"].long())
