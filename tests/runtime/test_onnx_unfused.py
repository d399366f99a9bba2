"""Unfused LoRA on onnxruntime: adapters written into the bundle's LoRA slots, weights untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from shira_runtime import AdapterMismatchError, Runtime  # noqa: E402
from shira_runtime.exporters import export_onnx  # noqa: E402
from shira_runtime.models import TARGETS, build  # noqa: E402
from shira_runtime.synthetic import random_lora, random_shira  # noqa: E402

from tests.conftest import as_torch  # noqa: E402

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    m = build("tiny", torch.float32, seed=3)
    tmp = tmp_path_factory.mktemp("slots")
    export_onnx(m, IDS[:1], tmp / "slots", lora_rank=8, lora_targets=TARGETS)
    export_onnx(m, IDS[:1], tmp / "plain")
    return m, tmp / "slots", tmp / "plain"


def test_unfused_lora_matches_the_torch_runtime_and_leaves_weights_alone(bundles):
    m, slots, plain = bundles
    la, lb = random_lora(m, TARGETS, 4, seed=1, std=0.05), random_lora(m, TARGETS, 4, seed=2, std=0.05)
    s = random_shira(m, TARGETS, 0.05, seed=3)
    rt, ref = Runtime.load(slots), Runtime.load(m)
    base = rt(IDS)
    np.testing.assert_allclose(base, Runtime.load(plain)(IDS), atol=1e-5)  # zero slots add nothing
    weights = {n: as_torch(t).clone() for n, t in rt.backend.tensors.items() if ".lora_" not in n}
    for r in (rt, ref):
        r.add_adapter("la", la, mode="unfused")
        r.add_adapter("lb", lb, mode="unfused")
        r.add_adapter("s", s)
    for state, w in (("la", None), (["la", "lb"], [1.0, -0.5]), (["s", "lb"], None), ("lb", None)):
        rt.switch(state, w)
        ref.switch(state, w)
        np.testing.assert_allclose(rt(IDS), ref(IDS).numpy(), atol=1e-4, rtol=1e-4)
        if state in ("la", "lb"):
            assert all(torch.equal(as_torch(t), weights[n]) for n, t in rt.backend.tensors.items() if n in weights)
    rt.switch(None)
    assert np.array_equal(rt(IDS), base)
    assert all(not t.any() for n, t in rt.backend.tensors.items() if ".lora_" in n)


def test_too_high_a_rank_or_no_slot_is_refused_and_changes_nothing(bundles):
    m, slots, plain = bundles
    rt = Runtime.load(slots)
    rt.add_adapter("s", random_shira(m, TARGETS, 0.05, seed=3))
    rt.add_adapter("big", random_lora(m, TARGETS, 6, seed=1), mode="unfused")
    rt.add_adapter("big2", random_lora(m, TARGETS, 6, seed=2), mode="unfused")
    rt.switch(["s", "big"])
    before = {n: as_torch(t).clone() for n, t in rt.backend.tensors.items()}
    with pytest.raises(AdapterMismatchError, match="need rank 12, its slot holds 8"):
        rt.switch(["big", "big2"])  # 6 + 6 > 8
    assert rt.active == (("s", 1.0), ("big", 1.0))
    assert all(torch.equal(as_torch(t), before[n]) for n, t in rt.backend.tensors.items())
    with pytest.raises(AdapterMismatchError, match="no LoRA slot"):
        Runtime.load(plain).add_adapter("l", random_lora(m, TARGETS, 2, seed=1), mode="unfused")
