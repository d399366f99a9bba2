"""Scatter/gather engine for adapter switching: one C++ kernel core (``kernels/csrc/shira_core.h``, no torch) and
pure references, bit-identical.

Verbs (multi-tensor, in place; see ``shira_runtime.kernels.reference`` for the exact semantics):
``restore_``, ``apply_``, ``switch_``, declared once in ``shira_runtime.kernels.verbs``. They take torch tensors
(the core through the ``shira::`` torch ops, ``extension``; or the pure-torch ``reference``) or numpy arrays (the
core through ctypes, ``core``; or the pure-numpy ``reference_np``). Weights are fp32/fp16/bf16, or the 1-byte
codes of a quantized base (int8, fp8 e4m3fn/e5m2) with per-row scales, switched on their grid, or uint8 (int8
codes + 128 with per-column scales: an int8 weight held as its transposed copy, as int8 bundles hold it).

``SHIRA_KERNELS`` picks the path: ``auto`` (default: the core if it loads or builds, else the references with one
warning), ``torch`` or ``reference`` (force the references), ``cpp`` or ``core`` (a missing core is an error).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import numpy as np
from shira_runtime.kernels.verbs import VERBS, KernelInputError

__all__ = ["KernelInputError", "all_or_nothing", "apply_", "backend", "reference", "restore_", "switch_"]

_impl: ModuleType | None = None  # what runs torch tensors (chosen on first use)
_impl_name: str | None = None  # "cpp" or "torch": the path for torch tensors and numpy arrays alike


def _select() -> str:
    """Read ``SHIRA_KERNELS`` and load the core if it is wanted; never imports torch (numpy callers need none)."""
    choice = os.environ.get("SHIRA_KERNELS", "auto").strip().lower()
    choice = {"reference": "torch", "core": "cpp"}.get(choice, choice)
    if choice not in ("auto", "torch", "cpp"):
        raise ValueError(f"SHIRA_KERNELS={choice!r}: expected 'auto', 'torch' (or 'reference') or 'cpp' (or 'core')")
    if choice == "torch":
        return "torch"
    try:
        from shira_runtime.kernels import core

        core.load()
        return "cpp"
    except Exception as exc:  # build or load failure: fall back, unless the user asked for cpp
        if choice == "cpp":
            raise RuntimeError(f"SHIRA_KERNELS=cpp but the kernel core is unavailable: {exc}") from exc
        warnings.warn(
            f"shira kernels: kernel core unavailable ({exc}); using the pure references",
            RuntimeWarning,
            stacklevel=4,
        )
        return "torch"


def _torch_reference() -> ModuleType:
    return importlib.import_module("shira_runtime.kernels.reference")  # not ``from . import``: see __getattr__


def __getattr__(name: str):
    # ``kernels.reference`` (the pure-torch reference) imports torch: only when asked for, so that a process
    # without torch can import the package and switch numpy arrays
    if name == "reference":
        return _torch_reference()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _get() -> ModuleType:
    """The implementation for torch tensors: the ``shira::`` ops over the core, or the pure-torch reference."""
    global _impl
    if _impl is None:
        if backend() == "cpp":
            from shira_runtime.kernels import extension

            _impl = extension.load()
        else:
            _impl = _torch_reference()
    return _impl


def backend() -> str:
    """The active path: ``"cpp"`` (the core) or ``"torch"`` (the references)."""
    global _impl_name
    if _impl_name is None:
        _impl_name = _select()
    return _impl_name


def reset() -> None:
    """Forget the chosen path so the next call reads ``SHIRA_KERNELS`` again (tests use it)."""
    global _impl, _impl_name
    _impl, _impl_name = None, None


def _numpy_impl() -> ModuleType:
    """The numpy path: the core unless ``SHIRA_KERNELS=torch``, else (or without a core) the numpy reference."""
    if backend() == "cpp":
        from shira_runtime.kernels import core

        return core
    from shira_runtime.kernels import reference_np

    return reference_np


def _is_numpy(args: tuple, kwargs: dict) -> bool:
    for v in (*args, *kwargs.values()):
        if isinstance(v, (list, tuple)) and v:
            return isinstance(v[0], np.ndarray)
    return False


def _verb(name: str):
    verb = VERBS[name]

    def fn(*args, **kwargs) -> None:
        impl = _numpy_impl() if _is_numpy(args, kwargs) else _get()
        getattr(impl, name)(*args, **kwargs)

    def prepare(*args, **kwargs):
        """``fn(*args, **kwargs)`` made ready to run again and again: ``run(saturated=None)`` calls the verb on these
        arguments (with ``saturated`` where given) as ``fn`` would; the path chosen, and with the core the
        arguments checked and packed, now. Its lists' arrays must keep their storage, shape and dtype while ``run``
        is used (``core.Frozen``'s promise). The runtime's switch runs one per pair of plans."""
        impl = _numpy_impl() if _is_numpy(args, kwargs) else _get()
        make = getattr(impl, "prepare", None)
        if make is not None:
            return make(name, args, kwargs)
        plain = getattr(impl, name)  # a reference: each run a call

        def run(saturated=None) -> None:
            plain(*args, **(kwargs if saturated is None else {**kwargs, "saturated": saturated}))

        return run

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = verb.signature  # type: ignore[attr-defined]
    fn.__doc__ = verb.doc
    fn.all_or_nothing = all_or_nothing  # type: ignore[attr-defined]
    fn.prepare = prepare  # type: ignore[attr-defined]
    return fn


def all_or_nothing() -> bool:
    """Whether the verbs write all of a call or none of it (an error return wrote nothing): true of the core
    (``shira_core.h``), not of the references (they write tensor by tensor)."""
    return backend() == "cpp"


restore_ = _verb("restore_")
apply_ = _verb("apply_")
switch_ = _verb("switch_")
