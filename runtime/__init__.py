"""dit8: a quantized inference runtime for the Wan2.1 image-to-video diffusion transformer."""

import importlib
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as type checkers see them; at run time __getattr__ imports them on first use
    from types import ModuleType

    from .compare import OutputComparison, compare_outputs
    from .config import WanConfig
    from .cuda_graph import CapturedForward
    from .errors import CheckpointError, Dit8Error, InputError, NumericalError
    from .loader import load_dit, open_dit
    from .model import EncodedContext, WanDiT
    from .model_folder import ModelFiles, find_model_files
    from .parallel import SequenceParallel
    from .pipeline import DEFAULT_NEGATIVE_PROMPT, Cancelled, I2VPipeline, ProgressEvent, Video
    from .sampler import DistilledSampler, initial_noise
    from .unipc import UniPCSampler

    # Every submodule, each also an attribute at run time (__getattr__ imports it): `dit8.t5` after `import
    # dit8` is typed rather than Any. Checkers do not see __getattr__ (below), so a misspelt name is an error.
    from . import (  # noqa: F401
        bench_dit, checkpoint, choices, cli, clip, compare, conditioning, config, converters, cuda_graph, demo,
        devices, diffusers_reference, errors, kernels, layers, layouts, loader, model, model_folder,
        packed_format, parallel, pipeline, profiling, progress, random_dit, rope, sampler, t5, testing,
        testing_encoders, testing_pipeline, testing_vae, tokenizer, unipc, vae, video)

__version__ = "0.1.0"

__all__ = ["DEFAULT_NEGATIVE_PROMPT", "Cancelled", "CapturedForward", "CheckpointError", "Dit8Error",
           "DistilledSampler", "EncodedContext", "I2VPipeline", "InputError", "ModelFiles", "NumericalError",
           "OutputComparison", "ProgressEvent", "SequenceParallel", "UniPCSampler", "Video", "WanConfig", "WanDiT",
           "compare_outputs", "find_model_files", "initial_noise", "load_dit", "open_dit", "__version__"]

# The module of each public name. They are imported on first use (PEP 562): most of them load torch
# (seconds), which `import dit8` alone, and the command line's help and argument errors, do not need.
_EXPORTS = {
    "WanConfig": "config", "OutputComparison": "compare", "compare_outputs": "compare",
    "CapturedForward": "cuda_graph", "CheckpointError": "errors", "Dit8Error": "errors",
    "InputError": "errors", "NumericalError": "errors", "load_dit": "loader", "open_dit": "loader",
    "EncodedContext": "model", "WanDiT": "model", "ModelFiles": "model_folder", "find_model_files": "model_folder",
    "SequenceParallel": "parallel", "DEFAULT_NEGATIVE_PROMPT": "pipeline", "Cancelled": "pipeline",
    "I2VPipeline": "pipeline", "ProgressEvent": "pipeline", "Video": "pipeline", "DistilledSampler": "sampler",
    "initial_noise": "sampler", "UniPCSampler": "unipc",
}


# First uses from several threads at once import one at a time. Python does not make an import of
# dit8.converters wait for dit8.kernels, which another thread may be half-way through (a package's
# submodule imported directly: converters/quantize_weights.py imports dit8.kernels.quantize), and read
# it partially initialized ("cannot import name ... from partially initialized module"). Reentrant: a
# module imported here may import others through this function. It cannot deadlock with a thread
# importing a dit8 module directly, since no dit8 module's import comes back here
# (tests/test_imports.py).
_IMPORT_LOCK = threading.RLock()


def _import(module: str) -> "ModuleType":
    try:
        with _IMPORT_LOCK:
            return importlib.import_module(f".{module}", __name__)
    except AttributeError as err:
        # Raised out of __getattr__, it would read as "no such name": `from dit8 import X` would only say
        # "cannot import name 'X'" and hasattr() be False, hiding what failed in the module's import.
        raise ImportError(f"importing {__name__}.{module} failed: {err}") from err


if not TYPE_CHECKING:  # seen by a checker, its Any would let every misspelt `dit8.X` pass
    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is not None:
            value = getattr(_import(module), name)
            globals()[name] = value  # found directly from now on
            return value
        if not name.startswith("_"):
            # A submodule not imported yet (`dit8.t5`, `dit8.kernels`), as when `import dit8` imported them all.
            try:
                return _import(name)
            except ModuleNotFoundError as err:
                if err.name != f"{__name__}.{name}":
                    raise  # a dependency of that module is missing: say which
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
