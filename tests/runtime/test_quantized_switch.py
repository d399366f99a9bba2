"""SHiRA adapters switched in place on quantized bases (INT8, FP8 E4M3/E5M2): codes on the base's grid, exact
revert after any number of switches and fusions (both kernel paths), saturation counted, atomic on failure,
fingerprint across the fp32/quantized copies, LoRA fused refused and unfused working, PEFT SHiRA on a
quantized transformers Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from shira_runtime import Runtime, kernels, quantize
from shira_runtime.adapters import CodesAdapter, load_adapter, save_adapter
from shira_runtime.errors import AdapterFormatError, AdapterMismatchError, AdapterValueError, BaseMismatchError
from shira_runtime.kernels import qformats
from shira_runtime.models import build
from shira_runtime.quantization import QuantLinear, bake
from shira_runtime.synthetic import random_lora, random_shira
from shira_runtime.torch_backend import TorchBackend
from torch import nn

FORMATS = ["int8", "fp8_e4m3", "fp8_e5m2"]
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(params=["cpp", "torch"])
def kernel_path(request, monkeypatch):
    """Each test once per kernel path (the C++ one skipped where it cannot be built)."""
    if request.param == "cpp":
        from shira_runtime.kernels import extension

        try:
            extension.load()
        except Exception as exc:
            pytest.skip(f"C++ extension unavailable: {exc}")
    monkeypatch.setenv("SHIRA_KERNELS", request.param)
    kernels.reset()
    yield request.param
    kernels.reset()


def raw(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view(torch.uint8) if t.element_size() == 1 else t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def snap(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: raw(v).clone() for k, v in module.state_dict().items()}


def assert_same(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert set(now) == set(before)
    for k, v in now.items():
        assert torch.equal(raw(v), before[k]), f"tensor {k} changed"


def setup(fmt: str, std: float = 0.02, seeds=(1, 2)):
    """fp32 tiny model, SHiRA adapters made on it, and its quantized copy under a Runtime."""
    fp32 = build("tiny", seed=0)
    adapters = [random_shira(fp32, TARGETS, density=0.05, seed=s, std=std) for s in seeds]
    model = quantize(copy.deepcopy(fp32), fmt)
    rt = Runtime.load(model)
    for k, a in enumerate(adapters):
        rt.add_adapter(f"a{k}", a)
    return fp32, model, rt, adapters


def oracle(base_codes: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor):
    """The grid's answer at ``idx``: ``encode(decode(base) + delta)`` with each row's scale, and the clamp count."""
    rows = idx.long() // base_codes.shape[1]
    old = base_codes.view(-1)[idx.long()]
    return qformats.encode(qformats.decode(old, scale[rows]) + delta, scale[rows], qformats.quant_format(base_codes))


@pytest.mark.parametrize("fmt", FORMATS)
def test_switch_writes_the_grid_and_reverts_exactly(kernel_path, fmt):
    _, model, rt, (a, _) = setup(fmt, std=0.05)  # large deltas: some saturate
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = snap(model)
    stats = rt.switch("a0")
    assert stats.kernels == kernel_path
    expected_sat = {}
    for name, idx in a.indices.items():
        w, scale = model.state_dict()[name], base[name.removesuffix("weight") + "weight_scale"]
        want, n_sat = oracle(base[name], scale, idx, a.values[name].float())
        assert torch.equal(raw(w).view(-1)[idx.long()], raw(want)), f"{name}: codes off the grid's answer"
        untouched = torch.ones(w.numel(), dtype=torch.bool)
        untouched[idx.long()] = False
        assert torch.equal(raw(w).view(-1)[untouched], raw(base[name]).view(-1)[untouched]), f"{name}: neighbours"
        if n_sat:
            expected_sat[name] = n_sat
    assert expected_sat and stats.saturated == expected_sat
    assert "codes saturated" in str(stats)
    rt.switch(None)
    assert_same(model, before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fusion_on_the_grid(kernel_path, fmt):
    _, model, rt, (a, b) = setup(fmt)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rt.switch(["a0", "a1"], weights=[1.0, -0.5])
    plan = rt._switcher.plan
    for name in a.indices:
        idx, total = plan.sparse[name]  # the fp32 sum of both adapters' deltas, as the switch computed it
        scale = base[name.removesuffix("weight") + "weight_scale"]
        want, _ = oracle(base[name], scale, idx, total)
        assert torch.equal(raw(model.state_dict()[name]).view(-1)[idx.long()], raw(want)), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_soak_then_base_bit_for_bit(kernel_path, fmt):
    """1000 random switches and fusions (two adapters overlapping the same tensors, random weights, the base),
    then the base byte for byte; along the way each state equals the same state reached from the base."""
    _, model, rt, _ = setup(fmt, std=0.03)
    before = snap(model)
    g = torch.Generator().manual_seed(0)
    states = [["a0"], ["a1"], ["a0", "a1"], None]
    reference_state = {}
    for step in range(1000):
        names = states[int(torch.randint(0, len(states), (1,), generator=g))]
        weights = None if names is None else [float(torch.randint(-2, 3, (1,), generator=g)) / 2 for _ in names]
        rt.switch(names, weights)
        key = (tuple(names or ()), tuple(weights or ()))
        if step % 97 == 0 or key not in reference_state:
            now = snap(model)
            if key in reference_state:
                for k, v in now.items():
                    assert torch.equal(v, reference_state[key][k]), f"step {step}: {key} drifted in {k}"
            reference_state[key] = now
    rt.switch(None)
    assert_same(model, before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_inference_after_switch_equals_a_fresh_quantized_model(kernel_path, fmt):
    """The switched model computes what a freshly built quantized model holding the same codes computes (the FP8
    compute copy followed the raw-pointer writes), at 1 token (bf16 GEMV path) and 5 tokens."""
    _, model, rt, (a, _) = setup(fmt)
    fresh = copy.deepcopy(model)
    ids1, ids5 = torch.randint(0, 256, (1, 1)), torch.randint(0, 256, (2, 5))
    rt(ids1), rt(ids5)  # the compute copy is in use before the switch
    rt.switch("a0")
    with torch.no_grad():
        for name, idx in a.indices.items():
            layer = fresh.get_submodule(name.removesuffix(".weight"))
            want, _ = oracle(layer.weight, layer.weight_scale, idx, a.values[name].float())
            codes = layer.weight.clone()
            codes.view(torch.uint8).view(-1)[idx.long()] = raw(want)
            fresh.get_submodule(name.removesuffix(".weight").rpartition(".")[0]).__setattr__(
                name.removesuffix(".weight").rpartition(".")[2], QuantLinear(codes, layer.weight_scale, layer.bias)
            )
        for ids in (ids1, ids5):
            assert torch.equal(rt(ids), fresh(ids)), f"{ids.shape}: inference differs from the fresh model"
    rt.switch(None)
    with torch.no_grad():
        assert torch.equal(rt(ids5), copy.deepcopy(model)(ids5))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_compute_copy_written_by_the_kernel(kernel_path, fmt, monkeypatch):
    """The switch hands each FP8 layer's bf16 compute copy to the kernel as the codes' mirror: no refresh runs
    (refresh_rows is made to fail), yet after every switch, fusion and revert the copy equals bf16(codes) and
    the forward uses it as it is."""
    _, model, rt, _ = setup(fmt)
    ids = torch.randint(0, 256, (1, 1))
    rt(ids)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]

    def no_refresh(self, rows=None):
        raise AssertionError("the compute copy was refreshed by torch ops")

    monkeypatch.setattr(QuantLinear, "refresh_rows", no_refresh)
    told, after_writes = [], TorchBackend.after_writes

    def spy(self, names, versions, mirrored, indices):
        told.extend(t in mirrored and t not in indices for t in names)
        after_writes(self, names, versions, mirrored, indices)

    monkeypatch.setattr(TorchBackend, "after_writes", spy)
    for target, w in (("a0", None), ("a1", None), (["a0", "a1"], [1.0, -0.5]), (None, None), ("a1", None)):
        rt.switch(target, weights=w)
        for layer in layers:
            assert layer._synced == layer.weight._version
            assert torch.equal(
                layer.weight_compute.view(torch.int16), layer.weight.to(torch.bfloat16).view(torch.int16)
            )
        rt(ids)  # the forward finds the copy in step: no refresh
    assert told and all(told)  # every layer written was told the kernel wrote its copy
    monkeypatch.undo()
    rt.switch(None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_only_layers_with_a_compute_copy_are_followed(kernel_path, fmt, monkeypatch):
    """``Backend.followed`` names the FP8 layers (a bf16 copy follows their codes) and no int8 one: a switch asks
    ``mirrors_of`` and ``after_writes`` about those alone (an int8 switch over 210 small linears took twice the
    time doing it for every layer), and the copies stay bf16(codes) through switches, fusion and the base."""
    _, model, rt, _ = setup(fmt)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    want = set() if fmt == "int8" else {f"{n}.weight" for n in layers}
    assert rt.backend.followed == want and want <= set(rt.backend.scales)
    asked: list[str] = []
    def spy(real):
        def hook(self, names, *a, **k):
            asked.extend(names)
            return real(self, names, *a, **k)

        return hook

    for name in ("mirrors_of", "after_writes"):
        monkeypatch.setattr(TorchBackend, name, spy(getattr(TorchBackend, name)))
    before = snap(model)
    for _ in range(2):  # the first makes (and keeps) the fused plan, which asks each tensor for its mirror order
        asked.clear()
        for target, w in (("a0", None), ("a1", None), (["a0", "a1"], [1.0, -0.5]), (None, None)):
            rt.switch(target, weights=w)
            for layer in layers.values():
                if fmt != "int8":
                    assert torch.equal(
                        layer.weight_compute.view(torch.int16), layer.weight.to(torch.bfloat16).view(torch.int16)
                    )
    written = {t for n in ("a0", "a1") for t in rt._get(n).sparse}
    assert set(asked) == want & written and (fmt == "int8") == (not asked)
    assert_same(model, before)


def test_fp8_mirrors_are_one_list_per_plan_until_a_copy_is_rebuilt(kernel_path):
    """The switcher hands the kernels the same Frozen list of FP8 compute copies at every switch of a plan (packed
    once, not per switch); when a layer rebuilds its copy (here: the copy dropped, so that the layer has none of the
    codes' shape), the list is made anew, and every copy stays bf16(codes) through it all."""
    from shira_runtime.kernels.core import Frozen

    _, model, rt, _ = setup("fp8_e4m3")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    sw = rt._switcher

    def in_step():
        for layer in layers:
            assert torch.equal(
                layer.weight_compute.view(torch.int16), layer.weight.to(torch.bfloat16).view(torch.int16)
            )

    rt.switch("a0")
    rt.switch("a1")
    lists = sw.lists(sw.state.plan)
    first = lists["mirrors"]
    now = [sw.backend.mirror(t) for t in lists["names"]]
    assert type(first) is Frozen and all(a is b for a, b in zip(first, now))
    rt.switch("a0")
    rt.switch("a1")
    assert lists["mirrors"] is first  # the same list: its rows were packed once
    in_step()
    layers[0].weight_compute = torch.empty(0, dtype=torch.bfloat16)  # no copy of the codes' shape: rebuilt after
    rt.switch("a0")
    rt.switch("a1")
    in_step()
    assert lists["mirrors"] is not first and any(a is not b for a, b in zip(lists["mirrors"], first))
    rt.switch(None)
    in_step()


def test_failure_mid_switch_restores(kernel_path, monkeypatch):
    """An exception after the kernel wrote (here: in the FP8 compute-copy refresh) leaves codes, compute copy and
    the active state as before the call."""
    _, model, rt, _ = setup("fp8_e4m3")
    rt.switch("a0")
    before, ids = snap(model), torch.randint(0, 256, (1, 1))
    y_before = rt(ids)

    def boom(self, *args):
        raise RuntimeError("injected")

    monkeypatch.setattr(TorchBackend, "after_writes", boom)
    with pytest.raises(RuntimeError, match="injected"):
        rt.switch(["a0", "a1"], [1.0, 0.5])
    assert_same(model, before)
    assert rt.active == (("a0", 1.0),)
    assert torch.equal(rt(ids), y_before)
    monkeypatch.undo()
    rt.switch(None)
    rt.switch("a1")  # still switchable


@pytest.mark.parametrize("fmt", FORMATS)
def test_fingerprint_accepts_the_quantized_copy_refuses_another_base(fmt):
    _, _, rt, _ = setup(fmt)  # the adapters (fingerprinted on the fp32 model) were accepted
    other = random_shira(build("tiny", seed=5), TARGETS, density=0.05, seed=1)
    with pytest.raises(BaseMismatchError, match=r"adapter 'o' was made for another base: tensor 'model\.layers"):
        rt.add_adapter("o", other)


def test_base_codes_off_the_grid_refused():
    fp32 = build("tiny", seed=0)
    a = random_shira(fp32, TARGETS, density=0.05, seed=1)
    model = quantize(copy.deepcopy(fp32), "int8")
    name = "model.layers.0.self_attn.q_proj.weight"
    model.state_dict()[name].view(-1)[int(a.indices[name][3])] = -128
    rt = Runtime.load(model)
    with pytest.raises(AdapterMismatchError, match=rf"tensor '{name}': the base code at index \d+ is not a point"):
        rt.add_adapter("a", a)


def test_bad_scales_refused_at_load():
    model = quantize(build("tiny", seed=0), "int8")
    model.model.layers[1].mlp.down_proj.weight_scale[3] = 0.0
    with pytest.raises(AdapterMismatchError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'.*finite and > 0"):
        Runtime.load(model)


def test_scales_are_not_switchable_tensors():
    rt = Runtime.load(quantize(build("tiny", seed=0), "int8"))
    assert not any(n.endswith("weight_scale") for n in rt.backend.tensors)
    assert set(rt.backend.scales) == {n for n, t in rt.backend.tensors.items() if t.dtype == torch.int8}


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_fused_refused_unfused_works(fmt):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    lora = random_lora(net, ["0", "2"], rank=4, seed=1, std=0.1)
    model = quantize(copy.deepcopy(net), fmt)
    rt = Runtime.load(model)
    with pytest.raises(AdapterMismatchError, match=r"tensor '0\.weight' is quantized .*mode='unfused'"):
        rt.add_adapter("fused", lora)
    rt.add_adapter("unfused", lora, mode="unfused")
    x = torch.randn(3, 16)
    before = snap(model)
    with torch.no_grad():  # by hand, before the switch hooks the layers
        h = model[0](x) + x @ lora.A["0.weight"].t() @ lora.B["0.weight"].t() * lora.scaling["0.weight"]
        h = torch.relu(h)
        want = model[2](h) + h @ lora.A["2.weight"].t() @ lora.B["2.weight"].t() * lora.scaling["2.weight"]
        base_out = model(x)
    rt.switch("unfused")
    torch.testing.assert_close(rt(x), want, rtol=1e-5, atol=1e-6)
    assert_same(model, before)  # unfused: no code written
    rt.switch(None)
    assert torch.equal(rt(x), base_out)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_peft_shira_on_a_quantized_transformers_llama(tmp_path, fmt):
    """A real PEFT SHiRA directory, made on the fp32 transformers Llama, switched on its quantized copy: each
    switched weight is within the grid's rounding of PEFT's merged fp32 weight (or saturated); the base comes
    back byte for byte."""
    pytest.importorskip("peft")
    from tests.runtime.test_peft_interop import LLAMA_TARGETS, make_peft_dir, shira_cfg, tiny_hf_llama

    base = tiny_hf_llama()
    merged = make_peft_dir(base, shira_cfg(LLAMA_TARGETS, 3), tmp_path / "shira", seed=1)
    model = quantize(copy.deepcopy(base), fmt)
    before = snap(model)
    rt = Runtime.load(model)
    rt.add_adapter("s", tmp_path / "shira")
    stats = rt.switch("s")
    merged_sd = merged.state_dict()
    changed = saturated = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        got, want = layer.dequantize_weight(), merged_sd[f"{name}.weight"]
        base_codes = before[f"{name}.weight"].view(layer.weight.dtype)
        # |Q(deq(base) + d) - (W + d)| <= half a step at the new code + half a step at the base code
        step = qformats.grid_half_step(layer.weight, layer.weight_scale)
        step += qformats.grid_half_step(base_codes, layer.weight_scale)
        top = qformats.fmt_max(fmt) * layer.weight_scale[:, None]
        inside, past = want.abs() <= top - step, want.abs() > top + step  # PEFT's init_weights=False: big deltas
        assert bool(((got - want).abs() <= step * 1.001)[inside].all()), f"{name}: off PEFT's merged weight"
        assert torch.equal(got[past], (torch.sign(want) * top.expand_as(want))[past]), f"{name}: not saturated"
        saturated += int(past.sum())
        changed += int((raw(layer.weight) != before[f"{name}.weight"]).sum())
    assert changed > 0 and sum(stats.saturated.values()) >= saturated
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert rt(ids).logits.shape == (2, 6, 128)
    rt.switch(None)
    assert_same(model, before)


# ---- adapters of codes (baked for one quantized base) ----------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_baked_codes_switch_like_the_deltas(kernel_path, fmt, tmp_path):
    """bake() gives the codes the delta switch writes, bit for bit; its file round-trips; switching it is a byte
    swap (no saturation to count) and reverts exactly."""
    fp32, model, rt, (a, _) = setup(fmt, std=0.05)
    before = snap(model)
    baked = bake(a, model)
    assert 0 < baked.nnz <= a.nnz
    path = save_adapter(baked, tmp_path / "a.codes.safetensors")
    loaded = load_adapter(path)
    assert isinstance(loaded, CodesAdapter) and loaded.nnz == baked.nnz
    rt.switch("a0")
    by_deltas = snap(model)
    rt.switch(None)
    rt.add_adapter("c", path)
    stats = rt.switch("c")
    assert stats.saturated == {}
    now = snap(model)
    for k in now:
        assert torch.equal(now[k], by_deltas[k]), f"{k}: baked codes differ from the delta switch"
    rt.switch("a1")
    rt.switch("c")
    rt.switch(None)
    assert_same(model, before)
    with pytest.raises(AdapterValueError, match=r"adapter 'c' holds codes baked for weight 1\.0 alone"):
        rt.switch(["c", "a1"])
    with pytest.raises(AdapterValueError, match=r"adapter 'c' holds codes baked"):
        rt.switch("c", weights=0.5)
    assert_same(model, before)


def test_codes_refused_on_another_quantized_base(tmp_path):
    fp32 = build("tiny", seed=0)
    a = random_shira(fp32, TARGETS, density=0.05, seed=1)
    path = save_adapter(bake(a, quantize(copy.deepcopy(fp32), "int8")), tmp_path / "c.safetensors")
    name = r"model\.layers\.0\.mlp\.down_proj\.weight"  # the first tensor of the file (sorted)
    cases = {
        "format": (quantize(copy.deepcopy(fp32), "fp8_e4m3"), rf"tensor '{name}': baked for int8 codes, this base"),
        "weights": (quantize(build("tiny", seed=7), "int8"), rf"tensor '{name}': baked for another quantized base"),
        "float": (copy.deepcopy(fp32), rf"tensor '{name}': an adapter of codes needs a quantized weight"),
    }
    scaled = quantize(copy.deepcopy(fp32), "int8")
    scaled.model.layers[0].self_attn.q_proj.weight_scale.mul_(1.5)  # same codes, other scales
    cases["scales"] = (scaled, r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight': baked for another quantized")
    for model, message in cases.values():
        rt, before = Runtime.load(model), snap(model)
        with pytest.raises(AdapterMismatchError, match=message):
            rt.add_adapter("c", path)
        assert_same(model, before)


def test_codes_file_bytes_per_entry_at_one_percent(tmp_path):
    """llama-1b shapes (one q_proj 2048x2048 and one down_proj 2048x8192), 1% random: <= 2.5 bytes per stored
    entry (gaps ~1 B + code 1 B), and per nonzero of the delta adapter it was baked from."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2048, 2048, bias=False), nn.Linear(8192, 2048, bias=False))
    a = random_shira(net, ["0", "1"], density=0.01, seed=1, std=0.02)
    baked = bake(a, quantize(net, "int8"))
    path = save_adapter(baked, tmp_path / "c.safetensors")
    size = path.stat().st_size
    assert size / baked.nnz <= 2.5, f"{size / baked.nnz:.2f} bytes per stored entry"
    assert size / a.nnz <= 2.5, f"{size / a.nnz:.2f} bytes per nonzero"


def test_codes_file_corruption_refused(tmp_path):
    fp32 = build("tiny", seed=0)
    a = random_shira(fp32, TARGETS, density=0.05, seed=1)
    path = save_adapter(bake(a, quantize(copy.deepcopy(fp32), "int8")), tmp_path / "c.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFormatError, match=r"is corrupted \(checksum"):
        load_adapter(path)


def _fp8_backends():
    """Two identical FP8 models under torch backends, and their followed names in a fixed order."""
    fp32 = build("tiny", seed=0)
    models = [quantize(copy.deepcopy(fp32), "fp8_e4m3") for _ in range(2)]
    backends = [TorchBackend(m) for m in models]
    names = tuple(sorted(backends[0].followed))
    return models, backends, names


def _layer(backend: TorchBackend, name: str) -> QuantLinear:
    return backend.quantized[name]


def test_torch_mirrors_of_agrees_with_the_generic_one():
    """``TorchBackend.mirrors_of`` (a kept tuple checked by identity) returns what ``Backend.mirrors_of`` (each
    ``mirror`` asked) does: the kept tuple itself while every copy is the same, a new one when a copy was replaced,
    made where there was none, or dropped; a copy of another shape than the codes is no mirror."""
    from shira_runtime.backend import Backend

    _, (be, _), names = _fp8_backends()
    names = (*names, "not.a.quantized.weight")  # a plain tensor's entry: no mirror
    generic = Backend.mirrors_of

    def both(kept):
        fast, slow = be.mirrors_of(names, kept), generic(be, names, kept)
        assert len(fast) == len(slow) == len(names)
        assert all(a is b for a, b in zip(fast, slow))
        assert (fast is kept) == (slow is kept)
        return fast

    first = both(None)
    assert first[-1] is be.no_mirror and all(m is not be.no_mirror for m in first[:-1])
    assert both(first) is first
    a, b, c = (_layer(be, t) for t in names[:3])
    a.weight_compute = a.weight_compute.clone()  # replaced, same shape
    second = both(first)
    assert second is not first and second[0] is a.weight_compute
    assert both(second) is second
    b.weight_compute = torch.empty(0, dtype=torch.bfloat16)  # another shape: no mirror (refresh_at rebuilds it)
    third = both(second)
    assert third[1] is be.no_mirror
    assert both(third) is third  # still of another shape: no change
    b.weight_compute = b.weight.to(torch.bfloat16)  # made again
    assert both(third)[1] is b.weight_compute
    del c.weight_compute  # no copy at all
    fourth = both(None)
    assert fourth[2] is be.no_mirror and both(fourth) is fourth


def test_torch_after_writes_agrees_with_the_generic_one():
    """``TorchBackend.after_writes`` (a layer in step and mirrored: only its version noted) leaves every layer as
    ``Backend.after_writes`` (``after_write`` per layer) does, whether in step or stale before the write, mirrored
    or told by index: each copy bf16(codes) and in step after."""
    from shira_runtime.backend import Backend

    models, backends, names = _fp8_backends()
    mirrored = frozenset(names[::2])  # the others told by index
    indices = {t: [torch.arange(k, k + 3)] for k, t in enumerate(names) if t not in mirrored}
    versions = []
    for be in backends:  # the same on both
        layers = [_layer(be, t) for t in names]
        for layer in layers:
            layer.refresh_rows()  # in step
        layers[0].weight.view(torch.uint8).view(-1)[100] = 0x22  # codes written by torch ops: its copy stale
        versions.append([layer.weight._version for layer in layers])  # just before the kernels' write
        for k, layer in enumerate(layers):  # the write: codes, and the mirrored ones' copies at the same places
            layer.weight.view(torch.uint8).view(-1)[k : k + 3] = torch.tensor([0x30, 0x31, 0x32], dtype=torch.uint8)
            if names[k] in mirrored:
                at = slice(k, k + 3)
                layer.weight_compute.view(-1)[at] = layer.weight.view(-1)[at].to(torch.bfloat16)
    backends[0].after_writes(names, versions[0], mirrored, indices)
    Backend.after_writes(backends[1], names, versions[1], mirrored, indices)
    for t in names:
        fast, slow = _layer(backends[0], t), _layer(backends[1], t)
        assert fast._synced == fast.weight._version and slow._synced == slow.weight._version
        assert torch.equal(fast.weight_compute.view(torch.int16), slow.weight_compute.view(torch.int16))
        assert torch.equal(fast.weight_compute.view(torch.int16), fast.weight.to(torch.bfloat16).view(torch.int16))
