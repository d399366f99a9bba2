"""The onnxruntime rows of ``benchmarks.switch_latency``: the same adapters and methods on an exported bundle.

- ``shira``: the live-weights session (``Runtime.load(bundle)``), switched in place;
- ``lora_fused``: the honest fused alternative without live weights: fuse B (exact, into the weights) and build
  a new default (prepacked) session over them; the time is both together;
- ``lora_unfused``: a bundle exported with LoRA slots (``export_onnx(..., lora_rank=R)``: an extra
  ``x @ A.T @ B.T`` per linear, factors as live inputs): ``Runtime.switch`` writes the small factors into them,
  inference pays the matmuls.

Switches and inference are timed by ``benchmarks.timing`` exactly as the torch rows are (the same cycles, the same
interleaving with the base), and every row is the same ``benchmarks.switch_rows.Row``.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from shira_runtime import Runtime
from shira_runtime.generate import Sampling, cached_loop
from shira_runtime.kernels.dtypes import BUNDLE
from shira_runtime.kernels.qformats import FORMATS
from shira_runtime.onnx_backend import OnnxBackend
from torch import nn

from benchmarks.common import memory_floor_ms, progress, step, touched_lines
from benchmarks.onnx_live import initializer_graph, session
from benchmarks.switch_rows import Config, Row, inputs, measure, subject
from benchmarks.timing import Subject, cycle


def onnx_unavailable(cfg: Config, dtype: str) -> str | None:
    """Why the onnxruntime rows cannot run for ``dtype`` (None: they can)."""
    if cfg.no_onnx:
        return "--no-onnx given"
    if dtype in FORMATS and dtype != "int8":
        return f"bundles hold int8 bases only (onnxruntime's CPU provider has no {dtype} matmul)"
    if dtype not in BUNDLE and dtype not in FORMATS:
        return f"the exporter writes {'/'.join(BUNDLE)} only (onnxruntime's CPU kernels lack {dtype})"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -e '.[torch]'"
    return None


def export_bundles(model: nn.Module, dtype: str, ctx: dict, workdir: Path) -> None:
    """The two bundles the onnxruntime rows run: ``base`` and ``lora`` (with LoRA slots for ``ctx``'s LoRA)."""
    from shira_runtime.exporters import export_onnx

    example = (torch.zeros(1, 8, dtype=torch.long),)
    la = ctx["lora_a"]
    progress(f"{dtype}: exporting the bundle (onnxruntime rows)")
    export_onnx(model, example, workdir / "base", verify=False, progress=False)
    progress(f"{dtype}: exporting the LoRA-unfused graph variant")
    rank = max(int(a.shape[0]) for a in la.A.values())
    modules = [n.rsplit(".", 1)[0] for n in la.A]
    export_onnx(model, example, workdir / "lora", verify=False, lora_rank=rank, lora_targets=modules, progress=False)


def onnx_rows(cfg: Config, dtype: str, ctx: dict, workdir: Path, noise: dict) -> list[Row]:
    """Rows for the onnxruntime backend over ``export_bundles``' bundles (the torch model need not stay in
    memory). ``ctx``: what the torch rows used (vocab, prompt, shira_a/shira_b, shira_bytes, floor,
    lora_a/lora_b), so that both backends switch the same adapters against the same floor. The switch cycles
    first, then inference and generation of the base, SHiRA and fused LoRA in interleaved rounds (and of the
    base and unfused LoRA, on the variant bundle); ``noise["onnxruntime"]``: how noisy the first rounds were."""
    la, lb = ctx["lora_a"], ctx["lora_b"]
    rt = Runtime.load(workdir / "base")
    one, batch = inputs(cfg, ctx["vocab"], numpy=True)
    ids = ctx["prompt"]
    default_path = initializer_graph(workdir / "base", "default.onnx", gemm_b=True)
    step(f"{dtype}: onnxruntime switches")
    if rt.backend.decoder is not None:
        progress(f"{dtype}: live vs default prepacked session: one decode step, prefill of {cfg.tokens}")
        default = session(default_path, torch.get_num_threads(), shared=rt.backend.arrays)
        ctx["live_vs_prepacked"] = live_vs_prepacked(rt.backend, default, cfg)
        del default

    # shira, switched inside the live session
    rt.add_adapter("shira_a", ctx["shira_a"])
    rt.add_adapter("shira_b", ctx["shira_b"])
    progress(f"{dtype}: shira switch A -> B in the live onnxruntime session, {cfg.repeats} repeats")
    t = cycle([lambda: rt.switch("shira_a"), lambda: rt.switch("shira_b")], cfg.repeats)
    rt.switch(None)
    note = "switched in the live session"
    floor, nbytes = ctx["floor"], ctx["shira_bytes"]
    if rt.backend.scales:  # an int8 bundle: the switch writes the graph's transposed uint8 copies, not the codes
        floor = memory_floor_ms(storage_lines(rt, (ctx["shira_a"], ctx["shira_b"])), ctx["copy_gbps"])
        note += " (the graph's transposed uint8 copies)"
    shira = Row.of("shira", "onnxruntime/live", dtype, t, nbytes, note, None, floor)
    rows = [
        Row.of("base", "onnxruntime/live", dtype, None, 0, "no adapter"),
        replace(shira, mask=ctx.get("shira_mask")),
    ]
    subjects = [
        subject("base", rt, ids, lambda: rt.switch(None)),
        subject("shira", rt, ids, lambda: rt.switch("shira_a")),
    ]

    built: dict = {}  # the adapter fused in, and the session built over it
    if dtype not in FORMATS:  # no fused LoRA on quantized weights (the caller says so in its skipped list)
        # lora fused: no live weights -> fuse, then a new prepacked session over the fused weights
        rt.add_adapter("lora_a", la)
        rt.add_adapter("lora_b", lb)
        arrays = rt.backend.arrays
        reps = max(2, min(3, cfg.repeats // 4))  # each rebuild of llama-1b takes seconds
        progress(f"{dtype}: lora fused on onnxruntime = fuse + rebuild a prepacked session, {reps} repeats")

        def rebuild(name: str):
            def run() -> None:
                rt.switch(name)
                built.update(name=name, session=session(default_path, torch.get_num_threads(), shared=arrays))

            return run

        def drop() -> None:  # untimed: the previous session goes before the next is built
            built.pop("session", None)
            gc.collect()

        t = cycle([rebuild("lora_a"), rebuild("lora_b")], reps, before=drop)
        rt.switch(None)
        rows.append(Row.of("lora_fused", "onnxruntime/rebuild", dtype, t, 0, "fuse + new prepacked session"))
        # the rebuilt session shares the unadapted weights (norms, embeddings) with the live arrays, so it runs
        # with its fused state switched in on them
        gen = None
        if rt.backend.decoder is not None:
            step_fn = session_step(built["session"], rt.backend)
            gen = lambda n: cached_loop(step_fn, ids, None, n, Sampling())
        run = lambda x: built["session"].run(None, rt.backend._feed((x,), {}))
        subjects.append(Subject("lora_fused", lambda: rt.switch(built["name"]), run, gen))

    step(f"{dtype}: onnxruntime inference and generation, {cfg.infer_repeats} interleaved rounds")
    measured, noise["onnxruntime"] = measure(cfg, subjects, one, batch, "onnxruntime")
    rt.switch(None)
    rows = [r.with_measured(measured.get(r.method)) for r in rows]
    rows[0] = replace(rows[0], infer_overhead=1.0)
    built.clear()
    for name in ("lora_a", "lora_b"):  # their saved base copies go before the variant bundle is opened
        if name in rt.adapters:
            rt.remove_adapter(name)
    gc.collect()
    return rows + lora_unfused_rows(cfg, dtype, ctx, workdir, rt, (one, batch))


def lora_unfused_rows(cfg: Config, dtype: str, ctx: dict, workdir: Path, base: Runtime, inputs: tuple) -> list[Row]:
    """The variant graph's LoRA slots are live inputs; a switch writes the factors into them. Inference and
    generation in interleaved rounds with the base bundle's live session (``base``)."""
    la, lb = ctx["lora_a"], ctx["lora_b"]
    ru = Runtime.load(workdir / "lora")
    ru.add_adapter("lora_ua", la, mode="unfused")
    ru.add_adapter("lora_ub", lb, mode="unfused")
    step(f"{dtype}: lora unfused on onnxruntime (factors written into the slots)")
    progress(f"{dtype}: lora unfused on onnxruntime, {cfg.repeats} repeats")
    t = cycle([lambda: ru.switch("lora_ua"), lambda: ru.switch("lora_ub")], cfg.repeats)
    nbytes = sum(v.nbytes for n, v in ru.backend.tensors.items() if ".lora_" in n)
    note = "extra matmuls at inference"
    row = Row.of("lora_unfused", "onnxruntime/slots", dtype, t, nbytes, note)
    ids = ctx["prompt"]
    subjects = [
        subject("base", base, ids, lambda: base.switch(None)),
        subject("lora_unfused", ru, ids, lambda: ru.switch("lora_ua")),
    ]
    measured, _ = measure(cfg, subjects, *inputs, "onnxruntime")
    ru.switch("lora_ua")
    assert np.isfinite(ru(inputs[0])).all()
    return [row.with_measured(measured["lora_unfused"])]


def storage_lines(rt: Runtime, adapters) -> int:
    """64-byte lines of the bundle's own storage that a switch between ``adapters`` touches: at each entry's
    storage index (an int8 weight's entry ``(r, c)`` lives at ``[c, r]`` of its transposed uint8 copy)."""
    touched: dict[str, list[torch.Tensor]] = {}
    for ad in adapters:
        for n in ad.indices:
            t = rt.backend.canonical(n, "benchmark")
            touched.setdefault(t, []).append(ad.flat(n, rt.backend.shapes[t])[0].long())
    lines = 0
    for t, ix in touched.items():
        w = rt.backend.tensors[t]
        sidx = torch.as_tensor(rt.backend.storage_index(t, torch.cat(ix).numpy()))
        lines += touched_lines(sidx.unique(), w.itemsize, w.ctypes.data % 64)
    return lines


def session_step(sess, backend: OnnxBackend):
    """``OnnxBackend.step`` over a plain session ``sess`` of the same graph (weights as initializers): the cache
    goes from run to run as numpy arrays."""
    d, names = backend.decoder, backend.output_names
    pasts = [n for layer in d["cache"] for n in layer[:2]]
    presents = [n for layer in d["cache"] for n in layer[2:]]

    def step(ids: np.ndarray, mask: np.ndarray, cache: dict | None):
        out = dict(zip(names, sess.run(None, backend.step_feed(ids, mask, cache is None) | (cache or {}))))
        return out[d["logits"]][:, -1], dict(zip(pasts, (out[n] for n in presents)))

    return step


def live_vs_prepacked(backend: OnnxBackend, default, cfg: Config) -> dict[str, float]:
    """Live time / default prepacked time (``default``: a session of the same graph with the weights as
    initializers), medians of interleaved rounds, for one decode step (one token after 128 cached ones) and a
    prefill of ``cfg.tokens`` tokens, each on the session the backend picks for it (``benchmarks.decode``)."""
    from benchmarks.decode import phases

    ratios = {}
    for phase, t in phases(backend, default, 128, cfg.tokens, max(5, cfg.infer_repeats)).items():
        ratios[phase] = t["live"].median_ms / t["default"].median_ms
        progress(f"  {phase}: live {t['live'].median_ms:.1f} ms, default {t['default'].median_ms:.1f} ms")
    return ratios
