"""The C++ fast path: ``shira::restore_`` / ``apply_`` / ``switch_`` registered with ``torch.library``.

The schema is declared here, once; ``csrc/shira_kernels.cpp`` implements it for CPU
(``TORCH_LIBRARY_IMPL(shira, CPU, ...)``), and a fake impl lets the ops be traced. ``load()`` compiles the
source with the system C++ compiler on first use (no ninja, no setuptools), caches the shared library under
``$SHIRA_KERNELS_CACHE`` (default ``~/.cache/shira_kernels``) in a folder named by a hash of the source,
the flags and the torch version, and loads it with ``torch.ops.load_library``.

The verbs have the signatures and results of ``shira_runtime.kernels.reference`` (bit for bit, 1-byte quantized codes
included; the one exception is the bit pattern of a NaN produced in bf16); bad inputs raise
``KernelInputError`` with a message naming the op and the tensor, before anything is written.
``validate=True`` checks every index (and accepts any order); ``validate=False`` trusts the caller's promise of
sorted, in-range indices and checks only the first and last of each list.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch
from shira_runtime.kernels.checks import KernelInputError

__all__ = ["apply_", "load", "restore_", "switch_", "tuning"]

# kernels/csrc in the repository, shira_runtime/kernels/csrc in an installed wheel: found by its package name
_SOURCES = [Path(str(importlib.resources.files("shira_runtime.kernels.csrc") / "shira_kernels.cpp"))]
# -ffp-contract=off: the fp32 add must round exactly like torch's (no fused multiply-add rewrites).
_CXXFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-fPIC", "-shared", "-DNDEBUG"]

_SCHEMAS = {
    "restore_": (
        "restore_(Tensor(a!)[] weights, Tensor[] indices, Tensor[] saved, bool validate=True, "
        "Tensor(b!)[]? mirrors=None) -> ()"
    ),
    "apply_": (
        "apply_(Tensor(a!)[] weights, Tensor[] indices, Tensor[] deltas, Tensor(b!)[] saved, bool validate=True, "
        "Tensor[]? scales=None, Tensor(c!)? saturated=None, Tensor(d!)[]? mirrors=None) -> ()"
    ),
    "switch_": (
        "switch_(Tensor(a!)[] out_weights, Tensor[] out_indices, Tensor[] out_saved, "
        "Tensor(b!)[] in_weights, Tensor[] in_indices, Tensor[] in_deltas, Tensor(c!)[] in_saved, "
        "bool validate=True, Tensor[]? in_scales=None, Tensor(d!)? saturated=None, "
        "Tensor(e!)[]? out_mirrors=None, Tensor(f!)[]? in_mirrors=None) -> ()"
    ),
}

_lock = threading.Lock()
_lib: torch.library.Library | None = None  # kept alive: dropping it would unregister the schema
_so_path: Path | None = None
_tuning_fn = None


def _define() -> None:
    """Declare the ``shira`` ops and their fake impls (once per process)."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("shira", "DEF")
    for schema in _SCHEMAS.values():
        lib.define(schema)

    # Fake impls: the ops only mutate their inputs in place, so tracing needs nothing but "returns None".
    @torch.library.register_fake("shira::restore_", lib=lib)
    def _restore_fake(weights, indices, saved, validate=True, mirrors=None):
        return None

    @torch.library.register_fake("shira::apply_", lib=lib)
    def _apply_fake(weights, indices, deltas, saved, validate=True, scales=None, saturated=None, mirrors=None):
        return None

    @torch.library.register_fake("shira::switch_", lib=lib)
    def _switch_fake(
        out_weights,
        out_indices,
        out_saved,
        in_weights,
        in_indices,
        in_deltas,
        in_saved,
        validate=True,
        in_scales=None,
        saturated=None,
        out_mirrors=None,
        in_mirrors=None,
    ):
        return None

    _lib = lib


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")


def _build_command(cxx: str, src: list[Path], out: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        cxx,
        *_CXXFLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *map(str, src),
        "-o",
        str(out),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
        f"-Wl,-rpath,{torch_lib}",
    ]


def _cache_dir(cxx: str) -> Path:
    h = hashlib.sha256()
    for s in _SOURCES:
        h.update(s.read_bytes())
    torch_lib = Path(torch.__file__).parent / "lib"  # baked in as the rpath
    h.update(" ".join([cxx, *_CXXFLAGS, torch.__version__, str(torch_lib), sysconfig.get_platform()]).encode())
    root = Path(os.environ.get("SHIRA_KERNELS_CACHE", Path.home() / ".cache" / "shira_kernels"))
    return root / h.hexdigest()[:16]


def _build() -> Path:
    """Path of the compiled library, compiling it first if the cache does not hold it."""
    cxx = _compiler()
    folder = _cache_dir(cxx)
    so = folder / "shira_kernels.so"
    if so.exists():
        return so
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"shira kernels: compiling the C++ extension (first use, ~12 s on 2 cores) into {folder}",
        file=sys.stderr,
        flush=True,
    )
    # Build under a private name, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run(_build_command(cxx, _SOURCES, Path(tmp)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCES[0].name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def load():
    """Build (first use) and load the extension; returns this module, whose verbs then run the C++ ops.

    Raises on any build or load failure (``kernels`` then falls back to the reference).
    """
    global _so_path, _tuning_fn
    with _lock:
        if _so_path is None:
            _define()
            so = _build()
            torch.ops.load_library(str(so))
            fn = ctypes.CDLL(str(so)).shira_tuning
            fn.restype = None
            fn.argtypes = [ctypes.c_int64] * 5 + [ctypes.POINTER(ctypes.c_int64)]
            _tuning_fn = fn
            _so_path = so
    return sys.modules[__name__]


def tuning(chunk: int = -1, serial_below: int = -1, force_plan: int = -1, prefetch: int = -1, runs: int = -1) -> dict:
    """Read (and optionally set) the dispatch knobs; tests use them to force every branch.

    ``chunk``: entries per parallel task. ``serial_below``: total entries under which the call stays on
    the calling thread. ``force_plan``: 0 auto, 1 phased, 2 ordered. ``prefetch``: software prefetch
    distance in entries (0 off). ``runs``: 1 copies contiguous runs of one cache line as blocks when the lists
    are sorted (a ``block`` mask's layout), 0 visits every entry alone. ``last_plan`` (read only) describes
    the previous call: ``{"threaded": bool, "plan": "fused" | "phased" | "ordered"}``.
    """
    load()
    cur = (ctypes.c_int64 * 6)()
    _tuning_fn(chunk, serial_below, force_plan, prefetch, runs, cur)
    last = cur[4]
    return {
        "chunk": cur[0],
        "serial_below": cur[1],
        "force_plan": cur[2],
        "prefetch": cur[3],
        "runs": cur[5],
        "last_plan": {"threaded": bool(last & 1), "plan": _PLANS.get(last >> 1)},
    }


_PLANS = {1: "fused", 2: "phased", 3: "ordered"}


def _call(op, *args, validate: bool, mutated: tuple[list[torch.Tensor], ...], **extra) -> None:
    if _so_path is None:
        load()
    if not any(isinstance(a, list) and a for a in args):
        return  # no tensor at all: nothing to do (and nothing the dispatcher could route on)
    try:
        op(*args, validate=validate, **extra)
    except ValueError as exc:  # the C++ input checks raise ValueError("shira::<op>: ...")
        raise KernelInputError(str(exc)) from None
    # The C++ kernel writes through raw pointers: tell autograd, as the reference's in-place ops do.
    for tensors in mutated:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def restore_(
    weights: list[torch.Tensor],
    indices: list[torch.Tensor],
    saved: list[torch.Tensor],
    validate: bool = True,
    mirrors: list[torch.Tensor] | None = None,
) -> None:
    """In place: ``weights[t].flat[indices[t]] = saved[t]`` for every t (see ``shira_runtime.kernels.reference``)."""
    _call(
        torch.ops.shira.restore_,
        weights,
        indices,
        saved,
        validate=validate,
        mutated=(weights, mirrors or []),
        mirrors=mirrors,
    )


def apply_(
    weights: list[torch.Tensor],
    indices: list[torch.Tensor],
    deltas: list[torch.Tensor],
    saved: list[torch.Tensor],
    validate: bool = True,
    scales: list[torch.Tensor] | None = None,
    saturated: torch.Tensor | None = None,
    mirrors: list[torch.Tensor] | None = None,
) -> None:
    """In place: ``saved[t] = w.flat[idx]``, then ``w.flat[idx] = dtype(fp32(saved) + delta)`` (one visit);
    1-byte codes with ``scales`` on their grid, clamped entries added to ``saturated``, their bf16 ``mirrors``
    written in the same visit (``shira_runtime.kernels.reference``)."""
    _call(
        torch.ops.shira.apply_,
        weights,
        indices,
        deltas,
        saved,
        validate=validate,
        mutated=(weights, saved, mirrors or []),
        scales=scales,
        saturated=saturated,
        mirrors=mirrors,
    )


def switch_(
    out_weights: list[torch.Tensor],
    out_indices: list[torch.Tensor],
    out_saved: list[torch.Tensor],
    in_weights: list[torch.Tensor],
    in_indices: list[torch.Tensor],
    in_deltas: list[torch.Tensor],
    in_saved: list[torch.Tensor],
    validate: bool = True,
    in_scales: list[torch.Tensor] | None = None,
    saturated: torch.Tensor | None = None,
    out_mirrors: list[torch.Tensor] | None = None,
    in_mirrors: list[torch.Tensor] | None = None,
) -> None:
    """Restore the outgoing state, then apply the incoming one; all checks happen before the first write.
    ``in_scales`` / ``saturated``: as ``apply_``'s, for the incoming lists; ``out_mirrors`` / ``in_mirrors``:
    the bf16 mirrors of each list's 1-byte weights (``shira_runtime.kernels.reference``)."""
    _call(
        torch.ops.shira.switch_,
        out_weights,
        out_indices,
        out_saved,
        in_weights,
        in_indices,
        in_deltas,
        in_saved,
        validate=validate,
        mutated=(out_weights, in_weights, in_saved, out_mirrors or [], in_mirrors or []),
        in_scales=in_scales,
        saturated=saturated,
        out_mirrors=out_mirrors,
        in_mirrors=in_mirrors,
    )
