"""The switcher: turns a set of (adapter, weight) pairs into writes, and keeps what an exact revert needs.

State after a switch, per touched storage tensor ``t``:
- sparse: ``(idx, saved)``: the base values at ``idx`` (the union of the active adapters' indices);
- dense (a LoRA adapter touches ``t``): a full copy of the base tensor.
New values are ``dtype(base + sum_i alpha_i * delta_i)``, the sum taken in fp32 in the order given, with
``alpha_i = fp32(weight_i * scale_i)``; rounded once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import kernels
from runtime.backend import Backend
from runtime.errors import AdapterValueError


@dataclass
class Prepared:
    """An adapter validated against one backend, in storage layout, ready to switch."""

    name: str
    scale: float
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # t -> (idx, delta fp32)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # t -> (A, B, scaling)
    absmax: dict[str, float] = field(default_factory=dict)  # t -> max |delta| (sparse parts)
    # unfused LoRA: module path -> (A, B, scaling); applied at inference, weights untouched
    unfused: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def tensors(self) -> set[str]:
        return set(self.sparse) | set(self.lora)


@dataclass
class Plan:
    """Everything a switch writes, computed before the first write."""

    active: tuple[tuple[str, float], ...]
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]]  # t -> (idx, summed scaled delta fp32)
    # t -> [("sparse", (idx, delta), alpha) | ("lora", (A, B), alpha)], summed in this order
    dense: dict[str, list[tuple[str, object, float]]]
    unfused: list[tuple[str, torch.Tensor, torch.Tensor, float]] = field(default_factory=list)  # (module, A, B, alpha)


@dataclass(frozen=True)
class SwitchStats:
    """What one ``switch`` did."""

    ms: float
    elements_written: int
    bytes_touched: int
    active: tuple[tuple[str, float], ...]
    kernels: str

    def __str__(self) -> str:
        names = ", ".join(f"{n}x{w:g}" for n, w in self.active) or "base"
        return (
            f"switch -> {names}: {self.ms:.2f} ms, {self.elements_written} elements written, "
            f"{self.bytes_touched / 1e6:.1f} MB touched ({self.kernels} kernels)"
        )


EMPTY_PLAN = Plan((), {}, {}, [])


class Switcher:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.plan: Plan = EMPTY_PLAN
        self.sparse_saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # t -> (idx, saved base values)
        self.dense_saved: dict[str, torch.Tensor] = {}  # t -> full copy of the base tensor
        self._absmax: dict[str, float] = {}

    # -- reading the base while adapters may be applied --
    def base_values(self, t: str, idx: torch.Tensor) -> torch.Tensor:
        """Base values of storage tensor ``t`` at flat ``idx`` (whatever is applied now)."""
        if t in self.dense_saved:
            return self.dense_saved[t].view(-1)[idx.long()]
        out = self.backend.tensors[t].view(-1)[idx.long()]
        if t in self.sparse_saved:
            aidx, saved = self.sparse_saved[t]
            if aidx.numel():
                pos = torch.searchsorted(aidx, idx.to(aidx.dtype)).clamp_(max=aidx.numel() - 1)
                hit = aidx[pos] == idx.to(aidx.dtype)
                out[hit] = saved[pos[hit]]
        return out

    def base_absmax(self, t: str) -> float:
        """An upper bound on |base| over tensor ``t`` (cached): for the overflow check."""
        if t not in self._absmax:
            m = self.backend.tensors[t].abs().max().item() if self.backend.tensors[t].numel() else 0.0
            if t in self.sparse_saved and self.sparse_saved[t][1].numel():
                m = max(m, self.sparse_saved[t][1].abs().max().item())
            if t in self.dense_saved:
                m = max(m, self.dense_saved[t].abs().max().item())
            self._absmax[t] = float(m)
        return self._absmax[t]

    # -- planning (no writes) --
    def make_plan(self, items: list[tuple[Prepared, float]]) -> Plan:
        if not items:
            return EMPTY_PLAN
        contrib: dict[str, list[tuple[str, object, float]]] = {}
        bound: dict[str, float] = {}  # t -> an upper bound on |sum of sparse deltas|
        for prep, weight in items:
            alpha = _fp32(weight * prep.scale)
            for t, part in prep.sparse.items():
                contrib.setdefault(t, []).append(("sparse", part, alpha))
                bound[t] = bound.get(t, 0.0) + abs(alpha) * prep.absmax[t]
            for t, (a, b, scaling) in prep.lora.items():
                contrib.setdefault(t, []).append(("lora", (a, b), _fp32(alpha * scaling)))
        unfused = [
            (module, a, b, _fp32(weight * scaling))
            for prep, weight in items
            for module, (a, b, scaling) in prep.unfused.items()
        ]
        sparse, dense = {}, {}
        for t, parts in contrib.items():
            if any(kind == "lora" for kind, _, _ in parts):
                dense[t] = parts
            else:
                sparse[t] = _combine(parts)
                self._check_range(t, sparse[t][1], bound[t])
        self.backend.check_unfused_plan(unfused)
        return Plan(tuple((p.name, float(w)) for p, w in items), sparse, dense, unfused)

    def _check_range(self, t: str, delta: torch.Tensor, delta_bound: float) -> None:
        """Refuse a sparse result the dtype cannot hold: a cached bound first, the exact max only if it fails."""
        w = self.backend.tensors[t]
        limit = torch.finfo(w.dtype).max
        if not delta.numel() or self.base_absmax(t) + delta_bound <= limit:
            return
        reach = self.base_absmax(t) + delta.abs().max().item()
        if reach > limit:
            raise AdapterValueError(
                f"tensor {t!r}: base + delta may reach {reach:.3g}, beyond what {w.dtype} holds ({limit:.3g})"
            )

    # -- writing --
    def switch(self, plan: Plan) -> SwitchStats:
        t0 = time.perf_counter()
        old = self.plan
        written = self._write(old, plan)
        try:
            self._apply_dense(plan)
        except BaseException:
            self._undo_dense_partial()
            self._write(plan, old, dense_out=False)
            self._apply_dense(old)
            raise
        self.backend.set_unfused(plan.unfused)
        self.plan = plan
        ms = (time.perf_counter() - t0) * 1e3
        restored = [t for t in old.dense if t not in plan.dense]  # copied back whole
        written += sum(self.backend.tensors[t].numel() for t in [*plan.dense, *restored])
        nbytes = self._bytes(old) + self._bytes(plan)
        return SwitchStats(ms, written, nbytes, plan.active, kernels.backend())

    def _bytes(self, plan: Plan) -> int:
        n = 0
        for t, (idx, _) in plan.sparse.items():
            n += 2 * idx.numel() * self.backend.tensors[t].element_size()
        for t in plan.dense:
            n += 2 * self.backend.tensors[t].numel() * self.backend.tensors[t].element_size()
        return n

    def _write(self, old: Plan, new: Plan, dense_out: bool = True) -> int:
        """Restore ``old`` (dense then sparse) and apply ``new``'s sparse part, in one kernel call."""
        tensors = self.backend.tensors
        if dense_out:
            for t in old.dense:
                if t not in new.dense:  # still dense after: its base copy stays, the apply rewrites it whole
                    tensors[t].copy_(self.dense_saved.pop(t))
        out_t = list(self.sparse_saved)
        out_idx = [self.sparse_saved[t][0] for t in out_t]
        out_saved = [self.sparse_saved[t][1] for t in out_t]
        in_t = list(new.sparse)
        in_idx = [new.sparse[t][0] for t in in_t]
        in_delta = [new.sparse[t][1] for t in in_t]
        in_saved = [torch.empty(i.numel(), dtype=tensors[t].dtype) for t, i in zip(in_t, in_idx)]
        if out_t or in_t:
            kernels.switch_(
                [tensors[t] for t in out_t],
                out_idx,
                out_saved,
                [tensors[t] for t in in_t],
                in_idx,
                in_delta,
                in_saved,
                validate=False,
            )
        self.sparse_saved = {t: (i, s) for t, i, s in zip(in_t, in_idx, in_saved)}
        return sum(i.numel() for i in out_idx) + sum(i.numel() for i in in_idx)

    def _apply_dense(self, plan: Plan) -> None:
        """Write ``dtype(base + sum of parts)`` over each dense tensor, from its kept base copy."""
        for t, parts in plan.dense.items():
            w = self.backend.tensors[t]
            if t not in self.dense_saved:
                self.dense_saved[t] = w.clone()  # w holds the base here
            base = self.dense_saved[t]
            transposed = t in self.backend.transposed
            if len(parts) == 1 and parts[0][0] == "lora":  # the common case: one fused GEMM, no temporaries in fp32
                (a, b), alpha = parts[0][1], parts[0][2]
                m1, m2 = (a.t(), b.t()) if transposed else (b, a)  # storage [in, out]: (B @ A).T = A.T @ B.T
                if w.dtype == torch.float32:
                    torch.addmm(base, m1, m2, alpha=alpha, out=w)
                else:
                    w.copy_(torch.addmm(base.float(), m1, m2, alpha=alpha))
            else:
                total = torch.zeros(w.shape, dtype=torch.float32)
                for kind, part, alpha in parts:
                    if kind == "lora":
                        a, b = part
                        total.addmm_(*((a.t(), b.t()) if transposed else (b, a)), alpha=alpha)
                    else:
                        idx, delta = part
                        total.view(-1).index_add_(0, idx.long(), delta, alpha=alpha)
                w.copy_(total.add_(base))
            # a sum is finite only if every term is (cheap); the elementwise check only if it is not
            if not bool(torch.isfinite(w.sum(dtype=torch.float32))) and not bool(torch.isfinite(w).all()):
                raise AdapterValueError(f"tensor {t!r}: the adapted weights overflow {w.dtype} (Inf/NaN)")

    def _undo_dense_partial(self) -> None:
        for t, saved in self.dense_saved.items():
            self.backend.tensors[t].copy_(saved)
        self.dense_saved = {}


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _combine(parts: list[tuple[str, object, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor's sparse contributions -> (sorted unique idx, summed scaled fp32 delta)."""
    if len(parts) == 1:
        _, (idx, delta), alpha = parts[0]
        return idx, delta if alpha == 1.0 else delta * alpha
    idx = torch.cat([p[1][0] for p in parts])
    scaled = torch.cat([p[1][1] * p[2] for p in parts])
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    total = torch.zeros(uniq.numel(), dtype=torch.float32).index_add_(0, inverse, scaled)
    return uniq.to(idx.dtype), total
