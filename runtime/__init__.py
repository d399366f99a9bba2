"""Adapter-switching inference runtime: SHiRA sparse adapters switched in place, LoRA as the baseline."""

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
from shira_runtime.quantization import quantize
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
