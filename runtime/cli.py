"""The `dit8` command line: `info`, `convert`, `demo`. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import Dit8Error
from .progress import format_bytes


def _run_info(args: argparse.Namespace) -> int:
    from .loader import open_dit, summarize

    summary = summarize(open_dit(args.path))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    c = summary["config"]
    print(f"path        {summary['path']} ({summary['files']} file{'s' if summary['files'] != 1 else ''})")
    print(f"layout      {summary['layout']}")
    print(f"variant     {summary['variant']}")
    quantized = ", ".join(f"{n} {scheme}" for scheme, n in summary["quantized_layers"].items() if n)
    print(f"format      {summary['format']}" + (f" ({quantized} layers)" if quantized else ""))
    print(f"dimensions  dim {c['dim']}, ffn {c['ffn_dim']}, heads {c['num_heads']} x {c['dim'] // c['num_heads']}, "
          f"layers {c['num_layers']}, in/out {c['in_dim']}/{c['out_dim']}, freq {c['freq_dim']}, "
          f"text {c['text_dim']} x {c['text_len']}" + (f", clip {c['clip_dim']}" if c["clip_dim"] else ""))
    print(f"parameters  {summary['parameters']:,}")
    print("dtype       tensors       bytes")
    for dtype, count in sorted(summary["tensors_by_dtype"].items()):
        print(f"{dtype:<11} {count:>7} {format_bytes(summary['bytes_by_dtype'][dtype]):>11}")
    for key, value in sorted(summary["metadata"].items()):
        print(f"meta        {key} = {value if len(value) <= 100 else value[:97] + '...'}")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from dit8.converters.cli import run_convert

    return run_convert(args)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(seed=args.seed, update=args.update, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit8", description="Quantized inference runtime for Wan2.1 I2V.")
    parser.add_argument("--version", action="version", version=f"dit8 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a DiT checkpoint (file or folder)")
    info.add_argument("path", help="checkpoint file or folder")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(run=_run_info)

    convert = commands.add_parser("convert", help="convert a float checkpoint to packed fp8/int8 (or bf16)")
    from dit8.converters.cli import add_convert_arguments

    add_convert_arguments(convert)
    convert.set_defaults(run=_run_convert)

    demo = commands.add_parser("demo", help="run the 4-step sampler on a tiny random I2V model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--update", choices=("deterministic", "renoise"), default="deterministic",
                      help="how each step moves to the next noise level")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(run=_run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dit8` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (Dit8Error, OSError, ValueError) as err:
        print(f"dit8: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dit8: interrupted", file=sys.stderr)
        return 130
