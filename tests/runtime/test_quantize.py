"""Quantized bases: the INT8/FP8 grids (shira_runtime.kernels.qformats) and quantize()/QuantLinear
(shira_runtime.quantization)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from shira_runtime import quantization as quantize_mod  # noqa: E402
from shira_runtime import quantize
from shira_runtime.kernels.qformats import (
    FORMATS,
    SIMULATED,
    channel_scales,
    choose_format,
    decode,
    encode,
    fake_quant,
    fmt_max,
    quant_format,
    round_to_grid,
    sqnr_db,
)
from shira_runtime.models import build
from shira_runtime.quantization import INT8MM_MAX_TOKENS, QuantLinear, lm_heads, quantize_weight, quantized_formats
from torch import nn

from tests.conftest import assert_bit_identical, snapshot

STORED = ("int8", "fp8_e4m3", "fp8_e5m2")
GRID = ("int8", "fp8_e4m3", "fp8_e5m2", "e3m4", "e2m5")


def half_step(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Half the grid step at |x| (x divided by the scale), from the format's definition, in float64."""
    f = quant_format(fmt)
    if f.is_int:
        return torch.full_like(x, 0.5, dtype=torch.float64)
    a = x.double().abs().clamp(min=1e-300)
    binade = torch.clamp(torch.floor(torch.log2(a)), min=1 - f.bias)
    return 0.5 * torch.exp2(binade - f.man_bits)


@pytest.mark.parametrize("fmt", GRID)
def test_round_trip_within_half_a_grid_step(fmt):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=gen) * torch.logspace(-6, 1, 64).unsqueeze(1)  # rows of very different size
    w[3, 5] = 0.0
    s = channel_scales(w, fmt)
    codes, saturated = encode(w, s, fmt)
    assert saturated == 0
    back = decode(codes, s)
    x = w.double() / s.double()[:, None]
    err = (back.double() - w.double()).abs() / s.double()[:, None]
    # the bound, plus the fp32 rounding of the division and of decode's multiply
    assert bool((err <= half_step(x, fmt) + 1e-6 * x.abs() + 1e-30).all())
    if FORMATS.get(fmt):
        assert codes.dtype == FORMATS[fmt].dtype and codes.element_size() == 1


@pytest.mark.parametrize(
    "fmt,values,expected,saturated",
    [
        # ties to even; 127.5 rounds to 128 on the unbounded grid: saturated (so are 200 and -300)
        ("int8", [0.5, 1.5, 2.5, -2.5, 126.5, 127.4, 127.5, 200.0, -300.0], [0, 2, 2, -2, 126, 127, 127, 127, -127], 3),
        # 1.0625 ties between 1 and 1.125 (even mantissa: 1); 2**-10 ties between 0 and 2**-9 (-> 0); 1.5*2**-9
        # ties between 2**-9 and 2**-8 (-> 2**-8); 464 ties between 448 and 480 (-> 448, not saturated)
        (
            "fp8_e4m3",
            [1.0625, 1.1875, 2**-10, 1.5 * 2**-9, 448.0, 464.0, 465.0, -1000.0],
            [1.0, 1.25, 0.0, 2**-8, 448.0, 448.0, 448.0, -448.0],
            2,
        ),
        # 1.125 ties between 1 and 1.25 (-> 1); 1.375 between 1.25 and 1.5 (-> 1.5); 2**-17 between 0 and the
        # smallest subnormal 2**-16 (-> 0); 61440 ties between 57344 and 65536 (-> 65536: saturated)
        (
            "fp8_e5m2",
            [1.125, 1.375, 2**-17, 3 * 2**-17, 61439.0, 61440.0, -1e6],
            [1.0, 1.5, 0.0, 2**-15, 57344.0, 57344.0, -57344.0],
            2,
        ),
        # simulated E3M4 (bias 3, max 31): 1.03125 ties between 1 and 1.0625 (-> 1); 2**-7 ties between 0 and
        # the smallest subnormal 2**-6 (-> 0); 31.5 ties between 31 (odd) and 32 (-> 32: saturated)
        ("e3m4", [1.03125, 1.09375, 2**-7, 31.0, 31.5, 40.0], [1.0, 1.125, 0.0, 31.0, 31.0, 31.0], 2),
    ],
)
def test_codes_are_the_nearest_grid_point(fmt, values, expected, saturated):
    codes, n_sat = encode(torch.tensor(values), torch.tensor(1.0), fmt)
    assert codes.float().tolist() == expected
    assert n_sat == saturated


@pytest.mark.parametrize("fmt,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_torch_fp8_cast_rounds_to_nearest_even_like_our_grid(fmt, dtype):
    """In range, torch's cast and our grid agree, ties included; the simulated twin is the same grid."""
    m = fmt_max(fmt)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(200_000, generator=gen) * 2 - 1) * m * torch.exp2(-torch.rand(200_000, generator=gen) * 24)
    grid = torch.unique(torch.arange(256, dtype=torch.uint8).view(dtype).float())
    grid = grid[torch.isfinite(grid)].sort().values
    ties = ((grid[1:] + grid[:-1]) / 2)[grid[1:] <= m]  # midpoints, all exact in fp32
    x = torch.cat([x, ties, -ties])
    codes, _ = encode(x, torch.tensor(1.0), fmt)
    assert torch.equal(x.to(dtype).float(), codes.float())
    assert torch.equal(round_to_grid(x, SIMULATED[fmt.removeprefix("fp8_")]), codes.float())


def test_per_channel_scales_and_zero_rows():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 1.0, -600.0]])
    for fmt in STORED:
        codes, s = quantize_weight(w, fmt)
        assert s.tolist() == pytest.approx([2.0 / fmt_max(fmt), 1.0, 600.0 / fmt_max(fmt)], rel=1e-7)
        assert codes[1].float().abs().sum() == 0
        assert codes[0].float().abs().max() == fmt_max(fmt) == codes[2].float().abs().max()


def test_auto_picks_int8_for_gaussian_and_fp8_for_heavy_outliers():
    gen = torch.Generator().manual_seed(3)
    gauss = torch.randn(256, 512, generator=gen) * 0.02
    outliers = gauss.clone()
    hit = torch.rand(outliers.shape, generator=gen) < 1e-3
    outliers[hit] = 0.02 * 50 * torch.sign(torch.randn(int(hit.sum()), generator=gen))
    for w, want in ((gauss, "int8"), (outliers, "fp8_e4m3")):
        db = {f: sqnr_db(w, fake_quant(w, f)) for f in STORED}
        assert max(db, key=db.get) == want, db
        assert choose_format(w) == want
    model = nn.Sequential(nn.Linear(512, 256, bias=False), nn.Linear(512, 256, bias=False))
    model[0].weight.data, model[1].weight.data = gauss, outliers
    quantize(model, "auto")
    assert quantized_formats(model) == {"0.weight": "int8", "1.weight": "fp8_e4m3"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantize_is_all_or_nothing_on_nan_inf(bad):
    model = build("tiny")
    model.model.layers[1].mlp.down_proj.weight.data[7, 3] = bad
    snap = snapshot(model)
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight: 1 of .* NaN/Inf"):
        quantize(model, "int8")
    assert_bit_identical(model, snap)
    assert [type(m) for m in model.modules()] == kinds


def test_bad_format_and_no_targets_are_clear_errors():
    model = build("tiny")
    with pytest.raises(ValueError, match=r"unknown quantization format 'int4'.*'int8', 'fp8_e4m3', 'fp8_e5m2', 'auto'"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match=r"no nn.Linear in the module matches targets \['nope'\]"):
        quantize(model, "int8", targets=["nope"])
    with pytest.raises(ValueError, match=r"lm_head.weight is shared with \['model.embed_tokens.weight'\] \(tied\)"):
        quantize(model, "int8", targets=["lm_head"])
    with pytest.raises(ValueError, match=r"encode to int8: values hold NaN/Inf"):
        encode(torch.tensor([1.0, float("nan")]), torch.tensor(1.0), "int8")
    with pytest.raises(ValueError, match=r"unknown quantization format 'e9m9'"):
        quant_format("e9m9")
    assert all(isinstance(m, nn.Linear) for m in model.modules() if "proj" in type(m).__name__.lower())


def _grid_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantized model whose QuantLinears are fp32 nn.Linears holding the dequantized grid."""
    import copy

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize_weight()
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, leaf, lin)
    return twin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


BF16_REL = 2.0**-8


@pytest.fixture(params=[False, True], ids=["fp32-gemm", "bf16-gemm"])
def bf16_gemm(request, monkeypatch):
    """Both CPU classes' paths on any machine: without and with a native bf16 GEMM (``quantize.BF16_GEMM``)."""
    monkeypatch.setattr(quantize_mod, "BF16_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("fmt", STORED)
@pytest.mark.parametrize("seq", [1, INT8MM_MAX_TOKENS + 8])  # one token (decode), a prefill
def test_quantized_tiny_forward_is_close(fmt, seq, bf16_gemm):
    ref = build("tiny", seed=2)
    model = quantize(build("tiny", seed=2), fmt)
    assert set(quantized_formats(model).values()) == {fmt}
    ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y, y_grid, y_ref = model(ids), _grid_twin(model)(ids), ref(ids)
    assert _rel(y, y_grid) < 4 * BF16_REL  # the same grid: only the kernels' activation rounding differs
    # against the fp32 model: a few times the grid's own weight error (14 linears compound it)
    assert _rel(y, y_ref) < 4 * _weight_error(model, ref)


def _weight_error(model: nn.Module, ref: nn.Module) -> float:
    """The largest relative weight error ``|W_grid - W| / |W|`` of the quantized model's linears."""
    w = dict(ref.named_modules())
    return max(
        float((q.dequantize_weight() - w[n].weight.detach()).norm() / w[n].weight.detach().norm())
        for n, q in model.named_modules()
        if isinstance(q, QuantLinear)
    )


def test_quantized_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
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
    ref = transformers.LlamaForCausalLM(cfg).eval()
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(ref.state_dict())
    names = set(ref.state_dict())
    head = model.lm_head.weight.detach().clone()
    assert lm_heads(model) == {"lm_head"}
    quantize(model, "int8")
    after = model.state_dict()
    assert names <= set(after) and {k for k in after if k not in names} == {
        k.removesuffix(".weight") + ".weight_scale" for k in quantized_formats(model)
    }
    assert len(quantized_formats(model)) == 14 and type(model.lm_head) is nn.Linear
    assert torch.equal(model.lm_head.weight, head)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y, y_ref = model(ids).logits, ref(ids).logits
    assert _rel(y, y_ref) < 4 * _weight_error(model, ref)


def test_lm_head_untouched_by_default_and_names_kept():
    model = build("tiny")
    names = list(model.state_dict())
    quantize(model, "fp8_e4m3")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    after = list(model.state_dict())
    assert [k for k in after if not k.endswith(".weight_scale")] == names
    q = model.model.layers[0].mlp.down_proj
    assert model.state_dict()["model.layers.0.mlp.down_proj.weight"].data_ptr() == q.weight.data_ptr()
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.is_contiguous()
    assert "weight_compute" not in "".join(after)


@pytest.mark.parametrize("fmt", STORED)
@pytest.mark.parametrize("in_f", [64, 36])  # 36: not a multiple of 8, int8 takes the dequantize path
def test_every_forward_path_matches_the_grid(fmt, in_f, bf16_gemm):
    gen = torch.Generator().manual_seed(4)
    lin = nn.Linear(in_f, 48, bias=True)
    q = QuantLinear.from_linear(lin, fmt)
    w = q.dequantize_weight()
    edge = quantize_mod.int8mm_max_tokens()
    assert edge == (quantize_mod.INT8MM_MAX_TOKENS_BF16 if bf16_gemm else INT8MM_MAX_TOKENS)
    for tokens in (0, 1, 3, edge, edge + 1, INT8MM_MAX_TOKENS + 1):
        x = torch.randn(2, tokens, in_f, generator=gen) if tokens else torch.randn(0, in_f)
        with torch.inference_mode():
            y = q(x)
        want = F.linear(x, w, lin.bias)
        assert y.shape == want.shape and y.dtype == x.dtype
        if tokens:
            assert _rel(y, want) < 4 * BF16_REL, (fmt, tokens)
    assert q(torch.randn(5, in_f, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_compute_copy_follows_the_codes():
    q = QuantLinear.from_linear(nn.Linear(32, 16, bias=False), "fp8_e5m2")
    x = torch.randn(1, 32)
    with torch.inference_mode():  # a torch write moves the version counter: the next forward refreshes
        q.weight[2] = torch.full((32,), 0.5).to(torch.float8_e5m2)
        assert _rel(q(x), F.linear(x, q.dequantize_weight())) < 4 * BF16_REL
    assert torch.equal(q.weight_compute.float(), q.weight.float())
    raw = q.weight.view(torch.uint8).numpy()  # a write behind torch's back: refresh_rows is the contract
    raw[5, :] = torch.tensor(1.0).to(torch.float8_e5m2).view(torch.uint8).item()
    assert not torch.equal(q.weight_compute.float(), q.weight.float())
    q.refresh_rows(torch.tensor([5]))
    assert torch.equal(q.weight_compute.float(), q.weight.float())
    with torch.inference_mode():
        assert _rel(q(x), F.linear(x, q.dequantize_weight())) < 4 * BF16_REL


def test_decode_encode_round_trip_is_exact():
    for fmt in STORED:
        w = torch.randn(40, 24) * 3
        codes, s = quantize_weight(w, fmt)
        again, sat = encode(decode(codes, s), s, fmt)
        assert sat == 0 and torch.equal(again.view(torch.uint8), codes.view(torch.uint8)), fmt
        flat = torch.randint(0, w.numel(), (50,))
        rows = flat // w.shape[1]
        vals = decode(codes.flatten()[flat], s[rows])  # the switch's form: one scale per touched value
        assert torch.equal(vals, decode(codes, s).flatten()[flat])


def test_benchmark_quick_runs(tmp_path, capsys):
    from benchmarks.quant_formats import DISTS, main

    out = tmp_path / "q.json"
    assert main(["--quick", "--repeats", "1", "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    doc = json.loads(out.read_text())
    assert [r["dist"] for r in doc["formats"]] == list(DISTS)
    gauss = doc["formats"][0]
    assert gauss["auto"] == "int8" and gauss["sqnr_db"]["int8"] > gauss["sqnr_db"]["fp8_e5m2"] + 10
    assert doc["formats"][-1]["auto"] == "fp8_e4m3"
    paths = {r["path"] for r in doc["speed"]}
    assert {"fp32 base", "bf16 base", "QuantLinear int8", "QuantLinear fp8_e4m3"} <= paths
    assert all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in doc["speed"])
    printed = capsys.readouterr().out
    assert "SQNR (dB)" in printed and ("plot written" in printed or "matplotlib is not installed" in printed)


@pytest.mark.parametrize("value, want", [("1", True), ("0", False)])
def test_bf16_probe_can_be_overridden(monkeypatch, value, want):
    monkeypatch.setenv("SHIRA_QUANT_BF16", value)
    assert quantize_mod.native_bf16() is want
    monkeypatch.delenv("SHIRA_QUANT_BF16")
    assert isinstance(quantize_mod.native_bf16(), bool)  # the CPU probe, whatever this machine has
