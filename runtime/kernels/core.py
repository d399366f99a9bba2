"""The kernel core (``kernels/csrc/shira_core.h``) through ctypes, for torch tensors and numpy arrays alike.

The core is a plain shared library with a C ABI and no torch: ``pip install`` builds it as
``shira_runtime/kernels/_core*.so`` (setup.py); a checkout whose build is missing or older than its source
compiles it once with the system C++ compiler into ``$SHIRA_KERNELS_CACHE`` (default ``~/.cache/shira_kernels``).
``load()`` raises when neither works (``shira_runtime.kernels`` then falls back to the references).

Why ctypes: one library serves numpy (``arr.ctypes.data``), torch (``Tensor.data_ptr()``) and C programs; its
build needs no Python headers, numpy headers or libtorch, so pip's isolated build never fetches torch.

``call(verb, args, kwargs, flavour)`` checks the arrays (dtypes, shapes, contiguity: messages name the verb and
the tensor, with the flavour's dtype names), packs one ``shira_item`` row per tensor into a numpy structured
array and calls the verb's C function; the core checks indices, scales and mirrors before its first write.
The numpy verbs ``restore_`` / ``apply_`` / ``switch_`` of this module take numpy arrays (bf16 and fp8 as the
``ml_dtypes`` types, when installed).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
from shira_runtime.kernels.verbs import APPLY_LISTS, RESTORE_LISTS, VERBS, KernelInputError, Verb

__all__ = ["apply_", "call", "load", "prepare", "prepared", "restore_", "source_id", "switch_", "threads", "tuning"]

ABI_VERSION = 5
F32, F16, BF16, I8, F8E4M3, F8E5M2, U8 = range(7)
CODES = (I8, F8E4M3, F8E5M2, U8)  # U8: int8 codes + 128, per-column scales
ITEM = np.dtype(
    {
        "names": ["weight", "numel", "dtype", "index_bits", "indices", "count", "delta", "saved", "scales",
                  "n_scales", "mirror", "mirror_kind", "delta_is_codes", "rows", "cols", "runs", "n_runs",
                  "mirror_order"],
        "formats": ["u8", "i8", "i4", "i4", "u8", "i8", "u8", "u8", "u8", "i8", "u8", "i4", "i4", "i8", "i8", "u8",
                    "i8", "u8"],
        "offsets": [0, 8, 16, 20, 24, 32, 40, 48, 56, 64, 72, 80, 84, 88, 96, 104, 112, 120],
        "itemsize": 128,
    }
)  # fmt: skip
# C flags: -ffp-contract=off keeps every fp32 op rounded on its own (no fused multiply-add), as torch computes
CXXFLAGS = ["-O3", "-ffp-contract=off", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", "-DNDEBUG"]
_CSRC = importlib.resources.files("shira_runtime.kernels.csrc")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_path: Path | None = None


# ---- finding, building, loading -------------------------------------------------------------------------


def source_id() -> str:
    """The id the shipped source compiles into the library (``shira_source_id()``): a hash of header + source."""
    h = hashlib.sha256()
    for name in ("shira_core.h", "shira_core.cpp"):
        h.update((_CSRC / name).read_bytes())
    return h.hexdigest()[:16]


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")


def _compile() -> Path:
    """Compile the core into the cache (once per source and compiler); returns the library's path."""
    src, sid = Path(str(_CSRC / "shira_core.cpp")), source_id()
    return compile_library(src, "libshira_core.so", [f'-DSHIRA_SOURCE_ID="{sid}"'], sid,
                           "the kernel core (first use, ~3 s)")  # fmt: skip


def compile_library(src: Path, name: str, defines: list[str], sid: str, what: str) -> Path:
    """Compile the C++ file ``src`` into the shared library ``name`` in the cache (once per ``sid``, compiler and
    flags: the core's); returns its path. Also builds the benchmarks' plain loops (``benchmarks.line_visits``)."""
    cxx = _compiler()
    key = hashlib.sha256(" ".join([cxx, *CXXFLAGS, *defines, sid, sysconfig.get_platform()]).encode()).hexdigest()
    folder = Path(os.environ.get("SHIRA_KERNELS_CACHE", Path.home() / ".cache" / "shira_kernels")) / key[:16]
    so = folder / name
    if so.exists():
        return so
    folder.mkdir(parents=True, exist_ok=True)
    print(f"shira kernels: compiling {what} into {folder}", file=sys.stderr, flush=True)
    # Build under a private name, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        cmd = [cxx, *CXXFLAGS, "-shared", *defines, str(src), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.shira_abi_version.restype = ctypes.c_int32
    lib.shira_item_size.restype = ctypes.c_int64
    lib.shira_source_id.restype = ctypes.c_char_p
    if lib.shira_abi_version() != ABI_VERSION or lib.shira_item_size() != ITEM.itemsize:
        raise RuntimeError(
            f"{path}: ABI {lib.shira_abi_version()} with {lib.shira_item_size()}-byte items, "
            f"expected ABI {ABI_VERSION} with {ITEM.itemsize}-byte items"
        )
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    for verb in VERBS.values():  # the C signature follows from the verb's sides (shira_core.h)
        fn = getattr(lib, verb.c_name)
        fn.restype = ctypes.c_int
        sides = [ptr, i64] * ((verb.restore is not None) + (verb.apply is not None))
        fn.argtypes = [*sides, *([ptr] if verb.apply is not None else []), i32, i32, ctypes.c_char_p, i64]
    lib.shira_tuning.restype = None
    lib.shira_tuning.argtypes = [i64] * 5 + [ctypes.POINTER(i64)]
    lib.shira_merge_above.restype = i64
    lib.shira_merge_above.argtypes = [i64]
    return lib


def _find() -> Path:
    """The built library: the package's own (wheel or ``pip install -e``) if it matches the source, else the
    cache's (compiled on first use)."""
    spec = importlib.util.find_spec("shira_runtime.kernels._core")
    built = Path(spec.origin) if spec is not None and spec.origin else None
    if built is not None and built.exists():
        try:
            lib = _open(built)
            current = lib.shira_source_id().decode() == source_id()
        except (RuntimeError, AttributeError):  # an older ABI (or a symbol it lacks): built before the source changed
            current = False
        if current:
            return built
        try:  # an in-place build older than the source (a checkout edited since `pip install -e`)
            return _compile()
        except Exception as exc:
            print(f"shira kernels: {built.name} predates the source and recompiling failed ({exc}); using it",
                  file=sys.stderr)  # fmt: skip
            return built
    return _compile()


def load() -> ctypes.CDLL:
    """Find (or build) and load the core; raises on failure."""
    global _lib, _path
    with _lock:
        if _lib is None:
            path = _find()
            _lib, _path = _open(path), path
    return _lib


def library_path() -> Path:
    load()
    return _path  # type: ignore[return-value]


def threads() -> int:
    """Threads a numpy call may use: ``$SHIRA_THREADS``, else the CPUs this process may run on."""
    env = os.environ.get("SHIRA_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def threaded(entries: int) -> bool:
    """Whether a call of ``entries`` entries in all (restored and applied) on numpy arrays runs on the core's
    threads: more than one thread (``threads``) and at least the ``serial_below`` knob's entries (``tuning``)."""
    return threads() > 1 and entries >= tuning()["serial_below"]


_PLANS = {1: "fused", 2: "phased", 3: "ordered"}


def tuning(chunk: int = -1, serial_below: int = -1, force_plan: int = -1, prefetch: int = -1, runs: int = -1,
           merge_above: int = -1) -> dict:
    """Read (and optionally set) the dispatch knobs; tests use them to force every branch.

    ``chunk``: entries per parallel task. ``serial_below``: total entries under which the call stays on
    the calling thread. ``force_plan``: 0 auto, 1 phased, 2 ordered. ``prefetch``: software prefetch
    distance in entries (0 off). ``runs``: 1 copies contiguous runs of one cache line as blocks when the lists
    are sorted (a ``block`` mask's layout), 0 visits every entry alone. ``merge_above``: the bytes of weights
    (and their copies) a call writes from which a chunk of one 1-byte weight is restored and applied in one merged
    pass (default: half the last-level cache; docs/kernels.md). ``last_plan`` (read only) describes the previous
    call: ``{"threaded": bool, "plan": "fused" | "phased" | "ordered"}``; ``last_merged`` (read only): whether
    some chunk of it ran merged.
    """
    lib = load()
    cur = (ctypes.c_int64 * 6)()
    lib.shira_tuning(chunk, serial_below, force_plan, prefetch, runs, cur)
    merge = lib.shira_merge_above(merge_above)
    last = cur[4]
    return {
        "chunk": cur[0],
        "serial_below": cur[1],
        "force_plan": cur[2],
        "prefetch": cur[3],
        "runs": cur[5],
        "merge_above": merge,
        "last_plan": {"threaded": bool(last & 1), "plan": _PLANS.get((last >> 1) & 3)},
        "last_merged": bool(last & 8),
    }


# ---- array flavours: dtype codes and names, pointers -----------------------------------------------------


def _sizes(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class _Numpy:
    """numpy arrays; bf16 and fp8 as ml_dtypes' types."""

    # keyed by dtype object, not by name: ``dtype.name`` builds a string (~2 us) on every call. ml_dtypes' types
    # join on the first miss after ml_dtypes was imported (an array of theirs exists only then: importing ml_dtypes
    # here would cost every process ~0.6 s)
    CODE = {np.dtype("float32"): F32, np.dtype("float16"): F16, np.dtype("int8"): I8, np.dtype("uint8"): U8}
    ML = (("bfloat16", BF16), ("float8_e4m3fn", F8E4M3), ("float8_e5m2", F8E5M2))

    @classmethod
    def extend(cls) -> bool:
        """Add ml_dtypes' types to ``CODE`` if it is imported and they are missing; whether anything was added."""
        ml = sys.modules.get("ml_dtypes")
        if ml is None or np.dtype(ml.bfloat16) in cls.CODE:
            return False
        cls.CODE.update({np.dtype(getattr(ml, name)): code for name, code in cls.ML})
        return True
    INDEX = {np.dtype("int32"): 32, np.dtype("int64"): 64}

    # attribute getters, not Python functions: the per-tensor cost is what a switch of many tensors pays
    key = staticmethod(attrgetter("dtype"))
    name = staticmethod(attrgetter("dtype.name"))  # messages only
    contiguous = staticmethod(attrgetter("flags.c_contiguous"))
    ptr = staticmethod(attrgetter("ctypes.data"))
    numel = staticmethod(attrgetter("size"))
    # whether an array's data may move while the array lives: not a numpy array's (``resize`` refuses one that is
    # referenced elsewhere, as a Frozen list's are, or that does not own its data, as a bundle's mapped weights)
    MOVABLE = False

    @staticmethod
    def cpu(x) -> bool:
        return True


class _Torch:
    """torch tensors, dtypes named as the C++ extension named them (c10's ScalarType names)."""

    @staticmethod
    def extend() -> bool:
        return False

    CODE: dict = {}
    INDEX: dict = {}
    NAMES: dict = {}

    @classmethod
    def init(cls) -> None:
        import torch

        cls.CODE = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.int8: I8,
                    torch.float8_e4m3fn: F8E4M3, torch.float8_e5m2: F8E5M2, torch.uint8: U8}  # fmt: skip
        cls.INDEX = {torch.int32: 32, torch.int64: 64}
        names = {"float32": "Float", "float64": "Double", "float16": "Half", "bfloat16": "BFloat16",
                 "int8": "Char", "uint8": "Byte", "int16": "Short", "int32": "Int", "int64": "Long", "bool": "Bool",
                 "float8_e4m3fn": "Float8_e4m3fn", "float8_e5m2": "Float8_e5m2", "complex64": "ComplexFloat",
                 "complex128": "ComplexDouble", "uint16": "UInt16", "uint32": "UInt32", "uint64": "UInt64"}  # fmt: skip
        cls.NAMES = {getattr(torch, k): v for k, v in names.items() if hasattr(torch, k)}
        cls.BF16, cls.U8 = torch.bfloat16, torch.uint8

        # method descriptors and attribute getters: no Python frame per tensor
        cls.contiguous = staticmethod(torch.Tensor.is_contiguous)
        cls.ptr = staticmethod(torch.Tensor.data_ptr)
        cls.numel = staticmethod(torch.Tensor.numel)

    key = staticmethod(attrgetter("dtype"))
    cpu = staticmethod(attrgetter("is_cpu"))
    MOVABLE = True  # a tensor's storage may be replaced (``set_``) or resized in place

    @classmethod
    def name(cls, x) -> str:
        return cls.NAMES.get(x.dtype) or str(x.dtype).removeprefix("torch.")


# ---- packing and checking --------------------------------------------------------------------------------


# An empty runs tensor is passed as this address with 0 runs: a list described as holding none (shira_core.h,
# "Runs"), which the core then does not search; a NULL pointer (no runs tensor) leaves its search on.
_NO_RUNS = np.zeros(3, np.int64)
_NO_RUNS_AT = _NO_RUNS.ctypes.data


def _side(op: str, label: str, f, lists: dict, apply: bool) -> np.ndarray:
    """The ``shira_item`` rows of one side, after the array checks (the core checks the rest)."""
    ws, idx, saved, mirrors = lists["weights"], lists["indices"], lists["saved"], lists["mirrors"]
    runs, orders = lists.get("runs"), lists.get("orders")
    deltas, scales = lists.get("deltas"), lists.get("scales")
    n = len(ws)
    if apply:
        if not (n == len(idx) == len(saved) == len(deltas)):
            raise KernelInputError(
                f"shira::{op}: {label}list lengths differ (weights {n}, indices {len(idx)}, deltas {len(deltas)}, "
                f"saved {len(saved)})"
            )
        if scales is not None and len(scales) != n:
            raise KernelInputError(f"shira::{op}: {len(scales)} scale tensors for {n} weights")
    elif not (n == len(idx) == len(saved)):
        raise KernelInputError(
            f"shira::{op}: {label}list lengths differ (weights {n}, indices {len(idx)}, saved {len(saved)})"
        )
    if mirrors is not None and len(mirrors) != n:
        raise KernelInputError(f"shira::{op}: {label}{len(mirrors)} mirror tensors for {n} weights")
    if runs is not None and len(runs) != n:
        raise KernelInputError(f"shira::{op}: {label}{len(runs)} run tensors for {n} weights")
    if orders is not None and len(orders) != n:
        raise KernelInputError(f"shira::{op}: {label}{len(orders)} mirror order tensors for {n} weights")

    def at(t: int) -> str:
        return f"shira::{op}: {label}tensor {t}: "

    code_of, index_of, key, contiguous, ptr, numel, cpu = f.CODE, f.INDEX, f.key, f.contiguous, f.ptr, f.numel, f.cpu
    rows = []
    for t in range(n):
        w, i, s = ws[t], idx[t], saved[t]
        d = deltas[t] if apply else None
        if w is None or i is None or s is None or (apply and d is None):
            raise KernelInputError(at(t) + "undefined tensor")
        if not (cpu(w) and cpu(i) and cpu(s) and (d is None or cpu(d))):
            raise KernelInputError(at(t) + "all tensors must be on the CPU")
        wk = key(w)
        wt = code_of.get(wk)
        if wt is None and f.extend():
            wt = code_of.get(wk)
        if wt is None:
            raise KernelInputError(
                at(t) + f"weight dtype {f.name(w)} is not one of fp32/fp16/bf16/int8/float8_e4m3fn/float8_e5m2/uint8"
            )
        if not contiguous(w):
            raise KernelInputError(at(t) + "weight is not contiguous")
        bits = index_of.get(key(i))
        if bits is None:
            raise KernelInputError(at(t) + f"indices dtype {f.name(i)} is not int32/int64")
        if i.ndim != 1 or not contiguous(i):
            raise KernelInputError(at(t) + f"indices must be 1-D contiguous, got shape {_sizes(i.shape)}")
        if key(s) != wk:
            raise KernelInputError(at(t) + f"saved dtype {f.name(s)} differs from weight dtype {f.name(w)}")
        if s.shape != i.shape or not contiguous(s):
            raise KernelInputError(
                at(t) + f"saved shape {_sizes(s.shape)} does not match indices shape {_sizes(i.shape)}"
            )
        baked, dp, sp, ns = False, 0, 0, 0
        if apply:
            baked = wt in CODES and key(d) == wk
            if code_of.get(key(d)) != F32 and not baked:
                raise KernelInputError(at(t) + f"delta dtype {f.name(d)} is not float32")
            if d.shape != i.shape or not contiguous(d):
                raise KernelInputError(
                    at(t) + f"delta shape {_sizes(d.shape)} does not match indices shape {_sizes(i.shape)}"
                )
            dp = ptr(d)
            sc = scales[t] if scales is not None else None
            if sc is not None and numel(sc) and not baked:
                if wt in CODES and (code_of.get(key(sc)) != F32 or sc.ndim != 1 or not contiguous(sc) or not f.cpu(sc)):
                    raise KernelInputError(
                        at(t) + f"scales must be fp32 1-D contiguous, got {f.name(sc)}{_sizes(sc.shape)}"
                    )
                sp, ns = ptr(sc), numel(sc)
                if wt == U8 and numel(w) % ns == 0 and (w.ndim != 2 or ns != w.shape[1]):  # else the core's words
                    raise KernelInputError(at(t) + _u8_scales(ns, w.shape))
        mp, kind, r, c = 0, 0, 0, 0
        m = mirrors[t] if mirrors is not None else None
        if m is not None and numel(m):
            u8 = f.name(m) in ("uint8", "Byte")
            kind = 2 if u8 else 1
            if wt == U8:
                raise KernelInputError(at(t) + "a mirror given for a uint8 weight (it is the copy itself: no mirror)")
            if wt in CODES:
                if u8:
                    ok = (wt == I8 and w.ndim == 2 and m.ndim == 2 and contiguous(m) and f.cpu(m)
                          and tuple(m.shape) == (w.shape[1], w.shape[0]))  # fmt: skip
                    if not ok:
                        want = f"[{w.shape[1]}, {w.shape[0]}]" if w.ndim == 2 else "[-1, -1]"
                        raise KernelInputError(
                            at(t) + f"a uint8 mirror is the transposed copy of 2-D int8 codes: expected {want} for a "
                            f"{f.name(w)}{_sizes(w.shape)} weight, got {_sizes(m.shape)}"
                        )
                    r, c = w.shape
                elif (
                    f.name(m) not in ("bfloat16", "BFloat16")
                    or not contiguous(m)
                    or not f.cpu(m)
                    or numel(m) != numel(w)
                ):
                    raise KernelInputError(
                        at(t) + f"the mirror must be a contiguous bf16 tensor of the weight's {numel(w)} elements, "
                        f"got {f.name(m)}{_sizes(m.shape)}"
                    )
            mp = ptr(m)
        rp, nr = 0, 0
        u = runs[t] if runs is not None else None
        if u is not None and not numel(u):  # described, none: not NULL, so the core skips its own search
            rp = _NO_RUNS_AT
        elif u is not None:
            if f.name(u) not in ("int64", "Long") or u.ndim != 2 or u.shape[1] != 3 or not contiguous(u) or not cpu(u):
                raise KernelInputError(
                    at(t) + "runs must be int64 [n, 3] (position, first index, length), "
                    f"got {f.name(u)}{_sizes(u.shape)}"
                )
            rp, nr = ptr(u), u.shape[0]
        op_ = 0
        o = orders[t] if orders is not None else None
        if o is not None and numel(o):
            if not (key(o) == key(i) and o.shape == i.shape and contiguous(o) and cpu(o)):
                raise KernelInputError(
                    at(t) + f"the mirror order must be a contiguous {f.name(i)} tensor of the indices' "
                    f"{numel(i)} entries, got {f.name(o)}{_sizes(o.shape)}"
                )
            op_ = ptr(o)
        rows.append(
            (ptr(w), numel(w), wt, bits, ptr(i), numel(i), dp, ptr(s), sp, ns, mp, kind, baked, r, c, rp, nr, op_)
        )
    return np.array(rows, dtype=ITEM)


def _u8_scales(n: int, shape) -> str:
    """The message for scales that are not one per column of a uint8 weight (the core sees only its numel)."""
    return f"{n} scales for a uint8 weight {_sizes(shape)}: a 2-D weight with one scale per column expected"


class Frozen(tuple):
    """A list argument whose caller promises that its arrays keep their storage, shape and dtype while it lives
    (the runtime's own arrays: plans, saved-value buffers). A call whose lists of one side are all ``Frozen`` (or
    None) checks and packs that side once; later calls with the same ``Frozen`` objects reuse its rows, re-reading
    only the torch weights' addresses (a tensor whose storage moved is packed anew; a numpy array's data cannot
    move while it is referenced). Any other list is checked at every call."""


# (verb, side, flavour, the side's lists by id) -> (rows, those lists: kept, so their ids stay theirs, weight
# addresses). A tuple cannot be weakly referenced: the owner of Frozen lists calls ``release`` when it drops them
# (their arrays may go with them); the oldest entries go beyond PACKED_KEPT.
_PACKED: dict[tuple, tuple[np.ndarray, tuple, tuple]] = {}
PACKED_KEPT = 64
_packed_lock = threading.Lock()


def _packed(op: str, label: str, f, lists: dict, apply: bool, seen: dict) -> np.ndarray:
    """``_side``'s rows, reused for ``Frozen`` lists (see ``Frozen``). ``seen``: the weights' addresses read by
    this call so far, by id of their Frozen list (the two sides of a switch often share one)."""
    vals = tuple(lists.values())
    ws = lists["weights"]
    if ws is None or not all(v is None or type(v) is Frozen for v in vals):
        return _side(op, label, f, lists, apply)
    key = (op, apply, f, *map(id, vals))
    ptrs = seen.get(id(ws))
    if ptrs is None:
        ptrs = seen[id(ws)] = tuple(map(f.ptr, ws)) if f.MOVABLE else ()  # numpy: ~0.8 us each, cannot move
    hit = _PACKED.get(key)  # the entry keeps its lists alive: an id in its key is still theirs
    if hit is not None and hit[2] == ptrs:
        return hit[0]
    rows = _side(op, label, f, lists, apply)
    with _packed_lock:
        while len(_PACKED) >= PACKED_KEPT:
            del _PACKED[next(iter(_PACKED))]
        _PACKED[key] = (rows, vals, ptrs)
    return rows


def release(lists) -> None:
    """Forget the packed rows of every call that used one of ``lists`` (Frozen lists their owner drops)."""
    drop = {id(x) for x in lists}
    with _packed_lock:
        for key in [k for k, (_, vals, _) in _PACKED.items() if any(id(v) in drop for v in vals if v is not None)]:
            del _PACKED[key]
        for key in [k for k, e in _CALLS.items() if any(id(v) in drop for v in e.vals if v is not None)]:
            del _CALLS[key]


def written(verb: Verb, values: dict) -> list:
    """The arrays a call of ``verb`` with ``values`` writes (its mutated parameters'), for their version bumps,
    each counter once: the same weight in an outgoing and an incoming list is one tensor, and views of one base
    (the runtime's saved-value slices of one arena) share its version counter, so the base stands for them (where
    the lists are all ``Frozen``; plain lists' arrays as given). ``call(..., bumps=True)`` finds them once per
    call it keeps."""
    single = [v for k in verb.mutated if (v := values[k]) is not None and not isinstance(v, (list, tuple))]
    return _written_lists(verb, values) + single


def _written_lists(verb: Verb, values: dict) -> list:
    """``written``'s arrays from list parameters."""
    lists = [v for k in verb.mutated if isinstance(v := values[k], (list, tuple))]
    return _distinct(lists) if all(type(v) is Frozen for v in lists) else [x for v in lists for x in v]


def _distinct(lists: list) -> list:
    """The arrays of ``lists``, each version counter once (a torch view stands as its base)."""
    distinct = {}
    for v in lists:
        for x in v:
            base = getattr(x, "_base", None)  # a torch view's base (numpy arrays have none)
            x = x if base is None else base
            distinct[id(x)] = x
    return list(distinct.values())


_ERR = threading.local()

# (verb, flavour, the call's list arguments by id) -> ``_Call``: a call whose lists are all ``Frozen`` (or None) is
# assembled once, and a later call with the same lists re-reads only its torch weights' addresses (a storage that
# moved is packed anew). A small switch paid ~14 us a call to find its two sides' rows again; ~5 us now.
# Released with ``_PACKED``'s entries; the oldest go beyond PACKED_KEPT.
_CALLS: dict[tuple, _Call] = {}


class _Call:
    """What ``call`` runs: the C call's leading arguments (each side's rows' address and count), the apply side's
    count, the rows (kept alive), the lists (kept, so that the ids in its key stay theirs), each distinct torch
    weights list with the addresses its rows hold, and the arrays the call writes (``written``: found when first
    asked)."""

    __slots__ = ("head", "n_apply", "rows", "vals", "moving", "writes")

    def __init__(self, head: tuple, n_apply: int, rows: tuple, vals: tuple, moving: tuple) -> None:
        self.head, self.n_apply, self.rows, self.vals, self.moving = head, n_apply, rows, vals, moving
        self.writes: list | None = None


def call(verb: Verb, values: dict, flavour, threads: int, bumps: bool = False) -> list | None:
    """Run ``verb`` on ``values`` (``{param: value}``, every parameter present) through the core. ``bumps``: return
    the arrays it wrote (``written``), for their version counters."""
    lib = load()
    vals = tuple(map(values.__getitem__, verb.lists))
    key = (verb.name, flavour, *map(id, vals))
    hit = _CALLS.get(key)  # the entry keeps its lists alive: an id in its key is still theirs
    if hit is None or not _unmoved(hit.moving, flavour.ptr):
        hit = _assemble(verb, values, flavour, vals, key)
    sat = values["saturated"] if verb.apply is not None else None
    return _run(lib, verb, hit, values, sat, flavour, threads, bumps)


def prepared(verb: Verb, values: dict, flavour) -> Callable[[Any, int], list]:
    """``call(verb, values, flavour, threads, bumps=True)`` made ready to run again and again: returns
    ``run(saturated, threads)``, each run the verb on these lists (whose arrays must keep their storage, shape and
    dtype while ``run`` is used, as ``Frozen`` promises) with that ``saturated`` (None: ``values``'); the checks and
    the packing done now (a refused call raises here), a run re-reading only the torch weights' addresses (a
    storage that moved is packed anew). What a switch of a kept plan runs: ``call``'s lookups were ~5 us of a
    switch of 4 small tensors."""
    lib = load()
    values = dict(values)
    vals = tuple(map(values.__getitem__, verb.lists))
    key = (verb.name, flavour, *map(id, vals))
    entry = _assemble(verb, values, flavour, vals, key)
    ptr, default = flavour.ptr, values["saturated"] if verb.apply is not None else None

    def run(saturated: Any = None, threads: int = 1) -> list:
        nonlocal entry
        if not _unmoved(entry.moving, ptr):
            entry = _assemble(verb, values, flavour, vals, key)
        return _run(lib, verb, entry, values, default if saturated is None else saturated, flavour, threads, True)

    return run


def _run(lib, verb: Verb, entry: _Call, values: dict, sat, flavour, threads: int, bumps: bool) -> list | None:
    """The C call of ``entry`` with the ``saturated`` counts ``sat`` (checked here)."""
    c_args = list(entry.head)
    if verb.apply is not None:
        sp = None
        if sat is not None:
            n_apply = entry.n_apply
            ok = flavour.name(sat) in ("int64", "Long") and sat.ndim == 1 and sat.shape[0] == n_apply
            if not (ok and flavour.contiguous(sat) and flavour.cpu(sat)):
                raise KernelInputError(
                    f"shira::{verb.name}: saturated must be int64 [{n_apply}], got {flavour.name(sat)}"
                    f"{_sizes(sat.shape)}"
                )
            sp = flavour.ptr(sat)
        c_args.append(sp)
    err = getattr(_ERR, "buf", None)
    if err is None:
        err = _ERR.buf = ctypes.create_string_buffer(1024)
    rc = getattr(lib, verb.c_name)(*c_args, bool(values["validate"]), threads, err, len(err))
    if rc == 1:
        raise KernelInputError(err.value.decode())
    if rc != 0:
        raise RuntimeError(f"shira kernel core: {err.value.decode()}")
    if not bumps:
        return None
    if entry.writes is None:
        entry.writes = _written_lists(verb, values)
    return entry.writes + [sat] if sat is not None else entry.writes


def _unmoved(weights: tuple, ptr) -> bool:
    """Whether each torch weights list of a kept call still has the addresses its rows hold."""
    for ws, at in weights:
        if tuple(map(ptr, ws)) != at:
            return False
    return True


def _assemble(verb: Verb, values: dict, flavour, vals: tuple, key: tuple) -> _Call:
    """The ``_Call`` that ``call`` runs: each side's rows (``_packed``: checked), kept if every list is Frozen or
    None."""
    op = verb.name
    two = verb.restore is not None and verb.apply is not None
    head: list = []
    kept = []
    n_apply = 0
    seen: dict[int, tuple] = {}
    weights = {}
    for prefix, apply in ((verb.restore, False), (verb.apply, True)):
        if prefix is None:
            continue
        names = APPLY_LISTS if apply else RESTORE_LISTS
        lists = {k: values.get(prefix + k) for k in names}
        label = ("incoming " if apply else "outgoing ") if two else ""
        rows = _packed(op, label, flavour, lists, apply, seen)
        head += [rows.ctypes.data if len(rows) else None, len(rows)]
        kept.append(rows)
        if apply:
            n_apply = len(rows)
        ws = lists["weights"]
        if flavour.MOVABLE and ws is not None:
            weights[id(ws)] = ws
    moving = tuple((ws, tuple(map(flavour.ptr, ws))) for ws in weights.values())
    entry = _Call(tuple(head), n_apply, tuple(kept), vals, moving)
    if all(v is None or type(v) is Frozen for v in vals):
        with _packed_lock:
            while len(_CALLS) >= PACKED_KEPT:
                del _CALLS[next(iter(_CALLS))]
            _CALLS[key] = entry
    return entry


def prepare(name: str, args: tuple, kwargs: dict) -> Callable[..., None]:
    """``kernels.<verb>.prepare``'s numpy side: ``run(saturated=None)`` (``prepared``), threads read per run."""
    verb = VERBS[name]
    run = prepared(verb, verb.bind(args, kwargs), _Numpy)

    def go(saturated: Any = None) -> None:
        run(saturated, threads())

    return go


def _numpy_verb(name: str):
    verb = VERBS[name]

    def fn(*args, **kwargs) -> None:
        call(verb, verb.bind(args, kwargs), _Numpy, threads())

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = verb.signature  # type: ignore[attr-defined]
    fn.__doc__ = f"``{name}`` on numpy arrays through the kernel core (semantics: ``shira_runtime.kernels.reference``)."
    return fn


restore_ = _numpy_verb("restore_")
apply_ = _numpy_verb("apply_")
switch_ = _numpy_verb("switch_")
