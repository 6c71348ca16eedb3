"""Shared test settings: the Triton interpreter on machines without a GPU, and poisoned kernel outputs."""

import importlib.metadata
import os
from pathlib import Path

import numpy
import pytest
import torch

from kernel_verification import gpu_tests_first, item_kernels, log_outcome, write_kernel_tests


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


# Without a GPU, Triton kernels run in the interpreter on CPU tensors; it must be switched on before
# triton (and so dit8.kernels' Triton code) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# triton < 3.9's interpreter turns one-element arrays into Python scalars, which numpy 2.4 refuses: every
# Triton test would fail with "only 0-dimensional arrays can be converted to Python scalars".
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # not installed (or under another name): not checked
        triton_version = None
    if triton_version and _version(triton_version) < (3, 9) and _version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"triton {triton_version}'s interpreter does not work with numpy "
                                f"{numpy.__version__}: install numpy<2.4 or triton>=3.9")
# pytest-xdist workers share the machine's cores: each worker's torch ops get its share, not all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
# Kernel outputs start as NaN, so an element a kernel fails to write fails the comparison.
os.environ["DIT8_POISON_OUTPUTS"] = "1"  # also where a shell exported 0: the tests rely on it


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    from dit8.testing import fp8_refusal_as_skip  # here: dit8 is imported after TRITON_INTERPRET is set

    fp8_refusal_as_skip(item, call, outcome.get_result())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        gpu_tests_first(items)


def pytest_collection_finish(session):
    # DIT8_KERNEL_TESTS=PATH: the kernels each selected test verifies (bench/verified_backends.py
    # --collected), known before anything runs; written after -k/-m deselection.
    if os.environ.get("DIT8_KERNEL_TESTS"):
        write_kernel_tests(session.items, Path(os.environ["DIT8_KERNEL_TESTS"]))


# DIT8_TEST_OUTCOMES=PATH: each test's outcome, a line as it ends (bench/verified_backends.py --outcomes).
# Written by the process that reports (pytest-xdist's controller, not its workers), started afresh.
_OUTCOMES = os.environ.get("DIT8_TEST_OUTCOMES") if not os.environ.get("PYTEST_XDIST_WORKER") else None


def pytest_sessionstart(session):
    if _OUTCOMES:
        Path(_OUTCOMES).write_text("")


def pytest_runtest_logreport(report):
    if _OUTCOMES:
        log_outcome(report, Path(_OUTCOMES))


@pytest.fixture(autouse=True)
def _committed_verified_kernels(monkeypatch):
    """The tests see the committed registry.GPU_VERIFIED: a DIT8_VERIFIED file in the environment (an
    earlier gpu_check run's) would change what "auto" runs under the tests that check it."""
    monkeypatch.delenv("DIT8_VERIFIED", raising=False)


@pytest.fixture(autouse=True)
def _record_verified_kernels(request):
    """On a GPU, name in the JUnit XML the kernels the test checks; bench/verified_backends.py turns a
    run's results into dit8.kernels.registry.GPU_VERIFIED entries."""
    if not torch.cuda.is_available():
        return
    kernels = item_kernels(request.node)
    if kernels:
        # As record_property does, without its warning under the default xunit2 JUnit family (which
        # still writes test properties).
        request.node.user_properties.append(("verifies", ",".join(kernels)))


@pytest.fixture(autouse=True)
def _skip_cuda_backend_without_extension(request):
    """A test run on the CUDA backend (its `backend` or `kernels` parameter) skips, saying why, on a GPU
    machine that cannot build the CUDA extension (no nvcc, ninja or pybind11, or a failed build)."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec else {}
    if not torch.cuda.is_available() or "cuda" not in (params.get("backend"), params.get("kernels")):
        return
    from dit8.kernels import cuda_ext

    if not cuda_ext.cuda_available(torch.device("cuda")):
        reason = ", ".join(cuda_ext.missing_tools()) or "its build failed (see the warning)"
        pytest.skip(f"the CUDA extension cannot be used here: {reason}")


@pytest.fixture(autouse=True)
def _return_gpu_memory():
    """After each test on a GPU, hand the memory PyTorch keeps cached back to the driver: test processes
    running side by side (pytest-xdist) share one GPU, and one test's float64 references at Wan's
    shapes take over 10 GB."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
