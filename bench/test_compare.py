"""--benchmark-compare against saved runs on a GPU (bench/conftest.py): which comparisons are refused.

Not a benchmark. The checks run on pytest-benchmark's loaded runs (path -> {test id: row}); two runs of
pytest in a subprocess whose torch reports a GPU (a plugin replaces torch.cuda's device queries; nothing
runs on it) check that the suites call them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"
MACHINE = "Linux-CPython-3.12-64bit"
ROW = "bench/test_bench_gemm.py::test_gemm[fp8-32760x5120x5120]"


def rows(device: str, test_id: str = ROW) -> dict:
    return {test_id: {"fullname": test_id, "extra_info": {"device": device, "ms": 1.0}}}


def test_runs_of_the_same_gpu_compare(compare_checks):
    check_runs, check_rows = compare_checks
    compared = {f"{MACHINE}/0008_gemm.json": rows(GPU)}
    assert check_runs(compared, GPU, compare=f"{MACHINE}/0008", storage="bench/baselines", fail=True) == []
    check_rows(compared, [ROW, "bench/test_bench_gemm.py::test_plot_results_writes_a_chart"])


def test_another_gpu_warns_and_fails_a_regression_check(compare_checks):
    check_runs, _ = compare_checks
    compared = {f"{MACHINE}/0012_gemm.json": rows("NVIDIA H200")}
    warnings = check_runs(compared, GPU, compare=f"{MACHINE}/0012", storage="bench/baselines", fail=False)
    assert len(warnings) == 1 and "0012_gemm.json was timed on NVIDIA H200, this run on " + GPU in warnings[0]
    with pytest.raises(pytest.UsageError, match="timed on NVIDIA H200.*same GPU only"):
        check_runs(compared, GPU, compare=f"{MACHINE}/0012", storage="bench/baselines", fail=True)


def test_a_smoke_run_compares_with_nothing(compare_checks):
    check_runs, _ = compare_checks
    compared = {f"{MACHINE}/0013_gemm.json": rows("cpu (smoke: interpreter, tiny shapes)")}
    with pytest.raises(pytest.UsageError, match="0013_gemm.json was saved by a smoke run"):
        check_runs(compared, GPU, compare=f"{MACHINE}/0013", storage="bench/baselines", fail=False)


def test_no_saved_run_and_no_common_row_are_errors(compare_checks):
    check_runs, check_rows = compare_checks
    with pytest.raises(pytest.UsageError, match="no saved run matching '0008' in bench/baselines"):
        check_runs({}, GPU, compare="0008", storage="bench/baselines", fail=False)
    with pytest.raises(pytest.UsageError, match="no saved run in .benchmarks"):
        check_runs({}, GPU, compare=True, storage=".benchmarks", fail=False)
    # A named folder needs no folder hint; another storage than the committed baselines' gets theirs.
    with pytest.raises(pytest.UsageError) as refused:
        check_runs({}, GPU, compare=f"{MACHINE}/0008", storage="/home/me/dit8/.benchmarks", fail=False)
    assert "name it" not in str(refused.value)
    assert "--benchmark-storage=file://bench/baselines" in str(refused.value)
    with pytest.raises(pytest.UsageError) as refused:
        check_runs({}, GPU, compare="0008", storage="/home/me/dit8/bench/baselines", fail=False)
    assert "e.g. Linux-CPython-3.12-64bit/0008" in str(refused.value)
    assert "--benchmark-storage" not in str(refused.value)
    attention = {f"{MACHINE}/0009_attention.json": rows(GPU, "bench/test_bench_attention.py::test_x")}
    with pytest.raises(pytest.UsageError, match="none of the 1 selected tests has a row in .*0009_attention"):
        check_rows(attention, [ROW])


# The statistics pytest-benchmark reads of a saved row (one round of 1 ms).
STATS = dict(min=1e-3, max=1e-3, mean=1e-3, median=1e-3, q1=1e-3, q3=1e-3, ld15iqr=1e-3, hd15iqr=1e-3, ops=1e3,
             total=1e-3, stddev=0.0, iqr=0.0, rounds=1, iterations=1, iqr_outliers=0, stddev_outliers=0,
             outliers="0;0")
FAKE_GPU = f"""
import torch
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *args: {GPU!r}
torch.cuda.get_device_capability = lambda *args: (9, 0)
"""


NO_GPU = """
import torch
torch.cuda.is_available = lambda: False
"""


def test_without_a_gpu_the_refusal_comes_first(tmp_path):
    """Without CUDA the suites refuse --benchmark-compare before pytest-benchmark loads the saved runs (its
    warning that their machine differs, a page of CPU flags, would bury the refusal)."""
    (tmp_path / "no_gpu.py").write_text(NO_GPU)
    saved = tmp_path / MACHINE
    saved.mkdir()
    (saved / "0001_gemm.json").write_text(json.dumps({
        "machine_info": {"node": "another machine"}, "commit_info": {}, "datetime": "2026-11-26T00:00:00",
        "version": "5.1.0", "benchmarks": [{"name": "test_gemm", "fullname": ROW, "group": None, "params": None,
                                            "param": None, "options": {}, "extra_info": {"device": GPU},
                                            "stats": STATS}]}))
    env = subprocess_env(tmp_path)
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no_gpu", "-p", "no:cacheprovider", "-q",
                          f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"), "--collect-only",
                          f"{__file__}::test_runs_of_the_same_gpu_compare", f"--benchmark-storage=file://{tmp_path}",
                          f"--benchmark-compare={MACHINE}/0001"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "--benchmark-compare needs a GPU" in run.stderr, run.stderr
    assert "machine_info is different" not in run.stdout + run.stderr, run.stderr


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment with tmp_path's plugins importable, less pytest-xdist's worker
    variables: pytest-benchmark takes PYTEST_XDIST_WORKER for a worker of its own and disables itself
    (the subprocess is no worker, whether or not this suite runs under -n)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("compare, message", [
    ("0042", "no saved run matching '0042'"),  # pytest-benchmark warns only, and compares nothing
    (f"{MACHINE}/0001", "none of the 1 selected tests has a row"),  # another suite's run
])
def test_the_suites_refuse_them(tmp_path, compare, message):
    """pytest on a (reported) GPU stops before the benchmarks with the error."""
    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    saved = tmp_path / MACHINE
    saved.mkdir()
    (saved / "0001_attention.json").write_text(json.dumps({
        "machine_info": {}, "commit_info": {}, "datetime": "2026-11-26T00:00:00", "version": "5.1.0",
        "benchmarks": [{"name": "test_x", "fullname": "bench/test_bench_attention.py::test_x", "group": None,
                        "params": None, "param": None, "options": {}, "extra_info": {"device": GPU},
                        "stats": STATS}]}))
    env = subprocess_env(tmp_path)
    # From tmp_path: pytest-benchmark names its storage relative to the working folder.
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_gpu", "-p", "no:cacheprovider", "-q",
                          f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"), "--collect-only",
                          f"{__file__}::test_runs_of_the_same_gpu_compare", f"--benchmark-storage=file://{tmp_path}",
                          f"--benchmark-compare={compare}", "--benchmark-compare-fail=median:10%"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert message in run.stderr, run.stderr


def pytest_on_a_gpu(tmp_path: Path, options: list[str]) -> subprocess.CompletedProcess:
    """pytest (collection only) with `options` in a subprocess whose torch reports a GPU, from tmp_path, which
    holds a run of this GPU saved as 0001, with a row of the test collected."""
    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    saved = tmp_path / MACHINE
    saved.mkdir()
    test_id = "bench/test_compare.py::test_runs_of_the_same_gpu_compare"
    (saved / "0001_compare.json").write_text(json.dumps({
        "machine_info": {}, "commit_info": {}, "datetime": "2026-11-26T00:00:00", "version": "5.1.0",
        "benchmarks": [{"name": test_id.split("::")[1], "fullname": test_id, "group": None, "params": None,
                        "param": None, "options": {}, "extra_info": {"device": GPU}, "stats": STATS}]}))
    env = subprocess_env(tmp_path)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_gpu", "-p", "no:cacheprovider", "-q",
                           f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"), "--collect-only",
                           f"{__file__}::test_runs_of_the_same_gpu_compare", f"--benchmark-storage=file://{tmp_path}",
                           *options], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("options, message", [
    # pytest-benchmark refuses this only after the whole suite ran
    (["--benchmark-compare-fail=median:10%"], "--benchmark-compare-fail needs --benchmark-compare"),
    # pytest-benchmark times nothing, and a 10x slower run passes
    ([f"--benchmark-compare={MACHINE}/0001", "--benchmark-compare-fail=median:10%", "--benchmark-disable"],
     "with the benchmarks disabled"),
    ([f"--benchmark-compare={MACHINE}/0001", "--benchmark-compare-fail=median:10%", "-n", "1"],
     "with the benchmarks disabled"),
])
def test_a_regression_check_that_judges_nothing_is_refused(tmp_path, options, message):
    if "-n" in options:
        pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    run = pytest_on_a_gpu(tmp_path, options)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert message in run.stderr, run.stderr
