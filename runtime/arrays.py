"""The array operations the switching engine needs, for numpy arrays (the device path: a bundle on onnxruntime,
no torch) and torch tensors (the torch backend): one engine (``shira_runtime.switcher``, ``shira_runtime.bank``)
over either, picked by the backend (``Backend.ops``) or by the arrays an adapter holds (``ops_for``).

Both sides compute the same values bit for bit: every sum is fp32 in the same order, every cast rounds once.
bf16 and the 1-byte float formats are ``ml_dtypes``' numpy types on the numpy side (numpy has none of its own).
This module imports no torch; ``TorchOps`` does, when first used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A NaN bit pattern per dtype that fills the incoming saved buffers before the kernel runs: an entry still
# holding it was never gathered, so its weight element was never written (the kernels gather before they
# write, element by element). A base value with exactly these bits is written back unchanged either way.
# 1-byte codes: int8's -128 is off the symmetric grid (uint8's 0: the same code + 128), 0x7F is an FP8 NaN; the
# bank refuses an adapter whose base codes at its indices are either (so the marker is never a real base code
# that the apply would change)
UNGATHERED = {
    "float32": ("int32", 0x7FDADBAD),
    "float16": ("int16", 0x7E5B),
    "bfloat16": ("int16", 0x7FDB),
    "int8": ("int8", -128),
    "uint8": ("uint8", 0),
    "float8_e4m3fn": ("uint8", 0x7F),
    "float8_e5m2": ("uint8", 0x7F),
}
# 1-byte codes of a quantized base; uint8: int8 codes + 128 held as the transposed copy an int8 bundle's graph
# reads (the kernels' uint8 weights: per-column scales)
CODE_DTYPES = frozenset({"int8", "float8_e4m3fn", "float8_e5m2", "uint8"})
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what adapters' values and float weights hold
FINFO_MAX = {"float32": 3.4028234663852886e38, "float16": 65504.0, "bfloat16": 3.3895313892515355e38}


_DTYPE_NAMES: dict[Any, str] = {}  # dtype object -> name: numpy builds ``dtype.name`` anew on each call (~2 us)


def dtype_name(x: Any) -> str:
    """``"float32"``, ``"bfloat16"``, ``"int8"``... for a numpy array or a torch tensor."""
    dtype = x.dtype
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name if isinstance(x, np.ndarray) else str(dtype).removeprefix("torch.")
    return name


def fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32, as a Python float."""
    return float(np.float32(x))


def ops_for(x: Any) -> NumpyOps | TorchOps:
    """The operations for ``x``'s kind of array."""
    return NUMPY if isinstance(x, np.ndarray) else torch_ops()


class NumpyOps:
    """numpy arrays (flat indices int32/int64, deltas fp32)."""

    kind = "numpy"

    @staticmethod
    def is_array(x: Any) -> bool:
        return isinstance(x, np.ndarray)

    @staticmethod
    def numel(x: np.ndarray) -> int:
        return x.size

    @staticmethod
    def itemsize(x: np.ndarray) -> int:
        return x.itemsize

    @staticmethod
    def region(x: np.ndarray) -> tuple[int, int]:
        """``x``'s storage as ``(address of its first element, bytes)`` (a C-contiguous array)."""
        return x.ctypes.data, x.nbytes

    @staticmethod
    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(-1)

    @staticmethod
    def raw(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def typed(x: np.ndarray, like: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def take(w: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """A copy of ``w``'s flat elements at ``idx``."""
        return w.reshape(-1)[idx]

    @staticmethod
    def put(w: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
        """``w``'s flat elements at ``idx`` = ``values`` (same dtype), in place."""
        w.reshape(-1)[idx] = values

    @staticmethod
    def empty(n: int, dtype: str) -> np.ndarray:
        """``n`` uninitialized elements of ``dtype``."""
        return np.empty(n, dtype=_np_dtype(dtype))

    @staticmethod
    def marked(n: int, dtype: str) -> np.ndarray:
        """``n`` elements of ``dtype``, each holding the ungathered marker."""
        int_dtype, marker = UNGATHERED[dtype]
        return np.full(n, marker, dtype=int_dtype).view(_np_dtype(dtype))

    @staticmethod
    def mark(buf: np.ndarray) -> None:
        int_dtype, marker = UNGATHERED[dtype_name(buf)]
        buf.view(int_dtype).fill(marker)

    @staticmethod
    def marks(buf: np.ndarray) -> tuple[np.ndarray, int]:
        """A numpy view of ``buf``'s bits as integers, and the ungathered marker of its dtype: ``view[pos] =
        marker`` marks entries ``pos`` (one vectorized write; the view made once per buffer)."""
        int_dtype, marker = UNGATHERED[dtype_name(buf)]
        return buf.view(int_dtype), marker

    @staticmethod
    def gathered(saved: np.ndarray) -> np.ndarray:
        """Which entries of a saved-value buffer were gathered (no longer the marker)."""
        int_dtype, marker = UNGATHERED[dtype_name(saved)]
        return saved.view(int_dtype) != np.array(marker).astype(int_dtype)

    @staticmethod
    def absmax(x: np.ndarray) -> float:
        return float(np.abs(x.reshape(-1).astype(np.float32)).max()) if x.size else 0.0

    @staticmethod
    def searchsorted(sorted_idx: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(sorted_idx, idx.astype(sorted_idx.dtype))

    @staticmethod
    def to_fp32(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    @staticmethod
    def scaled(delta: np.ndarray, alpha: float) -> np.ndarray:
        return delta * np.float32(alpha)

    @staticmethod
    def combine(idx: list[np.ndarray], scaled: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Sorted unique indices and the fp32 sums of ``scaled`` at them, each sum in list order."""
        cat = np.concatenate(idx)
        uniq, inverse = np.unique(cat, return_inverse=True)
        total = np.zeros(uniq.size, dtype=np.float32)
        np.add.at(total, inverse, np.concatenate(scaled))
        return uniq.astype(cat.dtype), total

    @staticmethod
    def sort(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(idx, kind="stable")
        return idx[order], order

    @staticmethod
    def counts(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)

    @staticmethod
    def as_index(idx: np.ndarray) -> np.ndarray:
        return idx.astype(np.int64, copy=False)

    @staticmethod
    def values_at_base(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """``dtype(fp32(base) + delta)``: the kernels' formula for a float weight."""
        return (base.astype(np.float32) + delta).astype(base.dtype)

    @staticmethod
    def requantize(base: np.ndarray, scale: np.ndarray, delta: np.ndarray) -> np.ndarray:
        from shira_runtime.kernels.reference_np import requantize

        return requantize(base, scale, delta)[0]

    @staticmethod
    def bad_codes(codes: np.ndarray) -> np.ndarray:
        """Codes that are no point of their grid: int8 -128 (uint8 0), a non-finite FP8 code."""
        if codes.dtype == np.int8:
            return codes == -128
        if codes.dtype == np.uint8:
            return codes == 0
        return ~np.isfinite(codes.astype(np.float32))

    @staticmethod
    def first(mask: np.ndarray) -> int:
        """The position of the first True in a 1-D mask (one exists)."""
        return int(np.flatnonzero(mask)[0])

    @staticmethod
    def all_finite(x: np.ndarray) -> bool:
        return bool(np.isfinite(x).all())

    @staticmethod
    def decode(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """``fp32(code) * scale`` (one scale per entry): int8 codes, the 1-byte format a bundle holds (or their
        uint8 copy's bytes, code + 128)."""
        return int8_codes(codes).astype(np.float32) * scale.astype(np.float32)

    @staticmethod
    def half_step(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Half the grid's spacing at each code, times its scale (``qformats.grid_half_step``): int8's is 0.5."""
        int8_codes(codes)
        return np.float32(0.5) * scale.astype(np.float32)

    @staticmethod
    def is_contiguous_cpu(x: np.ndarray) -> bool:
        return bool(x.flags.c_contiguous) and bool(x.flags.writeable)

    @staticmethod
    def from_numpy(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return x


class TorchOps:
    """torch tensors: the same operations, as the torch backend has always computed them."""

    kind = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.by_name = {n: getattr(torch, n) for n in UNGATHERED}
        self.Tensor = torch.Tensor

    def is_array(self, x: Any) -> bool:
        return isinstance(x, self.Tensor)

    @staticmethod
    def numel(x) -> int:
        return x.numel()

    @staticmethod
    def itemsize(x) -> int:
        return x.element_size()

    @staticmethod
    def region(x) -> tuple[int, int]:
        """``x``'s storage as ``(address of its first element, bytes)`` (a contiguous tensor)."""
        return x.data_ptr(), x.numel() * x.element_size()

    @staticmethod
    def flat(x):
        return x.view(-1)

    def raw(self, x):
        """1-byte codes as uint8 (torch lacks index ops for FP8): the same bytes."""
        return x.view(self.torch.uint8) if dtype_name(x) in CODE_DTYPES else x

    @staticmethod
    def typed(x, like):
        return x.view(like.dtype)

    def take(self, w, idx):
        return self.raw(w).view(-1)[idx.long()].view(w.dtype)

    def put(self, w, idx, values) -> None:
        # torch index ops bump the codes' version counter: an FP8 layer's forward then refreshes its copy
        self.raw(w).view(-1).index_copy_(0, idx.long(), self.raw(values))

    # The marker is written through numpy, not torch's fill: a fill of more than torch's grain size enters an
    # OpenMP parallel region, whose threads then spin on the other cores while the kernel core's own threads need
    # them (measured at 1 M entries on 2 vCPUs: the switch's kernel 1.4x slower after a torch fill).
    def empty(self, n: int, dtype: str):
        return self.torch.empty((n,), dtype=self.by_name[dtype])

    def marked(self, n: int, dtype: str):
        int_dtype, marker = UNGATHERED[dtype]
        buf = self.torch.empty((n,), dtype=getattr(self.torch, int_dtype))
        buf.numpy().fill(marker)
        return buf.view(self.by_name[dtype])

    def mark(self, buf) -> None:
        int_dtype, marker = UNGATHERED[dtype_name(buf)]
        buf.view(getattr(self.torch, int_dtype)).numpy().fill(marker)

    def marks(self, buf) -> tuple[np.ndarray, int]:
        int_dtype, marker = UNGATHERED[dtype_name(buf)]
        return buf.view(getattr(self.torch, int_dtype)).numpy(), marker

    def gathered(self, saved):
        int_dtype, marker = UNGATHERED[dtype_name(saved)]
        return saved.view(getattr(self.torch, int_dtype)) != marker

    @staticmethod
    def absmax(x) -> float:
        return float(x.abs().max().item()) if x.numel() else 0.0

    def searchsorted(self, sorted_idx, idx):
        return self.torch.searchsorted(sorted_idx, idx.to(sorted_idx.dtype))

    def to_fp32(self, x):
        return x.to(self.torch.float32).contiguous()

    @staticmethod
    def scaled(delta, alpha: float):
        return delta * alpha

    def combine(self, idx: list, scaled: list):
        torch = self.torch
        cat = torch.cat(idx)
        uniq, inverse = torch.unique(cat, sorted=True, return_inverse=True)
        total = torch.zeros(uniq.numel(), dtype=torch.float32).index_add_(0, inverse, torch.cat(scaled))
        return uniq.to(cat.dtype), total

    def sort(self, idx):
        return self.torch.sort(idx)

    def counts(self, n: int):
        return self.torch.zeros(n, dtype=self.torch.int64)

    @staticmethod
    def as_index(idx):
        return idx.long()

    @staticmethod
    def values_at_base(base, delta):
        return (base.float() + delta).to(base.dtype)

    @staticmethod
    def requantize(base, scale, delta):
        from shira_runtime.kernels.reference import requantize

        return requantize(base, scale, delta)[0]

    def bad_codes(self, codes):
        if codes.dtype == self.torch.int8:
            return codes == -128
        return ~self.torch.isfinite(codes.float())

    @staticmethod
    def first(mask) -> int:
        return int(mask.nonzero()[0])

    def all_finite(self, x) -> bool:
        return bool(self.torch.isfinite(x).all())

    @staticmethod
    def decode(codes, scale):
        from shira_runtime.kernels.qformats import decode

        return decode(codes, scale)

    @staticmethod
    def half_step(codes, scale):
        from shira_runtime.kernels.qformats import grid_half_step

        return grid_half_step(codes, scale)

    @staticmethod
    def is_contiguous_cpu(x) -> bool:
        return x.is_contiguous() and x.device.type == "cpu"

    def from_numpy(self, x: np.ndarray):
        """A torch view of ``x`` (bf16/fp8 through their integer bits); copied when ``x`` is read-only."""
        name = x.dtype.name
        if not (x.flags.writeable and x.flags.aligned and x.flags.c_contiguous):
            x = x.copy()
        if name == "bfloat16" or name.startswith("float8"):  # numpy types torch.from_numpy does not know
            bits = x.view(np.int16 if name == "bfloat16" else np.uint8)
            return self.torch.from_numpy(bits).view(getattr(self.torch, name))
        return self.torch.from_numpy(x)

    def to_numpy(self, x) -> np.ndarray:
        """A numpy view of a CPU tensor ``x`` (bf16/fp8 as ``ml_dtypes`` types)."""
        x = x.detach()
        name = dtype_name(x)
        if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            bits = x.view(self.torch.int16 if name == "bfloat16" else self.torch.uint8).numpy()
            return bits.view(_np_dtype(name))
        return x.numpy()


NUMPY = NumpyOps()
_TORCH: TorchOps | None = None


def torch_ops() -> TorchOps:
    global _TORCH
    if _TORCH is None:
        _TORCH = TorchOps()
    return _TORCH


def torch_or_none() -> Any:
    """The torch module, or None where it is not installed (the device path)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def copy_bytes(codes: np.ndarray) -> np.ndarray:
    """int8 codes as the bytes an int8 bundle's uint8 copy holds for them (``code + 128``, zero point 128): the
    inverse of ``int8_codes``."""
    if codes.dtype != np.int8:
        raise TypeError(f"numpy codes of dtype {codes.dtype}: expected int8 codes")
    return codes.view(np.uint8) ^ np.uint8(0x80)


def int8_codes(codes: np.ndarray) -> np.ndarray:
    """int8 codes as they are; a uint8 copy's bytes (code + 128) as the int8 codes they hold."""
    if codes.dtype == np.uint8:
        return (codes ^ np.uint8(0x80)).view(np.int8)
    if codes.dtype != np.int8:
        raise TypeError(f"numpy codes of dtype {codes.dtype}: a bundle's quantized weights are int8")
    return codes


def _np_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def check_scales(name: str, scale: Any, error: type[Exception], where: str = "") -> None:
    """A quantized weight's scales must be fp32 ``[rows]``, finite and > 0 (the switch divides by them); else
    ``error`` naming the tensor (``where``: the file it came from, if any). numpy or torch."""
    a = scale if isinstance(scale, np.ndarray) else None
    if a is None:
        ok = str(scale.dtype) == "torch.float32" and scale.dim() == 1 and scale.is_contiguous()
        a = scale.detach().numpy() if ok else None
    else:
        ok = a.dtype == np.float32 and a.ndim == 1 and a.flags.c_contiguous
    if not ok or not bool((np.isfinite(a) & (a > 0)).all()):
        raise error(
            f"{where}quantized tensor {name!r}: its weight_scale must be fp32 [rows], finite and > 0 "
            f"(got {scale.dtype}{list(scale.shape)})"
        )


def as_ops(x: Any, ops: NumpyOps | TorchOps) -> Any:
    """``x`` (a numpy array or a torch tensor) as ``ops``' kind of array: a view where one exists."""
    if ops.is_array(x):
        return x
    return ops.from_numpy(x) if isinstance(x, np.ndarray) else torch_ops().to_numpy(x)
