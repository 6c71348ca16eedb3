"""Exceptions dit8 raises for bad input; the CLI prints their message as one line."""


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
