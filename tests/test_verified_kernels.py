"""From a GPU test run to registry.GPU_VERIFIED: what tests record, and bench/verified_backends.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_verification import verified_kernels

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "verified_backends.py"


def test_marked_tests_name_their_kernels():
    assert verified_kernels(pytest.mark.verifies("rms_norm").mark, {"backend": "cuda", "device": "cuda"}) == \
        ["rms_norm:cuda"]
    assert verified_kernels(pytest.mark.verifies("rms_norm").mark, {"backend": "triton", "device": "cpu"}) == []
    both = pytest.mark.verifies("attention", "cross_attention", backend="triton").mark
    assert verified_kernels(both, {}) == ["attention:triton", "cross_attention:triton"]
    agree = pytest.mark.verifies("qk_norm_rope", backend=("cuda", "triton")).mark
    assert verified_kernels(agree, {}) == ["qk_norm_rope:cuda", "qk_norm_rope:triton"]
    assert verified_kernels(None, {"backend": "cuda"}) == []


def _case(name: str, verifies: str | None, outcome: str = "passed") -> str:
    props = f'<properties><property name="verifies" value="{verifies}"/></properties>' if verifies else ""
    body = {"passed": "", "failed": '<failure message="x"/>', "skipped": '<skipped message="x"/>'}[outcome]
    return f'<testcase classname="tests.t" name="{name}">{props}{body}</testcase>'


def test_script_prints_the_verified_entry(tmp_path):
    cases = [
        _case("a", "scaled_mm:triton,scaled_mm_fused:triton"), _case("b", "scaled_mm:triton"),
        _case("c", "rms_norm:cuda"), _case("d", "rms_norm:cuda", "failed"),  # one failure disqualifies
        _case("e", "rms_norm:triton"), _case("f", "layer_norm:triton", "skipped"),  # skipped only: no
        _case("g", None, "failed"),  # a test that names no kernel changes nothing
    ]
    xml = tmp_path / "tests.xml"
    xml.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    out = tmp_path / "verified.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(xml), "--capability", "9.0", "--json", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == (
        "GPU_VERIFIED[(9, 0)] = frozenset({('rms_norm', 'triton'), ('scaled_mm', 'triton'), "
        "('scaled_mm_fused', 'triton')})")
    # The same kernels as the registry reads them from DIT8_VERIFIED.
    from dit8.kernels import registry

    assert registry._verified_file(str(out)) == (
        (9, 0), frozenset({("rms_norm", "triton"), ("scaled_mm", "triton"), ("scaled_mm_fused", "triton")}))
    xml.write_text('<testsuites><testsuite name="pytest">' + _case("g", None) + "</testsuite></testsuites>")
    run = subprocess.run([sys.executable, str(SCRIPT), str(xml), "--capability", "9.0"], capture_output=True,
                         text=True)
    assert run.returncode == 1 and "no test recorded" in run.stderr


@pytest.mark.parametrize("content", [None, "<testsuites><testsuite"], ids=["missing", "truncated"])
def test_script_says_when_the_report_is_unreadable(tmp_path, content):
    xml = tmp_path / "tests.xml"
    if content is not None:
        xml.write_text(content)
    run = subprocess.run([sys.executable, str(SCRIPT), str(xml), "--capability", "9.0"], capture_output=True,
                         text=True)
    assert run.returncode == 1 and f"{xml}: cannot read the test report" in run.stderr
    assert "Traceback" not in run.stderr


class _Item:
    """The part of a collected pytest item that gpu_tests_first reads."""

    def __init__(self, name, marks=(), params=None):
        self.name, self.marks = name, list(marks)
        if params is not None:
            self.callspec = type("CallSpec", (), {"params": params})()

    def get_closest_marker(self, name):
        return next((m for m in self.marks if m.name == name), None)

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)


def test_gpu_tests_run_first_in_their_own_order():
    from kernel_verification import gpu_tests_first

    gpu, verifies = pytest.mark.gpu.mark, pytest.mark.verifies("rms_norm").mark
    items = [_Item("cpu_a"), _Item("gpu_a", [gpu]), _Item("interp", [verifies], {"backend": "triton", "device": "cpu"}),
             _Item("kernel", [verifies], {"backend": "triton"}), _Item("cpu_b"), _Item("gpu_b", [gpu])]
    gpu_tests_first(items)
    assert [item.name for item in items] == ["gpu_a", "kernel", "gpu_b", "cpu_a", "interp", "cpu_b"]


def test_kernels_whose_tests_did_not_all_run_are_not_verified(tmp_path):
    from kernel_verification import write_kernel_tests

    def verifies(*ops):
        return [pytest.mark.verifies(*ops, backend="triton").mark]

    items = [_Item("t_ok", verifies("layer_norm"), {}), _Item("t_rms", verifies("rms_norm"), {}),
             _Item("t_cut", verifies("rms_norm", "scaled_mm"), {}), _Item("t_crash", verifies("attention"), {}),
             _Item("t_attn", verifies("attention"), {}), _Item("t_cpu")]
    for item in items:
        item.nodeid = f"tests/t.py::{item.name}"
    collected = tmp_path / "kernel_tests.json"
    write_kernel_tests(items, collected)
    cases = [
        _case("t_ok", "layer_norm:triton"), _case("t_rms", "rms_norm:triton"), _case("t_attn", "attention:triton"),
        # A crashed pytest-xdist worker's test: reported as an error, without the test's properties.
        '<testcase classname="tests.t" name="t_crash"><error message="worker \'gw1\' crashed"/></testcase>',
        '<testcase time="0.000"/>',  # the test running when the run was interrupted (t_cut): no name
    ]
    xml = tmp_path / "tests.xml"
    xml.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    run = subprocess.run([sys.executable, str(SCRIPT), str(xml), "--collected", str(collected),
                          "--capability", "9.0"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # rms_norm passed in t_rms but its t_cut never ran; attention failed in t_crash; layer_norm is whole.
    assert run.stdout.strip().splitlines()[-1] == "GPU_VERIFIED[(9, 0)] = frozenset({('layer_norm', 'triton')})"
    without = subprocess.run([sys.executable, str(SCRIPT), str(xml), "--capability", "9.0"], capture_output=True,
                             text=True)
    assert "('rms_norm', 'triton')" in without.stdout.strip().splitlines()[-1]  # what --collected prevents
    # A run without a GPU records no properties: the map alone vouches for nothing.
    xml.write_text('<testsuites><testsuite name="pytest">' + _case("t_ok", None) + _case("t_rms", None)
                   + "</testsuite></testsuites>")
    cpu = subprocess.run([sys.executable, str(SCRIPT), str(xml), "--collected", str(collected),
                          "--capability", "9.0"], capture_output=True, text=True)
    assert cpu.returncode == 1 and "no test recorded" in cpu.stderr


def test_a_passed_test_that_recorded_nothing_vouches_for_nothing(tmp_path):
    # A test records its kernels only where it ran them on a GPU: one that passed without them (its GPU
    # part skipped inside it, say) does not verify the kernels the collected map gives it.
    collected = tmp_path / "kernel_tests.json"
    collected.write_text(json.dumps({"tests/t.py::t_ok": ["layer_norm:triton"],
                                     "tests/t.py::t_quiet": ["rms_norm:triton"]}))
    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite name="pytest">' + _case("t_ok", "layer_norm:triton")
                   + _case("t_quiet", None) + "</testsuite></testsuites>")
    run = subprocess.run([sys.executable, str(SCRIPT), str(xml), "--collected", str(collected),
                          "--capability", "9.0"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "GPU_VERIFIED[(9, 0)] = frozenset({('layer_norm', 'triton')})"


def test_junit_ids_are_pytests_for_tests_in_classes(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from verified_backends import junit_id

    assert junit_id("tests/test_ops.py::TestNorms::test_rms[bf16-a::b]") == ("tests.test_ops.TestNorms",
                                                                               "test_rms[bf16-a::b]")
    assert junit_id("tests/sub/test_x.py::test_y") == ("tests.sub.test_x", "test_y")


def _logged(nodeid: str, when: str, outcome: str, verifies: str | None) -> str:
    return json.dumps({"nodeid": nodeid, "when": when, "outcome": outcome, "verifies": [verifies] if verifies else []})


def test_the_outcome_log_stands_in_for_a_missing_report(tmp_path):
    """A run stopped while pytest-xdist shut its workers down writes no JUnit XML; the log the tests wrote as
    they ended gives the same entry, and the tests still running then count as not run."""
    collected = {f"tests/t.py::{name}": [kernel] for name, kernel in [
        ("t_ok", "layer_norm:triton"), ("t_rms", "rms_norm:triton"), ("t_cut", "rms_norm:triton"),
        ("t_fail", "attention:triton"), ("t_skip", "scaled_mm:triton"), ("t_xfail", "layer_norm:triton")]}
    (tmp_path / "kernel_tests.json").write_text(json.dumps(collected))
    lines = [_logged("tests/t.py::t_ok", when, "passed", "layer_norm:triton" if when != "setup" else None)
             for when in ("setup", "call", "teardown")]
    lines += [_logged("tests/t.py::t_rms", when, "passed", "rms_norm:triton") for when in ("setup", "call")]
    lines += [_logged("tests/t.py::t_cut", "setup", "passed", "rms_norm:triton")]  # stopped in its call
    lines += [_logged("tests/t.py::t_fail", "setup", "passed", "attention:triton"),
              _logged("tests/t.py::t_fail", "call", "passed", "attention:triton"),
              _logged("tests/t.py::t_fail", "teardown", "failed", "attention:triton")]
    lines += [_logged("tests/t.py::t_skip", "setup", "skipped", None),
              _logged("tests/t.py::t_xfail", "call", "skipped", "layer_norm:triton")]
    log = tmp_path / "test_outcomes.jsonl"
    log.write_text("\n".join(lines) + "\n")
    xml = tmp_path / "tests.xml"  # never written
    args = [sys.executable, str(SCRIPT), str(xml), "--collected", str(tmp_path / "kernel_tests.json"),
            "--capability", "9.0", "--outcomes", str(log)]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"{xml}: cannot read the test report" in run.stderr and str(log) in run.stderr
    # rms_norm: t_cut never finished; attention: its teardown failed; scaled_mm: skipped only.
    assert run.stdout.strip().splitlines()[-1] == "GPU_VERIFIED[(9, 0)] = frozenset({('layer_norm', 'triton')})"
    # Where the report is there, it is what counts.
    xml.write_text('<testsuites><testsuite name="pytest">' + _case("t_rms", "rms_norm:triton")
                   + _case("t_cut", "rms_norm:triton") + "</testsuite></testsuites>")
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0 and "cannot read" not in run.stderr, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "GPU_VERIFIED[(9, 0)] = frozenset({('rms_norm', 'triton')})"
    log.write_text("not json\n")  # neither readable: the report's error, as without a log
    xml.unlink()
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 1 and f"{xml}: cannot read the test report" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_tests_log_their_outcomes_as_they_end(tmp_path):
    """tests/conftest.py writes a line a phase under DIT8_TEST_OUTCOMES, the log above reads."""
    log = tmp_path / "outcomes.jsonl"
    log.write_text("an earlier run's lines\n")
    test = "tests/test_verified_kernels.py::test_marked_tests_name_their_kernels"
    env = {**os.environ, "DIT8_TEST_OUTCOMES": str(log)}
    # Not this run's settings: as a worker, the nested run would not log; given the kernel map of a GPU
    # run (bench/gpu_check.sh), it would replace that map with its own one test's.
    for name in ("PYTEST_XDIST_WORKER", "DIT8_KERNEL_TESTS"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=SCRIPT.parents[1],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["nodeid"], line["when"], line["outcome"]) for line in lines] == [
        (test, when, "passed") for when in ("setup", "call", "teardown")]


def test_a_gluon_candidate_is_tested_only_by_its_gpu_tests(tmp_path):
    """bench/gpu_check.sh benchmarks a Gluon candidate only once its GPU tests all ran and passed: a test that
    passes anywhere (an argument check) or a run cut short before the GPU tests does not vouch for it."""
    sys.path.insert(0, str(SCRIPT.parent))
    from kernel_verification import write_kernel_tests
    from verified_backends import GLUON_TESTS, untested_gluon

    gpu = [pytest.mark.gpu.mark]
    items = [_Item("test_int8_kernel_a", gpu), _Item("test_int8_kernel_b", gpu),
             _Item("test_int8_names_what_it_cannot_take")]
    for item in items:
        item.nodeid = f"tests/test_scaled_mm_gluon.py::{item.name}"
    write_kernel_tests(items, tmp_path / "kernel_tests.json")
    collected = json.loads((tmp_path / "kernel_tests.json").read_text())
    assert collected == {"tests/test_scaled_mm_gluon.py::test_int8_kernel_a": [],
                         "tests/test_scaled_mm_gluon.py::test_int8_kernel_b": []}  # the GPU tests, with no kernels

    def case(name, outcome):
        return (("tests.test_scaled_mm_gluon", name), [], outcome)

    everything = set(GLUON_TESTS)
    cpu_only = [case("test_int8_names_what_it_cannot_take", "passed")]
    assert set(untested_gluon(cpu_only, collected)) == everything  # cut before the GPU tests
    assert set(untested_gluon(cpu_only + [case("test_int8_kernel_a", "passed")], collected)) == everything  # b not run
    ran = cpu_only + [case("test_int8_kernel_a", "passed"), case("test_int8_kernel_b", "passed")]
    assert set(untested_gluon(ran, collected)) == everything - {"gemm_int8"}
    assert set(untested_gluon(ran, {})) == everything  # no map: nothing vouched for
    skipped = cpu_only + [case("test_int8_kernel_a", "skipped"), case("test_int8_kernel_b", "skipped")]  # not Hopper
    assert set(untested_gluon(skipped, collected)) == everything
    failed = ran[:-1] + [case("test_int8_kernel_b", "failed")]
    assert set(untested_gluon(failed, collected)) == everything
    cpu_failed = ran[1:] + [case("test_int8_names_what_it_cannot_take", "failed")]
    assert set(untested_gluon(cpu_failed, collected)) == everything
