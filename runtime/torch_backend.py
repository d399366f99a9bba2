"""The torch backend: a ``torch.nn.Module``'s own parameters and buffers, switched in place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from shira_runtime.arrays import torch_ops
from shira_runtime.backend import Backend
from shira_runtime.errors import AdapterMismatchError
from shira_runtime.kernels.dtypes import FLOATS
from shira_runtime.quantization import QuantLinear, check_scales, scale_name
from torch import nn

# Whole-tensor work (a fused LoRA merge, a base copy) runs single-threaded when every tensor of the switch, and its
# sparse entries, hold fewer elements than this. Measured (``python -m benchmarks.scaling --dense``, docs/results/
# scaling.md; 2-vCPU AMD EPYC, torch 2.13): a fused LoRA switch on an n x n linear gains nothing from torch's second
# thread up to 2^16 elements (0.93-0.99x) and 16% just below 2^17, while with the other vCPU busy the threads cost
# 1.1-22x (mean over 200 switches) at every size: spinning OpenMP threads that cannot run stall the switch.
DENSE_SERIAL_BELOW = 1 << 17


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 for the block, restored after it (process-wide: torch has no per-call
    setting; the runtime's write lock keeps its own inference out meanwhile)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class TorchBackend(Backend):
    """A ``torch.nn.Module``'s own parameters and buffers, written in place."""

    kind = "torch"
    no_scale = torch.empty(0)  # a float weight's entry in the kernels' scale list
    no_mirror = torch.empty(0, dtype=torch.bfloat16)  # a weight without a compute copy, in the kernels' mirror lists

    @property
    def ops(self):
        return torch_ops()

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
        self.followed = frozenset(n for n, layer in self.quantized.items() if layer.has_compute_copy)  # FP8 layers
        self._hooks: list = []

    def serial(self, largest: int) -> AbstractContextManager:
        return _one_thread() if 0 < largest < DENSE_SERIAL_BELOW else nullcontext()

    def mirror(self, name: str) -> torch.Tensor | None:
        layer = self.quantized.get(name)
        return layer.mirror() if layer is not None else None

    def after_write(self, name: str, indices: list[torch.Tensor], since: int, mirrored: bool = False) -> None:
        layer = self.quantized.get(name)
        if layer is not None:
            layer.refresh_at(indices, since, mirrored)

    def mirrors_of(self, names: tuple[str, ...], kept: tuple | None = None) -> tuple:
        # each layer's buffers read directly, and a kept tuple checked by identity (``mirror`` compares shapes: a
        # torch.Size each, ~1 us a layer, which a switch over 210 FP8 layers paid twice)
        quantized, none = self.quantized, self.no_mirror
        if kept is not None:
            for t, m in zip(names, kept):
                layer = quantized.get(t)
                if layer is None:
                    continue
                buffers = layer._buffers
                copy = buffers.get("weight_compute")
                if copy is not m and (m is not none or (copy is not None and copy.shape == buffers["weight"].shape)):
                    break  # a copy made or replaced since (the codes' shape checked when one was kept)
            else:
                return kept
        return tuple(none if (m := self.mirror(t)) is None else m for t in names)

    def after_writes(
        self, names: tuple[str, ...], versions: list[int], mirrored: frozenset[str], indices: dict[str, list]
    ) -> None:
        quantized = self.quantized
        for t, since in zip(names, versions):
            layer = quantized[t]
            if t in mirrored and layer._synced == since:  # in step before; the kernels wrote it with the codes
                layer.__dict__["_synced"] = layer._buffers["weight"]._version  # as refresh_at(mirrored=True)
            else:
                layer.refresh_at(indices.get(t, []), since, t in mirrored)

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
