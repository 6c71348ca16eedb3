"""The layers WanDiT is built from, and where they compute: `Setup` (device, compute dtype, op backend,
which linears hold 8-bit weights), float and W8A8 linears, norms and the activation. Each runs one
dit8.kernels op, or two (a float linear and its residual add; a W8A8 linear fed unquantized rows, and
their quantization); buffers are named as in the official checkpoint, so a model's state_dict() keys are
the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

import dit8.kernels as ops
from dit8.kernels.registry import model_backend

from .parallel import SequenceParallel


@dataclass(frozen=True)
class Setup:
    """Where and how a model's layers compute: device, matmul dtype, op backend, and which linear layers
    hold 8-bit weights (module name -> torch.float8_e4m3fn or torch.int8)."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    quantized: Mapping[str, torch.dtype] = field(default_factory=dict)
    parallel: SequenceParallel | None = None  # the process group a forward is split over (sequence parallelism)
    _op_backends: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def backend_of(self, op: str) -> str:
        """The backend= the layers pass to `op` (registry.model_backend: the model's backend where the
        op has that kernel, else "auto"), worked out once per op."""
        if op not in self._op_backends:
            self._op_backends[op] = model_backend(op, self.backend, self.device)
        return self._op_backends[op]

    def input_quantization(self, *names: str) -> torch.dtype | None:
        """The 8-bit dtype to quantize an activation to once for all the linears `names` it feeds:
        set only when every one of them holds weights of that same dtype."""
        dtypes = {self.quantized.get(name) for name in names}
        return dtypes.pop() if len(dtypes) == 1 else None

    def linear(self, name: str, in_features: int, out_features: int) -> nn.Module:
        """The layer called `name`: a QuantLinear where the checkpoint quantized it, else a Linear."""
        if name in self.quantized:
            return QuantLinear(in_features, out_features, self, self.quantized[name])
        return Linear(in_features, out_features, self)


def empty_buffer(setup: Setup, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised buffer on the setup's device, in its compute dtype unless `dtype` says otherwise."""
    return torch.empty(shape, dtype=dtype or setup.dtype, device=setup.device)


@dataclass
class QuantizedRows:
    """An activation already quantized per token for a QuantLinear: xq [M, K], scale [M] fp32, and the
    leading shape of the tensor it came from (M = prod(leading))."""

    xq: torch.Tensor
    scale: torch.Tensor
    leading: tuple[int, ...]

    @classmethod
    def of(cls, xq: torch.Tensor, scale: torch.Tensor) -> "QuantizedRows":
        """From a fused kernel's output: codes xq [..., K] and their per-row scales, as rows [M, K] and [M]."""
        return cls(xq.reshape(-1, xq.shape[-1]), scale.reshape(-1), tuple(xq.shape[:-1]))


class Linear(nn.Module):
    """y = x·Wᵀ + b; `dtype` overrides the setup's compute dtype for the fp32 layers.

    With `residual` (the fp32 residual stream) it returns `residual + y · gate` instead of y.
    """

    weight: torch.Tensor  # buffers: declared, as register_buffer hides their types from type checkers
    bias: torch.Tensor

    def __init__(self, in_features: int, out_features: int, setup: Setup, dtype: torch.dtype | None = None):
        super().__init__()
        self.setup = setup
        self.register_buffer("weight", empty_buffer(setup, out_features, in_features, dtype=dtype))
        self.register_buffer("bias", empty_buffer(setup, out_features, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        y = ops.linear(x, self.weight, self.bias, backend=self.setup.backend_of("linear"))
        if residual is None:
            return y
        return ops.residual_add(residual, y, gate, backend=self.setup.backend_of("residual_add"))


class QuantLinear(nn.Module):
    """W8A8 linear: weight [out, in] fp8/int8 with a per-output-channel scale [out, 1] fp32; the input is
    quantized per token (row) on every call and the scaled GEMM applies both scales and the bias."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, in_features: int, out_features: int, setup: Setup, qdtype: torch.dtype):
        super().__init__()
        self.out_dtype, self.setup = setup.dtype, setup
        self.register_buffer("weight", empty_buffer(setup, out_features, in_features, dtype=qdtype))
        self.register_buffer("weight_scale", empty_buffer(setup, out_features, 1, dtype=torch.float32))
        self.register_buffer("bias", empty_buffer(setup, out_features))

    def forward(self, x: torch.Tensor | QuantizedRows, residual: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """x: activations (quantized here) or QuantizedRows (quantized by a fused norm/GELU kernel).
        With `residual` [B, L, N] fp32 the GEMM epilogue returns `residual + y · gate[b]` in fp32."""
        if not isinstance(x, QuantizedRows):
            xq, scale = ops.quantize_per_token(x.reshape(-1, x.shape[-1]), self.weight.dtype,
                                               backend=self.setup.backend_of("quantize_per_token"))
            x = QuantizedRows(xq, scale, tuple(x.shape[:-1]))
        fused = {}
        if residual is not None:  # gate [B, N]: row r of the flattened batch uses gate[r // L]
            fused.update(residual=residual.reshape(-1, residual.shape[-1]), gate=gate)
        out = ops.scaled_mm(x.xq, x.scale, self.weight, self.weight_scale.view(-1), self.bias,
                            out_dtype=torch.float32 if fused else self.out_dtype,
                            backend=self.setup.backend_of("scaled_mm_fused" if fused else "scaled_mm"), **fused)
        return out.view(*x.leading, out.shape[-1])


class Activation(nn.Module):
    """An elementwise activation of dit8.kernels.activation ("gelu", "gelu_tanh", "silu"); no weights."""

    def __init__(self, kind: str, setup: Setup):
        super().__init__()
        self.kind, self.backend = kind, setup.backend_of("activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.activation(x, self.kind, backend=self.backend)


class LayerNorm(nn.Module):
    """Affine LayerNorm with fp32 parameters; writes the compute dtype (its output feeds a matmul), or,
    with `quantize_to`, quantizes its output per token for the 8-bit linear it feeds (one kernel)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, dim: int, eps: float, setup: Setup, quantize_to: torch.dtype | None = None):
        super().__init__()
        self.eps, self.out_dtype, self.setup, self.quantize_to = eps, setup.dtype, setup, quantize_to
        self.register_buffer("weight", empty_buffer(setup, dim, dtype=torch.float32))
        self.register_buffer("bias", empty_buffer(setup, dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor | QuantizedRows:
        if self.quantize_to is not None:
            return QuantizedRows.of(*ops.layer_norm_quant(x, self.weight, self.bias, eps=self.eps,
                                                          dtype=self.quantize_to,
                                                          backend=self.setup.backend_of("layer_norm_quant")))
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps, out_dtype=self.out_dtype,
                              backend=self.setup.backend_of("layer_norm"))


class ModulatedLayerNorm(nn.Module):
    """adaLN: LayerNorm without affine parameters, then x·(1 + scale) + shift per batch row (the official
    norm1/norm2, which hold no weights). Writes `out_dtype` (default the compute dtype: its output feeds
    a matmul), or, with `quantize_to`, quantizes its output per token for the 8-bit linears it feeds."""

    def __init__(self, eps: float, setup: Setup, *, out_dtype: torch.dtype | None = None,
                 quantize_to: torch.dtype | None = None):
        super().__init__()
        self.eps, self.setup, self.quantize_to = eps, setup, quantize_to
        self.out_dtype = out_dtype or setup.dtype

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | QuantizedRows:
        if self.quantize_to is not None:
            return QuantizedRows.of(*ops.layer_norm_modulate_quant(
                x, shift, scale, eps=self.eps, dtype=self.quantize_to,
                backend=self.setup.backend_of("layer_norm_modulate_quant")))
        return ops.layer_norm_modulate(x, shift, scale, eps=self.eps, out_dtype=self.out_dtype,
                                       backend=self.setup.backend_of("layer_norm_modulate"))


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with an fp32 weight; the caller picks the output dtype."""

    weight: torch.Tensor

    def __init__(self, dim: int, eps: float, setup: Setup):
        super().__init__()
        self.eps, self.backend = eps, setup.backend_of("rms_norm")
        self.register_buffer("weight", empty_buffer(setup, dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, eps=self.eps, out_dtype=out_dtype, backend=self.backend)
