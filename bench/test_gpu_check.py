"""bench/gpu_check.sh without a GPU: its syntax, usage and argument checks (not a benchmark)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "gpu_check.sh"


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=60)


def test_syntax():
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_help_names_every_stage_and_setting():
    run = gpu_check("--help")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("Everything GPU-side") and "Usage" in run.stdout
    source = SCRIPT.read_text()
    stages = re.search(r"all_stages=\((.*)\)", source).group(1).split()
    # The environment variables the script reads (${NAME:-...}, ${NAME-...}, ${NAME:+...}), PYTHONPATH aside.
    settings = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)[:}+-]", source)) - {"PYTHONPATH"}
    assert {"BUDGET", "TESTS_LIMIT", "STAGE_LIMIT", "WORK", "OUT", "PYTHON", "TEST_WORKERS"} <= settings
    missing = [name for name in stages + sorted(settings) if not re.search(rf"\b{name}\b", run.stdout)]
    assert not missing, missing


@pytest.mark.parametrize("args, env, message", [
    (["tests", "bogus"], {}, "gpu_check: unknown stage bogus"),
    (["--budget=60"], {}, "gpu_check: unknown stage --budget=60"),
    ([], {"BUDGET": "9m"}, "gpu_check: BUDGET must be a whole number, got 9m"),
    (["gemm"], {"STAGE_LIMIT": "-1"}, "gpu_check: STAGE_LIMIT must be a whole number"),
])
def test_mistakes_are_reported_on_any_machine(args, env, message):
    """Before the GPU checks: on a machine without one the mistake is named, not the missing GPU."""
    run = gpu_check(*args, **env)
    assert run.returncode == 2 and message in run.stdout, run.stdout + run.stderr
