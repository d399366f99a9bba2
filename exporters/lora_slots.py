"""LoRA slots: linears that carry live, zero-initialised LoRA factors, so an exported bundle can run LoRA unfused.

``export_onnx(module, args, out, lora_rank=R)`` exports each targeted ``nn.Linear`` as
``y = x @ W.T + b + (x @ lora_A.T) @ lora_B.T`` with ``lora_A [R, in]`` and ``lora_B [out, R]`` zero: the
slots are graph inputs like every weight, so the onnxruntime backend writes an adapter's factors into them
(``Runtime.add_adapter(name, lora, mode="unfused")``), up to rank ``R`` per linear. Zero factors add exactly 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

SLOT_A, SLOT_B = "lora_A", "lora_B"


class LoraSlotLinear(nn.Linear):
    """``nn.Linear`` plus an unfused LoRA path whose factors are parameters (the export makes them inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.t()) @ self.lora_B.t()


@contextmanager
def lora_slots(module: nn.Module, targets: Iterable[str] | None, rank: int) -> Iterator[list[str]]:
    """Within the block, the ``nn.Linear`` modules named by ``targets`` (name suffixes, PEFT's rule; None: every
    linear) carry zero LoRA slots of ``rank``; yields their module paths. The module is restored afterwards."""
    if rank <= 0:
        yield []
        return
    targets = tuple(targets) if targets is not None else None
    changed = []
    for name, mod in module.named_modules():
        if type(mod) is not nn.Linear or not name:
            continue
        if targets is not None and name not in targets and name.split(".")[-1] not in targets:
            continue
        w = mod.weight
        mod.__class__ = LoraSlotLinear
        mod.lora_A = nn.Parameter(torch.zeros(rank, w.shape[1], dtype=w.dtype), requires_grad=False)
        mod.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype), requires_grad=False)
        changed.append((name, mod))
    if not changed:
        raise ValueError(f"lora_rank={rank}: no nn.Linear matches the targets {targets}")
    try:
        yield [name for name, _ in changed]
    finally:
        for _, mod in changed:
            mod.__class__ = nn.Linear
            del mod.lora_A, mod.lora_B
