"""Markdown tables of everything a bench/gpu_check.sh run measured, for bench/RESULTS.md.

    python bench/results_tables.py .gpu_check          # the results folder
    python bench/results_tables.py dit8-gpu.tgz        # or its packed copy

Tables: the machine (gpu.txt), test outcomes per file (tests.xml, or where a run left none the log
test_outcomes.jsonl), one table per benchmark JSON
(bench_*.json: the extra_info of each row, with the columns some row of that file has, and a sweep
row's every configuration) and the DiT
forwards (dit_*.json: times, peak memory, the profiled parts, diffusers on the same weights), the GPU's
clock, power and temperature during each stage and forward (clocks.csv, marks.csv), the Nsight
Compute table (profile.txt), then the GPU_VERIFIED and FASTEST entries the run printed. A file cut
short by a time limit is named and skipped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import statistics
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from pathlib import Path

from verified_backends import logged_cases  # bench/, beside this script

GIB = 2 ** 30
# Bits of nvidia-smi's clocks_event_reasons.active (NVML's clocks event reasons): why the clock was held
# below its maximum.
CLOCK_REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "power cap", 0x8: "hardware slowdown",
                 0x10: "sync boost", 0x20: "thermal (software)", 0x40: "thermal (hardware)",
                 0x80: "power brake", 0x100: "display clock"}

# extra_info key -> column title, in the order the columns appear.
BENCH_COLUMNS = {
    "ms": "ms", "tflops": "TFLOP/s", "gbps": "GB/s", "copy_fraction": "of copy rate",
    "baseline": "baseline", "baseline_ms": "baseline ms", "ratio": "ratio", "ratio_range": "ratio range",
    "ratio_fast_accum": "vs fast accum", "ratio_vs_cublas_unfused": "vs cuBLAS unfused",
    "speedup_vs_official": "vs official",
    "speedup_vs_rms_norm_rope": "vs rms_norm + rope", "rel_err": "rel err",
    "rel_err_baseline": "baseline rel err", "rel_err_table": "table's rel err",
    "err_ratio": "err / baseline's", "err_ratio_table": "table's err / baseline's",
    "fast_within_budget": "within 2x", "quantize_ms": "quantize ms",
    "peak_gib": "peak GiB", "activation_gib": "activations GiB", "estimate_gib": "estimate GiB",
    "n_regs": "registers", "n_spills": "spills", "config": "config", "best": "best",
    "best_fast_accum": "best fast accum", "best_split_accum": "best split accum", "ms_triton": "triton ms",
    "config_triton": "triton config",
    "ratio_vs_default_mode": "vs cuBLAS default mode", "table": "table's config", "ms_table": "table's ms",
}


@contextlib.contextmanager
def results_folder(path: Path) -> Iterator[Path]:
    """The folder of results: `path` itself, or a temporary copy of a .tgz unpacked."""
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise SystemExit(f"results_tables: {path}: no such folder or file")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with tarfile.open(path) as archive:
                archive.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:  # (EOFError, zlib: a cut archive)
            raise SystemExit(f"results_tables: {path}: not a results archive ({err})") from None
        yield Path(tmp)


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]


def read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        text = path.read_text()
        if not text:  # what pytest-benchmark leaves where no benchmark ran (or before it wrote any)
            notes.append(f"{path.name}: empty (no benchmark ran, or the run stopped first), skipped")
            return None
        data = json.loads(text)
    except (OSError, ValueError) as e:  # a run cut off before it finished writing
        notes.append(f"{path.name}: unreadable ({e}), skipped")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name}: not a JSON object, skipped")
        return None
    return data


def test_lines(xml_path: Path) -> list[str]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    interrupted = 0
    for case in ET.parse(xml_path).iter("testcase"):
        if not case.get("name"):  # the test running when the run was interrupted: it has no outcome
            interrupted += 1
            continue
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        # A collection error under pytest-xdist has an empty classname: its name says which file.
        counts[(case.get("classname") or case.get("name")).split(".")[-1]][outcome] += 1
    lines = outcome_table("tests", {"passed": "passed", "failed": "failure", "errors": "error", "skipped": "skipped"},
                          counts)
    if interrupted:
        lines.append(f"\n{interrupted} test(s) were running when the run was interrupted (no outcome).")
    return lines


def logged_test_lines(log: Path) -> list[str]:
    """The outcomes per test file from the log the tests wrote as they ended (DIT8_TEST_OUTCOMES), for a
    run that left no JUnit XML; failures and errors are one column there."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (classname, _), _, outcome in logged_cases(log):
        counts[classname.split(".")[-1]][outcome] += 1
    return outcome_table("tests (from test_outcomes.jsonl)",
                         {"passed": "passed", "failed or errors": "failed", "skipped": "skipped"}, counts)


def outcome_table(title: str, columns: dict[str, str], counts: dict[str, collections.Counter]) -> list[str]:
    """A row of outcome counts per test file and one of their sums; `columns`: title -> outcome counted."""
    total = sum(counts.values(), collections.Counter())
    rows = [[name, *(c[outcome] for outcome in columns.values())]
            for name, c in sorted(counts.items()) + [("**all**", total)]]
    return table([title, *columns], rows)


def bench_lines(name: str, data: dict) -> list[str]:
    rows = data.get("benchmarks", [])
    keys = [k for k in BENCH_COLUMNS if any(k in b.get("extra_info", {}) for b in rows)]
    cell = lambda v: " to ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731 (a range)
    lines = table([name] + [BENCH_COLUMNS[k] for k in keys],
                  [[b["name"]] + [cell(b.get("extra_info", {}).get(k)) for k in keys] for b in rows])
    # A sweep row's every configuration ({config: [ms, rel err]}), fastest first.
    for b in rows:
        sweep = b.get("extra_info", {}).get("sweep")
        if isinstance(sweep, dict) and sweep:
            timed = sorted(sweep.items(), key=lambda item: item[1][0] if isinstance(item[1], list) else item[1])
            lines += ["", f"{b['name']}, every configuration (ms, rel err):",
                      *[f"- {config}: {' / '.join(map(str, v)) if isinstance(v, list) else v}" for config, v in timed]]
    return lines


def dit_lines(runs: dict[str, dict]) -> list[str]:
    parts = sorted({p for r in runs.values() for p in r.get("parts_ms", {})})
    header = (["run", "forward ms", "context ms", "4-step loop ms", "peak GiB", "graph ms"]
              + [f"{p} ms" for p in parts] + ["GEMM TFLOP/s", "attention TFLOP/s",
                                              "diffusers ms", "speed-up", "diffusers peak GiB"])
    rows = []
    for name, r in runs.items():
        d, g, rates = r.get("diffusers", {}), r.get("cuda_graph", {}), r.get("tflops", {})
        label = name + (f" (Gluon: {' '.join(f'{k}={v}' for k, v in r['gluon'].items())})"
                        if r.get("gluon") else "")
        label += (f" (failed part way: {r['error']})" if r.get("error")
                  else " (stopped part way)" if r.get("partial") else "")
        if "forward_ms" not in r:  # failed before its first timed forward (building the model, say)
            rows.append([label] + [None] * (len(header) - 1))
            continue
        row = [label, f"{r['forward_ms']:.1f}", f"{r['context_ms']:.1f}",
               f"{r['loop']['total_ms']:.1f}" if "loop" in r else None,
               f"{r['peak_memory']['forward'] / GIB:.2f}",
               f"{g['forward_ms']:.1f}" if g else None]
        row += [f"{r['parts_ms'][p]:.1f}" if p in r.get("parts_ms", {}) else None for p in parts]
        row += [f"{rates[k]:.0f}" if k in rates else None for k in ("gemm", "attention")]
        row += ([f"{d['forward_ms']:.1f}", f"{d['ratio']:.2f}x", f"{d['peak_memory'] / GIB:.2f}"]
                if "forward_ms" in d else [d.get("skipped"), None, None])
        rows.append(row)
    return table(header, rows)


def clock_lines(clocks: Path, marks: Path) -> list[str]:
    """The GPU's clock, power and temperature while each marked part of the run ran (gpu_check.sh samples
    them twice a second: clocks.csv; marks.csv: when each stage and forward began, and the end)."""
    def when(stamp: str) -> datetime.datetime:
        return datetime.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f")

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:  # "[N/A]", "[Not Supported]"
            return None

    lines = clocks.read_text().splitlines()
    columns = [name.strip() for name in lines[0].split(",")]
    samples = []
    for line in lines[1:]:
        fields = [v.strip() for v in line.split(",")]
        with contextlib.suppress(ValueError):  # (a line cut short where the sampler was stopped)
            if len(fields) == len(columns):
                values = dict(zip(columns, fields, strict=True))
                samples.append((when(values["timestamp"]), values))
    spans = []
    for line in marks.read_text().splitlines():
        stamp, _, label = line.partition(",")
        with contextlib.suppress(ValueError):
            spans.append((when(stamp), label))
    rows = []
    for (start, label), (end, _) in zip(spans, spans[1:]):
        if label == "end":
            continue
        inside = [values for t, values in samples if start <= t < end]
        clock = [c for v in inside if (c := number(v.get("clocks.sm", ""))) is not None]
        power = [p for v in inside if (p := number(v.get("power.draw", ""))) is not None]
        heat = [h for v in inside if (h := number(v.get("temperature.gpu", ""))) is not None]
        if not clock:
            continue
        reasons: collections.Counter = collections.Counter()
        for v in inside:
            with contextlib.suppress(ValueError):
                bits = int(v.get("clocks_event_reasons.active", v.get("clocks_throttle_reasons.active", "")), 16)
                reasons.update(name for bit, name in CLOCK_REASONS.items() if bits & bit)
        rows.append([label, f"{(end - start).total_seconds():.0f}", len(inside), f"{statistics.median(clock):.0f}",
                     f"{min(clock):.0f}", f"{statistics.median(power):.0f}" if power else None,
                     f"{max(power):.0f}" if power else None, f"{max(heat):.0f}" if heat else None,
                     ", ".join(f"{name} {count / len(inside):.0%}" for name, count in reasons.most_common())])
    if not rows:
        return []
    return table(["part of the run", "s", "samples", "SM MHz median", "SM MHz min", "W median", "W max",
                  "max °C", "clock held by (share of samples)"], rows)


def report(folder: Path) -> list[str]:
    """Every table of the results in `folder`, as markdown lines."""
    lines: list[str] = []
    notes: list[str] = []
    if (folder / "gpu.txt").exists():
        lines += (folder / "gpu.txt").read_text().strip().splitlines()
    if (folder / "tests.xml").exists():
        try:
            lines += [""] + test_lines(folder / "tests.xml")
        except ET.ParseError as e:  # the test run was killed before pytest wrote its report
            notes.append(f"tests.xml: unreadable ({e}), skipped")
    elif (folder / "test_outcomes.jsonl").exists():  # a run stopped before pytest wrote the report
        try:
            lines += [""] + logged_test_lines(folder / "test_outcomes.jsonl")
        except (ValueError, KeyError, TypeError) as e:
            notes.append(f"test_outcomes.jsonl: unreadable ({e}), skipped")
    for path in sorted(folder.glob("bench_*.json")):
        data = read_json(path, notes)
        if data is not None:
            lines += [""] + bench_lines(path.stem, data)
    runs = {p.stem.removeprefix("dit_"): r for p in sorted(folder.glob("dit_*.json"))
            if (r := read_json(p, notes))}
    if runs:
        lines += [""] + dit_lines(runs)
    if (folder / "clocks.csv").exists() and (folder / "marks.csv").exists():
        try:
            clocks = clock_lines(folder / "clocks.csv", folder / "marks.csv")
        except (OSError, IndexError) as e:  # (IndexError: an empty file)
            clocks = []
            notes.append(f"clocks.csv: unreadable ({e}), skipped")
        if clocks:
            lines += ["", "The GPU while each part ran (nvidia-smi, every 0.5 s):", *clocks]
    if (folder / "profile.txt").exists():
        profile = (folder / "profile.txt").read_text().strip().splitlines()
        if profile:
            lines += ["", "Nsight Compute, one launch each (bench/profile_kernels.py):", *profile]
        else:  # ncu profiled nothing (no permission for the counters, say); its log says why
            notes.append("profile.txt: empty (Nsight Compute left no table; its messages are in ncu.csv)")
    # The table entries the run earned (bench/verified_backends.py, bench/fastest_backends.py for
    # kernels/registry.py; bench/rows_choice.py for kernels/fused_triton.py).
    entries = [line for name in ("gpu_verified.txt", "fastest.txt", "rows_tuned.txt") if (folder / name).exists()
               for line in (folder / name).read_text().splitlines()
               if line.startswith(("GPU_VERIFIED", "FASTEST", "ROWS_TUNED"))]
    if entries:
        lines += ["", "Table entries (GPU_VERIFIED, FASTEST: kernels/registry.py; ROWS_TUNED: "
                      "kernels/fused_triton.py):", *entries]
    return lines + ([""] + notes if notes else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="gpu_check.sh's results folder, or its .tgz")
    args = parser.parse_args(argv)
    with results_folder(args.results) as folder:
        lines = report(folder)
    if not lines:
        print(f"{args.results}: no results found", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
