"""SparseAdapter: per tensor, flat row-major indices and delta values (a SHiRA adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.errors import AdapterMismatchError, AdapterValueError
from runtime.fingerprint import Fingerprint

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class SparseAdapter:
    """A sparse adapter: ``W_new = dtype(W_base + weight * scale * delta)`` at ``indices``, computed in fp32.

    ``indices[name]`` is 1-D (flat, row-major) or ``[2, N]`` (row, col) for 2-D tensors whose flat form
    needs the shape; ``values[name]`` is 1-D, same length. ``shapes`` holds the base shapes when known.
    """

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    scale: float = 1.0
    fingerprint: Fingerprint | None = None
    mask_kind: str = "random"

    def __post_init__(self) -> None:
        if set(self.indices) != set(self.values):
            missing = sorted(set(self.indices) ^ set(self.values))
            raise AdapterValueError(f"SparseAdapter: indices and values name different tensors: {missing}")
        self.shapes = {k: tuple(int(d) for d in v) for k, v in self.shapes.items()}

    @property
    def nnz(self) -> int:
        return sum(int(v.numel()) for v in self.values.values())

    def __repr__(self) -> str:
        return f"SparseAdapter({len(self.values)} tensors, nnz={self.nnz}, scale={self.scale})"

    # -- files --
    @staticmethod
    def load(path: str | Path) -> SparseAdapter:
        """Read our adapter file (any supported format version)."""
        from runtime.adapter_file import load_sparse

        return load_sparse(path)

    def save(self, path: str | Path, values: str | None = None) -> None:
        """Write our adapter file (``shapes`` must be known). ``values``: ``"fp16"``, ``"bf16"``, ``"fp32"`` to
        store the deltas in that dtype, None to keep theirs."""
        from runtime.adapter_file import save_sparse

        save_sparse(self, path, values)

    @staticmethod
    def from_peft(directory: str | Path) -> SparseAdapter:
        """Read a PEFT SHiRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from runtime.peft_io import load_peft

        adapter = load_peft(directory)
        if not isinstance(adapter, SparseAdapter):
            raise AdapterMismatchError(f"{directory}: is a PEFT LoRA adapter, not SHiRA (use LoraAdapter)")
        return adapter

    def to_peft(self, directory: str | Path, strict: bool = True) -> Path:
        """Write a PEFT SHiRA adapter directory (see ``runtime.peft_io.save_peft_shira``)."""
        from runtime.peft_io import save_peft_shira

        return save_peft_shira(self, directory, strict)

    # -- canonical form --
    def flat(self, name: str, shape: tuple[int, ...], adapter: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``(indices, values)`` of tensor ``name`` for a base tensor of ``shape``.

        Indices come back flat, sorted, unique, int32 (int64 past 2**31 elements); values are reordered to match.
        Raises a specific error naming the adapter, tensor and index at fault.
        """
        where = f"adapter {adapter!r}, tensor {name!r}"
        idx, val = self.indices[name], self.values[name]
        if name in self.shapes and self.shapes[name] != tuple(shape):
            raise AdapterMismatchError(f"{where}: made for shape {self.shapes[name]}, the base has {tuple(shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise AdapterMismatchError(f"{where}: indices have dtype {idx.dtype}, expected an integer dtype")
        if val.dtype not in VALUE_DTYPES:
            raise AdapterMismatchError(f"{where}: values have dtype {val.dtype}, expected fp32/fp16/bf16")
        if val.dim() != 1:
            raise AdapterMismatchError(f"{where}: values must be 1-D, got shape {tuple(val.shape)}")
        numel = 1
        for d in shape:
            numel *= int(d)
        idx = idx.long()
        if idx.dim() == 2 and idx.shape[0] == 2:
            if len(shape) != 2:
                raise AdapterMismatchError(f"{where}: (row, col) indices given for a {len(shape)}-D tensor")
            rows, cols = idx[0], idx[1]
            for axis, (part, bound) in enumerate(((rows, shape[0]), (cols, shape[1]))):
                bad = (part < 0) | (part >= bound)
                if bool(bad.any()):
                    i = int(bad.nonzero()[0])
                    raise AdapterMismatchError(
                        f"{where}: {'row' if axis == 0 else 'col'} index {int(part[i])} at position {i} "
                        f"out of range for shape {tuple(shape)}"
                    )
            idx = rows * shape[1] + cols
        elif idx.dim() != 1:
            raise AdapterMismatchError(f"{where}: indices must be flat [N] or [2, N], got {tuple(idx.shape)}")
        if idx.numel() != val.numel():
            raise AdapterMismatchError(f"{where}: {idx.numel()} indices but {val.numel()} values")
        bad = (idx < 0) | (idx >= numel)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise AdapterMismatchError(
                f"{where}: index {int(idx[i])} at position {i} out of range for shape {tuple(shape)} ({numel} elements)"
            )
        finite = torch.isfinite(val)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            raise AdapterValueError(
                f"{where}: value {float(val[i])} at position {i} (index {int(idx[i])}) is not finite"
            )
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            order = torch.argsort(idx, stable=True)
            idx, val = idx[order], val[order]
            dup = idx[1:] == idx[:-1]
            if bool(dup.any()):
                i = int(dup.nonzero()[0])
                raise AdapterValueError(f"{where}: index {int(idx[i])} appears more than once")
        return idx.to(torch.int32 if numel < 2**31 else torch.int64).contiguous(), val.contiguous()
