"""The device path: a bundle made here (with torch) loaded, switched, fused and decoded in a process where torch,
onnx, transformers and peft cannot be imported (``tests.device``). Every output, token, stat and error message
equals those of the same code in a process that has torch, bit for bit; a failed switch leaves every weight as
it was; the process never imports a blocked package."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from shira_runtime import kernels, quantize, save_adapter  # noqa: E402
from shira_runtime.exporters.package import package  # noqa: E402
from shira_runtime.models import TARGETS, build  # noqa: E402
from shira_runtime.quantization import bake  # noqa: E402
from shira_runtime.synthetic import random_shira  # noqa: E402

from tests import device  # noqa: E402

# The app: each step's result goes into one npz (arrays) and one JSON (stats, errors), compared across processes.
APP = """
import hashlib, json, sys
import numpy as np
from shira_runtime import Runtime, ShiraError

spec, out = json.loads(sys.argv[1]), sys.argv[2]
arrays, log = {}, []

def weights_digest(rt):
    h = hashlib.sha256()
    for name in sorted(rt.backend.tensors):
        h.update(np.ascontiguousarray(rt.backend.tensors[name]).view(np.uint8).tobytes())
    return h.hexdigest()

for b, job in enumerate(spec):
    rt = Runtime.load(job["bundle"])
    for name, path in job.get("add", {}).items():
        rt.add_adapter(name, path)
    ids = np.array(job["ids"], dtype=np.int64)
    base = weights_digest(rt)
    for i, state in enumerate(job["states"]):
        stats = rt.switch(state)
        arrays[f"{b}/{i}/out"] = np.asarray(rt(ids))
        log.append([b, i, stats.elements_written, stats.bytes_touched, stats.active, stats.kernels, stats.saturated])
        if job.get("generate"):
            arrays[f"{b}/{i}/greedy"] = rt.generate(ids, max_new_tokens=6)
            arrays[f"{b}/{i}/sampled"] = rt.generate(ids, max_new_tokens=6, do_sample=True, seed=11, top_k=20)
    # refusals: named, and nothing moves
    rt.switch(job["states"][1])
    before, active = weights_digest(rt), rt.active
    for bad in job.get("refused", []):
        try:
            rt.add_adapter(bad[0], bad[1]) if len(bad) == 2 else rt.switch(bad[0])
            log.append([b, "accepted", bad])
        except ShiraError as exc:
            log.append([b, type(exc).__name__, str(exc)])
        assert weights_digest(rt) == before and rt.active == active, bad
    rt.switch(None)
    log.append([b, "base back", weights_digest(rt) == base])
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
    json.dump(log, f)
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    base = build("tiny", torch.float32, seed=0)
    torch.manual_seed(1)
    shira_cfg = peft.ShiraConfig(r=2, target_modules=list(TARGETS), init_weights=False, random_seed=1)
    peft.get_peft_model(copy.deepcopy(base), shira_cfg).save_pretrained(tmp / "peft_shira")
    lora_cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), lora_cfg).save_pretrained(tmp / "peft_lora")
    random_shira(base, TARGETS, 0.02, seed=5).save(tmp / "ours.safetensors")
    random_shira(base, TARGETS, 0.02, seed=6).save(tmp / "ours_fp32.safetensors", values="fp32")
    random_shira(base, TARGETS, 0.02, seed=8, mask="block").save(tmp / "block.safetensors")
    random_shira(build("small", torch.float32, seed=0), ["q_proj"], 0.02, seed=9).save(tmp / "other.safetensors")
    float_bundle = package(
        base,
        tmp / "float",
        {"s": tmp / "peft_shira", "l": tmp / "peft_lora", "o": tmp / "ours.safetensors"},
        quiet=True,
    )
    qbase = quantize(copy.deepcopy(base), "int8")
    q_adapter = random_shira(base, TARGETS, 0.02, seed=7)
    save_adapter(bake(random_shira(base, TARGETS, 0.02, seed=10), qbase), tmp / "baked.safetensors")
    int8_bundle = package(qbase, tmp / "int8", {"q": q_adapter}, quiet=True)
    cfg, cls, targets = _llama()
    torch.manual_seed(0)
    llama = cls(cfg).eval()
    peft.get_peft_model(
        copy.deepcopy(llama), peft.ShiraConfig(r=2, target_modules=targets, init_weights=False)
    ).save_pretrained(tmp / "llama_shira")
    llama_bundle = package(llama, tmp / "llama", {"s": tmp / "llama_shira"}, quiet=True)
    ids = [[5, 17, 42, 7, 99, 3]]
    return tmp, [
        {
            "bundle": str(float_bundle),
            "add": {
                "o2": str(tmp / "ours_fp32.safetensors"),
                "ps": str(tmp / "peft_shira"),
                "pl": str(tmp / "peft_lora"),
                "blk": str(tmp / "block.safetensors"),
            },
            "ids": ids,
            "generate": True,
            "states": [None, "s", "o", "l", ["s", "o"], {"o": 0.5, "o2": 1.5}, "ps", "pl", "blk", ["l", "s"], None],
            "refused": [
                ["nope"],
                [["s", "nope"]],
                ["other", str(tmp / "other.safetensors")],
                ["missing", str(tmp / "missing.safetensors")],
            ],
        },
        {
            "bundle": str(int8_bundle),
            "add": {"baked": str(tmp / "baked.safetensors"), "o": str(tmp / "ours_fp32.safetensors")},
            "ids": ids,
            "states": [None, "q", "baked", "o", {"q": 0.5, "o": 1.0}, None],
            "refused": [["nope"]],
        },
        {"bundle": str(llama_bundle), "ids": ids, "generate": True, "states": [None, "s", None, "s"]},
    ]


def _llama():
    from tests.exporters.test_transformers_export import ARCHS

    return ARCHS["llama"]


def test_a_bundle_runs_without_torch_and_equals_the_torch_process_bit_for_bit(bundles):
    tmp, spec = bundles
    results = {}
    for block in (True, False):
        out = tmp / ("without" if block else "with")
        _, modules = device.run(APP, json.dumps(spec), str(out), block=block)
        if block:
            assert modules == [], f"the device path imported {modules}"
        results[block] = (np.load(f"{out}.npz"), json.loads((tmp / f"{out.name}.json").read_text()))
    (a, log_a), (b, log_b) = results[True], results[False]
    assert sorted(a.files) == sorted(b.files)
    differ = [k for k in a.files if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
    assert not differ, f"outputs differ without torch: {differ}"
    assert log_a == log_b
    # the app did what it says: adapters change the outputs, the base comes back, refusals are named
    assert not np.array_equal(a["0/0/out"], a["0/1/out"]) and np.array_equal(a["0/0/out"], a["0/10/out"])
    assert not np.array_equal(a["2/0/greedy"], a["2/1/greedy"]) or not np.array_equal(a["2/0/out"], a["2/1/out"])
    assert all(entry[2] for entry in log_a if entry[1] == "base back")
    refusals = [entry for entry in log_a if entry[1] not in ("accepted", "base back") and isinstance(entry[1], str)]
    assert [r[1] for r in refusals] == [
        "UnknownAdapterError",
        "UnknownAdapterError",
        "AdapterMismatchError",
        "AdapterFormatError",
        "UnknownAdapterError",
    ], refusals
    assert "nope" in refusals[0][2] and "other.safetensors" in refusals[2][2] and "missing" in refusals[3][2]
    want = kernels.backend()  # "cpp": the C++ core, from numpy ("torch" under SHIRA_KERNELS=torch: numpy's reference)
    assert {entry[5] for entry in log_a if isinstance(entry[1], int)} == {want}


def test_the_torch_side_names_its_extra_on_a_device():
    code = """
    import shira_runtime
    from shira_runtime import kernels
    try:
        from shira_runtime import quantize
    except ModuleNotFoundError as exc:
        print("refused:", exc)
    print("kernels:", kernels.backend())
    """
    out, modules = device.run(code)
    assert modules == []
    assert "refused: shira_runtime.quantize quantizes torch modules and needs torch" in out
    assert "pip install 'shira-runtime[torch]'" in out and f"kernels: {kernels.backend()}" in out


def test_a_float_bundle_needs_no_ml_dtypes(bundles):
    """Importing ml_dtypes costs ~0.6 s of a cold start: a bundle of fp32 weights with fp16/fp32 adapter files
    loads, switches and decodes without it (a bf16 or fp8 file imports it when read)."""
    _, spec = bundles
    code = """
    import sys
    import numpy as np
    from shira_runtime import Runtime
    rt = Runtime.load(sys.argv[1])
    rt.switch("o")
    rt.generate(np.array([[5, 17, 42]]), max_new_tokens=2)
    rt.switch(None)
    print("ml_dtypes:", "ml_dtypes" in sys.modules)
    """
    out, modules = device.run(code, spec[0]["bundle"])
    assert modules == [] and "ml_dtypes: False" in out


def _reseal_renamed(root: Path, graph: str, key: str) -> tuple:
    """Rename ``root/graph``'s first input (a valid graph, just not the manifest's), re-hash it into the
    manifest's ``live[key]`` and re-seal the manifest; returns the edited model and the manifest dict."""
    import hashlib

    import onnx
    from shira_runtime.manifest import Manifest

    model = onnx.load(str(root / graph))
    old = model.graph.input[0].name
    model.graph.input[0].name = "renamed_ids"
    for node in model.graph.node:
        node.input[:] = ["renamed_ids" if i == old else i for i in node.input]
    raw = model.SerializeToString()
    (root / graph).write_bytes(raw)
    m = json.loads((root / "manifest.json").read_text())
    m["live"][key] = hashlib.sha256(raw).hexdigest()
    (root / "manifest.json").write_text(json.dumps(Manifest.seal(m)))
    return model, m


def test_a_resealed_live_graph_with_other_inputs_is_refused_naming_it(bundles, tmp_path):
    """A hostile live.onnx re-hashed into a re-sealed manifest: the session's inputs are checked against the
    manifest, and the error names live.onnx (the file at fault), not the exported graph."""
    import hashlib
    import shutil

    from shira_runtime import Runtime
    from shira_runtime.bundle import BundleError
    from shira_runtime.manifest import Manifest

    _, spec = bundles
    root = tmp_path / "bundle"
    shutil.copytree(spec[0]["bundle"], root)
    model, m = _reseal_renamed(root, "live.onnx", "graph_sha256")
    with pytest.raises(BundleError, match=r"live\.onnx: graph inputs do not match the manifest"):
        Runtime.load(root)
    next(n for n in model.graph.node if n.input).input[0] = "nowhere"  # not a valid graph: onnxruntime's refusal
    raw = model.SerializeToString()
    (root / "live.onnx").write_bytes(raw)
    m["live"]["graph_sha256"] = hashlib.sha256(raw).hexdigest()
    (root / "manifest.json").write_text(json.dumps(Manifest.seal(m)))
    with pytest.raises(BundleError, match=r"live\.onnx: onnxruntime cannot load the graph"):
        Runtime.load(root)


def test_the_one_token_session_starts_at_first_use_and_a_resealed_one_is_refused_naming_it(bundles, tmp_path):
    """A decoder's one-token session is not started at load (the first token comes from the prefill): it
    starts at the first one-token step, where a hostile one_row.onnx (re-hashed into a re-sealed manifest) is
    refused naming it, before that step returns anything."""
    import shutil

    import numpy as np
    from shira_runtime import Runtime
    from shira_runtime.bundle import BundleError

    _, spec = bundles
    src = next(Path(s["bundle"]) for s in spec if (Path(s["bundle"]) / "one_row.onnx").exists())
    ids = np.array([[5, 17, 42]])
    rt = Runtime.load(src)
    assert rt.backend._one_row_session is None
    first = rt.generate(ids, max_new_tokens=1)
    assert rt.backend._one_row_session is None  # one token: the prefill's
    assert np.array_equal(rt.generate(ids, max_new_tokens=3)[:, :4], first)
    assert rt.backend._one_row_session is not None and rt.backend.one_row_session is not rt.backend.session
    root = tmp_path / "bundle"
    shutil.copytree(src, root)
    _reseal_renamed(root, "one_row.onnx", "one_row_sha256")
    rt = Runtime.load(root)
    assert np.array_equal(rt.generate(ids, max_new_tokens=1), first)
    for _ in range(2):
        with pytest.raises(BundleError, match=r"one_row\.onnx: graph inputs do not match the manifest"):
            rt.generate(ids, max_new_tokens=2)
