"""Exporters: base models to onnxruntime bundles (``export_onnx``), adapters between formats (``convert``)."""

from __future__ import annotations

from typing import Any

__all__ = ["ExportError", "export_onnx"]


def __getattr__(name: str) -> Any:  # onnx is an optional dependency: import it only when asked for
    if name in __all__:
        from shira_runtime.exporters import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module 'shira_runtime.exporters' has no attribute {name!r}")
