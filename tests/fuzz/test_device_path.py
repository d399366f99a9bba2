"""Part C: the fuzzed bundles and adapter files of parts A and B, on the device path (``tests.device``: a process
where torch, onnx, transformers and peft cannot be imported). Each case is loaded (a bundle: run on its example
input, every adapter switched to and away; an adapter file or PEFT LoRA directory: added to the unmutated bundle,
switched to and away) in that process and in one with torch; both must end the same way: the same documented
error with the same message, or the same output bytes.

One difference is by design: a bundle whose manifest lost its prepared live graph (``live``) loads where the
``onnx`` package can prepare it again, and is refused on the device path with a message that says so.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests import device
from tests.fuzz.bundle_cases import BUNDLE_FAMILIES
from tests.fuzz.harness import family_rng
from tests.fuzz.test_adapter_files import FAMILIES, adapter_cases

pytest.importorskip("onnxruntime")

WORKER = """
import hashlib, json, math, sys
from pathlib import Path
import numpy as np
from shira_runtime import Runtime

jobs, bundle = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]

def example(rt):
    out = {}
    for spec in rt.backend.manifest.inputs:
        shape, dtype = tuple(spec["example_shape"]), np.dtype(spec["dtype"])
        x = (np.arange(math.prod(shape)) * 5 + 1) % 7 if dtype.kind in "iu" else np.linspace(-1, 1, math.prod(shape))
        out[spec["name"]] = x.astype(dtype).reshape(shape)
    return out

def digest(h, y):
    for a in (y if isinstance(y, list) else [y]):
        h.update(np.ascontiguousarray(a).tobytes())

def outcome(fn):
    try:
        return ["ok", fn()]
    except Exception as exc:
        return ["raised", type(exc).__name__, str(exc)]

def use_bundle(path):
    rt = Runtime.load(path)
    h, x = hashlib.sha256(), None
    for name in [None, *sorted(rt.adapters), None]:
        rt.switch(name)
        x = x or example(rt)
        digest(h, rt(**x))
    return h.hexdigest()

ref = Runtime.load(bundle)
x = example(ref)

def use_adapter(i, path):
    h = hashlib.sha256()
    ref.add_adapter(f"case{i}", path)
    try:
        ref.switch(f"case{i}")
        digest(h, ref(**x))
    finally:
        ref.switch(None)
        ref.remove_adapter(f"case{i}")
    digest(h, ref(**x))
    return h.hexdigest()

results = {}
for i, (kind, path) in enumerate(jobs):
    results[path] = outcome(lambda: use_bundle(path)) if kind == "bundle" else outcome(lambda: use_adapter(i, path))
print("RESULTS " + json.dumps(results))
"""


def _results(jobs_file, bundle, block: bool) -> dict:
    out, modules = device.run(WORKER, str(jobs_file), str(bundle), block=block, timeout=600)
    if block:
        assert modules == [], f"the device path imported {modules}"
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULTS "))[8:])


def test_fuzzed_inputs_end_the_same_way_without_torch(bundle_world, adapter_sources, tmp_path):
    jobs = []
    for family in BUNDLE_FAMILIES:
        for i, (params, _, apply, _) in enumerate(BUNDLE_FAMILIES[family](family_rng(family), bundle_world.root)):
            dst = tmp_path / "bundles" / f"{family}-{i:03d}"
            shutil.copytree(bundle_world.root, dst)
            apply(dst)
            jobs.append(("bundle", str(dst), params))
    for family in FAMILIES:
        for case in adapter_cases(adapter_sources, family):
            src = adapter_sources.paths[case.original]
            dst = tmp_path / "adapters" / f"{family}-{case.index:03d}{src.suffix}"
            dst.parent.mkdir(exist_ok=True)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
            case.apply(dst)
            jobs.append(("adapter", str(dst), case.params))
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps([[kind, path] for kind, path, _ in jobs]))
    without, with_torch = _results(jobs_file, bundle_world.root, True), _results(jobs_file, bundle_world.root, False)
    differ, by_design = [], 0
    for kind, path, params in jobs:
        a, b = without[path], with_torch[path]
        if a == b:
            continue
        if kind == "bundle" and a[0] == "raised" and "needs the `onnx` package" in a[2] and b[0] == "ok":
            assert "live" in json.dumps(params), (path, params, a)  # only a bundle that lost its live graph
            by_design += 1
            continue
        differ.append(f"{path} {params}: without torch {a}, with torch {b}")
    print(f"device path: {len(jobs)} fuzzed inputs, {len(jobs) - len(differ) - by_design} ended the same way, "
          f"{by_design} need onnx to prepare a live graph again")
    assert not differ, "\n".join(differ[:20])
    assert sum(r[0] == "raised" for r in without.values()) > len(jobs) // 2  # the cases are hostile, not all benign
