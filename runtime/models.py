"""A built-in Llama-style decoder (RMSNorm, rotary GQA attention, SwiGLU), with transformers' parameter names.

Names match ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj.weight`` ...), so PEFT target names
``q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj`` work on it. Weights are random from a seed: fine
for latency and for exactness tests, no download needed.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from shira_runtime import pretrained
from shira_runtime.errors import BaseLoadError
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float = 500000.0
    eps: float = 1e-5
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab=256, hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2),
    "small": LlamaConfig(vocab=4096, hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4),
    # 94M parameters (61M linear weights in 4 wide layers): past the caches, quick to export
    "medium": LlamaConfig(vocab=32000, hidden=1024, intermediate=4096, layers=4, heads=16, kv_heads=4),
    # Llama-3.2-1B shapes (973M linear weights)
    "llama-1b": LlamaConfig(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, S, D]; cos/sin [S, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, d
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, D]
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)


class LlamaDecoder(nn.Module):
    """Full-sequence forward: ``input_ids [B, S]`` (int64) -> ``logits [B, S, vocab]``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def build(preset: str | LlamaConfig = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaDecoder:
    """A decoder of ``preset`` with random weights from ``seed`` (built on the meta device, filled once)."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device("meta"):
        model = LlamaDecoder(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty gives each name its own storage: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(seed)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    model.inv_freq.copy_(inv)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if name.endswith("norm.weight"):
                p.uniform_(0.9, 1.1, generator=gen)
            else:
                bound = 1.0 / math.sqrt(p.shape[-1])
                p.uniform_(-bound, bound, generator=gen)
    model.to(dtype)
    model.inv_freq = model.inv_freq.float()  # rotary frequencies stay fp32 whatever the weights' dtype
    return model.eval()


def load_pretrained(path: str | Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """A transformers model directory (``config.json`` and weights, as ``save_pretrained`` writes them), in eval
    mode: the class named by config.json's ``architectures`` (``LlamaForCausalLM``, ``BertModel`` ...), else
    ``AutoModelForCausalLM`` where transformers has a causal-LM class for the model type, else ``AutoModel``.
    ``dtype="auto"`` keeps the dtype the weights were saved in. Raises ``BaseLoadError`` naming the directory."""
    path = Path(path)
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:
        raise BaseLoadError(f"{path}: loading a transformers model directory needs `transformers` ({exc})") from exc
    if not (path / "config.json").is_file():
        raise BaseLoadError(f"{path}: not a transformers model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = cls.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:  # no weights, a broken config.json, an unknown model type
        raise BaseLoadError(f"{path}: not a loadable transformers model directory: {exc}") from exc
    return model.eval()


def load_base(spec: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A base module from a preset name, a real model's name (``shira_runtime.pretrained``, e.g. ``smollm2``), a
    transformers model directory or ``module.path:callable``, ready to export (a transformers model's KV cache
    off). Raises ``BaseLoadError`` naming ``spec``."""
    if spec in PRESETS:
        return build(spec, dtype)
    if spec in pretrained.MODELS:  # a real trained model, fetched once into the cache
        spec = str(pretrained.fetch(spec))
    if Path(spec).is_dir():
        model = load_pretrained(spec, dtype)
        model.config.use_cache = False
        return model
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            make = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise BaseLoadError(f"base {spec!r}: no callable {fn!r} in module {mod!r} ({exc})") from exc
        obj = make()
        if not isinstance(obj, nn.Module):
            raise BaseLoadError(f"base {spec!r}: returned {type(obj).__name__}, not an nn.Module")
        return obj.to(dtype).eval()
    raise BaseLoadError(f"base {spec!r}: not a preset ({sorted(PRESETS)}), a real model ({sorted(pretrained.MODELS)}), "
        "a directory, or module.path:callable")
