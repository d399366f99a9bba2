"""What one run of ``benchmarks.switch_latency`` measures, for both backends: its ``Config``, its one ``Row``
type (built from the shared timer's ``Timing`` and ``InferTiming``), and the inputs both backends share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from shira_runtime import load_adapter
from shira_runtime.kernels.dtypes import by_short
from shira_runtime.models import PRESETS, TARGETS, build, load_base

from benchmarks.common import progress, rss_mb
from benchmarks.timing import GenTiming, Inference, InferTiming, Timing, generation


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
    new_tokens: int = 32  # decode tokens timed after the first (generation columns)
    gen_repeats: int = 3
    no_peft: bool = False
    masks: tuple[str, ...] = ("rand",)  # SHiRA mask kinds of the random adapters (shira_runtime.masks); the first one
    # also serves the onnxruntime and PEFT rows


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
    ttft_ms: float | None = None  # time to first token after a switch: switch + prompt prefill + first token
    decode_tokens_per_s: float | None = None  # the tokens after the first, with the method active
    mask: str | None = None  # SHiRA rows: the mask kind of the adapters ("user": the user's files)
    # SHiRA rows: the floor counting every byte a switch must move: the weight lines (as floor_ms) plus the
    # adapter's own streams (saved values written and read back, deltas and indices read)
    streams_floor_ms: float | None = None

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

    @property
    def streams_floor_ratio(self) -> float | None:
        return self.switch_ms / self.streams_floor_ms if self.streams_floor_ms else None

    def with_gen(self, gen: GenTiming | None) -> Row:
        if gen is None:
            return self
        return replace(self, ttft_ms=self.switch_ms + gen.first.median_ms, decode_tokens_per_s=gen.decode_tokens_per_s)

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
    """The model and its vocabulary size: a transformers directory (``--hf``), else a transformers
    ``LlamaForCausalLM`` of the preset's shapes (it generates with a KV cache, and its bundle carries one), or the
    built-in decoder where transformers is not installed."""
    if cfg.hf:
        model = load_base(cfg.hf, by_short(dtype).torch)
    else:
        try:
            model = hf_llama(cfg.preset, by_short(dtype).torch, cfg.seed)
        except ImportError:
            model = build(cfg.preset, by_short(dtype).torch, seed=cfg.seed)
            return model, model.config.vocab
    model.generation_config.eos_token_id = None  # every generation runs its full length
    return model, int(model.config.vocab_size)


def hf_llama(preset: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A transformers ``LlamaForCausalLM`` of the preset's shapes with random weights (no download)."""
    import transformers

    c = PRESETS[preset]
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab,
        hidden_size=c.hidden,
        intermediate_size=c.intermediate,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        num_key_value_heads=c.kv_heads,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.eps,
        tie_word_embeddings=c.tie_embeddings,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.config.use_cache = False  # a plain forward returns the logits alone (generate turns the cache on)
    return model


def prompt(cfg: Config, vocab: int) -> torch.Tensor:
    """The generation prompt: ``cfg.tokens`` random ids, one row."""
    return torch.randint(1, vocab, (1, cfg.tokens), generator=torch.Generator().manual_seed(cfg.seed + 7))


def can_generate(rt) -> bool:
    """Whether ``rt`` generates with a KV cache (a transformers model, or a bundle exported with its cache)."""
    module = getattr(rt.backend, "module", None)
    return getattr(rt.backend, "decoder", None) is not None or hasattr(module, "generation_config")


def pair(paths: tuple[str, ...], make: Callable[[int], object]) -> tuple[object, object, str]:
    """Adapters A and B: the user's (the first two; one is switched against itself), or two random ones."""
    if not paths:
        return make(1), make(2), "random"
    a = load_adapter(paths[0])
    b = load_adapter(paths[1]) if len(paths) > 1 else a
    return a, b, "user" if len(paths) > 1 else "user, A -> A"


def gen_timing(cfg: Config, rt, ids, state: str | None, on=None) -> GenTiming | None:
    """Generation timings with ``state`` switched in on ``on`` (default ``rt``), generating through ``rt``
    (None where it cannot generate with a KV cache); ``on`` is left at the base."""
    on = on if on is not None else rt
    if not can_generate(rt):
        return None
    progress(f"  generation with {state or 'the base'}: prompt {ids.shape[1]}, 1 + {cfg.new_tokens} tokens")
    on.switch(state)
    try:
        return generation(lambda n: rt.generate(ids, max_new_tokens=n), cfg.new_tokens, cfg.gen_repeats)
    finally:
        on.switch(None)
