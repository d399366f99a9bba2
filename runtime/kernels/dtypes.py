"""The one dtype table: every floating dtype the runtime stores, under each name a file format gives it.

Adapter files, bundles (manifest, safetensors header, ONNX graph inputs), the kernels and the command-line
tools all look dtypes up here; nothing else keeps its own table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    short: str  # our name, on command lines and in adapter files: "fp32"
    torch: torch.dtype
    numpy: str | None  # numpy's name (bundle manifests); None: numpy has no such dtype
    safetensors: str  # the safetensors header's code
    onnx: int  # onnx.TensorProto's element type (FLOAT=1, FLOAT16=10, BFLOAT16=16)

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.torch).element_size()


TABLE: tuple[DType, ...] = (
    DType("fp32", torch.float32, "float32", "F32", 1),
    DType("fp16", torch.float16, "float16", "F16", 10),
    DType("bf16", torch.bfloat16, None, "BF16", 16),
)
SHORT = {d.short: d for d in TABLE}
TORCH = {d.torch: d for d in TABLE}
# 1-byte codes of a quantized base held by a bundle (int8 only: onnxruntime's CPU provider has no FP8 matmul);
# never a FLOAT: the switch writes them on their grid (``backend.scales``), not as values
CODES: tuple[DType, ...] = (DType("int8", torch.int8, "int8", "I8", 3),)
NUMPY = {d.numpy: d for d in TABLE + CODES if d.numpy}
FLOATS = tuple(d.torch for d in TABLE)  # what the kernels and the switcher write
BUNDLE = ("fp32", "fp16")  # what a bundle holds: onnxruntime's CPU provider lacks bf16 kernels for most ops


def by_short(name: str) -> DType:
    """``"fp32"`` -> its entry; a clear ``ValueError`` for anything else."""
    try:
        return SHORT[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r}: expected one of {sorted(SHORT)}") from None


def of_torch(dtype: torch.dtype) -> DType:
    try:
        return TORCH[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype}: expected one of {[str(d) for d in FLOATS]}") from None
