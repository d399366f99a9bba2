"""The torch binding of the kernel core: ``shira::restore_`` / ``apply_`` / ``switch_`` as ``torch.library`` ops.

The ops are defined from ``shira_runtime.kernels.verbs`` (the one declaration of each verb); their CPU impl is
Python, calling the torch-free core (``kernels/csrc/shira_core.h``, through ``shira_runtime.kernels.core``) on
the tensors' data pointers, and a fake impl lets them be traced. Nothing is compiled against libtorch.

The verbs of this module are what ``shira_runtime.kernels`` runs on torch tensors: in eager mode they call the
core directly (the dispatcher adds nothing but cost there) and bump the version counters of what they wrote;
under ``torch.compile`` they call the ops. Results are those of ``shira_runtime.kernels.reference``, bit for
bit (1-byte quantized codes included; the one exception is the bit pattern of a NaN produced in bf16); bad
inputs raise ``KernelInputError`` with a message naming the op and the tensor, before anything is written.
``validate=True`` checks every index (and accepts any order); ``validate=False`` trusts the caller's promise of
sorted, in-range indices and checks only the first and last of each list. Threads: ``torch.get_num_threads()``.
"""

from __future__ import annotations

import sys
import threading

import torch
from shira_runtime.kernels import core
from shira_runtime.kernels.verbs import VERBS, Verb

__all__ = ["apply_", "load", "prepare", "restore_", "switch_", "tuning"]

_lock = threading.Lock()
_lib: torch.library.Library | None = None  # kept alive: dropping it would unregister the ops


def _impl(verb: Verb):
    def impl(*args, **kwargs) -> None:
        core.call(verb, verb.bind(args, kwargs), core._Torch, torch.get_num_threads())

    return impl


def _fake(*args, **kwargs) -> None:
    return None  # the ops only mutate their inputs in place


def _define() -> None:
    """Declare the ``shira`` ops with their CPU and fake impls (once per process)."""
    global _lib
    if _lib is not None:
        return
    core._Torch.init()
    lib = torch.library.Library("shira", "DEF")
    for verb in VERBS.values():
        lib.define(verb.schema)
        lib.impl(verb.name, _impl(verb), "CPU")
        torch.library.register_fake(f"shira::{verb.name}", _fake, lib=lib)
    _lib = lib


def load():
    """Load the core (building it on first use in a bare checkout) and define the ops; returns this module.

    Raises on any build or load failure (``kernels`` then falls back to the reference).
    """
    with _lock:
        core.load()
        _define()
    return sys.modules[__name__]


tuning = core.tuning


def _verb(name: str):
    verb = VERBS[name]

    def fn(*args, **kwargs) -> None:
        if _lib is None:
            load()
        values = verb.bind(args, kwargs)
        if "torch._dynamo" in sys.modules and torch.compiler.is_compiling():  # no tracing without dynamo imported
            getattr(torch.ops.shira, name)(*values.values())
            return
        # The core writes through raw pointers: tell autograd, as the reference's in-place ops do.
        torch._C._increment_version(core.call(verb, values, core._Torch, torch.get_num_threads(), bumps=True))

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = verb.signature  # type: ignore[attr-defined]
    fn.__doc__ = f"``torch.ops.shira.{name}`` run eagerly through the core (``shira_runtime.kernels.reference``)."
    return fn


def prepare(name: str, args: tuple, kwargs: dict):
    """``kernels.<verb>.prepare``'s torch side: ``run(saturated=None)`` (``core.prepared``: the arguments checked and
    packed now), each run telling autograd what it wrote, on ``torch.get_num_threads()`` threads; eager only."""
    if _lib is None:
        load()
    verb = VERBS[name]
    run = core.prepared(verb, verb.bind(args, kwargs), core._Torch)
    bump, threads = torch._C._increment_version, torch.get_num_threads

    def go(saturated: torch.Tensor | None = None) -> None:
        bump(run(saturated, threads()))

    return go


restore_ = _verb("restore_")
apply_ = _verb("apply_")
switch_ = _verb("switch_")
