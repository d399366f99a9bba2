"""What a device feels running a bundle on the torch-free path (``python -m benchmarks.device``).

1. install: MB on disk of the closure of the base requirements (what ``pip install shira-runtime`` brings) and of
   the closure with the ``torch`` extra, summed over the files each distribution's RECORD lists;
2. cold start to the first token, each run a fresh process, the three paths taking turns round by round:
   ``device`` (``Runtime.load`` + ``generate(max_new_tokens=1)``), ``torch`` (the same after ``import torch``:
   what a bundle cost when the runtime needed torch), ``onnxruntime`` (a plain ``InferenceSession`` of the
   bundle's ``live.onnx`` with default options, the weights memory-mapped with numpy and fed as inputs, the
   argmax of the last logits);
3. memory of one device process: RSS (anonymous / file-backed) and the weight map's private dirty bytes before
   and after load, after the first token, after a switch to a rand-mask and to a block-mask adapter, after each
   ``switch(None)`` and after the token that follows it;
4. two device processes on one bundle, switched to different adapters: their combined PSS against one alone;
5. A -> B switch time on the device path against the memory floor (``benchmarks.common.memory_floor_ms``: the
   distinct 64-byte lines A and B touch, at the bandwidth of a 512 MB numpy copy);
6. decode tokens/s of greedy ``generate`` on the device path, against the same with the weights read into private
   memory (how a bundle was loaded before it was mapped) and with torch imported; the tokens must agree.

Every device-path child runs with an import hook that makes the torch extra's packages fail to import, as on a
device without them; the run also records whether a child without the hook imports torch. Table on stdout,
progress on stderr, ``--json PATH`` for everything.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata as md
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from shira_runtime.table import print_table

from benchmarks.common import Steps, memory_floor_ms, progress, step

REPO = Path(__file__).resolve().parents[1]
DIST, EXTRA = "shira-runtime", "torch"
BLOCKED = ("torch", "onnx", "onnxscript", "tqdm")  # the import names of the torch extra
ADAPTERS = {"rand_a": ("rand", 1), "rand_b": ("rand", 2), "block_a": ("block", 3), "block_b": ("block", 4)}
DENSITY = 0.01
PROMPT = [(37 * i + 5) % 256 for i in range(16)]  # token ids every base's vocabulary holds
PAGE = 4096
PHASES = ("python", "imports", "load", "first token")  # of a cold start: between the child's time stamps

# -- the children: `python -c CODE bundle ...` from the repository root; the last stdout line is JSON --
NO_TORCH = f"""
import sys
class _NoTorchExtra:  # a device without the torch extra: its imports fail
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: a device)", name=name)
sys.meta_path.insert(0, _NoTorchExtra())
"""
FIRST_TOKEN = f"""
import time
T = {{"start": time.time()}}
PRE
import json, sys
import numpy as np
from shira_runtime import Runtime
T["import"] = time.time()
rt = Runtime.load(sys.argv[1])
T["load"] = time.time()
token = int(np.asarray(rt.generate(np.array([{PROMPT}]), max_new_tokens=1))[0, -1])
T["token"] = time.time()
print(json.dumps({{"t": T, "token": token, "torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules}}))
"""
DEVICE = NO_TORCH + FIRST_TOKEN.replace("PRE", "") + "assert not {'torch', 'onnx'} & set(sys.modules)\n"
TORCH = FIRST_TOKEN.replace("PRE", "import torch")
ORT = f"""
import time
T = {{"start": time.time()}}
import json, struct, sys
import numpy as np
import onnxruntime as ort
T["import"] = time.time()
b = sys.argv[1]
man = json.load(open(b + "/manifest.json"))
sess = ort.InferenceSession(b + "/" + (man.get("live") or {{}}).get("graph", man["graph"]))  # default options
path = b + "/" + man["weights"]
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
mm = np.memmap(path, np.uint8, "r")
DT = {{"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I64": np.int64}}
weights = {{k: mm[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]].view(DT[v["dtype"]]).reshape(v["shape"])
           for k, v in header.items() if k != "__metadata__"}}
T["load"] = time.time()
spec = {{i["name"]: i for i in man["inputs"]}}
d = man.get("decoder") or {{}}
ids = np.array([{PROMPT}], np.int64)
seq = ids.shape[1]
feed = {{d.get("input_ids", man["inputs"][0]["name"]): ids}}
if d:
    feed[d["attention_mask"]] = np.ones((1, seq), spec[d["attention_mask"]]["dtype"])
    if d.get("position_ids"):
        feed[d["position_ids"]] = np.arange(seq, dtype=spec[d["position_ids"]]["dtype"])[None]
    if d.get("logits_to_keep"):
        feed[d["logits_to_keep"]] = np.array([seq - 1], spec[d["logits_to_keep"]]["dtype"])
    for layer in d["cache"]:
        for name in layer[:2]:  # an empty past: sequence length 0
            _, heads, _, dim = spec[name]["shape"]
            feed[name] = np.zeros((1, heads, 0, dim), spec[name]["dtype"])
feed |= {{i.name: weights[i.name] for i in sess.get_inputs() if i.name in weights}}
missing = [i.name for i in sess.get_inputs() if i.name not in feed]
assert not missing, f"inputs the plain session was not fed: {{missing}}"
token = int(sess.run([d.get("logits", man["outputs"][0]["name"])], feed)[0][0, -1].argmax())
T["token"] = time.time()
print(json.dumps({{"t": T, "token": token}}))
"""
MEM = """
import json, os, psutil
def mem(weights):  # RSS (anonymous / file), USS, PSS; the weight map's resident, proportional, private dirty bytes
    p = psutil.Process()
    full = p.memory_full_info()
    out = {"rss": full.rss, "uss": full.uss, "pss": getattr(full, "pss", None)}
    try:
        with open("/proc/self/status") as f:
            st = dict(line.split(":", 1) for line in f)
        out |= {"anon": int(st["RssAnon"].split()[0]) << 10, "file": int(st["RssFile"].split()[0]) << 10}
        out |= next({"map_rss": m.rss, "map_pss": m.pss, "map_dirty": m.private_dirty}
                    for m in p.memory_maps() if m.path == weights)
    except (OSError, KeyError, AttributeError, StopIteration):
        pass
    return out
"""
MEMORY = f"""{NO_TORCH}{MEM}
import gc, time
import numpy as np
from shira_runtime import Runtime
weights, rows = os.path.realpath(sys.argv[2]), []
def mark(step, stats=None):
    gc.collect()
    rows.append({{"step": step, **mem(weights), **({{"bytes_touched": stats.bytes_touched}} if stats else {{}})}})
ids = np.array([{PROMPT}])
mark("imports: shira_runtime")
import onnxruntime
mark("imports: + onnxruntime")
rt = Runtime.load(sys.argv[1])
mark("after Runtime.load")
rt.generate(ids, max_new_tokens=1)
mark("after the first token")
rt.switch(sys.argv[3])  # one-time work of the first switch cycle: the live-weights probe (before the first
rt.generate(ids, max_new_tokens=2)  # inference after a write) and the one-token session (at the first step)
rt.switch(None)
rt.generate(ids, max_new_tokens=1)
mark("after a first switch cycle (one-time: probe, one-token session)")
for name in sys.argv[3:]:
    mark(f"after switch({{name!r}})", rt.switch(name))
    mark("after switch(None)", rt.switch(None))
    rt.generate(ids, max_new_tokens=1)
    mark("after switch(None) + a token")
t = time.perf_counter()
rt.backend.check_live()
print(json.dumps({{"mapped": rt.backend.mapped, "rows": rows, "probe_ms": (time.perf_counter() - t) * 1e3}}))
"""
SERVE = f"""{NO_TORCH}{MEM}
import numpy as np
from shira_runtime import Runtime
weights = os.path.realpath(sys.argv[2])
for line in sys.stdin:  # one command a line, one JSON reply a line
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "load":
        rt = Runtime.load(sys.argv[1])
        rt.generate(np.array([{PROMPT}]), max_new_tokens=1)
    elif cmd == "switch":
        rt.switch(arg or None)
    print(json.dumps(mem(weights)), flush=True)
"""
SWITCH = f"""{NO_TORCH}
import json
import numpy as np
from benchmarks.timing import cycle, time_ms
nbytes = 512 << 20
src = np.ones(nbytes // 4, np.float32)
dst = np.empty_like(src)
copy = time_ms(lambda: np.copyto(dst, src), 5)
del src, dst
from shira_runtime import Runtime
rt = Runtime.load(sys.argv[1])
rt.generate(np.array([{PROMPT}]), max_new_tokens=1)
repeats, out = int(sys.argv[2]), {{"copy_gbps": 2 * nbytes / (copy.median_ms * 1e-3) / 1e9, "pairs": {{}}}}
for pair in sys.argv[3:]:
    a, b = pair.split(",")
    t = cycle([lambda: rt.switch(a), lambda: rt.switch(b)], repeats)
    rt.switch(a)
    s = rt.switch(b)
    rt.switch(None)
    out["pairs"][pair] = {{"median_ms": t.median_ms, "p90_ms": t.p90_ms, "runs": t.runs, "kernels": s.kernels,
                          "elements_written": s.elements_written}}
print(json.dumps(out))
"""
DECODE = f"""
PRE
import json, sys, time
import numpy as np
from shira_runtime import Runtime
if sys.argv[2] == "private":  # the weights read into private memory, as a bundle was loaded before the map
    import shira_runtime.onnx_backend as ob
    from shira_runtime.bundle import read_weights
    ob.map_weights = lambda path, storage, sha256, background=False: read_weights(path, storage, sha256)
rt = Runtime.load(sys.argv[1])
ids, n = np.array([{PROMPT}]), int(sys.argv[3])
rt.generate(ids, max_new_tokens=2)  # the one-time work: pages, the one-token session
tps = []
for _ in range(3):
    t = time.perf_counter()
    out = np.asarray(rt.generate(ids, max_new_tokens=n))
    tps.append(n / (time.perf_counter() - t))
print(json.dumps({{"tps": tps, "tokens": out[0, -n:].tolist(), "mapped": rt.backend.mapped}}))
"""
DECODE_PATHS = {  # name: (import prefix, weights)
    "device": (NO_TORCH, "mapped"),
    "device, weights read (before #20)": (NO_TORCH, "private"),
    "torch imported": ("import torch", "mapped"),
}


def child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter and return its last stdout line's JSON; raise with its stderr if it fails."""
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"child failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- 1. install size --
def root_requirements() -> tuple[list[str], dict[str, list[str]], str]:
    """This package's base requirements and extras: from the checkout's pyproject.toml where it runs from one (an
    editable install's metadata keeps the requirements of the day it was installed), else the installed ones."""
    pyproject = REPO / "pyproject.toml"
    if pyproject.is_file() and sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads(pyproject.read_text())["project"]
        return project["dependencies"], project.get("optional-dependencies", {}), str(pyproject.relative_to(REPO))
    dist = md.distribution(DIST)
    base, extras = [], {}
    for s in dist.requires or []:
        r = Requirement(s)
        extras_of = dist.metadata.get_all("Provides-Extra") or []
        named = [e for e in extras_of if r.marker and r.marker.evaluate({"extra": e})]
        for e in named:
            extras.setdefault(e, []).append(s)
        if not named:
            base.append(s)
    return base, extras, f"the installed metadata of {DIST}"


def closure(roots: list[str]) -> tuple[dict[str, md.Distribution], list[str]]:
    """The installed distributions ``roots`` need, following each one's requirements (with the extras asked of
    it) recursively and skipping those whose markers do not hold; and the names not installed."""
    found: dict[str, md.Distribution] = {}
    asked: dict[str, set[str]] = {}
    missing: set[str] = set()
    todo = [Requirement(s) for s in roots]
    while todo:
        r = todo.pop()
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(r.name)
        if name in asked and r.extras <= asked[name]:
            continue
        asked[name] = asked.get(name, set()) | set(r.extras)
        try:
            found[name] = dist = found.get(name) or md.distribution(name)
        except md.PackageNotFoundError:
            missing.add(name)
            continue
        if name == DIST:  # its requirements are the roots (``root_requirements``), not necessarily its metadata's
            continue
        for s in dist.requires or []:
            req = Requirement(s)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *asked[name])):
                todo.append(Requirement(s.split(";")[0]))  # its marker holds here
    return found, sorted(missing)


def dist_bytes(dist: md.Distribution) -> int:
    """Bytes of the files its RECORD lists (paths relative to ``dist.locate_file('')``); an editable install of
    this package lists none of its own, so its package folder is counted instead (what a wheel would carry)."""
    root = Path(dist.locate_file(""))
    total = sum((root / f).stat().st_size for f in dist.files or [] if (root / f).is_file())
    if canonicalize_name(dist.metadata["Name"]) == DIST and '"editable"' in (dist.read_text("direct_url.json") or ""):
        import shira_runtime

        files = (p for d in shira_runtime.__path__ for p in Path(d).rglob("*") if "__pycache__" not in p.parts)
        total += sum(p.stat().st_size for p in files if p.is_file())
    return total


def install_sizes() -> dict:
    base, extras, source = root_requirements()
    device, missing = closure([DIST, *base])
    full, missing_t = closure([DIST, *base, *extras.get(EXTRA, [])])
    mb = {n: dist_bytes(d) / 1e6 for n, d in full.items()}
    return {
        "requirements_from": source,
        "device_mb": sum(mb[n] for n in device),
        "torch_mb": sum(mb.values()),
        "packages": {n: {"mb": v, "device": n in device} for n, v in sorted(mb.items(), key=lambda kv: -kv[1])},
        "missing": sorted(set(missing) | set(missing_t)),
    }


# -- the bundle, and what its adapters touch --
def bundle_for(base: str, work: Path, rebuild: bool) -> Path:
    """The bundle of ``base`` with the four adapters of ``ADAPTERS``, packaged once into ``work/bundle``."""
    out = work / "bundle"
    if (out / "manifest.json").is_file() and not rebuild:
        progress(f"reusing the bundle {out}")
        return out
    from shira_runtime.exporters.package import package
    from shira_runtime.models import TARGETS, load_base
    from shira_runtime.synthetic import random_shira

    progress(f"loading the base {base}")
    model = load_base(base)
    adapters = {}
    for name, (mask, seed) in ADAPTERS.items():
        progress(f"making adapter {name}: {mask} mask, density {DENSITY}")
        adapters[name] = random_shira(model, TARGETS, DENSITY, seed=seed, mask=mask)
    progress(f"packaging {out} (minutes for the larger bases)")
    package(model, out, adapters, quiet=True, overwrite=True, progress=True)
    return out


def weights_file(bundle: Path) -> Path:
    return bundle / json.loads((bundle / "manifest.json").read_text())["weights"]


def touched(bundle: Path, names: tuple[str, ...]) -> tuple[int, int, int]:
    """Distinct 64-byte lines and 4 KiB pages of the weight file (hence of its page-aligned map) that adapters
    ``names`` write (a switch A -> B reads and writes their union), and the bytes of the adapters' own streams
    that the switch reads and writes besides (``benchmarks.switch_latency``'s count: per entry the saved value
    twice, an fp32 delta and the int32 index twice). Indices from the adapter files, counted in numpy."""
    from shira_runtime.adapters import load_adapter

    manifest = json.loads((bundle / "manifest.json").read_text())
    with open(weights_file(bundle), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    item = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}
    offsets: list[np.ndarray] = []  # byte offsets in the file of every element written
    streams = 0
    for name in names:
        ad = load_adapter(bundle / manifest["adapters"][name]["path"])
        for t in ad.indices:
            p = manifest["parameters"][t]
            idx = np.asarray(ad.flat(t, tuple(p["shape"]))[0], np.int64)
            if p["layout"] == "transposed":  # entry (r, c) is stored at [c, r]
                rows, cols = p["shape"]
                idx = (idx % cols) * rows + idx // cols
            h = header[p["onnx"]]
            offsets.append(8 + n + h["data_offsets"][0] + idx * item[h["dtype"]])
            streams += idx.size * (2 * item[h["dtype"]] + 4 + 2 * 4)
    at = np.concatenate(offsets)
    return np.unique(at // 64).size, np.unique(at // PAGE).size, streams // 2  # half of the A -> B -> A cycle


# -- 2-5 --
def cold_starts(bundle: Path, repeats: int) -> dict:
    """Median ms from just before ``Popen`` to the child's first token, the paths taking turns each round (the
    order rotating), after one untimed run of each: the page cache and .pyc files are warm (an app's second start,
    not the first after a boot). Also the median of each phase: interpreter start, imports, load, first token."""
    paths = {"device": DEVICE, "torch": TORCH, "onnxruntime": ORT}
    total: dict[str, list[float]] = {k: [] for k in paths}
    phases: dict[str, dict[str, list[float]]] = {k: {} for k in paths}
    tokens: dict[str, set[int]] = {k: set() for k in paths}
    names = list(paths)
    for r in range(repeats + 1):
        for k in names[r % 3 :] + names[: r % 3]:
            t0 = time.time()
            out = child(paths[k], str(bundle))
            tokens[k].add(out["token"])
            if r:
                t = out["t"]
                total[k].append((t["token"] - t0) * 1e3)
                stamps = [t0, t["start"], t["import"], t["load"], t["token"]]
                for label, a, b in zip(PHASES, stamps, stamps[1:]):
                    phases[k].setdefault(label, []).append((b - a) * 1e3)
        if r:
            progress(f"cold start round {r}/{repeats}: " + ", ".join(f"{k} {total[k][-1]:.0f} ms" for k in names))
    if tokens["device"] != tokens["torch"]:
        raise AssertionError(f"the device and torch paths chose different first tokens: {tokens}")
    med = {k: statistics.median(v) for k, v in total.items()}
    plain = child(FIRST_TOKEN.replace("PRE", ""), str(bundle))  # no hook: does it import torch where installed?
    return {
        "median_ms": med,
        "samples_ms": total,
        "phases_ms": {k: {p: statistics.median(v) for p, v in ph.items()} for k, ph in phases.items()},
        "tokens": {k: sorted(v) for k, v in tokens.items()},
        "device_over_torch": med["device"] / med["torch"],
        "device_over_onnxruntime": med["device"] / med["onnxruntime"],
        "without_the_hook_imports_torch": plain["torch"],
        "sha256_ms": sha256_ms(weights_file(bundle)),
    }


def sha256_ms(path: Path) -> float:
    """The weight file's sha256 as load computes it (``read`` into one 1 MiB buffer), page cache warm: ms."""
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    t = time.perf_counter()
    with open(path, "rb") as f:
        while got := f.readinto(buf):
            h.update(memoryview(buf)[:got])
    return (time.perf_counter() - t) * 1e3


def decode(bundle: Path, rounds: int, tokens: int) -> dict:
    """Greedy ``generate`` of ``tokens`` new tokens after the 16-token prompt (prefill included), tokens/s: each
    path in its own process, the paths taking turns for ``rounds`` rounds, 3 timed runs in each; median of all."""
    tps: dict[str, list[float]] = {k: [] for k in DECODE_PATHS}
    outs: dict[str, list] = {}
    for r in range(rounds):
        for k, (pre, weights) in DECODE_PATHS.items():
            out = child(DECODE.replace("PRE", pre), str(bundle), weights, str(tokens))
            tps[k] += out["tps"]
            outs.setdefault(k, out["tokens"])
            if out["tokens"] != outs[k] or out["tokens"] != outs["device"]:
                raise AssertionError(f"decode: path {k!r} generated other tokens: {out['tokens']} vs {outs}")
        progress(f"decode round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in tps.items()))
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "tokens": tokens,
        "median_tps": med,
        "samples_tps": tps,
        "vs_device": {k: v / med["device"] for k, v in med.items()},
    }


def two_processes(bundle: Path, a: str, b: str) -> dict:
    """One device process loaded, its first token run and switched to ``a``; then a second, switched to ``b``:
    the first one's memory alone, then both's (Linux smaps through psutil)."""
    procs = []

    def ask(p: subprocess.Popen, cmd: str) -> dict:
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            p.stderr.seek(0)
            raise RuntimeError(f"the serving child died after {cmd!r}:\n{p.stderr.read()[-3000:]}")
        return json.loads(line)

    args = [sys.executable, "-c", SERVE, str(bundle), str(weights_file(bundle))]
    alone: dict = {}
    try:
        for name in (a, b):
            err = tempfile.TemporaryFile("w+")
            procs.append(
                subprocess.Popen(args, cwd=REPO, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            )
            ask(procs[-1], "load")
            state = ask(procs[-1], f"switch {name}")
            alone = alone or state
        both = [ask(p, "mem") for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
    if alone["pss"] is None:
        return {"ratio": None, "note": "no PSS on this platform"}
    combined = sum(m["pss"] for m in both)
    return {"one": alone, "two": both, "combined_pss": combined, "ratio": combined / alone["pss"]}


def run(base: str, work: Path, repeats: int, switches: int, rebuild: bool) -> dict:
    with Steps(7, "device"):
        step("install sizes")
        install = install_sizes()
        step("bundle")
        bundle = bundle_for(base, work, rebuild)
        weights = weights_file(bundle)
        step(f"cold start, {repeats} rounds")
        cold = cold_starts(bundle, repeats)
        step("memory of one device process")
        memory = child(MEMORY, str(bundle), str(weights), "rand_a", "block_a")
        for row in memory["rows"]:
            if row["step"].startswith("after switch('"):
                name = row["step"].split("'")[1]
                row["pages_written"] = touched(bundle, (name,))[1]
        step("two processes on one bundle")
        pss = {mask: two_processes(bundle, f"{mask}_a", f"{mask}_b") for mask in ("rand", "block")}
        step(f"switches A -> B, {switches} each")
        sw = child(SWITCH, str(bundle), str(switches), "rand_a,rand_b", "block_a,block_b")
        for pair, row in sw["pairs"].items():
            row["lines"], row["pages"], streams = touched(bundle, tuple(pair.split(",")))
            row["floor_ms"] = memory_floor_ms(row["lines"], sw["copy_gbps"])
            row["streams_floor_ms"] = row["floor_ms"] + streams / (sw["copy_gbps"] * 1e9) * 1e3
            row["streams_floor_ratio"] = row["median_ms"] / row["streams_floor_ms"]
            row["floor_ratio"] = row["median_ms"] / row["floor_ms"]
        step("decode tokens/s")
        dec = decode(bundle, 3, 32)
    return {
        "decode": dec,
        "install": install,
        "bundle": str(bundle),
        "weight_bytes": weights.stat().st_size,
        "cold_start": cold,
        "memory": memory,
        "two_processes": pss,
        "switch": sw,
    }


def goals(r: dict) -> list[list[object]]:
    """Each goal of issue #20 this benchmark measures: the goal, its target, the measurement, the verdict."""
    rows = {x["step"]: x for x in r["memory"]["rows"]}
    seq = r["memory"]["rows"]
    load = (rows["after Runtime.load"]["rss"] - rows["imports: + onnxruntime"]["rss"]) / r["weight_bytes"]
    c, pss, sw = r["cold_start"], r["two_processes"], r["switch"]["pairs"]
    out = [
        ["device install (MB)", "<= 130", r["install"]["device_mb"], r["install"]["device_mb"] <= 130],
        ["cold start: device / torch", "<= 0.5", c["device_over_torch"], c["device_over_torch"] <= 0.5],
        [
            "cold start: device / onnxruntime",
            "<= 1.2",
            c["device_over_onnxruntime"],
            c["device_over_onnxruntime"] <= 1.2,
        ],
        ["RSS added by Runtime.load / weight bytes", "<= 0.10", load, load <= 0.10],
    ]
    for i, x in enumerate(seq):  # each switch against the state just before it
        if x["step"] == "after switch(None) + a token":
            before, mask = seq[i - 3], seq[i - 2]["step"].split("'")[1].split("_")[0]
            d = (x["rss"] - before["rss"]) / before["rss"]
            out.append(
                [f"RSS after switch(None) + a token vs before the switch, {mask}", "within 2%", d, abs(d) <= 0.02]
            )
    for mask, limit in (("rand", 1.2), ("block", 1.05)):
        ratio = pss[mask]["ratio"]
        out.append([f"two processes' PSS / one's, {mask}", f"<= {limit}", ratio, ratio is not None and ratio <= limit])
    for pair, row in sw.items():
        out.append(
            [f"switch {pair.replace(',', ' -> ')} / floor", "<= 1.1", row["floor_ratio"], row["floor_ratio"] <= 1.1]
        )
    ratio = r["decode"]["vs_device"]["device, weights read (before #20)"]
    out.append(["decode tokens/s: weights read / mapped", "equal (0.95-1.05)", ratio, 0.95 <= ratio <= 1.05])
    return [[g, t, m, "met" if ok else "NOT met"] for g, t, m, ok in out]


def report(r: dict) -> None:
    mb, w = 1e6, r["weight_bytes"]
    i = r["install"]
    print(f"\n## install (requirements from {i['requirements_from']})")
    print_table(
        ["package", "MB", "needed by"],
        [[n, p["mb"], "device" if p["device"] else f"[{EXTRA}] extra"] for n, p in i["packages"].items()],
    )
    print(
        f"device: {i['device_mb']:.0f} MB; with the {EXTRA} extra: {i['torch_mb']:.0f} MB"
        + (f"; not installed: {i['missing']}" if i["missing"] else "")
    )
    c = r["cold_start"]
    print(
        f"\n## cold start to the first token (median of {len(c['samples_ms']['device'])} fresh processes, warm cache)"
    )
    print_table(
        ["path", "median ms", "min", "max", "python", "imports", "load", "first token", "token"],
        [
            [k, v, min(c["samples_ms"][k]), max(c["samples_ms"][k]), *c["phases_ms"][k].values(), c["tokens"][k]]
            for k, v in c["median_ms"].items()
        ],
    )
    print(
        f"device / torch {c['device_over_torch']:.2f}x, device / onnxruntime {c['device_over_onnxruntime']:.2f}x; "
        f"without the hook, the device path imports torch: {c['without_the_hook_imports_torch']}; the weight "
        f"file's sha256 (in load), warm: {c['sha256_ms']:.0f} ms"
    )
    m = r["memory"]
    print(
        f"\n## memory of one device process (weight file {w / mb:.1f} MB, mapped: {m['mapped']}; "
        f"the live-weights probe, warm: {m['probe_ms']:.0f} ms)"
    )
    print_table(
        ["step", "RSS MB", "/ weights", "anon MB", "file MB", "map dirty MB", "pages written MB"],
        [
            [
                x["step"],
                x["rss"] / mb,
                x["rss"] / w,
                x.get("anon", 0) / mb,
                x.get("file", 0) / mb,
                x.get("map_dirty", 0) / mb,
                x["pages_written"] * PAGE / mb if "pages_written" in x else None,
            ]
            for x in m["rows"]
        ],
    )
    print("\n## two device processes on one bundle, switched to different adapters (PSS)")
    print_table(
        ["masks", "one MB", "two MB", "ratio", "map dirty MB (each)", "USS MB (each)"],
        [
            [
                k,
                v["one"]["pss"] / mb,
                v["combined_pss"] / mb,
                v["ratio"],
                " / ".join(f"{x.get('map_dirty', 0) / mb:.1f}" for x in v["two"]),
                " / ".join(f"{x['uss'] / mb:.0f}" for x in v["two"]),
            ]
            for k, v in r["two_processes"].items()
            if v["ratio"] is not None
        ],
    )
    s = r["switch"]
    print(
        f"\n## switch A -> B on the device path (floor: lines x 64 B x 2 at {s['copy_gbps']:.1f} GB/s, a 512 MB "
        "numpy copy)"
    )
    print_table(
        [
            "switch",
            "median ms",
            "p90 ms",
            "floor ms",
            "x floor",
            "+ streams ms",
            "x",
            "lines",
            "pages",
            "elements",
            "kernels",
        ],
        [
            [
                k.replace(",", " -> "),
                v["median_ms"],
                v["p90_ms"],
                v["floor_ms"],
                v["floor_ratio"],
                v["streams_floor_ms"],
                v["streams_floor_ratio"],
                v["lines"],
                v["pages"],
                v["elements_written"],
                v["kernels"],
            ]
            for k, v in s["pairs"].items()
        ],
    )
    d = r["decode"]
    print(f"\n## decode: greedy generate of {d['tokens']} tokens after a 16-token prompt (prefill included)")
    print_table(
        ["path", "median tok/s", "min", "max", "/ device"],
        [
            [k, v, min(d["samples_tps"][k]), max(d["samples_tps"][k]), d["vs_device"][k]]
            for k, v in d["median_tps"].items()
        ],
    )
    print("\n## against the goals of issue #20")
    print_table(["goal", "target", "measured", "verdict"], r["goals"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__.split("\n")[0])
    p.add_argument(
        "--base",
        default=None,
        help="a preset (tiny, small, medium, llama-1b), smollm2, or a transformers model directory (default: smollm2)",
    )
    p.add_argument("--quick", action="store_true", help="the tiny preset, 2 rounds, 10 switches (seconds)")
    p.add_argument("--repeats", type=int, default=None, help="cold-start rounds (default 5; --quick 2)")
    p.add_argument("--switches", type=int, default=None, help="timed switches per pair (default 50; --quick 10)")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where the bundle is cached (default "
        "~/.cache/shira_runtime/bench/device/<base>; reused when its manifest exists)",
    )
    p.add_argument("--rebuild", action="store_true", help="package the bundle again")
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    args = p.parse_args(argv)
    base = args.base or ("tiny" if args.quick else "smollm2")
    repeats = args.repeats or (2 if args.quick else 5)
    switches = args.switches or (10 if args.quick else 50)
    work = args.work or Path.home() / ".cache" / "shira_runtime" / "bench" / "device" / Path(base).name
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    r = run(base, work, repeats, switches, args.rebuild)
    r["goals"] = goals(r)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((x.split(":", 1)[1].strip() for x in lscpu.splitlines() if x.startswith("Model name")), "?")
    r["meta"] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.device", *(sys.argv[1:] if argv is None else argv)]),
        "base": base,
        "repeats": repeats,
        "switches": switches,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "commit": git.stdout.strip() or "?",
        "python": platform.python_version(),
        "onnxruntime": md.version("onnxruntime"),
    }
    print(f"# device: base {base}, bundle {r['bundle']}; {cpu} x{os.cpu_count()}; {r['meta']['date']}")
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
