"""bench/results_tables.py: the markdown tables of a gpu_check.sh results folder, or of its archive."""

import datetime
import json
import random
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dit8.bench_dit import BenchSettings, run_bench

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "results_tables.py"


def _results(folder: Path) -> dict:
    """A results folder as gpu_check.sh leaves it; returns the dit run's numbers."""
    folder.mkdir()
    (folder / "gpu.txt").write_text("Some GPU, 580.1, 81559 MiB\npython 3.12 torch 2.11\n")
    (folder / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="x"/><testcase classname="tests.test_a" name="y">'
        '<failure message="m"/></testcase><testcase classname="tests.test_b" name="z"><skipped message="s"/>'
        '</testcase><testcase time="0.000"/>'  # running when the run was interrupted
        "</testsuite></testsuites>")
    rows = [{"name": "test_gemm[fp8]", "extra_info": {"ms": 2.5, "tflops": 1300.0, "ratio": 1.1}},
            {"name": "test_gemm[int8]", "extra_info": {"ms": 3.0, "config": "128x256x128"}}]
    (folder / "bench_gemm.json").write_text(json.dumps({"benchmarks": rows}))
    (folder / "bench_fused.json").write_text('{"benchmarks": [')  # cut off while writing
    run = run_bench(BenchSettings(device="cpu", config="tiny", layers=1, size=(64, 64), frames=5, repeat=1,
                                  steps=2))
    (folder / "dit_fp8_fp8.json").write_text(json.dumps(run))
    (folder / "dit_bf16_bf16.json").write_text(json.dumps({**run, "partial": True, "error": "RuntimeError: OOM"}))
    (folder / "dit_int8_int8.json").write_text(json.dumps({"partial": True, "error": "RuntimeError: OOM at build"}))
    (folder / "profile.txt").write_text("| ID | kernel |\n|---|---|\n| 0 | _attention_kernel |\n")
    (folder / "gpu_verified.txt").write_text("op  backend\nrms_norm  triton\n\n"
                                             "GPU_VERIFIED[(9, 0)] = frozenset({('rms_norm', 'triton')})\n")
    return run


def _tables(path: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tables_of_a_folder_and_of_its_archive(tmp_path):
    run = _results(tmp_path / "results")
    text = _tables(tmp_path / "results")
    lines = text.splitlines()
    assert lines[0] == "Some GPU, 580.1, 81559 MiB"
    assert "| test_a | 1 | 1 | 0 | 0 |" in lines and "| test_b | 0 | 0 | 0 | 1 |" in lines
    assert "| **all** | 1 | 1 | 0 | 1 |" in lines
    assert "1 test(s) were running when the run was interrupted (no outcome)." in lines
    # Only the columns some row has, in their fixed order; a row without one leaves it empty.
    assert "| bench_gemm | ms | TFLOP/s | ratio | config |" in lines
    assert "| test_gemm[fp8] | 2.5 | 1300.0 | 1.1 |  |" in lines
    assert "| test_gemm[int8] | 3.0 |  |  | 128x256x128 |" in lines
    assert any(line.startswith("bench_fused.json: unreadable") for line in lines)
    assert any(line.startswith("| bf16_bf16 (failed part way: RuntimeError: OOM) |") for line in lines)
    assert any(line.startswith("| int8_int8 (failed part way: RuntimeError: OOM at build) |  |") for line in lines)
    dit = next(line for line in lines if line.startswith("| fp8_fp8 |")).split(" | ")
    assert dit[1] == f"{run['forward_ms']:.1f}" and dit[3] == f"{run['loop']['total_ms']:.1f}"
    assert lines[lines.index("Nsight Compute, one launch each (bench/profile_kernels.py):") + 3] == \
        "| 0 | _attention_kernel |"
    assert lines[lines.index("Table entries (GPU_VERIFIED, FASTEST: kernels/registry.py; ROWS_TUNED: "
                             "kernels/fused_triton.py):") + 1] == \
        "GPU_VERIFIED[(9, 0)] = frozenset({('rms_norm', 'triton')})"

    with tarfile.open(tmp_path / "results.tgz", "w:gz") as archive:
        archive.add(tmp_path / "results", arcname=".")
    assert _tables(tmp_path / "results.tgz") == text
    # An archive cut short (a transfer that stopped) is named, not a traceback.
    (tmp_path / "cut.tgz").write_bytes((tmp_path / "results.tgz").read_bytes()[:300])
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "cut.tgz")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "cut.tgz: not a results archive" in done.stderr, done.stderr


def test_missing_results_are_an_error(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nothing")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "nothing" in done.stderr + done.stdout
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "no results found" in done.stderr


def test_a_truncated_test_report_is_named_and_skipped(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "gpu.txt").write_text("Some GPU, 580.1, 81559 MiB\n")
    (folder / "tests.xml").write_text('<testsuites><testsuite name="pytest"><testcase')  # run killed
    (folder / "bench_gemm.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_gemm[fp8]", "extra_info": {"ms": 2.5, "ratio_fast_accum": 0.9, "n_spills": 0}}]}))
    lines = _tables(folder).splitlines()
    assert any(line.startswith("tests.xml: unreadable") for line in lines)
    assert "| bench_gemm | ms | vs fast accum | spills |" in lines and "| test_gemm[fp8] | 2.5 | 0.9 | 0 |" in lines


def test_profile_table_of_ncu_csv(tmp_path):
    # ncu's `--csv --page details` layout: its own messages first, then one row per (launch, metric).
    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",' \
           '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
    rows = [("0", "_attention_kernel", "GPU Speed Of Light Throughput", "Duration", "msecond", "43.80"),
            ("0", "_attention_kernel", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "71.2"),
            ("0", "_attention_kernel", "Occupancy", "Achieved Occupancy", "%", "12.4"),
            ("0", "_attention_kernel", "Occupancy", "Theoretical Occupancy", "%", "12.5"),
            ("1", "void dit8::rows_kernel<float>(dit8::RowArgs)", "GPU Speed Of Light Throughput", "Duration",
             "usecond", "1,046.40"),
            ("1", "void dit8::rows_kernel<float>(dit8::RowArgs)", "Launch Statistics", "Registers Per Thread",
             "register/thread", "40"),
            # The H100 machine's ncu writes the unit as "ns".
            ("2", "_rows_kernel", "GPU Speed Of Light Throughput", "Duration", "ns", "527,300")]
    lines = ["==PROF== Connected to process 1", head] + [
        f'"{i}","1","python3","h","{k}","1","7","(128, 1, 1)","(256, 40, 1)","0","9.0","{s}","{m}","{u}","{v}"'
        for i, k, s, m, u, v in rows]
    (tmp_path / "ncu.csv").write_text("\n".join(lines) + "\n")
    script = SCRIPT.parent / "profile_kernels.py"
    done = subprocess.run([sys.executable, str(script), "table", str(tmp_path / "ncu.csv")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[0].startswith("| ID | kernel | µs | SM % |")
    assert table[2].startswith("| 0 | _attention_kernel | 43,800.0 | 71.2 |") and "| 12.4 / 12.5 |" in table[2]
    assert table[3].startswith("| 1 | void dit8::rows_kernel<float> | 1,046.4 |") and "| 40 |" in table[3]
    assert table[4].startswith("| 2 | _rows_kernel | 527.3 |")
    (tmp_path / "empty.csv").write_text("==PROF== No kernels were profiled.\n")
    done = subprocess.run([sys.executable, str(script), "table", str(tmp_path / "empty.csv")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "no ncu CSV" in done.stderr

    # The stall-reason pass: its metrics as `metrics` prints them, one row per (launch, metric).
    metrics = subprocess.run([sys.executable, str(script), "metrics"], capture_output=True, text=True,
                             timeout=60).stdout.strip().split(",")
    assert "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio" in metrics
    values = {"long_scoreboard": "0.50", "wait": "1.25", "math_pipe_throttle": "2.00", "barrier": "0.75",
              "selected": "1.00", "not_selected": "0.25"}
    reason = lambda metric: metric.split("stalled_")[1].split("_per_issue")[0]  # noqa: E731
    stall_rows = [f'"0","1","python3","h","_attention_kernel","1","7","(128, 1, 1)","(256, 40, 1)","0","9.0",' \
                  f'"Command line profiler metrics","{m}","","{values.get(reason(m), "0")}"' for m in metrics]
    (tmp_path / "stalls.csv").write_text("\n".join([head] + stall_rows) + "\n")
    done = subprocess.run([sys.executable, str(script), "table", str(tmp_path / "ncu.csv"), "--stalls",
                           str(tmp_path / "stalls.csv")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:len(table)] == table  # the first table as before
    assert "| 0 | _attention_kernel | 5.75 | math_pipe_throttle 2.00, wait 1.25, selected 1.00, barrier 0.75 |" \
        in lines
    # A stall pass that failed: the first table still printed, the failure reported.
    done = subprocess.run([sys.executable, str(script), "table", str(tmp_path / "ncu.csv"), "--stalls",
                           str(tmp_path / "empty.csv")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout.splitlines()[:len(table)] == table and "no ncu CSV" in done.stderr

    # The pipe pass: its metrics as `metrics --pipes` prints them; a table of its own, which stands when
    # the stall pass failed (and the other way round).
    pipes = subprocess.run([sys.executable, str(script), "metrics", "--pipes"], capture_output=True, text=True,
                           timeout=60).stdout.strip().split(",")
    assert "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active" in pipes and len(pipes) == 4
    pipe_values = dict(zip(pipes, ["41.5", "12.0", "88.25", "30.1"]))
    pipe_rows = [f'"3","1","python3","h","_rows_kernel","1","7","(512, 1, 1)","(32760, 1, 1)","0","9.0",'
                 f'"Command line profiler metrics","{m}","%","{v}"' for m, v in pipe_values.items()]
    (tmp_path / "pipes.csv").write_text("\n".join([head] + pipe_rows) + "\n")
    done = subprocess.run([sys.executable, str(script), "table", str(tmp_path / "ncu.csv"), "--stalls",
                           str(tmp_path / "empty.csv"), "--pipes", str(tmp_path / "pipes.csv")],
                          capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert done.returncode == 1 and "no ncu CSV" in done.stderr and lines[:len(table)] == table
    assert lines[lines.index("Issue pipes (% of peak over the SM's active cycles):") + 1] == \
        "| ID | kernel | FMA % | ALU % | XU % | LSU % |"
    assert "| 3 | _rows_kernel | 41.5 | 12.0 | 88.25 | 30.1 |" in lines
    done = subprocess.run([sys.executable, str(script), "table", str(tmp_path / "ncu.csv"), "--pipes",
                           str(tmp_path / "stalls.csv")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "launch 0 has none of the pipe metrics" in done.stderr


def test_a_sweep_row_lists_every_configuration_fastest_first(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    row = {"name": "test_attention_sweep[int8]",
           "extra_info": {"ms": 34.0, "config": "128x128x3", "table": "64x128x3", "ms_table": 35.1,
                          "sweep": {"64x128x3": [35.1, 0.0266], "128x128x3": [34.0, 0.0265]}}}
    (folder / "bench_sweep_attention.json").write_text(json.dumps({"benchmarks": [row]}))
    out = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, check=True).stdout
    assert "| test_attention_sweep[int8] | 34.0 | 128x128x3 | 64x128x3 | 35.1 |" in out
    listing = out.split("every configuration (ms, rel err):\n")[1].splitlines()
    assert listing[:2] == ["- 128x128x3: 34.0 / 0.0265", "- 64x128x3: 35.1 / 0.0266"]


def test_a_run_without_a_test_report_shows_the_logged_outcomes(tmp_path):
    """A tests stage stopped before pytest wrote tests.xml: the log the tests wrote as they ended
    (DIT8_TEST_OUTCOMES) gives the table; a benchmark JSON left empty (no benchmark ran) is named."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "gpu.txt").write_text("Some GPU, 580.1, 81559 MiB\n")
    log = [("tests/test_a.py::x", "call", "passed"), ("tests/test_a.py::y", "call", "failed"),
           ("tests/test_b.py::z", "setup", "skipped"), ("tests/test_b.py::w", "setup", "passed")]  # w: cut
    (folder / "test_outcomes.jsonl").write_text("".join(
        json.dumps({"nodeid": n, "when": w, "outcome": o, "verifies": []}) + "\n" for n, w, o in log))
    (folder / "bench_sweep_gemm.json").write_text("")
    (folder / "bench_gemm.json").write_text(json.dumps({"benchmarks": [{"name": "g", "extra_info": {"ms": 1.0}}]}))
    lines = _tables(folder).splitlines()
    assert "| tests (from test_outcomes.jsonl) | passed | failed or errors | skipped |" in lines
    assert "| test_a | 1 | 1 | 0 |" in lines and "| test_b | 0 | 0 | 1 |" in lines
    assert "| **all** | 1 | 1 | 1 |" in lines
    assert any(line.startswith("bench_sweep_gemm.json: empty") for line in lines)
    assert "| g | 1.0 |" in lines


@pytest.mark.parametrize("reasons", ["clocks_event_reasons.active", "clocks_throttle_reasons.active"])
def test_clock_table_summarises_each_marked_part(tmp_path, reasons):
    """Samples as nvidia-smi writes them (clocks.csv) between gpu_check's marks: per part the median and
    lowest SM clock, power, the hottest sample and the reasons the clock was held, as a share of samples
    (under the reasons' name of current drivers or of older ones)."""
    start = datetime.datetime(2026, 11, 27, 12, 0, 0)
    stamp = lambda seconds: (start + datetime.timedelta(seconds=seconds)).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]  # noqa: E731
    rng = random.Random()
    attention = [rng.randint(1700, 1980) for _ in range(6)]
    forward = [rng.randint(1300, 1700) for _ in range(8)]
    lines = [f"timestamp,clocks.sm,power.draw,temperature.gpu,{reasons}"]
    lines += [f"{stamp(0.5 * i)}, {mhz}, 500.25, {60 + i}, 0x0000000000000000" for i, mhz in enumerate(attention)]
    # In the forward: power-capped on every other sample, one reading the driver could not give.
    lines += [f"{stamp(10 + 0.5 * i)}, {mhz}, {690 + i}.5, 70, 0x000000000000000{4 if i % 2 else 0}"
              for i, mhz in enumerate(forward)]
    lines += [f"{stamp(14.2)}, [N/A], [N/A], [N/A], [N/A]", f"{stamp(14.3)}, 13"]  # the last one cut short
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "clocks.csv").write_text("\n".join(lines) + "\n")
    (folder / "marks.csv").write_text(f"{stamp(0)},attention\n{stamp(10)},dit fp8_fp8\n{stamp(20)},end\n")
    text = _tables(folder).splitlines()
    rows = {cells[0]: cells for line in text[text.index("The GPU while each part ran (nvidia-smi, every 0.5 s):") + 3:]
            if line.startswith("|") and (cells := [cell.strip() for cell in line[1:-1].split("|")])}
    assert rows["attention"] == ["attention", "10", "6", f"{statistics.median(attention):.0f}",
                                 str(min(attention)), "500", "500", "65", ""]
    assert rows["dit fp8_fp8"] == ["dit fp8_fp8", "10", "9", f"{statistics.median(forward):.0f}",
                                   str(min(forward)), f"{statistics.median(690.5 + i for i in range(8)):.0f}",
                                   "698", "70", "power cap 44%"]


def test_a_profile_without_a_table_is_named_not_printed_empty(tmp_path):
    """The profile stage leaves an empty profile.txt where ncu profiled nothing (no permission for the
    counters, say): a note names ncu.csv, where ncu wrote why, in place of a heading over nothing."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "gpu.txt").write_text("Some GPU, 580.1, 81559 MiB\n")
    (folder / "profile.txt").write_text("")
    lines = _tables(folder).splitlines()
    assert "Nsight Compute, one launch each (bench/profile_kernels.py):" not in lines
    assert any(line.startswith("profile.txt: empty") and "ncu.csv" in line for line in lines), lines


def _cells(lines: list[str], header_start: str, row_start: str) -> dict[str, str]:
    """The row of a table that begins with `row_start`, keyed by the titles of its table's header."""
    split = lambda line: [cell.strip() for cell in line[1:-1].split("|")]  # noqa: E731
    header = next(line for line in lines if line.startswith(header_start))
    return dict(zip(split(header), split(next(line for line in lines if line.startswith(row_start))), strict=True))


def test_a_collection_error_under_xdist_is_counted_for_its_file(tmp_path):
    # pytest-xdist reports a file that failed to collect with an empty classname and the file as its name.
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest"><testcase classname="tests.test_a" name="x"/>'
        '<testcase classname="" name="tests.test_c"><error message="collection failure"/></testcase>'
        "</testsuite></testsuites>")
    lines = _tables(folder).splitlines()
    assert "| test_c | 0 | 0 | 1 | 0 |" in lines and "| **all** | 1 | 0 | 1 | 0 |" in lines


def test_dit_rows_give_gib_and_the_speed_up_over_diffusers(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "dit_fp8_fp8.json").write_text(json.dumps({
        "forward_ms": 812.34, "context_ms": 3.51, "peak_memory": {"forward": 3.5 * 2 ** 30}, "tflops": {"gemm": 612.4},
        "diffusers": {"forward_ms": 1990.0, "ratio": 2.456, "peak_memory": 5 * 2 ** 30}}))
    row = _cells(_tables(folder).splitlines(), "| run |", "| fp8_fp8 |")
    assert row == {"run": "fp8_fp8", "forward ms": "812.3", "context ms": "3.5", "4-step loop ms": "",
                   "peak GiB": "3.50", "graph ms": "", "GEMM TFLOP/s": "612", "attention TFLOP/s": "",
                   "diffusers ms": "1990.0", "speed-up": "2.46x", "diffusers peak GiB": "5.00"}


def test_clock_table_of_two_runs_in_one_folder(tmp_path):
    """A rerun appends to clocks.csv and marks.csv: the time between one run's end mark and the next
    run's first is no part of either; samples held for several reasons count for each of them."""
    start = datetime.datetime(2026, 11, 27, 12, 0, 0)
    stamp = lambda seconds: (start + datetime.timedelta(seconds=seconds)).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]  # noqa: E731
    # 0x1 idle, 0x4 power cap: 0x5 is both, 0x4 power cap alone.
    reasons = {range(0, 10): "0x0", range(10, 20): "0x1", range(20, 30): "0x5", range(30, 34): "0x4"}
    lines = ["timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"]
    lines += [f"{stamp(s)}, 1500, 400.0, 60, {code}" for span, code in reasons.items() for s in span]
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "clocks.csv").write_text("\n".join(lines) + "\n")
    (folder / "marks.csv").write_text(f"{stamp(0)},setup\n{stamp(10)},end\n{stamp(20)},setup\n{stamp(30)},dit x\n"
                                      f"{stamp(34)},end\n")
    text = _tables(folder).splitlines()
    rows = [line for line in text[text.index("The GPU while each part ran (nvidia-smi, every 0.5 s):") + 3:]
            if line.startswith("|")]
    assert [row.split(" | ")[0] for row in rows] == ["| setup", "| setup", "| dit x"]
    assert rows[0].endswith("| 60 |  |") and rows[1].endswith("| idle 100%, power cap 100% |")
    assert rows[2].endswith("| power cap 100% |")
