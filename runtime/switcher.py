"""The switcher: turns a set of (adapter, weight) pairs into writes, and keeps what an exact revert needs.

State after a switch, per touched storage tensor ``t``:
- sparse: ``(idx, saved)``: the base values at ``idx`` (the union of the active adapters' indices);
- dense (a LoRA adapter touches ``t``): a full copy of the base tensor.
New values are ``dtype(base + sum_i alpha_i * delta_i)``, the sum taken in fp32 in the order given, with
``alpha_i = fp32(weight_i * scale_i)``; rounded once. On a quantized weight (1-byte codes with fixed per-row
scales, ``backend.scales``) the new code is ``Q(deq(base_code) + sum)`` on the tensor's grid (nearest, ties to
even, clamped at the format's max; the clamped entries are counted per tensor in ``SwitchStats.saturated``); the
saved base codes revert it byte for byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from shira_runtime import kernels
from shira_runtime.backend import Backend
from shira_runtime.errors import AdapterValueError
from shira_runtime.kernels.checks import QUANT_DTYPES
from shira_runtime.kernels.reference import requantize


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
    baked: bool = False  # a CodesAdapter: ``sparse`` holds the new codes (not deltas); switched alone at weight 1

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
    # quantized tensors only: name -> how many written codes were clamped at the format's max (absent: none)
    saturated: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        names = ", ".join(f"{n} (weight {w:g})" for n, w in self.active) or "base"
        clamped = sum(self.saturated.values())
        sat = f", {clamped} codes saturated in {len(self.saturated)} tensors" if clamped else ""
        return (
            f"switch -> {names}: {self.ms:.2f} ms, {self.elements_written} elements written, "
            f"{self.bytes_touched / 1e6:.1f} MB touched ({self.kernels} kernels){sat}"
        )


EMPTY_PLAN = Plan((), {}, {}, [])


@dataclass(frozen=True)
class State:
    """What is applied, and what an exact revert needs; replaced whole (one assignment) when a switch commits."""

    plan: Plan
    sparse_saved: dict[str, tuple[torch.Tensor, torch.Tensor]]  # t -> (idx, base values at idx)
    dense_saved: dict[str, torch.Tensor]  # t -> full copy of the base tensor


# A NaN bit pattern per dtype that fills the incoming saved buffers before the kernel runs: an entry still
# holding it was never gathered, so its weight element was never written (the kernels gather before they
# write, element by element). A base value with exactly these bits is written back unchanged either way.
UNGATHERED = {torch.float32: (torch.int32, 0x7FDADBAD), torch.float16: (torch.int16, 0x7E5B)}
UNGATHERED[torch.bfloat16] = (torch.int16, 0x7FDB)
# 1-byte codes: int8's -128 is off the symmetric grid, 0x7F is an FP8 NaN; the bank refuses an adapter whose base
# codes at its indices are either (so the marker is never a real base code that the apply would change)
UNGATHERED.update({torch.int8: (torch.int8, -128), torch.float8_e4m3fn: (torch.uint8, 0x7F)})
UNGATHERED[torch.float8_e5m2] = (torch.uint8, 0x7F)
ROLLBACK_TRIES = 3  # a rollback that fails (other than by KeyboardInterrupt) is retried this often


class Switcher:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.state = State(EMPTY_PLAN, {}, {})
        self._absmax: dict[str, float] = {}
        # saved-value buffers of the state before the current one, reused by the next switch: their pages are
        # mapped already, so the marker fill is paid instead of the page faults (one more set of saved values)
        self._spare: dict[str, torch.Tensor] = {}

    @property
    def plan(self) -> Plan:
        return self.state.plan

    # -- reading the base while adapters may be applied --
    def base_values(self, t: str, idx: torch.Tensor) -> torch.Tensor:
        """Base values of storage tensor ``t`` at flat ``idx`` (whatever is applied now)."""
        state = self.state
        if t in state.dense_saved:
            return state.dense_saved[t].view(-1)[idx.long()]
        w = self.backend.tensors[t]
        out = _raw(w).view(-1)[idx.long()]
        if t in state.sparse_saved:
            aidx, saved = state.sparse_saved[t]
            if aidx.numel():
                pos = torch.searchsorted(aidx, idx.to(aidx.dtype)).clamp_(max=aidx.numel() - 1)
                hit = aidx[pos] == idx.to(aidx.dtype)
                out[hit] = _raw(saved)[pos[hit]]
        return out.view(w.dtype)

    def base_absmax(self, t: str) -> float:
        """An upper bound on |base| over tensor ``t`` (cached): for the overflow check."""
        if t not in self._absmax:
            state = self.state
            m = self.backend.tensors[t].abs().max().item() if self.backend.tensors[t].numel() else 0.0
            if t in state.sparse_saved and state.sparse_saved[t][1].numel():
                m = max(m, state.sparse_saved[t][1].abs().max().item())
            if t in state.dense_saved:
                m = max(m, state.dense_saved[t].abs().max().item())
            self._absmax[t] = float(m)
        return self._absmax[t]

    # -- planning (no writes) --
    def make_plan(self, items: list[tuple[Prepared, float]]) -> Plan:
        if not items:
            return EMPTY_PLAN
        contrib: dict[str, list[tuple[str, object, float]]] = {}
        bound: dict[str, float] = {}  # t -> an upper bound on |sum of sparse deltas|
        for prep, weight in items:
            if prep.baked and (len(items) > 1 or weight != 1.0):
                raise AdapterValueError(
                    f"adapter {prep.name!r} holds codes baked for weight 1.0 alone; it cannot be fused or "
                    f"weighted (fuse the adapters it was baked from instead)"
                )
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
                if t not in self.backend.scales:  # codes saturate (counted) instead of overflowing
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

    # -- writing: one transaction --
    def switch(self, plan: Plan, t0: float | None = None) -> SwitchStats:
        """Make ``plan`` the applied state. Any exception at any point (``KeyboardInterrupt`` and
        ``MemoryError`` included) rolls every write back: weights and state are as before the call.
        ``t0``: the ``perf_counter`` the reported time counts from (default: now)."""
        t0 = time.perf_counter() if t0 is None else t0
        old, tensors = self.state, self.backend.tensors
        in_t = list(plan.sparse)
        in_idx = [plan.sparse[t][0] for t in in_t]
        in_saved = [self._ungathered(t, i.numel(), tensors[t].dtype) for t, i in zip(in_t, in_idx)]
        dense_saved = {t: c for t, c in old.dense_saved.items() if t in plan.dense}  # base copies kept
        scales = self.backend.scales
        quant = any(t in scales for t in in_t)
        touched = {*in_t, *old.sparse_saved, *old.plan.dense, *plan.dense}
        saturated = torch.zeros(len(in_t), dtype=torch.int64) if quant else None
        try:
            for t in old.plan.dense:
                if t not in plan.dense:  # leaves dense: its base copy goes back whole
                    tensors[t].copy_(old.dense_saved[t])
            out_t = list(old.sparse_saved)
            if out_t or in_t:
                written = {t: [] for t in [*out_t, *in_t] if t in scales}  # codes a compute copy must follow
                versions = {t: tensors[t]._version for t in written}
                mirrors = {t: m for t in written if (m := self.backend.mirror(t)) is not None}
                kernels.switch_(
                    [tensors[t] for t in out_t],
                    [old.sparse_saved[t][0] for t in out_t],
                    [old.sparse_saved[t][1] for t in out_t],
                    [tensors[t] for t in in_t],
                    in_idx,
                    [plan.sparse[t][1] for t in in_t],
                    in_saved,
                    validate=False,
                    **(
                        {"in_scales": [scales.get(t, _NO_SCALE) for t in in_t], "saturated": saturated} if quant else {}
                    ),
                    **(
                        {
                            "out_mirrors": [mirrors.get(t, _NO_MIRROR) for t in out_t],
                            "in_mirrors": [mirrors.get(t, _NO_MIRROR) for t in in_t],
                        }
                        if mirrors
                        else {}
                    ),
                )
                for t, idx in [*((t, old.sparse_saved[t][0]) for t in out_t), *zip(in_t, in_idx)]:
                    if t in written:
                        written[t].append(idx)
                for t, idx_lists in written.items():
                    self.backend.after_write(t, idx_lists, versions[t], t in mirrors)
            for t in plan.dense:
                if t not in dense_saved:
                    dense_saved[t] = tensors[t].clone()  # the base: the kernel restored any sparse state
            _apply_dense(self.backend, plan, dense_saved)
            self.backend.set_unfused(plan.unfused)
            sat = {t: int(n) for t, n in zip(in_t, saturated.tolist()) if n} if saturated is not None else {}
            stats = self._stats(old.plan, plan, (time.perf_counter() - t0) * 1e3, sat)
            self.state = State(plan, dict(zip(in_t, zip(in_idx, in_saved))), dense_saved)  # commit
            self._spare = {t: s for t, (_, s) in old.sparse_saved.items()}  # free now that the switch committed
        except BaseException:
            self._rollback(old, plan, in_saved, dense_saved)
            self.backend.after_switch(old.plan.active, touched)  # rolled back: the same tensors were written
            raise
        self.backend.after_switch(plan.active, touched)
        return stats

    def _rollback(self, old: State, plan: Plan, in_saved: list[torch.Tensor], dense_saved: dict) -> None:
        """Undo whatever part of a switch to ``plan`` ran, wherever it stopped; every step is idempotent, so
        an interrupted rollback is run again (a ``KeyboardInterrupt`` during it is raised once it is done)."""
        interrupt, tries = None, 0
        while True:
            try:
                self._undo(old, plan, in_saved, dense_saved)
                break
            except KeyboardInterrupt as exc:
                interrupt = exc
            except BaseException:
                tries += 1
                if tries >= ROLLBACK_TRIES:
                    raise
        if interrupt is not None:
            raise interrupt

    def _undo(self, old: State, plan: Plan, in_saved: list[torch.Tensor], dense_saved: dict) -> None:
        tensors = self.backend.tensors
        self.state = old  # in case the commit happened before the exception
        self._spare = {}  # it may hold old's buffers (they are in use again)
        for t in {*old.plan.dense, *plan.dense}:  # dense tensors back to their base copies
            base = old.dense_saved.get(t, dense_saved.get(t))
            if base is not None:
                tensors[t].copy_(base)
        for t, saved in zip(plan.sparse, in_saved):  # the incoming writes, undone where they happened
            int_dtype, marker = UNGATHERED[saved.dtype]
            done = saved.view(int_dtype) != marker
            idx = plan.sparse[t][0].long()[done]
            _raw(tensors[t]).view(-1).index_copy_(0, idx, _raw(saved)[done])
        for t, (idx, base) in old.sparse_saved.items():  # the outgoing state, written as it was
            delta = old.plan.sparse[t][1]
            if base.dtype in QUANT_DTYPES and delta.dtype == base.dtype:  # baked codes
                value = delta
            elif t in self.backend.scales:  # the kernels' formula on the grid
                scale = self.backend.scales[t]
                value = requantize(base, scale[idx.long() // (tensors[t].numel() // scale.numel())], delta)[0]
            else:
                value = (base.float() + delta).to(base.dtype)  # the kernels' formula
            # torch index ops bump the codes' version counter: an FP8 layer's forward then refreshes its copy
            _raw(tensors[t]).view(-1).index_copy_(0, idx.long(), _raw(value))
        for t in {*plan.sparse, *old.sparse_saved}:  # written by torch ops above: the kernels' mirrors follow
            if t in self.backend.scales:
                self.backend.resync(t)
        _apply_dense(self.backend, old.plan, old.dense_saved)
        self.backend.set_unfused(old.plan.unfused)

    def _ungathered(self, t: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A saved-value buffer for ``n`` values of tensor ``t``, every entry holding the ungathered marker."""
        spare = self._spare.pop(t, None)
        buf = spare[:n] if spare is not None and spare.numel() >= n and spare.dtype == dtype else None
        int_dtype, marker = UNGATHERED[dtype]
        if buf is None:
            return torch.full((n,), marker, dtype=int_dtype).view(dtype)
        buf.view(int_dtype).fill_(marker)
        return buf

    def _stats(self, old: Plan, new: Plan, ms: float, saturated: dict[str, int]) -> SwitchStats:
        tensors = self.backend.tensors
        restored = [t for t in old.dense if t not in new.dense]  # copied back whole
        written = sum(i.numel() for plan in (old, new) for i, _ in plan.sparse.values())
        written += sum(tensors[t].numel() for t in [*new.dense, *restored])
        nbytes = 0
        for plan in (old, new):
            nbytes += sum(2 * i.numel() * tensors[t].element_size() for t, (i, _) in plan.sparse.items())
            nbytes += sum(2 * tensors[t].numel() * tensors[t].element_size() for t in plan.dense)
        return SwitchStats(ms, written, nbytes, new.active, kernels.backend(), saturated)


def _apply_dense(backend: Backend, plan: Plan, base_copies: dict[str, torch.Tensor]) -> None:
    """Write ``dtype(base + sum of parts)`` over each dense tensor of ``plan``, from its base copy."""
    for t, parts in plan.dense.items():
        w, base = backend.tensors[t], base_copies[t]
        transposed = t in backend.transposed
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


_NO_SCALE = torch.empty(0)  # a float weight's entry in the kernels' scale list
_NO_MIRROR = torch.empty(0, dtype=torch.bfloat16)  # a weight without a compute copy, in the kernels' mirror lists


def _raw(t: torch.Tensor) -> torch.Tensor:
    """1-byte codes as uint8 (torch lacks index ops for FP8): the same bytes."""
    return t.view(torch.uint8) if t.dtype in QUANT_DTYPES else t


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
