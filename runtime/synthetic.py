"""Random adapters for any module: seeded SHiRA masks at a density, LoRA factors at a rank.

For tests, benchmarks and demos; the SHiRA ones carry a fingerprint of the module they were made for.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from shira_runtime.adapters import LoraAdapter, SparseAdapter
from shira_runtime.fingerprint import Fingerprint
from shira_runtime.masks import random_indices, shira_mask_fn
from torch import nn


def target_weights(module: nn.Module, targets: Iterable[str]) -> dict[str, torch.Tensor]:
    """``<module>.weight`` of every ``nn.Linear`` whose name ends with one of ``targets`` (PEFT's rule)."""
    targets = tuple(targets)
    found = {
        f"{name}.weight": m.weight
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and (name in targets or name.split(".")[-1] in targets)
    }
    if not found:
        raise ValueError(f"no nn.Linear in the module matches targets {list(targets)}")
    return found


def random_shira(
    module: nn.Module,
    targets: Iterable[str],
    density: float = 0.01,
    seed: int = 0,
    std: float = 0.01,
    values_dtype: torch.dtype = torch.float32,
    mask: str | None = None,
    batch: torch.Tensor | None = None,
    line_dtype: torch.dtype | str | None = None,
    transposed: bool = False,
) -> SparseAdapter:
    """A random SHiRA adapter over the target linears: ``density`` of each weight, deltas ~ N(0, std).

    ``mask``: a kind of ``shira_runtime.masks`` (``block`` without ``batch``: random blocks) picks the positions,
    PEFT's way: ``r * (out + in)`` per layer for one ``r``
    (the adapter's ``density`` overall; saved as PEFT SHiRA, it loads in PEFT); None: uniformly random
    positions, ``round(density * numel)`` in each weight. ``batch`` (input ids) is the calibration batch of the
    gradient kinds (``grad``, ``snip``, SNIP-scored ``block``): one forward/backward of ``module`` on it.
    ``line_dtype``: a ``block`` mask's blocks are 64-byte lines of this dtype (the base it will be switched on;
    None: the module's own weights); ``transposed``: lines of the weights stored ``[in, out]`` (an int8 bundle)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density {density} is not in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    weights = target_weights(module, targets)
    fn = None
    if mask is not None:
        fn = shira_mask_fn(
            mask,
            module if batch is not None else None,
            batch,
            seed=seed,
            targets=targets,
            line_dtype=line_dtype,
            transposed=transposed,
        )
        linears = {f"{n}.weight": m for n, m in module.named_modules() if f"{n}.weight" in weights}
        total = sum(w.numel() for w in weights.values())
        r = max(1, round(density * total / sum(w.shape[0] + w.shape[1] for w in weights.values())))
    indices, values, shapes = {}, {}, {}
    for name, w in weights.items():
        if fn is None:
            idx = random_indices(w.numel(), max(1, round(density * w.numel())), gen)
        else:
            idx = fn.flat(linears[name], r).cpu().to(torch.int32 if w.numel() < 2**31 else torch.int64)
        indices[name] = idx
        values[name] = (torch.randn(idx.numel(), generator=gen) * std).to(values_dtype)
        shapes[name] = tuple(w.shape)
    return SparseAdapter(indices, values, shapes, 1.0, Fingerprint.of(weights, indices))


def random_lora(
    module: nn.Module,
    targets: Iterable[str],
    rank: int = 32,
    seed: int = 0,
    alpha: float | None = None,
    std: float = 0.01,
) -> LoraAdapter:
    """A random LoRA adapter over the target linears (both factors random, so the delta is not zero)."""
    gen = torch.Generator().manual_seed(seed)
    weights = target_weights(module, targets)
    A, B, scaling = {}, {}, {}
    for name, w in weights.items():
        out_f, in_f = w.shape
        A[name] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        B[name] = torch.randn(out_f, rank, generator=gen) * std
        scaling[name] = (alpha if alpha is not None else 2 * rank) / rank
    return LoraAdapter(A, B, scaling)
