"""Bundle files: names, the error class, and the weight file (mapped copy-on-write, or read into memory we own).

A bundle is a directory: ``model.onnx`` (no weight bytes inside), ``weights.safetensors``, ``manifest.json``
(``shira_runtime.manifest``: format and version, parameter name -> ONNX tensor, layout, shape, dtype; inputs/outputs;
fingerprint) and, when packaged, ``adapters/``. Every file is untrusted: each check names the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from shira_runtime.errors import AdapterFormatError
from shira_runtime.kernels.dtypes import NUMPY

FORMAT = "shira-onnx-bundle"
# The format version a manifest states is the lowest that describes its bundle, so an older runtime reads every
# bundle it can: 3 for a bundle with an int8 weight stored as its transposed uint8 copy (the exporter's `copy16`
# form; version 2 bundles written before the bump may hold it too, and are read as they are), 2 otherwise.
# 1: no manifest checksum, a structure hash of names and shapes only.
VERSION = 3
READS = (2, 3)  # the versions this runtime reads
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
ADAPTERS_DIR = "adapters"
LAYOUTS = ("identity", "transposed")
ADAPTER_KINDS = ("shira", "lora")
ALIGN = 64
MAX_HEADER = 100 << 20
CHUNK = 1 << 24
MAX_EXAMPLE = 1 << 20  # elements of one probe input


class BundleError(AdapterFormatError):
    """A bundle directory is missing, truncated, corrupted or edited; the message names the file and tensor."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def mismatch(path: Path) -> str:
    return f"{path}: sha256 differs from the manifest's fingerprint (weights edited or corrupted)"


def is_dim(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


# -- weights: a safetensors file, mapped copy-on-write or read into memory we own --
@dataclass
class MappedWeights:
    """The weight file mapped copy-on-write (``mmap.ACCESS_COPY``, a private mapping): ``arrays`` are writable
    numpy views of ``mm``; a write copies only the page it lands on, every other page stays the file's (shared
    with the page cache and other processes). ``spans``: ONNX name -> (first byte, byte count) in the file."""

    mm: mmap.mmap
    arrays: dict[str, np.ndarray]
    spans: dict[str, tuple[int, int]]
    pending: Verifier | None = None  # the sha256 still being checked on a background thread


class Verifier:
    """The weight file's sha256, computed on a daemon thread (``hashlib`` and ``read`` release the GIL, so it
    overlaps the session's start and the first inference) from a duplicate of the descriptor that was mapped
    (the same file, even if ``path`` is replaced meanwhile), through ``read`` calls into one small buffer (not
    through the map: the weight pages are not mapped into this process by it). ``wait()`` joins it and raises
    the ``BundleError`` of a mismatch, every time it is called."""

    def __init__(self, path: Path, fd: int, sha256: str) -> None:
        self.path, self.sha256, self.error = path, sha256, None
        self._thread = threading.Thread(target=self._run, args=(fd,), name="shira-verify-weights", daemon=True)
        self._thread.start()

    def _run(self, fd: int) -> None:
        try:
            with open(fd, "rb") as f:  # closes the duplicate descriptor
                f.seek(0)
                if _sha256_of(f) != self.sha256:
                    self.error = (
                        f"{self.path}: sha256 differs from the manifest's fingerprint (weights edited or corrupted)"
                    )
        except OSError as exc:
            self.error = f"{self.path}: cannot be read to verify its sha256 ({exc})"

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise BundleError(self.error)


def map_weights(
    path: Path, storage: dict[str, tuple[str, tuple[int, ...]]], sha256: str | None, background: bool = False
) -> MappedWeights | dict[str, np.ndarray]:
    """Every tensor of ``storage`` from ``path`` as views of a copy-on-write map (no weight is read here).

    Same checks as ``read_weights``. With ``sha256`` the whole file is hashed, through ``read`` calls into one
    small buffer (not through the map, so the weight pages are not mapped into this process): here, before
    anything is mapped (a mismatch raises), or with ``background`` on a thread started here (``Verifier``: the
    caller must ``pending.wait()`` before it trusts an output). A file whose tensors are not aligned to their
    item size (not written by this exporter) is read into private memory instead (``read_weights``, which
    hashes as it reads), with a warning.
    """
    with _open_weights(path) as f:
        size = f.seek(0, 2)
        n, spans = _layout(path, f, size, storage)
        misaligned = [name for begin, _, name in spans if (8 + n + begin) % np.dtype(storage[name][0]).itemsize]
        if misaligned:
            warnings.warn(
                f"{path}: tensor {misaligned[0]!r} (and {len(misaligned) - 1} more) not aligned to its item size: "
                f"the weights are read into private memory, not mapped; re-export or re-package the bundle "
                f"(shira-package) to map them",
                stacklevel=3,
            )
            return read_weights(path, storage, sha256)
        if sha256 is not None and not background:
            f.seek(0)
            if _sha256_of(f) != sha256:
                raise BundleError(mismatch(path))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the map outlives the descriptor
        fd = os.dup(f.fileno()) if sha256 is not None and background else None
    arrays, where = {}, {}
    for begin, end, name in spans:
        dtype, shape = storage[name]
        dt = np.dtype(dtype)
        arrays[name] = np.frombuffer(mm, dt, (end - begin) // dt.itemsize, 8 + n + begin).reshape(shape)
        where[name] = (8 + n + begin, end - begin)
    return MappedWeights(mm, arrays, where, Verifier(path, fd, sha256) if fd is not None else None)


def _sha256_of(f: BinaryIO) -> str:
    """sha256 of the rest of ``f``, read into one reused 1 MiB buffer (the process's memory stays flat)."""
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    while got := f.readinto(buf):
        h.update(view[:got])
    return h.hexdigest()


def _layout(
    path: Path, f: BinaryIO, size: int, storage: dict[str, tuple[str, tuple[int, ...]]]
) -> tuple[int, list[tuple[int, int, str]]]:
    """The header length and every tensor's ``(begin, end, name)`` data offsets, sorted and checked against
    ``storage`` and the file size; ``f`` is left at the first data byte."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise BundleError(f"{path}: truncated ({size} bytes; not a safetensors file)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8):
        raise BundleError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated or corrupt")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    unknown = sorted(set(header) - set(storage))
    missing = sorted(set(storage) - set(header))
    if unknown or missing:
        raise BundleError(f"{path}: tensors do not match the manifest (missing {missing}, unknown {unknown})")
    spans = []
    for name, (dtype, shape) in storage.items():
        e = header[name]
        offsets = e.get("data_offsets") if isinstance(e, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_dim(o) for o in offsets)):
            raise BundleError(f"{path}: tensor {name!r}: malformed header entry {e!r}")
        code = NUMPY[dtype].safetensors
        if e.get("dtype") != code or e.get("shape") != list(shape):
            raise BundleError(
                f"{path}: tensor {name!r} is {e.get('dtype')}{e.get('shape')}, the manifest says {code}{list(shape)}"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
        if end - begin != nbytes:
            raise BundleError(f"{path}: tensor {name!r}: data_offsets span {end - begin} bytes, expected {nbytes}")
        if 8 + n + end > size:
            raise BundleError(f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end}, file has {size}")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise BundleError(f"{path}: tensor {name!r} overlaps the previous tensor's data")
        pos = end
    return n, spans


def read_weights(
    path: Path, storage: dict[str, tuple[str, tuple[int, ...]]], sha256: str | None
) -> dict[str, np.ndarray]:
    """Every tensor of ``storage`` from ``path``, as writable 64-byte-aligned C-contiguous arrays.

    The whole file is hashed while it is read when ``sha256`` is given.
    """
    with _open_weights(path) as f:
        size = f.seek(0, 2)
        n, spans = _layout(path, f, size, storage)
        f.seek(0)
        h = hashlib.sha256(f.read(8 + n))
        arrays, pos = {}, 0
        for begin, end, name in spans:
            if begin > pos:  # a gap: hashed, not used
                h.update(f.read(begin - pos))
            dtype, shape = storage[name]
            arr = _aligned(shape, np.dtype(dtype))
            view = memoryview(arr.reshape(-1).view(np.uint8))
            for at in range(0, end - begin, CHUNK):
                part = view[at : at + CHUNK]
                if f.readinto(part) != len(part):
                    raise BundleError(f"{path}: truncated inside tensor {name!r}")
                h.update(part)
            arrays[name] = arr
            pos = end
        while chunk := f.read(CHUNK):
            h.update(chunk)
    if sha256 is not None and h.hexdigest() != sha256:
        raise BundleError(mismatch(path))
    return arrays


def _aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    off = -buf.ctypes.data % ALIGN
    return buf[off : off + nbytes].view(dtype).reshape(shape)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None


def _open_weights(path: Path):
    """The weight file opened for reading; a ``BundleError`` naming it if it cannot be."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise BundleError(f"{path}: cannot open the weight file ({exc.strerror})") from None
