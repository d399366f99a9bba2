"""Int8 bases in bundles (``shira_runtime.exporters.quant_graph``): the codes and scales are live graph inputs; a
switch on the
bundle writes exactly the bytes the torch backend's quantized model gets; outputs agree with it within the 8-bit
activation quantization; exact revert; a PEFT SHiRA adapter on a quantized transformers Llama generates the
torch runtime's tokens; fp8 bases and malformed quant entries are refused."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from shira_runtime import Runtime, quantize
from shira_runtime.bundle import BundleError
from shira_runtime.exporters import ExportError, export_onnx
from shira_runtime.manifest import Manifest
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_lora, random_shira

from tests.conftest import as_torch
from tests.runtime.test_quantized_switch import kernel_path  # noqa: F401 (the fixture: both kernel paths)

IDS = torch.randint(1, 256, (2, 8), generator=torch.Generator().manual_seed(3))


def raw(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A weight's bytes-exact torch view (int8 codes as uint8); a bundle's numpy weights share their memory."""
    t = as_torch(t)
    return t.view(torch.uint8) if t.dtype == torch.int8 else t


def codes_of(rt, name: str) -> torch.Tensor:
    """The bytes of weight ``name``'s int8 codes ``[out, in]`` as a bundle holds them now: an int8 weight lives as its
    transposed uint8 copy (code + 128, the graph's input), so its codes are ``(copy ^ 0x80).T``."""
    t = as_torch(rt.backend.tensors[name])
    return (t ^ 0x80).t() if t.dtype == torch.uint8 else raw(t)


def assert_same_codes(rt, tr) -> None:
    """Every weight of bundle runtime ``rt`` holds the bytes of the torch runtime ``tr``'s."""
    for n in rt.backend.tensors:
        assert torch.equal(codes_of(rt, n), raw(tr.backend.tensors[n])), n


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    model = build("tiny", torch.float32)
    adapters = {f"a{s}": random_shira(model, TARGETS, density=0.02, seed=s) for s in (1, 2)}
    qmodel = quantize(copy.deepcopy(model), "int8")
    bundle = export_onnx(qmodel, (IDS,), tmp_path_factory.mktemp("q") / "bundle")
    return qmodel, bundle, adapters


@pytest.fixture(scope="module")
def u8t_bundle(pair, tmp_path_factory):
    """The int8 bundle as the exporter wrote it before the copy was stored (form ``u8t16``): int8 codes in the file,
    and a ``u8t`` graph input the runtime builds from them at load."""
    import shira_runtime.exporters.onnx_export as onnx_export
    from shira_runtime.exporters.quant_graph import rewrite_int8

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "rewrite_int8", lambda m, q: rewrite_int8(m, q, form="u8t16"))
        return export_onnx(pair[0], (IDS,), tmp_path_factory.mktemp("u8t") / "bundle")


def test_the_manifest_states_the_lowest_version_that_describes_it(pair, u8t_bundle, tmp_path):
    """A bundle storing uint8 copies says format version 3 (a runtime that reads only 2 refuses it by its version,
    not by a layout it does not know); the u8t16 form, which stores codes, says 2; version-2 bundles holding copies
    (written before the bump) still load; a version from a newer exporter is refused as such."""
    from shira_runtime.bundle import MANIFEST_FILE

    assert json.loads((pair[1] / MANIFEST_FILE).read_text())["version"] == 3
    assert json.loads((u8t_bundle / MANIFEST_FILE).read_text())["version"] == 2
    for version, error in ((2, None), (4, "newer exporter.*upgrade shira-runtime"), (1, "re-export"),
                           (2.0, "re-export"), (True, "re-export")):  # fmt: skip
        b = tmp_path / f"v{version!r}"
        shutil.copytree(pair[1], b)
        body = json.loads((b / MANIFEST_FILE).read_text()) | {"version": version}
        (b / MANIFEST_FILE).write_text(json.dumps(Manifest.seal(body)))
        if error is None:
            assert Runtime.load(b).backend.tensors  # a version-2 manifest with uint8 copies: read as it is
        else:
            with pytest.raises(BundleError, match=error):
                Runtime.load(b)


def test_manifest_holds_the_copy_and_scales(pair):
    """The bundle stores each int8 weight as the transposed zero-point-128 copy the graph reads (uint8 ``[in,
    out]``, layout ``transposed``), mapped from the file like every weight: nothing is built at load."""
    qmodel, bundle, _ = pair
    m = Manifest.read(bundle)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert m.parameters[key] == {
        "onnx": key,
        "layout": "transposed",
        "shape": list(qmodel.state_dict()[key].shape),
        "dtype": "uint8",
        "quant": {"format": "int8", "scale": "model.layers.0.self_attn.q_proj.weight_scale"},
    }
    assert m.mirrors() == {}
    rt = Runtime.load(bundle)
    assert torch.equal(as_torch(rt.backend.tensors[key]), (raw(qmodel.state_dict()[key]) ^ 0x80).t())
    assert rt.backend.tensors[key] is rt.backend.arrays[key] and key in rt.backend.transposed
    assert rt.backend.mapped and rt.backend.u8t == {}
    assert set(rt.backend.scales) == {n for n, b in qmodel.state_dict().items() if b.dtype == torch.int8}
    assert torch.equal(codes_of(rt, key), raw(qmodel.state_dict()[key]))
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in rt.backend.aliases  # fixed grid, not switchable


def test_a_bundle_of_the_u8t_form_holds_codes_and_builds_the_copy(pair, u8t_bundle):
    """Bundles exported before the copy was stored: int8 codes with a ``u8t`` entry; the runtime builds the copy
    at load, binds it, and switches it (the codes, read by no node, stay as the file has them)."""
    qmodel, _, _ = pair
    m = Manifest.read(u8t_bundle)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert m.parameters[key]["dtype"] == "int8"
    assert m.parameters[key]["quant"] == {
        "format": "int8",
        "scale": "model.layers.0.self_attn.q_proj.weight_scale",
        "u8t": f"{key}::u8t",
    }
    rt = Runtime.load(u8t_bundle)
    assert torch.equal(as_torch(rt.backend.tensors[key]), (raw(qmodel.state_dict()[key]) ^ 0x80).t())
    assert rt.backend.tensors[key] is rt.backend.arrays[f"{key}::u8t"] and key in rt.backend.transposed
    assert set(rt.backend.scales) == set(rt.backend.u8t)
    assert torch.equal(codes_of(rt, key), raw(qmodel.state_dict()[key]))
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in rt.backend.aliases  # fixed grid, not switchable


def test_switch_on_the_bundle_writes_the_torch_backends_bytes(pair):
    qmodel, bundle, adapters = pair
    rt, tr = Runtime.load(bundle), Runtime.load(copy.deepcopy(qmodel))
    for r in (rt, tr):
        for n, a in adapters.items():
            r.add_adapter(n, a)
    base = {n: raw(t).clone() for n, t in rt.backend.tensors.items()}
    y_base = rt(IDS.numpy())
    for target in ("a1", "a2", ["a1", "a2"], "a1"):
        w = [1.0, 0.5] if isinstance(target, list) else None
        s_bundle, s_torch = rt.switch(target, weights=w), tr.switch(target, weights=w)
        assert s_bundle.saturated == s_torch.saturated
        assert_same_codes(rt, tr)
        got, want = rt(IDS.numpy()), tr(IDS).numpy()
        assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()  # 8-bit activations, per token
        assert not np.array_equal(got, y_base)  # the live session saw the switch
    rt.switch(None)
    assert all(torch.equal(raw(rt.backend.tensors[n]), b) for n, b in base.items())
    assert np.array_equal(rt(IDS.numpy()), y_base)


def fail_once(real):
    """``real`` raising RuntimeError("injected") at its first call only: a fault in a switch after the kernels wrote,
    the rollback's own call going through."""
    calls = []

    def method(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(self, *args)

    return method


@pytest.mark.usefixtures("kernel_path")
@pytest.mark.parametrize("form", ["stored", "u8t"])
def test_the_graphs_transposed_copy_is_the_switched_storage(request, pair, form, monkeypatch):
    """Both kernel paths switch the uint8 copy the graph reads, in place, as the torch backend switches the codes
    (``assert_same_codes``), whether the bundle stores the copy or (the ``u8t`` form) the codes, which are then
    never written; nothing keeps a second copy or a mirror order. A switch that fails after the kernel wrote
    (injected in set_unfused, which a switch calls after the kernels) leaves the copies and outputs as they were."""
    from shira_runtime.onnx_backend import OnnxBackend

    qmodel, bundle, adapters = pair
    bundle = bundle if form == "stored" else request.getfixturevalue("u8t_bundle")
    rt, tr = Runtime.load(bundle), Runtime.load(copy.deepcopy(qmodel))
    quantized = set(rt.backend.scales)
    assert quantized and all(rt.backend.tensors[n].dtype == np.uint8 for n in quantized)
    onnx_of = {n: Manifest.read(bundle).parameters[n]["onnx"] for n in quantized}
    graph_input = {n: f"{n}::u8t" if form == "u8t" else onnx_of[n] for n in quantized}
    codes_before = {n: rt.backend.arrays[onnx_of[n]].copy() for n in rt.backend.u8t}
    for r in (rt, tr):
        for n, a in adapters.items():
            r.add_adapter(n, a)
    for n in adapters:
        assert not rt._bank[n].orders and set(rt._bank[n].sparse) & quantized, n
    for target, w in (("a1", None), ("a2", None), (["a1", "a2"], [1.0, -0.5]), (None, None), ("a2", None)):
        rt.switch(target, weights=w)
        tr.switch(target, weights=w)
        assert_same_codes(rt, tr)
        assert not rt._switcher.plan.orders
        for n in quantized:
            assert rt.backend.tensors[n] is rt.backend.arrays[graph_input[n]]  # written in place, the graph's input
        for n, b in codes_before.items():
            assert np.array_equal(rt.backend.arrays[onnx_of[n]], b), n
    before = {n: as_torch(rt.backend.tensors[n]).clone() for n in quantized}
    y = rt(IDS.numpy())

    monkeypatch.setattr(OnnxBackend, "set_unfused", fail_once(OnnxBackend.set_unfused))  # after the kernels
    with pytest.raises(RuntimeError, match="injected"):
        rt.switch(["a1", "a2"], weights=[0.5, 1.0])
    monkeypatch.undo()
    assert all(torch.equal(as_torch(rt.backend.tensors[n]), b) for n, b in before.items())
    assert_same_codes(rt, tr)
    assert np.array_equal(rt(IDS.numpy()), y)


def test_a_bundle_of_the_first_form_still_loads_and_switches(pair, tmp_path, monkeypatch):
    """Bundles exported before the transposed copy existed (s8 x s8 chains over the codes, no 'u8t' entry): the
    runtime builds no copy, the graph reads the codes, the switch is seen and reverts exactly."""
    import shira_runtime.exporters.onnx_export as onnx_export
    from shira_runtime.exporters.quant_graph import rewrite_int8

    qmodel, _, adapters = pair
    monkeypatch.setattr(onnx_export, "rewrite_int8", lambda m, q: rewrite_int8(m, q, form="s8s8"))
    old = export_onnx(qmodel, (IDS,), tmp_path / "old")
    monkeypatch.undo()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert "u8t" not in Manifest.read(old).parameters[key]["quant"]
    rt, tr = Runtime.load(old), Runtime.load(copy.deepcopy(qmodel))
    assert rt.backend.u8t == {} and not rt.backend.transposed
    y_base = rt(IDS.numpy())
    for r in (rt, tr):
        r.add_adapter("a1", adapters["a1"])
        r.switch("a1")
    got, want = rt(IDS.numpy()), tr(IDS).numpy()
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max() and not np.array_equal(got, y_base)
    rt.switch(None)
    assert np.array_equal(rt(IDS.numpy()), y_base)


def test_batch_rows_are_independent(pair):
    _, bundle, _ = pair
    rt = Runtime.load(bundle)
    both = rt(IDS.numpy())
    assert np.allclose(rt(IDS[:1].numpy()), both[:1], atol=1e-5)  # per-token scales: a row ignores the others


def test_lora_unfused_on_an_int8_bundle_matches_the_torch_backend(pair, tmp_path):
    """LoRA slots on an int8 bundle: fp32 factors beside the live codes; the unfused adapter's output agrees with
    the torch backend's unfused LoRA on the same quantized model, and switching it off gives the base back."""
    qmodel, _, _ = pair
    lora = random_lora(build("tiny", torch.float32), TARGETS, rank=4, seed=5)  # factors need only the shapes
    bundle = export_onnx(qmodel, (IDS,), tmp_path / "lora", lora_rank=4, lora_targets=TARGETS)
    rt, tr = Runtime.load(bundle), Runtime.load(qmodel)
    y_base = rt(IDS.numpy())
    for r in (rt, tr):
        r.add_adapter("l", lora, mode="unfused")
        r.switch("l")
    got, want = rt(IDS.numpy()), tr(IDS).detach().numpy()
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
    assert np.abs(got - y_base).max() > 0.1 * np.abs(got - want).max()  # the factors did reach the graph
    rt.switch(None)
    tr.switch(None)
    assert np.array_equal(rt(IDS.numpy()), y_base)


def test_fold_transposes_refused_on_an_int8_base(pair, tmp_path):
    with pytest.raises(ExportError, match="without fold_transposes"):
        export_onnx(pair[0], (IDS,), tmp_path / "f", fold_transposes=True)


def test_fp8_base_refused_and_module_restored(tmp_path):
    qmodel = quantize(build("tiny", torch.float32), "fp8_e4m3")
    before = {n: raw(t).clone() for n, t in qmodel.state_dict().items()}
    with pytest.raises(ExportError, match="fp8_e4m3: bundles hold int8 bases only"):
        export_onnx(qmodel, (IDS,), tmp_path / "b")
    after = qmodel.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(b, raw(after[n])) for n, b in before.items())


def test_export_leaves_the_quantized_module_as_it_was(pair):
    qmodel, _, _ = pair
    from shira_runtime.quantization import QuantLinear

    assert isinstance(qmodel.model.layers[0].self_attn.q_proj, QuantLinear)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p, k: p[k].pop("quant"), "without their 'quant' entry"),
        (lambda p, k: p[k]["quant"].update(format="fp8_e4m3"), "a quantized weight is int8 codes"),
        (lambda p, k: p[k]["quant"].update(scale="model.embed_tokens.weight"), "is not a float32"),
        (lambda p, k: p[k]["quant"].update(u8t=7), "a quantized weight is int8 codes"),
        (lambda p, k: p[k]["quant"].update(extra=1), "a quantized weight is int8 codes"),
        (lambda p, k: p[k].update(dtype="int8"), "a quantized weight is int8 codes"),
        (lambda p, k: p[k].update(layout="identity"), "a quantized weight is int8 codes"),
        (lambda p, k: p[k].update(dtype="float32"), "a quantized weight is int8 codes"),
        (lambda p, k: p[k]["quant"].update(u8t="model.embed_tokens.weight"), "u8t: its u8t input .* another tensor's"),
        (lambda p, k: p[k]["quant"].update(u8t=k.replace("q_proj", "k_proj") + "::u8t"), "u8t: another tensor's"),
        (lambda p, k: p[k]["quant"].update(u8t="elsewhere"), r"u8t: graph inputs do not match the manifest"),
    ],
)
def test_malformed_quant_entries_refused(request, pair, tmp_path, edit, message):
    bundle = pair[1]
    if message.startswith("u8t: "):  # the u8t form's own entry
        bundle, message = request.getfixturevalue("u8t_bundle"), message.removeprefix("u8t: ")
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m["parameters"], "model.layers.0.self_attn.q_proj.weight")
    m = Manifest.seal(m)  # a deliberate edit: the checksum is right, the content is not
    copy_dir = tmp_path / "b"
    copy_dir.mkdir()
    for f in bundle.iterdir():
        if f.is_file():
            (copy_dir / f.name).write_bytes(f.read_bytes())
    (copy_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        Runtime.load(copy_dir)


@pytest.mark.parametrize("bad", [0.0, float("nan"), -1.0])
def test_bad_scales_in_the_weights_refused(pair, tmp_path, bad):
    """A scale the switch cannot divide by, written in the weights file with a right checksum (the exporter of
    someone else): refused at load, naming the file and the tensor."""
    import struct

    from shira_runtime.bundle import file_sha256

    _, bundle, _ = pair
    copy_dir = tmp_path / "b"
    copy_dir.mkdir()
    for f in bundle.iterdir():
        if f.is_file():
            (copy_dir / f.name).write_bytes(f.read_bytes())
    m = json.loads((copy_dir / "manifest.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    weights = copy_dir / m["weights"]
    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = json.loads(data[8 : 8 + n])[m["parameters"][key]["onnx"]]["data_offsets"][0]
    data[8 + n + begin + 4 : 8 + n + begin + 8] = struct.pack("<f", bad)  # the second row's scale
    weights.write_bytes(bytes(data))
    m["fingerprint"]["weights_sha256"] = file_sha256(weights)
    (copy_dir / "manifest.json").write_text(json.dumps(Manifest.seal(m)))
    with pytest.raises(BundleError, match=r"weights\.safetensors: quantized tensor 'model\.layers\.0\.self_attn"):
        Runtime.load(copy_dir)


def test_peft_shira_on_a_quantized_transformers_llama_bundle(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("onnxscript")
    from tests.exporters.test_transformers_export import ARCHS, X

    cfg, cls, targets = ARCHS["llama"]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    adapted = peft.get_peft_model(
        copy.deepcopy(model), peft.ShiraConfig(r=2, target_modules=targets, init_weights=False)
    )
    adapted.save_pretrained(str(tmp_path / "adapter"))
    qmodel = quantize(model, "int8")
    rt = Runtime.load(export_onnx(qmodel, (X[:1],), tmp_path / "bundle"))
    tr = Runtime.load(qmodel)
    for r in (rt, tr):
        r.add_adapter("peft", str(tmp_path / "adapter"))
        r.switch("peft")
    assert_same_codes(rt, tr)
    prompt = X[:1]
    got = rt.generate(prompt.numpy(), max_new_tokens=8)
    want = tr.generate(prompt, max_new_tokens=8)
    got = torch.as_tensor(np.asarray(got))
    assert got.shape == want.shape and torch.equal(got[:, : prompt.shape[1]], prompt)
    # greedy tokens agree while the logits margin exceeds the activation quantization error
    assert (got == want).float().mean() >= 0.75


def test_package_an_int8_base_with_adapters_made_on_the_float_model(pair, tmp_path, capsys):
    from shira_runtime.exporters.package import package

    qmodel, _, adapters = pair
    out = package(copy.deepcopy(qmodel), tmp_path / "pkg", {"a1": adapters["a1"]})
    assert "an int8 base" in capsys.readouterr().out  # the packager says which backend serves speed
    rt, tr = Runtime.load(out), Runtime.load(copy.deepcopy(qmodel))
    assert rt.adapters == ("a1",)
    tr.add_adapter("a1", adapters["a1"])
    rt.switch("a1"), tr.switch("a1")
    assert_same_codes(rt, tr)  # packaged as fp32 values by default: the torch backend's codes


def test_package_of_an_fp8_base_refused_before_anything_is_written(pair, tmp_path):
    from shira_runtime.exporters.package import package

    _, _, adapters = pair
    qmodel = quantize(build("tiny", torch.float32), "fp8_e5m2")
    with pytest.raises(ExportError, match=r"fp8_e5m2 layers: bundles hold int8 bases only .*bake\(adapter, module\)"):
        package(qmodel, tmp_path / "pkg", {"a1": adapters["a1"]}, quiet=True)
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("tokens", [1, 5])
def test_two_byte_activations_keep_a_linear_with_outlier_channels_exact(tokens):
    """The exporter's chain (``u8t16``) against ``x @ (code * scale).T`` in fp64 when a few input channels carry
    40x the others (a trained model's outliers): within 1e-3 of max |y|, where one-byte activations (``u8t``, the
    form before) are off by over 1%; the weight copy is read live (a new copy changes the next run)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from shira_runtime.exporters.quant_graph import constants, int8_linear

    g = torch.Generator().manual_seed(7)
    n, k = 48, 320
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 0.001
    x = torch.randn(tokens, k, generator=g)
    x[:, [3, 77, 200]] *= 40.0
    want = (x.double() @ (codes.double() * scale.double()[:, None]).T).numpy()
    errs = {}
    for form in ("u8t16", "u8t"):
        graph = helper.make_graph(
            int8_linear("x", "u", "s", n, k, "y", 17, form),
            form,
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k]),
                helper.make_tensor_value_info("u", TensorProto.UINT8, [k, n]),
                helper.make_tensor_value_info("s", TensorProto.FLOAT, [n]),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            initializer=list(constants(form).values()),
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        u = np.ascontiguousarray((codes.view(torch.uint8) ^ 0x80).T.numpy())
        got = sess.run(None, {"x": x.numpy(), "u": u, "s": scale.numpy()})[0]
        errs[form] = float(np.abs(got - want).max() / np.abs(want).max())
        u2 = 255 - u  # other codes: the next run reads them (code -c - 1)
        want2 = x.double().numpy() @ ((u2.astype(np.float64) - 128) * scale.double().numpy()[None, :])
        got2 = sess.run(None, {"x": x.numpy(), "u": u2, "s": scale.numpy()})[0]
        errs[form + " new"] = float(np.abs(got2 - want2).max() / np.abs(want2).max())
    assert errs["u8t16"] <= 1e-3 and errs["u8t16 new"] <= 1e-3, errs
    assert errs["u8t"] > 1e-2, errs  # why the exporter moved to two bytes


def test_the_live_probe_skips_codes_no_node_reads(u8t_bundle, monkeypatch):
    """An int8 weight's graph reads its transposed copy, not the codes: the liveness probe writes the copies (and
    float weights), never the codes, so it does not pay one run per quantized layer before it finds a live one."""
    from shira_runtime import onnx_backend

    bundle = u8t_bundle
    seen = []
    real = onnx_backend._probe_order
    monkeypatch.setattr(onnx_backend, "_probe_order", lambda arrays: seen.append(set(arrays)) or real(arrays))
    rt = Runtime.load(bundle)
    rt.backend.check_live()
    codes = {Manifest.read(bundle).parameters[n]["onnx"] for n in rt.backend.u8t}
    assert seen and codes and not (codes & seen[-1])
    assert {f"{n}::u8t" for n in rt.backend.u8t} <= seen[-1]  # the copies the graph reads are probed


def test_bank_bytes_on_an_int8_bundle(pair):
    """What a replica keeps per adapter (``serve.bank_bytes``) on an int8 bundle: indices, deltas and runs, 8 bytes
    per nonzero with int32 indices; the copies are switched directly, so no mirror order is kept."""
    from shira_runtime.serve import bank_bytes

    _, bundle, adapters = pair
    rt = Runtime.load(bundle)
    rt.add_adapter("a1", adapters["a1"])
    rt.switch("a1")  # read and registered
    prep = rt._bank["a1"]
    assert not prep.orders and set(prep.sparse) & set(rt.backend.scales)
    want = sum(i.nbytes + d.nbytes for i, d in prep.sparse.values())
    assert bank_bytes(rt)["a1"] == want + sum(r.nbytes for r in prep.runs.values())
    assert want == 8 * sum(i.size for i, _ in prep.sparse.values())


@pytest.mark.usefixtures("kernel_path")
def test_codes_baked_for_the_int8_base_switch_the_bundles_copies(pair, monkeypatch):
    """An adapter of codes baked on the torch model (``bake``, int8 codes at the codes' indices) switches the
    bundle's transposed copies to the torch backend's codes, bit for bit; baked for another base it is refused
    before any write; a switch to it that fails after the kernel wrote leaves the copies as they were."""
    from shira_runtime.errors import BaseMismatchError
    from shira_runtime.onnx_backend import OnnxBackend
    from shira_runtime.quantization import bake

    qmodel, bundle, adapters = pair
    rt, tr = Runtime.load(bundle), Runtime.load(copy.deepcopy(qmodel))
    rt.add_adapter("c", bake(adapters["a1"], copy.deepcopy(qmodel)))
    tr.add_adapter("a1", adapters["a1"])
    base = {n: as_torch(t).clone() for n, t in rt.backend.tensors.items()}
    rt.switch("c"), tr.switch("a1")
    assert_same_codes(rt, tr)
    rt.switch(None)
    assert all(torch.equal(as_torch(t), base[n]) for n, t in rt.backend.tensors.items())

    monkeypatch.setattr(OnnxBackend, "set_unfused", fail_once(OnnxBackend.set_unfused))
    with pytest.raises(RuntimeError, match="injected"):
        rt.switch("c")
    monkeypatch.undo()
    assert all(torch.equal(as_torch(t), base[n]) for n, t in rt.backend.tensors.items())

    baked = bake(adapters["a1"], copy.deepcopy(qmodel))  # a bundle's uint8 storage is never an adapter's codes
    from shira_runtime.adapters import CodesAdapter
    from shira_runtime.errors import AdapterValueError

    with pytest.raises(AdapterValueError, match="codes must be int8 or fp8"):
        CodesAdapter(baked.indices, {k: v.view(torch.uint8) for k, v in baked.codes.items()}, baked.shapes, baked.base)
    other = quantize(build("tiny", torch.float32, seed=9), "int8")
    with pytest.raises(BaseMismatchError, match="baked for another quantized base"):
        rt.add_adapter("wrong", bake(adapters["a1"], other))
        rt.switch("wrong")
    assert all(torch.equal(as_torch(t), base[n]) for n, t in rt.backend.tensors.items())


def test_blocks_made_for_the_bundles_copy_are_runs_of_it(pair):
    """A block mask made for an int8 bundle (``line_dtype="int8", transposed=True``) is whole 64-byte lines of the
    copies the bundle switches: at registration its entries are described as runs of the copy (no index read per
    entry), and the switch writes the torch backend's codes."""
    qmodel, bundle, _ = pair
    model = build("tiny", torch.float32)
    a = random_shira(model, TARGETS, density=0.05, seed=3, mask="block", line_dtype="int8", transposed=True)
    rt, tr = Runtime.load(bundle), Runtime.load(copy.deepcopy(qmodel))
    for r in (rt, tr):
        r.add_adapter("b", a)
        r.switch("b")
    assert_same_codes(rt, tr)
    prep = rt._bank["b"]
    assert set(prep.runs) == set(prep.sparse) & set(rt.backend.scales) != set()
    covered = sum(int(r[:, 2].sum()) for r in prep.runs.values())
    # every entry in a run of the copy, but the best positions that fill each layer's last, partial block
    assert covered >= 0.95 * sum(i.size for i, _ in prep.sparse.values())
    lengths = np.concatenate([r[:, 2] for r in prep.runs.values()])
    assert np.median(lengths) >= 32  # whole columns of k/v_proj (32 rows), 64-row lines elsewhere
