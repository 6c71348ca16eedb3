"""Hardware counters of the kernels that miss their targets, at Wan2.1-14B 480P sizes, from Nsight
Compute: where a kernel's time goes (issue slots, memory, occupancy), the measured cause of a gap.

    ncu --clock-control none --profile-from-start off --csv --page details --log-file ncu.csv \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section SchedulerStats --section WarpStateStats \
        python bench/profile_kernels.py run           # on a CUDA machine (bench/gpu_check.sh: stage profile)
    ncu --clock-control none --profile-from-start off --csv --page details --log-file stalls.csv \
        --metrics "$(python bench/profile_kernels.py metrics)" python bench/profile_kernels.py run
    ncu --clock-control none --profile-from-start off --csv --page details --log-file pipes.csv \
        --metrics "$(python bench/profile_kernels.py metrics --pipes)" python bench/profile_kernels.py run
    python bench/profile_kernels.py table ncu.csv [--stalls stalls.csv] [--pipes pipes.csv]  # the tables

The second pass reads why warps did not issue (the stall reasons, in warps per issued instruction):
what a latency-bound kernel waits on. The third reads how busy each issue pipe was: a kernel that
is neither memory- nor issue-bound may be waiting on one of them (GELU's exp2 and reciprocal run on
the XU pipe, a sixteenth of the FMA pipe's rate, beside the 8-bit conversions). Each is a pass of its
own so that a metric name this ncu does not know costs only that table.

`run` compiles and warms every case first, then opens the profiler window (cudaProfilerStart) and
calls each case once, in the order `cases` lists them, so ncu records only those launches: the bf16
and 8-bit self-attention (q, k, v [1, 32760, 40, 128]) and the fused cross-attention (512 + 257 keys)
on the Triton kernels, the FP8 GEMM with Hopper's promoted and fast-accumulation tiles, and the fused
memory-bound ops on 32,760 x 5120 (GELU: x 13,824) on the backend `auto` picks; the bf16 and 8-bit
attention kernels' table tiles with pointer loads (on Hopper the tables' tiles load through TMA). On
Hopper also the Gluon FP8 GEMM candidates, unless DIT8_SKIP_GLUON names them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

# The ncu metrics of the table, by their names in the sections above: column title, metric name.
COLUMNS = (
    ("µs", "Duration"),
    ("SM %", "Compute (SM) Throughput"),
    ("memory %", "Memory Throughput"),
    ("L1 %", "L1/TEX Cache Throughput"),
    ("L2 %", "L2 Cache Throughput"),
    ("DRAM %", "DRAM Throughput"),
    ("issue slots %", "Issue Slots Busy"),
    ("IPC", "Executed Ipc Active"),
    ("no eligible %", "No Eligible"),
    ("eligible warps", "Eligible Warps Per Scheduler"),
    ("cycles per issue", "Warp Cycles Per Issued Instruction"),
    ("occupancy % (achieved / theoretical)", "Achieved Occupancy"),
    ("registers", "Registers Per Thread"),
    ("grid", "Grid Size"),
)
# Duration units as ncu writes them: "nsecond"/"usecond"/"msecond" in some versions, "ns"/"us"/"ms" in
# others (the H100 machine's).
_TO_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6, "ns": 1e-3, "us": 1.0, "ms": 1e3,
          "s": 1e6}

# The stall reasons of Nsight Compute's warp state sampling, each read as warps stalled for it per
# issued instruction; they add up to "Warp Cycles Per Issued Instruction".
STALL_REASONS = ("barrier", "branch_resolving", "dispatch_stall", "drain", "lg_throttle", "long_scoreboard",
                 "math_pipe_throttle", "membar", "mio_throttle", "misc", "no_instruction", "not_selected",
                 "selected", "short_scoreboard", "sleeping", "tex_throttle", "wait")
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
TOP_STALLS = 4
# The issue pipes (column title, metric), each in % of its peak over the cycles the SM was active.
PIPES = (("FMA %", "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active"),
         ("ALU %", "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active"),
         ("XU %", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"),
         ("LSU %", "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active"))


def cases() -> list[tuple[str, Callable[[], object]]]:
    """(name, call) of every profiled case, inputs built on the GPU."""
    import torch

    from dit8 import kernels as ops
    from dit8.kernels import attention_8bit_triton, attention_triton, gemm_configs, scaled_mm_gluon
    from dit8.kernels import scaled_mm_triton as gemm

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=dev, generator=gen, dtype=dtype)

    q, k, v = (randn(1, 32760, 40, 128) for _ in range(3))
    k_text, v_text, k_img, v_img = randn(1, 512, 40, 128), randn(1, 512, 40, 128), randn(1, 257, 40, 128), \
        randn(1, 257, 40, 128)
    fp8 = torch.float8_e4m3fn
    x, w = randn(32760, 5120), randn(5120, 5120) / 5120 ** 0.5
    xq, xs = ops.quantize_per_token(x, fp8, backend="torch")
    wq, ws = ops.quantize_per_token(w, fp8, backend="torch")
    promoted = gemm_configs.TABLE[("sm_90", "fp8", "large")]
    fast = gemm_configs.FAST_ACCUMULATION["sm_90"]
    # The Gluon candidates on Hopper, unless their GPU tests did not pass here (bench/gpu_check.sh).
    hopper = torch.cuda.get_device_capability(dev)[0] == 9
    gluon = [] if not hopper else [name for name in ("gemm", "gemm_fast")
                                   if name not in os.environ.get("DIT8_SKIP_GLUON", "").split()]
    residual, shift, scale = randn(1, 32760, 5120, dtype=torch.float32), randn(1, 5120, dtype=torch.float32), \
        randn(1, 5120, dtype=torch.float32)
    hidden = randn(32760, 13824)
    pointer_loads = dataclasses.replace(attention_triton.pick_config(
        "bf16", 128, shared_memory=attention_triton.shared_memory_of(q.device)), tma=False)
    eight_bit_pointer_loads = {precision: dataclasses.replace(attention_triton.pick_config(
        attention_8bit_triton.config_path(attention_8bit_triton.RECIPES[precision][1]), 128,
        shared_memory=attention_triton.shared_memory_of(q.device)), tma=False) for precision in ("int8", "fp8")}
    return [
        ("attention bf16", lambda: ops.attention(q, k, v, precision="bf16", backend="triton")),
        ("attention bf16, pointer loads", lambda: attention_triton.attention_bf16(q, k, v, config=pointer_loads)),
        ("attention int8", lambda: ops.attention(q, k, v, precision="int8", backend="triton")),
        ("attention fp8", lambda: ops.attention(q, k, v, precision="fp8", backend="triton")),
        *[(f"attention {precision}, pointer loads",
           lambda precision=precision: attention_8bit_triton.attention_8bit(
               q, k, v, precision, config=eight_bit_pointer_loads[precision]))
          for precision in ("int8", "fp8")],
        ("cross-attention", lambda: ops.cross_attention(q, k_text, v_text, k_img, v_img, backend="triton")),
        (f"fp8 GEMM {promoted.name()}", lambda: gemm.scaled_mm(xq, xs, wq, ws, None, torch.bfloat16, config=promoted)),
        (f"fp8 GEMM {fast.name()}", lambda: gemm.scaled_mm(xq, xs, wq, ws, None, torch.bfloat16, config=fast)),
        *[(f"fp8 GEMM {cfg.name()}", lambda cfg=cfg: scaled_mm_gluon.scaled_mm(xq, xs, wq, ws, config=cfg))
          for name, cfg in (("gemm", scaled_mm_gluon.CANDIDATES["default"]), ("gemm", scaled_mm_gluon.CANDIDATES["ws"]),
                            ("gemm_fast", scaled_mm_gluon.FAST)) if name in gluon],
        ("quantize_per_token", lambda: ops.quantize_per_token(x, fp8)),
        ("layer_norm_modulate_quant", lambda: ops.layer_norm_modulate_quant(residual, shift, scale, eps=1e-6,
                                                                            dtype=fp8)),
        ("gelu_tanh_quant", lambda: ops.gelu_tanh_quant(hidden, fp8)),
        ("rms_norm", lambda: ops.rms_norm(x, torch.ones(5120, device=dev), eps=1e-6)),
    ]


def run(only: list[str] | None = None) -> None:
    """Launch every case (those whose name contains one of `only`, if given) once in the profiler's
    window."""
    import torch

    todo = [(name, call) for name, call in cases() if not only or any(part in name for part in only)]
    if not todo:
        raise SystemExit(f"profile_kernels: no case matches {only}; the cases: {[name for name, _ in cases()]}")
    for _, call in todo:  # compile, tune, allocate: nothing of this inside the profiler's window
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, call in todo:
        print(f"profiling: {name}", flush=True)
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_launches(csv_path: Path) -> dict[str, dict]:
    """{launch ID: {"kernel": name, "metrics": {metric name: (unit, value)}}} of ncu's CSV (--page
    details)."""
    lines = csv_path.read_text(errors="replace").splitlines()
    # ncu prints its own messages ("==PROF==" lines) before the CSV; the header starts with "ID".
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{csv_path}: no ncu CSV in it (a header starting with \"ID\")")
    launches: dict[str, dict] = {}
    for row in csv.DictReader(lines[start:]):
        launch = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"], "metrics": {}})
        launch["metrics"][row["Metric Name"]] = (row.get("Metric Unit", ""), row["Metric Value"])
    return launches


def _kernel_name(launch: dict) -> str:
    return launch["kernel"].split("(")[0][:60]


def stall_table(csv_path: Path) -> list[str]:
    """Markdown lines: per launch, the TOP_STALLS largest stall reasons (warps per issued instruction)
    and their total, from the pass with the STALL_METRIC metrics."""
    out = ["| ID | kernel | stalled warps per issue | largest reasons |", "|---|---|---|---|"]
    for launch_id, launch in sorted(read_launches(csv_path).items(), key=lambda item: int(item[0])):
        stalls = {reason: number for reason in STALL_REASONS
                  if (number := _number(launch["metrics"].get(STALL_METRIC.format(reason), ("", ""))[1]))
                  is not None}
        if not stalls:
            raise ValueError(f"{csv_path}: launch {launch_id} has none of the stall metrics")
        top = sorted(stalls.items(), key=lambda item: -item[1])[:TOP_STALLS]
        out.append(f"| {launch_id} | {_kernel_name(launch)} | {sum(stalls.values()):.2f} | "
                   + ", ".join(f"{reason} {number:.2f}" for reason, number in top) + " |")
    return out


def pipe_table(csv_path: Path) -> list[str]:
    """Markdown lines: per launch, the utilization of each of PIPES, from the pass with their metrics."""
    out = ["| ID | kernel | " + " | ".join(title for title, _ in PIPES) + " |", "|---|---|" + "---|" * len(PIPES)]
    for launch_id, launch in sorted(read_launches(csv_path).items(), key=lambda item: int(item[0])):
        values = [launch["metrics"].get(name, ("", ""))[1] for _, name in PIPES]
        if not any(_number(value) is not None for value in values):
            raise ValueError(f"{csv_path}: launch {launch_id} has none of the pipe metrics")
        out.append(f"| {launch_id} | {_kernel_name(launch)} | " + " | ".join(values) + " |")
    return out


def table(csv_path: Path) -> list[str]:
    """Markdown lines: one row per profiled kernel launch, in launch order, with COLUMNS."""
    launches = read_launches(csv_path)
    header = ["ID", "kernel"] + [title for title, _ in COLUMNS]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for launch_id, launch in sorted(launches.items(), key=lambda item: int(item[0])):
        metrics = launch["metrics"]
        cells = [launch_id, _kernel_name(launch)]
        for title, name in COLUMNS:
            unit, value = metrics.get(name, ("", ""))
            if name == "Duration" and (number := _number(value)) is not None:
                value = f"{number * _TO_US.get(unit, float('nan')):,.1f}"
            elif name == "Achieved Occupancy" and "Theoretical Occupancy" in metrics:
                value = f"{value} / {metrics['Theoretical Occupancy'][1]}"
            cells.append(value)
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="launch every case once inside the profiler window (CUDA)")
    run_cmd.add_argument("--only", action="append", metavar="TEXT",
                         help="only the cases whose name contains TEXT (repeatable), e.g. \"attention fp8\"")
    tab = sub.add_parser("table", help="the markdown table of ncu's CSV (--page details)")
    tab.add_argument("csv", type=Path)
    tab.add_argument("--stalls", type=Path, help="the CSV of the stall-reason pass: a second table")
    tab.add_argument("--pipes", type=Path, help="the CSV of the pipe pass: a third table")
    metrics = sub.add_parser("metrics", help="the --metrics argument of the stall-reason pass")
    metrics.add_argument("--pipes", action="store_true", help="that of the pipe pass instead")
    args = parser.parse_args(argv)
    if args.command == "run":
        import torch

        if not torch.cuda.is_available():
            print("profile_kernels: run needs a CUDA device (under ncu); there is none here", file=sys.stderr)
            return 1
        run(args.only)
        return 0
    if args.command == "metrics":
        names = [name for _, name in PIPES] if args.pipes else [STALL_METRIC.format(r) for r in STALL_REASONS]
        print(",".join(names))
        return 0
    try:
        print("\n".join(table(args.csv)))
    except (OSError, ValueError, KeyError) as e:
        print(f"profile_kernels: {e}", file=sys.stderr)
        return 1
    # The first table stands whatever became of the other passes; each of those stands alone.
    status = 0
    for path, title, make in ((args.stalls, "Stall reasons (warps stalled per issued instruction):", stall_table),
                              (args.pipes, "Issue pipes (% of peak over the SM's active cycles):", pipe_table)):
        if path is None:
            continue
        try:
            print("\n".join(["", title, *make(path)]))
        except (OSError, ValueError, KeyError) as e:
            print(f"profile_kernels: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
