"""Seeded mutations of our adapter file (``SparseAdapter.save``): bytes, header entries, tensor values.

Each file family is ``gen(rng, originals) -> [(original, params, bytes -> bytes)]``: ``originals`` maps a name
to the bytes of an unmutated file, ``params`` says what the mutation is (kind and parameters). "resummed"
families recompute the tensor checksums and the metadata checksum after editing, as a hostile writer would;
they only make edits that a correct reader must refuse or read as the original (never a different but valid
adapter, which no reader could tell from a real one).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

from tests.fuzz import mutations as mu
from tests.fuzz.metadata_cases import meta_edit_resummed, meta_edit_stale, meta_retyped

Mut = tuple[str, dict[str, Any], Callable[[bytes], bytes]]
WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1}
NONFINITE = {
    "F16": {"nan": b"\x00\x7e", "inf": b"\x00\x7c", "-inf": b"\x00\xfc"},
    "BF16": {"nan": b"\xc0\x7f", "inf": b"\x80\x7f", "-inf": b"\x80\xff"},
    "F32": {k: struct.pack("<f", float(k)) for k in ("nan", "inf", "-inf")},
}
# relabels that keep the byte count; and those whose result is not a valid dtype for that part of the file
SAME_SIZE = {
    "F32": ["I32", "U32"],
    "F16": ["BF16", "I16", "U16"],
    "BF16": ["F16", "I16", "U16"],
    "U8": ["I8", "BOOL", "F8_E4M3", "F8_E5M2"],
    "I16": ["U16", "F16", "BF16"],
    "I32": ["U32", "F32"],
    "I64": ["U64", "F64"],
}
RESIZE = {"F32": [("F16", 2), ("BF16", 2), ("F64", 0.5)], "F16": [("F32", 0.5)], "U8": [("I16", 0.5)]}
INVALID_FOR = {
    "values": {"I16", "U16", "I32", "U32", "I8", "BOOL"},
    "gaps": {"I8", "BOOL", "F8_E4M3", "F8_E5M2", "F16", "BF16"},
    "escapes": {"U32", "F32", "U64", "F64"},
    "runs": {"I8", "BOOL", "F8_E4M3", "F8_E5M2", "F16", "BF16"},
    "run_escapes": {"U32", "F32", "U64", "F64"},
    "probe": {"I32", "U32"},
}


def _pick(rng: random.Random, originals: dict[str, bytes]) -> tuple[str, bytes, dict, bytes]:
    name = rng.choice(sorted(originals))
    raw = originals[name]
    header, data = mu.parse(raw)
    return name, raw, header, data


def _keys(header: dict, part: str | None = None, nonempty: bool = False) -> list[str]:
    keys = [k for k in mu.tensor_keys(header) if part is None or k.rpartition("::")[2] == part]
    if nonempty:
        keys = [k for k in keys if header[k]["data_offsets"][1] > header[k]["data_offsets"][0]]
    return keys


def _resummed(fn: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    return mu.chain(fn, mu.edit_file(mu.refresh_checksums))


def _unique(muts: list[Mut], n: int) -> list[Mut]:
    seen, out = set(), []
    for m in muts:
        key = (m[0], json.dumps(m[1], sort_keys=True, default=str))
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out[:n]


# -- byte level --
def flip_header(rng, originals, n=60) -> list[Mut]:
    out = []
    for _ in range(n * 2):
        name, raw, _, _ = _pick(rng, originals)
        pos, mask = rng.randrange(mu.header_end(raw)), rng.randrange(1, 256)
        out.append((name, {"op": "xor byte", "pos": pos, "mask": mask, "of": mu.header_end(raw)}, mu.flip(pos, mask)))
    return _unique(out, n)


def flip_data(rng, originals, n=60) -> list[Mut]:
    out = []
    for _ in range(n * 2):
        name, raw, _, _ = _pick(rng, originals)
        pos, mask = rng.randrange(mu.header_end(raw), len(raw)), rng.randrange(1, 256)
        out.append(
            (name, {"op": "xor byte", "pos": pos, "mask": mask, "data_from": mu.header_end(raw)}, mu.flip(pos, mask))
        )
    return _unique(out, n)


def truncate(rng, originals, n=40) -> list[Mut]:
    out = []
    for name in sorted(originals):
        raw = originals[name]
        for length in (0, 1, 7, 8, 9, mu.header_end(raw) - 1, mu.header_end(raw), mu.header_end(raw) + 1, len(raw) - 1):
            out.append((name, {"op": "truncate", "length": length, "of": len(raw)}, mu.truncate(length)))
    while len(out) < n * 2:
        name, raw, _, _ = _pick(rng, originals)
        length = rng.randrange(len(raw))
        out.append((name, {"op": "truncate", "length": length, "of": len(raw)}, mu.truncate(length)))
    rng.shuffle(out)
    return _unique(out, n)


def append(rng, originals, n=16) -> list[Mut]:
    extras = [b"\x00", b" ", b"\n", b"{}", b"\x00" * 8, b"\xff" * 64]
    out = []
    for _ in range(n * 2):
        name, raw, _, _ = _pick(rng, originals)
        extra = rng.choice([*extras, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 65))), raw])
        out.append((name, {"op": "append", "bytes": extra[:16].hex(), "length": len(extra)}, mu.append(extra)))
    return _unique(out, n)


def header_length(rng, originals, n=20) -> list[Mut]:
    out = []
    for name in sorted(originals):
        raw = originals[name]
        h = mu.header_end(raw) - 8
        for v in (0, 1, 7, h - 1, h + 1, h - 8, h + 8, len(raw) - 8, len(raw) - 7, 2**32 + h, 2**63, 2**64 - 1):
            out.append((name, {"op": "header length", "value": v, "was": h}, mu.set_header_length(v)))
    rng.shuffle(out)
    return _unique(out, n)


# -- header entries --
def _relabels(header: dict) -> list[tuple[str, str, list]]:
    """(key, new dtype, new shape) for every relabel of a tensor entry (same byte count)."""
    out = []
    for key in _keys(header):
        e = header[key]
        n = e["shape"][0] if len(e["shape"]) == 1 else None
        for d in SAME_SIZE.get(e["dtype"], []):
            out.append((key, d, e["shape"]))
        for d, factor in RESIZE.get(e["dtype"], []):
            if n is not None and (n * factor) == int(n * factor):
                out.append((key, d, [int(n * factor)]))
        for d in SAME_SIZE:  # a different element size without the shape fixed: byte count mismatch
            if d != e["dtype"] and WIDTH.get(d) != WIDTH.get(e["dtype"]):
                out.append((key, d, e["shape"]))
                break
    return out


def dtype_relabel(rng, originals, n=50) -> list[Mut]:
    """A tensor's dtype letters edited in the header (F16 -> BF16, F32 -> U32 ...); checksums left alone."""
    out = []
    for _ in range(n * 3):
        name, _, header, _ = _pick(rng, originals)
        key, d, shape = rng.choice(_relabels(header))
        params = {"op": "relabel dtype", "tensor": key, "from": header[key]["dtype"], "to": d, "shape": shape}
        out.append(
            (name, params, mu.edit_header(mu.chain(mu.set_entry(key, "dtype", d), mu.set_entry(key, "shape", shape))))
        )
    return _unique(out, n)


def dtype_relabel_resummed(rng, originals, n=25) -> list[Mut]:
    """Relabels to a dtype that part of the file may not have, with every checksum recomputed."""
    out = []
    for _ in range(n * 4):
        name, _, header, _ = _pick(rng, originals)
        cands = [c for c in _relabels(header) if c[1] in INVALID_FOR[c[0].rpartition("::")[2]]]
        key, d, shape = rng.choice(cands)
        params = {"op": "relabel dtype, resummed", "tensor": key, "from": header[key]["dtype"], "to": d, "shape": shape}
        edit = mu.edit_header(mu.chain(mu.set_entry(key, "dtype", d), mu.set_entry(key, "shape", shape)))
        out.append((name, params, _resummed(edit)))
    return _unique(out, n)


def _shape_variants(n: int) -> list[Any]:
    v = [[n, 1], [1, n], [n, 1, 1], [n + 1], [], [0], [n, 0], [2**62, 4], [2**64], [-1], ["x"], None, str(n), [n, "x"]]
    if n:
        v.append([n - 1])
    if n and n % 2 == 0:
        v.append([n // 2, 2])
    return v


def _shape_edits(rng, originals, n, resum) -> list[Mut]:
    out = []
    for _ in range(n * 3):
        name, _, header, _ = _pick(rng, originals)
        key = rng.choice(_keys(header))
        shape = rng.choice(_shape_variants(header[key]["shape"][0]))
        params = {
            "op": "shape" + (", resummed" if resum else ""),
            "tensor": key,
            "from": header[key]["shape"],
            "to": shape,
        }
        edit = mu.edit_header(mu.set_entry(key, "shape", shape))
        out.append((name, params, _resummed(edit) if resum else edit))
    return _unique(out, n)


def shape_edit(rng, originals, n=20) -> list[Mut]:
    return _shape_edits(rng, originals, n, resum=False)


def shape_edit_resummed(rng, originals, n=15) -> list[Mut]:
    return _shape_edits(rng, originals, n, resum=True)


def offsets_edit(rng, originals, n=30) -> list[Mut]:
    out = []
    for _ in range(n * 3):
        name, _, header, data = _pick(rng, originals)
        key = rng.choice(_keys(header))
        b, e = header[key]["data_offsets"]
        ops = {
            "begin+1": [b + 1, e],
            "end+1": [b, e + 1],
            "end-1": [b, e - 1] if e > b else [b, e + 2],
            "begin-1": [b - 1, e] if b else [b + 2, e],
            "whole data": [0, len(data)],
            "reversed": [e, b] if e != b else [e + 1, b],
            "end 2**64": [b, 2**64],
            "negative": [-1, e],
            "null": None,
            "one number": [b],
            "three numbers": [b, e, e],
            "floats": [b + 0.5, e + 0.5],
            "strings": [str(b), str(e)],
        }
        op = rng.choice(sorted(ops) + ["swap with a same-size tensor"])
        if op.startswith("swap"):
            twins = [
                k
                for k in _keys(header)
                if k != key and header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == e - b
            ]
            if not twins:
                continue
            other = rng.choice(twins)
            out.append(
                (
                    name,
                    {"op": "swap data_offsets", "tensors": [key, other]},
                    mu.edit_header(mu.swap_offsets(key, other)),
                )
            )
        else:
            out.append(
                (
                    name,
                    {"op": "data_offsets", "tensor": key, "edit": op, "to": ops[op]},
                    mu.edit_header(mu.set_entry(key, "data_offsets", ops[op])),
                )
            )
    return _unique(out, n)


def relabel(rng, originals, n=30) -> list[Mut]:
    """Two tensor names swapped in the header (each name now labels the other's bytes); checksums left alone."""
    out = []
    for _ in range(n * 2):
        name, _, header, _ = _pick(rng, originals)
        k1, k2 = rng.sample(_keys(header), 2)
        out.append(
            (name, {"op": "swap tensor names", "tensors": sorted([k1, k2])}, mu.edit_header(mu.swap_entries(k1, k2)))
        )
    return _unique(out, n)


def relabel_resummed(rng, originals, n=12) -> list[Mut]:
    """Indices or probes swapped between two same-shaped base tensors, checksums recomputed: the file is
    consistent, but its indices/probes no longer match the base (the fingerprint must catch it)."""
    out = []
    for _ in range(n * 4):
        name, _, header, _ = _pick(rng, originals)
        shapes = json.loads(header[mu.META]["shapes"])
        groups: dict[str, list[str]] = {}
        for t, s in shapes.items():
            groups.setdefault(str(s), []).append(t)
        pairs = [(a, b) for g in groups.values() for a in g for b in g if a < b]
        a, b = rng.choice(pairs)
        what = rng.choice(["indices", "probe"])
        parts = ("gaps", "escapes", "runs", "run_escapes") if what == "indices" else ("probe",)
        edit = mu.chain(*(mu.swap_entries(f"{a}::{p}", f"{b}::{p}") for p in parts))
        out.append((name, {"op": f"swap {what}, resummed", "tensors": [a, b]}, _resummed(mu.edit_header(edit))))
    return _unique(out, n)


# -- tensor values --
def nonfinite(rng, originals, n=40) -> list[Mut]:
    """NaN/Inf written into a values or probe tensor, with the checksums recomputed or left stale."""
    out = []
    for _ in range(n * 2):
        name, _, header, _ = _pick(rng, originals)
        part = rng.choice(["values", "probe"])
        key = rng.choice(_keys(header, part, nonempty=True))
        e = header[key]
        kind, resum = rng.choice(sorted(NONFINITE[e["dtype"]])), rng.random() < 0.5
        index = rng.randrange(e["shape"][0])
        edit = mu.edit_file(mu.write_element(key, index, NONFINITE[e["dtype"]][kind]))
        params = {"op": f"write {kind}", "tensor": key, "index": index, "checksums": "recomputed" if resum else "stale"}
        out.append((name, params, _resummed(edit) if resum else edit))
    return _unique(out, n)


def probe_edit_resummed(rng, originals, n=10) -> list[Mut]:
    """A probe value changed (a fingerprint of another base), checksums recomputed."""
    edits = {"+1": lambda x: x + 1, "-1": lambda x: x - 1, "1e30": lambda x: 1e30, "-x-1": lambda x: -x - 1}
    out = []
    for _ in range(n * 3):
        name, _, header, _ = _pick(rng, originals)
        key = rng.choice(_keys(header, "probe", nonempty=True))
        index, op = rng.randrange(header[key]["shape"][0]), rng.choice(sorted(edits))
        edit = mu.edit_file(mu.scale_element(key, index, edits[op]))
        out.append((name, {"op": f"probe value {op}, resummed", "tensor": key, "index": index}, _resummed(edit)))
    return _unique(out, n)


FILE_FAMILIES: dict[str, Callable[[random.Random, dict[str, bytes]], list[Mut]]] = {
    f.__name__: f
    for f in (
        flip_header,
        flip_data,
        truncate,
        append,
        header_length,
        dtype_relabel,
        dtype_relabel_resummed,
        shape_edit,
        shape_edit_resummed,
        offsets_edit,
        relabel,
        relabel_resummed,
        meta_edit_resummed,
        meta_edit_stale,
        meta_retyped,
        nonfinite,
        probe_edit_resummed,
    )
}
