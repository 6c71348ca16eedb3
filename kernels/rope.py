"""rope: 3D rotary position embedding on interleaved channel pairs (2k, 2k+1)."""

from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, OpArgumentError, check_shape, check_tensor, float_out_dtype
from .registry import register, resolve


@register("rope", "torch")
def _rope_torch(x, cos, sin, out_dtype):
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(out_dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out_dtype: torch.dtype | None = None,
         backend: str = "auto") -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles whose cos/sin are [L, D/2] fp32 (see dit8.rope for the table).

    `out[2k] = x[2k]·cos − x[2k+1]·sin`, `out[2k+1] = x[2k]·sin + x[2k+1]·cos`, computed in fp32.
    """
    check_tensor("rope", "x", x, ndim=4, dtypes=FLOAT_DTYPES)
    out_dtype = float_out_dtype("rope", out_dtype, x.dtype)
    _, L, _, D = x.shape
    if D % 2:
        raise OpArgumentError(f"rope: x's head_dim {D} must be even (channels rotate in pairs)")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor("rope", name, table, dtypes=(torch.float32,), device=x.device)
        check_shape("rope", name, table, (L, D // 2))
    return resolve("rope", backend, x.device)(x, cos, sin, out_dtype)
