"""dit8.kernels: the op layer. One file per op family, each with its torch reference beside the
faster backends; every op takes `backend=` ("auto", "torch", "triton", "cuda")."""

from .attention import attention, cross_attention
from .checks import OpArgumentError
from .elementwise import activation, residual_add
from .linear import linear
from .norms import layer_norm, layer_norm_modulate, rms_norm
from .quantize import quantize_per_token
from .registry import BACKENDS, BackendError, available_backends
from .rope import rope
from .scaled_mm import scaled_mm

__all__ = [
    "BACKENDS", "BackendError", "OpArgumentError", "activation", "attention", "available_backends",
    "cross_attention", "layer_norm", "layer_norm_modulate", "linear", "quantize_per_token", "residual_add",
    "rms_norm", "rope", "scaled_mm",
]
