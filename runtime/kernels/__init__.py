"""Scatter/gather engine for adapter switching: one C++ kernel core (``kernels/csrc/shira_core.h``, no torch) and
pure references, bit-identical.

Verbs (multi-tensor, in place; see ``shira_runtime.kernels.reference`` for the exact semantics):
``restore_``, ``apply_``, ``switch_``, declared once in ``shira_runtime.kernels.verbs``. They take torch tensors
(the core through the ``shira::`` torch ops, ``extension``; or the pure-torch ``reference``) or numpy arrays (the
core through ctypes, ``core``; or the pure-numpy ``reference_np``). Weights are fp32/fp16/bf16, or the 1-byte
codes of a quantized base (int8, fp8 e4m3fn/e5m2) with per-row scales, switched on their grid.

``SHIRA_KERNELS`` picks the path: ``auto`` (default: the core if it loads or builds, else the references with one
warning), ``torch`` or ``reference`` (force the references), ``cpp`` or ``core`` (a missing core is an error).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import numpy as np
from shira_runtime.kernels import reference
from shira_runtime.kernels.checks import KernelInputError
from shira_runtime.kernels.verbs import VERBS

__all__ = ["KernelInputError", "apply_", "backend", "reference", "restore_", "switch_"]

_impl: ModuleType | None = None
_impl_name: str | None = None


def _select() -> tuple[ModuleType, str]:
    choice = os.environ.get("SHIRA_KERNELS", "auto").strip().lower()
    choice = {"reference": "torch", "core": "cpp"}.get(choice, choice)
    if choice not in ("auto", "torch", "cpp"):
        raise ValueError(f"SHIRA_KERNELS={choice!r}: expected 'auto', 'torch' (or 'reference') or 'cpp' (or 'core')")
    if choice == "torch":
        return reference, "torch"
    try:
        from shira_runtime.kernels import extension

        return extension.load(), "cpp"
    except Exception as exc:  # build or load failure: fall back, unless the user asked for cpp
        if choice == "cpp":
            raise RuntimeError(f"SHIRA_KERNELS=cpp but the kernel core is unavailable: {exc}") from exc
        warnings.warn(
            f"shira kernels: kernel core unavailable ({exc}); using the pure references",
            RuntimeWarning,
            stacklevel=3,
        )
        return reference, "torch"


def _get() -> ModuleType:
    global _impl, _impl_name
    if _impl is None:
        _impl, _impl_name = _select()
    return _impl


def backend() -> str:
    """The active path: ``"cpp"`` (the core) or ``"torch"`` (the references)."""
    _get()
    return _impl_name  # type: ignore[return-value]


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
        if isinstance(v, list) and v:
            return isinstance(v[0], np.ndarray)
    return False


def _verb(name: str):
    verb = VERBS[name]

    def fn(*args, **kwargs) -> None:
        impl = _numpy_impl() if _is_numpy(args, kwargs) else _get()
        getattr(impl, name)(*args, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = verb.signature  # type: ignore[attr-defined]
    fn.__doc__ = getattr(reference, name).__doc__
    return fn


restore_ = _verb("restore_")
apply_ = _verb("apply_")
switch_ = _verb("switch_")
