"""Int8 bases in bundles: each ``QuantLinear`` becomes a live int8 matmul over bytes the switch writes in place.

Export: the quantized layers are traced as plain ``nn.Linear`` over their dequantized weights (``placeholders``),
then ``rewrite_int8`` replaces each such weight's ``MatMul(X, Transpose(W))`` / ``Gemm(X, W, transB=1)`` by

    xs = max(amax(|X2d|, per row) / 16383, tiny)                     # [T, 1]: one activation scale per token
    v  = Round(X2d / xs);  hi = Floor((v + 128) / 256);  lo = v - 256 hi   # two bytes: hi in [-64, 64], lo [-128, 127]
    acc = MatMulInteger(u8(Concat(hi, lo) + 128), U, 128, 128)      # [2T, out] int32: U read once for both
    Y  = (256 acc[:T] + acc[T:]) * scale * xs                       # U: uint8 [in, out], bound live

(the form before kept one byte per activation, ``Round(X2d / (amax / 127))``: on a trained model, whose few
outlier channels set each token's scale, that left the logits of SmolLM2-135M 18% of their max off and the
exporter's own check refused the bundle; two bytes: 0.3%, the torch backend's tokens).

``U`` is the transposed zero-point-128 copy of the int8 codes, ``U[c, r] = code[r, c] ^ 0x80``. The exporter's
form ``copy16`` (the default) makes the weight's own graph input ``U`` and the bundle stores it (manifest dtype
``uint8``, layout ``transposed``, shape the logical ``[out, in]``), beside ``<module>.weight_scale`` (fp32
``[out]``): both live graph inputs, mapped from the file. The switch writes ``U`` in place (a uint8 weight of the
kernels, ``shira_runtime.kernels.reference``: the int8 grid math on ``byte - 128`` at transposed indices, so
``(U ^ 0x80).T`` holds the torch backend's codes after every switch). Memory: 1 byte per weight. Older bundles
still load: form ``u8t16`` stored the int8 codes ``[out, in]`` (read by no node) and a graph input
``<module>.weight::u8t`` that the runtime builds from them at load; form ``s8s8`` (below) read the codes.

Why this form (``python -m benchmarks.onnx_quant``, README): u8 x u8 with the weight as B ``[in, out]`` is the
fastest live form onnxruntime 1.32 runs correctly on both CPUs we measured (0.8-1.0x the fp32 live bundle at
64 tokens); MLAS's u8 x s8 kernel saturates its 16-bit pair sums on AVX2 without VNNI, so our signed codes cannot
feed it directly, and s8 activations x s8 codes as the GEMM's A (this module's first form, still read in bundles
exported before the u8t input existed) is correct but 2.6-3x slower at 64 tokens. Per-token activation scales
keep a batch's rows independent. FP8 bases are refused: onnxruntime's CPU provider has no FP8 matmul.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import torch
from onnx import TensorProto, helper
from shira_runtime.quantization import QuantLinear, scale_name
from torch import nn


class QuantExportError(ValueError):
    """A quantized layer cannot be exported (the message names it)."""


@contextmanager
def placeholders(module: nn.Module) -> Iterator[dict[str, QuantLinear]]:
    """Swap every ``QuantLinear`` for an ``nn.Linear`` over its dequantized weight for the trace; yield
    ``{weight key: layer}``; put the quantized layers back afterwards, whatever happens."""
    quant = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in quant.items():
        if layer.format != "int8":
            raise QuantExportError(
                f"layer {name!r} is quantized to {layer.format}: bundles hold int8 bases only (onnxruntime's CPU "
                f"provider has no FP8 matmul); run this base on the torch backend (Runtime.load(module))"
            )
        if not name:
            raise QuantExportError("the module itself is a QuantLinear: export a model that contains it")
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    swapped = []
    try:
        for name, layer in quant.items():
            parent, _, attr = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            dtype = layer.bias.dtype if layer.bias is not None else (floats[0] if floats else torch.float32)
            lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            lin.weight = nn.Parameter(layer.dequantize_weight().to(dtype), requires_grad=False)
            if layer.bias is not None:
                lin.bias = layer.bias
            setattr(owner, attr, lin)
            swapped.append((owner, attr, layer))
        yield {f"{n}.weight": m for n, m in quant.items()}
    finally:
        for owner, attr, layer in swapped:
            setattr(owner, attr, layer)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def u8t_name(key: str) -> str:
    """The graph input of a quantized weight's transposed uint8 copy (the module doc's ``U``)."""
    return f"{key}::u8t"


def rewrite_int8(model: onnx.ModelProto, quant: dict[str, QuantLinear], form: str = "copy16") -> None:
    """In place: every use of a quantized weight input becomes the int8 chain of the module doc, and its scale
    ``<module>.weight_scale`` fp32 ``[out]`` joins the inputs. ``form``: ``"copy16"`` (the default) two-byte
    activations over the weight input itself, which turns uint8 ``[in, out]`` (``U``: the bundle stores the copy,
    not the codes); ``"u8t16"`` the same chain over a copy ``<key>::u8t`` uint8 ``[in, out]`` the runtime builds
    from the weight input, which turns int8 ``[out, in]`` (the form before); ``"u8t"`` one-byte activations over
    that copy (off by up to 18% of the logits on a real model); ``"s8s8"`` the first form (the codes as the GEMM's
    A, no copy). Tests use the older forms to build the bundles earlier versions wrote."""
    if form not in FORMS:
        raise ValueError(f"int8 form must be one of {FORMS}, got {form!r}")
    graph = model.graph
    if not quant:
        return
    opset = _opset(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    elem = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    drop, replace = set(), {}  # ids of nodes removed; id(node) -> list of new nodes
    consts = constants("u8t16" if form == "copy16" else form)
    new_inputs = []
    for count, (key, layer) in enumerate(quant.items()):
        if key not in elem:
            raise QuantExportError(f"quantized weight {key!r} is not a graph input of the export (unused, or tied?)")
        float_type = elem[key]
        out_f, in_f = layer.out_features, layer.in_features
        scale_key = scale_name(key)
        w_in = u8t_name(key) if form in ("u8t16", "u8t") else key  # what the chains read
        chain_form = "u8t16" if form == "copy16" else form
        for use in consumers.get(key, []):
            p = f"q8::{count}"
            if use.op_type == "Transpose" and _perm(use) in (None, [1, 0]):
                mms = consumers.get(use.output[0], [])
                if not mms or any(m.op_type != "MatMul" or m.input[1] != use.output[0] for m in mms):
                    raise QuantExportError(f"quantized weight {key!r}: its transpose feeds {[m.op_type for m in mms]}")
                drop.add(id(use))
                for j, m in enumerate(mms):
                    replace[id(m)] = _chain(
                        f"{p}.{j}", m.input[0], w_in, scale_key, out_f, in_f, m.output[0], float_type, opset, chain_form
                    )
            elif use.op_type == "Gemm" and use.input[1] == key and _gemm_plain(use):
                y = use.output[0] if len(use.input) < 3 else f"{p}::nobias"
                nodes = _chain(p, use.input[0], w_in, scale_key, out_f, in_f, y, float_type, opset, chain_form)
                if len(use.input) >= 3:
                    nodes.append(helper.make_node("Add", [y, use.input[2]], [use.output[0]]))
                replace[id(use)] = nodes
            else:
                raise QuantExportError(
                    f"quantized weight {key!r} feeds {use.op_type} (node {use.name!r}); only linear layers "
                    f"(MatMul of its transpose, or Gemm with transB=1) can read int8 codes"
                )
        new_inputs.append(helper.make_tensor_value_info(scale_key, TensorProto.FLOAT, [out_f]))
        if form in ("u8t16", "u8t"):
            new_inputs.append(helper.make_tensor_value_info(u8t_name(key), TensorProto.UINT8, [in_f, out_f]))
        for v in graph.input:
            if v.name == key:
                stored = (TensorProto.UINT8, [in_f, out_f]) if form == "copy16" else (TensorProto.INT8, [out_f, in_f])
                v.CopyFrom(helper.make_tensor_value_info(key, *stored))
    nodes = []
    for n in graph.node:
        if id(n) in drop:
            continue
        nodes.extend(replace.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(new_inputs)
    read = {x for n in nodes for x in n.input}  # only the constants a chain reads: onnxruntime warns of the rest
    graph.initializer.extend(c for name, c in consts.items() if name in read)


FORMS = ("copy16", "u8t16", "u8t", "s8s8")
ACT_LIMIT16 = 16383  # two-byte activations: |round(x / xs)| <= 2^14 - 1, split into hi * 256 + lo


def constants(form: str = "u8t16") -> dict[str, onnx.TensorProto]:
    """The scalar initializers every int8 chain of ``form`` reads (shared by all of a graph's chains)."""
    t = helper.make_tensor
    common = {
        "q8::127": t("q8::127", TensorProto.FLOAT, [], [127.0]),
        "q8::tiny": t("q8::tiny", TensorProto.FLOAT, [], [1e-30]),
        "q8::axis1": t("q8::axis1", TensorProto.INT64, [1], [1]),
        "q8::zero": t("q8::zero", TensorProto.INT64, [1], [0]),
        "q8::last": t("q8::last", TensorProto.INT64, [1], [-1]),
    }
    if form == "s8s8":
        return common | {"q8::-127": t("q8::-127", TensorProto.FLOAT, [], [-127.0])}
    if form == "u8t16":
        return common | {
            "q8::lim16": t("q8::lim16", TensorProto.FLOAT, [], [float(ACT_LIMIT16)]),
            "q8::-lim16": t("q8::-lim16", TensorProto.FLOAT, [], [-float(ACT_LIMIT16)]),
            "q8::128": t("q8::128", TensorProto.FLOAT, [], [128.0]),
            "q8::256": t("q8::256", TensorProto.FLOAT, [], [256.0]),
            "q8::zp": t("q8::zp", TensorProto.UINT8, [], [128]),
            "q8::i0": t("q8::i0", TensorProto.INT64, [], [0]),
            "q8::i1": t("q8::i1", TensorProto.INT64, [], [1]),
        }
    return common | {
        "q8::128": t("q8::128", TensorProto.FLOAT, [], [128.0]),
        "q8::1": t("q8::1", TensorProto.FLOAT, [], [1.0]),
        "q8::255": t("q8::255", TensorProto.FLOAT, [], [255.0]),
        "q8::zp": t("q8::zp", TensorProto.UINT8, [], [128]),
    }


def int8_linear(
    x: str, weight: str, scale: str, out_f: int, in_f: int, y: str, opset: int = 17, form: str = "u8t16"
) -> list:
    """The int8 chain for fp32 ``x``: ``form="u8t16"`` the chain the exporter writes (``weight``: the uint8
    ``[in, out]`` copy; two-byte activations; the exporter's ``copy16`` form is this chain over the stored copy),
    ``"u8t"`` one-byte activations over the same copy, ``"s8s8"`` the first form (``weight``: the int8 codes
    ``[out, in]`` as the GEMM's A); benchmarks time them alone."""
    return _chain("q8::lin", x, weight, scale, out_f, in_f, y, TensorProto.FLOAT, opset, form)


def _perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _gemm_plain(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        attrs.get("transB") == 1
        and not attrs.get("transA")
        and attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0
    )


def _chain(
    p: str, x: str, w: str, scale: str, out_f: int, in_f: int, y: str, float_type: int, opset: int, form: str = "u8t16"
) -> list:
    """The int8 linear of the module doc, ``X [..., in]`` -> ``Y [..., out]``, every name prefixed by ``p``
    (``form``: see ``int8_linear``)."""
    mk = helper.make_node
    n = [
        mk("Shape", [x], [f"{p}.shape"]),
        mk("Slice", [f"{p}.shape", "q8::zero", "q8::last"], [f"{p}.lead"]),
        mk("Constant", [], [f"{p}.out"], value=helper.make_tensor(f"{p}.outv", TensorProto.INT64, [1], [out_f])),
        mk("Concat", [f"{p}.lead", f"{p}.out"], [f"{p}.yshape"], axis=0),
        mk("Constant", [], [f"{p}.in2d"], value=helper.make_tensor(f"{p}.in2dv", TensorProto.INT64, [2], [-1, in_f])),
        mk("Reshape", [x, f"{p}.in2d"], [f"{p}.x2d0"]),
    ]
    x2d = f"{p}.x2d0"
    if float_type != TensorProto.FLOAT:
        n.append(mk("Cast", [x2d], [f"{p}.x2d"], to=TensorProto.FLOAT))
        x2d = f"{p}.x2d"
    if form == "u8t16":
        return _chain16(n, p, x2d, w, scale, out_f, y, float_type, opset)
    n += [
        mk("Abs", [x2d], [f"{p}.abs"]),
        (  # [T, 1]; opset 18 moved ReduceMax's axes from an attribute to an input
            mk("ReduceMax", [f"{p}.abs", "q8::axis1"], [f"{p}.amax"], keepdims=1)
            if opset >= 18
            else mk("ReduceMax", [f"{p}.abs"], [f"{p}.amax"], axes=[1], keepdims=1)
        ),
        mk("Div", [f"{p}.amax", "q8::127"], [f"{p}.xs0"]),
        mk("Max", [f"{p}.xs0", "q8::tiny"], [f"{p}.xs"]),
        mk("Div", [x2d, f"{p}.xs"], [f"{p}.xd"]),
        mk("Round", [f"{p}.xd"], [f"{p}.xr"]),  # ties to even
    ]
    if form == "u8t":
        n += [
            mk("Add", [f"{p}.xr", "q8::128"], [f"{p}.xo"]),
            mk("Clip", [f"{p}.xo", "q8::1", "q8::255"], [f"{p}.xc"]),
            mk("Cast", [f"{p}.xc"], [f"{p}.xq"], to=TensorProto.UINT8),  # [T, in], zero point 128
            mk("MatMulInteger", [f"{p}.xq", w, "q8::zp", "q8::zp"], [f"{p}.acc"]),  # [T, out] int32, B read in place
            mk("Cast", [f"{p}.acc"], [f"{p}.accf"], to=TensorProto.FLOAT),
            mk("Mul", [f"{p}.accf", scale], [f"{p}.ys"]),  # the weight scales on the output columns
            mk("Mul", [f"{p}.ys", f"{p}.xs"], [f"{p}.y2d"]),
        ]
        return _reshape_back(n, p, y, float_type)
    n += [
        mk("Clip", [f"{p}.xr", "q8::-127", "q8::127"], [f"{p}.xc"]),
        mk("Cast", [f"{p}.xc"], [f"{p}.xq"], to=TensorProto.INT8),
        mk("Transpose", [f"{p}.xq"], [f"{p}.xqt"], perm=[1, 0]),  # [in, T]
        mk("MatMulInteger", [w, f"{p}.xqt"], [f"{p}.acc"]),  # [out, T] int32, the codes as A (read in place)
        mk("Cast", [f"{p}.acc"], [f"{p}.accf"], to=TensorProto.FLOAT),
        mk("Unsqueeze", [scale, "q8::axis1"], [f"{p}.scol"]),  # [out, 1]
        mk("Mul", [f"{p}.accf", f"{p}.scol"], [f"{p}.ys"]),
        mk("Transpose", [f"{p}.ys"], [f"{p}.yt"], perm=[1, 0]),  # [T, out]
        mk("Mul", [f"{p}.yt", f"{p}.xs"], [f"{p}.y2d"]),
    ]
    return _reshape_back(n, p, y, float_type)


def _chain16(n: list, p: str, x2d: str, w: str, scale: str, out_f: int, y: str, float_type: int, opset: int) -> list:
    """Two-byte activations over the live uint8 copy: ``v = round(X2d / xs)`` with ``xs = amax / 16383`` per token
    is split into ``hi * 256 + lo`` (``lo`` in [-128, 127], ``hi`` in [-64, 64]); both halves go through one
    ``MatMulInteger`` as ``2T`` rows (zero point 128: the weight is read once) and ``Y = (256 acc_hi + acc_lo) *
    scale * xs``. The activations keep 15 bits per token instead of 8: a trained model's outlier channels set
    the per-token scale, and one byte left the other channels a few levels (measured on SmolLM2: logits 18% of
    their max off with one byte, 0.3% with two)."""
    mk = helper.make_node
    n += [
        mk("Abs", [x2d], [f"{p}.abs"]),
        (
            mk("ReduceMax", [f"{p}.abs", "q8::axis1"], [f"{p}.amax"], keepdims=1)
            if opset >= 18
            else mk("ReduceMax", [f"{p}.abs"], [f"{p}.amax"], axes=[1], keepdims=1)
        ),
        mk("Div", [f"{p}.amax", "q8::lim16"], [f"{p}.xs0"]),
        mk("Max", [f"{p}.xs0", "q8::tiny"], [f"{p}.xs"]),  # [T, 1]
        mk("Div", [x2d, f"{p}.xs"], [f"{p}.xd"]),
        mk("Round", [f"{p}.xd"], [f"{p}.xr0"]),
        mk("Clip", [f"{p}.xr0", "q8::-lim16", "q8::lim16"], [f"{p}.xr"]),  # NaN-free inputs stay within anyway
        mk("Add", [f"{p}.xr", "q8::128"], [f"{p}.xh0"]),
        mk("Div", [f"{p}.xh0", "q8::256"], [f"{p}.xh1"]),
        mk("Floor", [f"{p}.xh1"], [f"{p}.hi"]),  # [-64, 64]
        mk("Mul", [f"{p}.hi", "q8::256"], [f"{p}.hi256"]),
        mk("Sub", [f"{p}.xr", f"{p}.hi256"], [f"{p}.lo"]),  # [-128, 127], exact in fp32
        mk("Concat", [f"{p}.hi", f"{p}.lo"], [f"{p}.hl"], axis=0),  # [2T, in]
        mk("Add", [f"{p}.hl", "q8::128"], [f"{p}.hlo"]),
        mk("Cast", [f"{p}.hlo"], [f"{p}.xq"], to=TensorProto.UINT8),  # zero point 128
        mk("MatMulInteger", [f"{p}.xq", w, "q8::zp", "q8::zp"], [f"{p}.acc"]),  # [2T, out] int32, B read in place
        mk("Cast", [f"{p}.acc"], [f"{p}.accf"], to=TensorProto.FLOAT),
        mk("Constant", [], [f"{p}.s3"], value=helper.make_tensor(f"{p}.s3v", TensorProto.INT64, [3], [2, -1, out_f])),
        mk("Reshape", [f"{p}.accf", f"{p}.s3"], [f"{p}.acc3"]),  # [2, T, out]
        mk("Gather", [f"{p}.acc3", "q8::i0"], [f"{p}.ahi"], axis=0),
        mk("Gather", [f"{p}.acc3", "q8::i1"], [f"{p}.alo"], axis=0),
        mk("Mul", [f"{p}.ahi", "q8::256"], [f"{p}.ahi256"]),
        mk("Add", [f"{p}.ahi256", f"{p}.alo"], [f"{p}.accv"]),
        mk("Mul", [f"{p}.accv", scale], [f"{p}.ys"]),
        mk("Mul", [f"{p}.ys", f"{p}.xs"], [f"{p}.y2d"]),
    ]
    return _reshape_back(n, p, y, float_type)


def _reshape_back(n: list, p: str, y: str, float_type: int) -> list:
    mk = helper.make_node
    y2d = f"{p}.y2d"
    if float_type != TensorProto.FLOAT:
        n.append(mk("Cast", [y2d], [f"{p}.y2dc"], to=float_type))
        y2d = f"{p}.y2dc"
    n.append(mk("Reshape", [y2d, f"{p}.yshape"], [y]))
    return n
