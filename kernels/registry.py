"""Backend registry: every op has a torch reference and, where written, faster backends.

`backend="auto"` picks, among the kernels that have passed their tests on a GPU (GPU_VERIFIED) and the
torch reference, the first usable one of: the backend measured fastest for the op on this GPU
generation (FASTEST), then BACKENDS order. On CPU tensors it picks the torch reference. The
DIT8_BACKEND environment variable names a backend to try first for every op that has it. An explicit
`backend=` is strict: it runs that backend or raises.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from dit8.errors import Dit8Error

# Preference order of "auto": hand-written CUDA, then Triton, then the torch reference.
BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "DIT8_BACKEND"


class BackendError(Dit8Error, ValueError):
    """An op was asked for a backend that does not exist or cannot run here."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    runs_on: Callable[[torch.device], bool]


_OPS: dict[str, dict[str, _Impl]] = {}

# (op, backend) pairs of kernel backends that have passed their tests on a GPU. "auto" picks only
# these (and the torch reference); explicit backend= and DIT8_BACKEND reach every registered kernel.
# The interpreter tests check the Triton kernels on CPU; a run of bench/gpu_check.sh adds entries.
GPU_VERIFIED: frozenset[tuple[str, str]] = frozenset()

# Per GPU generation (CUDA compute capability), the kernel backend measured fastest for an op that has
# several: "auto" tries it before BACKENDS order. bench/fastest_backends.py prints these entries from
# the benchmark suites' JSON.
FASTEST: dict[tuple[int, int], dict[str, str]] = {}


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _any_device(device: torch.device) -> bool:
    return True


def register(op: str, backend: str, runs_on: Callable[[torch.device], bool] = _any_device):
    """Decorator registering `fn` as `backend`'s implementation of `op`.

    `runs_on(device)` tells whether it can run on tensors of that device on this machine.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorate(fn: Callable) -> Callable:
        _OPS.setdefault(op, {})[backend] = _Impl(fn, runs_on)
        return fn

    return decorate


def _check_name(name: str, where: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise BackendError(f"{where}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of `op` to run on `device` for the requested backend."""
    _check_name(backend, f"{op}(backend=...)")
    impls = _OPS[op]
    if backend != "auto":
        impl = impls.get(backend)
        if impl is None or not impl.runs_on(device):
            usable = [b for b, i in impls.items() if i.runs_on(device)]
            raise BackendError(f"{op}: backend {backend!r} cannot run on {device.type} tensors here; "
                               f"usable: {usable}")
        return impl.fn
    preferred = os.environ.get(ENV_VAR, "auto")
    _check_name(preferred, ENV_VAR)
    # On CPU tensors "auto" means the torch reference: Triton there is the interpreter, a testing tool.
    fallback = BACKENDS if device.type != "cpu" else ("torch",)
    fastest = FASTEST.get(_capability(device), {}).get(op) if device.type == "cuda" and FASTEST else None
    order = [name for name in (preferred, fastest) if name not in (None, "auto")] + list(fallback)
    for name in order:
        impl = impls.get(name)
        if impl is not None and impl.runs_on(device) and (name in (preferred, "torch") or (op, name) in GPU_VERIFIED):
            return impl.fn
    raise BackendError(f"{op}: no backend can run on {device.type} tensors here")


def available_backends(device: str | torch.device = "cpu") -> dict[str, list[str]]:
    """For every op, the backends that can run on `device` on this machine, in auto's order."""
    device = torch.device(device)
    return {op: [b for b in BACKENDS if b in impls and impls[b].runs_on(device)]
            for op, impls in sorted(_OPS.items())}
