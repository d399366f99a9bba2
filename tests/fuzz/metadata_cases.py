"""Seeded edits of our adapter file's metadata (safetensors ``__metadata__``: str -> str).

``meta_edit_resummed`` recomputes the metadata checksum after each edit (a consistent liar);
``meta_edit_stale`` makes the same edits and leaves it stale; ``meta_retyped`` gives fields and entries values
of another JSON type than safetensors allows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.fuzz import mutations as mu

Mut = tuple[str, dict[str, Any], Callable[[bytes], bytes]]


def meta_edits(header: dict) -> list[tuple[dict, Callable[[dict], dict]]]:
    """Every metadata edit, as (params, header -> header); all values stay strings (safetensors' rule)."""
    meta = header[mu.META]
    shapes = json.loads(meta["shapes"])
    t = sorted(shapes)[0]
    r, c = shapes[t]
    version = meta["version"]
    fp = json.loads(meta["fingerprint"])
    sums = json.loads(meta["checksums"])
    out = []

    def add(field, edit, fn):
        out.append(({"field": field, "edit": edit}, fn))

    def text(field, values):
        for v in values:
            add(field, f"= {v!r}", mu.set_meta(field, v))

    add(
        "shapes",
        "as a JSON list of [name, shape]",
        mu.set_meta("shapes", json.dumps([[k, v] for k, v in shapes.items()])),
    )
    add("shapes", "as a JSON list of shapes", mu.set_meta("shapes", json.dumps(list(shapes.values()))))
    for label, v in [
        ("dimension 'x'", ["x", c]),
        ("dimension as a string", [str(r), c]),
        ("dimension as a float", [r + 0.5, c]),
        ("negative dimensions", [-r, -c]),
        ("flat, same numel", [r * c]),
        ("extra dimension", [r, c, 1]),
        ("rank 0", []),
        ("null", None),
        ("a number", r),
        ("huge", [2**40, 2**40]),
        ("2**64", [2**64, 1]),
        ("bool dimension", [True, c]),
        ("nested", [[r], [c]]),
        ("other shape, same numel", [r // 2, c * 2]),
        ("zero rows", [0, c]),
        ("a dict", {"0": r, "1": c}),
    ]:
        add("shapes", f"{t} -> {v!r} ({label})", mu.edit_meta_json("shapes", lambda d, v=v: {**d, t: v}))
    add("shapes", f"{t} removed", mu.edit_meta_json("shapes", lambda d: {k: v for k, v in d.items() if k != t}))
    add("shapes", "an extra unknown tensor", mu.edit_meta_json("shapes", lambda d: {**d, "model.evil.weight": [4, 4]}))
    text("shapes", ["null", "[]", "{}", "{", "", '"abc"', "1", "NaN"])
    text(
        "scale",
        ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "abc", "", "None", "[1.0]", "0x1", "1,0"],
    )
    text("scale", ["1", "1.00", "+1.0", "1e0", " 1.0 "])  # the same value spelled otherwise
    add("scale", "removed", mu.drop_meta("scale"))
    older = [str(int(version) - 1)] if version.isdigit() and int(version) > 1 else []
    text(
        "version", [str(int(version) + 1), "0", "", "v" + version, version + ".0", " " + version, "1", *older, "9" * 30]
    )
    add("version", "removed", mu.drop_meta("version"))
    fmt = meta["format"]
    text("format", [fmt + "2", "", fmt.upper(), fmt + " ", "shira-onnx-bundle"])
    add("format", "removed", mu.drop_meta("format"))
    text("fingerprint", ["{", "null", "[]", "{}", '"x"', "1"])
    probes = fp.get("probes", [])
    for label, v in [
        ("structure a number", {**fp, "structure": 5}),
        ("structure of another base", {**fp, "structure": "0" * 32}),
        ("structure null", {**fp, "structure": None}),
        ("no structure", {k: v for k, v in fp.items() if k != "structure"}),
        ("no probes", {k: v for k, v in fp.items() if k != "probes"}),
        ("probes a string", {**fp, "probes": "abc"}),
        ("probes null", {**fp, "probes": None}),
        ("probes empty", {**fp, "probes": []}),
        ("probes name an unknown tensor", {**fp, "probes": [*probes, "model.evil.weight"]}),
        ("probes nested", {**fp, "probes": [probes]}),
        ("probes numbers", {**fp, "probes": [1, 2]}),
        ("probes twice", {**fp, "probes": probes + probes}),
        ("an extra field", {**fp, "evil": 1}),
    ]:
        add("fingerprint", label, mu.set_meta("fingerprint", json.dumps(v)))
    add("fingerprint", "removed", mu.drop_meta("fingerprint"))
    text("mask_kind", ["abc", "", "x" * 10000])
    add("mask_kind", "removed", mu.drop_meta("mask_kind"))
    text("checksums", ["[]", "{", "{}", "null", '"x"'])
    add("checksums", "removed", mu.drop_meta("checksums"))
    k0 = sorted(sums)[0]
    add("checksums", f"{k0} removed", mu.edit_meta_json("checksums", lambda d: {k: v for k, v in d.items() if k != k0}))
    add("checksums", f"{k0} zeroed", mu.edit_meta_json("checksums", lambda d: {**d, k0: "0" * 32}))
    add("checksums", f"{k0} a number", mu.edit_meta_json("checksums", lambda d: {**d, k0: 5}))
    add(
        "checksums",
        "an extra entry",
        mu.edit_meta_json("checksums", lambda d: {**d, "model.evil.weight::values": "0" * 32}),
    )
    add("meta_checksum", "removed", mu.drop_meta("meta_checksum"))
    add("(extra field)", "evil = 'x'", mu.set_meta("evil", "x"))
    return out


def _meta_family(originals, resum: bool) -> list[Mut]:
    out = []
    for name in sorted(originals)[:1]:
        header, _ = mu.parse(originals[name])
        for params, fn in meta_edits(header):
            if resum and params["field"] == "meta_checksum":
                continue  # recomputing it would undo the edit
            edit = mu.edit_header(mu.chain(fn, mu.refresh_meta_checksum) if resum else fn)
            out.append((name, {**params, "meta_checksum": "recomputed" if resum else "stale"}, edit))
    return out


def meta_edit_resummed(rng, originals) -> list[Mut]:
    """Metadata fields edited, removed, retyped; the metadata checksum recomputed."""
    return _meta_family(originals, resum=True)


def meta_edit_stale(rng, originals) -> list[Mut]:
    """The same edits with the metadata checksum left as it was."""
    return _meta_family(originals, resum=False)


def meta_retyped(rng, originals) -> list[Mut]:
    """Metadata values, the metadata object and tensor entries of another JSON type than safetensors allows."""
    name = sorted(originals)[0]
    header, _ = mu.parse(originals[name])
    key = next(k for k in mu.tensor_keys(header) if k.endswith("::values"))
    edits = [
        ("scale a number", mu.set_meta("scale", 1.0)),
        ("version a number", mu.set_meta("version", 2)),
        ("shapes an object", mu.set_meta("shapes", json.loads(header[mu.META]["shapes"]))),
        ("fingerprint null", mu.set_meta("fingerprint", None)),
        ("checksums a list", mu.set_meta("checksums", [])),
        ("mask_kind a bool", mu.set_meta("mask_kind", True)),
        ("__metadata__ a list", mu.set_whole_meta([])),
        ("__metadata__ null", mu.set_whole_meta(None)),
        ("__metadata__ a string", mu.set_whole_meta("x")),
        ("__metadata__ empty", mu.set_whole_meta({})),
        ("__metadata__ removed", lambda h: {k: v for k, v in h.items() if k != mu.META}),
        (f"{key} entry a string", lambda h: {**h, key: "x"}),
        (f"{key} entry null", lambda h: {**h, key: None}),
    ]
    return [
        (name, {"op": "retype", "edit": label}, mu.edit_header(mu.chain(fn, mu.refresh_meta_checksum)))
        for label, fn in edits
    ]
