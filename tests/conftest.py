"""Shared test settings: the Triton interpreter on machines without a GPU, and poisoned kernel outputs."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors; it must be switched on before
# triton (and so dit8.kernels' Triton code) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a kernel fails to write fails the comparison.
os.environ.setdefault("DIT8_POISON_OUTPUTS", "1")


def verified_kernels(marker: pytest.Mark | None, params: dict) -> list[str]:
    """"op:backend" for each kernel a test marked `verifies(*ops, backend=...)` checks when it runs
    with these parameters on a GPU: the backend comes from the marker or from the test's `backend`
    parameter; a test parametrized to run on CPU tensors checks none."""
    if marker is None or params.get("device", "cuda") != "cuda":
        return []
    backends = marker.kwargs.get("backend") or params.get("backend")
    backends = (backends,) if isinstance(backends, str) else tuple(backends or ())
    return [f"{op}:{backend}" for op in marker.args for backend in backends]


@pytest.fixture(autouse=True)
def _record_verified_kernels(request, record_property):
    """On a GPU, name in the JUnit XML the kernels the test checks; bench/verified_backends.py turns a
    run's results into dit8.kernels.registry.GPU_VERIFIED entries."""
    if not torch.cuda.is_available():
        return
    callspec = getattr(request.node, "callspec", None)
    kernels = verified_kernels(request.node.get_closest_marker("verifies"), callspec.params if callspec else {})
    if kernels:
        record_property("verifies", ",".join(kernels))
