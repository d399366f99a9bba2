"""The onnxruntime rows of ``benchmarks.switch_latency``: the same adapters and methods on an exported bundle.

- ``shira``: the live-weights session (``Runtime.load(bundle)``), switched in place;
- ``lora_fused``: the honest fused alternative without live weights: fuse B (exact, into the weights) and build
  a new default (prepacked) session over them; the time is both together;
- ``lora_unfused``: a bundle exported with LoRA slots (``export_onnx(..., lora_rank=R)``: an extra
  ``x @ A.T @ B.T`` per linear, factors as live inputs): ``Runtime.switch`` writes the small factors into them,
  inference pays the matmuls.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import Timing, progress, time_ms
from benchmarks.switch_latency import Inference
from runtime import Runtime, SparseAdapter

ONNX_DTYPES = ("fp32", "fp16")  # what the exporter writes


def onnx_rows(cfg, model: nn.Module, dtype: str, adapters: dict, floor_ms: float, workdir: Path, make_row) -> list:
    """Rows for the onnxruntime backend. ``adapters``: shira_a/shira_b (SparseAdapter), lora_a/lora_b."""
    from benchmarks.onnx_live import initializer_graph, session
    from exporters import export_onnx

    vocab = adapters["vocab"]
    gen = torch.Generator().manual_seed(cfg.seed)
    one = torch.randint(0, vocab, (1, 1), generator=gen).numpy()
    batch = torch.randint(0, vocab, (max(1, cfg.tokens // 16), min(16, cfg.tokens)), generator=gen).numpy()
    example = (torch.zeros(1, 8, dtype=torch.long),)
    la, lb = adapters["lora_a"], adapters["lora_b"]

    progress(f"{dtype}: exporting the bundle (onnxruntime rows)")
    export_onnx(model, example, workdir / "base", verify=False)
    progress(f"{dtype}: exporting the LoRA-unfused graph variant")
    rank = max(int(a.shape[0]) for a in la.A.values())
    modules = [n.rsplit(".", 1)[0] for n in la.A]
    export_onnx(model, example, workdir / "lora", verify=False, lora_rank=rank, lora_targets=modules)

    def infer(fn) -> tuple[float, float]:
        return time_ms(lambda: fn(one), cfg.infer_repeats).median_ms, time_ms(
            lambda: fn(batch), cfg.infer_repeats
        ).median_ms

    rows = []
    rt = Runtime.load(workdir / "base")
    b1, bt = infer(rt)
    rows.append(make_row("base", "onnxruntime/live", dtype, 0.0, 0.0, None, 0, "no adapter", b1, bt, 1.0))
    base_bt = bt

    # shira, switched inside the live session
    sa: SparseAdapter = adapters["shira_a"]
    rt.add_adapter("shira_a", sa)
    rt.add_adapter("shira_b", adapters["shira_b"])
    progress(f"{dtype}: shira switch A -> B in the live onnxruntime session, {cfg.repeats} repeats")
    rt.switch("shira_a")
    samples = []
    for i in range(cfg.repeats):
        samples.append(rt.switch("shira_b" if i % 2 == 0 else "shira_a").ms)
    t = Timing.of(samples)
    nbytes = adapters["shira_bytes"]
    row = make_row(
        "shira",
        "onnxruntime/live",
        dtype,
        t.median_ms,
        t.p90_ms,
        floor_ms,
        nbytes,
        "switched in the live session",
        None,
        None,
        None,
    )
    rows.append(Inference(cfg, rt, vocab, numpy=True).measure(row, "shira_a"))

    # lora fused: no live weights -> fuse, then a new prepacked session over the fused weights
    rt.add_adapter("lora_a", la)
    rt.add_adapter("lora_b", lb)
    default_path = initializer_graph(workdir / "base", "default.onnx", gemm_b=True)
    arrays = rt.backend.arrays
    reps = max(2, min(3, cfg.repeats // 4))  # each rebuild of llama-1b takes seconds
    progress(f"{dtype}: lora fused on onnxruntime = fuse + rebuild a prepacked session, {reps} repeats")
    samples, s = [], None
    for i in range(reps):
        s = None  # the previous session goes before the next is built
        gc.collect()
        t0 = time.perf_counter()
        rt.switch("lora_b" if i % 2 == 0 else "lora_a")
        s = session(default_path, torch.get_num_threads(), shared=arrays)
        samples.append((time.perf_counter() - t0) * 1e3)
    t = Timing.of(samples)
    feed_name = rt.backend.input_names[0]
    # the rebuilt session shares the unadapted weights (norms, embeddings) with the live arrays, so it is timed
    # while the fused state is still in them, against the base timed above
    b1, bt = infer(lambda x: s.run(None, {feed_name: x}))
    rows.append(
        make_row(
            "lora_fused",
            "onnxruntime/rebuild",
            dtype,
            t.median_ms,
            t.p90_ms,
            None,
            0,
            "fuse + new prepacked session",
            b1,
            bt,
            bt / base_bt,
        )
    )
    s = None
    rt.switch(None)
    del rt
    gc.collect()

    # lora unfused: the variant graph's LoRA slots are live inputs; a switch writes the factors into them
    ru = Runtime.load(workdir / "lora")
    ru.add_adapter("lora_ua", la, mode="unfused")
    ru.add_adapter("lora_ub", lb, mode="unfused")
    progress(f"{dtype}: lora unfused on onnxruntime (factors written into the slots), {cfg.repeats} repeats")
    ru.switch("lora_ua")
    t = Timing.of([ru.switch("lora_ub" if i % 2 == 0 else "lora_ua").ms for i in range(cfg.repeats)])
    ru.switch("lora_ua")
    b1, bt = infer(ru)
    nbytes = sum(v.numel() * v.element_size() for n, v in ru.backend.tensors.items() if ".lora_" in n)
    rows.append(
        make_row(
            "lora_unfused",
            "onnxruntime/slots",
            dtype,
            t.median_ms,
            t.p90_ms,
            None,
            nbytes,
            "extra matmuls at inference",
            b1,
            bt,
            bt / base_bt,
        )
    )
    assert np.isfinite(ru(one)).all()
    del ru
    gc.collect()
    return rows
