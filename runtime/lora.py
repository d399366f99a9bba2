"""LoraAdapter: per tensor ``A [r, in]``, ``B [out, r]`` and a scaling; the baselines SHiRA is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.errors import AdapterMismatchError, AdapterValueError


@dataclass
class LoraAdapter:
    """A LoRA adapter: ``W_new = dtype(W_base + weight * scaling * B @ A)``, computed in fp32.

    ``scaling[name]`` is ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA), per tensor.
    ``fan_in_fan_out``: the base stores the weight as ``[in, out]`` (GPT-2 ``Conv1D``): the delta is transposed.
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if set(self.A) != set(self.B):
            raise AdapterValueError(f"LoraAdapter: A and B name different tensors: {sorted(set(self.A) ^ set(self.B))}")
        for name in self.A:
            self.scaling.setdefault(name, 1.0)

    @property
    def params(self) -> int:
        return sum(int(self.A[n].numel() + self.B[n].numel()) for n in self.A)

    def __repr__(self) -> str:
        ranks = sorted({int(a.shape[0]) for a in self.A.values()})
        return f"LoraAdapter({len(self.A)} tensors, rank {ranks}, params={self.params})"

    @staticmethod
    def from_peft(directory: str | Path) -> LoraAdapter:
        """Read a PEFT LoRA adapter directory."""
        from runtime.peft_io import load_peft

        adapter = load_peft(directory)
        if not isinstance(adapter, LoraAdapter):
            raise AdapterMismatchError(f"{directory}: is a PEFT SHiRA adapter, not LoRA (use SparseAdapter)")
        return adapter

    def factors(self, name: str, shape: tuple[int, ...], adapter: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
        """Validated fp32 ``(A, B)`` for tensor ``name`` of a base tensor of ``shape``; delta is ``B @ A``."""
        where = f"adapter {adapter!r}, tensor {name!r}"
        a, b = self.A[name], self.B[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterMismatchError(
                f"{where}: LoRA factors A {tuple(a.shape)} and B {tuple(b.shape)} do not form B @ A"
            )
        out_in = (b.shape[0], a.shape[1])
        want = tuple(shape[::-1]) if self.fan_in_fan_out else tuple(shape)
        if len(shape) != 2 or out_in != want:
            raise AdapterMismatchError(f"{where}: B @ A has shape {out_in}, the base tensor has {tuple(shape)}")
        for label, t in (("A", a), ("B", b)):
            if not t.dtype.is_floating_point:
                raise AdapterMismatchError(f"{where}: {label} has dtype {t.dtype}, expected a float dtype")
            if not bool(torch.isfinite(t).all()):
                raise AdapterValueError(f"{where}: {label} holds NaN or Inf values")
        return a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
