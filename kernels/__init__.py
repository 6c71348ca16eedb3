"""dit8.kernels: the op layer. One file per op family, each with its torch reference beside the
faster backends; every op takes `backend=` ("auto", "torch", "triton", "cuda").

The ops check their arguments' dtypes, devices and shapes (OpArgumentError), not their values: NaN and
Inf go through as the arithmetic takes them (reading values would wait for the GPU at every call). The
model and the pipeline check their inputs and outputs where that is cheap (dit8.NumericalError)."""

from .attention import attention, cross_attention
from .checks import OpArgumentError
from .elementwise import activation, residual_add
from .linear import linear
from .norm_quant import layer_norm_modulate_quant, layer_norm_quant
from .norms import layer_norm, layer_norm_modulate, rms_norm
from .qk_norm_rope import QuantizedQK, qk_norm_rope, qk_norm_rope_quant
from .quantize import gelu_tanh_quant, quantize_per_token
from .registry import BACKENDS, BackendError, available_backends
from .rope import rope
from .scaled_mm import scaled_mm

__all__ = [
    "BACKENDS", "BackendError", "OpArgumentError", "QuantizedQK", "activation", "attention", "available_backends",
    "cross_attention", "gelu_tanh_quant", "layer_norm", "layer_norm_modulate", "layer_norm_modulate_quant",
    "layer_norm_quant", "linear", "qk_norm_rope", "qk_norm_rope_quant", "quantize_per_token", "residual_add",
    "rms_norm", "rope", "scaled_mm",
]
