"""Backends expose every weight of a model as a writable tensor, by the base's parameter names.

A backend has:
- ``tensors``: canonical name -> the live, contiguous storage tensor the switcher writes in place;
- ``aliases``: every accepted name (tied weights have several) -> canonical name;
- ``shapes``: canonical name -> logical shape (the parameter's shape, e.g. ``[out, in]`` for a linear);
- ``transposed``: canonical names stored as the transpose of their logical shape (ONNX exports do this);
- ``scales``: canonical names of quantized weights (1-byte codes, ``shira_runtime.quantization``) -> their fixed fp32
  per-row scales ``[rows]``; a switch writes those codes on their grid (``shira_runtime.kernels.qformats``);
- ``mirror(name)``: the copy of a quantized weight the kernels write in the same visit as its codes, or None: an
  FP8 layer's bf16 compute copy (torch), an int8 weight's transposed uint8 copy (bundles); ``resync(name)`` after
  the codes were written by anything else;
- ``after_write(name, indices, since, mirrored)``: called after a switch wrote codes of ``name`` at flat
  ``indices`` through raw pointers (FP8 layers bring their compute copy back in line, unless mirrored);
- ``after_switch(active, written)``: called by the switcher when a switch ended (a mapped bundle hands back
  the pages of written weights once the base is back);
- ``__call__``: one inference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from shira_runtime.errors import AdapterMismatchError
from shira_runtime.kernels.dtypes import FLOATS
from shira_runtime.quantization import QuantLinear, check_scales, scale_name
from torch import nn


class Backend(ABC):
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    transposed: frozenset[str] = frozenset()
    scales: dict[str, torch.Tensor] = {}  # noqa: RUF012 (read-only default: no quantized weights)
    kind = "?"

    def mirror(self, name: str) -> torch.Tensor | None:
        """The copy of quantized weight ``name`` the kernels write beside its codes
        (``shira_runtime.kernels.reference``'s
        mirrors), or None (plain tensors)."""
        return None

    def after_write(self, name: str, indices: list[torch.Tensor], since: int, mirrored: bool = False) -> None:
        """Codes of ``name`` were written at ``indices`` (flat) by a kernel, and its ``mirror`` with them if
        ``mirrored``; ``since``: the codes' version counter before that write. Nothing to do for plain tensors."""
        return None

    def resync(self, name: str) -> None:
        """The codes of ``name`` were written by torch ops (a rollback): bring its mirror back in line. Nothing to
        do by default (an FP8 layer's forward sees the codes' version counter move and refreshes its copy)."""
        return None

    def after_switch(self, active: tuple[tuple[str, float], ...], written: set[str]) -> None:
        """A switch ended (committed or rolled back) with ``active`` applied, having written the weights
        ``written`` (canonical names). Nothing to do by default; a bundle hands back pages once the base is
        back."""
        return None

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

    def check_unfused(self, tensor: str, adapter: str) -> str:
        """The module that an unfused LoRA on ``tensor`` attaches to; raise if this backend cannot."""
        raise AdapterMismatchError(f"adapter {adapter!r}: unfused LoRA is not supported on the {self.kind} backend")

    def check_unfused_plan(self, entries: list[tuple[str, torch.Tensor, torch.Tensor, float]]) -> None:
        """Raise if ``set_unfused(entries)`` could not be done (called before a switch writes anything).

        The base accepts what ``check_unfused`` let through; backends with limited room (LoRA slots) check it.
        """
        return None

    def set_unfused(self, entries: list[tuple[str, torch.Tensor, torch.Tensor, float]]) -> None:
        """Make ``entries`` ``(module, A, B, alpha)`` the unfused LoRA paths run at inference."""
        if entries:
            raise AdapterMismatchError(f"unfused LoRA is not supported on the {self.kind} backend")

    @abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One inference."""


class TorchBackend(Backend):
    """A ``torch.nn.Module``'s own parameters and buffers, written in place."""

    kind = "torch"

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"TorchBackend needs a torch.nn.Module, got {type(module).__name__}")
        self.module = module.eval()
        self.tensors, self.aliases, self.shapes = {}, {}, {}
        self.scales, self.quantized = {}, {}
        quant = {f"{n}.weight" if n else "weight": m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
        skip = {scale_name(k) for k in quant}  # fixed: a switch never moves the grid
        by_storage: dict[tuple, str] = {}
        for name, t in module.state_dict(keep_vars=True).items():
            t = t.data if isinstance(t, nn.Parameter) else t
            if name in quant:
                check_scales(name, quant[name].weight_scale, AdapterMismatchError)
            elif name in skip or t.dtype not in FLOATS:
                continue
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            canon = by_storage.setdefault(key, name)  # tied weights share one storage: write it once
            self.aliases[name] = canon
            if canon == name:
                self.tensors[name] = t
                self.shapes[name] = tuple(t.shape)
                if name in quant:
                    self.scales[name], self.quantized[name] = quant[name].weight_scale, quant[name]
        self._hooks: list = []

    def mirror(self, name: str) -> torch.Tensor | None:
        layer = self.quantized.get(name)
        return layer.mirror() if layer is not None else None

    def after_write(self, name: str, indices: list[torch.Tensor], since: int, mirrored: bool = False) -> None:
        layer = self.quantized.get(name)
        if layer is not None:
            layer.refresh_at(indices, since, mirrored)

    def check_unfused(self, tensor: str, adapter: str) -> str:
        path = tensor.rsplit(".", 1)[0] if tensor.endswith(".weight") else None
        mod = self.module.get_submodule(path) if path else None
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            raise AdapterMismatchError(
                f"adapter {adapter!r}: unfused LoRA needs an nn.Linear; {tensor!r} is not the weight of one"
            )
        return path

    def set_unfused(self, entries: list[tuple[str, torch.Tensor, torch.Tensor, float]]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        by_module: dict[str, list] = {}
        for path, a, b, alpha in entries:
            by_module.setdefault(path, []).append((a, b, alpha))
        for path, terms in by_module.items():
            mod = self.module.get_submodule(path)
            # a quantized layer's output is fp32 (codes are no compute dtype): its LoRA path runs in fp32
            dt = torch.float32 if isinstance(mod, QuantLinear) else mod.weight.dtype
            terms = [(a.to(dt), b.to(dt), alpha) for a, b, alpha in terms]
            self._hooks.append(mod.register_forward_hook(_lora_hook(terms)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.module(*args, **kwargs)


def _lora_hook(terms: list[tuple[torch.Tensor, torch.Tensor, float]]):
    """A forward hook adding ``alpha * (x @ A.T) @ B.T`` for each unfused LoRA term of one linear."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for a, b, alpha in terms:
            out = out + (x @ a.t() @ b.t()) * alpha
        return out

    return hook
