"""The switcher: turns a set of (adapter, weight) pairs into writes, and keeps what an exact revert needs.

State after a switch, per touched storage tensor ``t``:
- sparse: ``(idx, saved)``: the base values at ``idx`` (the union of the active adapters' indices);
- dense (a LoRA adapter touches ``t``): a full copy of the base tensor.
New values are ``dtype(base + sum_i alpha_i * delta_i)``, the sum taken in fp32 in the order given, with
``alpha_i = fp32(weight_i * scale_i)``; rounded once. On a quantized weight (1-byte codes with fixed per-row
scales, ``backend.scales``; per column of an int8 bundle's transposed uint8 copy) the new code is
``Q(deq(base_code) + sum)`` on the tensor's grid (nearest, ties to even, clamped at the format's max; the clamped
entries are counted per tensor in ``SwitchStats.saturated``); the saved base codes revert it byte for byte.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from shira_runtime import kernels
from shira_runtime.arrays import CODE_DTYPES, FINFO_MAX, NUMPY, as_ops, dtype_name, fp32
from shira_runtime.backend import Backend
from shira_runtime.errors import AdapterValueError
from shira_runtime.kernels.core import Frozen
from shira_runtime.kernels.core import release as release_lists
from shira_runtime.kernels.orders import mirror_order
from shira_runtime.kernels.runs import runs_of

Array = Any  # a numpy array (the device path) or a torch tensor (the torch backend): ``Backend.ops`` says which


@dataclass
class Prepared:
    """An adapter validated against one backend, in storage layout, ready to switch."""

    name: str
    scale: float
    sparse: dict[str, tuple[Array, Array]] = field(default_factory=dict)  # t -> (idx, delta fp32)
    lora: dict[str, tuple[Array, Array, float]] = field(default_factory=dict)  # t -> (A, B, scaling)
    absmax: dict[str, float] = field(default_factory=dict)  # t -> max |delta| (sparse parts)
    # unfused LoRA: module path -> (A, B, scaling); applied at inference, weights untouched
    unfused: dict[str, tuple[Array, Array, float]] = field(default_factory=dict)
    baked: bool = False  # a CodesAdapter: ``sparse`` holds the new codes (not deltas); switched alone at weight 1
    # t -> the runs of consecutive indices in ``sparse[t]``'s idx (``kernels.runs``; absent: none worth describing)
    runs: dict[str, Array] = field(default_factory=dict)
    # t -> ``sparse[t]``'s entries in the order of the weight's uint8 mirror (``kernels.orders``; absent: no mirror)
    orders: dict[str, Array] = field(default_factory=dict)

    @property
    def tensors(self) -> set[str]:
        return set(self.sparse) | set(self.lora)


@dataclass
class Plan:
    """Everything a switch writes, computed before the first write."""

    active: tuple[tuple[str, float], ...]
    sparse: dict[str, tuple[Array, Array]]  # t -> (idx, summed scaled delta fp32)
    # t -> [("sparse", (idx, delta), alpha) | ("lora", (A, B), alpha)], summed in this order
    dense: dict[str, list[tuple[str, object, float]]]
    unfused: list[tuple[str, Array, Array, float]] = field(default_factory=list)  # (module, A, B, alpha)
    runs: dict[str, Array] = field(default_factory=dict)  # t -> runs of sparse[t]'s idx (``kernels.runs``)
    orders: dict[str, Array] = field(default_factory=dict)  # t -> sparse[t]'s mirror order (``kernels.orders``)
    # what a switch into or out of it counts (``SwitchStats``): sparse entries, and bytes read and written
    entries: int = 0
    nbytes: int = 0


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
    sparse_saved: dict[str, tuple[Array, Array]]  # t -> (idx, base values at idx)
    dense_saved: dict[str, Array]  # t -> full copy of the base tensor
    saved: tuple = ()  # the saved-value buffers in plan.sparse's order, the tuple the kernels were given


@dataclass(frozen=True, eq=False)
class Layout:
    """Where a plan's saved values go: buffer ``k`` (``plan.sparse``'s k-th tensor) holds ``sizes[k]`` values of
    dtype ``dtypes[k]`` at ``starts[k]`` of that dtype's arena; ``totals``: each arena's length; ``firsts``: each
    arena's positions of a non-empty buffer's first entry (int64). Made once per plan (``Switcher.lists``)."""

    dtypes: tuple[str, ...]
    sizes: tuple[int, ...]
    starts: tuple[int, ...] = ()
    totals: dict[str, int] = field(default_factory=dict)
    firsts: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, dtypes: Sequence[str], sizes: Sequence[int]) -> Layout:
        totals: dict[str, int] = {}
        firsts: dict[str, list[int]] = {}
        starts = []
        for d, n in zip(dtypes, sizes):
            at = totals.get(d, 0)
            starts.append(at)
            if n:
                firsts.setdefault(d, []).append(at)
            totals[d] = at + n
        pos = {d: np.asarray(firsts.get(d, ()), dtype=np.int64) for d in totals}
        return cls(tuple(dtypes), tuple(sizes), tuple(starts), totals, pos)


# the saved-value buffers' marker: ``shira_runtime.arrays.UNGATHERED``
ROLLBACK_TRIES = 3  # a rollback that fails (other than by KeyboardInterrupt) is retried this often
PLANS_KEPT = 8  # the plans of the last few switches (``Switcher.make_plan``), least recently used dropped first
PLAN_BYTES = 64 << 20  # ... holding at most this many bytes of their own (a plan of one adapter at weight 1 holds
# the adapter's arrays: 0 bytes of its own; a weighted or fused plan holds scaled copies, unions)


class Switcher:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ops = backend.ops
        self.state = State(EMPTY_PLAN, {}, {})
        self._absmax: dict[str, float] = {}
        # The saved-value buffers of a switch are slices of one buffer per dtype (an arena: one marker fill per
        # switch, not one per tensor). The applied state's arenas, and those of the state before it, reused by the
        # next switch: their pages are mapped already, so the marker fill is paid instead of the page faults.
        self._arenas: dict[str, Array] = {}
        self._spare: dict[str, Array] = {}
        self._no_runs: Array | None = None  # an empty runs array: a tensor whose list has none
        # the plans of the last few switches, by their items (a plan depends only on them: the base's absmax is
        # taken once): a switch back to a recent adapter reuses its plan. Each entry holds its Prepared objects,
        # so their ids stay theirs; ``forget`` drops a removed adapter's.
        self._plans: dict[tuple, tuple[tuple[tuple[Prepared, float], ...], int, Plan]] = {}  # items, bytes
        # each recent plan's lists for the kernels, and the saved-value slices of each arena layout, as ``Frozen``
        # tuples made once: the kernel core checks and packs them once (``kernels.core.Frozen``), not per switch
        self._lists: dict[int, tuple[Plan, dict[str, Any]]] = {}

    @property
    def plan(self) -> Plan:
        return self.state.plan

    # -- reading the base while adapters may be applied --
    def base_values(self, t: str, idx: Array) -> Array:
        """Base values of storage tensor ``t`` at flat ``idx`` (whatever is applied now)."""
        state = self.state
        if t in state.dense_saved:
            return self.ops.take(state.dense_saved[t], idx)
        ops, w = self.ops, self.backend.tensors[t]
        out = ops.raw(ops.take(w, idx))
        if t in state.sparse_saved:
            aidx, saved = state.sparse_saved[t]
            if ops.numel(aidx):
                pos = ops.searchsorted(aidx, idx).clip(max=ops.numel(aidx) - 1)
                hit = aidx[pos] == idx
                out[hit] = ops.raw(saved)[pos[hit]]
        return ops.typed(out, w)

    def base_absmax(self, t: str) -> float:
        """An upper bound on |base| over tensor ``t`` (cached): for the overflow check."""
        if t not in self._absmax:
            state = self.state
            absmax = self.ops.absmax
            m = absmax(self.backend.tensors[t])
            if t in state.sparse_saved:
                m = max(m, absmax(state.sparse_saved[t][1]))
            if t in state.dense_saved:
                m = max(m, absmax(state.dense_saved[t]))
            self._absmax[t] = float(m)
        return self._absmax[t]

    # -- planning (no writes) --
    def make_plan(self, items: list[tuple[Prepared, float]]) -> Plan:
        if not items:
            return EMPTY_PLAN
        key = tuple((id(p), w, math.copysign(1.0, w)) for p, w in items)  # -0.0 is not 0.0 here: -0.0 + -0.0
        hit = self._plans.pop(key, None)
        if hit is not None:
            self._plans[key] = hit  # the most recently used last
            return hit[2]
        plan = self._make_plan(items)
        own = _own_bytes(plan, [p for p, _ in items])
        if own <= PLAN_BYTES:
            self._plans[key] = (tuple(items), own, plan)
            while len(self._plans) > PLANS_KEPT:
                self._drop_plan(next(iter(self._plans)))
            while sum(v[1] for v in self._plans.values()) > PLAN_BYTES:  # the oldest that holds bytes of its own
                self._drop_plan(next(k for k, v in self._plans.items() if v[1]))
        return plan

    def forget(self, prep: Prepared) -> None:
        """Drop the kept plans that use ``prep`` (its adapter is being removed)."""
        for key in [k for k, (items, _, _) in self._plans.items() if any(p is prep for p, _ in items)]:
            self._drop_plan(key)

    def _drop_plan(self, key: tuple) -> None:
        _, _, plan = self._plans.pop(key)
        if plan is not self.state.plan:  # the applied plan's lists serve the next switch's outgoing side
            self._drop_lists(plan)

    def _drop_lists(self, plan: Plan) -> None:
        hit = self._lists.get(id(plan))
        if hit is not None and hit[0] is plan:
            del self._lists[id(plan)]
            self._release(hit[1])

    def _make_plan(self, items: list[tuple[Prepared, float]]) -> Plan:
        contrib: dict[str, list[tuple[str, object, float]]] = {}
        bound: dict[str, float] = {}  # t -> an upper bound on |sum of sparse deltas|
        source: dict[str, Prepared] = {}  # t -> the adapter of a tensor's sparse part (its runs and order, if alone)
        for prep, weight in items:
            if prep.baked and (len(items) > 1 or weight != 1.0):
                raise AdapterValueError(
                    f"adapter {prep.name!r} holds codes baked for weight 1.0 alone; it cannot be fused or "
                    f"weighted (fuse the adapters it was baked from instead)"
                )
            alpha = fp32(weight * prep.scale)
            for t, part in prep.sparse.items():
                contrib.setdefault(t, []).append(("sparse", part, alpha))
                source[t] = prep
                bound[t] = bound.get(t, 0.0) + abs(alpha) * prep.absmax[t]
            for t, (a, b, scaling) in prep.lora.items():
                contrib.setdefault(t, []).append(("lora", (a, b), fp32(alpha * scaling)))
        unfused = [
            (module, a, b, fp32(weight * scaling))
            for prep, weight in items
            for module, (a, b, scaling) in prep.unfused.items()
        ]
        sparse, dense, runs, orders = {}, {}, {}, {}
        for t, parts in contrib.items():
            if any(kind == "lora" for kind, _, _ in parts):
                dense[t] = parts
            else:
                sparse[t] = _combine(self.ops, parts)
                if len(parts) == 1:  # found when the adapter was registered
                    for found, mine in ((source[t].runs, runs), (source[t].orders, orders)):
                        if t in found:
                            mine[t] = found[t]
                else:  # a union of several adapters' indices
                    self.describe(t, sparse[t][0], runs, orders)
                if t not in self.backend.scales:  # codes saturate (counted) instead of overflowing
                    self._check_range(t, sparse[t][1], bound[t])
        self.backend.check_unfused_plan(unfused)
        tensors, numel, size = self.backend.tensors, self.ops.numel, self.ops.itemsize
        entries = sum(numel(i) for i, _ in sparse.values())
        nbytes = sum(2 * numel(i) * size(tensors[t]) for t, (i, _) in sparse.items())
        nbytes += sum(2 * numel(tensors[t]) * size(tensors[t]) for t in dense)
        active = tuple((p.name, float(w)) for p, w in items)
        return Plan(active, sparse, dense, unfused, runs, orders, entries, nbytes)

    def describe(self, t: str, idx: Array, runs: dict[str, Array], orders: dict[str, Array]) -> None:
        """Record what the kernels may take beside ``idx`` (tensor ``t``'s index list): its runs in ``runs[t]`` and
        its mirror order in ``orders[t]``, each where there is one."""
        if (r := self.runs_of(idx)) is not None:
            runs[t] = r
        if (o := self.order_of(t, idx)) is not None:
            orders[t] = o

    def runs_of(self, idx: Array) -> Array | None:
        """The runs of ``idx`` (``kernels.runs.runs_of``) as the backend's kind of array; None when there are none."""
        r = runs_of(self.ops.to_numpy(idx))
        return self.ops.from_numpy(r) if len(r) else None

    def order_of(self, t: str, idx: Array) -> Array | None:
        """The mirror order of ``idx`` on tensor ``t`` (``kernels.orders.mirror_order``) when ``t`` has a uint8
        mirror, as the backend's kind of array; else None. No backend of the runtime has one since int8 bundles
        switch their transposed copy itself (C ABI 4); kept for a backend that holds codes and a copy."""
        m = self.backend.mirror(t)
        if m is None or dtype_name(m) != "uint8":
            return None
        rows, cols = self.backend.tensors[t].shape  # the storage tensor's, as the kernels see it
        return self.ops.from_numpy(mirror_order(self.ops.to_numpy(idx), rows, cols))

    def _check_range(self, t: str, delta: Array, delta_bound: float) -> None:
        """Refuse a sparse result the dtype cannot hold: a cached bound first, the exact max only if it fails."""
        dtype = dtype_name(self.backend.tensors[t])
        limit = FINFO_MAX[dtype]
        if not self.ops.numel(delta) or self.base_absmax(t) + delta_bound <= limit:
            return
        reach = self.base_absmax(t) + self.ops.absmax(delta)
        if reach > limit:
            held = self.backend.tensors[t].dtype
            raise AdapterValueError(
                f"tensor {t!r}: base + delta may reach {reach:.3g}, beyond what {held} holds ({limit:.3g})"
            )

    # -- writing: one transaction --
    def switch(self, plan: Plan, t0: float | None = None) -> SwitchStats:
        """Make ``plan`` the applied state. Any exception at any point (``KeyboardInterrupt`` and
        ``MemoryError`` included) rolls every write back: weights and state are as before the call.
        ``t0``: the ``perf_counter`` the reported time counts from (default: now).

        A small switch with whole-tensor work (every dense tensor and the sparse entries below the backend's
        threshold) runs on the calling thread (``Backend.serial``): no parallel region to stall in."""
        t0 = time.perf_counter() if t0 is None else t0
        numel, tensors = self.ops.numel, self.backend.tensors
        largest = max((numel(tensors[t]) for t in {*plan.dense, *self.state.plan.dense}), default=0)
        if largest:
            entries = sum(numel(i) for p in (plan, self.state.plan) for i, _ in p.sparse.values())
            with self.backend.serial(max(largest, entries)):
                return self._switch(plan, t0)
        return self._switch(plan, t0)

    def lists(self, plan: Plan) -> dict[str, Any]:
        """``plan``'s lists for the kernels, made once per plan (``Frozen``): its tensors' weights, indices, deltas,
        scales and runs, in ``plan.sparse``'s order; and what a switch would otherwise find tensor by tensor: the
        saved-value buffers' ``layout``, the tensor ``names``, the ``scaled`` ones (quantized: written on their grid)
        and of those the ``followed`` ones (a compute copy follows their codes: ``Backend.followed``), the
        ``touched`` set (sparse and dense), and the saved-value ``slices`` of each pair of arenas this plan was
        switched into (``_ungathered``)."""
        hit = self._lists.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1]
        tensors, scales = self.backend.tensors, self.backend.scales
        ts = list(plan.sparse)
        if self._no_runs is None:
            self._no_runs = self.ops.from_numpy(np.zeros((0, 3), dtype=np.int64))
        out = {
            "layout": Layout.of([dtype_name(tensors[t]) for t in ts], [self.ops.numel(plan.sparse[t][0]) for t in ts]),
            "names": tuple(ts),
            "scaled": tuple(t for t in ts if t in scales),
            "followed": tuple(t for t in ts if t in self.backend.followed),
            "touched": frozenset((*ts, *plan.dense)),
            "slices": {},
            "weights": self._weights_of(tuple(ts)),
            "indices": Frozen(plan.sparse[t][0] for t in ts),
            "deltas": Frozen(plan.sparse[t][1] for t in ts),
            "scales": Frozen(scales.get(t, self.backend.no_scale) for t in ts),
            "runs": Frozen(plan.runs.get(t, self._no_runs) for t in ts),
            "backend": {},  # the backend's own, per plan (Backend.before_write)
        }
        self._lists[id(plan)] = (plan, out)
        return out

    def _weights_of(self, names: tuple[str, ...]) -> Frozen:
        """The weights of tensors ``names`` as a Frozen list, the one a kept plan over the same tensors has if any:
        the two sides of a switch between adapters of the same targets then share it (the kernels read its
        addresses once per call)."""
        for _, lists in self._lists.values():
            if lists["names"] == names:
                return lists["weights"]
        tensors = self.backend.tensors
        return Frozen(tensors[t] for t in names)

    def _kernel(self, old: State, plan: Plan, theirs: dict, mine: dict, in_saved: Frozen, follow: tuple | None):
        """The kernels' switch from ``old`` to ``plan`` as ``run(saturated)``: prepared once
        (``kernels.switch_.prepare``: the call checked and packed) and kept in ``mine`` while the outgoing lists,
        the saved-value buffers and the mirrors are the same (a switch of 4 small tensors spent ~4 us of ~21
        finding its call again); a ``kernels.switch_`` without ``prepare`` (a test's stand-in) is called anew."""
        switch = kernels.switch_
        out_mirrors, in_mirrors = (follow[2], follow[3]) if follow is not None else (None, None)
        # the path too: a call prepared on the core is not run after kernels.reset() chose the references
        ident = (switch, kernels.backend(), theirs, old.saved, in_saved, out_mirrors, in_mirrors)
        hit = mine.get("kernel")
        if hit is not None and all(a is b for a, b in zip(hit[0], ident)):
            return hit[1]
        args = (theirs["weights"], theirs["indices"], old.saved, mine["weights"], mine["indices"], mine["deltas"])
        # every list was searched for runs (registration, plan time): an empty one holds none, and the core does
        # not search it again (a test per entry: random switches of 1e5 entries take 0.75-0.96x the time without
        # it, docs/kernels.md)
        kwargs: dict[str, Any] = {"validate": False, "out_runs": theirs["runs"], "in_runs": mine["runs"]}
        if mine["scaled"]:
            kwargs["in_scales"] = mine["scales"]
        if follow is not None:
            kwargs.update(out_mirrors=out_mirrors, in_mirrors=in_mirrors)
            if follow[1] and (old.plan.orders or plan.orders):
                no_mirror = self.backend.no_mirror
                # plain lists: a call over them is not kept by the core (only by this prepared one)
                kwargs["out_orders"] = [old.plan.orders.get(t, no_mirror) for t in theirs["names"]]
                kwargs["in_orders"] = [plan.orders.get(t, no_mirror) for t in mine["names"]]
        prepare = getattr(switch, "prepare", None)
        if prepare is None:

            def run(saturated: Array | None) -> None:
                switch(*args, in_saved, **kwargs, **({} if saturated is None else {"saturated": saturated}))

            return run
        run = prepare(*args, in_saved, **kwargs)
        mine["kernel"] = (ident, run)
        return run

    def _follow(self, theirs: dict[str, Any], mine: dict[str, Any]) -> tuple | None:
        """What a switch from ``theirs``' plan to ``mine``'s tells the backend about the weights a copy follows
        (``Backend.followed``), or None where it writes none: those names, the ones whose mirror the kernels write
        with their codes, and each side's mirrors (``_mirrors``); kept in ``mine`` for its last ``theirs`` while
        both sides' mirrors are the same lists (a switch over 210 FP8 layers spent ~0.5 ms finding them again)."""
        if not (theirs["followed"] or mine["followed"]):
            return None
        out_mirrors, in_mirrors = self._mirrors(theirs), self._mirrors(mine)
        hit = mine.get("follow")
        if hit is not None and hit[0] is theirs["followed"] and hit[1] is out_mirrors and hit[2] is in_mirrors:
            return hit[3]
        none = self.backend.no_mirror
        mirrored = frozenset(
            t for lists, ms in ((theirs, out_mirrors), (mine, in_mirrors)) for t, m in zip(lists["names"], ms)
            if m is not none
        )  # fmt: skip
        follow = (tuple(dict.fromkeys((*theirs["followed"], *mine["followed"]))), mirrored, out_mirrors, in_mirrors)
        mine["follow"] = (theirs["followed"], out_mirrors, in_mirrors, follow)
        return follow

    def _mirrors(self, lists: dict[str, Any]) -> Frozen:
        """The mirrors of ``lists``' tensors (``Backend.mirrors_of``: an empty array where none) as a Frozen list
        kept with ``lists`` while they are the same arrays, so the kernels pack that side once, not per switch
        (an FP8 layer rebuilds its compute copy only when its shape changed: a new list then)."""
        kept = lists.get("mirrors")
        now = self.backend.mirrors_of(lists["names"], kept)
        if now is kept:
            return kept
        if kept is not None:
            release_lists([kept])
        lists["mirrors"] = out = Frozen(now)
        return out

    def _release(self, lists: dict[str, Any]) -> None:
        """Forget the kernels' packed rows of dropped ``lists`` (``lists``) and of their saved-value slices; a
        weights list other kept lists share stays (the rows of a call that used the dropped lists' other arrays
        go with those)."""
        shared = {id(kept["weights"]) for _, kept in self._lists.values()}
        for _, kept in self._lists.values():  # a call prepared from these lists goes (and their arrays with it)
            if (hit := kept.get("kernel")) is not None and hit[0][2] is lists:
                del kept["kernel"]
        dropped = [v for v in lists.values() if id(v) not in shared]
        release_lists([*dropped, *(entry[1] for entry in lists["slices"].values())])

    def _prune_lists(self) -> None:
        """Keep the lists of the kept plans and of the applied one (the next switch's outgoing side)."""
        keep = {id(v[2]) for v in self._plans.values()} | {id(self.state.plan)}
        for key in [k for k in self._lists if k not in keep]:
            self._release(self._lists.pop(key)[1])

    def _switch(self, plan: Plan, t0: float) -> SwitchStats:
        old, tensors, ops = self.state, self.backend.tensors, self.ops
        mine, theirs = self.lists(plan), self.lists(old.plan)
        in_t, in_idx = mine["names"], mine["indices"]
        # an all-or-nothing kernel (the core) marks only each buffer's first entry: whether it ran tells the rest
        whole = not _all_or_nothing(kernels.switch_)
        in_saved, arenas, sparse_saved = self._ungathered(mine, whole)
        dense_saved = {t: c for t, c in old.dense_saved.items() if t in plan.dense} if old.dense_saved else {}
        quant = bool(mine["scaled"])
        touched = mine["touched"] | theirs["touched"]
        saturated = ops.counts(len(in_t)) if quant else None
        try:
            for t in old.plan.dense:
                if t not in plan.dense:  # leaves dense: its base copy goes back whole
                    _copy(tensors[t], old.dense_saved[t])
            out_t = theirs["names"]  # old.sparse_saved's order
            if in_t:
                self.backend.before_write(in_t, in_idx, mine["backend"])
            if out_t or in_t:
                follow = self._follow(theirs, mine)  # FP8 layers: the copies that follow their codes
                if follow is not None:
                    followed, mirrored, out_mirrors, in_mirrors = follow
                    versions = [getattr(tensors[t], "_version", 0) for t in followed]
                self._kernel(old, plan, theirs, mine, in_saved, follow)(saturated)
                if follow is not None:
                    written: dict[str, list] = {}  # the index lists of codes whose copy the kernels did not write
                    if len(mirrored) < len(followed):
                        written = {t: [] for t in followed if t not in mirrored}
                        for t, idx in [*((t, old.sparse_saved[t][0]) for t in out_t), *zip(in_t, in_idx)]:
                            if t in written:
                                written[t].append(idx)
                    self.backend.after_writes(followed, versions, mirrored, written)
            for t in plan.dense:
                if t not in dense_saved:
                    dense_saved[t] = _clone(tensors[t])  # the base: the kernel restored any sparse state
            _apply_dense(self.backend, plan, dense_saved)
            self.backend.set_unfused(plan.unfused)
            counts = saturated.tolist() if saturated is not None else ()
            sat = {t: n for t, n in zip(in_t, counts) if n} if any(counts) else {}  # any(): a C loop, mostly all 0
            stats = self._stats(old.plan, plan, (time.perf_counter() - t0) * 1e3, sat)
            self.state = State(plan, sparse_saved, dense_saved, in_saved)  # commit
            self._spare, self._arenas = self._arenas, arenas  # old's arenas are free now that the switch committed
        except BaseException:
            self._rollback(old, plan, in_saved, dense_saved, whole)
            self.backend.after_switch(old.plan.active, touched)  # rolled back: the same tensors were written
            raise
        self._prune_lists()
        self.backend.after_switch(plan.active, touched)
        return stats

    def _rollback(self, old: State, plan: Plan, in_saved: list[Array], dense_saved: dict, whole: bool) -> None:
        """Undo whatever part of a switch to ``plan`` ran, wherever it stopped; every step is idempotent, so
        an interrupted rollback is run again (a ``KeyboardInterrupt`` during it is raised once it is done)."""
        interrupt, tries = None, 0
        while True:
            try:
                self._undo(old, plan, in_saved, dense_saved, whole)
                break
            except KeyboardInterrupt as exc:
                interrupt = exc
            except BaseException:
                tries += 1
                if tries >= ROLLBACK_TRIES:
                    raise
        if interrupt is not None:
            raise interrupt

    def _undo(self, old: State, plan: Plan, in_saved: list[Array], dense_saved: dict, whole: bool) -> None:
        tensors, ops = self.backend.tensors, self.ops
        self.state = old  # in case the commit happened before the exception
        self._spare = {}  # it may hold old's arenas (they are in use again)
        for t in {*old.plan.dense, *plan.dense}:  # dense tensors back to their base copies
            base = old.dense_saved.get(t, dense_saved.get(t))
            if base is not None:
                _copy(tensors[t], base)
        # The incoming writes, undone where they happened: every marked entry that no longer holds the marker (a
        # buffer marked whole); or, marked at its first entry only, all of every buffer once a first entry was
        # gathered (the kernel wrote all of its call or none of it), none before.
        ran = whole or any(ops.numel(saved) and bool(ops.gathered(saved[:1])[0]) for saved in in_saved)
        for t, saved in zip(plan.sparse, in_saved):
            if not ran or not ops.numel(saved):
                continue
            if whole:
                done = ops.gathered(saved)
                ops.put(tensors[t], plan.sparse[t][0][done], ops.raw(saved)[done])
            else:
                ops.put(tensors[t], plan.sparse[t][0], saved)
        for t, (idx, base) in old.sparse_saved.items():  # the outgoing state, written as it was
            delta = old.plan.sparse[t][1]
            if dtype_name(base) in CODE_DTYPES and dtype_name(delta) == dtype_name(base):  # baked codes
                value = delta
            elif t in self.backend.scales:  # the kernels' formula on the grid
                value = ops.requantize(base, self.backend.scales_at(t, idx), delta)
            else:
                value = ops.values_at_base(base, delta)  # the kernels' formula
            ops.put(tensors[t], idx, value)
        for t in {*plan.sparse, *old.sparse_saved}:  # written by array ops above: the kernels' mirrors follow
            if t in self.backend.scales:
                self.backend.resync(t)
        _apply_dense(self.backend, old.plan, old.dense_saved)
        self.backend.set_unfused(old.plan.unfused)

    def _ungathered(self, lists: dict[str, Any], whole: bool = True) -> tuple[Frozen, dict[str, Array], dict]:
        """Saved-value buffers for a switch into the plan of ``lists`` (``lists``): ``layout.sizes[k]`` values of
        dtype ``layout.dtypes[k]``, every entry holding the ungathered marker (``whole``; else only each buffer's
        first entry), as slices of one arena per dtype (a spare one reused when large enough), marked with one fill
        (one indexed write); with the arenas, and the state's ``{t: (idx, buffer)}``."""
        ops, layout = self.ops, lists["layout"]
        arenas = {}
        for d, n in layout.totals.items():
            spare = self._spare.pop(d, None)
            if spare is None or ops.numel(spare) < n:
                arenas[d] = ops.marked(n, d) if whole else ops.empty(n, d)
            else:
                arenas[d] = spare
                if whole:
                    ops.mark(spare[:n])
        # the slices of these arenas, made once per plan (the kernels pack a Frozen list once), with the integer
        # views that mark each buffer's first entry: a plan switched in and out alternates between two sets of
        # arenas; entries of arenas no longer held go, and their memory
        key = tuple(id(a) for a in arenas.values())
        kept = lists["slices"]
        hit = kept.get(key)  # an entry holds its arenas: the ids in its key are still theirs
        if hit is None:
            out = Frozen(arenas[d][k : k + n] for d, k, n in zip(layout.dtypes, layout.starts, layout.sizes))
            live = {id(a) for held in (self._arenas, self._spare, arenas) for a in held.values()}
            for k in [k for k, entry in kept.items() if any(id(a) not in live for _, a in entry[0])]:
                release_lists([kept.pop(k)[1]])
            sparse_saved = dict(zip(lists["names"], zip(lists["indices"], out)))  # read only (State's)
            marks = tuple((*ops.marks(arenas[d]), pos) for d, pos in layout.firsts.items() if len(pos))
            hit = kept[key] = (tuple(arenas.items()), out, sparse_saved, marks)
        if not whole:
            for view, marker, pos in hit[3]:  # views made once: a torch view per switch took ~36 us of a cold one
                view[pos] = marker
        return hit[1], arenas, hit[2]

    def _stats(self, old: Plan, new: Plan, ms: float, saturated: dict[str, int]) -> SwitchStats:
        written = old.entries + new.entries  # the plans' counts, taken when they were made
        if old.dense or new.dense:
            tensors, numel = self.backend.tensors, self.ops.numel
            restored = [t for t in old.dense if t not in new.dense]  # copied back whole
            written += sum(numel(tensors[t]) for t in [*new.dense, *restored])
        return SwitchStats(ms, written, old.nbytes + new.nbytes, new.active, kernels.backend(), saturated)


def _apply_dense(backend: Backend, plan: Plan, base_copies: dict[str, Array]) -> None:
    """Write ``dtype(base + sum of parts)`` over each dense tensor of ``plan``, from its base copy.

    Torch weights (the torch backend) are computed by torch (``addmm``); numpy weights (a bundle) by numpy, torch
    installed or not, so a bundle's numbers never depend on whether torch is there (fp32 matmuls by numpy's BLAS,
    whose rounding may differ from torch's in the last bit)."""
    for t, parts in plan.dense.items():
        w, base = backend.tensors[t], base_copies[t]
        transposed = t in backend.transposed
        if isinstance(w, np.ndarray):
            _dense_numpy(t, w, base, parts, transposed)
        else:
            _dense_torch(t, w, base, parts, transposed)


def _dense_torch(t: str, w, base, parts: list, transposed: bool) -> None:
    import torch

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


def _dense_numpy(t: str, w: np.ndarray, base: np.ndarray, parts: list, transposed: bool) -> None:
    if len(parts) == 1 and parts[0][0] == "lora" and w.dtype == np.float32:  # one GEMM into the weight itself
        (a, b), alpha = (as_ops(x, NUMPY).astype(np.float32, copy=False) for x in parts[0][1]), parts[0][2]
        np.matmul(*((a.T, b.T) if transposed else (b, a)), out=w)
        if alpha != 1.0:
            w *= np.float32(alpha)
        w += base
    else:
        total = np.zeros(w.shape, dtype=np.float32)
        for kind, part, alpha in parts:
            if kind == "lora":
                a, b = (as_ops(x, NUMPY).astype(np.float32, copy=False) for x in part)
                total += np.float32(alpha) * ((a.T @ b.T) if transposed else (b @ a))
            else:
                idx, delta = (as_ops(x, NUMPY) for x in part)
                np.add.at(total.reshape(-1), idx, delta * np.float32(alpha))
        total += base.astype(np.float32, copy=False)
        with np.errstate(over="ignore"):
            np.copyto(w, total, casting="unsafe")
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(w.sum(dtype=np.float32)) and not np.isfinite(w).all():
            raise AdapterValueError(f"tensor {t!r}: the adapted weights overflow {w.dtype} (Inf/NaN)")


def _clone(x: Array) -> Array:
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


def _all_or_nothing(switch) -> bool:
    """Whether ``switch`` (what ``kernels.switch_`` is now) writes all of a call or none of it: the core's verbs
    say so (``all_or_nothing()``); anything else (the references, a wrapper) is taken to stop anywhere."""
    probe = getattr(switch, "all_or_nothing", None)
    return bool(probe is not None and probe())


def _copy(dst: Array, src: Array) -> None:
    """``dst[...] = src`` in place, for either kind of array."""
    if hasattr(dst, "copy_"):
        dst.copy_(src)
    else:
        dst[...] = src


def _combine(ops, parts: list[tuple[str, object, float]]) -> tuple[Array, Array]:
    """One tensor's sparse contributions -> (sorted unique idx, summed scaled fp32 delta)."""
    if len(parts) == 1:
        _, (idx, delta), alpha = parts[0]
        return idx, delta if alpha == 1.0 else ops.scaled(delta, alpha)
    return ops.combine([p[1][0] for p in parts], [ops.scaled(p[1][1], p[2]) for p in parts])


def _own_bytes(plan: Plan, preps: list[Prepared]) -> int:
    """The bytes of ``plan``'s arrays that are not its adapters' own (scaled copies, unions, their runs)."""
    theirs = {id(a) for p in preps for part in p.sparse.values() for a in part}
    theirs |= {id(a) for p in preps for a in (*p.runs.values(), *p.orders.values())}
    arrays = [a for part in plan.sparse.values() for a in part] + [*plan.runs.values(), *plan.orders.values()]
    return sum(int(a.nbytes) for a in arrays if id(a) not in theirs)
