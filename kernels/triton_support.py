"""When the Triton backend can run: on CUDA tensors where triton is installed, and on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1, set before dit8 is imported), which is how the
kernels are tested without a GPU."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """The `runs_on` predicate of every Triton op registration."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()
