"""dit8: a quantized inference runtime for the Wan2.1 image-to-video diffusion transformer."""

from .config import WanConfig
from .cuda_graph import CapturedForward
from .errors import CheckpointError, Dit8Error, InputError
from .loader import load_dit, open_dit
from .model import EncodedContext, WanDiT
from .model_folder import ModelFiles, find_model_files
from .parallel import SequenceParallel
from .pipeline import DEFAULT_NEGATIVE_PROMPT, Cancelled, I2VPipeline, ProgressEvent, Video
from .sampler import DistilledSampler, initial_noise
from .unipc import UniPCSampler

__version__ = "0.1.0"

__all__ = ["DEFAULT_NEGATIVE_PROMPT", "Cancelled", "CapturedForward", "CheckpointError", "Dit8Error",
           "DistilledSampler", "EncodedContext", "I2VPipeline", "InputError", "ModelFiles", "ProgressEvent",
           "SequenceParallel", "UniPCSampler", "Video", "WanConfig", "WanDiT", "find_model_files", "initial_noise",
           "load_dit", "open_dit", "__version__"]
