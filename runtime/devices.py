"""Checking a device argument before anything is loaded onto it."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device that exists on this machine; InputError naming it otherwise (a
    malformed name, CUDA where torch has no CUDA or sees no GPU, an index past the GPU count)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"device {device!r} is not a device name (e.g. cpu, cuda, cuda:1): {err}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"device {device!r}: CUDA is not available here ({why}); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise InputError(f"device {device!r}: dit8 runs on cpu or cuda")
    return resolved
