"""Devices: checking a device argument before anything is loaded onto it; synchronising and peak memory."""

from __future__ import annotations

import resource
import sys

import torch

from .errors import InputError


def resolve_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device that exists on this machine; InputError naming it otherwise (a
    malformed name, CUDA where torch has no CUDA or sees no GPU, an index past the GPU count)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"device {device!r}: CUDA is not available here ({why}); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        raise InputError(f"device {device!r}: dit8 runs on cpu or cuda")
    return resolved


def check_not_meta(tensor: torch.Tensor, what: str) -> None:
    """InputError naming `what` for a meta tensor: it has a shape but no values, and reading them (a copy
    to another device, .item()) failed inside torch with an error that named no input."""
    if tensor.is_meta:
        raise InputError(f"{what} is a meta tensor, which holds no values; give it on the cpu or a cuda device")


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA device (a CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): CUDA max_memory_allocated since the last reset_peak, or on a CPU the
    process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def available_host_memory() -> int | None:
    """Bytes the operating system can give new allocations without swapping (Linux's MemAvailable), or
    None where it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None
