"""The 8-bit grids of quantized bases: INT8 and FP8 formats, per-output-channel scales, exact encode/decode.

One owner for the format math (``shira_runtime.quantization`` builds modules on it; a switch on a quantized base
encodes the switched values with the same two functions):

- ``encode(values, scale, fmt) -> (codes, saturated)``: ``values / scale`` rounded to the nearest point of the
  format's grid, ties to even, clamped to ``[-max, max]``; ``saturated`` counts the values whose nearest point
  on the unbounded grid lies beyond ``max`` (they got the largest code instead).
- ``decode(codes, scale, fmt) -> fp32``: ``fp32(code) * scale``, one fp32 multiply: deterministic, so
  ``decode(encode(decode(c)))`` gives ``c`` back.

Formats (``FORMATS``; the storage dtype is 1 byte):

============  ======================  ========  =====================================================
name          codes                   max       grid
============  ======================  ========  =====================================================
int8          torch.int8              127       integers in [-127, 127]: symmetric, -128 never used, so
                                                negation is exact and 0 is a code
fp8_e4m3      torch.float8_e4m3fn     448       1 sign, 4 exponent (bias 7), 3 mantissa bits, subnormals,
                                                no infinities (torch's ``e4m3fn``)
fp8_e5m2      torch.float8_e5m2       57344     IEEE-like: bias 15, 2 mantissa bits, subnormals
============  ======================  ========  =====================================================

Analysis-only grids (``SIMULATED``, values in fp32, no storage): ``e3m4`` (bias 3, max 31) and ``e2m5`` (bias 1,
max 7.875), with every exponent code finite, as in Kuzmin et al. 2022 (arXiv 2208.09225): the per-channel
scale plays the role of the exponent bias, so only the grid's shape (mantissa bits against dynamic range)
matters. ``e4m3`` and ``e5m2`` are also there, equal to the torch formats (tested).

Scales are per output channel (row of ``[out, in]``): ``scale = amax(|row|) / max`` in fp32, so a row's
largest weight maps to the largest code; an all-zero row gets scale 1 (its codes are 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QFormat:
    name: str
    dtype: torch.dtype | None  # storage dtype of the codes; None: simulated (analysis only)
    exp_bits: int  # 0 for integers
    man_bits: int
    bias: int
    max: float  # largest code value

    @property
    def is_int(self) -> bool:
        return self.exp_bits == 0

    @property
    def top_step(self) -> float:
        """Distance from ``max`` to the next grid point below it."""
        if self.is_int:
            return 1.0
        return 2.0 ** (math.floor(math.log2(self.max)) - self.man_bits)


def _float(name: str, dtype: torch.dtype | None, e: int, m: int, max_value: float | None = None) -> QFormat:
    bias = 2 ** (e - 1) - 1
    top = (2**e - 1) - bias  # every exponent code finite
    return QFormat(name, dtype, e, m, bias, max_value if max_value is not None else 2.0**top * (2 - 2.0**-m))


FORMATS: dict[str, QFormat] = {
    "int8": QFormat("int8", torch.int8, 0, 7, 0, 127.0),
    "fp8_e4m3": _float("fp8_e4m3", torch.float8_e4m3fn, 4, 3, 448.0),
    "fp8_e5m2": _float("fp8_e5m2", torch.float8_e5m2, 5, 2, 57344.0),
}
SIMULATED: dict[str, QFormat] = {
    "e5m2": _float("e5m2", None, 5, 2, 57344.0),
    "e4m3": _float("e4m3", None, 4, 3, 448.0),
    "e3m4": _float("e3m4", None, 3, 4),
    "e2m5": _float("e2m5", None, 2, 5),
}
BY_DTYPE = {f.dtype: f for f in FORMATS.values()}
AUTO_CANDIDATES = ("int8", "fp8_e4m3", "fp8_e5m2")  # ``auto`` keeps the first on a tie


def quant_format(x: str | QFormat | torch.Tensor | torch.dtype) -> QFormat:
    """The format of a name (``"int8"``, ``"e3m4"`` ...), a codes tensor or its dtype; a clear error otherwise."""
    if isinstance(x, QFormat):
        return x
    if isinstance(x, torch.Tensor):
        x = x.dtype
    if isinstance(x, torch.dtype):
        if x in BY_DTYPE:
            return BY_DTYPE[x]
        raise ValueError(f"dtype {x} holds no quantized codes; expected one of {[str(d) for d in BY_DTYPE]}")
    if isinstance(x, str):
        if x in FORMATS:
            return FORMATS[x]
        if x in SIMULATED:
            return SIMULATED[x]
    known = sorted(FORMATS) + sorted(SIMULATED)
    raise ValueError(f"unknown quantization format {x!r}; expected one of {known}")


def fmt_max(fmt: str | QFormat | torch.Tensor | torch.dtype) -> float:
    return quant_format(fmt).max


def channel_scales(w: torch.Tensor, fmt: str | QFormat) -> torch.Tensor:
    """Per-output-channel scales ``amax(|row|) / max`` (fp32 ``[out]``) of a 2-D weight; 1 for all-zero rows."""
    f = quant_format(fmt)
    amax = w.detach().float().abs().amax(dim=1)
    return torch.where(amax > 0, amax / f.max, torch.ones_like(amax))


def _rows(scale: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``scale`` broadcast against ``values``: the same shape, or one scale per row (``[out]`` for ``[out, ...]``)."""
    if scale.shape == values.shape or scale.numel() == 1:
        return scale
    if scale.dim() == 1 and values.dim() >= 1 and scale.shape[0] == values.shape[0]:
        return scale.reshape(-1, *([1] * (values.dim() - 1)))
    raise ValueError(f"scale of shape {tuple(scale.shape)} fits neither values {tuple(values.shape)} nor its rows")


def round_to_grid(x: torch.Tensor, fmt: str | QFormat) -> torch.Tensor:
    """``x`` (already divided by the scale) rounded to the nearest point of ``fmt``'s grid, ties to even, NOT
    clamped (the grid extends past ``max`` with the top binade's step). Computed in x's float dtype (fp32/fp64):
    exact, since every step is a power of two."""
    f = quant_format(fmt)
    if f.is_int:
        return torch.round(x)  # half to even
    mant, exp = torch.frexp(x.abs())  # |x| = mant * 2**exp, mant in [0.5, 1)
    e = torch.clamp(exp - 1, min=1 - f.bias)  # binade; subnormals share the lowest one's step
    step = torch.pow(torch.tensor(2.0, dtype=x.dtype), (e - f.man_bits).to(x.dtype))
    return torch.round(x / step) * step


def saturated_mask(x: torch.Tensor, fmt: str | QFormat) -> torch.Tensor:
    """True where ``x`` (divided by the scale) rounds, on the unbounded grid, past ``max``."""
    return round_to_grid(x, fmt).abs() > quant_format(fmt).max


def encode(values: torch.Tensor, scale: torch.Tensor, fmt: str | QFormat) -> tuple[torch.Tensor, int]:
    """Codes of ``values / scale`` on ``fmt``'s grid (nearest, ties to even, saturated at ``±max``) and how many
    saturated. ``scale``: the shape of ``values``, or one per row. Storage formats give 1-byte codes of the
    format's dtype; simulated ones give the grid values in fp32. Refuses NaN/Inf (ValueError)."""
    f = quant_format(fmt)
    x = values.float() / _rows(scale.float(), values)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"encode to {f.name}: values hold NaN/Inf (or a scale is 0)")
    r = round_to_grid(x, f)
    saturated = int((r.abs() > f.max).sum())
    r = r.clamp_(-f.max, f.max)
    # r is on the grid, so the cast is exact (torch's own cast also rounds to nearest even, tested)
    return (r if f.dtype is None else r.to(f.dtype)), saturated


def decode(codes: torch.Tensor, scale: torch.Tensor, fmt: str | QFormat | None = None) -> torch.Tensor:
    """``fp32(code) * scale`` (fp32), ``scale`` the shape of ``codes`` or one per row."""
    if fmt is not None and quant_format(fmt).dtype not in (None, codes.dtype):
        raise ValueError(f"codes of dtype {codes.dtype} are not {quant_format(fmt).name} codes")
    return codes.float() * _rows(scale.float(), codes)


def grid_half_step(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half the grid's spacing just above each code's magnitude, times its scale (fp32, the shape of ``codes``):
    how far a value that was rounded to ``code`` can lie from ``decode(code)`` (the spacing above a power of two
    is the larger of its two sides)."""
    f = quant_format(codes)
    c = codes.float().abs()
    if f.is_int:
        step = torch.ones_like(c)
    else:
        _, exp = torch.frexp(c)
        step = torch.pow(2.0, (torch.clamp(exp - 1, min=1 - f.bias) - f.man_bits).float())
    return step * 0.5 * _rows(scale.float(), codes)


def fake_quant(w: torch.Tensor, fmt: str | QFormat) -> torch.Tensor:
    """``w`` (2-D) quantized to ``fmt`` with per-channel scales and decoded again (fp32): the grid's view of it."""
    f = quant_format(fmt)
    s = channel_scales(w, f)
    codes, _ = encode(w, s, f)
    return decode(codes, s)


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum w^2 / sum (w - w_hat)^2)`` in dB (inf if exact)."""
    w64, e = w.double(), (w.double() - w_hat.double())
    noise = float((e * e).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((w64 * w64).sum()) / noise)


def choose_format(w: torch.Tensor, candidates: tuple[str, ...] = AUTO_CANDIDATES) -> str:
    """``auto``: the candidate with the highest SQNR of ``w`` (the same as the lowest MSE for one tensor), the
    first listed on a tie (int8 first)."""
    best, best_db = candidates[0], -math.inf
    for name in candidates:
        db = sqnr_db(w, fake_quant(w, name))
        if db > best_db:
            best, best_db = name, db
    return best
