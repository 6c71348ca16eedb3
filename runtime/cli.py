"""The `dit8` command line: `info`, `convert`, `compare`, `generate`, `demo`, `bench dit`. Errors print one line and
exit non-zero."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

# Only the standard library and dit8's torch-free modules at the top: `dit8 --help` and argument errors
# answer without loading torch (seconds); each command imports what it runs.
from . import __version__
from .choices import BACKENDS, DETERMINISTIC, DISTILLED, PRECISIONS, SAMPLERS, SCHEMES, UNIPC, UPDATE_RULES
from .errors import Dit8Error, InputError
from .progress import format_bytes

if TYPE_CHECKING:
    from .bench_dit import BenchSettings


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
    width = max([11, *map(len, summary["tensors_by_dtype"])])  # float8_e4m3fn is wider than the labels
    print(f"{'dtype':<{width}} {'tensors':>7} {'bytes':>11}")
    for dtype, count in sorted(summary["tensors_by_dtype"].items()):
        print(f"{dtype:<{width}} {count:>7} {format_bytes(summary['bytes_by_dtype'][dtype]):>11}")
    for key, value in sorted(summary["metadata"].items()):
        key, value = _printable(key), _printable(value)
        print(f"meta        {key} = {value if len(value) <= 100 else value[:97] + '...'}")
    return 0


def _printable(text: str) -> str:
    """`text` with its unprintable characters escaped: a file's metadata is anybody's text, and a newline
    or a terminal's escape sequence in it would forge lines or control the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _run_convert(args: argparse.Namespace) -> int:
    from dit8.converters.cli import run_convert

    return run_convert(args)


def _run_compare(args: argparse.Namespace) -> int:
    import torch

    from .compare import compare_outputs

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}
    result = compare_outputs(args.reference, args.quantized, device=_device_or_default(args.device),
                             dtype=dtypes[args.dtype], frames=args.frames, size=args.size or (832, 480), seed=args.seed,
                             backend=args.backend, attention=args.attention, progress=False if args.quiet else None)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 0
    width, height = result.size
    print(f"inputs      random, seed {result.seed}: {result.frames} frames of {width}x{height} "
          f"({result.tokens:,} tokens), on {result.device} in {result.dtype}, attention {result.attention}")
    for step in result.steps:
        print(f"t = {step.timestep:6.1f}  relative error {step.relative_error:.4%}, cosine {step.cosine:.6f}")
    print(f"all steps   relative error {result.relative_error:.4%}, cosine {result.cosine:.6f}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(seed=args.seed, update=args.update, device=args.device, output=args.out, frames_dir=args.frames_dir)
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 832x480, got {text!r}")
    return int(width), int(height)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .conditioning import (AREA_480P, check_frames, check_grid, check_prompt, check_size, image_tensor,
                               output_size)
    from .devices import resolve_device
    from .loader import open_dit
    from .model import check_attention_tokens, check_backend_and_attention
    from .model_folder import find_model_files
    from .pipeline import I2VPipeline, check_settings
    from .tokenizer import Tokenizer, clean_prompt
    from .video import check_output_paths

    # What can be checked without the model is checked before the (long) load: first the arguments
    # alone, which every process of a sequence-parallel group refuses alike, before it joins the group.
    device = resolve_device(_device_or_default(args.device))
    if not clean_prompt(args.prompt):
        raise InputError("--prompt is empty")
    check_settings(seed=args.seed, steps=args.steps, guidance=args.guidance, shift=args.shift, sampler=args.sampler,
                   update=args.update)
    check_frames(args.frames)
    if args.vae_tile is not None and args.vae_tile < 1:
        raise InputError(f"--vae-tile must be a positive number of latent pixels, got {args.vae_tile}")
    if args.size is not None:
        width, height = check_size(args.size)
    parallel = None
    if args.sequence_parallel:
        from .parallel import join_launched_group

        parallel, device = join_launched_group(device)
    # Every process of a sequence-parallel group makes the same calls; the first one writes.
    follower = parallel is not None and parallel.rank != 0
    if not follower:  # (the writer's check: it tries the frames folder, which others must not race)
        check_output_paths(args.out, args.frames_dir)
    image = image_tensor(args.image)
    if args.size is None:
        height, width = output_size(tuple(image.shape[1:]), AREA_480P if args.area is None else args.area)
    check_backend_and_attention(args.backend, args.attention, device)
    # The folder's files, and the prompts against its tokenizer and the DiT's text length (from the
    # checkpoint's header): seconds, where loading the models takes minutes.
    files = find_model_files(args.model, dit=args.dit, scheme=args.scheme, distilled=args.distilled)
    if args.sampler is None:  # the folder's model decides the sampler, and with it the update rules it takes
        check_settings(sampler=DISTILLED if files.distilled else UNIPC, update=args.update)
    dit = open_dit(files.dit, config_json=files.config_json)
    grid = check_grid(args.frames, height, width, patch=dit.config.patch_size)
    check_attention_tokens(dit.config, math.prod(grid), f"a {width}x{height} video of {args.frames} frames",
                           backend=args.backend, attention=args.attention, device=device,
                           world=1 if parallel is None else parallel.world)
    tokenizer = Tokenizer.from_folder(files.tokenizer, text_len=dit.config.text_len)
    dit.checkpoint.close()  # read again by the load; a .pth one may hold its tensors until closed
    check_prompt(tokenizer, args.prompt, "--prompt")
    if args.negative_prompt is not None:
        check_prompt(tokenizer, args.negative_prompt, "--negative-prompt", allow_empty=True)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    pipe = I2VPipeline.from_pretrained(args.model, device=device, dtype=dtypes.get(args.dtype),
                                       dit=args.dit, scheme=args.scheme, distilled=args.distilled,
                                       attention=args.attention,
                                       backend=args.backend, offload_encoders=args.offload_encoders,
                                       vae_tile=args.vae_tile, parallel=parallel,
                                       progress=not (follower or args.quiet))  # (log: a line every LOG_INTERVAL s)
    call = dict(seed=args.seed, frames=args.frames, size=args.size, area=args.area, steps=args.steps,
                sampler=args.sampler, guidance=args.guidance, shift=args.shift,
                negative_prompt=args.negative_prompt, update=args.update)
    if follower:
        pipe(image, args.prompt, **call)
        return 0
    if parallel is not None:
        print(f"parallel    {parallel.world} processes, each computing 1/{parallel.world} of the tokens")
    for line in pipe.files.describe():
        print(line)
    print(f"loaded      in {pipe.load_seconds:.1f} s on {pipe.device}, DiT compute {pipe.dit.setup.dtype}")
    video = pipe(image, args.prompt, **call, progress=not args.quiet)
    path = video.save(args.out)
    s = video.settings
    print(f"video       {video.num_frames} frames {video.width}x{video.height} at {video.fps} fps -> {path} "
          f"({format_bytes(path.stat().st_size)})")
    if args.frames_dir is not None:
        print(f"frames      {len(video.save_frames(args.frames_dir))} PNGs in {args.frames_dir}")
    print(f"sampler     {s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g}, shift {s['shift']:g}, "
          f"seed {s['seed']}")
    t = video.timings
    per_step = sum(video.step_seconds) / max(len(video.step_seconds), 1)
    print(f"time        text {t['text']:.2f} s, image {t['image']:.2f} s, vae encode {t['vae_encode']:.2f} s, "
          f"context k/v {t['context']:.2f} s, denoise {t['denoise']:.2f} s ({per_step:.2f} s/step), "
          f"decode {t['decode']:.2f} s, total {t['total']:.2f} s")
    print(f"memory      peak {format_bytes(video.peak_memory)} ({video.peak_memory_source})")
    return 0


def _run_bench_dit(args: argparse.Namespace) -> int:
    from dit8.converters.safetensors_writer import write_json
    from dit8.kernels import candidates

    from .bench_dit import check_bench_settings, format_table, run_bench

    settings = bench_settings(args)
    json_path = None if args.json is None else _json_output(args.json)
    # run_bench makes these checks too, but in the run, whose failures the JSON file records: a mistyped
    # flag replaced the numbers of an earlier run with its error.
    check_bench_settings(settings)
    candidates.chosen()  # DIT8_GLUON

    saved: list[dict] = [{}]  # the numbers saved last, for the error path

    def save(result: dict, partial: bool = True, error: str | None = None) -> None:
        # Each phase's numbers are saved as they come, marked partial until the run ends: a run stopped
        # part way (a time limit) still leaves its forward times, and one that failed says why. Written
        # beside and renamed, so a stop during the write leaves the previous version whole.
        saved[0] = result
        if json_path is not None:
            extra = {"partial": True, **({"error": error} if error else {})} if partial else {}
            try:
                write_json(json_path, {**result, **extra})
            except OSError as err:  # the disk filled, or the folder went away, during the run
                raise InputError(f"--json {args.json}: cannot write: {err.strerror or err}") from None

    # Under --sequence-parallel every process runs the benchmark; the first one reports it.
    first = not _follower(args)
    try:
        result = run_bench(settings, log=lambda line: print(f"dit8 bench dit: {line}", file=sys.stderr, flush=True)
                           if first and not args.quiet else None, measured=save if first else None)
    except Exception as err:  # out of memory, say: the numbers so far stay (if any), with the error
        if first:
            # A file that cannot be written now (the save that failed, say) must not hide why the run stopped.
            with contextlib.suppress(InputError):
                save(saved[0], error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise
    if not first:
        return 0
    for line in format_table(result):
        print(line)
    if json_path is not None:
        save(result, partial=False)
        print(f"json        {args.json}")
    return 0


def _json_output(given: str) -> Path:
    """Where `bench dit --json` writes: the file `given` names, through links (the file is replaced, a
    link to it kept). InputError before the run for a path that cannot take it: a folder, a device or
    pipe (/dev/stdout), which the rename onto it would replace, or a folder it cannot write in."""
    from dit8.converters.safetensors_writer import temp_path_beside

    if given == "-":  # elsewhere standard output; here it would be a file named "-" beside the table printed there
        raise InputError("--json -: give the JSON file's name (bench dit prints its table on standard output)")
    path = Path(os.path.realpath(given))
    # What the path leads to is asked of `given` itself, whose stat follows /proc's fd links: /dev/stdout
    # piped resolves to '/proc/PID/fd/pipe:[N]', a name that is no file, though the pipe is there.
    if Path(given).is_dir():
        raise InputError(f"--json {given}: is a folder; give the JSON file's name")
    if Path(given).exists() and not Path(given).is_file():
        raise InputError(f"--json {given}: not a regular file (a device or a pipe); give the JSON file's name: "
                         "it is written as the numbers come and renamed into place")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise InputError(f"--json {given}: the folder {Path(given).parent} {what}")
    probe = temp_path_beside(path)  # tried, not predicted: read-only mounts, /proc
    try:
        probe.open("xb").close()
    except OSError as err:
        raise InputError(f"--json {given}: cannot write in {path.parent}: {err.strerror or err}") from None
    probe.unlink(missing_ok=True)
    return path


# `dit8 bench dit`'s input with the tiny model: a few seconds a forward on a CPU.
TINY_FRAMES, TINY_SIZE = 9, (256, 256)


def bench_settings(args: argparse.Namespace) -> BenchSettings:
    """`dit8 bench dit`'s settings: the real 480P, 81-frame input for I2V-14B, a small one for the tiny
    model (the CPU default), which at 480P would take minutes a forward on a CPU."""
    from .bench_dit import BenchSettings
    from .devices import resolve_device

    device = _device_or_default(args.device)
    resolve_device(device)  # an InputError naming it, before the config is chosen by its type
    settings = BenchSettings(scheme=args.scheme, attention=args.attention, layers=args.layers, steps=args.steps,
                             backend=args.backend, device=device, config=args.config, compare=args.compare,
                             repeat=args.repeat, cuda_graph=args.cuda_graph,
                             sequence_parallel=args.sequence_parallel)
    tiny = settings.config_name() == "tiny"
    frames = args.frames if args.frames is not None else TINY_FRAMES if tiny else settings.frames
    size = args.size if args.size is not None else TINY_SIZE if tiny else settings.size
    return dataclasses.replace(settings, frames=frames, size=size)


BACKEND_HELP = ("kernels to run: triton or cuda run every op that has that kernel, the others as auto does; "
                "auto: the kernels verified on this GPU generation, else the torch reference; torch: the "
                "reference only (default auto)")


def _device_or_default(device: str | None) -> str:
    """--device as given, else its default: cuda where torch sees a GPU, else cpu. Decided when a command
    runs, not when the parser is built, which would load torch for `--help` too."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The `dit8` argument parser: one sub-command per job, each running its `run` default."""
    parser = argparse.ArgumentParser(prog="dit8", description="Quantized inference runtime for Wan2.1 I2V.")
    parser.add_argument("--version", action="version", version=f"dit8 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a DiT checkpoint (file or folder)")
    info.add_argument("path", help="checkpoint file or folder")
    info.add_argument("--json", action="store_true", help="print the description as JSON on stdout, instead "
                      "of the text (a switch; bench dit's --json names a file)")
    add_quiet_argument(info)
    info.set_defaults(run=_run_info)

    convert = commands.add_parser("convert", help="convert a float checkpoint to packed fp8/int8 (or bf16)")
    add_convert_arguments(convert)
    convert.set_defaults(run=_run_convert)

    compare = commands.add_parser(
        "compare", help="end-to-end quantization error: a quantized DiT's output against its source's",
        description="The DiT output of QUANTIZED against that of REFERENCE (its high-precision source) on the "
        "same seeded random inputs, at each timestep of the distilled 4-step schedule: relative error and "
        "cosine similarity. The two load one after the other, so memory holds one model at a time.")
    compare.add_argument("reference", help="the high-precision checkpoint (file or folder)")
    compare.add_argument("quantized", help="its quantized version (file or folder)")
    compare.add_argument("--device", help="default cuda where available, else cpu")
    compare.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                         help="compute dtype (default bf16 on CUDA, fp32 on the CPU)")
    compare.add_argument("--frames", type=int, default=81, help="frames of the random input, 4k+1 (default 81)")
    compare.add_argument("--size", type=_parse_size,
                         help="WIDTHxHEIGHT of the random input in pixels (default 832x480)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    compare.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto", help=BACKEND_HELP)
    compare.add_argument("--attention", choices=PRECISIONS, default="bf16",
                         help="the quantized model's self-attention (the reference runs bf16; default bf16)")
    compare.add_argument("--json", action="store_true", help="print the result as JSON on stdout, instead of "
                         "the text (a switch; bench dit's --json names a file)")
    add_quiet_argument(compare)
    compare.set_defaults(run=_run_compare)

    _add_generate(commands.add_parser("generate", help="image + prompt -> mp4 with a model folder"))

    demo = commands.add_parser("demo", help="the whole pipeline on a tiny RANDOM model: writes a short mp4")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise (default 0)")
    demo.add_argument("--update", choices=UPDATE_RULES, default=DETERMINISTIC,
                      help="how each step moves to the next noise level (default deterministic)")
    demo.add_argument("--device", default="cpu", help="default cpu")
    demo.add_argument("--out", default="dit8-demo.mp4", type=_non_empty, help="output mp4 (default dit8-demo.mp4)")
    demo.add_argument("--frames-dir", type=_non_empty, help="also write every frame as a PNG into this folder")
    add_quiet_argument(demo)
    demo.set_defaults(run=_run_demo)

    bench = commands.add_parser("bench", help="benchmarks on random weights (no checkpoint needed)")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_bench_dit(benchmarks.add_parser(
        "dit", help="time the DiT forward and the 4-step loop on random I2V-14B weights built on the device; "
        "per-part time, peak memory, optional diffusers baseline"))
    return parser


QUIET_HELP = ("no progress bars or progress messages on stderr, which then carries only errors and warnings "
              "(the report on stdout is unchanged)")


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """`-q/--quiet`, which every command takes: a script or service running several of them passes it to
    each alike, also to those with nothing to silence (`info` and `demo` write only their report, on stdout)."""
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)


def _non_empty(text: str) -> str:
    # A usage error naming the flag: an empty path would mean the current folder (`--frames-dir "$UNSET"`
    # wrote the PNGs there), an empty --keep or --lora nothing at all.
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `convert` subcommand's arguments to `parser`."""
    parser.add_argument("src", metavar="SRC", help="float DiT checkpoint: file, shard folder or per-block folder")
    parser.add_argument("dst", metavar="DST", help="output .safetensors file (or folder with --per-block)")
    parser.add_argument("--scheme", choices=SCHEMES, default="fp8",
                        help="quantize the block linears to fp8 or int8, or only cast to bf16 (default fp8)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", type=_non_empty,
                        help="merge a LoRA before quantizing (repeatable; strength defaults to 1)")
    parser.add_argument("--keep", action="append", default=[], metavar="PATTERN", type=_non_empty,
                        help="leave matching block linears in bf16, e.g. 'blocks.0.*' (repeatable)")
    parser.add_argument("--per-block", action="store_true",
                        help="write block_N.safetensors + non_block.safetensors + an index into folder DST")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="do not write the per-layer quantization error report")
    add_quiet_argument(parser)


def _add_generate(generate: argparse.ArgumentParser) -> None:
    generate.add_argument("--model", required=True, type=_non_empty,
                          help="model folder (official Wan2.1-I2V-14B-480P or a LightX2V distilled release)")
    generate.add_argument("--image", required=True, type=_non_empty,
                          help="input image (PNG, JPEG, WebP, ...; of an animation, its first frame): the "
                          "video's first frame")
    generate.add_argument("--prompt", required=True, help="what the video shows: at most 511 T5 tokens (longer "
                          "is refused, not cut short)")
    generate.add_argument("--out", required=True, type=_non_empty, help="output .mp4 (H.264, yuv420p, 16 fps)")
    generate.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    generate.add_argument("--frames", type=int, default=81, help="4k+1 frames (default 81)")
    size = generate.add_mutually_exclusive_group()
    size.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT, multiples of 16 (default: the image's "
                      "aspect ratio at 480*832 pixels)")
    size.add_argument("--area", type=int, help="pixel area the size follows the image's aspect ratio at "
                      "(default 399360 = 480*832)")
    generate.add_argument("--steps", type=int, help="default 4 (distilled) or 40 (unipc)")
    generate.add_argument("--sampler", choices=SAMPLERS,
                          help="default: distilled for LightX2V's distilled models, unipc for the base model")
    generate.add_argument("--guidance", type=float, help="CFG scale; default 1 (distilled) or 5 (unipc)")
    generate.add_argument("--shift", type=float, help="sigma shift; default 5 (distilled) or 3 (unipc, 480P)")
    generate.add_argument("--negative-prompt", help="for CFG (default: Wan's own)")
    generate.add_argument("--update", choices=UPDATE_RULES, default=DETERMINISTIC,
                          help="the distilled sampler's step rule (default deterministic)")
    dit = generate.add_mutually_exclusive_group()
    dit.add_argument("--scheme", choices=SCHEMES,
                     help="which DiT of the folder: bf16 (float), fp8 or int8 (default: the first present)")
    dit.add_argument("--dit", type=_non_empty, help="a DiT file or folder to use instead of the folder's")
    kind = generate.add_mutually_exclusive_group()
    kind.add_argument("--distilled", dest="distilled", action="store_const", const=True,
                      help="the DiT is step/CFG-distilled: 4 steps, no CFG, shift 5 by default (default: "
                      "told from the folder and file names)")
    kind.add_argument("--base", dest="distilled", action="store_const", const=False,
                      help="the DiT is the undistilled base model: UniPC, 40 steps, CFG 5 by default")
    generate.add_argument("--attention", choices=PRECISIONS, default="bf16",
                          help="self-attention precision (default bf16)")
    generate.add_argument("--device",
                          help="where the model runs (default cuda when available, else cpu)")
    generate.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                          help="DiT and T5 compute dtype (default bf16 on CUDA, fp32 on CPU; T5 stays bf16 with fp16)")
    generate.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                          help=BACKEND_HELP)
    generate.add_argument("--offload-encoders", action="store_true",
                          help="keep T5 and CLIP off the GPU except while they encode")
    generate.add_argument("--vae-tile", type=int, help="decode in tiles of N latent pixels to save memory "
                          "(32: 4.2 GiB peak at 480P, 81 frames, instead of 9.0; 2.5x the decode time)")
    generate.add_argument("--frames-dir", type=_non_empty, help="also write every frame as a PNG into this folder")
    generate.add_argument("--sequence-parallel", action="store_true",
                          help="split the DiT over the processes of a launcher, one GPU each: torchrun "
                          "--nproc-per-node N -m dit8 generate ... --sequence-parallel")
    add_quiet_argument(generate)
    generate.set_defaults(run=_run_generate)


def _add_bench_dit(dit: argparse.ArgumentParser) -> None:
    dit.add_argument("--scheme", choices=SCHEMES, default="bf16",
                     help="block linear weights: fp8, int8, or bf16 for float weights in the compute dtype "
                     "(fp32 on a CPU) (default bf16)")
    dit.add_argument("--attention", choices=PRECISIONS, default="bf16",
                     help="self-attention precision (default bf16; 8-bit runs on the Triton kernels: --backend auto "
                          "on a GPU, --backend triton with TRITON_INTERPRET=1 on a CPU)")
    dit.add_argument("--frames", type=int, help=f"4k+1 video frames (default 81, 21 latent frames; {TINY_FRAMES} "
                     "with the tiny config)")
    dit.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT in pixels, multiples of 16, as for generate "
                     f"(default 832x480; {TINY_SIZE[0]}x{TINY_SIZE[1]} with the tiny config)")
    dit.add_argument("--layers", type=int, help="number of blocks (default: all, 40 for I2V-14B)")
    dit.add_argument("--steps", type=int, default=4, help="steps of the distilled loop (default 4; 0: no loop)")
    dit.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto", help=BACKEND_HELP)
    dit.add_argument("--compare", choices=("diffusers",), help="also time diffusers' WanTransformer3DModel "
                     "(SDPA, in the compute dtype: bf16 on CUDA) on the same weights; skipped with a message "
                     "when diffusers is missing")
    dit.add_argument("--device",
                     help="default cuda when available, else cpu")
    dit.add_argument("--config", choices=("i2v-14b", "tiny"),
                     help="model dimensions (default: i2v-14b on CUDA, tiny on CPU)")
    dit.add_argument("--repeat", type=int, default=3,
                     help="timed forwards after the warm-up, their median reported (default 3)")
    dit.add_argument("--cuda-graph", action="store_true",
                     help="also time the forward replayed from a CUDA graph (dit8.CapturedForward)")
    dit.add_argument("--json", metavar="OUT", type=_non_empty,
                     help="also write every number to the JSON file OUT, saved as each phase ends; the table "
                     "still goes to stdout (unlike the --json switch of info and compare, which prints JSON "
                     "there; '-' is refused)")
    dit.add_argument("--sequence-parallel", action="store_true",
                     help="split the model over the processes of a launcher, one GPU each: torchrun "
                     "--nproc-per-node N -m dit8 bench dit ... --sequence-parallel")
    add_quiet_argument(dit)
    dit.set_defaults(run=_run_bench_dit)


# The API's names of settings the commands take as flags: its messages name them as the user typed them.
_SETTING_FLAGS = {name: "--" + name.replace("_", "-") for name in
                  ("frames", "seed", "steps", "guidance", "shift", "size", "area", "sampler", "update", "vae_tile",
                   "layers", "repeat")}
_KEYWORD_FLAGS = {"backend": "--backend", "precision": "--attention", "update": "--update"}


def in_flag_words(message: str) -> str:
    """An error message of the API as the command line says it: a leading setting name (`frames must
    be ...`) as its flag, `backend='triton'`, `precision='int8'` or `update='renoise'` as `--backend
    triton`, `--attention int8`, `--update renoise`, and `force=True` as `--force`."""
    first, sep, rest = message.partition(" ")
    if first in _SETTING_FLAGS and sep:
        message = f"{_SETTING_FLAGS[first]} {rest}"
    message = re.sub(r"\bforce=True\b", "--force", message)
    keywords = "|".join(_KEYWORD_FLAGS)
    return re.sub(rf"\b({keywords})='(\w+)'", lambda m: f"{_KEYWORD_FLAGS[m.group(1)]} {m.group(2)}", message)


class Terminated(BaseException):
    """SIGTERM (a job scheduler, `timeout`, `docker stop`), raised where the command is, so that it
    unwinds as for Ctrl-C: a conversion removes its temporary output."""


def _stop_once(signum: int, frame: object) -> None:
    """SIGTERM raises Terminated, SIGINT KeyboardInterrupt. The first of either counts: another, of
    either kind, while the command unwinds would stop its clean-up part way (a conversion's work folder,
    up to a whole model, left behind), so both are ignored until the command ends (where this handler
    is the one installed; `main` puts the previous ones back)."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(stop) is _stop_once:
            signal.signal(stop, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _follower(args: argparse.Namespace) -> bool:
    """A process other than the first of a --sequence-parallel launch. (A RANK that is no number is the
    first's: its error, which every process has, is reported; '00' is rank 0, which writes the output.)"""
    rank = os.environ.get("RANK", "0")
    return bool(getattr(args, "sequence_parallel", False)) and re.fullmatch(r"[0-9]+", rank) is not None \
        and int(rank) != 0


def _every_process_refuses(err: InputError) -> bool:
    """Whether every process of a sequence-parallel launch raises `err` alike: the arguments' checks made
    before the group is joined, and the group's own (GroupInputError). Other refusals may be this
    process's alone (an image file missing on its node): it reports them itself."""
    dist = sys.modules.get("torch.distributed")
    joined = dist is not None and dist.is_available() and dist.is_initialized()
    from .parallel import GroupInputError

    return not joined or isinstance(err, GroupInputError)


def _rank_prefix(args: argparse.Namespace) -> str:
    return f"rank {os.environ.get('RANK')}: " if _follower(args) else ""


# What to try when a command runs out of GPU memory.
_MEMORY_HINTS = {
    "generate": "try an fp8 or int8 DiT (--scheme, or --dit FILE), --offload-encoders, --vae-tile, fewer --frames or "
                "a smaller --size",
    "demo": "try --device cpu",
    "bench": "try --scheme fp8 or int8 (bf16 weights of I2V-14B take 31 GiB), or fewer --layers",
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dit8` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Each line of the report reaches a redirected stdout as it is printed: Python buffers a file or
    # pipe in blocks, so a log of `dit8 generate > log 2>&1` had the report after every progress line of
    # stderr (the load's summary minutes late), and a killed process lost it. Restored on the way out.
    stdout = sys.stdout
    line_buffered = getattr(stdout, "line_buffering", None) is False and hasattr(stdout, "reconfigure")
    if line_buffered:
        stdout.reconfigure(line_buffering=True)
    # torch (and numpy under it), which every command runs on, is imported before the stop handlers go in:
    # a Ctrl-C or SIGTERM arriving inside numpy's import can be swallowed there, and with _stop_once
    # installed that would have left both signals ignored for the rest of the command, which then ran to
    # its end. Before them, the next Ctrl-C still stops it, and SIGTERM ends the process at once.
    try:
        import torch  # noqa: F401
    except KeyboardInterrupt:
        print("dit8: interrupted", file=sys.stderr)
        return 130
    handle_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)
    # Only Python's own Ctrl-C handler is replaced: not an ignored SIGINT (`nohup`, a background job)
    # nor an application's handler.
    handle_sigint = handle_sigterm and previous_int is signal.default_int_handler
    try:
        if handle_sigterm:
            signal.signal(signal.SIGTERM, _stop_once)
        if handle_sigint:
            signal.signal(signal.SIGINT, _stop_once)
        return args.run(args)
    except Terminated:
        print("dit8: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader of stdout left (`dit8 info ... | head`): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (Dit8Error, OSError, ValueError) as err:
        if _follower(args) and isinstance(err, InputError) and _every_process_refuses(err):
            return 1  # the first process reports it
        print(f"dit8: {_rank_prefix(args)}error: {in_flag_words(str(err))}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            print(f"dit8: {_rank_prefix(args)}error: out of GPU memory ({_first_line(err)}); "
                  f"{_MEMORY_HINTS.get(args.command, 'use a GPU with more memory')}", file=sys.stderr)
            return 1
        if not getattr(args, "sequence_parallel", False):
            raise
        # A collective failed: another process of the group stopped (its own message says why).
        print(f"dit8: {_rank_prefix(args)}error: the process group failed, another process may have stopped "
              f"({_first_line(err)})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dit8: interrupted", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # joined for --sequence-parallel
        if handle_sigterm:
            # (None: a handler installed from C, which Python cannot reinstate; the default then.)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if handle_sigint:
            signal.signal(signal.SIGINT, previous_int)
        if line_buffered:
            with contextlib.suppress(OSError, ValueError):  # (a closed or broken stdout: nothing to restore)
                stdout.reconfigure(line_buffering=False)


if __name__ == "__main__":  # python -m dit8.cli, as python -m dit8
    sys.exit(main())
