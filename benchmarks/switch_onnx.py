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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import progress
from benchmarks.switch_rows import Config, Row, inference
from benchmarks.timing import cycle
from runtime import Runtime
from runtime.dtypes import BUNDLE


def onnx_unavailable(cfg: Config, dtype: str) -> str | None:
    """Why the onnxruntime rows cannot run for ``dtype`` (None: they can)."""
    if cfg.no_onnx:
        return "--no-onnx given"
    if dtype not in BUNDLE:
        return f"the exporter writes {'/'.join(BUNDLE)} only (onnxruntime's CPU kernels lack {dtype})"
    if cfg.hf:
        return "--hf models run on the torch backend only in this benchmark"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -e '.[onnx]'"
    return None


def onnx_rows(cfg: Config, model: nn.Module, dtype: str, ctx: dict, workdir: Path) -> list[Row]:
    """Rows for the onnxruntime backend. ``ctx``: what the torch rows used (vocab, shira_a/shira_b, shira_bytes,
    floor, lora_a/lora_b), so that both backends switch the same adapters against the same floor."""
    from benchmarks.onnx_live import initializer_graph, session
    from exporters import export_onnx

    example = (torch.zeros(1, 8, dtype=torch.long),)
    la, lb = ctx["lora_a"], ctx["lora_b"]
    progress(f"{dtype}: exporting the bundle (onnxruntime rows)")
    export_onnx(model, example, workdir / "base", verify=False)
    progress(f"{dtype}: exporting the LoRA-unfused graph variant")
    rank = max(int(a.shape[0]) for a in la.A.values())
    modules = [n.rsplit(".", 1)[0] for n in la.A]
    export_onnx(model, example, workdir / "lora", verify=False, lora_rank=rank, lora_targets=modules)

    rt = Runtime.load(workdir / "base")
    infer = inference(cfg, rt, ctx["vocab"], numpy=True)
    progress(f"{dtype}: base inference on the live onnxruntime session, {cfg.infer_repeats} repeats")
    rows = [Row.of("base", "onnxruntime/live", dtype, None, 0, "no adapter", infer.measure().as_base())]

    # shira, switched inside the live session
    rt.add_adapter("shira_a", ctx["shira_a"])
    rt.add_adapter("shira_b", ctx["shira_b"])
    progress(f"{dtype}: shira switch A -> B in the live onnxruntime session, {cfg.repeats} repeats")
    t = cycle([lambda: rt.switch("shira_a"), lambda: rt.switch("shira_b")], cfg.repeats)
    inf = infer.measure("shira_a")
    note = "switched in the live session"
    rows.append(Row.of("shira", "onnxruntime/live", dtype, t, ctx["shira_bytes"], note, inf, ctx["floor"]))

    # lora fused: no live weights -> fuse, then a new prepacked session over the fused weights
    rt.add_adapter("lora_a", la)
    rt.add_adapter("lora_b", lb)
    default_path = initializer_graph(workdir / "base", "default.onnx", gemm_b=True)
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
    feed = rt.backend.input_names[0]
    inf = infer.measure(built["name"], run=lambda x: built["session"].run(None, {feed: x}), rounds=1)
    rows.append(Row.of("lora_fused", "onnxruntime/rebuild", dtype, t, 0, "fuse + new prepacked session", inf))
    for name in ("lora_a", "lora_b"):  # their saved base copies go before the variant bundle is opened
        rt.remove_adapter(name)
    drop()

    # lora unfused: the variant graph's LoRA slots are live inputs; a switch writes the factors into them
    ru = Runtime.load(workdir / "lora")
    ru.add_adapter("lora_ua", la, mode="unfused")
    ru.add_adapter("lora_ub", lb, mode="unfused")
    progress(f"{dtype}: lora unfused on onnxruntime (factors written into the slots), {cfg.repeats} repeats")
    t = cycle([lambda: ru.switch("lora_ua"), lambda: ru.switch("lora_ub")], cfg.repeats)
    inf = infer.measure("lora_ua", on=ru)  # against the base bundle's live session, interleaved
    nbytes = sum(v.numel() * v.element_size() for n, v in ru.backend.tensors.items() if ".lora_" in n)
    rows.append(Row.of("lora_unfused", "onnxruntime/slots", dtype, t, nbytes, "extra matmuls at inference", inf))
    ru.switch("lora_ua")
    assert np.isfinite(ru(infer.one)).all()
    return rows
