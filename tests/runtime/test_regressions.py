"""One test per defect of a guarantee that the fault and fuzz suites do not name on their own:
each failed before the fix. Atomic switches are in test_faults.py, bundle manifests in test_onnx_backend.py."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from shira_runtime import AdapterFormatError, BaseMismatchError, Runtime, SparseAdapter
from shira_runtime.models import TARGETS, build
from shira_runtime.peft_format import CONFIG
from shira_runtime.synthetic import random_shira

from tests.conftest import assert_bit_identical, snapshot
from tests.fuzz import mutations as mu

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def saved(tmp_path):
    m = build("tiny", torch.float32, seed=1)
    path = tmp_path / "a.safetensors"
    random_shira(m, TARGETS, 0.05, seed=1).save(path, values="fp16")
    return m, path


def mutate(path, fn):
    bad = path.with_name("bad.safetensors")
    bad.write_bytes(fn(path.read_bytes()))
    return bad


def test_header_relabel_of_values_is_refused(saved):
    """Defect 2: values relabelled F16 -> BF16 (same bytes, same metadata) used to load with other weights."""
    m, path = saved
    bad = mutate(path, mu.edit_header(mu.set_entry(f"{Q}::values", "dtype", "BF16")))
    rt, snap = Runtime.load(m), snapshot(m)
    with pytest.raises(AdapterFormatError, match=r"bad.safetensors: tensor .*::values' is corrupted"):
        rt.add_adapter("x", bad)
    assert_bit_identical(m, snap)


@pytest.mark.parametrize("dtype", ["U32", "I32"])
def test_probe_dtype_flip_is_a_format_error(saved, dtype):
    """Defect 2: a probe relabelled to another 4-byte dtype escaped as NotImplementedError/RuntimeError."""
    _, path = saved
    bad = mutate(path, mu.edit_header(mu.set_entry(f"{Q}::probe", "dtype", dtype)))
    with pytest.raises(AdapterFormatError, match="bad.safetensors"):
        SparseAdapter.load(bad)
    resummed = mutate(path, mu.chain(mu.edit_header(mu.set_entry(f"{Q}::probe", "dtype", dtype)), _resum))
    with pytest.raises(AdapterFormatError, match=r"bad.safetensors: tensor .*probe is torch\.(uint|int)32"):
        SparseAdapter.load(resummed)


def test_nan_probe_with_checksums_recomputed_is_a_format_error(saved):
    """Defect 2: a NaN probe (checksums recomputed) escaped as RuntimeError('atol must be ...')."""
    _, path = saved
    nan = mu.edit_file(mu.write_element(f"{Q}::probe", 0, b"\x00\x00\xc0\x7f"))
    bad = mutate(path, mu.chain(nan, _resum))
    with pytest.raises(AdapterFormatError, match="probe is torch.float32"):
        SparseAdapter.load(bad)


@pytest.mark.parametrize("shapes", ['["w", [64, 64]]', json.dumps({Q: ["x", 64]}), json.dumps({Q: [64.0, 64]})])
def test_malformed_shapes_metadata_is_a_format_error(saved, shapes):
    """Defect 3: shapes as a list or a dimension "x" (meta checksum recomputed) escaped as
    AttributeError/ValueError/TypeError."""
    _, path = saved
    bad = mutate(path, mu.edit_header(mu.chain(mu.set_meta("shapes", shapes), mu.refresh_meta_checksum)))
    with pytest.raises(AdapterFormatError, match="bad.safetensors: .*shape"):
        SparseAdapter.load(bad)


def _resum(raw: bytes) -> bytes:
    """Recompute every checksum the file stores, as a consistent liar would."""
    return mu.edit_file(mu.refresh_checksums)(raw)


def _peft_shira(base, path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.ShiraConfig(r=2, target_modules=list(TARGETS), init_weights=False)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(path))
    return path


def test_peft_shira_for_a_base_of_other_shapes_is_refused(tmp_path):
    """Defect 4: a PEFT SHiRA adapter made on `tiny` added and switched on `small` (indices inside the larger
    weights), and the packager and converter stamped or accepted it."""
    from shira_runtime.exporters.convert import peft_to_ours
    from shira_runtime.exporters.package import package

    d = _peft_shira(build("tiny", torch.float32, seed=1), tmp_path / "peft")
    small = build("small", torch.float32, seed=1)
    rt, snap = Runtime.load(small), snapshot(small)
    with pytest.raises(BaseMismatchError, match=r"r=2 gives r \* \(out \+ in\)"):
        rt.add_adapter("x", d)
    assert_bit_identical(small, snap)
    with pytest.raises(BaseMismatchError):
        package(small, tmp_path / "bundle", {"x": d}, quiet=True)
    assert not (tmp_path / "bundle").exists()  # nothing written before every adapter checked out
    with pytest.raises(BaseMismatchError):
        peft_to_ours(d, tmp_path / "a.safetensors", small)
    # the right base still takes it
    Runtime.load(build("tiny", torch.float32, seed=1)).add_adapter("x", d)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"lora_alpha": "abc"}, "lora_alpha must be a finite number"),
        ({"lora_alpha": None}, "lora_alpha must be a finite number"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"alpha_pattern": {"(": 1}}, "alpha_pattern key '\\(' is not a valid pattern"),
        ({"alpha_pattern": "abc"}, "alpha_pattern must be an object"),
        ({"use_rslora": "false"}, "use_rslora must be true or false"),
        ({"r": 3}, "the config says rank 3"),
        ({"rank_pattern": {"q_proj": 2}}, "the config says rank 2"),
        ({"target_modules": ["k_proj"]}, "is not in the config's target_modules"),
    ],
)
def test_lora_config_values_are_checked_when_added(tmp_path, edit, message):
    """Defect 6: bad adapter_config.json values escaped at switch as ValueError/TypeError/re.error."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    base = transformers.LlamaForCausalLM(cfg).eval()
    good = tmp_path / "lora"
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), lcfg).save_pretrained(str(good))
    Runtime.load(base).add_adapter("ok", good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    c = json.loads((bad / CONFIG).read_text())
    (bad / CONFIG).write_text(json.dumps(c | edit))
    rt, snap = Runtime.load(base), snapshot(base)
    with pytest.raises(AdapterFormatError, match=message):
        rt.add_adapter("x", bad)
    assert rt.adapters == ()
    assert_bit_identical(base, snap)


def test_repr_lists_lazy_adapters_and_stats_name_the_weight(saved):
    """Defect 8: repr(rt) omitted lazily registered adapters; SwitchStats printed 'ax1' for adapter a at weight 1."""
    m, path = saved
    rt = Runtime.load(m)
    rt.add_adapter("now", path)
    rt.add_adapter("later", path, lazy=True)
    assert "'now', 'later'" in repr(rt)
    stats = rt.switch(["now", "later"], [1.0, 0.5])
    assert "now (weight 1), later (weight 0.5)" in str(stats)


def test_in_memory_shapes_accept_numpy_ints_and_refuse_the_rest():
    """Shapes given in memory: any integer type (numpy, torch) is a dimension; anything else is refused clearly."""
    import numpy as np
    from shira_runtime import AdapterValueError

    idx, val = {"w": torch.tensor([1])}, {"w": torch.tensor([0.1])}
    assert SparseAdapter(idx, val, {"w": (np.int64(4), torch.tensor(3).item())}).shapes == {"w": (4, 3)}
    for bad in [(True, 3), ("x", 3), (-1, 3), [2.0, 3], "ab"]:
        with pytest.raises(AdapterValueError, match="is not non-negative ints"):
            SparseAdapter(idx, val, {"w": bad})
