"""Adapter-switching inference runtime: SHiRA sparse adapters switched in place, LoRA as the baseline.

Importing the package needs no torch: a bundle (``Runtime.load(bundle_dir)``) runs on numpy and onnxruntime.
What works on torch modules (``quantize``, the torch backend, the exporters) imports torch when first used.
"""

from shira_runtime.adapters import LoraAdapter, SparseAdapter, load_adapter, save_adapter
from shira_runtime.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterValueError,
    BaseLoadError,
    BaseMismatchError,
    CannotGenerateError,
    ExportError,
    ShiraError,
    UnknownAdapterError,
)
from shira_runtime.fingerprint import Fingerprint
from shira_runtime.manager import Runtime
from shira_runtime.switcher import SwitchStats

__all__ = [
    "AdapterFormatError",
    "AdapterMismatchError",
    "AdapterValueError",
    "BaseLoadError",
    "BaseMismatchError",
    "CannotGenerateError",
    "ExportError",
    "Fingerprint",
    "LoraAdapter",
    "Runtime",
    "ShiraError",
    "SparseAdapter",
    "SwitchStats",
    "UnknownAdapterError",
    "load_adapter",
    "quantize",
    "save_adapter",
]


def __getattr__(name: str):
    if name == "quantize":  # torch: imported on first use
        try:
            from shira_runtime.quantization import quantize
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            raise ModuleNotFoundError(
                "shira_runtime.quantize quantizes torch modules and needs torch: pip install 'shira-runtime[torch]' "
                "(a bundle runs without it)",
                name="torch",
            ) from None
        return quantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
