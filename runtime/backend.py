"""Backends expose every weight of a model as a writable tensor, by the base's parameter names.

A backend has:
- ``tensors``: canonical name -> the live, contiguous storage tensor the switcher writes in place;
- ``aliases``: every accepted name (tied weights have several) -> canonical name;
- ``shapes``: canonical name -> logical shape (the parameter's shape, e.g. ``[out, in]`` for a linear);
- ``transposed``: canonical names stored as the transpose of their logical shape (ONNX exports do this);
- ``__call__``: one inference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from runtime.errors import AdapterMismatchError


class Backend:
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    transposed: frozenset[str] = frozenset()
    kind = "?"

    def canonical(self, name: str, adapter: str) -> str:
        try:
            return self.aliases[name]
        except KeyError:
            tail = name.split(".")[-2:]  # e.g. ['q_proj', 'weight']: suggest tensors ending the same way
            close = [n for n in self.aliases if n.split(".")[-2:] == tail][:3]
            hint = f"; similar names: {close}" if close else ""
            raise AdapterMismatchError(
                f"adapter {adapter!r}: tensor {name!r} is not a weight of this base model{hint}"
            ) from None

    def storage_index(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Map logical flat indices (row-major over ``shapes[name]``) to flat indices of the storage tensor."""
        if name not in self.transposed:
            return idx
        rows, cols = self.shapes[name]
        idx = idx.long()
        return (idx % cols) * rows + idx // cols

    def logical(self, name: str) -> torch.Tensor:
        """The tensor ``name`` viewed in its logical shape (a transposed view where storage is transposed)."""
        t = self.tensors[name]
        return t.t() if name in self.transposed else t

    def check_writable(self, name: str, adapter: str) -> None:
        t = self.tensors[name]
        if not t.is_contiguous() or t.device.type != "cpu":
            raise AdapterMismatchError(
                f"adapter {adapter!r}: tensor {name!r} is not a contiguous CPU tensor; cannot switch it in place"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not run inference")


class TorchBackend(Backend):
    """A ``torch.nn.Module``'s own parameters and buffers, written in place."""

    kind = "torch"

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"TorchBackend needs a torch.nn.Module, got {type(module).__name__}")
        self.module = module.eval()
        self.tensors, self.aliases, self.shapes = {}, {}, {}
        by_storage: dict[tuple, str] = {}
        for name, t in module.state_dict(keep_vars=True).items():
            t = t.data if isinstance(t, nn.Parameter) else t
            if not t.is_floating_point():
                continue
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            canon = by_storage.setdefault(key, name)  # tied weights share one storage: write it once
            self.aliases[name] = canon
            if canon == name:
                self.tensors[name] = t
                self.shapes[name] = tuple(t.shape)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.module(*args, **kwargs)
