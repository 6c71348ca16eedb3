"""Converter throughput and peak memory on a generated multi-GiB bf16 checkpoint (CPU, no GPU needed).

    python bench/convert_throughput.py [--layers 4] [--workdir /tmp/dit8-convert-bench] [--scheme fp8]

Writes a random bf16 checkpoint with the real I2V-14B tensor shapes and `--layers` blocks (4 blocks:
3.6 GB), converts it with `dit8 convert` in a fresh process, and prints the source size, time, MiB/s,
the child's peak resident memory (VmHWM), and a plain `cp` of the same file as the disk baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dit8.config import I2V_14B
from dit8.layouts import expected_shapes
from dit8.packed_format import SCHEMES
from dit8.testing import write_checkpoint

CHILD = """
import sys
from dit8.cli import main
rc = main(sys.argv[1:])
hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(f'VmHWM_KiB {hwm}')
sys.exit(rc)
"""


def make_source(path: Path, layers: int) -> None:
    """Random bf16 weights of I2V-14B's shapes with `layers` blocks, written beside and renamed into place:
    a run stopped while writing leaves no half source for the next one to time."""
    config = dataclasses.replace(I2V_14B, num_layers=layers)
    gen = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in expected_shapes(config).items()}
    partial = path.with_name(path.name + ".partial")
    write_checkpoint(weights, partial, config=config)
    partial.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="blocks of the source (default 4)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dit8-convert-bench"))
    parser.add_argument("--scheme", default="fp8", choices=SCHEMES)
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"src_{args.layers}.safetensors"
    if not src.exists():
        make_source(src, args.layers)
    size = src.stat().st_size

    start = time.perf_counter()
    shutil.copyfile(src, args.workdir / "copy.safetensors")
    copy_s = time.perf_counter() - start
    (args.workdir / "copy.safetensors").unlink()

    dst = args.workdir / f"out_{args.scheme}.safetensors"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, "convert", str(src), str(dst), "--scheme", args.scheme,
                             "--force"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"convert_throughput: the conversion failed:\n{result.stderr.strip()}")
    hwm_kib = int(next(l.split()[1] for l in result.stdout.splitlines() if l.startswith("VmHWM_KiB")))
    mib = size / 2**20
    print(f"source {mib:.0f} MiB bf16 ({args.layers} blocks of I2V-14B shapes), scheme {args.scheme}")
    print(f"convert: {seconds:.1f} s, {mib / seconds:.0f} MiB/s, peak RSS {hwm_kib / 1024:.0f} MiB")
    print(f"cp of the source: {copy_s:.1f} s, {mib / copy_s:.0f} MiB/s")


if __name__ == "__main__":
    main()
