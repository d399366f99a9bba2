"""Backends expose every weight of a model as a writable tensor, by the base's parameter names.

A backend has:
- ``tensors``: canonical name -> the live, contiguous storage tensor the switcher writes in place;
- ``aliases``: every accepted name (tied weights have several) -> canonical name;
- ``shapes``: canonical name -> logical shape (the parameter's shape, e.g. ``[out, in]`` for a linear);
- ``transposed``: canonical names stored as the transpose of their logical shape (ONNX exports do this);
- ``scales``: canonical names of quantized weights (1-byte codes, ``shira_runtime.quantization``) -> their fixed fp32
  per-row scales ``[rows]``; a switch writes those codes on their grid (``shira_runtime.kernels.qformats``);
- ``mirror(name)``: the copy of a quantized weight the kernels write in the same visit as its codes, or None: an
  FP8 layer's bf16 compute copy (torch); ``resync(name)`` after the codes were written by anything else. (An int8
  bundle's transposed uint8 copy is no mirror: it is the weight's tensor itself, in ``transposed``.)
- ``after_write(name, indices, since, mirrored)``: called after a switch wrote codes of ``name`` at flat
  ``indices`` through raw pointers (FP8 layers bring their compute copy back in line, unless mirrored); only for
  the names in ``followed``, the weights whose codes a copy follows (``mirror`` is None for the rest). A switch
  asks through ``mirrors_of(names, kept)`` and ``after_writes(names, versions, mirrored, indices)``, one call per
  switch for all its tensors, which call these per name unless a backend does better (the torch backend);
- ``before_write(names, indices, cache)``: called by the switcher before the kernels write a plan's sparse entries
  (a mapped bundle makes the pages they land on private first, in one call per run of pages);
- ``after_switch(active, written)``: called by the switcher when a switch ended (a mapped bundle hands back
  the pages of written weights once the base is back);
- ``__call__``: one inference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
from shira_runtime.arrays import NUMPY, NumpyOps, TorchOps
from shira_runtime.errors import AdapterMismatchError

Array = Any  # ``ops``' kind of array: numpy (bundles, the device path) or torch (TorchBackend)


class Backend(ABC):
    tensors: dict[str, Array]
    aliases: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    transposed: frozenset[str] = frozenset()
    scales: dict[str, Array] = {}  # noqa: RUF012 (read-only default: no quantized weights)
    # quantized weights whose codes a copy follows (``mirror``, ``after_write``): a switch does that bookkeeping for
    # these alone (an int8 layer has none: 0.51x the time of a small switch over 210 int8 linears without it)
    followed: frozenset[str] = frozenset()
    kind = "?"
    ops: NumpyOps | TorchOps = NUMPY  # the array operations over ``tensors`` (``shira_runtime.arrays``)
    # the kernels' list entries for a float weight's scale and a weight without a mirror (empty arrays)
    no_scale: Array = np.empty(0, np.float32)
    no_mirror: Array = np.empty(0, np.float32)

    def mirror(self, name: str) -> Array | None:
        """The copy of quantized weight ``name`` the kernels write beside its codes
        (``shira_runtime.kernels.reference``'s
        mirrors), or None (plain tensors)."""
        return None

    def after_write(self, name: str, indices: list[Array], since: int, mirrored: bool = False) -> None:
        """Codes of ``name`` were written at ``indices`` (flat) by a kernel, and its ``mirror`` with them if
        ``mirrored``; ``since``: the codes' version counter before that write. Nothing to do for plain tensors."""
        return None

    def mirrors_of(self, names: tuple[str, ...], kept: tuple | None = None) -> tuple:
        """The ``mirror`` of each of ``names`` (``no_mirror`` where none); ``kept``: what an earlier call returned
        for the same ``names``, returned itself while each of its arrays is still the mirror."""
        now = tuple(self.no_mirror if (m := self.mirror(t)) is None else m for t in names)
        return kept if kept is not None and all(a is b for a, b in zip(kept, now)) else now

    def after_writes(
        self, names: tuple[str, ...], versions: list[int], mirrored: frozenset[str], indices: dict[str, list]
    ) -> None:
        """A switch wrote codes of the ``followed`` weights ``names`` (``versions``: their version counters just
        before), and with them the mirrors of those in ``mirrored``; ``indices``: the flat index lists it wrote,
        for each of the others. ``after_write`` for each by default."""
        for t, since in zip(names, versions):
            self.after_write(t, indices.get(t, []), since, t in mirrored)

    def resync(self, name: str) -> None:
        """The codes of ``name`` were written by torch ops (a rollback): bring its mirror back in line. Nothing to
        do by default (an FP8 layer's forward sees the codes' version counter move and refreshes its copy)."""
        return None

    def before_write(self, names: tuple[str, ...], indices: Sequence[Array], cache: dict) -> None:
        """The kernels are about to write entries ``indices`` (storage indices, sorted) of tensors ``names``;
        ``cache``: a dict kept with those lists (one per plan) for the backend's own use. Nothing by default; a
        mapped bundle makes the pages they land on private first (``OnnxBackend.before_write``)."""
        return None

    def after_switch(self, active: tuple[tuple[str, float], ...], written: set[str]) -> None:
        """A switch ended (committed or rolled back) with ``active`` applied, having written the weights
        ``written`` (canonical names). Nothing to do by default; a bundle hands back pages once the base is
        back."""
        return None

    def serial(self, largest: int) -> AbstractContextManager:
        """A context for one switch with whole-tensor work (LoRA merges, base copies); ``largest``: the larger of
        its largest dense tensor's elements and its sparse entries. The torch backend keeps a switch below
        ``DENSE_SERIAL_BELOW`` on the calling thread.
        Nothing by default (numpy's own threads are left as they are)."""
        return nullcontext()

    def verified(self) -> None:
        """Wait for the base's integrity checks still running (a bundle's weight sha256, on a background
        thread) and raise what they found. Nothing by default."""
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

    def storage_index(self, name: str, idx: Array) -> Array:
        """Map logical flat indices (row-major over ``shapes[name]``) to flat indices of the storage tensor."""
        if name not in self.transposed:
            return idx
        rows, cols = self.shapes[name]
        idx = self.ops.as_index(idx)
        return (idx % cols) * rows + idx // cols

    def scales_at(self, name: str, sidx: Array) -> Array:
        """The scale of each entry at storage indices ``sidx`` of quantized tensor ``name``: one per logical row,
        so along the storage's columns where it is stored transposed (an int8 bundle's uint8 copy)."""
        scale = self.scales[name]
        n, i = self.ops.numel(scale), self.ops.as_index(sidx)
        if name in self.transposed:
            return scale[i % n]
        return scale[i // (self.ops.numel(self.tensors[name]) // n)]

    def logical(self, name: str) -> Array:
        """The tensor ``name`` viewed in its logical shape (a transposed view where storage is transposed)."""
        t = self.tensors[name]
        return t.T if name in self.transposed else t

    def check_writable(self, name: str, adapter: str) -> None:
        if not self.ops.is_contiguous_cpu(self.tensors[name]):
            raise AdapterMismatchError(
                f"adapter {adapter!r}: tensor {name!r} is not a contiguous CPU tensor; cannot switch it in place"
            )

    def check_unfused(self, tensor: str, adapter: str) -> str:
        """The module that an unfused LoRA on ``tensor`` attaches to; raise if this backend cannot."""
        raise AdapterMismatchError(f"adapter {adapter!r}: unfused LoRA is not supported on the {self.kind} backend")

    def check_unfused_plan(self, entries: list[tuple[str, Array, Array, float]]) -> None:
        """Raise if ``set_unfused(entries)`` could not be done (called before a switch writes anything).

        The base accepts what ``check_unfused`` let through; backends with limited room (LoRA slots) check it.
        """
        return None

    def set_unfused(self, entries: list[tuple[str, Array, Array, float]]) -> None:
        """Make ``entries`` ``(module, A, B, alpha)`` the unfused LoRA paths run at inference."""
        if entries:
            raise AdapterMismatchError(f"unfused LoRA is not supported on the {self.kind} backend")

    @abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One inference."""
