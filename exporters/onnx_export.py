"""Export a torch module to an onnxruntime bundle whose weights stay writable.

    bundle/
      model.onnx            the graph; every weight is a graph *input* (no weight bytes inside)
      weights.safetensors   the weights, in the layout the graph consumes (some stored transposed)
      manifest.json         parameter name -> ONNX name, layout, shape, dtype; inputs/outputs; fingerprint

How the weights become graph inputs: the TorchScript exporter (installed with torch, no ``onnxscript`` needed)
runs with ``export_params=False`` and ``do_constant_folding=False``, so every parameter arrives as a graph input
named by its ``state_dict`` key and nothing is folded into copies of it. Then one pass over the graph:
- ``Identity(w)`` nodes are dropped; one whose output is another parameter's name (the exporter merges
  parameters with equal values) gives that parameter back its own input;
- ``Transpose(w)`` of a 2-D weight (``nn.Linear`` on 3-D activations) is kept by default: the weight stays in
  its ``state_dict`` layout, which the backend turns into the *A* operand of a GEMM (the fastest live form on
  onnxruntime's CPU provider, see ``shira_runtime.onnx_backend``). ``fold_transposes=True`` stores such weights
  transposed instead (layout ``transposed``), for runtimes that want ``MatMul(X, W^T)`` with no transpose; a
  weight needed in both layouts (an embedding tied to the LM head) then stays as it is and keeps one
  ``Transpose`` node.
onnxruntime folds the remaining constant subgraphs itself when it opens the session.
"""

from __future__ import annotations

import inspect
import json
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from shira_runtime.atomic import atomic_write
from shira_runtime.bundle import ALIGN, FORMAT, GRAPH_FILE, MANIFEST_FILE, WEIGHTS_FILE, file_sha256
from shira_runtime.errors import ExportError  # noqa: E402  (re-exported: exporters.ExportError)
from shira_runtime.exporters.dynamo_trace import Decoder, call_kwargs, decoder_of, is_decoder, trace, trace_decoder
from shira_runtime.exporters.lora_slots import lora_slots
from shira_runtime.exporters.progress import Phases, byte_bar
from shira_runtime.exporters.quant_graph import QuantExportError, placeholders, rewrite_int8, scale_name, u8t_name
from shira_runtime.kernels.dtypes import BUNDLE, NUMPY, TORCH
from shira_runtime.manifest import Manifest
from shira_runtime.onnx_backend import u8t_copy, write_live
from torch import nn
from torch.utils._pytree import tree_leaves

DEFAULT_OPSET = 17


def export_onnx(
    module: nn.Module,
    example_args: torch.Tensor | Sequence[torch.Tensor],
    out_dir: str | Path,
    *,
    dynamic: bool = True,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    fold_transposes: bool = False,
    verify: bool = True,
    lora_rank: int = 0,
    lora_targets: Sequence[str] | None = None,
    exporter: str = "auto",
    kv_cache: bool | None = None,
    progress: bool | None = None,
) -> Path:
    """Write a bundle for ``module`` (traced on ``example_args``) into ``out_dir`` and return its path.

    ``dynamic``: batch (dim 0) and sequence (dim 1 of integer inputs and of inputs with 3+ dims) are symbolic;
    ``dynamic=False`` fixes every dim to the example's. ``dynamic_dims`` overrides per input, e.g.
    ``{"input_ids": {0: "batch", 1: "seq"}}``. ``input_names`` default to ``forward``'s parameter names,
    ``output_names`` to ``output`` (one output) or ``output_0, output_1, ...``.
    ``fold_transposes``: store transposed the weights the graph only reads transposed (see the module doc).
    ``verify``: open the bundle with onnxruntime and compare its outputs with the module's on the example.
    ``lora_rank``: give the linears named by ``lora_targets`` (name suffixes; None: all) zero LoRA slots of that
    rank, live inputs that unfused LoRA adapters are written into (see ``shira_runtime.exporters.lora_slots``).
    Weights must be fp32 or fp16 (onnxruntime's CPU provider has no bf16 kernels for most ops).
    ``exporter``: ``"dynamo"`` (torch's dynamo exporter, ``shira_runtime.exporters.dynamo_trace``), ``"torchscript"``
    (the
    deprecated TorchScript exporter), or ``"auto"``: dynamo for transformers and diffusers models (TorchScript
    cannot trace transformers' decoders), TorchScript for other modules (it exports them in a second where
    dynamo takes several). With dynamo, a requested dynamic dimension the trace finds fixed stays static.
    ``kv_cache``: export a transformers decoder with its KV cache (default: every transformers model that
    generates): ``example_args`` is ``input_ids`` alone; the graph takes ``input_ids``, ``attention_mask``,
    ``position_ids`` (where the model takes them) and ``past_key_values.<i>.key/value`` and returns ``logits``
    and ``present.<i>.key/value``; one graph serves prefill (a past of length 0) and one-token decode steps, and
    ``Runtime.generate`` runs it. ``input_names``/``output_names``/``dynamic_dims`` do not apply then.
    ``progress``: a bar of the phases (trace, graph pass, weights, graph, check) and the bytes written, on
    stderr; None shows it when stderr is a terminal (``shira_runtime.exporters.progress``).
    A failed ``verify`` removes the manifest it had written: no manifest, no bundle.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r}: expected 'auto', 'dynamo' or 'torchscript'")
    args = (example_args,) if isinstance(example_args, torch.Tensor) else tuple(example_args)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_args must be a tensor or a sequence of tensors")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    try:
        with placeholders(module) as quant, _eval_mode(module), lora_slots(module, lora_targets, lora_rank):
            if quant and fold_transposes:
                raise ExportError(
                    "an int8 base exports without fold_transposes (its weights are stored as the transposed "
                    "uint8 copies its int8 chains read)"
                )
            if exporter == "auto":
                library = type(module).__module__.split(".")[0]
                exporter = "dynamo" if library in ("transformers", "diffusers") else "torchscript"
            decoder = None
            if kv_cache or (kv_cache is None and is_decoder(module)):
                decoder = _decoder(module, args, exporter, input_names, output_names, dynamic_dims)
            steps = ["trace", "graph pass", "weights", "graph"] + ["check"] * verify
            with Phases("export", steps, progress) as phases:
                return _export(
                    module,
                    args,
                    out,
                    dynamic,
                    dynamic_dims,
                    opset,
                    input_names,
                    output_names,
                    fold_transposes,
                    verify,
                    exporter,
                    decoder,
                    quant,
                    phases,
                )
    except QuantExportError as exc:
        raise ExportError(str(exc)) from None


def _decoder(module: nn.Module, args: tuple, exporter: str, *names_and_dims) -> Decoder:
    if exporter != "dynamo":
        raise ExportError("kv_cache=True needs the dynamo exporter (exporter='dynamo' or 'auto')")
    if not is_decoder(module):
        raise ExportError(f"kv_cache=True: {type(module).__name__} is not a transformers model that generates")
    if any(x is not None for x in names_and_dims):
        raise ExportError(
            "kv_cache=True names the graph's inputs and outputs itself: drop input_names, "
            "output_names and dynamic_dims (or export with kv_cache=False)"
        )
    if len(args) != 1 or args[0].dim() != 2 or args[0].is_floating_point():
        raise ExportError("kv_cache=True: example_args must be input_ids alone, an integer tensor [batch, seq]")
    try:
        return decoder_of(module)
    except TypeError as exc:
        raise ExportError(str(exc)) from None


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Export in eval mode; hand the module back in the mode it came in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    out: Path,
    dynamic: bool,
    dynamic_dims: Mapping | None,
    opset: int | None,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    fold_transposes: bool,
    verify: bool,
    exporter: str,
    decoder: Decoder | None,
    quant: dict | None,
    phases: Phases,
) -> Path:
    quant = quant or {}
    phases.step(f"trace ({exporter})")
    names, canonical = _parameters(module)
    weights = {n: t for n, t in names.items() if canonical[n] == n}
    if decoder is not None:
        args = decoder.example(args[0])
        in_names, output_names = decoder.inputs, decoder.outputs
    else:
        in_names = list(input_names) if input_names is not None else _forward_names(module, len(args))
    with torch.inference_mode():
        if decoder is not None:
            out_tree = decoder.wrap(module)(*args, weights=weights)
        else:
            out_tree = module(*args, **call_kwargs(module))
        expected = [t for t in tree_leaves(out_tree) if isinstance(t, torch.Tensor)]  # as the exporter flattens
    if output_names is None:
        output_names = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    out_names = list(output_names)
    clash = set(in_names + out_names) & set(names)
    if clash:
        raise ExportError(f"input/output names {sorted(clash)} are also parameter names; pick others")
    axes = _dynamic_axes(in_names, args, dynamic, dynamic_dims)

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # the manifest is written last: no manifest, no bundle
    if decoder is not None:
        model = trace_decoder(module, decoder, args, weights, opset)
    elif exporter == "dynamo":
        model = trace(module, args, weights, in_names, out_names, axes, opset)
    else:
        model = _torchscript(module, args, in_names, out_names, axes, opset, out)
    phases.step("graph pass")
    storage = _liven(model.graph, names, canonical, set(in_names), fold_transposes)
    _check_no_frozen_copies(model.graph, names)
    rewrite_int8(model, quant)

    arrays, params = {}, {}
    graph_inputs = {v.name for v in model.graph.input}
    elem = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    for name, t in names.items():
        canon = canonical[name]
        if canon not in storage:
            continue
        layout = storage[canon]
        if canon not in arrays:
            a = t.detach().cpu()
            arrays[canon] = np.ascontiguousarray((a.t() if layout == "transposed" else a).numpy())
        params[name] = {"onnx": canon, "layout": layout, "shape": list(t.shape), "dtype": TORCH[t.dtype].numpy}
        if canon in quant:  # int8 codes and their fp32 scales, both live inputs (shira_runtime.exporters.quant_graph)
            layer, scale_key = quant[canon], scale_name(canon)
            codes = layer.weight.detach().cpu().numpy()
            arrays[scale_key] = np.ascontiguousarray(layer.weight_scale.detach().cpu().numpy())
            entry = {"format": "int8", "scale": scale_key}
            if elem[canon] == onnx.TensorProto.UINT8:  # the graph reads the copy itself: the bundle stores it
                arrays[canon] = np.ascontiguousarray(u8t_copy(codes))
                params[name] |= {"dtype": "uint8", "layout": "transposed", "quant": entry}
            else:  # the codes: the graph reads them (s8s8) or a copy the runtime builds from them (u8t)
                arrays[canon] = np.ascontiguousarray(codes)
                if u8t_name(canon) in graph_inputs:
                    entry["u8t"] = u8t_name(canon)
                params[name] |= {"dtype": "int8", "quant": entry}
            params[scale_key] = {"onnx": scale_key, "layout": "identity", "shape": [t.shape[0]], "dtype": "float32"}
    unused = sorted(n for n in names if canonical[n] not in storage)
    if unused:
        warnings.warn(
            f"export_onnx: parameters not in the exported graph (unused by forward, or folded into constants "
            f"by the exporter), not writable in the bundle: {unused[:8]}{' ...' if len(unused) > 8 else ''}",
            stacklevel=2,
        )
    onnx.checker.check_model(model)
    phases.step("weights")
    with byte_bar(WEIGHTS_FILE, sum(a.nbytes for a in arrays.values()), phases.enabled) as bar:
        atomic_write(out / WEIGHTS_FILE, lambda p: write_safetensors(p, arrays, {"format": FORMAT}, bar.update))
    phases.step("graph")
    atomic_write(out / GRAPH_FILE, lambda p: onnx.save(model, str(p)))
    manifest = Manifest(
        inputs=[_io(v) | {"example_shape": list(a.shape)} for v, a in zip(_values(model.graph.input, in_names), args)],
        outputs=[_io(v) for v in _values(model.graph.output, out_names)],
        parameters=params,
        weights_sha256=file_sha256(out / WEIGHTS_FILE),
        graph_sha256=file_sha256(out / GRAPH_FILE),
        decoder=decoder.to_json(module) if decoder is not None else {},
        info={
            "exporter": f"torch.onnx ({exporter}) {torch.__version__}",
            "opset": opset or DEFAULT_OPSET,
            "unused": unused,
        },
    )
    manifest.live = write_live(out, model, manifest)  # the runtime loads these without the onnx package
    manifest.write(out)
    if verify:  # an int8 bundle quantizes its activations to 8 bits per token: ~1% of each linear's output
        phases.step("check")
        try:
            _verify(out, args, expected, 5e-2 if quant else None)
        except BaseException:
            (out / MANIFEST_FILE).unlink(missing_ok=True)
            raise
    phases.close()
    return out


def _torchscript(
    module: nn.Module, args: tuple, in_names: list[str], out_names: list[str], axes: dict, opset: int | None, out: Path
) -> onnx.ModelProto:
    """The TorchScript exporter, every parameter a graph input named by its key, nothing folded."""
    raw = out / (GRAPH_FILE + ".tmp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            str(raw),
            dynamo=False,
            export_params=False,
            do_constant_folding=False,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=axes,
            opset_version=opset or DEFAULT_OPSET,
        )
    model = onnx.load(str(raw))
    raw.unlink()
    return model


# -- parameters --
def _parameters(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Floating-point ``state_dict`` entries, and each name's canonical name (tied weights share one)."""
    names, canonical, by_storage = {}, {}, {}
    for name, t in module.state_dict(keep_vars=True).items():
        t = t.data if isinstance(t, nn.Parameter) else t
        if not t.is_floating_point():
            continue
        if t.dtype not in TORCH or TORCH[t.dtype].short not in BUNDLE:
            raise ExportError(
                f"tensor {name!r} has dtype {t.dtype}; bundles hold float32 or float16 weights "
                f"(onnxruntime's CPU provider lacks {t.dtype} kernels for most ops): convert the module first"
            )
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        canonical[name] = by_storage.setdefault(key, name)
        names[name] = t
    return names, canonical


def _forward_names(module: nn.Module, n: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]


def _dynamic_axes(
    in_names: list[str], args: tuple[torch.Tensor, ...], dynamic: bool, dims: Mapping | None
) -> dict[str, dict[int, str]]:
    axes = {}
    for name, a in zip(in_names, args):
        if dims is not None and name in dims:
            axes[name] = {int(k): str(v) for k, v in dims[name].items()}
        elif dynamic and a.dim() >= 1:
            axes[name] = {0: "batch"}
            if a.dim() >= 3 or (a.dim() == 2 and not a.is_floating_point()):
                axes[name][1] = "seq"
    return axes


# -- the graph pass: weights become graph inputs in the layout their consumers need --
def _liven(
    graph: onnx.GraphProto, names: dict, canonical: dict[str, str], user_inputs: set[str], fold_transposes: bool
) -> dict[str, str]:
    """Rewrite ``graph`` in place; return canonical name -> storage layout (``identity`` / ``transposed``)."""
    weight_of: dict[str, tuple[str, str]] = {}  # graph tensor -> (canonical param, layout)
    for v in graph.input:
        if v.name in canonical:
            weight_of[v.name] = (canonical[v.name], "identity")
        elif v.name not in user_inputs:
            raise ExportError(f"the exporter made graph input {v.name!r}, which is neither an input nor a parameter")
    absorbed = []  # Identity/Transpose nodes folded into weight names
    for node in graph.node:  # topological order: producers first
        src = weight_of.get(node.input[0]) if node.input else None
        if src is None:
            continue
        if node.op_type == "Identity":
            out = node.output[0]
            # the exporter merges equal-valued parameters: an Identity named after another parameter is that one
            weight_of[out] = (canonical[out], "identity") if out in canonical else src
            absorbed.append(node)
        elif fold_transposes and node.op_type == "Transpose" and _is_2d_swap(node, names[src[0]]):
            weight_of[node.output[0]] = (src[0], "identity" if src[1] == "transposed" else "transposed")
            absorbed.append(node)

    needs: dict[str, set[str]] = {}
    uses = []  # (node, input slot, canonical, layout); (graph output ValueInfo, -1, ...) for a weight output
    absorbed_ids = {id(n) for n in absorbed}
    for node in graph.node:
        if id(node) in absorbed_ids:
            continue
        for i, x in enumerate(node.input):
            if x in weight_of:
                uses.append((node, i) + weight_of[x])
    for o in graph.output:
        if o.name in weight_of and o.name not in canonical:
            uses.append((o, -1) + weight_of[o.name])
    for _, _, canon, layout in uses:
        needs.setdefault(canon, set()).add(layout)
    storage = {c: ("transposed" if lay == {"transposed"} else "identity") for c, lay in needs.items()}

    transposes: dict[str, str] = {}  # canonical -> output of the one Transpose node it keeps
    new_nodes = []
    for _, _, canon, layout in uses:
        if layout != storage[canon] and canon not in transposes:
            transposes[canon] = f"{canon}::T"
            new_nodes.append(helper.make_node("Transpose", [canon], [transposes[canon]], perm=[1, 0]))
    for node, i, canon, layout in uses:
        src = canon if layout == storage[canon] else transposes[canon]
        if i >= 0:
            node.input[i] = src
        else:  # a weight returned as a graph output: keep the name through an Identity
            new_nodes.append(helper.make_node("Identity", [src], [node.name]))
    kept = [n for n in graph.node if id(n) not in absorbed_ids]
    del graph.node[:]
    graph.node.extend(new_nodes + kept)

    user = [v for v in graph.input if v.name in user_inputs]
    del graph.input[:]
    graph.input.extend(user)
    for canon, layout in storage.items():
        t = names[canon]
        shape = list(t.shape)[::-1] if layout == "transposed" else list(t.shape)
        graph.input.append(helper.make_tensor_value_info(canon, TORCH[t.dtype].onnx, shape))
    return storage


def _check_no_frozen_copies(graph: onnx.GraphProto, names: dict[str, torch.Tensor]) -> None:
    """No parameter-sized constant in the graph: a weight traced as a constant would not see switches."""
    shapes = {}
    for n, t in names.items():
        if t.numel() >= 1 << 12:  # small constants (a scale, a bias) may match a parameter's shape by chance
            shapes[tuple(t.shape)] = shapes[tuple(t.shape)[::-1]] = n  # transposed copies too
    for init in graph.initializer:
        name = shapes.get(tuple(init.dims))
        if name is not None:
            raise ExportError(
                f"the exported graph holds a constant {init.name!r} of the shape of parameter {name!r}: that "
                f"weight was frozen into the graph and would not see switches"
            )


def _is_2d_swap(node: onnx.NodeProto, t: torch.Tensor) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return t.dim() == 2 and perm in (None, [1, 0])


# -- files --
def _values(values, wanted: list[str]) -> list[onnx.ValueInfoProto]:
    by_name = {v.name: v for v in values}
    return [by_name[n] for n in wanted]


def _io(v: onnx.ValueInfoProto) -> dict:
    tt = v.type.tensor_type
    dims = [
        d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
        for d in tt.shape.dim
    ]
    return {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}


def _verify(out: Path, args: tuple[torch.Tensor, ...], expected: list[torch.Tensor], tol: float | None = None) -> None:
    from shira_runtime.onnx_backend import OnnxBackend

    backend = OnnxBackend.open(out)
    got = backend(*args)
    got = (got,) if isinstance(got, np.ndarray) else tuple(got)
    if len(got) != len(expected):
        raise ExportError(f"{out}: the graph has {len(got)} outputs, the module returns {len(expected)} tensors")
    for name, g, e in zip(backend.output_names, got, expected):
        t = tol or (1e-3 if e.dtype == torch.float32 and g.dtype != np.float16 else 3e-2)
        e = e.detach().float().numpy()
        g = np.asarray(g, dtype=np.float32)
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        if g.shape != e.shape or not np.allclose(g, e, atol=t * scale, rtol=t):
            err = float(np.abs(g - e).max()) if g.shape == e.shape else float("nan")
            raise ExportError(
                f"{out}: onnxruntime output {name!r} differs from the module's (max abs error {err:.3g}, "
                f"shapes {g.shape} vs {e.shape})"
            )


def write_safetensors(
    path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str], written: Callable[[int], object] | None = None
) -> None:
    """A safetensors file written tensor by tensor from the arrays' own memory (no serialised copy);
    ``written(nbytes)`` is called after each tensor.

    Laid out for mapping (``shira_runtime.bundle.map_weights``): the header is padded with spaces so the data
    starts on a 64-byte boundary, tensors whose size is a multiple of 64 bytes come first (each then starts on a
    64-byte boundary), the rest after them by decreasing item size (each aligned to its items). No gaps between
    tensors, as the format requires."""
    order = sorted(arrays, key=lambda n: (arrays[n].nbytes % ALIGN != 0, -arrays[n].dtype.itemsize))
    header, pos = {"__metadata__": metadata}, 0
    for name in order:
        a = arrays[name]
        header[name] = {
            "dtype": NUMPY[a.dtype.name].safetensors,
            "shape": list(a.shape),
            "data_offsets": [pos, pos + a.nbytes],
        }
        pos += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            a = arrays[name]
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
            if written is not None:
                written(a.nbytes)
