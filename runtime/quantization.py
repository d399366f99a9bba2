"""Quantized bases: ``quantize(module, "int8" | "fp8_e4m3" | "fp8_e5m2" | "auto")`` in place.

Each targeted ``nn.Linear`` becomes a ``QuantLinear`` whose ``weight`` is a buffer of 1-byte codes
(``torch.int8`` / ``float8_e4m3fn`` / ``float8_e5m2``, ``[out, in]``, contiguous) and whose ``weight_scale`` is
an fp32 ``[out]`` buffer: ``W = decode(weight, weight_scale)``. The state_dict key of the codes stays
``<module>.weight``, so adapters address the same names; a switch writes the codes in place (the grid math is
``shira_runtime.kernels.qformats``: ``encode``/``decode``). Bias, if any, stays as it was.

Targets: module-name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), as in PEFT and
``shira_runtime.synthetic``. The default is every ``nn.Linear`` except the LM head, which is: the module's
``get_output_embeddings()`` (transformers), any Linear named ``lm_head``, and any Linear whose weight is an
``nn.Embedding``'s (tied) or whose ``out_features`` equals an embedding's ``num_embeddings`` (the vocabulary).
A weight shared by several modules (tied) is refused even when named: quantizing it would untie it.

``auto`` picks, per tensor, the format of ``qformats.AUTO_CANDIDATES`` with the highest SQNR of the weight
(equivalently the lowest MSE), int8 on a tie. Quantizing is all-or-nothing: every target is checked (finite,
2-D, not tied) and encoded before the first module is replaced.

Inference (``QuantLinear.forward``): no ready torch CPU kernel serves FP8, the int8 one serves small batches,
and whether a bf16 GEMM beats the fp32 one depends on the CPU, so the path depends on the token count and on
``BF16_GEMM`` (the CPU multiplies bf16 natively: AVX512-BF16 or AMX; ``SHIRA_QUANT_BF16=0/1`` overrides the
probe). Measured with ``python -m benchmarks.quant_formats`` on two CPUs (README):

- int8, ``tokens <= int8mm_max_tokens()`` (128, or 64 with ``BF16_GEMM``) and ``in_features % 16 == 0``:
  ``torch._weight_int8pack_mm`` reads the live codes in place (bf16 activations, output scaled by the fp32
  scales); no extra memory. The kernel needs ``in_features % 16 == 0`` (8, 24, 40, 56 crash or give garbage on
  torch 2.13), else the path below.
- int8, more tokens: the codes converted per call (to bf16 for a bf16 GEMM with ``BF16_GEMM``, else to fp32 for
  the fp32 GEMM), the scales applied to the output (a transient copy of one weight at a time).
- fp8: no usable kernel (``torch._scaled_mm`` is emulated and decoding fp8 costs ~20x a one-token GEMV), so
  ``QuantLinear`` keeps a bf16 **compute copy** of the code values (exact: every E4M3/E5M2 value is a bf16
  value), +2 bytes per weight: one token multiplies with it in bf16, and so do more tokens with ``BF16_GEMM``;
  without it more tokens convert the copy to fp32 and run the fp32 GEMM. The copy must follow the codes: a
  switch hands it to the kernels as the codes' ``mirror`` (``shira_runtime.kernels.reference``), which write it in the
  same
  visit as the codes, then ``refresh_at(..., mirrored=True)`` marks it in step; ``refresh_rows(rows)`` after
  any other write of codes; a forward that sees the codes' version counter moved (a torch in-place op)
  refreshes it whole, so a stale copy is never used after torch writes. Writes through raw pointers outside
  the kernels must call ``refresh_rows``.

Measured, ratios to the fp32 base in the same interleaved rounds, llama-1b linears 8192x2048 / 2048x8192: on a
2-core AVX2 EPYC (no native bf16; other jobs sharing the cores) one token int8 0.36x and fp8 0.54x, 64 tokens
int8 1.4-1.5x and fp8 1.4-2.1x, 256 tokens int8 1.06-1.12x; on a 2-core Xeon with AMX (quiet) see the README.
The fastest int8 prefill on the AVX2 CPU is fbgemm's dynamic int8 linear (0.29-0.37x at 64 tokens) but it needs a
prepacked copy (+1 B/weight) that only a full repack (~0.1-0.5 s per 16.8M weights) brings back in line after a
switch, so it is not used. Memory per weight: int8 1 byte, fp8 3 bytes (codes + bf16 copy), plus 4 bytes per
output row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from shira_runtime.arrays import check_scales  # noqa: F401 (re-exported: it lives torch-free)
from shira_runtime.kernels.qformats import FORMATS, channel_scales, choose_format, decode, encode, quant_format
from torch import nn

INT8MM_MAX_TOKENS = 128  # int8: above this many rows the fp32 GEMM on decoded codes beats _weight_int8pack_mm
INT8MM_MAX_TOKENS_BF16 = 64  # the same with BF16_GEMM: the bf16 GEMM on codes converted per call beats it above
FP8_BF16_MAX_TOKENS = 1  # fp8 without BF16_GEMM: up to this many rows the bf16 GEMV on the copy, then fp32 GEMM


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles), where a bf16 GEMM beats fp32 at every
    token count; ``SHIRA_QUANT_BF16=1`` / ``0`` overrides the probe."""
    forced = os.environ.get("SHIRA_QUANT_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


BF16_GEMM = native_bf16()  # read by QuantLinear.forward at each call (tests set it to run both paths)


def int8mm_max_tokens() -> int:
    """Up to this many rows an int8 layer runs ``torch._weight_int8pack_mm`` on its codes."""
    return INT8MM_MAX_TOKENS_BF16 if BF16_GEMM else INT8MM_MAX_TOKENS


FORMAT_NAMES = (*FORMATS, "auto")


def scale_name(key: str) -> str:
    """The scales' key beside a quantized weight's codes: ``<module>.weight`` -> ``<module>.weight_scale``."""
    return key.removesuffix("weight") + "weight_scale"


class QuantLinear(nn.Module):
    """A linear layer over 1-byte weight codes with per-output-channel fp32 scales.

    Buffers (state_dict): ``weight`` ``[out, in]`` codes, ``weight_scale`` ``[out]`` fp32; ``bias`` as the
    original. ``format`` is the ``qformats`` name. FP8 layers hold a bf16 compute copy (non-persistent).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        fmt = quant_format(codes)
        if codes.dim() != 2 or scale.shape != (codes.shape[0],) or scale.dtype != torch.float32:
            raise ValueError(f"QuantLinear needs codes [out, in] and fp32 scales [out]; got {codes.shape}, {scale}")
        self.out_features, self.in_features = codes.shape
        self.format = fmt.name
        self.register_buffer("weight", codes.contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        self._int8mm = fmt.name == "int8" and self.in_features % 16 == 0 and self.in_features > 0
        if self._int8mm:
            self.register_buffer("_ones", torch.ones(self.out_features, dtype=torch.bfloat16), persistent=False)
        self._synced = -1
        if fmt.name != "int8":
            self.register_buffer("weight_compute", torch.empty(0, dtype=torch.bfloat16), persistent=False)
            self.refresh_rows()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> QuantLinear:
        codes, scale = quantize_weight(linear.weight, fmt)
        return cls(codes, scale, linear.bias)

    def dequantize_weight(self) -> torch.Tensor:
        """The fp32 weight this layer's grid holds: ``decode(weight, weight_scale)``."""
        return decode(self.weight, self.weight_scale)

    @property
    def has_compute_copy(self) -> bool:
        # a buffer lookup: ``hasattr`` on an int8 layer went through nn.Module.__getattr__'s AttributeError, twice
        # per switched tensor (~14 us of a 4-tensor switch's ~75)
        return "weight_compute" in self._buffers

    def refresh_rows(self, rows: torch.Tensor | None = None) -> None:
        """Bring the compute copy's ``rows`` (all if None) back in line with the codes; a no-op without a copy.

        Exact: the copy holds the code values themselves (no scale), converted to bf16 without rounding."""
        if not self.has_compute_copy:
            return
        if self.weight_compute.shape != self.weight.shape:
            self.weight_compute = self.weight.to(torch.bfloat16)
        elif rows is None:
            self.weight_compute.copy_(self.weight)  # in place: also right under inference_mode
        else:
            rows = rows.long()
            self.weight_compute[rows] = self.weight[rows].to(torch.bfloat16)
        self._synced = self.weight._version

    def mirror(self) -> torch.Tensor | None:
        """The compute copy, for a kernel to write beside the codes (``shira_runtime.kernels.reference``'s mirrors);
        None when
        there is none, or it does not have the codes' shape yet (``refresh_at`` then rebuilds it)."""
        buffers = self._buffers  # read directly: nn.Module.__getattr__ costs ~1 us a name, on every switch
        copy = buffers.get("weight_compute")
        return copy if copy is not None and copy.shape == buffers["weight"].shape else None

    def refresh_at(self, indices: list[torch.Tensor], since: int, mirrored: bool = False) -> None:
        """After a kernel wrote codes at flat ``indices`` (a list of index tensors): bring those entries of the
        compute copy back in line (exact, an element gather+convert; nothing to do when the kernel wrote them
        itself, ``mirrored``), or the whole copy when it was already stale before the write (``since``: the
        codes' version counter just before it). A no-op without a copy."""
        buffers = self._buffers  # as in ``mirror``: this runs per switched tensor
        copy, weight = buffers.get("weight_compute"), buffers["weight"]
        if copy is None:
            return
        if self._synced != since or copy.shape != weight.shape:
            self.refresh_rows()
            return
        if mirrored:
            self.__dict__["_synced"] = weight._version  # a plain int: nn.Module.__setattr__'s checks cost ~4 us
            return
        flat, codes = copy.view(-1), weight.view(torch.uint8).view(-1)
        for idx in indices:
            if idx.numel():
                idx = idx.long()
                flat.index_copy_(0, idx, codes.index_select(0, idx).view(weight.dtype).to(torch.bfloat16))
        self._synced = weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        tokens = x2.shape[0]
        scale = self.weight_scale
        if self.has_compute_copy and self._synced != self.weight._version:
            self.refresh_rows()  # codes written by a torch op since the copy was made
        if tokens == 0:
            y = x2.new_zeros(0, self.out_features)
        elif self._int8mm and tokens <= int8mm_max_tokens():
            xb = x2.to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(xb, self.weight, self._ones).float() * scale
        elif self.has_compute_copy and (BF16_GEMM or tokens <= FP8_BF16_MAX_TOKENS):
            y = F.linear(x2.to(torch.bfloat16), self.weight_compute).float() * scale
        elif self.has_compute_copy:
            y = F.linear(x2.float(), self.weight_compute.float()) * scale
        elif BF16_GEMM:  # int8 codes to bf16 (exact), a bf16 GEMM, scales on the output
            y = F.linear(x2.to(torch.bfloat16), self.weight.to(torch.bfloat16)).float() * scale
        else:  # codes to fp32, scales on the output: one pass less than decode() over the weight
            y = F.linear(x2.float(), self.weight.float()) * scale
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        copy = ", compute copy bf16" if self.has_compute_copy else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{copy}"


def quantize_weight(w: torch.Tensor, fmt: str, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of a 2-D weight in ``fmt`` (``auto`` resolved here), per-output-channel scales."""
    w = w.detach()
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name}: {bad} of {w.numel()} weights are NaN/Inf; cannot quantize")
    if fmt == "auto":
        fmt = choose_format(w.float())
    scale = channel_scales(w, fmt)
    codes, _ = encode(w, scale, fmt)
    return codes, scale


def quantize(module: nn.Module, format: str, targets: Iterable[str] | None = None) -> nn.Module:
    """Quantize ``module``'s target linears to ``format`` in place and return ``module`` (see the module doc).

    Raises ValueError for an unknown format, no matching target, a NaN/Inf or tied target weight: before any
    module is replaced."""
    if format not in FORMAT_NAMES:
        raise ValueError(f"unknown quantization format {format!r}; expected one of {list(FORMAT_NAMES)}")
    linears = target_linears(module, targets)
    tied = _shared_weights(module)
    for name, lin in linears.items():
        if lin.weight.data_ptr() in tied and len(tied[lin.weight.data_ptr()]) > 1:
            others = [n for n in tied[lin.weight.data_ptr()] if n != f"{name}.weight"]
            raise ValueError(f"{name}.weight is shared with {others} (tied); quantizing it would untie them")
    for name, lin in linears.items():  # every check first: nothing changes on a bad tensor
        if not bool(torch.isfinite(lin.weight.detach()).all()):
            bad = int((~torch.isfinite(lin.weight.detach())).sum())
            raise ValueError(f"{name}.weight: {bad} of {lin.weight.numel()} weights are NaN/Inf; nothing quantized")
    new = {name: QuantLinear.from_linear(lin, format) for name, lin in linears.items()}
    for name, q in new.items():
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, q)
    return module


def bake(adapter, module: nn.Module, weight: float = 1.0):
    """``adapter`` (a ``SparseAdapter``) baked for the quantized ``module``: a ``CodesAdapter`` holding, at each
    index whose code it changes, the code a switch to ``adapter`` at ``weight`` writes (``Q(deq(base) + weight *
    scale * delta)`` on the tensor's grid; bit for bit the codes ``Runtime.switch`` computes). Entries whose code
    stays are dropped. ``module`` must hold its base codes (no adapter switched in). Its file
    (``save_adapter``) stores the codes instead of the deltas, with a hash of the base (format, scales, codes)."""
    from shira_runtime.adapters import CodesAdapter
    from shira_runtime.fingerprint import codes_base_hash
    from shira_runtime.kernels.reference import requantize

    layers = {f"{n}.weight": m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    alpha = float(torch.tensor(weight * adapter.scale, dtype=torch.float32))  # as the switcher rounds it
    indices, codes, shapes, base = {}, {}, {}, {}
    for name in adapter.indices:
        if name not in layers:
            raise ValueError(f"bake: tensor {name!r} is not the weight of a QuantLinear of this module")
        layer = layers[name]
        shape = tuple(layer.weight.shape)
        idx, val = adapter.flat(name, shape, "bake")
        flat = layer.weight.view(torch.uint8).view(-1)
        old = flat.index_select(0, idx.long()).view(layer.weight.dtype)
        delta = val.float() if alpha == 1.0 else val.float() * alpha
        new, _ = requantize(old, layer.weight_scale[idx.long() // layer.in_features], delta)
        keep = new.view(torch.uint8) != old.view(torch.uint8)
        indices[name], codes[name], shapes[name] = idx[keep].contiguous(), new[keep].contiguous(), shape
        base[name] = codes_base_hash(layer.format, shape, layer.weight_scale, old[keep])
    return CodesAdapter(indices, codes, shapes, base, adapter.mask_kind)


def quantized_formats(module: nn.Module) -> dict[str, str]:
    """``{"<module>.weight": format}`` of every ``QuantLinear`` in ``module`` (what ``auto`` chose)."""
    return {f"{n}.weight": m.format for n, m in module.named_modules() if isinstance(m, QuantLinear)}


def lm_heads(module: nn.Module) -> set[str]:
    """Names of the linears that project to the vocabulary (the LM head rule of the module doc)."""
    heads: set[str] = set()
    out_emb = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    emb_ptrs = {m.weight.data_ptr() for m in embeddings}
    vocab = {m.num_embeddings for m in embeddings}
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if (
            m is out_emb
            or name.split(".")[-1] == "lm_head"
            or m.weight.data_ptr() in emb_ptrs
            or m.out_features in vocab
        ):
            heads.add(name)
    return heads


def target_linears(module: nn.Module, targets: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``quantize`` would replace, by name (LM heads excluded when ``targets`` is None)."""
    wanted = None if targets is None else [targets] if isinstance(targets, str) else list(targets)
    skip = lm_heads(module) if wanted is None else set()
    found = {}
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear) or name in skip:
            continue
        plain = name.removesuffix(".base_layer")
        if wanted is None or any(plain == t or plain.endswith("." + t) for t in wanted):
            found[name] = m
    if not found:
        what = "every nn.Linear but the LM head" if wanted is None else f"targets {wanted}"
        raise ValueError(f"quantize: no nn.Linear in the module matches {what}")
    return found


def _shared_weights(module: nn.Module) -> dict[int, list[str]]:
    """data_ptr -> every parameter name that holds that storage (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(p.data_ptr(), []).append(name)
    return names
