"""Adapter-switching inference runtime: SHiRA sparse adapters switched in place, LoRA as the baseline."""

from runtime.adapters import LoraAdapter, SparseAdapter, load_adapter, save_adapter
from runtime.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterValueError,
    BaseMismatchError,
    ShiraError,
    UnknownAdapterError,
)
from runtime.fingerprint import Fingerprint
from runtime.manager import Runtime
from runtime.quantize import quantize
from runtime.switcher import SwitchStats

__all__ = [
    "AdapterFormatError",
    "AdapterMismatchError",
    "AdapterValueError",
    "BaseMismatchError",
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
