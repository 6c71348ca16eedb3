"""`dit8 convert SRC DST --scheme {fp8,int8,bf16}`: the run and the printed summary.

`dit8.cli` defines the arguments (`add_convert_arguments`: its parser is built without torch) and calls
run_convert; dit8 errors and OSErrors propagate to it, and it prints them as one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from dit8.progress import format_bytes

from .convert import ConvertResult, convert


def print_summary(result: ConvertResult, stream: TextIO) -> None:
    """Output path, sizes, time, speed, and the quantization error summary."""
    print(f"wrote {result.output} ({len(result.files)} file{'s' if len(result.files) != 1 else ''}, "
          f"{format_bytes(result.output_bytes)} from {format_bytes(result.source_bytes)} of source)", file=stream)
    print(f"time {result.seconds:.1f} s, {result.mib_per_s:.1f} MiB/s", file=stream)
    if result.layers:
        sqnr = result.mean_sqnr_db
        print(f"{len(result.layers)} layers quantized to {result.scheme}: mean relative error "
              f"{result.mean_rel_error:.3e}" + (f", mean SQNR {sqnr:.1f} dB" if sqnr is not None else ""),
              file=stream)
        print("worst layers:", file=stream)
        for e in result.worst:
            print(f"  {e.layer:<32} rel {e.rel_error:.3e}  SQNR {e.sqnr_db:6.1f} dB", file=stream)
    if result.report is not None:
        print(f"report {result.report}", file=stream)


def run_convert(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    """Run `dit8 convert` from parsed arguments; returns the exit status."""
    # progress=True: a bar on a terminal, and in a log (stderr redirected) a line every LOG_INTERVAL
    # seconds, so that a conversion of many minutes shows that it moves; none with --quiet.
    result = convert(args.src, args.dst, scheme=args.scheme, lora=args.lora, keep=args.keep,
                     per_block=args.per_block, force=args.force, report=args.report,
                     progress=not args.quiet)
    print_summary(result, stream or sys.stdout)
    return 0
