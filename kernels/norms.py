"""Normalisations with fp32 statistics: LayerNorm (+ adaLN modulation) and RMSNorm.

All of them read fp32, bf16 or fp16, compute in fp32 and write `out_dtype`.

Backends: "torch" (the references here), "triton" and "cuda": one pass per row (kernels/fused_triton.py,
csrc/norms.cu; kernels/fused_spec.py describes the shared rows kernel). The 8-bit-output variants of
the LayerNorms are in kernels/norm_quant.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused_spec
from .checks import (FLOAT_DTYPES, OpArgumentError, check_eps, check_rows_not_empty, check_shape, check_tensor,
                     float_out_dtype)
from .registry import register, resolve
from .triton_support import triton_runs_on


@register("layer_norm", "torch")
def _layer_norm_torch(x, weight, bias, eps, out_dtype):
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(out_dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               eps: float, out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dimension (biased variance), optional affine weight/bias [C]."""
    check_tensor("layer_norm", "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise OpArgumentError("layer_norm: x must have at least one dimension (the one normalised)")
    check_rows_not_empty("layer_norm", x)
    eps = check_eps("layer_norm", eps)
    out_dtype = float_out_dtype("layer_norm", out_dtype, x.dtype)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor("layer_norm", name, p, dtypes=FLOAT_DTYPES, device=x.device)
            check_shape("layer_norm", name, p, (x.shape[-1],))
    return resolve("layer_norm", backend, x.device)(x, weight, bias, eps, out_dtype)


@register("layer_norm_modulate", "torch")
def _layer_norm_modulate_torch(x, shift, scale, eps, out_dtype):
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (normed * (1 + scale[:, None, :]) + shift[:, None, :]).to(out_dtype)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float,
                        out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """adaLN: `LN(x) · (1 + scale) + shift` with x [B, L, C] and per-sample shift, scale [B, C] (fp32)."""
    check_tensor("layer_norm_modulate", "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_rows_not_empty("layer_norm_modulate", x)
    eps = check_eps("layer_norm_modulate", eps)
    out_dtype = float_out_dtype("layer_norm_modulate", out_dtype, x.dtype)
    B, _, C = x.shape
    for name, p in (("shift", shift), ("scale", scale)):
        check_tensor("layer_norm_modulate", name, p, dtypes=(torch.float32,), device=x.device)
        check_shape("layer_norm_modulate", name, p, (B, C))
    return resolve("layer_norm_modulate", backend, x.device)(x, shift, scale, eps, out_dtype)


@register("rms_norm", "torch")
def _rms_norm_torch(x, weight, eps, out_dtype):
    x = x.float()
    return (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.float()).to(out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float, out_dtype: torch.dtype | None = None,
             backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension: `x · rsqrt(mean(x²) + eps) · weight`."""
    check_tensor("rms_norm", "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise OpArgumentError("rms_norm: x must have at least one dimension (the one normalised)")
    check_rows_not_empty("rms_norm", x)
    eps = check_eps("rms_norm", eps)
    out_dtype = float_out_dtype("rms_norm", out_dtype, x.dtype)
    check_tensor("rms_norm", "weight", weight, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("rms_norm", "weight", weight, (x.shape[-1],))
    return resolve("rms_norm", backend, x.device)(x, weight, eps, out_dtype)


# ---- kernel backends --------------------------------------------------------------------------------

def _layer_norm_kernel(backend):
    def run(x, weight, bias, eps, out_dtype):
        out, _ = fused_spec.run_rows(backend, x, out_dtype=out_dtype, norm=fused_spec.NORM_LAYER,
                                     weight=weight, bias=bias, eps=eps)
        return out.view(x.shape)
    return run


def _layer_norm_modulate_kernel(backend):
    def run(x, shift, scale, eps, out_dtype):
        out, _ = fused_spec.run_rows(backend, x, out_dtype=out_dtype, norm=fused_spec.NORM_LAYER,
                                     shift=shift, scale=scale, rows_per_batch=max(x.shape[1], 1), eps=eps)
        return out.view(x.shape)
    return run


def _rms_norm_kernel(backend):
    def run(x, weight, eps, out_dtype):
        out, _ = fused_spec.run_rows(backend, x, out_dtype=out_dtype, norm=fused_spec.NORM_RMS,
                                     weight=weight, eps=eps)
        return out.view(x.shape)
    return run


for _backend, _runs_on in (("triton", triton_runs_on), ("cuda", fused_spec.cuda_runs_on)):
    register("layer_norm", _backend, _runs_on)(_layer_norm_kernel(_backend))
    register("layer_norm_modulate", _backend, _runs_on)(_layer_norm_modulate_kernel(_backend))
    register("rms_norm", _backend, _runs_on)(_rms_norm_kernel(_backend))
