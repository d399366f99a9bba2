"""transformers models export to live bundles (torch's dynamo exporter): logits match the torch runtime, PEFT
adapters made by PEFT for the model switch in the bundle under their state_dict names, and switch(None) gives the
fresh bundle's output back exactly. Tiny random configs, no download."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from shira_runtime import Runtime  # noqa: E402
from shira_runtime.exporters import export_onnx  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
T = transformers
# name -> (config, model class, LoRA targets, SHiRA targets or None, LoRA fan_in_fan_out)
ARCHS = {
    "llama": (T.LlamaConfig(**SMALL, num_key_value_heads=2, pad_token_id=0), T.LlamaForCausalLM, ["q_proj", "v_proj"]),
    "qwen2": (T.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True), T.Qwen2ForCausalLM, ["q_proj"]),
    "mistral": (T.MistralConfig(**SMALL, num_key_value_heads=2), T.MistralForCausalLM, ["k_proj", "o_proj"]),
    "phi3": (T.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0), T.Phi3ForCausalLM, ["qkv_proj"]),
    "gemma": (T.GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=16), T.GemmaForCausalLM, ["q_proj", "down_proj"]),
    "gpt2": (T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4), T.GPT2LMHeadModel, ["c_attn"]),
    "bert": (T.BertConfig(**SMALL), T.BertModel, ["query", "value"]),
}
X = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(1))


def first(out):
    out = getattr(out, "logits", out)
    if isinstance(out, (list, tuple)) or hasattr(out, "to_tuple"):
        out = out[0]
    return np.asarray(out.detach() if isinstance(out, torch.Tensor) else out)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_export_switch_and_revert(arch, tmp_path):
    cfg, cls, targets = ARCHS[arch]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    fan = arch == "gpt2"  # Conv1D stores [in, out]
    lora = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fan)
    )
    lora.save_pretrained(str(tmp_path / "lora"))
    adapters = {"lora": tmp_path / "lora"}
    if not fan:  # PEFT's SHiRA wraps nn.Linear only
        shira_cfg = peft.ShiraConfig(r=2, target_modules=targets, init_weights=False)
        peft.get_peft_model(copy.deepcopy(model), shira_cfg).save_pretrained(str(tmp_path / "shira"))
        adapters["shira"] = tmp_path / "shira"

    path = export_onnx(model, (X[:1],), tmp_path / "bundle")
    got = in_fresh_process(path, adapters, X, tmp_path)  # the bundle alone: no model code in that process
    ref = Runtime.load(copy.deepcopy(model))
    assert np.abs(got["base"] - first(ref(X))).max() < 1e-4
    for name, source in adapters.items():
        ref.add_adapter(name, source)
        ref.switch(name)
        assert np.abs(got[name] - first(ref(X))).max() < 1e-4, name
        assert np.abs(got[name] - got["base"]).max() > 1e-3, name  # the adapter changed the outputs
    assert np.array_equal(got["reverted"], got["base"])  # switch(None) gives the fresh bundle's output exactly


FRESH = """
import sys, numpy as np
from shira_runtime import Runtime
bundle, x, out, *adapters = sys.argv[1:]
rt, x = Runtime.load(bundle), np.load(x)
first = lambda o: o[0] if isinstance(o, list) else o  # an encoder's first output (a decoder returns logits)
got = {"base": first(rt(x))}
for spec in adapters:
    name, _, source = spec.partition("=")
    rt.add_adapter(name, source)
    rt.switch(name)
    got[name] = first(rt(x))
rt.switch(None)
got["reverted"] = first(rt(x))
loaded = sorted(m for m in ("transformers", "diffusers", "peft") if m in sys.modules)
assert not loaded, f"model code imported: {loaded}"
np.savez(out, **got)
"""


def in_fresh_process(bundle, adapters: dict, x: torch.Tensor, tmp_path) -> dict[str, np.ndarray]:
    """Outputs of ``bundle`` in a new Python process that imports no model code: fresh, with each adapter
    switched in, and after ``switch(None)``."""
    np.save(tmp_path / "x.npy", x.numpy())
    specs = [f"{name}={source}" for name, source in adapters.items()]
    args = [str(bundle), str(tmp_path / "x.npy"), str(tmp_path / "out.npz"), *specs]
    subprocess.run([sys.executable, "-c", FRESH, *args], check=True, timeout=300)
    with np.load(tmp_path / "out.npz") as f:
        return {k: f[k] for k in f.files}


def test_package_a_transformers_directory_and_load_it_without_model_code(tmp_path):
    from shira_runtime.exporters.package import main as package_main

    cfg, cls, targets = ARCHS["llama"]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(str(tmp_path / "model"))
    shira_cfg = peft.ShiraConfig(r=2, target_modules=targets, init_weights=False)
    peft.get_peft_model(copy.deepcopy(model), shira_cfg).save_pretrained(str(tmp_path / "shira"))
    package_main(
        ["--base", str(tmp_path / "model"), "--adapter", f"s={tmp_path / 'shira'}", "--out", str(tmp_path / "b")]
    )
    ref = Runtime.load(copy.deepcopy(model))
    ref.add_adapter("s", tmp_path / "b" / "adapters" / "s.safetensors")  # the packaged (fp16) deltas
    ref.switch("s")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # two prompts, the second shorter and padded on the left
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    code = (
        "import sys, numpy as np; from shira_runtime import Runtime; rt = Runtime.load(sys.argv[1]); rt.switch('s'); "
        "np.save(sys.argv[3], rt(np.load(sys.argv[2]))); "
        "ids, mask = np.load(sys.argv[4]), np.load(sys.argv[5]); "
        "np.save(sys.argv[6], rt.generate(ids, max_new_tokens=16, attention_mask=mask))"
    )
    args = [str(tmp_path / n) for n in ("b", "x.npy", "y.npy", "ids.npy", "mask.npy", "tokens.npy")]
    np.save(tmp_path / "x.npy", X.numpy())
    subprocess.run([sys.executable, "-c", code, *args], check=True, timeout=300)  # imports no model code
    assert np.abs(np.load(tmp_path / "y.npy") - first(ref(X))).max() < 1e-4
    # the bundle generates the tokens transformers generates with the same (packaged) adapter applied
    want = ref.generate(ids, max_new_tokens=16, attention_mask=mask)
    assert np.array_equal(np.load(tmp_path / "tokens.npy"), want.numpy())


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_load_base_builds_the_class_the_directory_was_saved_from(arch, tmp_path):
    """An encoder directory used to come back as a causal LM with freshly initialised heads."""
    from shira_runtime.models import load_base

    cfg, cls, _ = ARCHS[arch]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(str(tmp_path))
    loaded = load_base(str(tmp_path))
    assert type(loaded) is cls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_the_live_rewrite_applies_to_dynamo_linears(tmp_path):
    from shira_runtime.onnx_backend import OnnxBackend

    cfg, cls, _ = ARCHS["llama"]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    backend = OnnxBackend.open(export_onnx(model, (X[:1],), tmp_path / "b"), gemm_a=True)
    assert backend.rewritten == 7 * cfg.num_hidden_layers + 1  # 7 projections a layer, and the LM head
    assert np.abs(backend(X.numpy()) - first(model(X))).max() < 1e-4


def test_diffusers_unet_exports_and_switches_a_peft_lora(tmp_path):
    """A diffusers UNet2DConditionModel: three inputs (image latents, timestep, text states), the channel
    dimension static and the batch dynamic; a PEFT LoRA on its attention projections switches like on torch."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    lora = peft.get_peft_model(
        copy.deepcopy(unet), peft.LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    lora.save_pretrained(str(tmp_path / "lora"))
    example = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 6, 32))
    bundle = Runtime.load(export_onnx(unet, example, tmp_path / "unet"))
    ref = Runtime.load(copy.deepcopy(unet))
    x = (torch.randn(2, 4, 8, 8), torch.tensor([5, 7]), torch.randn(2, 6, 32))
    fresh = first(bundle(*x))
    assert np.abs(fresh - first(ref(*x).sample)).max() < 1e-4
    for rt in (bundle, ref):
        rt.add_adapter("l", tmp_path / "lora")
        rt.switch("l")
    got = first(bundle(*x))
    assert np.abs(got - first(ref(*x).sample)).max() < 1e-4 and np.abs(got - fresh).max() > 1e-3
    bundle.switch(None)
    assert np.array_equal(first(bundle(*x)), fresh)


def test_a_tied_lm_head_reads_the_live_embedding(tmp_path):
    """Qwen2 with tied embeddings: an adapter on the LM head (the embedding's other name) changes the bundle's
    logits as it changes the torch model's; the graph holds no frozen copy of the embedding."""
    import onnx
    from shira_runtime.synthetic import random_shira

    cfg, cls, _ = ARCHS["qwen2"]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = export_onnx(model, (X[:1],), tmp_path / "bundle")
    graph = onnx.load(str(path / "model.onnx"))
    assert all(np.prod(list(t.dims)) < 128 * 64 for t in graph.graph.initializer)
    adapter = random_shira(model, ["lm_head"], 0.05, seed=3)
    assert list(adapter.indices) == ["lm_head.weight"]
    bundle, ref = Runtime.load(path), Runtime.load(copy.deepcopy(model))
    for rt in (bundle, ref):
        rt.add_adapter("head", adapter)
        rt.switch("head")
    got, want = first(bundle(X)), first(ref(X))
    assert np.abs(got - want).max() < 1e-4
