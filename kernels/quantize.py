"""quantize_per_token: dynamic symmetric per-row (per-token) quantization of activations to fp8 or int8.

For each row r of x [M, K]:
    scale[r] = max(amax(|x[r, :]|), SCALE_FLOOR) / qmax        (fp32; qmax 448 for e4m3fn, 127 for int8)
    xq[r, :] = quant(x[r, :] / scale[r])
where quant is round-half-to-even then clamp to [-128, 127] for int8, and clamp to [-448, 448] then a
round-to-nearest cast for e4m3fn. Everything is computed in fp32 (bf16/fp16 inputs are upcast exactly),
so `x ≈ xq · scale[:, None]` with a relative error per element of at most half a quantization step.
Non-finite inputs give non-finite scales: the op does not check values (that would cost a reduction).

Backends: "torch" (the reference below), "triton" and "cuda" (one fused pass over each row:
kernels/fused_triton.py and csrc/quantize.cu); on a GPU the kernels compute the same codes and scales
as the reference bit for bit (the IEEE quotient, which they get from the scale's reciprocal and one
FMA correction; round half to even; RNE e4m3). The quotients never leave [-qmax, qmax] by more than
the division's rounding, so the kernels let their conversions saturate instead of clamping.

`gelu_tanh_quant(x, dtype)` is quantize_per_token(GELU_tanh(x)) with the GELU in fp32 and never rounded
to x's dtype: the step between the FFN up and down GEMMs when the up GEMM's epilogue does not apply
the activation (a GEMM tile sees only part of a row, so it cannot know the row's scale). The kernels
compute the GELU as x·sigmoid(2u) with the hardware exp2, a few fp32 ulps from torch's tanh form
where that form is accurate: a code can differ from the reference's by one step where a value sits
on a rounding boundary. Below x ≈ -3 the tanh form loses its digits to cancellation (0.5·x·(1 +
tanh u) with tanh u near -1: 30% off float64 at x = -5, all of it at -6) and the kernels' form does
not, so a row whose largest magnitude lies there gets a different (the kernels': the accurate) scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused_spec
from .checks import FLOAT_DTYPES, OpArgumentError, check_rows_not_empty, check_tensor
from .registry import register, resolve
from .triton_support import triton_runs_on

# Largest representable magnitude of each 8-bit type (the symmetric int8 range uses 127, leaving -128
# unused, so that the scale maps +amax and -amax alike).
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
QUANT_DTYPES = tuple(QMAX)

# Floor of the row amax: an all-zero row (padding tokens) gets a tiny, finite, normal scale instead of
# 0 (which would make x / scale NaN). Far below any real activation, so it never changes a real row.
SCALE_FLOOR = 1e-12


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, floor: float, *,
                  with_scaled: bool = False) -> tuple[torch.Tensor, ...]:
    """Symmetric per-row quantization of 2-D `x` to `dtype`: (q, scale [rows] fp32). Shared by the
    activation op and the offline weight converter, which differ only in `floor`. with_scaled: also
    return the fp32 values the codes round, x / scale (clamped to ±448 for e4m3fn), from which the
    converter measures the rounding error without another pass over x."""
    qmax = QMAX[dtype]
    x32 = x.float()
    # max |x| per row without an |x| temporary (on a CPU also 4x faster than abs().amax() or aminmax);
    # NaN propagates into the scale.
    amax = torch.maximum(x32.amax(dim=1), -x32.amin(dim=1)).clamp_min(floor)
    # Division (not multiplication by a reciprocal) is the definition every backend must match. The
    # divisor is a 0-dim tensor because CUDA turns division by a Python number into multiplication by
    # its reciprocal (1 ulp off on about half of the rows for qmax 448).
    scale = amax / amax.new_full((), qmax)
    y = x32 / scale[:, None]
    if dtype == torch.int8:
        rounded = y.round() if with_scaled else y.round_()  # torch.round rounds half to even
        q = rounded.clamp_(-128, 127).to(torch.int8)
    else:
        # torch's cast turns values above 448 into NaN while GPUs saturate: clamp first so both agree.
        q = y.clamp_(-qmax, qmax).to(dtype)
    return (q, scale, y) if with_scaled else (q, scale)


@register("quantize_per_token", "torch")
def _quantize_per_token_torch(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(x, dtype, SCALE_FLOOR)


def check_quant_dtype(op: str, dtype: object) -> None:
    """Raise unless `dtype` is one of the 8-bit code types."""
    if dtype not in QUANT_DTYPES:
        raise OpArgumentError(f"{op}: dtype must be one of {QUANT_DTYPES}, got {dtype}")


def _check_rows(op: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    """The checks of the per-token quantizing ops: x [M, K] float with K > 0, dtype 8-bit."""
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_quant_dtype(op, dtype)
    check_rows_not_empty(op, x)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype, *,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32/bf16/fp16 -> (xq [M, K] of `dtype`, scale [M] fp32) with x ≈ xq · scale[:, None].

    dtype: torch.float8_e4m3fn or torch.int8. See the module docstring for the exact rounding.
    """
    _check_rows("quantize_per_token", x, dtype)
    return resolve("quantize_per_token", backend, x.device)(x, dtype)


@register("quantize_per_token", "triton", runs_on=triton_runs_on)
def _quantize_per_token_triton(x, dtype):
    return fused_spec.run_rows("triton", x, out_dtype=dtype)


@register("quantize_per_token", "cuda", runs_on=fused_spec.cuda_runs_on)
def _quantize_per_token_cuda(x, dtype):
    return fused_spec.run_rows("cuda", x, out_dtype=dtype)


@register("gelu_tanh_quant", "torch")
def _gelu_tanh_quant_torch(x, dtype):
    return quantize_rows(F.gelu(x.float(), approximate="tanh"), dtype, SCALE_FLOOR)


@register("gelu_tanh_quant", "triton", runs_on=triton_runs_on)
def _gelu_tanh_quant_triton(x, dtype):
    return fused_spec.run_rows("triton", x, out_dtype=dtype, act=fused_spec.ACT_GELU_TANH)


@register("gelu_tanh_quant", "cuda", runs_on=fused_spec.cuda_runs_on)
def _gelu_tanh_quant_cuda(x, dtype):
    return fused_spec.run_rows("cuda", x, out_dtype=dtype, act=fused_spec.ACT_GELU_TANH)


def gelu_tanh_quant(x: torch.Tensor, dtype: torch.dtype, *,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> quantize_per_token(GELU_tanh(x), dtype), the GELU computed in fp32 (not rounded)."""
    _check_rows("gelu_tanh_quant", x, dtype)
    return resolve("gelu_tanh_quant", backend, x.device)(x, dtype)
