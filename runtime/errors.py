"""Exceptions dit8 raises for bad input (the CLI prints their message as one line), and how its entry
points let go of what a failure's traceback would keep."""

import functools
import traceback
from typing import Callable, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Dit8Error(Exception):
    """Base class of every error dit8 raises on purpose."""


class CheckpointError(Dit8Error):
    """A checkpoint cannot be used: absent, truncated, corrupt, or with wrong, missing or extra tensors.

    The message always names the file and, where there is one, the tensor key.
    """


class InputError(Dit8Error, ValueError):
    """Inputs given to a model, encoder or pipeline do not fit it (shape, dtype, size, value)."""


class NumericalError(Dit8Error, ArithmeticError):
    """A computation on finite inputs produced NaN or Inf values (an overflowing dtype, damaged weights the
    loader's checks could not see). The message names the stage and, for the sampler, the step."""


def release_frames(err: BaseException) -> None:
    """Let the finished frames of `err`'s traceback (and of the exceptions it chains) drop their locals,
    before an entry point re-raises it. A caller that keeps the exception (to log it, or to retry inside
    its except block after running out of memory) would otherwise keep every tensor those frames held,
    a model or a call's activations on the GPU among them; the traceback's lines stay. (Frames still
    running, the caller's, are left as they are.)"""
    seen: set[int] = set()
    chained: BaseException | None = err
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__


def releases_frames(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, with `release_frames` applied to whatever it raises: its own frame, finished by then, and
    those below it keep none of their tensors in the exception."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except BaseException as err:
            release_frames(err)
            raise

    return wrapper
