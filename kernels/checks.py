"""Argument checks done at the op boundary, before any backend runs."""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch

from dit8.errors import Dit8Error


class OpArgumentError(Dit8Error, ValueError):
    """A tensor passed to an op has the wrong dtype, device or shape."""


def check_tensor(op: str, name: str, t: object, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None, floating: bool = False,
                 device: torch.device | None = None) -> None:
    """Raise OpArgumentError naming `op` and argument `name` if `t` does not fit."""
    if not isinstance(t, torch.Tensor):
        raise OpArgumentError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise OpArgumentError(f"{op}: {name} must have {' or '.join(map(str, allowed))} dimensions, "
                                  f"got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise OpArgumentError(f"{op}: {name} has dtype {t.dtype}; expected one of {dtypes}")
    if floating and not t.is_floating_point():
        raise OpArgumentError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise OpArgumentError(f"{op}: {name} is on {t.device} but the other operands are on {device}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple) -> None:
    """Raise unless t.shape matches `expected` (None entries match any size)."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = tuple("*" if e is None else e for e in expected)
        raise OpArgumentError(f"{op}: {name} has shape {tuple(t.shape)}; expected {want}")


def check_rows_not_empty(op: str, x: torch.Tensor, name: str = "x") -> None:
    """Raise unless `x` (argument `name`) has at least one dimension and its rows (the last dimension)
    are not empty."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise OpArgumentError(f"{op}: {name} has shape {tuple(x.shape)}; rows must not be empty")


def check_eps(op: str, eps: object) -> float:
    """`eps` as a float; OpArgumentError unless it is a finite number >= 0 (a norm's epsilon)."""
    try:  # (an int past the float range fails the conversion)
        finite = not isinstance(eps, bool) and isinstance(eps, numbers.Real) and math.isfinite(float(eps))
    except OverflowError:
        finite = False
    if not finite or eps < 0:
        raise OpArgumentError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def float_out_dtype(op: str, out_dtype: object, default: torch.dtype) -> torch.dtype:
    """`out_dtype`, or `default` where it is None; OpArgumentError unless it is a float dtype."""
    if out_dtype is None:
        return default
    if out_dtype not in FLOAT_DTYPES:
        raise OpArgumentError(f"{op}: out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype!r}")
    return out_dtype


# The largest element offset a Triton kernel may form in 32 bits. Program ids and tl.arange are int32, so
# an offset such as `rows · row_stride` inside a tile, a row or a (batch, head) slice is an int32 product
# (only the kernels' bases are 64-bit); past 2^31 - 1 it wraps and the kernel reads or writes the wrong
# memory without any error.
INT32_MAX = 2 ** 31 - 1


def check_int32_offset(op: str, name: str, offset: int, what: str, hint: str = "") -> None:
    """Raise OpArgumentError naming `op` and argument `name` unless `offset`, the largest element offset a
    kernel forms for it in 32 bits (`what` says how it comes about), is at most INT32_MAX."""
    if offset > INT32_MAX:
        raise OpArgumentError(f"{op}: {name} is too large for the triton kernel's 32-bit offsets: {what} "
                              f"= {offset:,}, past 2^31 - 1 = {INT32_MAX:,}{'; ' + hint if hint else ''}")
