"""Shared test helpers: bit-exact snapshots of a module's tensors."""

from __future__ import annotations

import pytest
import torch

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


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
