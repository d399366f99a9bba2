"""The originals every fuzz case starts from, built once: a tiny base, adapter files, a PEFT LoRA directory
and a packaged bundle, each with the reference result of using it unmutated."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from shira_runtime import Runtime
from shira_runtime.models import TARGETS, build
from shira_runtime.synthetic import random_shira

from tests.conftest import snapshot
from tests.fuzz.harness import SEED, TALLIES, AdapterWorld, BundleWorld, as_list, same

# original name -> (values dtype of the saved file, seed of random_shira, mask kind: None random, "block" runs)
ORIGINALS = {
    "fp16_s101": ("fp16", 101, None),
    "fp16_s102": ("fp16", 102, None),
    "fp32_s103": ("fp32", 103, None),
    "block_s104": ("fp16", 104, "block"),  # stored as runs (format version 4)
}
LORA = "peft_lora"
MIN_ADAPTER_CASES, MIN_BUNDLE_CASES = 500, 200


@dataclass
class AdapterSources:
    world: AdapterWorld
    paths: dict[str, Path]  # original -> unmutated file (our format) or directory (PEFT LoRA)

    def files(self) -> dict[str, bytes]:
        return {n: p.read_bytes() for n, p in self.paths.items() if p.is_file()}


def peft_lora_dir(base: torch.nn.Module, path: Path, seed: int) -> Path:
    """A LoRA adapter directory written by PEFT itself (q_proj and v_proj, r=4, non-zero factors)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def adapter_sources(tmp_path_factory) -> AdapterSources:
    tmp = tmp_path_factory.mktemp("originals")
    module = build("tiny", torch.float32, seed=1)
    pristine = {k: v.clone() for k, v in module.state_dict().items()}
    paths = {}
    for name, (values, seed, mask) in ORIGINALS.items():
        paths[name] = tmp / f"{name}.safetensors"
        random_shira(module, TARGETS, 0.02, seed=seed, mask=mask).save(paths[name], values=values)
    paths[LORA] = peft_lora_dir(module, tmp / LORA, seed=7)
    world = AdapterWorld(module, pristine, snapshot(module), {})
    for name, path in paths.items():
        rt = Runtime.load(module)
        rt.add_adapter("reference", path)
        rt.switch("reference")
        world.applied[name] = snapshot(module)
        rt.switch(None)
        assert world.differing(world.applied[name], world.base), f"{name} changes no weight: a useless reference"
        assert not world.differing(snapshot(module), world.base), f"{name}: the base did not come back"
    return AdapterSources(world, paths)


def example_input(manifest: dict) -> dict[str, np.ndarray]:
    """The manifest's example input: small non-negative ints (valid token ids) or a ramp for float inputs."""
    out = {}
    for spec in manifest["inputs"]:
        shape, dtype = tuple(spec["example_shape"]), np.dtype(spec["dtype"])
        n = math.prod(shape)
        x = (np.arange(n) * 5 + 1) % 7 if dtype.kind in "iu" else np.linspace(-1.0, 1.0, n)
        out[spec["name"]] = x.astype(dtype).reshape(shape)
    return out


@pytest.fixture(scope="module")
def bundle_world(adapter_sources, tmp_path_factory) -> BundleWorld:
    """A tiny packaged bundle: SHiRA 'a' (in memory) and 'b' (our file), PEFT LoRA 'l'; fp16 deltas."""
    pytest.importorskip("onnxruntime")
    from shira_runtime.exporters.package import package

    tmp = tmp_path_factory.mktemp("bundle")
    base = adapter_sources.world.module
    random_shira(base, TARGETS, 0.02, seed=12).save(tmp / "b.safetensors", values="fp16")
    adapters = {
        "a": random_shira(base, TARGETS, 0.02, seed=11),
        "b": tmp / "b.safetensors",
        "l": adapter_sources.paths[LORA],
    }
    root = package(base, tmp / "bundle", adapters, values="fp16", quiet=True)
    example = example_input(json.loads((root / "manifest.json").read_text()))
    rt = Runtime.load(root)
    outputs = {None: as_list(rt(**example))}
    for name in sorted(rt.adapters):
        rt.switch(name)
        outputs[name] = as_list(rt(**example))
        rt.switch(None)
        assert not same(outputs[name], outputs[None]), f"adapter {name} does not change the output"
        assert same(rt(**example), outputs[None])
    return BundleWorld(root, example, outputs, frozenset(rt.adapters))


def pytest_terminal_summary(terminalreporter) -> None:
    if not TALLIES:
        return
    tr = terminalreporter
    tr.section(f"shira fuzz (SHIRA_FUZZ_SEED={SEED})")
    for tally in TALLIES.values():
        tr.write_line(tally.line())
    cases = sum(t.cases for t in TALLIES.values())
    raised = sum(t.raised for t in TALLIES.values())
    equal = sum(t.equal for t in TALLIES.values())
    failed = sum(len(t.failures) for t in TALLIES.values())
    tr.write_line(f"total: {cases} cases, {raised} raised a documented error, {equal} loaded equal, {failed} failed")
