"""quantize_per_token: dynamic symmetric per-row (per-token) quantization of activations to fp8 or int8.

For each row r of x [M, K]:
    scale[r] = max(amax(|x[r, :]|), SCALE_FLOOR) / qmax        (fp32; qmax 448 for e4m3fn, 127 for int8)
    xq[r, :] = quant(x[r, :] / scale[r])
where quant is round-half-to-even then clamp to [-128, 127] for int8, and clamp to [-448, 448] then a
round-to-nearest cast for e4m3fn. Everything is computed in fp32 (bf16/fp16 inputs are upcast exactly),
so `x ≈ xq · scale[:, None]` with a relative error per element of at most half a quantization step.
Non-finite inputs give non-finite scales: the op does not check values (that would cost a reduction).
"""

from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, OpArgumentError, check_tensor
from .registry import register, resolve

# Largest representable magnitude of each 8-bit type (the symmetric int8 range uses 127, leaving -128
# unused, so that the scale maps +amax and -amax alike).
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
QUANT_DTYPES = tuple(QMAX)

# Floor of the row amax: an all-zero row (padding tokens) gets a tiny, finite, normal scale instead of
# 0 (which would make x / scale NaN). Far below any real activation, so it never changes a real row.
SCALE_FLOOR = 1e-12


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of 2-D `x` to `dtype`: (q, scale [rows] fp32). Shared by the
    activation op and the offline weight converter, which differ only in `floor`."""
    qmax = QMAX[dtype]
    x32 = x.float()
    scale = x32.abs().amax(dim=1).clamp_min(floor) / qmax
    # Division (not multiplication by a reciprocal) is the definition every backend must match.
    y = x32 / scale[:, None]
    if dtype == torch.int8:
        q = y.round_().clamp_(-128, 127).to(torch.int8)  # torch.round rounds half to even
    else:
        # torch's cast turns values above 448 into NaN while GPUs saturate: clamp first so both agree.
        q = y.clamp_(-qmax, qmax).to(dtype)
    return q, scale


@register("quantize_per_token", "torch")
def _quantize_per_token_torch(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x, dtype, SCALE_FLOOR)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype, *,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32/bf16/fp16 -> (xq [M, K] of `dtype`, scale [M] fp32) with x ≈ xq · scale[:, None].

    dtype: torch.float8_e4m3fn or torch.int8. See the module docstring for the exact rounding.
    """
    check_tensor("quantize_per_token", "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if dtype not in QUANT_DTYPES:
        raise OpArgumentError(f"quantize_per_token: dtype must be one of {QUANT_DTYPES}, got {dtype}")
    if x.shape[1] == 0:
        raise OpArgumentError(f"quantize_per_token: x has shape {tuple(x.shape)}; rows must not be empty")
    return resolve("quantize_per_token", backend, x.device)(x, dtype)
