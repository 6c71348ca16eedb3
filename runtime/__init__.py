"""dit8: a quantized inference runtime for the Wan2.1 image-to-video diffusion transformer."""

from .config import WanConfig
from .errors import CheckpointError, Dit8Error, InputError
from .loader import load_dit, open_dit
from .model import EncodedContext, WanDiT
from .sampler import DistilledSampler, initial_noise

__version__ = "0.1.0"

__all__ = ["CheckpointError", "Dit8Error", "DistilledSampler", "EncodedContext", "InputError", "WanConfig",
           "WanDiT", "initial_noise", "load_dit", "open_dit", "__version__"]
