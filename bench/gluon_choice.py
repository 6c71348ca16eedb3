"""The DIT8_GLUON setting (kernels/candidates.py) that routes into the ops each Gluon candidate that beat
the Triton kernel it would replace, in its fastest configuration, from a results folder of
bench/gpu_check.sh:

    python bench/gluon_choice.py .gpu_check        # e.g. "attention=ws gemm=k256"; empty: none won

- gemm: the fastest `test_gemm_gluon` configuration on (32760, 5120, 13824), the Wan shape whose table
  entry promotes (the only FP8 GEMMs it takes in a forward), against that row's `ms_triton`;
- gemm_fast, gemm_int8: `test_gemm_gluon_fast`, `test_gemm_gluon_int8` against their rows'
  `ms_triton`, summed over the shapes they ran;
- attention: the faster of the `gluon_bf16` and `gluon_bf16_ws` rows against `triton_bf16`;
- attention_8bit: the fastest configuration over both 8-bit precisions (`gluon_int8` + `gluon_fp8`, or
  their `_ws` or `_wg` rows) against `triton_int8` + `triton_fp8`.
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
        return json.loads(path.read_text()).get("benchmarks", [])
    except (OSError, ValueError):
        return []


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


def _fastest(rows: list[dict], candidates: dict[str, tuple[str, ...]], rivals: tuple[str, ...]) -> str | None:
    """The configuration whose self-attention rows (`candidates`: configuration -> row names) took the
    least time together, where that beat the `rivals` rows together (or those did not all run); a
    configuration counts only with all its rows timed."""
    by_name = {r.get("params", {}).get("name"): _ms(r) for r in rows if _test(r) == "test_self_attention"}
    timed = [(sum(by_name[name] for name in names), config) for config, names in candidates.items()
             if all(by_name.get(name) is not None for name in names)]
    if not timed:
        return None
    ms, config = min(timed)
    if any(by_name.get(name) is None for name in rivals):
        return config
    return config if ms < sum(by_name[name] for name in rivals) else None


def attention(rows: list[dict]) -> str | None:
    return _fastest(rows, {"default": ("gluon_bf16", ), "ws": ("gluon_bf16_ws", )}, ("triton_bf16", ))


def attention_8bit(rows: list[dict]) -> str | None:
    """Both 8-bit precisions go to the candidate: their times together."""
    return _fastest(rows, {"default": ("gluon_int8", "gluon_fp8"), "ws": ("gluon_int8_ws", "gluon_fp8_ws"),
                           "wg": ("gluon_int8_wg", "gluon_fp8_wg")}, ("triton_int8", "triton_fp8"))


def choice(folder: Path) -> str:
    """The DIT8_GLUON value for the candidates timed in `folder` (module docstring)."""
    gemm_rows, attention_rows = _rows(folder / "bench_gemm.json"), _rows(folder / "bench_attention.json")
    picks = {"attention": attention(attention_rows), "attention_8bit": attention_8bit(attention_rows),
             "gemm": gemm(gemm_rows),
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
