"""What one run of ``benchmarks.switch_latency`` measures, for both backends: its ``Config``, its one ``Row``
type (built from the shared timer's ``Timing`` and ``InferTiming``), and the inputs both backends share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from benchmarks.common import rss_mb
from benchmarks.timing import Inference, InferTiming, Timing
from runtime import load_adapter
from runtime.dtypes import by_short
from runtime.models import TARGETS, build, load_base


@dataclass(frozen=True)
class Config:
    preset: str
    dtypes: tuple[str, ...]
    density: float
    rank: int
    repeats: int
    infer_repeats: int
    tokens: int = 64
    seed: int = 0
    hf: str | None = None  # a transformers model directory instead of a preset
    shira: tuple[str, ...] = ()  # user adapters (PEFT dirs or our files) instead of random ones
    lora: tuple[str, ...] = ()
    targets: tuple[str, ...] = TARGETS
    no_onnx: bool = False


@dataclass(frozen=True)
class Row:
    """One line of the table (and of the JSON ``results``), for either backend."""

    method: str
    backend: str
    dtype: str
    switch_ms: float
    switch_p90_ms: float
    floor_ms: float | None
    rss_mb: float
    bytes_written: int
    note: str = ""
    infer_ms: float | None = None  # a batch of cfg.tokens tokens
    infer_b1_ms: float | None = None  # one token
    infer_overhead: float | None = None  # infer_ms / the base's infer_ms (1.0 = none)

    @property
    def floor_ratio(self) -> float | None:
        return self.switch_ms / self.floor_ms if self.floor_ms else None

    @staticmethod
    def of(
        method: str,
        backend: str,
        dtype: str,
        switch: Timing | None,
        bytes_written: int,
        note: str,
        infer: InferTiming | None = None,
        floor_ms: float | None = None,
    ) -> Row:
        """A row from what the method measured: its switch cycle (None: no switch, the base) and its inference.

        Peak RSS is taken here, right after the method was measured (since the previous row)."""
        median, p90 = (switch.median_ms, switch.p90_ms) if switch else (0.0, 0.0)
        row = Row(method, backend, dtype, median, p90, floor_ms, rss_mb(), bytes_written, note)
        return row.with_infer(infer) if infer else row

    def with_infer(self, infer: InferTiming) -> Row:
        return replace(
            self, infer_ms=infer.batch.median_ms, infer_b1_ms=infer.one.median_ms, infer_overhead=infer.overhead
        )


def inference(cfg: Config, rt, vocab: int, numpy: bool = False) -> Inference:
    """The shared timer's ``Inference`` on ``rt``, with the same token ids on both backends (``numpy``: onnxruntime)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    one = torch.randint(0, vocab, (1, 1), generator=gen)
    batch = torch.randint(0, vocab, (max(1, cfg.tokens // 16), min(16, cfg.tokens)), generator=gen)
    if numpy:
        one, batch = one.numpy(), batch.numpy()
    return Inference(rt, one, batch, cfg.infer_repeats)


def load_model(cfg: Config, dtype: str) -> tuple[torch.nn.Module, int]:
    """The model and its vocabulary size: a built-in preset, or a transformers directory (``--hf``)."""
    if cfg.hf:
        model = load_base(cfg.hf, by_short(dtype).torch)
        return model, int(model.config.vocab_size)
    model = build(cfg.preset, by_short(dtype).torch, seed=cfg.seed)
    return model, model.config.vocab


def pair(paths: tuple[str, ...], make: Callable[[int], object]) -> tuple[object, object, str]:
    """Adapters A and B: the user's (the first two; one is switched against itself), or two random ones."""
    if not paths:
        return make(1), make(2), "random"
    a = load_adapter(paths[0])
    b = load_adapter(paths[1]) if len(paths) > 1 else a
    return a, b, "user" if len(paths) > 1 else "user, A -> A"
