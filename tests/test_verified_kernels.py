"""From a GPU test run to registry.GPU_VERIFIED: what tests record, and bench/verified_backends.py."""

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
