"""Shared test settings: the Triton interpreter on machines without a GPU, and poisoned kernel outputs."""

import os

import pytest
import torch

from kernel_verification import verified_kernels

# Without a GPU, Triton kernels run in the interpreter on CPU tensors; it must be switched on before
# triton (and so dit8.kernels' Triton code) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a kernel fails to write fails the comparison.
os.environ.setdefault("DIT8_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def _record_verified_kernels(request):
    """On a GPU, name in the JUnit XML the kernels the test checks; bench/verified_backends.py turns a
    run's results into dit8.kernels.registry.GPU_VERIFIED entries."""
    if not torch.cuda.is_available():
        return
    callspec = getattr(request.node, "callspec", None)
    kernels = verified_kernels(request.node.get_closest_marker("verifies"), callspec.params if callspec else {})
    if kernels:
        # As record_property does, without its warning under the default xunit2 JUnit family (which
        # still writes test properties).
        request.node.user_properties.append(("verifies", ",".join(kernels)))
