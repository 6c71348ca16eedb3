"""Which kernels a test marked `verifies(...)` checks; tests/conftest.py records them on a GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def item_kernels(item: pytest.Item) -> list[str]:
    """Every kernel a collected test verifies on a GPU, from all its `verifies` marks (a test may stack
    several)."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    return list(dict.fromkeys(k for mark in item.iter_markers("verifies") for k in verified_kernels(mark, params)))


def gpu_tests_first(items: list[pytest.Item]) -> None:
    """Reorder `items` in place: the tests that need the GPU or verify kernels first, each group in its
    own order. A GPU run cut short by its time limit then loses CPU-only tests, which run anywhere."""
    items.sort(key=lambda item: item.get_closest_marker("gpu") is None and not item_kernels(item))


def write_kernel_tests(items: list[pytest.Item], path: Path) -> None:
    """Write {node id: kernels} for every collected test that verifies a kernel on a GPU or needs one
    (marked `gpu`; its kernels may be none), so that a run's report can be checked for the tests that
    never ran (a run cut short, a crashed worker). Written whole or not at all: each pytest-xdist worker
    collects and writes the same map."""
    tests = {item.nodeid: kernels for item in items
             if (kernels := item_kernels(item)) or item.get_closest_marker("gpu") is not None}
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(tests, indent=1, sort_keys=True) + "\n")
    os.replace(temp, path)


def log_outcome(report: pytest.TestReport, path: Path) -> None:
    """Append one phase's outcome of one test to `path` as a JSON line (node id, phase, outcome and the
    kernels it verifies), for bench/verified_backends.py --outcomes. Written as each test ends, the log
    outlasts a run stopped while pytest shut its workers down, before it wrote the JUnit report."""
    verifies = [value for name, value in report.user_properties if name == "verifies"]
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome, "verifies": verifies}
    with path.open("a") as log:
        log.write(json.dumps(line) + "\n")
