"""linear: y = x · weightᵀ + bias in the weight's dtype (fp32 accumulation on every backend)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import FLOAT_DTYPES, check_shape, check_tensor
from .registry import register, resolve


@register("linear", "torch")
def _linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """x [..., K] (any float dtype, cast to weight's), weight [N, K], bias [N] -> [..., N] in weight's dtype."""
    check_tensor("linear", "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("linear", "x", x, floating=True, device=weight.device)
    check_shape("linear", "x", x, (None,) * (x.dim() - 1) + (weight.shape[1],))
    if bias is not None:
        check_tensor("linear", "bias", bias, dtypes=(weight.dtype,), device=weight.device)
        check_shape("linear", "bias", bias, (weight.shape[0],))
    return resolve("linear", backend, x.device)(x, weight, bias)
