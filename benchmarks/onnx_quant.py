"""onnxruntime forms of one int8 linear: which stays live, and how fast, against a default
prepacked int8 session and our fp32 live form.

    python -m benchmarks.onnx_quant                  # llama-1b linear shapes, 1 and 64 tokens
    python -m benchmarks.onnx_quant --quick          # small shapes, few repeats
    python -m benchmarks.onnx_quant --json out.json
    python -m benchmarks.onnx_quant --forms "u8u8 B" "add_initializer MatMulInteger"   # some forms (+ fp32 live)

The weight is our int8 format (``runtime/qformats``): codes int8 ``[out, in]`` in [-127, 127] and one fp32 scale
per output row, ``W = code * scale[row]``. Each form is a one-linear ONNX graph (``onnx.helper``):

- ``fp32 live``: the fp32 weight as a graph input bound zero-copy (IOBinding over a numpy buffer), spelled as the
  live bundle spells it: ``Gemm(X, W, transB=1)`` for one token, ``Transpose(Gemm(W, X, transB=1))`` (weight as
  GEMM A) for a batch.
- ``int8 prepacked ...``: the codes as initializers, fully optimized, prepacked: what a plain int8 export gets.
  ``DQ->Gemm``: ``DequantizeLinear(axis=0) -> Gemm(transB=1)``; ``MatMulInteger``: ``DynamicQuantizeLinear(X)``
  -> ``MatMulInteger(Xq, codes^T)`` -> scales (the pattern ``quantize_dynamic`` writes; onnxruntime fuses it into
  ``DynamicQuantizeMatMul`` and packs B); ``MatMulNBits``: com.microsoft, 8 bits, one block per row (block size =
  in), unsigned codes ``code + 128`` with the default zero point 128, int8 activations (``accuracy_level=4``).
- ``int8 file folded to fp32``: the ``DQ->Gemm`` graph with ``session.disable_quant_qdq``, so constant folding
  turns the codes into onnxruntime's own fp32 weight (4x the memory; not an int8 session, shown for reference).
- ``int8 live ...``: the codes and scales as graph inputs bound zero-copy: ``DQ->Gemm`` (spelled as the fp32 live
  form), ``MatMulInteger`` with the weight as A (``MatMulInteger(codes, Xq^T)``, so no per-run transpose of the
  weight), ``MatMulInteger`` with the weight as B, which needs the codes stored transposed (``[in, out]``: a
  layout our format does not have; the switch would map its indices), ``MatMulNBits`` with B a graph input.
- ``int8 add_initializer ...``: the codes handed to ``SessionOptions.add_initializer`` as an OrtValue over our
  numpy buffer, with ``session.disable_prepacking``; ``noopt`` also turns graph optimizations off, ``opt``
  keeps them (constant folding leaves a DequantizeLinear alone unless ``session.disable_quant_qdq`` is set).

Liveness: after the session is created, the user's buffers are written in place (rows negated, codes changed, a
scale doubled) and the next run must equal ``x @ (code * scale).T`` of the new values; a form whose output still
matches the old weight is reported ``frozen``, one matching neither ``wrong``; the buffers are then restored and
checked again. A form onnxruntime refuses is reported with its error. Timings are medians of rounds that
interleave all forms of one shape and token count (``benchmarks.timing.cycles``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from shira_runtime.table import print_table

from benchmarks.common import progress
from benchmarks.timing import cycles

LLAMA_1B = ((2048, 2048), (8192, 2048), (2048, 8192))  # [out, in]: q_proj, up/gate_proj, down_proj
QUICK = ((64, 64), (256, 64), (64, 256))
TOKENS = (1, 64)
OPSET = 21

EXACT_TOL = 1e-4  # relative to max |y|: fp32 compute of the dequantized weight
DYNAMIC_TOL = 3e-2  # the same with 8-bit activations (DynamicQuantizeLinear, MatMulNBits accuracy_level 4)
ACT16_TOL = 1e-3  # with two-byte (15-bit) per-token activations


@dataclass(frozen=True)
class Config:
    shapes: tuple[tuple[int, int], ...] = LLAMA_1B
    tokens: tuple[int, ...] = TOKENS
    repeats: int = 15
    threads: int = 2
    seed: int = 0
    only: tuple[str, ...] = ()  # substrings of form names to run (empty: all); the fp32 live form always runs


@dataclass(frozen=True)
class Row:
    shape: str  # out x in
    form: str
    live: str  # live | frozen | wrong | error
    rel_err: float | None  # max |y - ref| / max |ref| on the first run
    ms: dict[int, float] = field(default_factory=dict)  # tokens -> median ms
    vs_prepacked: dict[int, float] = field(default_factory=dict)  # tokens -> ms / best prepacked int8 ms
    vs_fp32: dict[int, float] = field(default_factory=dict)  # tokens -> ms / fp32 live ms
    error: str = ""


# -- graphs --
def _vi(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes: list, inputs: list, inits: list, k: int, n: int) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "linear", [_vi("x", TensorProto.FLOAT, ["T", k]), *inputs], [_vi("y", TensorProto.FLOAT, ["T", n])]
    )
    g.initializer.extend(inits)
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    return m


def _gemm(w: str, weight_a: bool) -> list:
    """``y = x @ w.T`` as the live bundle spells it: w as GEMM B for one token, as GEMM A for a batch."""
    if not weight_a:
        return [helper.make_node("Gemm", ["x", w], ["y"], transB=1)]
    return [helper.make_node("Gemm", [w, "x"], ["yt"], transB=1), helper.make_node("Transpose", ["yt"], ["y"])]


def dq_gemm(n: int, k: int, weight_a: bool, codes_init: np.ndarray | None = None) -> onnx.ModelProto:
    """``DequantizeLinear(codes, scale, axis=0) -> Gemm``; codes and scale graph inputs unless ``codes_init``."""
    nodes = [helper.make_node("DequantizeLinear", ["codes", "scale"], ["w"], axis=0), *_gemm("w", weight_a)]
    weights = [_vi("codes", TensorProto.INT8, [n, k]), _vi("scale", TensorProto.FLOAT, [n])]
    if codes_init is None:
        return _model(nodes, weights, [], k, n)
    inits = [numpy_helper.from_array(codes_init[0], "codes"), numpy_helper.from_array(codes_init[1], "scale")]
    return _model(nodes, [], inits, k, n)


def fp32_gemm(n: int, k: int, weight_a: bool) -> onnx.ModelProto:
    return _model(_gemm("w", weight_a), [_vi("w", TensorProto.FLOAT, [n, k])], [], k, n)


def mmi_b(n: int, k: int, codes: np.ndarray | None, scale: np.ndarray | None, unsigned: bool) -> onnx.ModelProto:
    """What ``quantize_dynamic`` writes for ``MatMul(x, W^T)``: ``DynamicQuantizeLinear(x)``,
    ``MatMulInteger(xq, codes^T)`` (B ``[in, out]``), then the activation and weight scales. ``unsigned``: B as
    ``code + 128`` with zero point 128 (u8 x u8); otherwise our int8 codes (u8 x s8). ``codes`` None: B
    (``codes_t``, uint8 ``[in, out]``) and ``scale`` are graph inputs."""
    zp = ["codes_zp"] if unsigned else []
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "codes_t", "xz", *zp], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "scale"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(128, np.uint8), "codes_zp")] if unsigned else []
    if codes is None:
        inputs = [_vi("codes_t", TensorProto.UINT8, [k, n]), _vi("scale", TensorProto.FLOAT, [n])]
        return _model(nodes, inputs, inits, k, n)
    b = np.ascontiguousarray((nbits_codes(codes)[:, 0] if unsigned else codes).T)
    inits += [numpy_helper.from_array(b, "codes_t"), numpy_helper.from_array(scale, "scale")]
    return _model(nodes, [], inits, k, n)


def mmi_b_token(n: int, k: int) -> onnx.ModelProto:
    """The int8 bundle's form (``shira_runtime.exporters.quant_graph``): u8 x u8 with B the transposed ``code + 128``
    copy
    ``[in, out]`` (zero point 128) and **per-token** activations (``round(x / xs) + 128``, zero point 128), so rows
    stay independent; the weight scales on the output columns."""
    from shira_runtime.exporters.quant_graph import constants, int8_linear

    nodes = int8_linear("x", "codes_t", "scale", n, k, "y", OPSET, form="u8t")
    inputs = [_vi("codes_t", TensorProto.UINT8, [k, n]), _vi("scale", TensorProto.FLOAT, [n])]
    return _model(nodes, inputs, list(constants("u8t").values()), k, n)


def mmi_b_token16(n: int, k: int) -> onnx.ModelProto:
    """The int8 bundle's form since two-byte activations: ``mmi_b_token``'s weight copy, activations kept to 15
    bits per token (``round(x / xs)`` split into ``hi * 256 + lo``, both halves one ``MatMulInteger`` of 2T rows)."""
    from shira_runtime.exporters.quant_graph import constants, int8_linear

    nodes = int8_linear("x", "codes_t", "scale", n, k, "y", OPSET, form="u8t16")
    inputs = [_vi("codes_t", TensorProto.UINT8, [k, n]), _vi("scale", TensorProto.FLOAT, [n])]
    return _model(nodes, inputs, list(constants("u8t16").values()), k, n)


def mmi_a(n: int, k: int) -> onnx.ModelProto:
    """Live ``MatMulInteger`` with the weight as A: ``(ucodes - 128) [out, in] @ (xq - xz)^T``, scales on the
    rows; A is MatMulNBits' unsigned codes ``[out, 1, in]`` (u8 x u8: onnxruntime has no fused s8 x u8 kernel)."""
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("Transpose", ["xq"], ["xqt"]),
        helper.make_node("Reshape", ["b", "nk"], ["a"]),
        helper.make_node("MatMulInteger", ["a", "xqt", "zp", "xz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["scale", "one"], ["scol"]),
        helper.make_node("Mul", ["scol", "xs"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["yt"]),
        helper.make_node("Transpose", ["yt"], ["y"]),
    ]
    inputs = [_vi("b", TensorProto.UINT8, [n, 1, k]), _vi("scale", TensorProto.FLOAT, [n])]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([n, k], np.int64), "nk"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
    ]
    return _model(nodes, inputs, inits, k, n)


def s8s8_a(n: int, k: int) -> onnx.ModelProto:
    """The int8 bundle's first form (``shira_runtime.exporters.quant_graph``, ``form="s8s8"``): per-token int8
    activations,
    ``MatMulInteger(codes, xq^T)`` with our int8 codes ``[out, in]`` as A, scales on the rows."""
    from shira_runtime.exporters.quant_graph import constants, int8_linear

    nodes = int8_linear("x", "codes", "scale", n, k, "y", OPSET, form="s8s8")
    inputs = [_vi("codes", TensorProto.INT8, [n, k]), _vi("scale", TensorProto.FLOAT, [n])]
    return _model(nodes, inputs, list(constants("s8s8").values()), k, n)


def nbits(n: int, k: int, init: tuple[np.ndarray, np.ndarray] | None = None) -> onnx.ModelProto:
    """``MatMulNBits`` (com.microsoft), 8 bits, one block per row: B ``[out, 1, in]`` uint8 ``code + 128``."""
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "scale"], ["y"], domain="com.microsoft", K=k, N=n, bits=8, block_size=k,
        accuracy_level=4,
    )  # fmt: skip
    if init is None:
        inputs = [_vi("b", TensorProto.UINT8, [n, 1, k]), _vi("scale", TensorProto.FLOAT, [n])]
        return _model([node], inputs, [], k, n)
    return _model([node], [], [numpy_helper.from_array(init[0], "b"), numpy_helper.from_array(init[1], "scale")], k, n)


def nbits_codes(codes: np.ndarray) -> np.ndarray:
    """Our int8 codes as MatMulNBits' unsigned 8-bit codes (zero point 128): ``code + 128``, a flip of the top bit."""
    return (codes.view(np.uint8) ^ np.uint8(0x80)).reshape(codes.shape[0], 1, codes.shape[1])


# -- sessions --
class Weights:
    """The user's buffers: the int8 codes and scales (and what a form keeps of them: the fp32 weight, or the
    unsigned codes of MatMulNBits), written in place by ``write``."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray) -> None:
        self.codes, self.scale = codes, scale
        self.fp32 = codes.astype(np.float32) * scale[:, None]
        self.ucodes = nbits_codes(codes)
        self.ucodes_t = np.ascontiguousarray(self.ucodes[:, 0].T)  # [in, out]: MatMulInteger's B layout

    def write(self, codes: np.ndarray, scale: np.ndarray) -> None:
        self.codes[...] = codes
        self.scale[...] = scale
        self.fp32[...] = codes.astype(np.float32) * scale[:, None]
        self.ucodes[...] = nbits_codes(codes)
        self.ucodes_t[...] = self.ucodes[:, 0].T


@dataclass
class Form:
    name: str
    make: Callable[[Weights, int], Callable[[np.ndarray], np.ndarray]]  # (weights, tokens) -> run(x)
    tol: float = EXACT_TOL
    prepacked: bool = False  # a default int8 session, the baseline "prepacked" ratios divide by
    fp32: bool = False


def _opts(threads: int, optimize: bool = True, prepack: bool = True, fold_dq: bool = False) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if not prepack:
        o.add_session_config_entry("session.disable_prepacking", "1")
    if fold_dq:
        # by default constant folding leaves DequantizeLinear alone (kept for QDQ fusions); without the QDQ
        # transformers it folds DQ(initializer) into an fp32 initializer, which the Gemm then prepacks
        o.add_session_config_entry("session.disable_quant_qdq", "1")
    return o


def bound(model: onnx.ModelProto, arrays: dict[str, np.ndarray], threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A session whose weight inputs are bound once, zero-copy, over ``arrays`` (as the live bundle binds them)."""
    s = ort.InferenceSession(model.SerializeToString(), _opts(threads), providers=["CPUExecutionProvider"])
    b = s.io_binding()
    keep = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}  # shares the numpy memory on CPU
    for k, v in keep.items():
        b.bind_ortvalue_input(k, v)

    def run(x: np.ndarray) -> np.ndarray:
        b.bind_cpu_input("x", x)
        b.bind_output("y")
        s.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    run.keep = (s, keep)  # type: ignore[attr-defined]
    return run


def plain(
    model: onnx.ModelProto, threads: int, shared: dict[str, np.ndarray] | None = None, **opts: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """A session over initializers: the graph's own (copied into onnxruntime), or ``shared`` numpy buffers handed
    over with ``add_initializer``."""
    o = _opts(threads, **opts)
    keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in (shared or {}).values()]
    for k, v in zip(shared or {}, keep):
        o.add_initializer(k, v)
    s = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return s.run(["y"], {"x": x})[0]

    run.keep = (s, keep)  # type: ignore[attr-defined]
    return run


def forms(threads: int) -> list[Form]:
    t = threads

    def fp32_live(w: Weights, tokens: int):
        return bound(fp32_gemm(*w.codes.shape, tokens > 1), {"w": w.fp32}, t)

    def dq_prepacked(w: Weights, tokens: int):
        return plain(dq_gemm(*w.codes.shape, False, (w.codes.copy(), w.scale.copy())), t)

    def dq_folded(w: Weights, tokens: int):
        return plain(dq_gemm(*w.codes.shape, False, (w.codes.copy(), w.scale.copy())), t, fold_dq=True)

    def mmi_prepacked(unsigned: bool):
        return lambda w, tokens: plain(mmi_b(*w.codes.shape, w.codes, w.scale, unsigned), t)

    def nbits_prepacked(w: Weights, tokens: int):
        return plain(nbits(*w.codes.shape, (w.ucodes.copy(), w.scale.copy())), t)

    def dq_live(w: Weights, tokens: int):
        return bound(dq_gemm(*w.codes.shape, tokens > 1), {"codes": w.codes, "scale": w.scale}, t)

    def mmi_live(w: Weights, tokens: int):
        return bound(mmi_a(*w.codes.shape), {"b": w.ucodes, "scale": w.scale}, t)

    def s8s8_live(w: Weights, tokens: int):
        return bound(s8s8_a(*w.codes.shape), {"codes": w.codes, "scale": w.scale}, t)

    def mmi_b_live(w: Weights, tokens: int):
        return bound(mmi_b(*w.codes.shape, None, None, True), {"codes_t": w.ucodes_t, "scale": w.scale}, t)

    def mmi_b_token_live(w: Weights, tokens: int):
        return bound(mmi_b_token(*w.codes.shape), {"codes_t": w.ucodes_t, "scale": w.scale}, t)

    def mmi_b_token16_live(w: Weights, tokens: int):
        return bound(mmi_b_token16(*w.codes.shape), {"codes_t": w.ucodes_t, "scale": w.scale}, t)

    def mmi_b_addinit(w: Weights, tokens: int):
        m = mmi_b(*w.codes.shape, w.codes, w.scale, True)
        return plain(m, t, {"codes_t": w.ucodes_t, "scale": w.scale}, prepack=False)

    def nbits_live(w: Weights, tokens: int):
        return bound(nbits(*w.codes.shape), {"b": w.ucodes, "scale": w.scale}, t)

    def dq_addinit(optimize: bool):
        def make(w: Weights, tokens: int):
            # the graph's own initializers (copies) are replaced by ours
            m = dq_gemm(*w.codes.shape, tokens > 1, (w.codes, w.scale))
            return plain(m, t, {"codes": w.codes, "scale": w.scale}, optimize=optimize, prepack=False)

        return make

    def nbits_addinit(w: Weights, tokens: int):
        m = nbits(*w.codes.shape, (w.ucodes, w.scale))
        return plain(m, t, {"b": w.ucodes, "scale": w.scale}, optimize=False, prepack=False)

    return [
        Form("fp32 live (Gemm, bound)", fp32_live, fp32=True),
        Form("int8 prepacked DQ->Gemm", dq_prepacked, prepacked=True),
        Form("int8 file folded to fp32 (disable_quant_qdq)", dq_folded),
        Form("int8 prepacked MatMulInteger u8s8", mmi_prepacked(False), DYNAMIC_TOL, prepacked=True),
        Form("int8 prepacked MatMulInteger u8u8", mmi_prepacked(True), DYNAMIC_TOL, prepacked=True),
        Form("int8 prepacked MatMulNBits", nbits_prepacked, DYNAMIC_TOL, prepacked=True),
        Form("int8 live DQ->Gemm (bound)", dq_live),
        Form("int8 live MatMulInteger u8u8 A (bound)", mmi_live, DYNAMIC_TOL),
        Form("int8 live MatMulInteger u8u8 B [in,out] (bound)", mmi_b_live, DYNAMIC_TOL),
        Form("int8 live MatMulInteger u8u8 B per-token 2-byte (bound; bundle's form)", mmi_b_token16_live, ACT16_TOL),
        Form("int8 live MatMulInteger u8u8 B per-token (bound; bundle's 1-byte form)", mmi_b_token_live, DYNAMIC_TOL),
        Form("int8 live MatMulInteger s8s8 A, per-token (bound; the bundle's first form)", s8s8_live, DYNAMIC_TOL),
        Form("int8 live MatMulNBits (bound)", nbits_live, DYNAMIC_TOL),
        Form("int8 add_initializer DQ->Gemm noopt", dq_addinit(False)),
        Form("int8 add_initializer DQ->Gemm opt", dq_addinit(True)),
        Form("int8 add_initializer MatMulInteger u8u8 [in,out] opt", mmi_b_addinit, DYNAMIC_TOL),
        Form("int8 add_initializer MatMulNBits noopt", nbits_addinit, DYNAMIC_TOL),
    ]


# -- liveness --
def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our int8 format: symmetric per-row scale ``amax / 127`` (1 for an all-zero row), codes in [-127, 127]."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def reference(x: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) @ (codes.astype(np.float64) * scale[:, None]).T).astype(np.float32)


def edited(codes: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A switch-like in-place edit: every other row negated, a few codes rewritten (the extremes included), every
    third row's scale doubled (so a form that reads codes live but keeps its own scales is caught)."""
    c, s = codes.copy(), scale.copy()
    c[::2] = -c[::2]
    idx = rng.choice(c.size, size=max(4, c.size // 100), replace=False)
    c.flat[idx] = rng.integers(-127, 128, size=idx.size, dtype=np.int8)
    c.flat[idx[:2]] = (127, -127)
    s[::3] *= 2
    return c, s


def verdict(run: Callable[[np.ndarray], np.ndarray], w: Weights, x: np.ndarray, tol: float, seed: int) -> tuple:
    """(verdict, first-run error): write the user's buffers in place, run, and compare with both weights."""
    old = w.codes.copy(), w.scale.copy()
    err = rel_err(run(x), reference(x, *old))
    if err > tol:
        return "wrong", err
    new = edited(*old, np.random.default_rng(seed))
    w.write(*new)
    try:
        y = run(x)
    finally:
        w.write(*old)
    e_new, e_old = rel_err(y, reference(x, *new)), rel_err(y, reference(x, *old))
    if e_new <= tol:
        # and back: the restored buffers give the first output again
        return ("live" if rel_err(run(x), reference(x, *old)) <= tol else "wrong"), err
    return ("frozen" if e_old <= tol else "wrong"), err


# -- the run --
def shape_rows(cfg: Config, n: int, k: int) -> list[Row]:
    rng = np.random.default_rng(cfg.seed)
    codes, scale = quantize_rows(rng.standard_normal((n, k), dtype=np.float32) * 0.02)
    w = Weights(codes, scale)
    xs = {t: rng.standard_normal((t, k), dtype=np.float32) for t in cfg.tokens}
    live: dict[str, str] = {}
    errs: dict[str, float | None] = {}
    failures: dict[str, str] = {}
    runs: dict[int, dict[str, Callable[[], object]]] = {t: {} for t in cfg.tokens}
    all_forms = [
        f for f in forms(cfg.threads) if f.fp32 or not cfg.only or any(o.lower() in f.name.lower() for o in cfg.only)
    ]
    for f in all_forms:
        for t in cfg.tokens:
            if f.name in failures:
                continue
            try:
                run = f.make(w, t)
                v, e = verdict(run, w, xs[t], f.tol, cfg.seed + t)
            except Exception as exc:  # onnxruntime refusing a form is a result, reported in the table
                failures[f.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                continue
            # the verdict holds only if it holds at every token count (the two spellings are two sessions)
            live[f.name] = v if live.get(f.name, v) == v else "wrong"
            errs[f.name] = max(errs.get(f.name) or 0.0, e)
            runs[t][f.name] = (lambda r=run, x=xs[t]: r(x)) if v != "wrong" else None
    ms: dict[str, dict[int, float]] = {f.name: {} for f in all_forms}
    for t in cfg.tokens:
        timed = {k2: [fn] for k2, fn in runs[t].items() if fn is not None}
        progress(f"{n}x{k}, {t} token(s): timing {len(timed)} forms")
        for name, tm in cycles(timed, cfg.repeats).items():
            ms[name][t] = tm.median_ms
    rows = []
    for f in all_forms:
        base_pre = {t: min((ms[g.name][t] for g in all_forms if g.prepacked and t in ms[g.name]), default=None)
                    for t in cfg.tokens}  # fmt: skip
        fp = {t: ms[all_forms[0].name].get(t) for t in cfg.tokens}
        m = ms[f.name]
        rows.append(
            Row(
                f"{n}x{k}",
                f.name,
                "error" if f.name in failures else live[f.name],
                errs.get(f.name),
                m,
                {t: m[t] / base_pre[t] for t in m if base_pre[t]},
                {t: m[t] / fp[t] for t in m if fp[t]},
                failures.get(f.name, ""),
            )
        )
    return rows


def run(cfg: Config) -> list[Row]:
    rows = []
    for n, k in cfg.shapes:
        rows += shape_rows(cfg, n, k)
    return rows


def print_rows(rows: list[Row], tokens: tuple[int, ...]) -> None:
    heads = ["shape", "form", "live?", "rel err"]
    for t in tokens:
        heads += [f"{t} tok ms", "/prepacked", "/fp32 live"]
    table = []
    for r in rows:
        line: list[object] = [r.shape, r.form, r.live, r.rel_err]
        for t in tokens:
            line += [r.ms.get(t), r.vs_prepacked.get(t), r.vs_fp32.get(t)]
        table.append(line)
    print_table(heads, table)
    for r in rows:
        if r.error:
            print(f"{r.shape} {r.form}: {r.error}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_quant", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--forms", nargs="*", default=[], help="substrings of the form names to run (default: all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = Config(QUICK, repeats=3) if args.quick else Config()
    cfg = replace(cfg, threads=args.threads, repeats=args.repeats or cfg.repeats, only=tuple(args.forms))
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"onnxruntime {ort.__version__}, {cfg.threads} threads, medians of {cfg.repeats} interleaved rounds, "
        f"{os.cpu_count()} cores, load average {load} at start"
    )
    rows = run(cfg)
    print_rows(rows, cfg.tokens)
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end")
    if args.json:
        args.json.write_text(json.dumps({"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
