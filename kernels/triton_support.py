"""When the Triton backend can run: on CUDA tensors where triton is installed, and on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1, set before dit8 is imported), which is how the
kernels are tested without a GPU."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


# Looked up once, at import: torch.compile traces the op dispatch (and so triton_runs_on), and refuses
# to trace importlib inside a function.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    """Whether triton can be imported here (looked up once, at import)."""
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """The `runs_on` predicate of every Triton op registration."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return not interpreting() and torch.cuda.is_available()
    return device.type == "cpu" and interpreting()


def triton_unavailable_reason(device: torch.device) -> str:
    """Why `triton_runs_on(device)` is False (an explicit backend="triton" that cannot run says this)."""
    if not triton_installed():
        return "triton is not installed: pip install 'dit8[triton]'"
    if device.type == "cuda":
        return ("TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors only" if interpreting()
                else "torch sees no CUDA GPU")
    if device.type == "cpu":
        return ("on CPU tensors the Triton kernels run only in the interpreter: TRITON_INTERPRET=1, set before "
                "dit8 is imported")
    return f"the Triton kernels take CUDA tensors, not {device.type} ones"


def tensor_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context in which `x`'s CUDA device is the current one (nothing for CPU tensors). Triton launches
    on the current device and its stream, not on the device of the tensors it is given."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(fn: F) -> F:
    """Decorator for launchers whose first argument is a tensor: run them in `tensor_device` of it."""

    @functools.wraps(fn)
    def launcher(x: torch.Tensor, *args, **kwargs):
        with tensor_device(x):
            return fn(x, *args, **kwargs)

    return launcher  # type: ignore[return-value]
