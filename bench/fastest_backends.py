"""Which kernel backend is faster for each op, from benchmark JSON files: the entries of
`dit8.kernels.registry.FASTEST` for the GPU that produced them.

    python bench/fastest_backends.py fused.json [more.json ...] [--capability 9.0]

Reads the rows whose extra_info names an `op` and a `backend` ("cuda", "triton", or "torch" where the
torch reference competes: bench/test_bench_fused.py, and bench/test_bench_attention.py for bf16
attention, where the reference is SDPA), adds up each backend's ms over the op's cases (a row's `case`,
else its test parameters without the backend), and prints a table and the line to paste into FASTEST.
Ops measured on one backend only are listed but given no entry.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

BACKENDS = ("cuda", "triton", "torch")


def fastest(rows: list[dict]) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(op -> backend -> total ms over the op's cases, op -> fastest backend). A backend counts only if
    it ran every case the op has, so totals compare like with like."""
    cases: dict[str, dict[str, dict[str, float]]] = collections.defaultdict(lambda: collections.defaultdict(dict))
    for row in rows:
        info = row.get("extra_info", {})
        if info.get("backend") in BACKENDS and "op" in info and "ms" in info:
            # The case: named by the row, or the test's parameters other than the backend ("rms_norm_bf16").
            params = row["name"].partition("[")[2].rstrip("]").split("-")
            case = info.get("case") or "-".join(p for p in params if p != info["backend"])
            cases[info["op"]][info["backend"]][case] = float(info["ms"])
    totals: dict[str, dict[str, float]] = {}
    winners: dict[str, str] = {}
    for op, by_backend in sorted(cases.items()):
        every_case = set().union(*(c.keys() for c in by_backend.values()))
        totals[op] = {b: sum(c.values()) for b, c in by_backend.items() if set(c) == every_case}
        if len(totals[op]) > 1:
            winners[op] = min(totals[op], key=totals[op].get)
    return totals, winners


def capability(parser: argparse.ArgumentParser, text: str | None) -> tuple[int, int]:
    """The --capability MAJOR.MINOR given, else this machine's GPU's (a usage error without one)."""
    if text:
        major, _, minor = text.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            parser.error(f"--capability must be MAJOR.MINOR, e.g. 9.0, got {text!r}")
        return int(major), int(minor)
    import torch

    if not torch.cuda.is_available():
        parser.error("no CUDA device here: give --capability MAJOR.MINOR")
    return torch.cuda.get_device_capability()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--capability", help="MAJOR.MINOR of the GPU that ran them (default: this GPU's)")
    args = parser.parse_args(argv)
    major, minor = capability(parser, args.capability)
    rows = []
    for path in args.json:
        try:
            rows += json.loads(path.read_text()).get("benchmarks", [])
        except (OSError, ValueError, AttributeError) as err:  # a suite stopped before its JSON was whole
            print(f"{path}: cannot read the benchmark results: {err}", file=sys.stderr)
            return 1
    smoke = [r for r in rows if str(r.get("extra_info", {}).get("device", "")).startswith("cpu")]
    if smoke:  # bench/conftest.py's smoke mode: the interpreter on tiny shapes, no GPU's times
        print(f"{len(smoke)} rows are smoke-mode results (device {smoke[0]['extra_info']['device']!r}), not "
              f"a GPU's times: no FASTEST entry from them", file=sys.stderr)
        return 1
    totals, winners = fastest(rows)
    if not totals:
        print("no rows with an op and a backend in these files", file=sys.stderr)
        return 1
    print(f"{'op':<28}" + "".join(f"{b + ' ms':>12}" for b in BACKENDS) + "  fastest")
    for op, by_backend in totals.items():
        cells = "".join(f"{by_backend[b]:>12.4f}" if b in by_backend else f"{'-':>12}" for b in BACKENDS)
        print(f"{op:<28}{cells}  {winners.get(op, '(one backend)')}")
    print(f"\nFASTEST[({major}, {minor})] = {json.dumps(winners, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
