"""Trace a module to ONNX with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, with
``onnxscript``), every weight a graph input named by its ``state_dict`` key.

Why this path: the TorchScript exporter is deprecated and fails on transformers models (``aten::diff`` in the
causal-mask code, keyword-only arguments); the dynamo exporter traces them with ``torch.export`` as they are.
It has no "parameters as inputs" switch, so the module runs under ``torch.func.functional_call`` with its
weights passed in as a keyword argument (one tensor per tied group: ``tie_weights=True`` hands it to every name
of the group, so a tied LM head reads the live embedding, not a constant copy): ``torch.export`` then sees them
as inputs, the ONNX graph takes them as inputs (named ``weights_<key with dots as underscores>``), and they are
renamed here to their keys.

A transformers decoder is traced with its KV cache (``trace_decoder``): the cache goes in and out as flat tensors
``past_key_values.<i>.key/value`` -> ``present.<i>.key/value`` (a ``DynamicCache`` is built from them inside the
traced call), with ``attention_mask`` (left padding) and ``position_ids``. One graph serves the prefill (a past
of length 0) and the one-token decode steps.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
import torch
from torch import nn
from torch.func import functional_call


class _Live(nn.Module):
    """``module(*args, **call_kwargs)`` with its weights taken from the ``weights`` argument."""

    def __init__(self, module: nn.Module, call_kwargs: dict) -> None:
        super().__init__()
        self.module, self.call_kwargs = module, call_kwargs

    def forward(self, *args: torch.Tensor, weights: dict[str, torch.Tensor]):
        return functional_call(self.module, weights, args, kwargs=self.call_kwargs, tie_weights=True)


def call_kwargs(module: nn.Module) -> dict:
    """Keyword arguments every call gets: no KV cache outputs from a transformers model (its full-sequence
    forward is what a bundle exports)."""
    params = inspect.signature(module.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


class _LiveDecoder(nn.Module):
    """A transformers decoder's forward with its KV cache as flat tensors and its weights as an argument."""

    def __init__(self, module: nn.Module, layers: int, positions: bool, keep: bool) -> None:
        super().__init__()
        self.module, self.layers, self.positions, self.keep = module, layers, positions, keep

    def forward(self, *args: torch.Tensor, weights: dict[str, torch.Tensor]):
        from transformers import DynamicCache

        args = list(args)
        input_ids, attention_mask = args.pop(0), args.pop(0)
        position_ids = args.pop(0) if self.positions else None
        keep = args.pop(0) if self.keep else None
        past = args
        cache = DynamicCache()  # full layers: a sliding-window model masks the window itself
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, cache_arg(self.module): cache}
        kwargs["use_cache"] = True
        if self.positions:
            kwargs["position_ids"] = position_ids
        if self.keep:  # the positions whose logits are computed (the last one, when generating)
            kwargs["logits_to_keep"] = keep
        out = functional_call(self.module, weights, (), kwargs=kwargs, tie_weights=True)
        return (out.logits, *[t for layer in cache_of(out).layers for t in (layer.keys, layer.values)])


@dataclass(frozen=True)
class Decoder:
    """How a decoder graph takes its cache: graph names, and each layer's cache shape ``[heads, head_dim]``."""

    positions: bool  # the graph takes position_ids
    keep: bool  # the graph takes logits_to_keep: the positions whose logits it computes
    layers: list[tuple[int, int]]  # per layer: (kv heads, head dim)
    dtype: torch.dtype

    @property
    def inputs(self) -> list[str]:
        names = ["input_ids", "attention_mask"] + (["position_ids"] if self.positions else [])
        names += ["logits_to_keep"] if self.keep else []
        return names + [n for i in range(len(self.layers)) for n in _cache_names("past_key_values", i)]

    @property
    def outputs(self) -> list[str]:
        return ["logits"] + [n for i in range(len(self.layers)) for n in _cache_names("present", i)]

    def wrap(self, module: nn.Module) -> nn.Module:
        return _LiveDecoder(module, len(self.layers), self.positions, self.keep)

    def to_json(self, module: nn.Module) -> dict:
        """The manifest's ``decoder`` section: graph names, and the model's default end and padding tokens."""
        config = getattr(module, "generation_config", None)
        n = len(self.layers)
        return {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids" if self.positions else None,
            "logits_to_keep": "logits_to_keep" if self.keep else None,
            "logits": "logits",
            "cache": [[*_cache_names("past_key_values", i), *_cache_names("present", i)] for i in range(n)],
            "eos_token_id": getattr(config, "eos_token_id", None),
            "pad_token_id": getattr(config, "pad_token_id", None),
        }

    def example(self, input_ids: torch.Tensor, past: int = 2) -> tuple[torch.Tensor, ...]:
        """Inputs to trace on: ``input_ids`` (widened to batch and length >= 2), a random past of ``past``."""
        ids = _widen(input_ids, {0: None, 1: None})
        b, s = ids.shape
        gen = torch.Generator().manual_seed(0)
        mask = torch.ones(b, past + s, dtype=torch.long)
        pos = torch.arange(past, past + s).expand(b, s).contiguous()
        cache = [torch.randn(b, h, past, d, generator=gen).to(self.dtype) for h, d in self.layers for _ in "kv"]
        keep = torch.arange(s - 2, s)  # a different length than the sequence's: both stay dynamic
        return (ids, mask, *([pos] if self.positions else []), *([keep] if self.keep else []), *cache)


def _cache_names(prefix: str, layer: int) -> list[str]:
    return [f"{prefix}.{layer}.key", f"{prefix}.{layer}.value"]


def is_decoder(module: nn.Module) -> bool:
    """A transformers model that generates and takes a KV cache (``past_key_values``)."""
    can = getattr(module, "can_generate", None)
    params = inspect.signature(module.forward).parameters
    return (
        type(module).__module__.startswith("transformers.")
        and callable(can)
        and can()
        and ("past_key_values" in params or "cache" in params)
    )


def cache_arg(module: nn.Module) -> str:
    """The keyword a transformers model takes its KV cache by: ``past_key_values``, ``cache`` from transformers
    5.24 on."""
    return "past_key_values" if "past_key_values" in inspect.signature(module.forward).parameters else "cache"


def cache_of(out) -> object:
    """The KV cache a transformers model returned (``past_key_values``, ``cache`` from transformers 5.24 on)."""
    past = getattr(out, "past_key_values", None)
    return past if past is not None else getattr(out, "cache", None)


def decoder_of(module: nn.Module) -> Decoder:
    """The cache layout of ``module``, from one eager step with ``use_cache=True``."""
    with torch.inference_mode():
        out = module(input_ids=torch.ones(1, 1, dtype=torch.long), use_cache=True)
    layers = getattr(cache_of(out), "layers", None)
    if not layers or not all(getattr(x, "keys", None) is not None and x.keys.dim() == 4 for x in layers):
        raise TypeError(
            f"{type(module).__name__} keeps no per-layer key/value cache [batch, heads, seq, dim]; export it with "
            f"kv_cache=False"
        )
    params = inspect.signature(module.forward).parameters
    shapes = [(x.keys.shape[1], x.keys.shape[3]) for x in layers]
    return Decoder("position_ids" in params, "logits_to_keep" in params, shapes, layers[0].keys.dtype)


def trace_decoder(
    module: nn.Module, decoder: Decoder, args: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor], opset
) -> onnx.ModelProto:
    """The ONNX model of ``module`` stepping its KV cache: inputs ``decoder.inputs`` then the weights, outputs
    ``decoder.outputs``. Batch, sequence and past length are dynamic."""
    batch, seq, total, past = (torch.export.Dim.AUTO,) * 4
    dims = [{0: batch, 1: seq}, {0: batch, 1: total}] + ([{0: batch, 1: seq}] if decoder.positions else [])
    dims += [{0: torch.export.Dim.AUTO}] if decoder.keep else []
    dims += [{0: batch, 2: past} for _ in range(2 * len(decoder.layers))]
    return _to_onnx(decoder.wrap(module), args, weights, tuple(dims), decoder.inputs, decoder.outputs, opset)


def trace(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    weights: dict[str, torch.Tensor],
    in_names: Sequence[str],
    out_names: Sequence[str],
    axes: Mapping[str, Mapping[int, str]],
    opset: int | None,
) -> onnx.ModelProto:
    """The ONNX model of ``module`` on ``args``: graph inputs ``in_names`` then one per ``weights`` key (named by
    it), outputs ``out_names``."""
    # Dim.AUTO: each requested dimension is dynamic where the model allows it and static where the trace finds
    # it fixed (the channels of an image, say); torch.export specializes a size-1 dimension, so trace at 2
    dims = tuple({d: torch.export.Dim.AUTO for d in axes[n]} if n in axes else None for n in in_names)
    args = tuple(_widen(a, d) for a, d in zip(args, dims))
    return _to_onnx(_Live(module, call_kwargs(module)), args, weights, dims, in_names, out_names, opset)


def _to_onnx(
    wrapper: nn.Module,
    args: tuple[torch.Tensor, ...],
    weights: dict[str, torch.Tensor],
    dims: tuple,
    in_names: Sequence[str],
    out_names: Sequence[str],
    opset: int | None,
) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(
            wrapper,
            args,
            kwargs={"weights": dict(weights)},
            dynamic_shapes={"args": dims, "weights": {k: None for k in weights}},
        )
        program = torch.onnx.export(exported, dynamo=True, opset_version=opset, optimize=True, verbose=False)
    model = program.model_proto
    graph = model.graph
    if len(graph.input) != len(in_names) + len(weights) or len(graph.output) != len(out_names):
        raise RuntimeError(
            f"the dynamo exporter made {len(graph.input)} inputs and {len(graph.output)} outputs, expected "
            f"{len(in_names)} + {len(weights)} weights and {len(out_names)}"
        )
    rename = {v.name: n for v, n in zip(graph.input, [*in_names, *weights])}
    rename |= {v.name: n for v, n in zip(graph.output, out_names)}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        v.name = rename.get(v.name, v.name)
    _rename(graph.node, rename)
    return model


def _widen(a: torch.Tensor, dims: dict | None) -> torch.Tensor:
    for d in dims or {}:
        if a.shape[d] == 1:
            a = torch.cat([a, a], dim=d)
    return a


def _rename(nodes, rename: dict[str, str]) -> None:
    for node in nodes:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
        for attr in node.attribute:  # subgraphs (If, Loop, Scan) read outer names too
            for g in (
                [attr.g, *attr.graphs] if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) else []
            ):
                _rename(g.node, rename)
