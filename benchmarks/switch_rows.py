"""What one run of ``benchmarks.switch_latency`` measures, for both backends: its ``Config``, its one ``Row``
type (built from the shared timer's ``Timing`` and ``InferTiming``), and the inputs both backends share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from shira_runtime import load_adapter
from shira_runtime.kernels.dtypes import by_short
from shira_runtime.models import PRESETS, TARGETS, build, load_base

from benchmarks.common import CpuWatch, progress, rss_mb
from benchmarks.timing import GenTiming, InferTiming, Measured, Subject, Timing, interleave, spread


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
    masks: tuple[str, ...] = ("rand",)  # SHiRA mask kinds of the random adapters (shira_runtime.masks); the first
    # one also serves the inference, onnxruntime and PEFT rows
    huge_pages: bool = False  # the torch rows' weights on huge pages (Runtime.huge_pages)


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
    decode_x_base: float | None = None  # decode rate / the base's, paired round by round (``interleave``)

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
        rss: float | None = None,
    ) -> Row:
        """A row from what the method measured: its switch cycle (None: no switch, the base) and its inference.

        Peak RSS: ``rss``, or else taken here, right after the method was measured (since the previous row)."""
        median, p90 = (switch.median_ms, switch.p90_ms) if switch else (0.0, 0.0)
        row = Row(method, backend, dtype, median, p90, floor_ms, rss_mb() if rss is None else rss, bytes_written, note)
        return row.with_infer(infer) if infer else row

    @property
    def streams_floor_ratio(self) -> float | None:
        return self.switch_ms / self.streams_floor_ms if self.streams_floor_ms else None

    def with_gen(self, gen: GenTiming | None) -> Row:
        if gen is None:
            return self
        return replace(self, ttft_ms=self.switch_ms + gen.first.median_ms, decode_tokens_per_s=gen.decode_tokens_per_s)

    def with_measured(self, m: Measured | None) -> Row:
        """The inference and generation columns from ``interleave``'s rounds."""
        return self if m is None else replace(self.with_infer(m.infer).with_gen(m.gen), decode_x_base=m.decode_x_base)

    def with_infer(self, infer: InferTiming) -> Row:
        return replace(
            self, infer_ms=infer.batch.median_ms, infer_b1_ms=infer.one.median_ms, infer_overhead=infer.overhead
        )


def inputs(cfg: Config, vocab: int, numpy: bool = False) -> tuple:
    """The inference inputs, the same token ids on both backends (``numpy``: onnxruntime): one token, and a
    batch of ``cfg.tokens`` tokens (rows of 16)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    one = torch.randint(0, vocab, (1, 1), generator=gen)
    batch = torch.randint(0, vocab, (max(1, cfg.tokens // 16), min(16, cfg.tokens)), generator=gen)
    return (one.numpy(), batch.numpy()) if numpy else (one, batch)


def subject(name: str, rt, ids: torch.Tensor, enter: Callable[[], object], leave=None) -> Subject:
    """A ``Subject`` of the interleaved rounds that runs on the runtime ``rt`` (inference, and generation from
    the prompt ``ids`` where ``rt`` generates with a KV cache) once ``enter`` has run."""
    gen = (lambda n: rt.generate(ids, max_new_tokens=n)) if can_generate(rt) else None
    return Subject(name, enter, rt, gen, leave)


def measure(cfg: Config, subjects: list[Subject], one, batch, backend: str) -> tuple[dict[str, Measured], dict]:
    """``interleave`` over ``subjects`` (the base first), and how noisy the machine was meanwhile: the base's own
    scatter over the rounds, and the CPUs other processes kept busy."""
    with CpuWatch() as watch:
        out = interleave(
            subjects,
            one,
            batch,
            cfg.infer_repeats,
            cfg.new_tokens,
            lambda name: progress(f"{backend}: inference and generation, interleaved rounds, {name}"),
        )
    base = out[subjects[0].name]
    noise = {
        "base_infer_spread": spread(base.infer.batch),
        "base_gen_spread": spread(base.gen.total) if base.gen else None,
        "other_cpus": watch.others,
    }
    return out, noise


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


# above these, the machine was too noisy for the table's ratios to be trusted to a few percent
NOISY_SPREAD = 0.05  # the base's samples: median absolute deviation / median
NOISY_CPUS = 0.25  # CPUs that other processes kept busy, on average, during the interleaved rounds
CONSISTENT = 0.05  # SHiRA runs the base's weights' code path: its inference and decode within 5% of the base's


def consistency(rows: list[Row], noise: dict[str, dict]) -> dict[str, dict]:
    """Per dtype and backend, SHiRA against the base (the same code path on equally shaped weights): inference
    and decode ratios, whether both are within ``CONSISTENT`` of 1, and whether the machine was quiet enough
    (``noise``, from ``measure``) to expect that."""
    out: dict[str, dict] = {}
    for r in rows:
        if r.method != "shira" or r.infer_overhead is None:
            continue
        fam = r.backend.split("/")[0]
        key = f"{r.dtype} {fam}"
        bases = (b for b in rows if b.method == "base" and b.dtype == r.dtype and b.backend.split("/")[0] == fam)
        base = next(bases, None)
        if base is None or key in out:
            continue
        decode = r.decode_x_base
        if decode is None and r.decode_tokens_per_s and base.decode_tokens_per_s:
            decode = r.decode_tokens_per_s / base.decode_tokens_per_s
        n = noise.get(r.dtype, {}).get(fam, {})
        spreads = [x for x in (n.get("base_infer_spread"), n.get("base_gen_spread")) if x is not None]
        noisy = bool(spreads and max(spreads) > NOISY_SPREAD) or (n.get("other_cpus") or 0.0) > NOISY_CPUS
        ok = abs(r.infer_overhead - 1) <= CONSISTENT and (decode is None or abs(decode - 1) <= CONSISTENT)
        out[key] = {"infer_x_base": r.infer_overhead, "decode_x_base": decode, "consistent": ok, "noisy": noisy}
    return out
