"""The DIT8_GLUON setting (kernels/candidates.py) that routes the Gluon candidates' fastest timed
configurations into the ops, from a results folder of bench/gpu_check.sh:

    python bench/gluon_choice.py .gpu_check        # e.g. "attention=ws gemm=k256"; empty: nothing timed

gemm: the fastest `test_gemm_gluon` configuration on (32760, 5120, 13824), the Wan shape whose table
entry promotes (the only FP8 GEMMs the candidate takes in a forward); attention: the faster of the
`gluon_bf16` and `gluon_bf16_ws` rows. A candidate without a timed row (its GPU tests did not pass, its
stage did not run) is left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMOTED_SHAPE = [32760, 5120, 13824]


def _rows(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text()).get("benchmarks", [])
    except (OSError, ValueError):
        return []


def fastest(rows: list[dict], configuration_of) -> str | None:
    """The configuration of the row with the lowest `ms` among those `configuration_of` names."""
    timed = [(row["extra_info"]["ms"], name) for row in rows
             if (name := configuration_of(row)) is not None and "ms" in row.get("extra_info", {})]
    return min(timed)[1] if timed else None


def choice(folder: Path) -> str:
    """The DIT8_GLUON value for the candidates timed in `folder`."""
    def gemm(row):
        info = row.get("extra_info", {})
        if row.get("name", "").startswith("test_gemm_gluon[") and info.get("shape") == PROMOTED_SHAPE:
            return row.get("params", {}).get("config")
        return None

    def attention(row):
        name = row.get("params", {}).get("name", "")
        return {"gluon_bf16": "default", "gluon_bf16_ws": "ws"}.get(name)

    picks = {"attention": fastest(_rows(folder / "bench_attention.json"), attention),
             "gemm": fastest(_rows(folder / "bench_gemm.json"), gemm)}
    return " ".join(f"{name}={config}" for name, config in picks.items() if config is not None)


if __name__ == "__main__":
    print(choice(Path(sys.argv[1])))
