"""Which kernels a test marked `verifies(...)` checks; tests/conftest.py records them on a GPU."""

from __future__ import annotations

import pytest


def verified_kernels(marker: pytest.Mark | None, params: dict) -> list[str]:
    """The "op:backend" name of each kernel a test marked `verifies(*ops, backend=...)` checks when it runs
    with these parameters on a GPU: the backend comes from the marker or from the test's `backend`
    parameter; a test parametrized to run on CPU tensors checks none."""
    if marker is None or params.get("device", "cuda") != "cuda":
        return []
    backends = marker.kwargs.get("backend") or params.get("backend")
    backends = (backends,) if isinstance(backends, str) else tuple(backends or ())
    return [f"{op}:{backend}" for op in marker.args for backend in backends]
