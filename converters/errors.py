"""The converter's own error."""

from dit8.errors import Dit8Error


class ConvertError(Dit8Error, ValueError):
    """convert() was asked for something it cannot do (bad scheme, existing DST, DST inside SRC...)."""
