"""Adapters: the data (``SparseAdapter``, ``LoraAdapter``) and the two verbs that move them to and from files.

    adapter = load_adapter("a.safetensors")        # our file, a PEFT SHiRA or LoRA directory, or an object
    save_adapter(adapter, "a.safetensors", values="fp16")     # our compact file
    save_adapter(adapter, "peft_dir/", format="peft")          # a PEFT SHiRA directory
    save_adapter(shira_runtime.quantization.bake(adapter, qmodel), "a.int8.safetensors")   # codes for one quantized
    base

The byte layouts belong to ``shira_runtime.shira_file`` (ours) and ``shira_runtime.peft_format`` (PEFT's); the classes
hold data and validate it against a base (``SparseAdapter.flat``, ``LoraAdapter.factors``).
``SparseAdapter.load/.save/.from_peft/.to_peft`` and ``LoraAdapter.from_peft`` are the same verbs.
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shira_runtime import peft_format, shira_file
from shira_runtime.arrays import CODE_DTYPES, FLOAT_DTYPES, NUMPY, as_ops, dtype_name, ops_for, torch_ops, torch_or_none
from shira_runtime.errors import AdapterFormatError, AdapterMismatchError, AdapterValueError, BaseMismatchError
from shira_runtime.fingerprint import Fingerprint
from shira_runtime.kernels.dtypes import by_short

Array = Any  # a numpy array or a torch tensor


@dataclass(eq=False)
class SparseAdapter:
    """A sparse adapter: ``W_new = dtype(W_base + weight * scale * delta)`` at ``indices``, computed in fp32.

    ``indices[name]`` is 1-D (flat, row-major) or ``[2, N]`` (row, col) for 2-D tensors; ``values[name]`` is
    1-D, same length. ``shapes`` holds the base shapes when known. ``peft_r``: PEFT's SHiRA ``r`` when the
    adapter came from PEFT: each 2-D tensor then holds ``r * (out + in)`` entries, checked against the base.
    ``source``: the file it was read from, named in errors.
    """

    indices: dict[str, Array]
    values: dict[str, Array]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    scale: float = 1.0
    fingerprint: Fingerprint | None = None
    mask_kind: str = "random"
    peft_r: int | None = None
    source: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.indices, dict) or not isinstance(self.values, dict):
            raise AdapterValueError("SparseAdapter: indices and values must be dicts of tensors by name")
        if set(self.indices) != set(self.values):
            missing = sorted(set(self.indices) ^ set(self.values))
            raise AdapterValueError(f"SparseAdapter: indices and values name different tensors: {missing}")
        for name in self.indices:
            if not _is_array(self.indices[name]) or not _is_array(self.values[name]):
                raise AdapterValueError(f"SparseAdapter: tensor {name!r}: indices and values must be tensors")
        shapes = {}
        for name, shape in dict(self.shapes).items():
            dims = _dims(shape)
            if dims is None:
                raise AdapterValueError(f"SparseAdapter: tensor {name!r}: shape {shape!r} is not non-negative ints")
            shapes[name] = dims
        self.shapes = shapes
        self.scale = _finite(self.scale, "SparseAdapter: scale")

    @property
    def nnz(self) -> int:
        return sum(math.prod(v.shape) for v in self.values.values())

    def __repr__(self) -> str:
        return f"SparseAdapter({len(self.values)} tensors, nnz={self.nnz}, scale={self.scale})"

    def label(self, adapter: str) -> str:
        """``adapter`` and the file it came from, for messages."""
        return adapter + (f" (from {self.source})" if self.source else "")

    def flat(self, name: str, shape: tuple[int, ...], adapter: str = "?") -> tuple[Array, Array]:
        """Validated ``(indices, values)`` of tensor ``name`` for a base tensor of ``shape``.

        Indices come back flat, sorted, unique, int32 (int64 past 2**31 elements); values are reordered to match.
        Raises a specific error naming the adapter, its file, the tensor and the index at fault.
        """
        where = f"adapter {self.label(adapter)!r}, tensor {name!r}"
        idx_in, val_in = self.indices[name], self.values[name]
        idx, val = as_ops(idx_in, NUMPY), as_ops(val_in, NUMPY)  # checked in numpy; returned as they came
        shape = tuple(int(d) for d in shape)
        if name in self.shapes and self.shapes[name] != shape:
            raise AdapterMismatchError(f"{where}: made for shape {self.shapes[name]}, the base has {shape}")
        if self.peft_r is not None and len(shape) == 2 and val.size != self.peft_r * (shape[0] + shape[1]):
            raise BaseMismatchError(
                f"{where}: {val.size} entries, but PEFT's r={self.peft_r} gives r * (out + in) = "
                f"{self.peft_r * (shape[0] + shape[1])} for this base's {shape}: made for a base of other shapes"
            )
        if idx.dtype.kind not in "iu":
            raise AdapterMismatchError(f"{where}: indices have dtype {dtype_name(idx_in)}, expected an integer dtype")
        if val.dtype.name not in FLOAT_DTYPES:
            raise AdapterMismatchError(f"{where}: values have dtype {dtype_name(val_in)}, expected fp32/fp16/bf16")
        if val.ndim != 1:
            raise AdapterMismatchError(f"{where}: values must be 1-D, got shape {tuple(val.shape)}")
        numel = math.prod(shape)
        idx = idx.astype(np.int64)
        if idx.ndim == 2 and idx.shape[0] == 2:
            if len(shape) != 2:
                raise AdapterMismatchError(f"{where}: (row, col) indices given for a {len(shape)}-D tensor")
            for axis, (part, bound) in enumerate(((idx[0], shape[0]), (idx[1], shape[1]))):
                bad = (part < 0) | (part >= bound)
                if bool(bad.any()):
                    i = int(np.flatnonzero(bad)[0])
                    raise AdapterMismatchError(
                        f"{where}: {'row' if axis == 0 else 'col'} index {int(part[i])} at position {i} "
                        f"out of range for shape {shape}"
                    )
            idx = idx[0] * shape[1] + idx[1]
        elif idx.ndim != 1:
            raise AdapterMismatchError(f"{where}: indices must be flat [N] or [2, N], got {tuple(idx.shape)}")
        if idx.size != val.size:
            raise AdapterMismatchError(f"{where}: {idx.size} indices but {val.size} values")
        bad = (idx < 0) | (idx >= numel)
        if bool(bad.any()):
            i = int(np.flatnonzero(bad)[0])
            raise AdapterMismatchError(
                f"{where}: index {int(idx[i])} at position {i} out of range for shape {shape} ({numel} elements)"
            )
        finite = np.isfinite(val)
        if not bool(finite.all()):
            i = int(np.flatnonzero(~finite)[0])
            raise AdapterValueError(
                f"{where}: value {float(val[i])} at position {i} (index {int(idx[i])}) is not finite"
            )
        if idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()):
            order = np.argsort(idx, kind="stable")
            idx, val = idx[order], val[order]
            dup = idx[1:] == idx[:-1]
            if bool(dup.any()):
                i = int(np.flatnonzero(dup)[0])
                raise AdapterValueError(f"{where}: index {int(idx[i])} appears more than once")
        idx = np.ascontiguousarray(idx, dtype=np.int32 if numel < 2**31 else np.int64)
        val = np.ascontiguousarray(val)
        ops = ops_for(idx_in)
        return as_ops(idx, ops), as_ops(val, ops)

    def for_base(self, base: dict[str, Array], adapter: str = "?") -> SparseAdapter:
        """This adapter checked against ``base`` (name -> tensor), with its shapes and fingerprint recorded
        (a PEFT adapter carries neither; a fingerprint it carries must match ``base``): indices flat, sorted."""
        missing = sorted(set(self.indices) - set(base))
        if missing:
            raise AdapterMismatchError(f"adapter {self.label(adapter)!r}: the base has no tensors named {missing[:3]}")
        flat = {n: self.flat(n, tuple(base[n].shape), adapter) for n in self.indices}
        idx = {n: i for n, (i, _) in flat.items()}
        shapes = {n: tuple(base[n].shape) for n in idx}
        fingerprint = Fingerprint.of(base, idx)
        if self.fingerprint is not None:
            self.fingerprint.check(self.label(adapter), shapes, fingerprint.probes)
        values = {n: v for n, (_, v) in flat.items()}
        return SparseAdapter(idx, values, shapes, self.scale, fingerprint, self.mask_kind, source=self.source)

    # the verbs, under the contract's spellings
    @staticmethod
    def load(path: str | Path) -> SparseAdapter:
        """Read our adapter file (any supported format version)."""
        return _expect(load_adapter(path), SparseAdapter, path)

    def save(self, path: str | Path, values: str | None = None) -> Path:
        """Write our adapter file (``shapes`` must be known); ``values``: fp16/bf16/fp32, None keeps theirs."""
        return save_adapter(self, path, values=values)

    @staticmethod
    def from_peft(directory: str | Path) -> SparseAdapter:
        """Read a PEFT SHiRA adapter directory."""
        return _expect(load_adapter(directory), SparseAdapter, directory)

    def to_peft(self, directory: str | Path, strict: bool = True) -> Path:
        """Write a PEFT SHiRA adapter directory (see ``save_adapter``)."""
        return save_adapter(self, directory, format="peft", strict=strict)


@dataclass(eq=False)
class LoraAdapter:
    """A LoRA adapter: ``W_new = dtype(W_base + weight * scaling * B @ A)``, computed in fp32.

    ``scaling[name]`` is ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA), per tensor.
    ``fan_in_fan_out``: the base stores the weight as ``[in, out]`` (GPT-2 ``Conv1D``): the delta is transposed.
    """

    A: dict[str, Array]
    B: dict[str, Array]
    scaling: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    source: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if set(self.A) != set(self.B):
            raise AdapterValueError(f"LoraAdapter: A and B name different tensors: {sorted(set(self.A) ^ set(self.B))}")
        for name in self.A:
            self.scaling[name] = _finite(self.scaling.get(name, 1.0), f"LoraAdapter: tensor {name!r}: scaling")

    label = SparseAdapter.label

    @property
    def params(self) -> int:
        return sum(math.prod(self.A[n].shape) + math.prod(self.B[n].shape) for n in self.A)

    def __repr__(self) -> str:
        ranks = sorted({int(a.shape[0]) for a in self.A.values() if a.ndim})
        return f"LoraAdapter({len(self.A)} tensors, rank {ranks}, params={self.params})"

    def factors(self, name: str, shape: tuple[int, ...], adapter: str = "?") -> tuple[Array, Array]:
        """Validated fp32 ``(A, B)`` for tensor ``name`` of a base tensor of ``shape``; delta is ``B @ A``."""
        where = f"adapter {self.label(adapter)!r}, tensor {name!r}"
        a, b = self.A[name], self.B[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterMismatchError(
                f"{where}: LoRA factors A {tuple(a.shape)} and B {tuple(b.shape)} do not form B @ A"
            )
        out_in = (b.shape[0], a.shape[1])
        want = tuple(shape[::-1]) if self.fan_in_fan_out else tuple(shape)
        if len(shape) != 2 or out_in != want:
            raise AdapterMismatchError(f"{where}: B @ A has shape {out_in}, the base tensor has {tuple(shape)}")
        for label, t in (("A", a), ("B", b)):
            if dtype_name(t) not in ("float64", *FLOAT_DTYPES):
                raise AdapterMismatchError(f"{where}: {label} has dtype {dtype_name(t)}, expected a float dtype")
            if not ops_for(t).all_finite(t):
                raise AdapterValueError(f"{where}: {label} holds NaN or Inf values")
        return ops_for(a).to_fp32(a), ops_for(b).to_fp32(b)

    @staticmethod
    def from_peft(directory: str | Path) -> LoraAdapter:
        """Read a PEFT LoRA adapter directory."""
        return _expect(load_adapter(directory), LoraAdapter, directory)


@dataclass(eq=False)
class CodesAdapter:
    """A SHiRA adapter baked for one quantized base (``shira_runtime.quantization.bake``): per tensor, the flat sorted
    indices
    whose code the adapter changes and the new codes themselves (1-byte, the base's dtype). Switching it is a byte
    scatter with no grid math; it is switched alone, at weight 1.0 (fuse the delta adapters instead).

    ``base[name]``: ``fingerprint.codes_base_hash`` of the base it was baked for (format, scales, base codes at
    ``indices``); a base that differs in any of them is refused before any write."""

    indices: dict[str, Array]
    codes: dict[str, Array]
    shapes: dict[str, tuple[int, ...]]
    base: dict[str, str]
    mask_kind: str = "random"
    source: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        names = set(self.indices)
        if set(self.codes) != names or set(self.shapes) != names or set(self.base) != names:
            raise AdapterValueError("CodesAdapter: indices, codes, shapes and base must name the same tensors")
        for name in names:
            idx, codes = self.indices[name], self.codes[name]
            where = f"CodesAdapter: tensor {name!r}"
            if not _is_array(idx) or dtype_name(idx) not in ("int32", "int64") or idx.ndim != 1:
                raise AdapterValueError(f"{where}: indices must be int32/int64 [N]")
            ok = _is_array(codes) and dtype_name(codes) in CODE_DTYPES and dtype_name(codes) != "uint8"
            if not ok or tuple(codes.shape) != tuple(idx.shape):  # uint8 is a bundle's storage, never codes
                raise AdapterValueError(f"{where}: codes must be int8 or fp8 [N] like the indices")
            if len(idx) and (int(idx[0]) < 0 or int(idx[-1]) >= math.prod(self.shapes[name])):
                raise AdapterValueError(f"{where}: an index is out of range for shape {self.shapes[name]}")
            if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise AdapterValueError(f"{where}: indices must be sorted and unique")

    @property
    def nnz(self) -> int:
        return sum(math.prod(c.shape) for c in self.codes.values())

    def __repr__(self) -> str:
        return f"CodesAdapter({len(self.codes)} tensors, nnz={self.nnz})"

    label = SparseAdapter.label


Adapter = SparseAdapter | LoraAdapter | CodesAdapter
Source = str | Path | SparseAdapter | LoraAdapter | CodesAdapter


def load_adapter(source: Source, numpy: bool = False) -> Adapter:
    """An adapter from our file, a PEFT SHiRA or LoRA directory, or the object itself (returned as is).

    Its arrays are torch tensors where torch is installed, numpy arrays where it is not or with ``numpy=True``
    (what a bundle runtime asks for: torch is then never imported). Every file is untrusted: anything malformed is
    an ``AdapterFormatError`` naming the file."""
    if isinstance(source, (SparseAdapter, LoraAdapter, CodesAdapter)):
        return source
    if not isinstance(source, (str, Path)):
        raise TypeError(f"adapter source must be a path, SparseAdapter or LoraAdapter, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        if not peft_format.is_peft_dir(path):
            raise AdapterFormatError(f"{path}: a directory without adapter_config.json is not a PEFT adapter")
        kind, fields = peft_format.read(path)
        cls = SparseAdapter if kind == "shira" else LoraAdapter
    elif path.exists():
        fields = shira_file.read(path)
        cls = CodesAdapter if "codes" in fields else SparseAdapter
    else:
        raise AdapterFormatError(f"{path}: no such file or directory")
    if not numpy and torch_or_none() is not None:  # torch tensors: views of what was read
        fields = {k: _torch_arrays(v) if k in _ARRAY_FIELDS else v for k, v in fields.items()}
        if (fp := fields.get("fingerprint")) is not None:
            fields["fingerprint"] = Fingerprint(fp.structure, _torch_arrays(fp.probes))
    try:
        return cls(**fields, source=str(path))
    except AdapterValueError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None


def save_adapter(
    adapter: SparseAdapter, path: str | Path, format: str = "shira", values: str | None = None, strict: bool = True
) -> Path:
    """Write ``adapter``: ``format="shira"`` our compact file (``values``: ``"fp16"``/``"bf16"``/``"fp32"`` to
    store the deltas in that dtype, None keeps theirs); ``format="peft"`` a PEFT SHiRA directory.

    PEFT sizes each layer's ``shira_weight`` as ``r * (out + in)`` with one ``r`` for the whole adapter, so an
    adapter whose counts do not fit that rule could not be loaded by PEFT: refused unless ``strict=False``.
    PEFT values are fp32, with ``scale`` folded in; a forced directory records ``r: null``. Both formats need
    the base ``shapes``."""
    if isinstance(adapter, CodesAdapter):
        if format != "shira" or values is not None:
            raise ValueError("an adapter of codes is written in our format only, as its codes (no values dtype)")
        return shira_file.write_codes(
            path, adapter.indices, adapter.codes, adapter.shapes, adapter.base, adapter.mask_kind
        )
    if not isinstance(adapter, SparseAdapter):
        raise TypeError(f"save_adapter writes SparseAdapters, got {type(adapter).__name__}")
    unknown = sorted(n for n in adapter.indices if n not in adapter.shapes)
    if unknown:
        raise AdapterValueError(f"cannot save tensors {unknown[:3]}: their base shapes are unknown (set shapes)")
    flat = {n: adapter.flat(n, adapter.shapes[n], adapter="<save>") for n in sorted(adapter.indices)}
    if format == "shira":
        dtype = by_short(values).torch if values is not None else None
        vals = {n: v.to(dtype) if dtype else v for n, (_, v) in flat.items()}
        idx = {n: i for n, (i, _) in flat.items()}
        return shira_file.write(path, idx, vals, adapter.shapes, adapter.scale, adapter.mask_kind, adapter.fingerprint)
    if format != "peft":
        raise ValueError(f"format {format!r}: expected 'shira' or 'peft'")
    entries, ranks = {}, set()
    for name, (idx, val) in flat.items():
        shape = adapter.shapes[name]
        if len(shape) != 2 or not name.endswith(".weight"):
            raise AdapterFormatError(f"tensor {name!r}: PEFT SHiRA needs the 2-D weight of a linear layer")
        r, rem = divmod(idx.numel(), shape[0] + shape[1])
        ranks.add(r if rem == 0 else None)
        import torch

        rc = torch.stack([idx.long() // shape[1], idx.long() % shape[1]]).to(torch.int32)
        entries[name[: -len(".weight")]] = (rc, val.to(torch.float32) * float(adapter.scale))
    if strict and (len(ranks) != 1 or None in ranks):
        raise AdapterFormatError(
            "PEFT could not load this adapter: its layers' nonzero counts are not r * (out + in) for one integer r "
            "(pass strict=False to write it anyway)"
        )
    r = ranks.pop() if len(ranks) == 1 else None  # None: no r fits every layer (strict=False)
    return peft_format.write_shira(path, entries, r, adapter.mask_kind)


# the fields of shira_file.read / peft_format.read that hold arrays (name -> numpy array)
_ARRAY_FIELDS = ("indices", "values", "codes", "A", "B")


def _torch_arrays(d: dict[str, np.ndarray]) -> dict[str, Array]:
    """The one numpy -> torch step of loading (the readers return numpy): zero-copy for the writable, aligned,
    C-contiguous arrays the readers give, a copy otherwise; bf16/fp8 through an integer view of their bytes."""
    return {name: torch_ops().from_numpy(a) for name, a in d.items()}


def _is_array(x: object) -> bool:
    """A numpy array or a torch tensor (torch is not imported for it)."""
    torch = sys.modules.get("torch")
    return isinstance(x, np.ndarray) or (torch is not None and isinstance(x, torch.Tensor))


def _dims(shape: object) -> tuple[int, ...] | None:
    """``shape`` as a tuple of non-negative ints (numpy and torch integers too), or None."""
    if not isinstance(shape, (tuple, list)):  # torch.Size is a tuple
        return None
    dims = []
    for d in shape:
        try:
            d = operator.index(d) if not isinstance(d, bool) else -1
        except TypeError:
            return None
        if d < 0:
            return None
        dims.append(d)
    return tuple(dims)


def _finite(value: object, what: str) -> float:
    try:
        x = float(value)  # python, numpy and 0-d torch numbers
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not math.isfinite(x):
        raise AdapterValueError(f"{what} {value!r} is not a finite number")
    return x


def _expect(adapter: Adapter, cls: type, path: str | Path) -> Adapter:
    if not isinstance(adapter, cls):
        other = "LoraAdapter" if cls is SparseAdapter else "SparseAdapter"
        raise AdapterMismatchError(f"{path}: holds a {type(adapter).__name__}, not a {cls.__name__} (use {other})")
    return adapter
