"""LayerNorm (+ adaLN modulation, or + affine) followed by per-token 8-bit quantization, in one pass.

The brackets of the DiT data flow (README.md, "Architecture") before the fp8/int8 GEMMs:
- `layer_norm_modulate_quant`: norm1 / norm2 of a block, `LN(x)·(1 + scale[b]) + shift[b]` then
  quantize_per_token, feeding the QKV GEMMs and the FFN up GEMM;
- `layer_norm_quant`: the affine norm3 before the cross-attention q GEMM.

The quantization is the quantize_per_token contract (kernels/quantize.py) applied to the fp32 result of
the norm, never rounded to a 16-bit type in between: scale = max(amax, 1e-12) / qmax per token, codes of
y / scale. The torch references below are literally "reference norm in fp32, then quantize_rows".
Backends "triton" and "cuda" run kernels/fused_spec.py's rows kernel: read x once, write 1 byte per
element plus one fp32 scale per token.
"""

from __future__ import annotations

import torch

from . import fused_spec
from .checks import FLOAT_DTYPES, check_eps, check_rows_not_empty, check_shape, check_tensor
from .norms import _layer_norm_modulate_torch, _layer_norm_torch
from .quantize import SCALE_FLOOR, check_quant_dtype, quantize_rows
from .registry import register, resolve
from .triton_support import triton_runs_on


# ---- adaLN: LN(x)·(1 + scale) + shift, quantized -----------------------------------------------------

@register("layer_norm_modulate_quant", "torch")
def _layer_norm_modulate_quant_torch(x, shift, scale, eps, dtype):
    y = _layer_norm_modulate_torch(x, shift, scale, eps, torch.float32)
    q, s = quantize_rows(y.reshape(-1, y.shape[-1]), dtype, SCALE_FLOOR)
    return q.view(x.shape), s.view(x.shape[:-1])


def _layer_norm_modulate_quant_kernel(backend):
    def run(x, shift, scale, eps, dtype):
        q, s = fused_spec.run_rows(backend, x, out_dtype=dtype, norm=fused_spec.NORM_LAYER, shift=shift,
                                   scale=scale, rows_per_batch=max(x.shape[1], 1), eps=eps)
        return q.view(x.shape), s.view(x.shape[:-1])
    return run


def layer_norm_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float,
                              dtype: torch.dtype, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, C] (fp32 residual stream, or bf16/fp16), shift and scale [B, C] fp32 (the modulation) ->
    (xq [B, L, C] of `dtype`, xq_scale [B, L] fp32) with xq·xq_scale ≈ LN(x)·(1 + scale) + shift.

    dtype: torch.float8_e4m3fn or torch.int8. LayerNorm without affine, biased variance, fp32 statistics.
    For the W8A8 GEMM, `xq.view(-1, C)` and `xq_scale.view(-1)` are its per-token operands.
    """
    op = "layer_norm_modulate_quant"
    check_tensor(op, "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_quant_dtype(op, dtype)
    check_rows_not_empty(op, x)
    eps = check_eps(op, eps)
    B, _, C = x.shape
    for name, p in (("shift", shift), ("scale", scale)):
        check_tensor(op, name, p, dtypes=(torch.float32,), device=x.device)
        check_shape(op, name, p, (B, C))
    return resolve(op, backend, x.device)(x, shift, scale, eps, dtype)


# ---- affine LayerNorm (norm3), quantized --------------------------------------------------------------

@register("layer_norm_quant", "torch")
def _layer_norm_quant_torch(x, weight, bias, eps, dtype):
    y = _layer_norm_torch(x, weight, bias, eps, torch.float32)
    q, s = quantize_rows(y.reshape(-1, y.shape[-1]), dtype, SCALE_FLOOR)
    return q.view(x.shape), s.view(x.shape[:-1])


def _layer_norm_quant_kernel(backend):
    def run(x, weight, bias, eps, dtype):
        q, s = fused_spec.run_rows(backend, x, out_dtype=dtype, norm=fused_spec.NORM_LAYER, weight=weight,
                                   bias=bias, eps=eps)
        return q.view(x.shape), s.view(x.shape[:-1])
    return run


def layer_norm_quant(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                     eps: float, dtype: torch.dtype, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., C] -> (xq [..., C] of `dtype`, xq_scale [...] fp32) with xq·xq_scale ≈ LN(x)·weight + bias
    (weight, bias [C] optional; biased variance, fp32 statistics). dtype: float8_e4m3fn or int8."""
    op = "layer_norm_quant"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_quant_dtype(op, dtype)
    check_rows_not_empty(op, x)
    eps = check_eps(op, eps)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(op, name, p, dtypes=FLOAT_DTYPES, device=x.device)
            check_shape(op, name, p, (x.shape[-1],))
    return resolve(op, backend, x.device)(x, weight, bias, eps, dtype)


for _backend, _runs_on in (("triton", triton_runs_on), ("cuda", fused_spec.cuda_runs_on)):
    register("layer_norm_modulate_quant", _backend, _runs_on)(_layer_norm_modulate_quant_kernel(_backend))
    register("layer_norm_quant", _backend, _runs_on)(_layer_norm_quant_kernel(_backend))
