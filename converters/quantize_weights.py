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

import numpy as np
import torch

from dit8.kernels.quantize import quantize_rows
from dit8.packed_format import SCHEME_DTYPES

# LightX2V's floor of a row's amax: keeps an all-zero row's scale finite.
WEIGHT_SCALE_FLOOR = 1e-5


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (q [out, in] int8 or float8_e4m3fn, scale [out, 1] fp32)."""
    _check_weight(w, scheme)
    q, scale = quantize_rows(w, SCHEME_DTYPES[scheme], WEIGHT_SCALE_FLOOR)
    return q, scale[:, None]


def _check_weight(w: torch.Tensor, scheme: str) -> None:
    if not isinstance(scheme, str) or scheme not in SCHEME_DTYPES:  # (a list was unhashable: a TypeError)
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {tuple(SCHEME_DTYPES)}")
    if not isinstance(w, torch.Tensor):  # (a numpy array or None failed at .dim() with an AttributeError)
        raise ValueError(f"quantize_weight expects the weight w as a torch.Tensor [out, in], got {type(w).__name__}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight expects a 2-D float weight [out, in], got {tuple(w.shape)} {w.dtype}")
    if w.shape[1] == 0:  # a row of no values has no amax to scale it by (torch's reduction raised IndexError)
        raise ValueError(f"quantize_weight expects a weight with at least one column (in > 0), got {tuple(w.shape)}")


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [out, in] with scale [out, 1] (or [out], any float dtype) -> the fp32 weight q · scale."""
    _check_quantized("dequantize_weight", q, scale)
    return q.float() * scale.float().reshape(-1, 1)


def _check_quantized(fn: str, q: torch.Tensor, scale: torch.Tensor, *weight: torch.Tensor) -> None:
    """ValueError naming the argument unless q is [out, in], scale [out, 1] or [out] and the weight w (if
    given) shaped as q. (Broadcast, a 1-D q and its scale made an [out, out] product; other shapes failed
    with torch's RuntimeError, None with an AttributeError, naming no argument.)"""
    arguments = [("w", t) for t in weight] + [("q", q), ("scale", scale)]
    for name, t in arguments:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn} expects {name} as a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 2:
        raise ValueError(f"{fn} expects the codes q as [out, in], got shape {tuple(q.shape)}")
    if tuple(scale.shape) not in ((q.shape[0], 1), (q.shape[0],)):
        raise ValueError(f"{fn}: scale has shape {tuple(scale.shape)}, q {tuple(q.shape)} takes "
                         f"[{q.shape[0]}, 1] or [{q.shape[0]}]")
    if weight and weight[0].shape != q.shape:
        raise ValueError(f"{fn}: the weight w has shape {tuple(weight[0].shape)}, its codes q {tuple(q.shape)}")


def quantize_weight_measured(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """quantize_weight(w, scheme) and its error_sums, from one pass of quantization: (q, scale, sums)."""
    _check_weight(w, scheme)
    q, scale, scaled = quantize_rows(w, SCHEME_DTYPES[scheme], WEIGHT_SCALE_FLOOR, with_scaled=True)
    return q, scale[:, None], _scaled_error_sums(scaled, _decoded(q).sub_(scaled), scale)


def error_sums(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    """(Σ w², Σ (w - q·scale)²), partial sums that add up over blocks of rows.

    Measured where the codes were rounded, in units of each row's scale: with y = w / scale,
    Σ w² = Σ scale²·‖y‖² and the error is Σ scale²·‖q - y‖², the norms in fp32 (|y| is at most the
    codes' range for the recipe's scales: no overflow for any finite weight), the rows added in float64.
    This is the error of the codes against their exact values to within the division's rounding (2^-24
    of |y|, ~1e-5 of the noise at most), without a multiply, a subtraction and a sum over the
    dequantized weight: on a small CPU those passes were most of a conversion. (quantize_weight_measured
    takes y as the codes rounded it, clamped to e4m3fn's ±448: at most one ulp apart.)
    """
    scaled = w.float() / scale.float().reshape(-1, 1)
    return _scaled_error_sums(scaled, _decoded(q).sub_(scaled), scale.float().reshape(-1))


def _scaled_error_sums(scaled: torch.Tensor, noise: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    """(Σ scale²·‖scaled row‖², Σ scale²·‖noise row‖²) in float64 from fp32 row norms."""
    squares = scale.double().square()
    return tuple(float((torch.linalg.vector_norm(x, dim=1).double().square() * squares).sum())
                 for x in (scaled, noise))


# Every pair of e4m3fn codes' values, for decoding by table look-up (torch's CPU cast from e4m3fn converts
# one element at a time): entry i holds, as one int64, the two fp32 values of the two codes whose bytes
# read as the uint16 i (512 KiB). One look-up per pair, with 32-bit indices (numpy widens every index to
# 64 bits first): 4 M codes decode in ~2.5-4 ms instead of ~11.5-13 ms on one CPU thread. The indices
# are made a chunk at a time (1 MiB), so decoding needs no more memory than its result.
_E4M3_PAIRS = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2).copy())
_E4M3_PAIRS = _E4M3_PAIRS.view(torch.float8_e4m3fn).float().view(torch.int64).reshape(-1)
_PAIRS_PER_CHUNK = 1 << 18


def _decoded(q: torch.Tensor) -> torch.Tensor:
    """The codes as fp32 values (a new tensor)."""
    if q.dtype == torch.float8_e4m3fn and q.device.type == "cpu":
        codes = q.contiguous().view(torch.uint8).reshape(-1)
        if codes.numel() % 2:  # an odd count has no last pair (no weight has one, but any tensor may)
            return q.float()
        if codes.storage_offset() % 2:  # a view from an odd byte cannot be read as uint16
            codes = codes.clone()
        pairs = codes.view(torch.uint16)
        out = torch.empty(pairs.numel(), dtype=torch.int64)
        for start in range(0, pairs.numel(), _PAIRS_PER_CHUNK):
            chunk = slice(start, start + _PAIRS_PER_CHUNK)
            torch.index_select(_E4M3_PAIRS, 0, pairs[chunk].to(torch.int32), out=out[chunk])
        return out.view(torch.float32).reshape(q.shape)
    return q.float()


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
    _check_quantized("quantization_error", q, scale, w)
    return errors_from_sums(*error_sums(w, q, scale))
