"""Scatter/gather engine for adapter switching: a pure-torch reference and an optional C++ fast path.

Verbs (multi-tensor, in place; see ``shira_runtime.kernels.reference`` for the exact semantics):
``restore_``, ``apply_``, ``switch_``. Both paths give bit-identical results. Weights are fp32/fp16/bf16, or the
1-byte codes of a quantized base (int8, fp8 e4m3fn/e5m2) with per-row scales, switched on their grid.

``SHIRA_KERNELS`` picks the path: ``auto`` (default: the C++ extension if it builds/loads, else the
reference with one warning), ``torch`` (force the reference), ``cpp`` (a missing extension is an error).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from shira_runtime.kernels import reference
from shira_runtime.kernels.checks import KernelInputError

__all__ = ["KernelInputError", "apply_", "backend", "reference", "restore_", "switch_"]

_impl: ModuleType | None = None
_impl_name: str | None = None


def _select() -> tuple[ModuleType, str]:
    choice = os.environ.get("SHIRA_KERNELS", "auto").strip().lower()
    if choice not in ("auto", "torch", "cpp"):
        raise ValueError(f"SHIRA_KERNELS={choice!r}: expected 'auto', 'torch' or 'cpp'")
    if choice == "torch":
        return reference, "torch"
    try:
        from shira_runtime.kernels import extension

        return extension.load(), "cpp"
    except Exception as exc:  # build or load failure: fall back, unless the user asked for cpp
        if choice == "cpp":
            raise RuntimeError(f"SHIRA_KERNELS=cpp but the C++ extension is unavailable: {exc}") from exc
        warnings.warn(
            f"shira kernels: C++ extension unavailable ({exc}); using the pure-torch reference",
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
    """The active path: ``"cpp"`` or ``"torch"``."""
    _get()
    return _impl_name  # type: ignore[return-value]


def reset() -> None:
    """Forget the chosen path so the next call reads ``SHIRA_KERNELS`` again (tests use it)."""
    global _impl, _impl_name
    _impl, _impl_name = None, None


def restore_(weights, indices, saved, validate: bool = True, mirrors=None) -> None:
    _get().restore_(weights, indices, saved, validate=validate, mirrors=mirrors)


def apply_(weights, indices, deltas, saved, validate: bool = True, scales=None, saturated=None, mirrors=None) -> None:
    _get().apply_(
        weights, indices, deltas, saved, validate=validate, scales=scales, saturated=saturated, mirrors=mirrors
    )


def switch_(
    out_weights,
    out_indices,
    out_saved,
    in_weights,
    in_indices,
    in_deltas,
    in_saved,
    validate: bool = True,
    in_scales=None,
    saturated=None,
    out_mirrors=None,
    in_mirrors=None,
) -> None:
    _get().switch_(
        out_weights,
        out_indices,
        out_saved,
        in_weights,
        in_indices,
        in_deltas,
        in_saved,
        validate=validate,
        in_scales=in_scales,
        saturated=saturated,
        out_mirrors=out_mirrors,
        in_mirrors=in_mirrors,
    )
