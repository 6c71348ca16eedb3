"""Shared fixtures of the benchmark suites (pytest-benchmark), for any op family.

CUDA: every timed function runs under `triton.testing.do_bench` (CUDA events, L2 flushed between
runs, median after warm-up); the milliseconds, the rate and the ratio to the baseline measured in the
same run go into `benchmark.extra_info` (see them with `--benchmark-json`). The pytest-benchmark table
itself times a few synchronized calls, as a cross-check.

No CUDA: smoke mode. Suites pick tiny shapes and every function runs once (Triton kernels in the
interpreter), so CI proves the suites still run; the times mean nothing and no rate is reported.

    python -m pytest bench -q                          # the whole suite
    python -m pytest bench -q --benchmark-json=out.json
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch

# As in tests/conftest.py: the interpreter must be switched on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()


# The suites' whole-number settings and their least values (0 layers: the model's own count).
COUNT_SETTINGS = {"DIT8_BENCH_DIT_LAYERS": 0, "DIT8_BENCH_VAE_ROUNDS": 1}


def check_count_settings(environ: dict[str, str]) -> None:
    """Raise a UsageError naming the variable where one of COUNT_SETTINGS is set to anything but a whole
    number of at least its least value (the suites read them with int(), whose error names no variable),
    or DIT8_SWEEP_ONLY to no regular expression."""
    for name, least in COUNT_SETTINGS.items():
        text = environ.get(name)
        if text is not None and not (re.fullmatch(r"\s*[0-9]+\s*", text) and int(text) >= least):
            raise pytest.UsageError(f"{name}={text!r}: expected a whole number of at least {least}")
    try:  # read by the sweeps only, which run on a GPU after everything else: a typo stops the run first
        re.compile(environ.get("DIT8_SWEEP_ONLY") or "")
    except re.error as err:
        raise pytest.UsageError(f"DIT8_SWEEP_ONLY={environ['DIT8_SWEEP_ONLY']!r}: not a regular expression "
                                f"({err})") from None


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark loads the saved runs and warns about their machine
def pytest_configure(config: pytest.Config) -> None:
    check_count_settings(os.environ)
    # A smoke run's times are the interpreter's on tiny shapes: against a GPU baseline they would pass or
    # "regress" by chance (the GEMM rows' names hold their shapes, the others' do not).
    if not CUDA and (config.getoption("benchmark_compare", None) or config.getoption("benchmark_compare_fail", None)):
        raise pytest.UsageError("--benchmark-compare needs a GPU: without CUDA the suites run in smoke mode "
                                "(tiny shapes, the Triton interpreter), whose times compare with nothing")


# A second pytest_configure (specname; pytest takes hooks by their "pytest_" prefix): after pytest-benchmark's,
# which loads the saved runs to compare with.
@pytest.hookimpl(trylast=True, specname="pytest_configure")
def pytest_configure_after_benchmark(config: pytest.Config) -> None:
    # pytest-benchmark's session is not public API (5.x names): where it differs, the checks step aside.
    session = getattr(config, "_benchmarksession", None)
    if CUDA and session is not None:
        check_compare_fail(compare=getattr(session, "compare", None),
                           compare_fail=bool(getattr(session, "compare_fail", None)),
                           disabled=bool(getattr(session, "disabled", False)))
    compared = getattr(session, "compared_mapping", None)
    if CUDA and getattr(session, "compare", None) and compared is not None and hasattr(session, "logger"):
        for warning in check_compared_runs(compared, torch.cuda.get_device_name(), compare=session.compare,
                                           storage=str(getattr(session, "storage", "the benchmark storage")),
                                           fail=bool(getattr(session, "compare_fail", None))):
            session.logger.warning(warning)


def check_compare_fail(*, compare: str | bool | None, compare_fail: bool, disabled: bool = False) -> None:
    """Raise a UsageError where --benchmark-compare-fail (`compare_fail`) can judge nothing: without
    --benchmark-compare, which pytest-benchmark reports only after the whole suite ran, or with the
    benchmarks `disabled` (--benchmark-disable, or pytest-xdist's -n, which disables them): each function
    then runs once untimed, and every regression check passes."""
    if compare_fail and disabled:
        raise pytest.UsageError("--benchmark-compare-fail with the benchmarks disabled (--benchmark-disable, or "
                                "pytest-xdist's -n, under which pytest-benchmark times nothing) would pass "
                                "whatever the times: run the suite without them")
    if compare_fail and not compare:
        raise pytest.UsageError("--benchmark-compare-fail needs --benchmark-compare: name the saved run to judge "
                                "this one against (e.g. --benchmark-storage=file://bench/baselines "
                                "--benchmark-compare=Linux-CPython-3.12-64bit/0015 for an H100's GEMM run)")


def check_compared_runs(compared: dict[str, dict], gpu: str, *, compare: str | bool, storage: str,
                        fail: bool) -> list[str]:
    """Check the saved runs a --benchmark-compare loaded (pytest-benchmark's compared_mapping: path ->
    {test id: row}) against this run on `gpu`; returns the warnings to show.

    pytest-benchmark only warns when no saved run matches the id (and --benchmark-compare-fail then fails
    after the whole suite ran), and its machine_info warning names no GPU. Raises a UsageError where no run
    matched, where a saved run was a smoke run (its rows' extra_info device: a CPU), and, with
    --benchmark-compare-fail (`fail`), where one was timed on another GPU: its times judge nothing here.
    Without `fail`, another GPU is a warning."""
    if not compared:
        what = "saved run" if compare is True else f"saved run matching {compare!r}"
        # The two usual misses: the interpreter's folder (bench/baselines holds CPython 3.12's only) and the
        # storage (pytest-benchmark's default is .benchmarks, not the committed baselines).
        hints = []
        if compare is True or "/" not in str(compare):
            hints.append("without a folder in the id, pytest-benchmark looks only in this interpreter's folder; "
                         "name it, e.g. Linux-CPython-3.12-64bit/0008")
        if Path(storage).parts[-2:] != ("bench", "baselines"):
            hints.append("the committed baselines are in bench/baselines: --benchmark-storage=file://bench/baselines")
        raise pytest.UsageError(f"--benchmark-compare: no {what} in {storage}"
                                + (f" ({'; '.join(hints)})" if hints else ""))
    warnings = []
    for path, rows in compared.items():
        devices = {str(row.get("extra_info", {}).get("device")) for row in rows.values()} - {"None"}
        if any(device.startswith("cpu") for device in devices):
            raise pytest.UsageError(f"--benchmark-compare: {path} was saved by a smoke run (no GPU: the Triton "
                                    f"interpreter on tiny shapes); compare with a run of this GPU ({gpu})")
        others = sorted(devices - {gpu})
        if others:
            message = (f"--benchmark-compare: {path} was timed on {', '.join(others)}, this run on {gpu}; save a "
                       f"run of this GPU first (--benchmark-save) and compare with it")
            if fail:
                raise pytest.UsageError(message + " (--benchmark-compare-fail judges times of the same GPU only)")
            warnings.append(message)
    return warnings


def pytest_collection_finish(session: pytest.Session) -> None:
    # A saved run of another suite shares no test id with this one: pytest-benchmark would compare nothing
    # and --benchmark-compare-fail would pass.
    compared = getattr(getattr(session.config, "_benchmarksession", None), "compared_mapping", None)
    if CUDA and compared and session.items:
        check_compared_rows(compared, [item.nodeid for item in session.items])


def check_compared_rows(compared: dict[str, dict], test_ids: list[str]) -> None:
    """Raise a UsageError where none of the selected tests (`test_ids`) has a row in the saved runs."""
    if not any(test_id in rows for rows in compared.values() for test_id in test_ids):
        saved = ", ".join(map(str, compared))
        raise pytest.UsageError(f"--benchmark-compare: none of the {len(test_ids)} selected tests has a row in "
                                f"{saved}: compare each suite with a run of its own (test_bench_gemm.py with "
                                f"NNNN_gemm, ...)")


@pytest.fixture(scope="session")
def compare_checks():
    """(check_compared_runs, check_compared_rows): what --benchmark-compare accepts on a GPU."""
    return check_compared_runs, check_compared_rows


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    # The baselines of one GPU compare with runs on that GPU only: pytest-benchmark warns when a
    # comparison's machine_info differs (check_compared_runs goes by the rows' extra_info device, which
    # the baselines saved before this entry hold too).
    if CUDA:
        machine_info["gpu"] = {"name": torch.cuda.get_device_name(),
                               "capability": list(torch.cuda.get_device_capability())}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    from dit8.testing import fp8_refusal_as_skip

    fp8_refusal_as_skip(item, call, outcome.get_result())


@pytest.fixture
def triton_kernels_only(monkeypatch):
    """For suites whose rows name the kernel they time: the Triton kernels' rows time them, not the Gluon
    kernels the ops route in on Hopper (kernels/candidates.py); the Gluon rows call those directly."""
    monkeypatch.setenv("DIT8_GLUON", "")


def gpu_time_ms(fn, *, warmup: int = 25, rep: int = 100, min_runs: int = 10) -> float:
    """Median milliseconds of fn() on CUDA (do_bench, over at least `min_runs` runs); on CPU the wall
    time of one call."""
    if CUDA:
        import triton.testing

        # do_bench runs rep / (its estimate of one call) times: a 40 ms attention call would get 2 runs
        # out of rep = 100 ms. One call, timed after a first one (compilation), sets rep.
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        rep = max(rep, math.ceil(1.2 * min_runs * start.elapsed_time(end)))  # do_bench rounds its count down
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def paired_times_ms(fn, baseline, *, rounds: int = 6, rep: int = 40, timer=None) -> tuple[list[float], list[float]]:
    """Per-round median milliseconds of fn and of baseline, timed in alternating order (fn first in
    even rounds, baseline first in odd ones), so that both see the same clocks: a GPU under a heavy load
    changes its clock over seconds (the same cuBLAS GEMM took 1.32-1.47 ms in different rows of one run,
    bench/RESULTS.md), and two timings taken apart put that drift into their ratio. timer(f) -> ms:
    gpu_time_ms over `rep` milliseconds unless given."""
    timer = timer or (lambda f: gpu_time_ms(f, rep=rep, min_runs=5))
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[which].append(timer((fn, baseline)[which]))
    return times[0], times[1]


@pytest.fixture(scope="session")
def paired_times():
    """The paired timing function (paired_times_ms)."""
    return paired_times_ms


def _sound_configs(times: dict, errors: dict) -> list:
    finite = {cfg: errors[cfg] for cfg in times if math.isfinite(errors[cfg])}
    assert finite, f"no configuration ran to a finite result: {errors}"
    return [cfg for cfg in finite if finite[cfg] <= 2 * min(finite.values())]


def _sweep_candidates(candidates: list, name, always: list) -> list:
    """The candidates a sweep times: all of them, or where DIT8_SWEEP_ONLY is set, those whose
    name(cfg) matches that regular expression (re.search) and the `always` ones (the table's own
    configurations, so that a narrowed sweep still compares against what runs now)."""
    pattern = os.environ.get("DIT8_SWEEP_ONLY")
    kept = [cfg for cfg in candidates if not pattern or re.search(pattern, name(cfg))]
    return kept + [cfg for cfg in always if cfg not in kept]


@pytest.fixture(scope="session")
def sweep_candidates():
    """sweep_candidates(candidates, name, always): what a sweep times, narrowed by DIT8_SWEEP_ONLY."""
    return _sweep_candidates


@contextlib.contextmanager
def _candidate_failures(failed: dict, name: str):
    from dit8.kernels.registry import NoFP8Error

    try:
        yield
    except NoFP8Error:
        raise  # this GPU runs no FP8 configuration: the row is skipped (pytest_runtest_makereport)
    except Exception as err:  # a configuration that does not fit this GPU (shared memory, registers)
        failed[name] = f"{type(err).__name__}: {str(err)[:200]}"


@pytest.fixture(scope="session")
def candidate_failures():
    """`with candidate_failures(failed, name):` around a sweep candidate's check and timing: a candidate
    that fails is recorded in `failed` (its error, for extra_info) and the sweep goes on."""
    return _candidate_failures


@pytest.fixture(scope="session")
def sound_configs():
    """sound_configs(times, errors): the configurations of a sweep that were timed and whose error is
    finite and within 2x the lowest (a fast wrong kernel never wins); asserts that one ran."""
    return _sound_configs


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if CUDA else "cpu"


@pytest.fixture(scope="session")
def smoke() -> bool:
    """True without CUDA: use tiny shapes, run once, report no rates."""
    return not CUDA


@pytest.fixture(scope="session")
def gpu_time():
    """The timing function: gpu_time(fn) -> milliseconds."""
    return gpu_time_ms


@pytest.fixture(scope="session")
def baseline_cache() -> dict:
    """Baseline times measured once per session, keyed by the suite (e.g. ("attention", shape))."""
    return {}


@pytest.fixture
def record(benchmark):
    """record(fn, *, flops=None, nbytes=None, baseline_ms=None, baseline_fn=None, **info) -> ms.

    Times fn, fills benchmark.extra_info (ms; TFLOP/s and GB/s when flops/nbytes are given; the
    speed-up `ratio` = baseline ms / ms; any extra info) and runs it under pytest-benchmark. The
    baseline: its time measured before (baseline_ms), or the function itself (baseline_fn), then timed
    in rounds alternating with fn (paired_times_ms): ms and baseline_ms are the medians of the rounds,
    `ratio` the median of the rounds' ratios and `ratio_range` their lowest and highest."""

    def run(fn, *, flops: float | None = None, nbytes: float | None = None,
            baseline_ms: float | None = None, baseline_fn=None, **info) -> float:
        extra = benchmark.extra_info
        ratio = ratio_range = None
        if baseline_fn is not None and CUDA:
            mine, theirs = paired_times_ms(fn, baseline_fn)
            ms, baseline_ms = statistics.median(mine), statistics.median(theirs)
            ratios = [b / a for a, b in zip(mine, theirs)]
            ratio, ratio_range = statistics.median(ratios), [round(min(ratios), 3), round(max(ratios), 3)]
        elif CUDA:
            ms = gpu_time_ms(fn)
        else:  # smoke mode: fn runs once, in pytest-benchmark's round below, and the baseline once
            ms = math.nan
            if baseline_fn is not None:
                baseline_ms = gpu_time_ms(baseline_fn)
        extra["device"] = torch.cuda.get_device_name() if CUDA else "cpu (smoke: interpreter, tiny shapes)"
        if CUDA:
            extra["ms"] = round(ms, 4)
            if flops is not None:
                extra["tflops"] = round(flops / ms / 1e9, 1)
            if nbytes is not None:
                extra["gbps"] = round(nbytes / ms / 1e6, 1)
            if baseline_ms is not None:
                extra["baseline_ms"] = round(baseline_ms, 4)
                extra["ratio"] = round(ratio if ratio is not None else baseline_ms / ms, 3)
            if ratio_range is not None:
                extra["ratio_range"] = ratio_range
        extra.update(info)

        calls_ms = []

        def synced():
            start = time.perf_counter()
            fn()
            if CUDA:
                torch.cuda.synchronize()
            calls_ms.append((time.perf_counter() - start) * 1e3)

        if CUDA:
            benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
        else:
            benchmark.pedantic(synced, rounds=1, iterations=1)
            ms = calls_ms[-1]
            extra["ms"] = round(ms, 4)
        return ms

    return run
