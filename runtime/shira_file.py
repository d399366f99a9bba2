"""Our adapter file, the one owner of its bytes: a safetensors file with string metadata.

Format ``shira-runtime/sparse``, version 4 where a tensor is stored as runs, else version 3 (versions 1 and 2
still load):
- ``<name>::gaps``: the sorted flat indices as gaps (``idx[0]``, then ``idx[i] - idx[i-1] - 1``) in uint8, or
  int16 read as uint16, whichever is smaller for that tensor; the largest value of the width is an escape,
  whose gap is the next entry of ``<name>::escapes`` (int32, int64 past 2**31). Decoding is a few
  vectorized ops and a cumsum.
- ``<name>::runs`` and ``<name>::run_escapes`` (version 4, per tensor, when smaller: a cache-line ``block`` mask
  or a ``struct`` mask's rows): the indices as maximal runs of consecutive positions; ``gaps`` then holds the
  gap before each run (``start - previous end - 1``) and ``runs`` each run's length minus 1, in the same
  uint8/uint16-with-escapes code. A run of 16 fp32 positions costs ~3 bytes of index instead of 16.
- ``<name>::values``: fp32, fp16 or bf16 (chosen when saving);
- ``<name>::probe``: fp32, the fingerprint's base values (when the adapter has a fingerprint);
- metadata ``format``, ``version``, ``scale``, ``mask_kind``, ``shapes`` (JSON name -> shape), ``fingerprint``
  (JSON, optional), ``checksums`` (JSON tensor key -> sha256 of the key, dtype, shape and bytes) and
  ``meta_checksum`` (sha256 of every other metadata field). A relabelled dtype, an edited shape, a renamed
  tensor or a flipped byte anywhere fails one of them.
Version 5 (an adapter of codes, ``shira_runtime.quantization.bake``: made for one quantized base): the indices as above
(gaps/runs), ``<name>::codes`` (the new 1-byte codes: int8 / float8_e4m3fn / float8_e5m2) instead of values, no
probes; metadata ``quant_formats`` (JSON name -> format, matching the codes' dtype) and ``bases`` (JSON name ->
``fingerprint.codes_base_hash`` of the base's format, scales and codes at the indices). ~1 byte of gap + 1 byte
of code per entry.
Version 2 checksummed the bytes only (a header relabel of a same-sized dtype passes it); version 1 stored
``<name>::indices`` (int32/int64 flat) and no checksums. Whatever the version, every field and tensor is
checked for type, dtype, rank, range and finiteness: anything unexpected is an ``AdapterFormatError``
naming the file and the tensor. This module knows bytes only; ``shira_runtime.adapters`` builds the objects.

Reading needs numpy and ml_dtypes only (``shira_runtime.safetensors_np``; a device without torch reads adapters):
``read`` returns numpy arrays (bf16 and fp8 as ``ml_dtypes`` dtypes), and checksums hash a numpy array as the
torch tensor of the same bytes (dtype under torch's name), so every file written before still verifies. Writing
(``write``, ``write_codes``, the encoders) takes torch tensors and imports torch when called.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from shira_runtime import safetensors_np
from shira_runtime.atomic import atomic_write
from shira_runtime.errors import AdapterFormatError
from shira_runtime.fingerprint import PROBES, Fingerprint

if TYPE_CHECKING:
    import torch

FORMAT = "shira-runtime/sparse"
VERSION = 4
CODES_VERSION = "5"
READS = ("1", "2", "3", "4", CODES_VERSION)
SEP = "::"
PARTS = {"1": ("indices", "values", "probe"), "2": ("gaps", "escapes", "values", "probe")}
PARTS["3"] = PARTS["2"]
PARTS["4"] = (*PARTS["3"], "runs", "run_escapes")
PARTS[CODES_VERSION] = ("gaps", "escapes", "runs", "run_escapes", "codes")
OPTIONAL = ("probe", "runs", "run_escapes")  # per tensor
# gap width in bytes -> (stored dtype, escape value, mask to read it unsigned)
WIDTHS = {1: (np.dtype(np.uint8), 0xFF, 0xFF), 2: (np.dtype(np.int16), 0xFFFF, 0xFFFF)}
# what reading accepts, in numpy: the values dtypes of ``kernels.dtypes.FLOATS`` and the codes dtype of each
# format of ``kernels.qformats.FORMATS`` (both torch tables; tests/runtime/test_safetensors_np.py keeps them equal)
VALUES = ("float32", "float16", "bfloat16")  # dtype names (ml_dtypes is imported only by a file that holds one)
CODES = {"int8": "int8", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
INDICES = (np.dtype(np.int32), np.dtype(np.int64))


def _encode_small(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative ints -> (the smaller of uint8/uint16 codes with escapes, the escaped values int32/int64)."""
    import torch

    best = None
    for width, (_, esc, _) in WIDTHS.items():
        big = values >= esc
        size = values.numel() * width + int(big.sum()) * 4
        if best is None or size < best[0]:
            best = (size, width, esc, big)
    _, width, esc, big = best
    escapes = values[big].contiguous()
    if not escapes.numel() or int(escapes.max()) < 2**31:
        escapes = escapes.to(torch.int32)
    small = torch.where(big, esc, values)
    small = small.to(torch.uint8) if width == 1 else small.to(torch.int32).to(torch.int16)
    return small.contiguous(), escapes


def _decode_small(codes: np.ndarray, escapes: np.ndarray, where: str, what: str, limit: int) -> np.ndarray:
    """Inverse of ``_encode_small``: int64 values, every escaped one in ``[escape, limit)``."""
    codes, escapes = _numpy(codes), _numpy(escapes)
    width = next((w for w, (dtype, _, _) in WIDTHS.items() if codes.dtype == dtype), None)
    if width is None or codes.ndim != 1 or escapes.dtype not in INDICES or escapes.ndim != 1:
        raise AdapterFormatError(f"{where}: {what} must be uint8/int16 [N] and their escapes int32/int64 [E]")
    _, esc, mask = WIDTHS[width]
    g = codes.astype(np.int64) & mask
    big = g == esc
    if int(big.sum()) != escapes.size:
        raise AdapterFormatError(f"{where}: {int(big.sum())} escaped {what} but {escapes.size} escape values")
    if escapes.size and (int(escapes.min()) < esc or int(escapes.max()) >= limit):
        raise AdapterFormatError(f"{where}: an escape value of the {what} is outside [{esc}, {limit})")
    g[big] = escapes
    return g


def encode_gaps(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique flat indices -> (gaps in the smaller of uint8/uint16 with escapes, escaped gaps)."""
    import torch

    idx = idx.long()
    return _encode_small(torch.diff(idx, prepend=torch.tensor([-1])) - 1)


def encode_runs(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted unique flat indices as maximal runs: (gaps before runs, their escapes, lengths - 1, escapes)."""
    import torch

    idx = idx.long()
    starts = torch.ones(idx.numel(), dtype=torch.bool)
    starts[1:] = idx[1:] != idx[:-1] + 1
    first = starts.nonzero().squeeze(1)
    lengths = torch.diff(first, append=torch.tensor([idx.numel()]))
    begin = idx[first]
    end_before = torch.cat([torch.tensor([-1]), begin[:-1] + lengths[:-1] - 1])
    return (*_encode_small(begin - end_before - 1), *_encode_small(lengths - 1))


def encode_indices(idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The file parts of one tensor's indices: ``gaps``/``escapes``, plus ``runs``/``run_escapes`` when the run
    form is smaller (cache-line masks, whole rows)."""
    gaps, escapes = encode_gaps(idx)
    plain = {"gaps": gaps, "escapes": escapes}
    if idx.numel() < 2:
        return plain
    run_gaps, run_gap_escapes, runs, run_escapes = encode_runs(idx)
    as_runs = {"gaps": run_gaps, "escapes": run_gap_escapes, "runs": runs, "run_escapes": run_escapes}
    size = lambda parts: sum(t.numel() * t.element_size() for t in parts.values())  # noqa: E731
    return as_runs if size(as_runs) < size(plain) else plain


def decode_gaps(gaps: np.ndarray, escapes: np.ndarray, where: str, numel: int) -> np.ndarray:
    """Inverse of ``encode_gaps``: sorted unique flat int64 indices, all below ``numel`` (vectorized). numpy in,
    numpy out; torch tensors in, a torch tensor out."""
    g = _decode_small(gaps, escapes, where, "gaps", numel)
    idx = np.cumsum(g + 1) - 1  # no overflow: every gap is below numel
    if idx.size and int(idx[-1]) >= numel:
        raise AdapterFormatError(f"{where}: index {int(idx[-1])} is out of range for {numel} elements")
    return _like(gaps, idx)


def decode_runs(
    gaps: np.ndarray,
    escapes: np.ndarray,
    runs: np.ndarray,
    run_escapes: np.ndarray,
    where: str,
    numel: int,
    count: int,
) -> np.ndarray:
    """Inverse of ``encode_runs``: ``count`` sorted unique flat int64 indices below ``numel``. Lengths and bounds
    are checked before the runs are expanded (a hostile file cannot make it allocate more than ``count``).
    numpy in, numpy out; torch tensors in, a torch tensor out."""
    g = _decode_small(gaps, escapes, where, "run gaps", numel)
    lengths = _decode_small(runs, run_escapes, where, "run lengths", numel) + 1
    if g.size != lengths.size:
        raise AdapterFormatError(f"{where}: {g.size} run gaps but {lengths.size} run lengths")
    if int(lengths.sum()) != count:
        raise AdapterFormatError(f"{where}: the runs hold {int(lengths.sum())} positions but there are {count} values")
    if not g.size:
        return _like(gaps, np.empty(0, dtype=np.int64))
    if int(lengths.min()) < 1:  # an escaped length of 2**63 - 1 wrapped
        raise AdapterFormatError(f"{where}: a run length is out of range for {numel} elements")
    starts = np.cumsum(g + np.concatenate([np.zeros(1, dtype=np.int64), lengths[:-1]]))
    last = int(starts[-1]) + int(lengths[-1]) - 1
    if last >= numel:
        raise AdapterFormatError(f"{where}: index {last} is out of range for {numel} elements")
    offsets = np.arange(count, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return _like(gaps, np.repeat(starts, lengths) + offsets)


def tensor_checksum(key: str, t: np.ndarray | torch.Tensor) -> str:
    """sha256 of a tensor's key, dtype, shape and bytes: a header relabel fails it as a byte flip does. A numpy
    array and the torch tensor of the same bytes have the same checksum (the dtype under torch's name)."""
    if isinstance(t, np.ndarray):
        dtype, raw = safetensors_np.torch_name(t.dtype), t.tobytes()
    else:
        import torch

        dtype, raw = str(t.dtype), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    h = hashlib.sha256(json.dumps([key, dtype, list(t.shape)]).encode())
    h.update(raw)
    return h.hexdigest()[:32]


def _bytes_checksum(t: np.ndarray | torch.Tensor) -> str:  # version 2
    if isinstance(t, np.ndarray):
        return hashlib.sha256(t.tobytes()).hexdigest()[:32]
    import torch

    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def meta_checksum(meta: dict[str, str]) -> str:
    """sha256 of every metadata field but ``meta_checksum`` itself."""
    body = json.dumps({k: v for k, v in sorted(meta.items()) if k != "meta_checksum"})
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def _numpy(t: np.ndarray | torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array: an array as is, a (CPU) torch tensor zero-copy (bf16/fp8 through a byte view)."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    name = str(t.dtype)
    if name.removeprefix("torch.") not in safetensors_np.ML_DTYPES:
        return t.numpy()
    dtype = safetensors_np.numpy_of(name)
    import torch

    return t.contiguous().view(torch.uint8).numpy().view(dtype).reshape(tuple(t.shape))


def _like(ref: np.ndarray | torch.Tensor, a: np.ndarray) -> np.ndarray | torch.Tensor:
    """``a`` in the kind of ``ref``: numpy for numpy, torch for torch (``decode_*`` called on encoder output)."""
    if isinstance(ref, np.ndarray):
        return a
    import torch

    return torch.from_numpy(a)


# -- writing --
def write(
    path: str | Path,
    indices: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    scale: float,
    mask_kind: str,
    fingerprint: Fingerprint | None,
) -> Path:
    """Write a file from validated parts (``indices``: sorted unique flat); atomic (temp + rename). Version 4
    when some tensor is stored as runs, else version 3 (readable by runtimes that predate runs)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, idx in indices.items():
        for part, t in encode_indices(idx).items():
            tensors[f"{name}{SEP}{part}"] = t
        tensors[f"{name}{SEP}values"] = values[name].contiguous()
    with_runs = any(k.endswith(f"{SEP}runs") for k in tensors)
    meta = {
        "format": FORMAT,
        "version": str(VERSION) if with_runs else "3",
        "scale": repr(float(scale)),
        "mask_kind": str(mask_kind),
        "shapes": json.dumps({n: list(shapes[n]) for n in indices}),
    }
    if fingerprint is not None:
        meta["fingerprint"] = fingerprint.to_meta()
        for name, probe in fingerprint.probes.items():
            tensors[f"{name}{SEP}probe"] = torch.as_tensor(probe).to(torch.float32).contiguous()
    return _seal_and_write(path, tensors, meta)


def write_codes(
    path: str | Path,
    indices: dict[str, torch.Tensor],
    codes: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    bases: dict[str, str],
    mask_kind: str,
) -> Path:
    """Write an adapter of codes (version 5) from validated parts; atomic."""
    from shira_runtime.kernels.qformats import quant_format

    tensors: dict[str, torch.Tensor] = {}
    for name, idx in indices.items():
        for part, t in encode_indices(idx).items():
            tensors[f"{name}{SEP}{part}"] = t
        tensors[f"{name}{SEP}codes"] = codes[name].contiguous()
    meta = {
        "format": FORMAT,
        "version": CODES_VERSION,
        "mask_kind": str(mask_kind),
        "shapes": json.dumps({n: list(shapes[n]) for n in indices}),
        "quant_formats": json.dumps({n: quant_format(codes[n]).name for n in indices}),
        "bases": json.dumps({n: bases[n] for n in indices}),
    }
    return _seal_and_write(path, tensors, meta)


def _seal_and_write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Add the checksums (per tensor, then of the metadata) and write atomically (temp + rename)."""
    from safetensors.torch import save_file

    meta["checksums"] = json.dumps({k: tensor_checksum(k, t) for k, t in sorted(tensors.items())})
    meta["meta_checksum"] = meta_checksum(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


# -- reading (numpy only: no torch on the device) --
def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """All tensors (numpy) and the metadata of a safetensors file, with errors that name the file."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    return safetensors_np.read(path)


def read(path: str | Path) -> dict[str, Any]:
    """The fields of the adapter stored at ``path`` (keyword arguments of ``SparseAdapter``, arrays in numpy:
    ``shira_runtime.adapters`` makes them tensors), fully checked."""
    path = Path(path)
    meta, tensors = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})")
    version = meta.get("version")
    if version not in READS:
        raise AdapterFormatError(f"{path}: format version {version!r} is not supported (this runtime reads {READS})")
    if version != "1":
        checksum = (lambda _key, t: _bytes_checksum(t)) if version == "2" else tensor_checksum
        _check_sums(path, meta, tensors, checksum)
    if version == CODES_VERSION:
        return _read_codes(path, meta, tensors)
    scale = _field(path, meta, "scale", float)
    if not math.isfinite(scale):
        raise AdapterFormatError(f"{path}: scale {scale} is not finite")
    shapes = _shapes(path, _field(path, meta, "shapes", json.loads))
    mask_kind = meta.get("mask_kind", "random")
    parts = _split_parts(path, tensors, PARTS[version])
    names = set(parts["values"])
    for part, found in parts.items():
        if part not in OPTIONAL and set(found) != names:
            raise AdapterFormatError(f"{path}: tensors {sorted(names ^ set(found))} lack their {part} or values")
    if version == "4" and set(parts["runs"]) != set(parts["run_escapes"]):
        odd = sorted(set(parts["runs"]) ^ set(parts["run_escapes"]))
        raise AdapterFormatError(f"{path}: tensors {odd} have runs without run_escapes or the reverse")
    if version == "4" and not set(parts["runs"]) <= names:
        raise AdapterFormatError(f"{path}: runs for tensors without values: {sorted(set(parts['runs']) - names)}")
    indices, values = {}, {}
    for name in sorted(names):
        where = f"{path}: tensor {name!r}"
        if name not in shapes:
            raise AdapterFormatError(f"{where} has no recorded shape")
        numel = math.prod(shapes[name])
        val = parts["values"][name]
        if val.dtype.name not in VALUES or val.ndim != 1:
            raise AdapterFormatError(f"{where}: values are {_dtype(val)}{list(val.shape)}, expected fp32/fp16/bf16 [N]")
        if not bool(np.isfinite(val).all()):
            raise AdapterFormatError(f"{where}: values hold NaN or Inf")
        if version == "1":
            idx = parts["indices"][name]
            if idx.dtype not in INDICES or idx.ndim != 1:
                raise AdapterFormatError(f"{where}: indices must be int32/int64 [N]")
        elif name in parts.get("runs", {}):
            g, e = parts["gaps"][name], parts["escapes"][name]
            r, re_ = parts["runs"][name], parts["run_escapes"][name]
            idx = decode_runs(g, e, r, re_, where, numel, val.size)
        else:
            idx = decode_gaps(parts["gaps"][name], parts["escapes"][name], where, numel)
        if idx.size != val.size:
            raise AdapterFormatError(f"{where}: {idx.size} indices but {val.size} values")
        indices[name], values[name] = idx, val
    fingerprint = _fingerprint(path, meta.get("fingerprint"), parts["probe"], indices)
    return {
        "indices": indices,
        "values": values,
        "shapes": {n: shapes[n] for n in indices},
        "scale": scale,
        "fingerprint": fingerprint,
        "mask_kind": str(mask_kind),
    }


def _read_codes(path: Path, meta: dict[str, str], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """The fields of a ``CodesAdapter`` (version 5), fully checked."""
    shapes = _shapes(path, _field(path, meta, "shapes", json.loads))
    formats = _field(path, meta, "quant_formats", json.loads)
    bases = _field(path, meta, "bases", json.loads)
    parts = _split_parts(path, tensors, PARTS[CODES_VERSION])
    names = set(parts["codes"])
    if set(parts["gaps"]) != names or set(parts["escapes"]) != names:
        raise AdapterFormatError(f"{path}: tensors {sorted(names ^ set(parts['gaps']))} lack their gaps or codes")
    if set(parts["runs"]) != set(parts["run_escapes"]) or not set(parts["runs"]) <= names:
        raise AdapterFormatError(f"{path}: runs and run_escapes do not name the same tensors with codes")
    if not isinstance(formats, dict) or not isinstance(bases, dict) or set(formats) != names or set(bases) != names:
        raise AdapterFormatError(f"{path}: 'quant_formats' and 'bases' must list exactly the tensors stored")
    indices, codes = {}, {}
    for name in sorted(names):
        where = f"{path}: tensor {name!r}"
        if name not in shapes:
            raise AdapterFormatError(f"{where} has no recorded shape")
        c = parts["codes"][name]
        dtype = CODES.get(formats[name]) if isinstance(formats[name], str) else None
        if dtype is None or c.dtype.name != dtype or c.ndim != 1:
            raise AdapterFormatError(f"{where}: codes are {_dtype(c)}{list(c.shape)}, not {formats[name]!r} codes [N]")
        if not isinstance(bases[name], str):
            raise AdapterFormatError(f"{where}: its base hash is not a string")
        numel = math.prod(shapes[name])
        if name in parts["runs"]:
            g, e = parts["gaps"][name], parts["escapes"][name]
            idx = decode_runs(g, e, parts["runs"][name], parts["run_escapes"][name], where, numel, c.size)
        else:
            idx = decode_gaps(parts["gaps"][name], parts["escapes"][name], where, numel)
        if idx.size != c.size:
            raise AdapterFormatError(f"{where}: {idx.size} indices but {c.size} codes")
        indices[name], codes[name] = idx.astype(np.int32 if numel < 2**31 else np.int64), c
    return {
        "indices": indices,
        "codes": codes,
        "shapes": {n: shapes[n] for n in indices},
        "base": {n: bases[n] for n in indices},
        "mask_kind": str(meta.get("mask_kind", "random")),
    }


def _dtype(a: np.ndarray) -> str:
    """A dtype as messages have always named it (torch's name: ``torch.int16``)."""
    return safetensors_np.torch_name(a.dtype)


def _split_parts(path: Path, tensors: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, dict]:
    """``<tensor>::<part>`` keys -> ``{part: {tensor: t}}`` for the parts ``names``; any other key is refused."""
    parts: dict[str, dict[str, np.ndarray]] = {p: {} for p in names}
    for key, t in tensors.items():
        name, _, part = key.rpartition(SEP)
        if part not in parts or not name:
            raise AdapterFormatError(f"{path}: unexpected tensor {key!r}")
        parts[part][name] = t
    return parts


def _check_sums(path: Path, meta: dict[str, str], tensors: dict[str, np.ndarray], checksum) -> None:
    if meta.get("meta_checksum") != meta_checksum(meta):
        raise AdapterFormatError(f"{path}: the metadata is corrupted (checksum mismatch)")
    sums = _field(path, meta, "checksums", json.loads)
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise AdapterFormatError(f"{path}: the checksums do not list exactly the tensors stored")
    for key, t in tensors.items():
        if checksum(key, t) != sums[key]:
            raise AdapterFormatError(f"{path}: tensor {key!r} is corrupted (checksum of its header and bytes)")


def _field(path: Path, meta: dict[str, str], key: str, parse) -> Any:
    try:
        return parse(meta[key])
    except (KeyError, ValueError, TypeError) as exc:
        raise AdapterFormatError(f"{path}: metadata field {key!r} is missing or malformed ({exc!r})") from None


def _shapes(path: Path, raw: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{path}: metadata 'shapes' must map tensor names to shapes")
    for name, shape in raw.items():
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise AdapterFormatError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
    return {n: tuple(s) for n, s in raw.items()}


def _fingerprint(
    path: Path, raw: str | None, probes: dict[str, np.ndarray], indices: dict[str, np.ndarray]
) -> Fingerprint | None:
    """The recorded fingerprint, its probes numpy fp32 (``shira_runtime.adapters`` makes them tensors)."""
    if raw is None:
        if probes:
            raise AdapterFormatError(f"{path}: probe tensors {sorted(probes)} but no fingerprint")
        return None
    try:
        d = json.loads(raw)
        ok = isinstance(d, dict) and isinstance(d.get("structure"), str) and isinstance(d.get("probes"), list)
    except (ValueError, TypeError):
        ok = False
    if not ok or sorted(d["probes"]) != sorted(probes):
        raise AdapterFormatError(f"{path}: the fingerprint is malformed or does not list its probe tensors")
    for name, p in probes.items():
        want = min(PROBES, indices[name].size) if name in indices else -1
        if p.dtype != np.float32 or p.ndim != 1 or p.size != want or not bool(np.isfinite(p).all()):
            raise AdapterFormatError(
                f"{path}: tensor {name!r}: probe is {_dtype(p)}{list(p.shape)}, expected {want} finite fp32 values"
            )
    return Fingerprint(d["structure"], dict(probes))
