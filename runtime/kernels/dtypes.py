"""The one dtype table: every floating dtype the runtime stores, under each name a file format gives it.

Adapter files, bundles (manifest, safetensors header, ONNX graph inputs), the kernels and the command-line
tools all look dtypes up here; nothing else keeps its own table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Torch-free: a bundle runs without torch. The torch dtype of an entry is looked up by name on first use
# (``DType.torch``, ``TORCH``, ``FLOATS``), which imports torch then.


@dataclass(frozen=True)
class DType:
    short: str  # our name, on command lines and in adapter files: "fp32"
    torch_name: str  # torch's attribute name: "float32"
    numpy: str | None  # numpy's name (bundle manifests); None: numpy has no such dtype
    safetensors: str  # the safetensors header's code
    onnx: int  # onnx.TensorProto's element type (FLOAT=1, FLOAT16=10, BFLOAT16=16)
    itemsize: int

    @property
    def torch(self) -> Any:
        """The ``torch.dtype`` (imports torch)."""
        import torch

        return getattr(torch, self.torch_name)


TABLE: tuple[DType, ...] = (
    DType("fp32", "float32", "float32", "F32", 1, 4),
    DType("fp16", "float16", "float16", "F16", 10, 2),
    DType("bf16", "bfloat16", None, "BF16", 16, 2),
)
SHORT = {d.short: d for d in TABLE}
# 1-byte codes of a quantized base held by a bundle (int8 only: onnxruntime's CPU provider has no FP8 matmul);
# never a FLOAT: the switch writes them on their grid (``backend.scales``), not as values. uint8: those int8 codes
# + 128 stored transposed (the copy an int8 bundle's graph reads; the kernels' uint8 weights)
CODES: tuple[DType, ...] = (DType("int8", "int8", "int8", "I8", 3, 1), DType("uint8", "uint8", "uint8", "U8", 2, 1))
NUMPY = {d.numpy: d for d in TABLE + CODES if d.numpy}


def __getattr__(name: str):
    # the torch-keyed views of the table, built on first use: ``TORCH`` (torch.dtype -> entry) and ``FLOATS``
    # (the torch dtypes the kernels and the switcher write)
    if name == "TORCH":
        return {d.torch: d for d in TABLE}
    if name == "FLOATS":
        return tuple(d.torch for d in TABLE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


BUNDLE = ("fp32", "fp16")  # what a bundle holds: onnxruntime's CPU provider lacks bf16 kernels for most ops


def by_short(name: str) -> DType:
    """``"fp32"`` -> its entry; a clear ``ValueError`` for anything else."""
    try:
        return SHORT[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {name!r}: expected one of {sorted(SHORT)}") from None


def of_torch(dtype: Any) -> DType:
    """A ``torch.dtype`` -> its entry; a clear ``ValueError`` for anything else."""
    for d in TABLE:
        if d.torch == dtype:
            return d
    raise ValueError(f"dtype {dtype}: expected one of {[str(d.torch) for d in TABLE]}")
