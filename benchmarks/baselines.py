"""Baselines that benchmarks and tests share: LoRA merged into a quantized base the PEFT way.

The runtime refuses fused LoRA on quantized weights (every code and scale would change, no exact revert), so
the way PEFT does it lives here, for ``benchmarks.switch_latency``, ``benchmarks.quant_survival`` and their tests.
"""

from __future__ import annotations

import torch
from shira_runtime.kernels.qformats import FORMATS
from shira_runtime.quantization import QuantLinear


class RequantLora:
    """LoRA merged into a quantized base the PEFT way (bitsandbytes' ``merge``/``unmerge``): each merge or unmerge
    dequantizes the whole tensor, adds (or subtracts) ``s * B @ A`` in fp32 and requantizes the whole tensor with
    new per-row scales (``quantize_weight``). A switch A -> B is an unmerge of A and a merge of B. Nothing keeps
    the base: every round trip drifts. Codes and scales are written in place (FP8 compute copies refreshed)."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        layers = {f"{n}.weight": m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
        missing = [n for n in names if n not in layers]
        if missing:
            raise ValueError(f"RequantLora: {missing} are not QuantLinear weights of this module")
        self.layers = [layers[n] for n in names]
        self.names = names

    def merge(self, lora, sign: float = 1.0) -> None:
        for name, layer in zip(self.names, self.layers):
            w = layer.dequantize_weight()
            w.addmm_(lora.B[name], lora.A[name], alpha=sign * lora.scaling[name])
            codes, scale = requantize_fast(w, layer.format)
            layer.weight.copy_(codes)
            layer.weight_scale.copy_(scale)
            layer.refresh_rows()

    def switch(self, old, new) -> None:
        if old is not None:
            self.merge(old, -1.0)
        if new is not None:
            self.merge(new, 1.0)


def requantize_fast(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_weight(w, fmt)`` in the fewest torch ops (what a PEFT-style merge would run): per-row scales
    ``amax / max``, then round-half-even and clamp (int8) or clamp and torch's fp8 cast (itself
    round-to-nearest-even); no NaN check. Bit for bit ``quantize_weight`` on finite weights (tested)."""
    f = FORMATS[fmt]
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / f.max, torch.ones_like(amax))
    x = w / scale[:, None]
    if f.is_int:
        return x.round_().clamp_(-f.max, f.max).to(f.dtype), scale
    return x.clamp_(-f.max, f.max).to(f.dtype), scale


def code_bytes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every QuantLinear's codes and scales as raw bytes (clones): what 'bytes changed' compares."""
    out = {}
    for n, m in module.named_modules():
        if isinstance(m, QuantLinear):
            out[f"{n}.weight"] = m.weight.view(torch.uint8).flatten().clone()
            out[f"{n}.weight_scale"] = m.weight_scale.view(torch.uint8).flatten().clone()
    return out


def bytes_changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> tuple[int, int]:
    """(bytes that differ from ``before``, total bytes) over every QuantLinear's codes and scales."""
    now = code_bytes(module)
    diff = sum(int((now[k] != v).sum()) for k, v in before.items())
    return diff, sum(v.numel() for v in before.values())


class RequantSwitch:
    """``RequantLora`` behind a ``switch(name | None)`` (what ``Inference`` and ``gen_timing`` drive): each
    switch unmerges what is merged and merges the named adapter of ``adapters``, requantizing whole tensors."""

    def __init__(self, req: RequantLora, adapters: dict) -> None:
        self.req, self.adapters, self.current = req, adapters, None

    def switch(self, name: str | None) -> None:
        if name != self.current:
            self.req.switch(self.adapters.get(self.current), self.adapters.get(name))
            self.current = name
