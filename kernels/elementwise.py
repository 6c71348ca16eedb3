"""Pointwise ops: activations and the (gated) residual add into the fp32 residual stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fused_spec
from .checks import FLOAT_DTYPES, OpArgumentError, check_tensor
from .registry import register, resolve
from .triton_support import triton_runs_on

ACTIVATIONS = ("gelu_tanh", "gelu", "silu")


@register("activation", "torch")
def _activation_torch(x, kind):
    if kind == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")


def activation(x: torch.Tensor, kind: str, *, backend: str = "auto") -> torch.Tensor:
    """`kind` is "gelu_tanh" (GELU, tanh approximation), "gelu" (exact erf) or "silu"; same dtype out."""
    if kind not in ACTIVATIONS:
        raise OpArgumentError(f"activation: kind must be one of {ACTIVATIONS}, got {kind!r}")
    check_tensor("activation", "x", x, dtypes=FLOAT_DTYPES)
    return resolve("activation", backend, x.device)(x, kind)


@register("residual_add", "torch")
def _residual_add_torch(x, y, gate):
    y = y.float()
    return x + (y if gate is None else y * gate[:, None, :])


@register("residual_add", "triton", runs_on=triton_runs_on)
def _residual_add_triton(x, y, gate):
    from . import fused_triton  # lazy: triton is an optional dependency

    return fused_triton.residual_add_op(x, y, gate)


def residual_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """`x + y · gate` in fp32: x [B, L, C] fp32 residual stream, y [B, L, C] fp32, bf16 or fp16,
    gate [B, C] fp32 per sample, or None for a plain add."""
    fused_spec.check_residual("residual_add", x, y, gate)
    return resolve("residual_add", backend, x.device)(x, y, gate)
