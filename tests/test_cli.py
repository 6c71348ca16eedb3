"""The dit8 command line: info, demo, and one-line errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from dit8.cli import main
from dit8.testing import random_weights, tiny_config, write_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dit8", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config("i2v")
    return write_checkpoint(random_weights(config), tmp_path_factory.mktemp("c") / "m", layout="diffusers",
                            fmt="sharded", config=config)


def test_info_describes_the_checkpoint(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    config = tiny_config("i2v")
    params = sum(v.numel() for v in random_weights(config).values())
    for expected in ("diffusers", "i2v", "dim 256", "heads 2 x 128", f"{params:,}", "float32", "(3 files)"):
        assert expected in out, expected


def test_info_json(checkpoint, capsys):
    assert main(["info", str(checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "diffusers" and summary["config"]["num_layers"] == 2
    assert sum(summary["tensors_by_dtype"].values()) == len(random_weights(tiny_config("i2v")))


@pytest.mark.parametrize("make_bad", ["missing", "corrupt"])
def test_errors_are_one_line_without_traceback(tmp_path, make_bad):
    path = tmp_path / "m.safetensors"
    if make_bad == "corrupt":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    result = run_cli("info", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr


def test_usage_error_exits_non_zero():
    result = run_cli("info")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_demo_runs_the_sampler(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert "finite True" in out
