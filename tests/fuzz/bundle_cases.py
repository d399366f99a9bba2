"""Seeded mutations of a packaged bundle: manifest.json, weights.safetensors, model.onnx, live.onnx, adapters/.

Each family is ``gen(rng, root) -> [(params, target, apply, expect_adapters)]``: ``root`` is the unmutated
bundle (read to plan the mutations, never written), ``target`` the mutated file relative to the bundle,
``apply(copy)`` mutates a copy in place through the pure functions of ``mutations``. ``expect_adapters``
(registered name -> the original adapter it must behave like) is set only where an edit legitimately changes
the adapters a bundle lists (an entry removed; one added under another name).

Manifest edits recompute the manifest's integrity fields afterwards (structure hash, checksum: what a
consistent liar writes), so they reach the checks of each field; ``manifest_stale`` leaves them stale.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fuzz import compat
from tests.fuzz import mutations as mu
from tests.fuzz.adapter_cases import FILE_FAMILIES
from tests.fuzz.harness import on_bytes
from tests.fuzz.lora_cases import lora_dir_edits

MANIFEST, WEIGHTS, GRAPH, LIVE = "manifest.json", "weights.safetensors", "model.onnx", "live.onnx"
SHIRA, LORA = "adapters/b.safetensors", "adapters/l"  # the packaged adapters the file mutations go into
BMut = tuple[dict[str, Any], str, Callable[[Path], None], dict[str, str] | None]


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def on_manifest(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    return on_bytes(mu.json_bytes(fn), MANIFEST)


def resummed(fn: Callable[[dict], dict], edited: tuple = ()) -> Callable[[dict], dict]:
    """``fn``, then the manifest's structure hash and checksum recomputed (a consistent liar)."""
    return lambda m: compat.resum_manifest(fn(m), edited)


def _removals(m: dict, resum: bool) -> list[BMut]:
    out = []
    for p in mu.paths(m):
        expect = None
        if p == ("adapters",):
            expect = {}
        elif len(p) == 2 and p[0] == "adapters":
            expect = {n: n for n in m["adapters"] if n != p[1]}
        fn = resummed(mu.del_path(p), p) if resum else mu.del_path(p)
        out.append(({"op": "remove", "path": list(p), "resummed": resum}, MANIFEST, on_manifest(fn), expect))
    return out


def _retypes(rng: random.Random, m: dict, resum: bool) -> list[BMut]:
    out = []
    for p in mu.paths(m):
        v = rng.choice(mu.other_types(mu.get_path(m, p)))
        fn = resummed(mu.set_path(p, v), p) if resum else mu.set_path(p, v)
        out.append(({"op": "retype", "path": list(p), "to": v, "resummed": resum}, MANIFEST, on_manifest(fn), None))
    return out


def manifest_remove(rng, root) -> list[BMut]:
    """Every key path of the manifest removed."""
    return _removals(_manifest(root), resum=True)


def manifest_retype(rng, root) -> list[BMut]:
    """Every key path of the manifest given a value of another JSON type."""
    return _retypes(rng, _manifest(root), resum=True)


def manifest_stale(rng, root, n=30) -> list[BMut]:
    """Removals and retypes with the integrity fields left as they were."""
    m = _manifest(root)
    return rng.sample(_removals(m, resum=False) + _retypes(rng, m, resum=False), n)


def _same_shaped(m: dict) -> list[tuple[str, str]]:
    by: dict[str, list[str]] = {}
    for n, p in m["parameters"].items():
        if n.endswith("proj.weight"):
            by.setdefault(str(p["shape"]), []).append(n)
    return [(a, b) for g in by.values() for a in g for b in g if a < b]


def manifest_semantic(rng, root) -> list[BMut]:
    """Edits of what each field means: example shapes, dtypes, layouts, tensor mapping, file names, adapters."""
    m = _manifest(root)
    inp = m["inputs"][0]["name"]
    params = m["parameters"]
    square = next(n for n, p in params.items() if n.endswith("q_proj.weight") and p["shape"][0] == p["shape"][1])
    oblong = next(n for n, p in params.items() if p["shape"][0] != p["shape"][1] and n.endswith("proj.weight"))
    out: list[BMut] = []

    def add(label: str, fn: Callable[[dict], dict], expect=None, edited: tuple = ()):
        out.append(({"edit": label, "resummed": True}, MANIFEST, on_manifest(resummed(fn, edited)), expect))

    def add_steps(label: str, *steps: Callable[[Path], None]):
        out.append(({"edit": label, "resummed": True}, MANIFEST, lambda r: [step(r) for step in steps], None))

    for v in ([0, 8], [1, 0], [2, 8], [1, 8, 1], [1, 2**21], [-1, 8], [1.5, 8], ["1", 8], [True, 8]):
        add(f"inputs[0].example_shape = {v}", mu.set_path(("inputs", 0, "example_shape"), v))
    for v in ("float32", "float16", "int32", "int8", "uint64", "bool", "U5", "object", "complex64", None, "i8", "<i8"):
        add(f"inputs[0].dtype = {v!r}", mu.set_path(("inputs", 0, "dtype"), v))
    add(
        "inputs[0].dtype = a structured dtype", mu.set_path(("inputs", 0, "dtype"), {"names": ["a"], "formats": ["i8"]})
    )
    for v in ([1, 8], [2, 8], [1, 9], ["batch"], [], ["batch", "seq", "x"], [None, None]):
        add(f"inputs[0].shape = {v}", mu.set_path(("inputs", 0, "shape"), v))
    for v in (inp + "2", "", m["outputs"][0]["name"], next(iter(params.values()))["onnx"]):
        add(f"inputs[0].name = {v!r}", mu.set_path(("inputs", 0, "name"), v))
    add("inputs = []", mu.set_path(("inputs",), []))
    add("inputs[0] twice", mu.edit_path(("inputs",), lambda v: v + v))
    add("outputs[0].name = 'out2'", mu.set_path(("outputs", 0, "name"), "out2"))
    add("outputs = []", mu.set_path(("outputs",), []))
    add("outputs[0] twice", mu.edit_path(("outputs",), lambda v: v + v))
    # A square weight relabelled 'transposed' keeps every shape: only the checksum can tell (a re-sealed manifest
    # that lies about it is trusted, as the README says), so this edit is made without re-summing.
    relaid = mu.set_path(("parameters", square, "layout"), "transposed")
    out.append(
        ({"edit": f"{square}.layout = 'transposed' (square)", "resummed": False}, MANIFEST, on_manifest(relaid), None)
    )
    add(f"{oblong}.layout = 'transposed'", mu.set_path(("parameters", oblong, "layout"), "transposed"))
    add(f"{square}.layout = 'TRANSPOSED'", mu.set_path(("parameters", square, "layout"), "TRANSPOSED"))
    pairs = _same_shaped(m)
    for a, b in rng.sample(pairs, min(4, len(pairs))):

        def swap(mm, a=a, b=b):
            pa, pb = mm["parameters"][a], mm["parameters"][b]
            pa["onnx"], pb["onnx"] = pb["onnx"], pa["onnx"]
            return mm

        add(f"onnx names of {a} and {b} swapped (same shape)", swap)
        add(f"{a}.onnx = {b}'s (tied)", mu.set_path(("parameters", a, "onnx"), params[b]["onnx"]))
    for v in ("float16", "bfloat16", "int32"):
        add(f"{square}.dtype = {v!r}", mu.set_path(("parameters", square, "dtype"), v))
    r, c = params[square]["shape"]
    add(f"{square}.shape = {[r // 2, c * 2]}", mu.set_path(("parameters", square, "shape"), [r // 2, c * 2]))
    add(f"{square}.shape = {[c, r]} (the same)", mu.set_path(("parameters", square, "shape"), [c, r]))

    def rename(mm):
        mm["parameters"]["model.evil.weight"] = mm["parameters"].pop(square)
        return mm

    add(f"parameter {square} renamed", rename)
    add(f"parameter {square} removed", mu.del_path(("parameters", square)))

    def alias(mm):
        mm["parameters"]["model.alias.weight"] = dict(mm["parameters"][square])
        return mm

    add(f"an alias of {square} added", alias)
    add(
        "fingerprint.structure of another base",
        mu.set_path(("fingerprint", "structure"), "0" * 32),
        edited=("fingerprint", "structure"),
    )
    add("fingerprint.weights_sha256 zeroed", mu.set_path(("fingerprint", "weights_sha256"), "0" * 64))
    add(
        "fingerprint hashes swapped",
        mu.edit_path(
            ("fingerprint",), lambda f: {**f, "weights_sha256": f["graph_sha256"], "graph_sha256": f["weights_sha256"]}
        ),
    )
    add("fingerprint has an extra field", mu.edit_path(("fingerprint",), lambda f: {**f, "evil": 1}))
    for v in ("../model.onnx", "/dev/null", WEIGHTS, "missing.onnx", "adapters", MANIFEST, "", ".", "model.onnx/"):
        add(f"graph = {v!r}", mu.set_path(("graph",), v))
    for v in (GRAPH, "../weights.safetensors", "adapters", "/dev/zero"):
        add(f"weights = {v!r}", mu.set_path(("weights",), v))
    for v in (2, "1", 0, True, 1.0, None):
        add(f"version = {v!r}", mu.set_path(("version",), v))
    for v in ("shira-onnx-bundle2", "", None):
        add(f"format = {v!r}", mu.set_path(("format",), v))
    adapters = m["adapters"]
    add("an adapter named ''", mu.edit_path(("adapters",), lambda a: {**a, "": dict(a["b"])}))
    add(
        "an adapter named ' '",
        mu.edit_path(("adapters",), lambda a: {**a, " ": dict(a["b"])}),
        {**{n: n for n in adapters}, " ": "b"},
    )

    add_steps(
        "b.path outside the bundle (../, the file exists)", _copy_outside, _b_path(lambda r: f"../{_outside(r).name}")
    )
    add_steps("b.path absolute, outside the bundle", _copy_outside, _b_path(lambda r: str(_outside(r))))
    add_steps(
        "b.path a symlink inside adapters/ to a file outside",
        _copy_outside,
        lambda r: (r / "adapters" / "evil.safetensors").symlink_to(_outside(r)),
        _b_path(lambda r: "adapters/evil.safetensors"),
    )
    for v in (
        "adapters/../../b.safetensors",
        "adapters/missing.safetensors",
        "adapters",
        MANIFEST,
        WEIGHTS,
        f"{LORA}/adapter_model.safetensors",
        "",
        ".",
        None,
        5,
    ):
        add(f"b.path = {v!r}", mu.set_path(("adapters", "b", "path"), v))
    for v in ("adapters/../adapters/b.safetensors", "adapters/./b.safetensors"):
        add(f"b.path = {v!r} (the same file)", mu.set_path(("adapters", "b", "path"), v))
    add("l.path with a trailing slash", mu.set_path(("adapters", "l", "path"), LORA + "/"))
    for v in ("lora", "", None, "peft"):
        add(f"b.kind = {v!r}", mu.set_path(("adapters", "b", "kind"), v))
    add("l.kind = 'shira'", mu.set_path(("adapters", "l", "kind"), "shira"))
    add("b entry a string", mu.set_path(("adapters", "b"), "adapters/b.safetensors"))
    return out


def _outside(root: Path) -> Path:
    """A copy of adapter b next to (outside) the bundle copy ``root``."""
    return root.parent / f"{root.name}-outside.safetensors"


def _copy_outside(root: Path) -> None:
    shutil.copy(root / SHIRA, _outside(root))


def _b_path(path: Callable[[Path], str]) -> Callable[[Path], None]:
    return lambda root: on_manifest(resummed(mu.set_path(("adapters", "b", "path"), path(root))))(root)


def _byte_muts(rng, raw: bytes, rel: str, flips_header: int, flips_data: int, truncations: int) -> list[BMut]:
    out = []
    end = mu.header_end(raw) if rel.endswith(".safetensors") else 0
    for _ in range(flips_header):
        pos, mask = rng.randrange(end), rng.randrange(1, 256)
        out.append(
            ({"op": "xor byte (header)", "pos": pos, "mask": mask}, rel, on_bytes(mu.flip(pos, mask), rel), None)
        )
    for _ in range(flips_data):
        pos, mask = rng.randrange(end, len(raw)), rng.randrange(1, 256)
        out.append(({"op": "xor byte", "pos": pos, "mask": mask}, rel, on_bytes(mu.flip(pos, mask), rel), None))
    for _ in range(truncations):
        n = rng.randrange(len(raw))
        out.append(({"op": "truncate", "length": n, "of": len(raw)}, rel, on_bytes(mu.truncate(n), rel), None))
    return out


def weights_bytes(rng, root) -> list[BMut]:
    raw = (root / WEIGHTS).read_bytes()
    out = _byte_muts(rng, raw, WEIGHTS, 6, 6, 6)
    h = mu.header_end(raw) - 8
    for v in (h + 8, 2**63):
        out.append(({"op": "header length", "value": v}, WEIGHTS, on_bytes(mu.set_header_length(v), WEIGHTS), None))
    for extra in (b"\x00" * 64, b" "):
        out.append(({"op": "append", "bytes": extra.hex()}, WEIGHTS, on_bytes(mu.append(extra), WEIGHTS), None))
    return out


def graph_bytes(rng, root) -> list[BMut]:
    return _byte_muts(rng, (root / GRAPH).read_bytes(), GRAPH, 0, 10, 5)


def live_graph_bytes(rng, root) -> list[BMut]:
    """The live graph the packager prepared (what the session runs; loaded without the onnx package)."""
    return _byte_muts(rng, (root / LIVE).read_bytes(), LIVE, 0, 10, 5)


def manifest_bytes(rng, root) -> list[BMut]:
    raw = (root / MANIFEST).read_bytes()
    out = [
        ({"op": "truncate", "length": n}, MANIFEST, on_bytes(mu.truncate(n), MANIFEST), None)
        for n in sorted(rng.sample(range(len(raw)), 4))
    ]
    for label, fn in (
        ("an invalid UTF-8 byte first", lambda b: b"\xff" + b),
        ("a UTF-8 BOM first", lambda b: b"\xef\xbb\xbf" + b),
        ("empty", lambda b: b""),
        ("null", lambda b: b"null"),
        ("a list", lambda b: b"[]"),
    ):
        out.append(({"op": label}, MANIFEST, on_bytes(fn, MANIFEST), None))
    return out


def bundled_adapter(rng, root, n=30) -> list[BMut]:
    """Our adapter file inside adapters/, mutated by a family of the adapter-file fuzzing (read at its switch)."""
    originals = {"b": (root / SHIRA).read_bytes()}
    out = []
    for family in sorted(FILE_FAMILIES):
        muts = FILE_FAMILIES[family](random.Random(f"{rng.random()}"), originals)
        out.extend(({"family": family, **params}, SHIRA, on_bytes(fn, SHIRA), None) for _, params, fn in muts)
    return rng.sample(out, n)


def bundled_lora(rng, root, n=15) -> list[BMut]:
    """The PEFT LoRA directory inside adapters/ mutated (config values, weight file)."""
    config = json.loads((root / LORA / "adapter_config.json").read_text())
    edits = lora_dir_edits(config, (root / LORA / "adapter_model.safetensors").read_bytes())
    return [(params, f"{LORA}/{rel}", on_bytes(fn, f"{LORA}/{rel}"), None) for params, rel, fn in rng.sample(edits, n)]


def _replace_with_dir(rel: str) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        p.mkdir()

    return run


def _remove(rel: str) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return run


def _symlink(rel: str, to: Callable[[Path], Path]) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        p = root / rel
        p.unlink()
        p.symlink_to(to(root))

    return run


def filesystem(rng, root) -> list[BMut]:
    out = []
    removed = (WEIGHTS, GRAPH, LIVE, MANIFEST, SHIRA, f"{LORA}/adapter_config.json")
    removed += (f"{LORA}/adapter_model.safetensors",)
    for rel in removed:
        out.append(({"op": "remove", "file": rel}, rel, _remove(rel), None))
    for rel in (WEIGHTS, GRAPH, LIVE, MANIFEST, SHIRA):
        out.append(({"op": "replaced by a directory", "file": rel}, rel, _replace_with_dir(rel), None))
    for rel in (WEIGHTS, GRAPH, LIVE):
        out.append(({"op": "emptied", "file": rel}, rel, on_bytes(lambda b: b"", rel), None))
    to_copy = lambda r: [_copy_outside(r), _symlink(SHIRA, _outside)(r)]
    out.append(({"op": "symlink to a copy outside the bundle", "file": SHIRA}, SHIRA, to_copy, None))
    out.append(
        ({"op": "dangling symlink", "file": SHIRA}, SHIRA, _symlink(SHIRA, lambda r: r / "adapters" / "nowhere"), None)
    )
    out.append(({"op": "symlink to itself", "file": SHIRA}, SHIRA, _symlink(SHIRA, lambda r: r / SHIRA), None))
    return out


BUNDLE_FAMILIES: dict[str, Callable[[random.Random, Path], list[BMut]]] = {
    f.__name__: f
    for f in (
        manifest_remove,
        manifest_retype,
        manifest_semantic,
        manifest_stale,
        weights_bytes,
        graph_bytes,
        live_graph_bytes,
        manifest_bytes,
        bundled_adapter,
        bundled_lora,
        filesystem,
    )
}
