"""benchmarks.quant_survival runs end to end (--quick) and its PEFT-way LoRA baseline behaves as PEFT's does."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from shira_runtime.models import TARGETS, build
from shira_runtime.quantization import quantize, quantize_weight
from shira_runtime.synthetic import random_lora

from benchmarks.baselines import RequantLora, bytes_changed, code_bytes, requantize_fast
from benchmarks.quant_survival import main


def test_quick_run_measures_every_format(tmp_path, capsys):
    out = tmp_path / "q.json"
    main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["formats"]) == {"int8", "fp8_e4m3", "fp8_e5m2"}
    assert data["delta_std"] > 0 and data["weight_std"] > 0
    for res in data["formats"].values():
        s = res["shira"]
        assert s["touched"] == sum(r["touched"] for r in res["tensors"]) > 0
        assert 0.0 <= s["codes_unchanged"] < 1.0
        # the switched weights are closer to W + delta than a random guess, and the base's own error is there
        assert 0.0 < s["rel_rms_tensor"] < 0.2 and s["base_rel_rms_tensor"] > 0
        L = res["logits"]
        assert L["adapted_max"] >= L["adapted_mean"] > 0 and L["base_max"] > 0
        fused = res["lora_fused"]
        # the PEFT way rewrites most bytes and never comes back; SHiRA changes few and reverts bit for bit
        assert fused["lora_bytes_changed"] > 0.5 > fused["shira_bytes_changed"] > 0
        assert fused["lora_drift_bytes"] > 0 and fused["shira_drift_bytes"] == 0 and fused["shira_drift_max_err"] == 0
        assert fused["lora_switch_ms"] > 0 and fused["shira_switch_ms"] > 0
        assert res["lora_unfused"]["overhead"] > 0
    # int8 keeps more of the delta than e5m2 (finer grid near a Gaussian weight's values)
    f = data["formats"]
    assert f["int8"]["shira"]["delta_error_rel"] < f["fp8_e5m2"]["shira"]["delta_error_rel"]
    printed = capsys.readouterr().out
    assert "SHiRA on the grid, summed over tensors" in printed and "lora fused (requant)" in printed
    assert "measured in" in printed


def test_requant_lora_merges_on_new_scales_and_drifts():
    model = build("tiny", torch.float32, seed=0)
    la = random_lora(model, TARGETS, 4, seed=1)
    q = quantize(copy.deepcopy(model), "int8")
    names = list(la.A)
    req = RequantLora(q, names)
    before = code_bytes(q)
    req.merge(la)
    layer = q.get_submodule(names[0].removesuffix(".weight"))
    expect = model.get_submodule(names[0].removesuffix(".weight")).weight.detach() + la.scaling[names[0]] * (
        la.B[names[0]] @ la.A[names[0]]
    )
    # within half a step of the new per-row grid (plus the base's own rounding, which the merge started from)
    step = layer.weight_scale[:, None]
    assert bool(((layer.dequantize_weight() - expect).abs() <= step * 1.01).all())
    req.merge(la, -1.0)
    changed, total = bytes_changed(before, q)
    assert 0 < changed < total  # unmerge does not give the base back


def test_requant_lora_names_the_tensor_that_is_not_quantized():

    model = build("tiny", torch.float32, seed=0)
    q = quantize(copy.deepcopy(model), "int8", targets=["q_proj"])
    with pytest.raises(ValueError, match="v_proj.weight.*not QuantLinear"):
        RequantLora(q, ["model.layers.0.self_attn.v_proj.weight"])


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_fast_requantize_is_quantize_weight_bit_for_bit(fmt):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen) * torch.rand(64, 1, generator=gen)
    w[3] = 0.0  # an all-zero row: scale 1
    w[5, :4] = torch.tensor([0.5, -0.5, 1.5, -2.5]) * w[5].abs().max() / 127  # int8 ties
    codes, scale = requantize_fast(w, fmt)
    ref_codes, ref_scale = quantize_weight(w, fmt)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
