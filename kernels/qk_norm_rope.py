"""q/k RMSNorm + 3D RoPE of Wan's self-attention, both tensors in one launch.

Between the QKV GEMMs and attention (spec/wan21-dit.md):
    q = rope(rms_norm(q_lin, weight_q)), k = rope(rms_norm(k_lin, weight_k))
RMSNorm over the FULL width C = heads·head_dim (all heads together; eps 1e-6 for Wan, fp32 statistics:
`x·rsqrt(mean(x²) + eps)·w`), then each head's interleaved channel pairs (2j, 2j+1) rotate by the
token's angle j: `out[2j] = a·cos − b·sin`, `out[2j+1] = a·sin + b·cos`, with cos/sin [L, head_dim/2]
fp32 from `dit8.rope.rope_table` (angles built in float64 as the official code; [22, 21, 21] pairs
for head_dim 128). Everything in fp32, one rounding to the output type at the end.

Inputs q, k [B, L, C] are read as the GEMMs leave them: any batch and token strides with unit channel
stride, so `qkv[..., :C]` and `qkv[..., C:2C]` of one fused QKV output are read in place.

Outputs:
- `qk_norm_rope`: q, k [B, L, H, D] contiguous in out_dtype (default: q's dtype) -- what
  `dit8.kernels.attention` takes.
- `qk_norm_rope_quant` (for the 8-bit attention): a `QuantizedQK` of
      q, k          [B, L, H, D] int8 or float8_e4m3fn codes, contiguous (same layout as above);
      q_scale, k_scale  [B, H, L] fp32, contiguous: ONE SCALE PER (batch, head, token) ROW of D values,
                    scale = max(amax over the row's D channels, 1e-12) / qmax (127 or 448), codes of
                    value / scale rounded as quantize_per_token (int8 half-to-even, e4m3 RNE after a
                    clamp to ±448).
  So q[b, l, h, :] ≈ q.codes[b, l, h, :]·q_scale[b, h, l], and a tile of scores dequantizes as
  (codes_q · codes_kᵀ) · q_scale[b, h, rows][:, None] · k_scale[b, h, keys][None, :]: a block of keys'
  scales is one contiguous load. No smoothing is applied and no softmax scale is folded in: mean
  smoothing (SageAttention's K/Q smoothing) needs sequence-wide means, which a one-pass kernel cannot
  know, so an attention that smooths quantizes from the bf16 output of `qk_norm_rope` instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fused_spec
from .checks import OpArgumentError, check_eps, float_out_dtype
from .norms import _rms_norm_torch
from .quantize import SCALE_FLOOR, check_quant_dtype, quantize_rows
from .registry import register, resolve
from .rope import _rope_torch
from .triton_support import triton_runs_on


class QuantizedQK(NamedTuple):
    """8-bit q and k with per-(batch, head, token) scales; see the module docstring for the layout."""

    q: torch.Tensor        # [B, L, H, D] codes
    q_scale: torch.Tensor  # [B, H, L] fp32
    k: torch.Tensor        # [B, L, H, D] codes
    k_scale: torch.Tensor  # [B, H, L] fp32

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k [B, L, H, D] in float64 (for tests and debugging)."""
        def expand(codes, scale):
            return codes.double() * scale.double().permute(0, 2, 1)[..., None]
        return expand(self.q, self.q_scale), expand(self.k, self.k_scale)


def _normed_rotated(x, weight, cos, sin, heads, eps):
    """Reference: the existing rms_norm and rope references composed, in fp32."""
    return _rope_torch(_rms_norm_torch(x, weight, eps, torch.float32).unflatten(-1, (heads, -1)), cos, sin,
                       torch.float32)


@register("qk_norm_rope", "torch")
def _qk_norm_rope_torch(q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype):
    return (_normed_rotated(q, weight_q, cos, sin, heads, eps).to(out_dtype),
            _normed_rotated(k, weight_k, cos, sin, heads, eps).to(out_dtype))


@register("qk_norm_rope_quant", "torch")
def _qk_norm_rope_quant_torch(q, k, weight_q, weight_k, cos, sin, heads, eps, dtype):
    out = []
    for x, w in ((q, weight_q), (k, weight_k)):
        y = _normed_rotated(x, w, cos, sin, heads, eps)  # [B, L, H, D]
        codes, scale = quantize_rows(y.reshape(-1, y.shape[-1]), dtype, SCALE_FLOOR)
        out += [codes.view(y.shape), scale.view(y.shape[:3]).permute(0, 2, 1).contiguous()]
    return QuantizedQK(*out)


def _kernel(backend):
    def run(q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype):
        q_out, k_out, _, _ = fused_spec.run_qk(backend, q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype)
        return q_out, k_out
    return run


def _kernel_quant(backend):
    def run(q, k, weight_q, weight_k, cos, sin, heads, eps, dtype):
        q8, k8, q_scale, k_scale = fused_spec.run_qk(backend, q, k, weight_q, weight_k, cos, sin, heads, eps, dtype)
        return QuantizedQK(q8, q_scale, k8, k_scale)
    return run


for _backend, _runs_on in (("triton", triton_runs_on), ("cuda", fused_spec.cuda_runs_on)):
    register("qk_norm_rope", _backend, _runs_on)(_kernel(_backend))
    register("qk_norm_rope_quant", _backend, _runs_on)(_kernel_quant(_backend))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, *, heads: int, eps: float,
                 out_dtype: torch.dtype | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, L, C] (C = heads·D; unit channel stride, any other strides) -> (q, k) [B, L, heads, D].

    Full-width RMSNorm with weight_q / weight_k [C], then RoPE by cos/sin [L, D/2] fp32 on interleaved
    pairs; fp32 throughout, out_dtype (default q.dtype) at the end. See the module docstring.
    """
    fused_spec.check_qk_shapes("qk_norm_rope", q, k, weight_q, weight_k, cos, sin, heads)
    eps = check_eps("qk_norm_rope", eps)
    out_dtype = float_out_dtype("qk_norm_rope", out_dtype, q.dtype)
    return _run("qk_norm_rope", backend, q.device, q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype)


def qk_norm_rope_quant(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, *, heads: int, eps: float, dtype: torch.dtype,
                       backend: str = "auto") -> QuantizedQK:
    """As qk_norm_rope, then 8-bit codes (dtype int8 or float8_e4m3fn) with one fp32 scale per
    (batch, head, token): QuantizedQK(q [B, L, H, D], q_scale [B, H, L], k, k_scale)."""
    fused_spec.check_qk_shapes("qk_norm_rope_quant", q, k, weight_q, weight_k, cos, sin, heads)
    check_quant_dtype("qk_norm_rope_quant", dtype)
    eps = check_eps("qk_norm_rope_quant", eps)
    return _run("qk_norm_rope_quant", backend, q.device, q, k, weight_q, weight_k, cos, sin, heads, eps, dtype)


def _run(op: str, backend: str, device: torch.device, *args):
    """The op on `backend`; with "auto", rows the kernels do not take (one tile holds a token's q or k,
    up to 16,384 channels, past any Wan model's) go to the torch reference instead of failing."""
    try:
        return resolve(op, backend, device)(*args)
    except OpArgumentError:
        if backend != "auto":
            raise
        return resolve(op, "torch", device)(*args)
