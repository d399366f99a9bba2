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

from benchmarks.common import memory_floor_ms, progress, touched_lines
from benchmarks.onnx_live import initializer_graph, session
from benchmarks.switch_rows import Config, Row, gen_timing, inference
from benchmarks.timing import cycle, generation


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
        return f"not installed ({exc.name}); pip install -e '.[onnx]'"
    return None


def export_bundles(model: nn.Module, dtype: str, ctx: dict, workdir: Path) -> None:
    """The two bundles the onnxruntime rows run: ``base`` and ``lora`` (with LoRA slots for ``ctx``'s LoRA)."""
    from shira_runtime.exporters import export_onnx

    example = (torch.zeros(1, 8, dtype=torch.long),)
    la = ctx["lora_a"]
    progress(f"{dtype}: exporting the bundle (onnxruntime rows)")
    export_onnx(model, example, workdir / "base", verify=False)
    progress(f"{dtype}: exporting the LoRA-unfused graph variant")
    rank = max(int(a.shape[0]) for a in la.A.values())
    modules = [n.rsplit(".", 1)[0] for n in la.A]
    export_onnx(model, example, workdir / "lora", verify=False, lora_rank=rank, lora_targets=modules)


def onnx_rows(cfg: Config, dtype: str, ctx: dict, workdir: Path) -> list[Row]:
    """Rows for the onnxruntime backend over ``export_bundles``' bundles (the torch model need not stay in
    memory). ``ctx``: what the torch rows used (vocab, prompt, shira_a/shira_b, shira_bytes, floor,
    lora_a/lora_b), so that both backends switch the same adapters against the same floor."""
    la, lb = ctx["lora_a"], ctx["lora_b"]
    rt = Runtime.load(workdir / "base")
    infer = inference(cfg, rt, ctx["vocab"], numpy=True)
    progress(f"{dtype}: base inference on the live onnxruntime session, {cfg.infer_repeats} repeats")
    base = Row.of("base", "onnxruntime/live", dtype, None, 0, "no adapter", infer.measure().as_base())
    rows = [base.with_gen(gen_timing(cfg, rt, ctx["prompt"], None))]
    default_path = initializer_graph(workdir / "base", "default.onnx", gemm_b=True)
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
    inf = infer.measure("shira_a")
    gen = gen_timing(cfg, rt, ctx["prompt"], "shira_a")
    note = "switched in the live session"
    floor, nbytes = ctx["floor"], ctx["shira_bytes"]
    if rt.backend.mirrors:  # an int8 bundle: the kernel also writes the graph's transposed uint8 copy
        lines, entries = mirror_lines(rt, (ctx["shira_a"], ctx["shira_b"]))
        floor += memory_floor_ms(lines, ctx["copy_gbps"])
        nbytes += entries
        note += " (codes + the graph's transposed uint8 copy)"
    shira = Row.of("shira", "onnxruntime/live", dtype, t, nbytes, note, inf, floor)
    shira = replace(shira, mask=ctx.get("shira_mask"))
    rows.append(shira.with_gen(gen))

    if dtype in FORMATS:  # no fused LoRA on quantized weights (the caller says so in its skipped list)
        rt.switch(None)
        rt.remove_adapter("shira_a")
        rt.remove_adapter("shira_b")
        return rows + lora_unfused_rows(cfg, dtype, ctx, workdir, infer)
    # lora fused: no live weights -> fuse, then a new prepacked session over the fused weights
    rt.add_adapter("lora_a", la)
    rt.add_adapter("lora_b", lb)
    arrays = rt.backend.arrays
    reps = max(2, min(3, cfg.repeats // 4))  # each rebuild of llama-1b takes seconds
    progress(f"{dtype}: lora fused on onnxruntime = fuse + rebuild a prepacked session, {reps} repeats")
    built: dict = {}  # the adapter fused in, and the session built over it

    def rebuild(name: str):
        def step() -> None:
            rt.switch(name)
            built.update(name=name, session=session(default_path, torch.get_num_threads(), shared=arrays))

        return step

    def drop() -> None:  # untimed: the previous session goes before the next is built
        built.pop("session", None)
        gc.collect()

    t = cycle([rebuild("lora_a"), rebuild("lora_b")], reps, before=drop)
    # the rebuilt session shares the unadapted weights (norms, embeddings) with the live arrays, so it runs with
    # its fused state switched back in, against the live session's base, in one block each (as on torch)
    inf = infer.measure(built["name"], run=lambda x: built["session"].run(None, rt.backend._feed((x,), {})), rounds=1)
    gen = None
    if rt.backend.decoder is not None:  # generation on the rebuilt session, its fused state switched back in
        progress(f"  generation on the rebuilt session: prompt {cfg.tokens}, 1 + {cfg.new_tokens} tokens")
        rt.switch(built["name"])
        step = session_step(built["session"], rt.backend)
        gen = generation(
            lambda n: cached_loop(step, ctx["prompt"], None, n, Sampling()), cfg.new_tokens, cfg.gen_repeats
        )
        rt.switch(None)
    note = "fuse + new prepacked session"
    rows.append(Row.of("lora_fused", "onnxruntime/rebuild", dtype, t, 0, note, inf).with_gen(gen))
    for name in ("lora_a", "lora_b"):  # their saved base copies go before the variant bundle is opened
        rt.remove_adapter(name)
    drop()

    return rows + lora_unfused_rows(cfg, dtype, ctx, workdir, infer)


def lora_unfused_rows(cfg: Config, dtype: str, ctx: dict, workdir: Path, infer) -> list[Row]:
    """The variant graph's LoRA slots are live inputs; a switch writes the factors into them."""
    la, lb = ctx["lora_a"], ctx["lora_b"]
    ru = Runtime.load(workdir / "lora")
    ru.add_adapter("lora_ua", la, mode="unfused")
    ru.add_adapter("lora_ub", lb, mode="unfused")
    progress(f"{dtype}: lora unfused on onnxruntime (factors written into the slots), {cfg.repeats} repeats")
    t = cycle([lambda: ru.switch("lora_ua"), lambda: ru.switch("lora_ub")], cfg.repeats)
    inf = infer.measure("lora_ua", on=ru)  # against the base bundle's live session, interleaved
    gen = gen_timing(cfg, ru, ctx["prompt"], "lora_ua")
    nbytes = sum(v.numel() * v.element_size() for n, v in ru.backend.tensors.items() if ".lora_" in n)
    note = "extra matmuls at inference"
    row = Row.of("lora_unfused", "onnxruntime/slots", dtype, t, nbytes, note, inf).with_gen(gen)
    ru.switch("lora_ua")
    assert np.isfinite(ru(infer.one)).all()
    return [row]


def mirror_lines(rt: Runtime, adapters) -> tuple[int, int]:
    """64-byte lines of an int8 bundle's transposed uint8 copies that a switch between ``adapters`` touches
    (entry ``(r, c)`` of the codes lives at ``[c, r]``), and the entries written there."""
    touched: dict[str, list[torch.Tensor]] = {}
    for ad in adapters:
        for n in ad.indices:
            t = rt.backend.canonical(n, "benchmark")
            if t in rt.backend.mirrors:
                touched.setdefault(t, []).append(ad.flat(n, rt.backend.shapes[t])[0].long())
    lines = entries = 0
    for t, ix in touched.items():
        rows, cols = rt.backend.shapes[t]
        idx = torch.cat(ix)
        entries += idx.numel()
        m = rt.backend.mirrors[t]
        lines += touched_lines(((idx % cols) * rows + idx // cols).unique(), 1, m.data_ptr() % 64)
    return lines, entries


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
