"""bench/gpu_check.sh without a GPU: its syntax, usage and argument checks (not a benchmark)."""

from __future__ import annotations

import os
import re
import sys
import subprocess
import tarfile
import time
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
    (["tests", "bogus"], {}, "gpu_check: unknown stage 'bogus'"),
    (["--budget=60"], {}, "gpu_check: unknown stage '--budget=60'"),
    (["gemm attention"], {}, "gpu_check: unknown stage 'gemm attention'"),  # two names in one argument
    ([], {"BUDGET": "9m"}, "gpu_check: BUDGET must be a whole number of at most 9 digits, without leading zeros, "
                           "got 9m"),
    (["gemm"], {"STAGE_LIMIT": "-1"}, "gpu_check: STAGE_LIMIT must be a whole number"),
    (["gemm"], {"BUDGET": "08"}, "gpu_check: BUDGET must be a whole number"),  # bash's arithmetic: octal
    (["gemm"], {"TESTS_LIMIT": "99999999999999999999"}, "gpu_check: TESTS_LIMIT must be a whole number"),
])
def test_mistakes_are_reported_on_any_machine(args, env, message):
    """Before the GPU checks: on a machine without one the mistake is named, not the missing GPU."""
    run = gpu_check(*args, **env)
    assert run.returncode == 2 and message in run.stdout, run.stdout + run.stderr


def _fake_gpu_tools(tmp_path: Path, sampler_pid: Path, python_sleeps: float = 0, pytest_sleeps: float = 0,
                    ncu_csv: str = "") -> dict:
    """An environment in which gpu_check.sh finds a fake nvidia-smi (its sampler writes its pid to
    `sampler_pid`), a fake ncu that writes `ncu_csv` to its --log-file, and a fake interpreter that runs
    results_tables.py and profile_kernels.py's table and answers every other command with success (after
    `python_sleeps` seconds for the inline scripts, `pytest_sleeps` for pytest)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "ncu.csv").write_text(ncu_csv)
    (bin_dir / "ncu").write_text(f"""#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --log-file ] && cp {tmp_path / "ncu.csv"} "$2"; shift; done
""")
    # Two GPUs: a query names both, one line each, unless -i picks one.
    (bin_dir / "nvidia-smi").write_text(f"""#!/usr/bin/env bash
case "$*" in *-L*) echo "GPU 0: Fake"; exit 0 ;; esac
gpus="0 1"; [[ "$*" =~ -i[[:space:]]([0-9]+) ]] && gpus=${{BASH_REMATCH[1]}}
case "$*" in
    *query-gpu=uuid*) for i in $gpus; do echo "GPU-fake-$i"; done; exit 0 ;;
    *query-gpu=name*) for i in $gpus; do echo "Fake GPU $i, 580.1, 81559 MiB"; done; exit 0 ;;
esac
sample() {{ echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 1980, 300.5, 50, 0x0000000000000004"; }}
if [[ "$*" == *-lms* ]]; then  # (bounded, so that a failing run leaves nothing behind for long)
    echo $$ >{sampler_pid}; for _ in $(seq 80); do sample; sleep 0.5; done; exit 0
fi
sample
""")
    (bin_dir / "python").write_text(f"""#!/usr/bin/env bash
[ "${{1:-}}" = - ] && {{ cat >/dev/null; sleep {python_sleeps}; exit 0; }}
[ "${{1:-}}" = bench/results_tables.py ] && exec {sys.executable} "$@"
[ "${{1:-}} ${{2:-}}" = "bench/profile_kernels.py table" ] && exec {sys.executable} "$@"
[ "${{2:-}}" = pytest ] && sleep {pytest_sleeps}
exit 0
""")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
               WORK=str(tmp_path / "work"), BUDGET="0")
    env.pop("OUT", None)
    return env


def test_a_sampler_outlives_no_script_killed_outright(tmp_path):
    """SIGKILL runs no EXIT trap: the sampler still stops, at its next sample, instead of appending to
    clocks.csv for ever."""
    sampler_pid = tmp_path / "sampler.pid"
    env = _fake_gpu_tools(tmp_path, sampler_pid, python_sleeps=20)
    script = subprocess.Popen(["bash", str(SCRIPT), "tests"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sampler_pid.exists() or not sampler_pid.read_text().strip():
            assert time.monotonic() < deadline, "the sampler did not start"
            time.sleep(0.1)
        pid = int(sampler_pid.read_text())
        time.sleep(1)  # a sample or two
        script.kill()
        script.wait(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the sampler outlived its script"
            time.sleep(0.1)
    finally:
        script.kill()
        subprocess.run(["pkill", "-f", str(tmp_path / "bin")], check=False)


def test_a_run_stopped_part_way_packs_what_it_has(tmp_path):
    """A run stopped in its first stage (a time limit's SIGTERM from outside) still leaves $OUT's archive,
    with the marks of what ran."""
    env = _fake_gpu_tools(tmp_path, tmp_path / "sampler.pid", pytest_sleeps=30)
    env.pop("BUDGET")
    env["OUT"] = str(tmp_path / "out")
    script = subprocess.Popen(["bash", str(SCRIPT), "tests"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        marks = tmp_path / "work" / "marks.csv"
        deadline = time.monotonic() + 20
        while not (marks.exists() and ",tests" in marks.read_text()):
            assert time.monotonic() < deadline, "the tests stage did not start"
            time.sleep(0.1)
        script.terminate()
        script.wait(timeout=30)
        with tarfile.open(tmp_path / "out" / "dit8-gpu.tgz") as archive:
            names = {Path(name).name for name in archive.getnames()}
        assert {"marks.csv", "clocks.csv", "stamp.txt"} <= names, names
    finally:
        script.kill()
        subprocess.run(["pkill", "-f", str(tmp_path / "bin")], check=False)


def test_a_run_ends_and_stops_its_clock_sampler(tmp_path):
    """The nvidia-smi sampler runs in the background until the stages are done: the final `wait` (for the
    CUDA build) must not wait for it too, or the run never prints its summary. A fake nvidia-smi and
    interpreter stand in for the GPU machine; BUDGET=0 leaves every stage for the next run."""
    sampler_pid = tmp_path / "sampler.pid"
    env = _fake_gpu_tools(tmp_path, sampler_pid)
    work = tmp_path / "work"
    run = subprocess.run(["bash", str(SCRIPT), "tests"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "stages done: none; left:" in run.stdout, run.stdout + run.stderr
    # Each run's parts begin with its setup and close with its end.
    assert [line.split(",")[1] for line in (work / "marks.csv").read_text().splitlines()] == ["setup", "end"]
    assert (work / "clocks.csv").read_text().startswith("timestamp,clocks.sm,")
    pid = int(sampler_pid.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_machine_files_name_the_gpu_the_stages_run_on(tmp_path):
    """On a machine with several GPUs, gpu.txt (the chart titles' first line) and the stamp that tells this
    machine's results from another's name the GPU CUDA_VISIBLE_DEVICES gives the stages, and only it."""
    env = _fake_gpu_tools(tmp_path, tmp_path / "sampler.pid")
    run = subprocess.run(["bash", str(SCRIPT), "tests"], env=dict(env, CUDA_VISIBLE_DEVICES="1,0"),
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    work = tmp_path / "work"
    assert (work / "gpu.txt").read_text().splitlines() == ["Fake GPU 1, 580.1, 81559 MiB"]
    assert (work / "stamp.txt").read_text().split()[0] == "GPU-fake-1"


@pytest.mark.parametrize("measured", [True, False])
def test_the_profile_stage_is_done_only_with_counters(tmp_path, measured):
    """A profiler that measured no kernel (cut off, or refused the counters) leaves the profile stage for
    the next run instead of marking it done with an empty table."""
    head = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"'
    csv = f'{head}\n"0","_attention_kernel","GPU Speed Of Light Throughput","Duration","msecond","43.80"\n'
    env = _fake_gpu_tools(tmp_path, tmp_path / "sampler.pid", ncu_csv=csv if measured else "==PROF== no kernels\n")
    env.pop("BUDGET")
    run = subprocess.run(["bash", str(SCRIPT), "profile"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    done = (tmp_path / "work" / "done").read_text().split() if (tmp_path / "work" / "done").exists() else []
    assert ("profile" in done) == measured, run.stdout
    assert ("measured no kernel" in run.stdout) != measured
