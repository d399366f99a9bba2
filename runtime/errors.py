"""Specific errors; every message names the adapter, file, tensor or index at fault."""

from __future__ import annotations


class ShiraError(Exception):
    """Base of every error the runtime raises on purpose."""


class AdapterFormatError(ShiraError, ValueError):
    """A file or directory is not a readable adapter/bundle (truncated, corrupted, wrong format or version)."""


class AdapterMismatchError(ShiraError, ValueError):
    """An adapter does not fit the base: unknown tensor, wrong shape, index out of range, unsupported dtype."""


class AdapterValueError(ShiraError, ValueError):
    """An adapter's content is unusable: duplicate indices, NaN/Inf values, a result the dtype cannot hold."""


class BaseMismatchError(AdapterMismatchError):
    """The adapter's fingerprint says it was made for another base model."""


class BaseLoadError(ShiraError, ValueError):
    """A base model cannot be loaded: an unknown preset, a directory that is not a transformers model, a
    ``module.path:callable`` that does not return a module, or ``transformers`` not installed."""


class CannotGenerateError(ShiraError, TypeError):
    """The base cannot generate: it has no language-model head, or its forward does not map token ids
    ``[batch, seq]`` to logits ``[batch, seq, vocab]``."""


class ExportError(ShiraError, ValueError):
    """A module cannot be exported or packaged to a live-weights bundle (the message says which tensor and why)."""


class UnknownAdapterError(ShiraError, KeyError):
    """No adapter is registered under that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
