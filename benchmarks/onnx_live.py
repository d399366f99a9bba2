"""onnxruntime with live weights: inference against a default session, and SHiRA switching against the torch
backend and against rebuilding the session, on one exported graph, in one run.

    python -m benchmarks.onnx_live                       # small preset
    python -m benchmarks.onnx_live --preset llama-1b     # Llama-3.2-1B shapes (5 GB bundle, ~10 GB RAM)
    python -m benchmarks.onnx_live --quick               # tiny preset, few repeats
    python -m benchmarks.onnx_live --alternatives        # also the live mechanisms we did not choose

Sessions compared (the same bundle graph, the same thread count):
- live: ``OnnxBackend`` (weights as graph inputs bound zero-copy, weight-as-GEMM-A rewrite);
- default: the weights as initializers, fully optimized, prepacked: what a plain export gets, its weights
  frozen into onnxruntime's own packed copies. Linears are spelled ``Gemm(X, W, transB=1)`` so onnxruntime
  packs W from its stored layout (its kernels after packing are the same as for ``MatMul(X, W^T)``); the
  initializers are shared with the live backend's arrays (``add_initializer``), so no second raw copy exists;
- ``--alternatives``: the plain graph with its weights read from the file (onnxruntime folds ``Transpose(W)``
  and packs; not on llama-1b: memory), weights as graph inputs fed per run without the rewrite, and shared
  initializers with prepacking and constant folding disabled (with folding on, onnxruntime folds
  ``Transpose(W)`` into its own copy and stops reading ours). The ``live`` column checks each session: writing
  two weights (a matmul weight and a norm) must change its output.
Rebuild: creating a default session over already-fused weights in memory (shared initializers, so no file is
read or copied): a lower bound on what applying an adapter costs without live weights.
Inference medians interleave the sessions round by round, so load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil
import torch
from onnx import TensorProto
from shira_runtime import Runtime, kernels
from shira_runtime.bundle import GRAPH_FILE, WEIGHTS_FILE
from shira_runtime.exporters import export_onnx
from shira_runtime.models import PRESETS, TARGETS, build
from shira_runtime.onnx_backend import GEMM_A_MIN, OnnxBackend, rewrite_linears
from shira_runtime.synthetic import random_shira
from shira_runtime.table import print_table

from benchmarks.common import progress
from benchmarks.timing import cycle, cycles, once

SEQ = 16
BATCHES = (1, 4)  # 16 and 64 tokens


@dataclass(frozen=True)
class Config:
    preset: str
    density: float
    repeats: int
    threads: int
    alternatives: bool
    seed: int = 0


@dataclass
class Row:
    what: str
    how: str
    ms: float
    p90_ms: float
    vs: float | None = None  # ratio to the row's reference
    note: str = ""
    live: str = ""  # inference rows: does the session read writes to our weight buffers?


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


PROBES = ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight")


def reads_live(fn: Callable[[], object], arrays: dict[str, np.ndarray]) -> bool:
    """Whether writing each of ``PROBES`` (then restoring it) changes ``fn()``'s output."""

    def out() -> np.ndarray:
        y = fn()
        return np.asarray(y[0] if isinstance(y, list) else y)

    before = out()
    for name in PROBES:
        a = arrays[name]
        saved = a.copy()
        a[...] = np.where(a == 0.25, -0.25, 0.25).astype(a.dtype)
        try:
            changed = not np.array_equal(out(), before)
        finally:
            a[...] = saved
        if not changed:
            return False
    return True


# -- sessions over the bundle's graph --
def initializer_graph(bundle: Path, name: str, gemm_b: bool) -> Path:
    """``name`` beside the bundle's graph: the weights as initializers, stored as ONNX external data that
    points into ``weights.safetensors`` (nothing is copied on disk). ``gemm_b``: linears as
    ``Gemm(X, W, transB=1)``, which onnxruntime prepacks straight from W; otherwise it folds ``Transpose(W)``
    into a copy first (on llama-1b that transient copy pushes the peak RSS past 17 GB). The transposed uint8 copies
    of an int8 bundle of the ``u8t16`` form (``shira_runtime.exporters.quant_graph``: built by the runtime, not in
    the weights file) are written beside it, ``<name>.u8t.bin``, and become initializers too; bundles of the
    current form store them (initializers like every weight)."""
    from shira_runtime.manifest import Manifest
    from shira_runtime.onnx_backend import u8t_copy

    model = onnx.load(str(bundle / GRAPH_FILE))
    with open(bundle / WEIGHTS_FILE, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    mirrors = Manifest.read(bundle).mirrors()
    side, at = f"{name}.u8t.bin", 0
    with open(bundle / side, "wb") as out:
        for u8t, (codes, (k, m)) in mirrors.items():
            begin, end = header[codes]["data_offsets"]
            a = np.fromfile(bundle / WEIGHTS_FILE, np.int8, end - begin, offset=8 + n + begin).reshape(m, k)
            out.write(np.ascontiguousarray(u8t_copy(a)).tobytes())
            header[u8t] = {"file": side, "data_offsets": [at, at + k * m]}
            at += k * m
    if gemm_b:
        rewrite_linears(model, set(header), GEMM_A_MIN, weight_operand="B")  # as the live session does
    for v in [v for v in model.graph.input if v.name in header]:
        model.graph.input.remove(v)
        begin, end = header[v.name]["data_offsets"]
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        t = TensorProto(name=v.name, data_type=v.type.tensor_type.elem_type, dims=dims)
        t.data_location = TensorProto.EXTERNAL
        where, skip = (header[v.name]["file"], 0) if "file" in header[v.name] else (WEIGHTS_FILE, 8 + n)
        for key, value in (("location", where), ("offset", str(skip + begin)), ("length", str(end - begin))):
            t.external_data.add(key=key, value=value)
        model.graph.initializer.append(t)
    path = bundle / name
    onnx.save(model, str(path))
    return path


def session(
    path: Path | bytes,
    threads: int,
    *,
    shared: dict[str, np.ndarray] | None = None,
    prepack: bool = True,
    disabled: tuple[str, ...] = (),
    spin: bool = False,
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: an int8 bundle's codes, read by no node, would each log a warning
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")  # as the live bundle's
    keep = []
    for name, a in (shared or {}).items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(a))
        opts.add_initializer(name, keep[-1])
    src = str(path) if isinstance(path, Path) else path
    s = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    s._keep = keep  # the OrtValues must outlive the session
    return s


def plain_inputs_graph(bundle: Path) -> bytes:
    return onnx.load(str(bundle / GRAPH_FILE)).SerializeToString()


def inference_rows(cfg: Config, rt: Runtime, bundle: Path, default_path: Path) -> list[Row]:
    """Live vs default (and ``--alternatives``) inference, interleaved, at each batch of ``BATCHES``."""
    rows, arrays = [], rt.backend.arrays
    progress(f"inference: live vs default (prepacked) session, {cfg.repeats} interleaved rounds; RSS {rss_gb():.1f} GB")
    default, ms = once(session, default_path, cfg.threads, shared=arrays)
    progress(f"default session created in {ms:.0f} ms; RSS {rss_gb():.1f} GB")
    sessions = {"default (prepacked initializers)": default}
    if cfg.alternatives:
        plain_path = initializer_graph(bundle, "plain.onnx", gemm_b=False)
        if cfg.preset != "llama-1b":  # its own copy of the weights, and the folded transposes: too big there
            sessions["default, plain graph, weights from file"] = session(plain_path, cfg.threads)
        sessions["inputs, no GEMM-A rewrite"] = session(plain_inputs_graph(bundle), cfg.threads, prepack=False)
        sessions["shared initializers, no prepack"] = session(
            plain_path, cfg.threads, shared=arrays, prepack=False, disabled=("ConstantFolding",)
        )
    for batch in BATCHES:
        ids = np.random.default_rng(batch).integers(0, PRESETS[cfg.preset].vocab, (batch, SEQ), dtype=np.int64)
        ref = default.run(None, {"input_ids": ids})[0]
        assert np.allclose(rt(ids), ref, atol=1e-3 * max(1.0, float(np.abs(ref).max()))), "live != default"
        fns = {"onnxruntime live": lambda ids=ids: rt(ids)}
        for label, s in sessions.items():
            feed = {**arrays, "input_ids": ids} if label.startswith("inputs") else {"input_ids": ids}
            fns[label] = lambda s=s, feed=feed: s.run(None, feed)
        timings = cycles({k: [fn] for k, fn in fns.items()}, cfg.repeats)  # each once per round, interleaved
        base = timings["default (prepacked initializers)"].median_ms
        for label in ["default (prepacked initializers)", "onnxruntime live", *list(sessions)[1:]]:
            t = timings[label]
            note = "reference" if label == "default (prepacked initializers)" else "vs default"
            if label == "onnxruntime live" and batch * SEQ == 64:
                note += " (target <= 1.15)"
            live = "yes" if reads_live(fns[label], arrays) else "NO"
            rows.append(
                Row(f"inference {batch}x{SEQ} tokens", label, t.median_ms, t.p90_ms, t.median_ms / base, note, live)
            )
    return rows


# -- the run --
def run(cfg: Config, workdir: Path) -> list[Row]:
    rows: list[Row] = []
    progress(f"build {cfg.preset} (fp32) and two random SHiRA adapters at density {cfg.density}")
    model = build(cfg.preset, torch.float32, seed=cfg.seed)
    a = random_shira(model, TARGETS, cfg.density, seed=cfg.seed + 1)
    b = random_shira(model, TARGETS, cfg.density, seed=cfg.seed + 2)
    progress("export the bundle")
    example = torch.zeros(1, SEQ, dtype=torch.long)
    bundle, ms = once(export_onnx, model, example, workdir / "bundle", output_names=["logits"], verify=False)
    rows.append(Row("export", "torch.onnx (torchscript) + weights", ms, 0.0))

    rt_torch = Runtime.load(model)
    progress("open the bundle (read + sha256 + probe)")
    # what Runtime.load(bundle) does, threads set
    rt, ms = once(lambda: Runtime(OnnxBackend.open(bundle, threads=cfg.threads)))
    rows.append(Row("open bundle", "read + sha256 + live probe", ms, 0.0))
    for r in (rt_torch, rt):
        r.add_adapter("a", a)
        r.add_adapter("b", b)
    progress(f"switch A -> B, torch backend and live session in turn ({kernels.backend()} kernels), {cfg.repeats}x")
    # A -> B -> A, the two runtimes taking turns at each step
    t = cycles(
        {k: [lambda r=r, n=n: r.switch(n) for n in "ab"] for k, r in (("torch", rt_torch), ("live", rt))}, cfg.repeats
    )
    t_torch, t_live = t["torch"], t["live"]
    rows.append(Row("shira switch A->B", f"torch backend ({kernels.backend()})", t_torch.median_ms, t_torch.p90_ms))
    rows.append(
        Row(
            "shira switch A->B",
            "onnxruntime live",
            t_live.median_ms,
            t_live.p90_ms,
            t_live.median_ms / t_torch.median_ms,
            "vs torch backend (target <= 1.2)",
        )
    )
    # correctness inside the timed case: same bits as the torch backend, same logits
    rt.switch("a")
    rt_torch.switch("a")
    for name, t in rt_torch.backend.tensors.items():
        got = torch.from_numpy(rt.backend.logical(rt.backend.aliases[name]))
        assert torch.equal(got, t), f"{name} differs after the switch"
    ids = torch.randint(0, PRESETS[cfg.preset].vocab, (1, SEQ), generator=torch.Generator().manual_seed(1))
    want = rt_torch(ids).numpy()
    got = rt(ids)
    err = float(np.abs(got - want).max())
    assert err <= 1e-3 * max(1.0, float(np.abs(want).max())), f"live logits differ from torch by {err}"
    rt.switch(None)
    del rt_torch, model, a, b
    gc.collect()

    bundle_arrays = rt.backend.arrays
    default_path = initializer_graph(bundle, "default.onnx", gemm_b=True)
    rows += inference_rows(cfg, rt, bundle, default_path)  # its sessions are gone when it returns
    gc.collect()

    reps = max(2, min(cfg.repeats, 5))
    progress(f"rebuild: a default session over the fused weights, {reps} times; RSS {rss_gb():.1f} GB")
    rt.switch("a")
    built: list = []  # the one session alive; it goes before the next is built

    def rebuild() -> None:
        built[:] = [session(default_path, cfg.threads, shared=bundle_arrays)]

    def drop() -> None:
        built.clear()
        gc.collect()

    t_rebuild = cycle([rebuild], reps, before=drop)
    drop()
    rt.switch(None)
    rows.append(
        Row(
            "apply adapter by rebuild",
            "new default session (shared, prepacked)",
            t_rebuild.median_ms,
            t_rebuild.p90_ms,
            t_rebuild.median_ms / t_live.median_ms,
            "x the live switch (target >= 50 on llama-1b)",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--quick", action="store_true", help="tiny preset, few repeats")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    p.add_argument("--alternatives", action="store_true", help="also time the live mechanisms not chosen")
    p.add_argument("--dir", type=Path, default=None, help="where to write the bundle (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    preset = "tiny" if args.quick else args.preset
    repeats = args.repeats or (5 if args.quick else 7 if preset == "llama-1b" else 21)
    cfg = Config(preset, args.density, repeats, args.threads, args.alternatives)
    print(f"# onnx_live: {cfg}; onnxruntime {ort.__version__}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = run(cfg, Path(tmp))
    print_table(
        ["what", "how", "median ms", "p90 ms", "ratio", "live", "note"],
        [[r.what, r.how, r.ms, r.p90_ms, r.vs, r.live, r.note] for r in rows],
    )
    if args.json:
        args.json.write_text(json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
