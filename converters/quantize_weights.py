"""Offline weight quantization exactly as spec/quant-formats.md (LightX2V's recipe), and its error.

Per output channel (row) of a weight [out, in], computed in fp32:
    scale = max(amax_row, 1e-5) / qmax          (qmax 127 for int8, 448 for fp8 e4m3fn)
    int8: q = clamp(round(w / scale), -128, 127)  (round half to even)
    fp8:  q = e4m3(clamp(w / scale, -448, 448))   (round to nearest; the clamp keeps torch's cast
                                                   from producing NaN where GPUs would saturate)
Rows are independent, so quantizing a block of rows gives exactly those rows of the whole result:
the converter relies on that to work in bounded memory.
"""

from __future__ import annotations

import math

import torch

from dit8.kernels.quantize import quantize_rows
from dit8.packed_format import SCHEME_DTYPES

# LightX2V's floor of a row's amax: keeps an all-zero row's scale finite.
WEIGHT_SCALE_FLOOR = 1e-5


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (q [out, in] int8 or float8_e4m3fn, scale [out, 1] fp32)."""
    if scheme not in SCHEME_DTYPES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {tuple(SCHEME_DTYPES)}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight expects a 2-D float weight [out, in], got {tuple(w.shape)} {w.dtype}")
    q, scale = quantize_rows(w, SCHEME_DTYPES[scheme], WEIGHT_SCALE_FLOOR)
    return q, scale[:, None]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [out, in] with scale [out, 1] (or [out], any float dtype) -> the fp32 weight q · scale."""
    return q.float() * scale.float().reshape(-1, 1)


def error_sums(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    """(Σ w², Σ (w - q·scale)²), partial sums that add up over blocks of rows.

    The differences are taken in fp32, as the runtime dequantizes (each carries a rounding of at most
    2^-24·|w|, i.e. ~1e-5 of the noise itself); each row's sum of squares is an fp32 dot product and
    the rows are added in float64. All-float64 arithmetic would cost several times more, which on a
    small CPU is most of a conversion. Each row is squared at the power of two of its scale, which
    changes no bit of it: squares of weights past 1e19 would overflow fp32.
    """
    w32 = w.float()
    noise = q.float().mul_(scale.float().reshape(-1, 1)).sub_(w32)
    exponent = torch.frexp(scale.float().reshape(-1))[1]
    return _sum_squares(w32, exponent), _sum_squares(noise, exponent)


def _sum_squares(x: torch.Tensor, exponent: torch.Tensor) -> float:
    """Σ x² for x [rows, ...], each row taken as x·2^-exponent[row] (exact) and squared in fp32."""
    rows = torch.ldexp(x.reshape(x.shape[0], 1, -1), -exponent.reshape(-1, 1, 1))
    squares = (rows @ rows.transpose(1, 2)).double().reshape(-1)  # batched row dot products (BLAS)
    return float(torch.ldexp(squares, 2 * exponent.double()).sum())


def errors_from_sums(signal: float, noise: float) -> tuple[float, float]:
    """(relative Frobenius error, SQNR in dB) from the sums of `error_sums`.

    A zero error gives SQNR +inf; an all-zero reference with a non-zero error gives inf error.
    """
    if noise == 0:
        return 0.0, math.inf
    if signal == 0:
        return math.inf, -math.inf
    return math.sqrt(noise / signal), 10 * math.log10(signal / noise)


def quantization_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error ‖w - q·scale‖ / ‖w‖, SQNR in dB) of a quantized weight against its source."""
    return errors_from_sums(*error_sums(w, q, scale))
