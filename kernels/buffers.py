"""Output allocation for kernel backends.

Kernels write every element of their outputs, so outputs are allocated uninitialised. With
DIT8_POISON_OUTPUTS=1 (the test suite sets it) they are filled with NaN (integers: their minimum
value) first, so an element a kernel forgets to write shows up in the comparison with the reference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

POISON_ENV = "DIT8_POISON_OUTPUTS"


def poisoning() -> bool:
    """Whether new outputs are poisoned (DIT8_POISON_OUTPUTS=1)."""
    return os.environ.get(POISON_ENV) == "1"


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Outputs allocated inside are poisoned as under DIT8_POISON_OUTPUTS=1: for the benchmarks' check
    calls, whose timed calls must not pay for the fill."""
    before = os.environ.get(POISON_ENV)
    os.environ[POISON_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(POISON_ENV, None)
        else:
            os.environ[POISON_ENV] = before


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill completely."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out
