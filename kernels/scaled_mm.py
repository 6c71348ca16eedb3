"""scaled_mm: the W8A8 GEMM, out = (xq · wqᵀ) · x_scale[:, None] · w_scale[None, :] + bias.

Reference semantics every backend matches:
- int8 × int8: exact integer accumulation (what int32 tensor-core accumulators give for any K a model
  uses), then the integer sum is converted to fp32;
- fp8 e4m3 × e4m3: products are exact in fp32 and are accumulated in fp32 (order unspecified);
- epilogue in fp32, in this order: `acc · x_scale[m]`, then `· w_scale[n]`, then `+ bias[n]` (bias
  upcast to fp32), then one rounding to `out_dtype`.
"""

from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, OpArgumentError, check_shape, check_tensor
from .quantize import QUANT_DTYPES
from .registry import register, resolve

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _accumulate(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq · wqᵀ as fp32: exact for int8, fp32-accumulated for fp8."""
    if xq.dtype == torch.int8:
        # |product| <= 2^14, so float64 sums stay exact up to K = 2^39 (any real K), and float64
        # matmul runs on every device, unlike integer matmul.
        return (xq.double() @ wq.double().t()).float()
    return xq.float() @ wq.float().t()


@register("scaled_mm", "torch")
def _scaled_mm_torch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    out = _accumulate(xq, wq) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(out_dtype)


def _check_args(xq, x_scale, wq, w_scale, bias, out_dtype) -> None:
    op = "scaled_mm"
    check_tensor(op, "xq", xq, ndim=2, dtypes=QUANT_DTYPES)
    check_tensor(op, "wq", wq, ndim=2, dtypes=QUANT_DTYPES, device=xq.device)
    if wq.dtype != xq.dtype:
        raise OpArgumentError(f"{op}: xq ({xq.dtype}) and wq ({wq.dtype}) must have the same dtype")
    (M, K), (N, Kw) = xq.shape, wq.shape
    if Kw != K:
        raise OpArgumentError(f"{op}: xq [M, K] = {tuple(xq.shape)} and wq [N, K] = {tuple(wq.shape)} "
                              f"disagree on K")
    check_tensor(op, "x_scale", x_scale, dtypes=(torch.float32,), device=xq.device)
    check_shape(op, "x_scale", x_scale, (M,))
    check_tensor(op, "w_scale", w_scale, dtypes=(torch.float32,), device=xq.device)
    check_shape(op, "w_scale", w_scale, (N,))
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, device=xq.device)
        check_shape(op, "bias", bias, (N,))
    if out_dtype not in OUT_DTYPES:
        raise OpArgumentError(f"{op}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
              backend: str = "auto") -> torch.Tensor:
    """W8A8 matmul: xq [M, K] and wq [N, K] (both float8_e4m3fn or both int8), x_scale [M] and
    w_scale [N] fp32, optional bias [N] (fp32/bf16/fp16) -> [M, N] of out_dtype (bf16, fp16 or fp32).

    out = (xq · wqᵀ) · x_scale[:, None] · w_scale[None, :] + bias; see the module docstring for the
    accumulation each backend guarantees.
    """
    _check_args(xq, x_scale, wq, w_scale, bias, out_dtype)
    return resolve("scaled_mm", backend, xq.device)(xq, x_scale, wq, w_scale, bias, out_dtype)
