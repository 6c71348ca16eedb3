"""The DIT8_GLUON setting (kernels/candidates.py) that routes into the ops each Gluon candidate that beat
the Triton kernel it would replace, in its fastest configuration, from a results folder of
bench/gpu_check.sh:

    python bench/gluon_choice.py .gpu_check        # e.g. "gemm=ws gemm_int8"; empty: none won

- gemm: the fastest `test_gemm_gluon` configuration on (32760, 5120, 13824), the Wan shape whose table
  entry promotes (the only FP8 GEMMs it takes in a forward), against that row's `ms_triton`;
- gemm_fast, gemm_int8: `test_gemm_gluon_fast`, `test_gemm_gluon_int8` against their rows'
  `ms_triton`, summed over the shapes they ran;
A candidate without timed rows (its GPU tests did not pass, its stage did not run) is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMOTED_SHAPE = [32760, 5120, 13824]


def _rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text()).get("benchmarks", [])
    except (OSError, ValueError, AttributeError):  # (AttributeError: JSON that is not an object)
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def _test(row: dict) -> str:
    return row.get("name", "").split("[")[0]


def _ms(row: dict) -> float | None:
    return row.get("extra_info", {}).get("ms")


def gemm(rows: list[dict]) -> str | None:
    timed = [(_ms(r), r["extra_info"].get("ms_triton"), r.get("params", {}).get("config")) for r in rows
             if _test(r) == "test_gemm_gluon" and r.get("extra_info", {}).get("shape") == PROMOTED_SHAPE
             and _ms(r) is not None]
    if not timed:
        return None
    ms, ms_triton, config = min(timed)
    return config if ms_triton is None or ms < ms_triton else None


def in_place(rows: list[dict], test: str) -> str | None:
    """"default" where the rows of `test` (scaled_mm_gluon.FAST) took less time in all than their
    `ms_triton`."""
    timed = [(_ms(r), r["extra_info"].get("ms_triton")) for r in rows if _test(r) == test and _ms(r) is not None]
    if not timed or any(t is None for _, t in timed):
        return None
    return "default" if sum(ms for ms, _ in timed) < sum(t for _, t in timed) else None


def choice(folder: Path) -> str:
    """The DIT8_GLUON value for the candidates timed in `folder` (module docstring)."""
    gemm_rows = _rows(folder / "bench_gemm.json")
    picks = {"gemm": gemm(gemm_rows),
             "gemm_fast": in_place(gemm_rows, "test_gemm_gluon_fast"),
             "gemm_int8": in_place(gemm_rows, "test_gemm_gluon_int8")}
    return " ".join(f"{name}={config}" for name, config in picks.items() if config is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="bench/gpu_check.sh's results folder")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"gluon_choice: {args.results}: no such folder", file=sys.stderr)
        return 1
    print(choice(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
