"""Trace a module to ONNX with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, with
``onnxscript``), every weight a graph input named by its ``state_dict`` key.

Why this path: the TorchScript exporter is deprecated and fails on transformers models (``aten::diff`` in the
causal-mask code, keyword-only arguments); the dynamo exporter traces them with ``torch.export`` as they are.
It has no "parameters as inputs" switch, so the module runs under ``torch.func.functional_call`` with its
weights passed in as a keyword argument: ``torch.export`` then sees them as inputs, the ONNX graph takes them
as inputs (named ``weights_<key with dots as underscores>``), and they are renamed here to their keys.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence

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
        return functional_call(self.module, weights, args, kwargs=self.call_kwargs, tie_weights=False)


def call_kwargs(module: nn.Module) -> dict:
    """Keyword arguments every call gets: no KV cache outputs from a transformers model (its full-sequence
    forward is what a bundle exports)."""
    params = inspect.signature(module.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(
            _Live(module, call_kwargs(module)),
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
