"""The onnxruntime backend: switching inside a live session equals the torch backend, reverts bit for bit,
never shows a mixed state to concurrent inference, and refuses hostile bundles with clear errors."""

from __future__ import annotations

import copy
import json
import shutil
import struct
import threading

import numpy as np
import pytest
import torch
from shira_runtime import AdapterFormatError, Runtime
from shira_runtime.bundle import BundleError
from shira_runtime.exporters import export_onnx
from shira_runtime.manifest import Manifest, structure_of
from shira_runtime.models import TARGETS, build
from shira_runtime.onnx_backend import LiveWeightsError, OnnxBackend
from shira_runtime.synthetic import random_lora, random_shira

from tests.conftest import as_torch, stress_switching

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def close(got: np.ndarray, want: torch.Tensor, dtype: torch.dtype) -> None:
    t = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(torch.from_numpy(got).float(), want.float(), **t)


def make(tmp_path_factory, dtype=torch.float32, fold=False):
    m = build("tiny", dtype, seed=5)
    path = export_onnx(
        m, IDS[:1], tmp_path_factory.mktemp("bundle") / "b", output_names=["logits"], fold_transposes=fold
    )
    return m, path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make(tmp_path_factory)


def adapters(m):
    return {
        "a": random_shira(m, TARGETS, 0.05, seed=1, std=0.05),
        "b": random_shira(m, TARGETS, 0.05, seed=2, std=0.05),
        "l": random_lora(m, ["q_proj", "up_proj", "down_proj"], rank=4, seed=3),
        "k": random_shira(m, TARGETS, 0.05, seed=4, std=0.05, mask="block", line_dtype=torch.int8),  # runs
    }


@pytest.mark.parametrize(
    "dtype,fold,gemm_a",
    [
        (torch.float32, False, None),
        (torch.float32, False, True),
        (torch.float32, True, True),
        (torch.float16, False, True),
    ],
    ids=["fp32", "fp32-gemm-a", "fp32-transposed", "fp16-gemm-a"],
)
def test_switches_match_torch_and_revert_bit_for_bit(tmp_path_factory, dtype, fold, gemm_a):
    m, path = make(tmp_path_factory, dtype, fold)
    rt_ort, rt_torch = Runtime(OnnxBackend.open(path, gemm_a=gemm_a)), Runtime.load(m)
    assert rt_ort.backend.kind == "onnxruntime" and bool(rt_ort.backend.transposed) == fold
    assert (rt_ort.backend.rewritten > 0) == bool(gemm_a)  # tiny weights are under GEMM_A_MIN by default
    for name, ad in adapters(m).items():
        rt_ort.add_adapter(name, ad)
        rt_torch.add_adapter(name, ad)
    close(rt_ort(IDS), rt_torch(IDS), dtype)
    states = (("a", None), ("b", None), (["a", "b"], [1.0, 0.5]), ("l", None), (["l", "a"], [0.7, -1.0]), ("k", None),
              (["k", "a"], [1.0, 0.5]), ("k", None))  # fmt: skip
    for names, weights in states:
        rt_ort.switch(names, weights)
        rt_torch.switch(names, weights)
        lora = "l" in names
        for name, t in rt_torch.backend.tensors.items():  # same kernels, same formula: the same bits
            got = as_torch(rt_ort.backend.logical(rt_ort.backend.aliases[name]))
            if lora:  # a fused LoRA's GEMM: numpy's BLAS on a bundle, torch's here, sum in other orders
                torch.testing.assert_close(got, t, atol=1e-6, rtol=1e-5)
            else:
                assert torch.equal(got, t), name
        close(rt_ort(IDS), rt_torch(IDS), dtype)
    rt_ort.switch(None)
    fresh = OnnxBackend.open(path, gemm_a=gemm_a)
    for name, a in rt_ort.backend.arrays.items():
        assert bit_equal(a, fresh.arrays[name]), name
    assert np.array_equal(rt_ort(IDS), fresh(IDS))


def test_peft_shira_adapter_matches_torch(bundle, tmp_path):
    peft = pytest.importorskip("peft")
    m, path = bundle
    torch.manual_seed(7)
    cfg = peft.ShiraConfig(r=2, target_modules=list(TARGETS), init_weights=False, random_seed=7)
    peft.get_peft_model(copy.deepcopy(m), cfg).save_pretrained(str(tmp_path / "shira"))
    rt_ort, rt_torch = Runtime.load(path), Runtime.load(m)
    rt_ort.add_adapter("p", tmp_path / "shira")
    rt_torch.add_adapter("p", tmp_path / "shira")
    base = rt_ort(IDS)
    with rt_ort.using("p"), rt_torch.using("p"):
        got = rt_ort(IDS)
        assert not np.allclose(got, base, atol=1e-4)
        close(got, rt_torch(IDS), torch.float32)
    assert np.array_equal(rt_ort(IDS), base)


def test_inputs_by_position_name_tensor_or_array(bundle):
    m, path = bundle
    backend = OnnxBackend.open(path)
    want = backend(IDS)
    assert isinstance(want, np.ndarray) and want.shape == (2, 9, 256)  # one output: an array, not a list
    assert np.array_equal(backend(input_ids=IDS.numpy()), want)
    assert np.array_equal(backend(IDS.int()), want)  # int32 ids are widened
    with pytest.raises(TypeError, match="dtype float32"):
        backend(IDS.float())
    with pytest.raises(TypeError, match="unknown input 'x'"):
        backend(x=IDS)
    with pytest.raises(TypeError, match="missing inputs"):
        backend()
    with pytest.raises(TypeError, match="given twice"):
        backend(IDS, input_ids=IDS)
    with pytest.raises(ValueError, match="shape"):
        backend(IDS[0])


def test_weights_are_owned_writable_aligned_views(bundle):
    _, path = bundle
    backend = OnnxBackend.open(path)
    for name, t in backend.tensors.items():
        a = backend.arrays[name]
        assert a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0
        assert as_torch(t).data_ptr() == a.ctypes.data  # the switch kernels write the memory onnxruntime reads


def test_sessions_sleep_between_parallel_sections_unless_asked_to_spin(bundle):
    """A bundle's sessions run onnxruntime's intra-op threads without spinning (a busy device); ``spin=True`` gives
    onnxruntime's default back; the outputs are the same either way."""
    _, path = bundle
    key = "session.intra_op.allow_spinning"
    quiet, spinning = OnnxBackend.open(path), OnnxBackend.open(path, spin=True)
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    assert spinning.session.get_session_options().get_session_config_entry(key) == "1"
    assert quiet.one_row_session.get_session_options().get_session_config_entry(key) == "0"
    ids = np.arange(1, 9, dtype=np.int64)[None]
    assert np.array_equal(Runtime(quiet)(ids), Runtime(spinning)(ids))


def test_probe_detects_a_session_that_copied_the_weights(bundle):
    import onnxruntime as ort

    _, path = bundle
    backend = OnnxBackend.open(path)
    backend.check_live()  # passes on this onnxruntime, and leaves the weights as they were
    fresh = OnnxBackend.open(path, verify=False)
    assert all(bit_equal(a, fresh.arrays[n]) for n, a in backend.arrays.items())
    # simulate an onnxruntime that copies graph inputs: bind copies instead of our buffers
    backend._values = {n: ort.OrtValue.ortvalue_from_numpy(a.copy()) for n, a in backend.arrays.items()}
    backend._local = threading.local()
    with pytest.raises(LiveWeightsError, match="did not change the outputs"):
        backend.check_live()
    # the probe runs before the first inference that follows a write, not at load: before any write a copy
    # holds the file's bytes, and the outputs are the base's
    rt = Runtime.load(path)
    rt.backend._values = {n: ort.OrtValue.ortvalue_from_numpy(a.copy()) for n, a in rt.backend.arrays.items()}
    y0 = rt(IDS)
    assert np.array_equal(y0, fresh(IDS))
    m, _ = bundle
    rt.add_adapter("a", adapters(m)["a"])
    rt.switch("a")
    for _ in range(2):  # a failed probe stays pending: no inference returns outputs
        with pytest.raises(LiveWeightsError, match="did not change the outputs"):
            rt(IDS)
    rt.switch(None)
    with pytest.raises(LiveWeightsError, match="did not change the outputs"):
        rt(IDS)


def test_concurrent_inference_never_sees_a_mixed_state(bundle):
    m, path = bundle
    rt = Runtime.load(path)
    for name, ad in adapters(m).items():
        rt.add_adapter(name, ad)
    stress_switching(rt, [None, "a", "b", ["a", "b"], "l"], lambda: rt(IDS), np.array_equal)


# -- hostile bundles --
def edit_manifest(path, fn, seal=True):
    """Edit the manifest's JSON; ``seal``: recompute its checksum, as a deliberate edit would."""
    p = path / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(Manifest.seal(m) if seal else m))


def set_param(m, name, **fields):
    """Edit a parameter entry and recompute the structure hash over it (so deeper checks are reached)."""
    m["parameters"][name].update(fields)
    m["fingerprint"]["structure"] = structure_of(m["parameters"])


def swap_onnx(m, a, b):
    pa, pb = m["parameters"][a], m["parameters"][b]
    pa["onnx"], pb["onnx"] = pb["onnx"], pa["onnx"]


def flip_byte(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def header_len(path):
    return struct.unpack("<Q", (path / "weights.safetensors").read_bytes()[:8])[0]


Q = "model.layers.0.self_attn.q_proj.weight"
HOSTILE = {
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json: cannot read"),
    "no weights": (lambda p: (p / "weights.safetensors").unlink(), "weights.safetensors: cannot open"),
    "no graph": (lambda p: (p / "model.onnx").unlink(), "model.onnx: cannot read"),
    "manifest not json": (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
    "wrong format": (lambda p: edit_manifest(p, lambda m: m.update(format="x")), "not a shira-onnx-bundle"),
    "future version": (lambda p: edit_manifest(p, lambda m: m.update(version=99)), "version 99"),
    "path escape": (lambda p: edit_manifest(p, lambda m: m.update(weights="../w")), "plain file name"),
    "edited shape": (lambda p: edit_manifest(p, lambda m: m["parameters"][Q].update(shape=[64, 32])), "structure"),
    "unknown name": (
        lambda p: edit_manifest(p, lambda m: m["parameters"].update(extra=dict(m["parameters"][Q]))),
        "structure",
    ),
    "shape with hash": (lambda p: edit_manifest(p, lambda m: set_param(m, Q, shape=[32, 128])), Q),
    "dtype": (lambda p: edit_manifest(p, lambda m: m["parameters"][Q].update(dtype="float16")), "structure"),
    "dtype with hash": (lambda p: edit_manifest(p, lambda m: set_param(m, Q, dtype="float16")), Q),
    "square weight relaid": (
        lambda p: edit_manifest(p, lambda m: m["parameters"][Q].update(layout="transposed")),
        "structure",
    ),
    "same-shaped weights swapped": (
        lambda p: edit_manifest(p, lambda m: swap_onnx(m, Q, Q.replace("q_proj", "o_proj"))),
        "no parameter's own",
    ),
    "unsealed edit": (
        lambda p: edit_manifest(p, lambda m: m["outputs"][0].update(dtype="float16"), seal=False),
        "checksum mismatch",
    ),
    "input dtype": (
        lambda p: edit_manifest(p, lambda m: m["inputs"][0].update(dtype="float32")),
        "'input_ids' is int64",
    ),
    "empty example": (
        lambda p: edit_manifest(p, lambda m: m["inputs"][0].update(example_shape=[0, 8])),
        "example_shape",
    ),
    "output dtype": (
        lambda p: edit_manifest(p, lambda m: m["outputs"][0].update(dtype="float16")),
        "the manifest says float16",
    ),
    "bad dtype": (lambda p: edit_manifest(p, lambda m: m["parameters"][Q].update(dtype="int8")), "dtype 'int8'"),
    "layout": (lambda p: edit_manifest(p, lambda m: m["parameters"][Q].update(layout="diagonal")), "layout"),
    "retied": (
        lambda p: edit_manifest(p, lambda m: m["parameters"]["lm_head.weight"].update(layout="transposed")),
        "structure",
    ),
    "retied with hash": (
        lambda p: edit_manifest(p, lambda m: set_param(m, "lm_head.weight", layout="transposed")),
        "share ONNX tensor",
    ),
    "truncated weights": (
        lambda p: (p / "weights.safetensors").write_bytes((p / "weights.safetensors").read_bytes()[:-100]),
        "truncated: tensor",
    ),
    "short file": (lambda p: (p / "weights.safetensors").write_bytes(b"\x01"), "truncated"),
    "huge header": (
        lambda p: (p / "weights.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
        "header length",
    ),
    "weights edited": (lambda p: flip_byte(p / "weights.safetensors", -5), "sha256 differs"),
    "graph edited": (lambda p: flip_byte(p / "model.onnx", -5), "model.onnx: sha256 differs"),
    "header garbage": (lambda p: flip_byte(p / "weights.safetensors", 8), "header"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bundles_are_refused_clearly(bundle, tmp_path, case):
    _, path = bundle
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    damage, message = HOSTILE[case]
    damage(bad)
    with pytest.raises(BundleError, match=message.replace("[", "\\[")):
        OnnxBackend.open(bad, verify="load")  # every fault at load
    with pytest.raises(BundleError, match=message.replace("[", "\\[")):
        OnnxBackend.open(bad)(IDS)  # at load, or (the weights' sha256, on a thread) before the first output
    with pytest.raises(AdapterFormatError):  # what Runtime.load raises, whatever the bundle's fault
        Runtime.load(bad)(IDS)


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        Runtime.load(tmp_path / "nothing")


def test_probe_accepts_live_bundles_whose_example_is_padding(tmp_path):
    """The probe used to feed all-zero ids (the padding row, zero) and give up after three weights, refusing
    live bundles; it now draws ids away from row 0 and tries every weight. Repro from the issue."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Embedding(16, 8, padding_idx=0),
        nn.Linear(8, 8, bias=False),
        nn.Linear(8, 8, bias=False),
        nn.Linear(8, 8, bias=False),
        nn.Linear(8, 16),
    )
    path = export_onnx(m, (torch.zeros(1, 8, dtype=torch.long),), tmp_path / "seq")
    backend = OnnxBackend.open(path)
    ids = backend.probe_inputs()[backend.input_names[0]]
    assert ids.min() >= 1 and ids.max() < 16
    backend(ids)  # the first inference probes
    llama = build("tiny", torch.float32, seed=2)
    with torch.no_grad():
        llama.model.embed_tokens.weight[0].zero_()  # a padding row, as with pad_token_id=0
    OnnxBackend.open(export_onnx(llama, (torch.zeros(1, 8, dtype=torch.long),), tmp_path / "llama"))(ids[:, :8])
