"""The entries of `dit8.kernels.fused_triton.ROWS_TUNED` for the GPU that ran the rows kernel sweep
(bench/test_bench_fused.py `test_rows_sweep`, DIT8_FUSED_SWEEP=1; bench/gpu_check.sh's sweep stage):

    python bench/rows_choice.py bench_sweep_fused.json [--capability 9.0]

For each op and row width, the fastest (warps, operands ahead) the sweep timed. An op gets an entry
only where that configuration is not the default (the kernel's own warps, operands after the
statistics) and took at most 98% of the default's time: differences within the timing's noise leave
the default in place. Prints a table and the line to paste into ROWS_TUNED.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastest_backends import capability  # bench/, beside this script

# The least gain (fraction of the default's time saved) an entry must show.
MIN_GAIN = 0.02


def choose(rows: list[dict]) -> tuple[dict, dict]:
    """({(op, width): {(warps, ahead): ms}}, {(op, width): (warps, ahead)} of the entries)."""
    timed: dict[tuple[str, int], dict[tuple[int, bool], float]] = {}
    defaults: dict[tuple[str, int], tuple[int, bool]] = {}
    for row in rows:
        info = row.get("extra_info", {})
        if not row.get("name", "").startswith("test_rows_sweep[") or "ms" not in info:
            continue
        key = (info["rows_op"], int(info["width"]))
        timed.setdefault(key, {})[(int(info["num_warps"]), bool(info["prefetch"]))] = float(info["ms"])
        defaults[key] = (int(info["default_warps"]), False)
    entries = {}
    for key, by_config in timed.items():
        best = min(by_config, key=by_config.get)
        default_ms = by_config.get(defaults[key])
        if best != defaults[key] and default_ms is not None and by_config[best] <= (1 - MIN_GAIN) * default_ms:
            entries[key] = best
    return timed, entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the sweep's pytest-benchmark --benchmark-json file")
    parser.add_argument("--capability", help="MAJOR.MINOR of the GPU that ran it (default: this GPU's)")
    args = parser.parse_args(argv)
    cap = capability(parser, args.capability)
    try:
        rows = json.loads(args.json.read_text()).get("benchmarks", [])
    except (OSError, ValueError, AttributeError) as err:
        print(f"{args.json}: cannot read the benchmark results: {err}", file=sys.stderr)
        return 1
    timed, entries = choose(rows)
    if not timed:
        print(f"{args.json}: no test_rows_sweep rows (run it with DIT8_FUSED_SWEEP=1)", file=sys.stderr)
        return 1
    for (op, width), by_config in sorted(timed.items()):
        cells = "  ".join(f"{warps}w {'ahead' if ahead else 'after'} {ms:.4f}"
                          for (warps, ahead), ms in sorted(by_config.items()))
        print(f"{op} ({width}): {cells}")
    pairs = ", ".join(f"({op!r}, {width}): ({warps}, {ahead})"
                      for (op, width), (warps, ahead) in sorted(entries.items()))
    print(f"\nROWS_TUNED[{cap}] = {{{pairs}}}".replace("'", '"'))
    return 0


if __name__ == "__main__":
    sys.exit(main())
