"""convert: a float Wan2.1 DiT checkpoint -> the dit8 packed format (fp8 / int8 / bf16), streaming.

One pass over the source, in file order: read a block of rows of one tensor, check it is finite, merge
LoRA deltas in fp32, quantize (block linears) or cast (everything else), append to the output file.
The output headers are written first (shapes and dtypes follow from the source header and the
scheme), so resident memory is one block plus small per-tensor state, whatever the model size.

Nothing appears at DST until everything succeeded: the output is built in a locked work folder beside
DST (`work_folder.py`), renamed into place at the end, and the folder removed in any case
(KeyboardInterrupt included). Without force nothing is replaced, even what appeared at DST meanwhile.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from dit8.config import WanConfig
from dit8.errors import CheckpointError
from dit8.layouts import block_linears, expected_shapes
import dit8.packed_format as fmt
from dit8.loader import COMFYUI_FP8, DIT8, FP8_UNSCALED, LIGHTX2V, UNSCALED, DitCheckpoint, check_finite, open_dit
from dit8.progress import Progress

from .lora import LoraArg, LoraSet, LoraSpec, parse_lora
from .quantize_weights import SCHEME_DTYPES, errors_from_sums, quantize_weight_measured
from .errors import ConvertError
from .safetensors_writer import SafetensorsWriter, TensorSpec, fsync_folder, write_json
from .work_folder import work_folder
from .in_order import InOrderWorker
from .source import DIGEST_PLACEHOLDER, SourceReader, SourceTensor

# Rows are processed in blocks of about this many elements: bounds the fp32/float64 temporaries of
# quantization and error measurement (~4 MiB elements -> at most ~32 MiB each) for any tensor size.
BLOCK_ELEMENTS = 4 << 20
OUT_DTYPES = {dtype: name for name, dtype in fmt.HIGH_PRECISION_DTYPES.items()}
SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
WORST_COUNT = 5


@dataclass(frozen=True)
class LayerError:
    """Quantization error of one layer's weight against the (LoRA-merged) source."""

    layer: str
    scheme: str
    shape: tuple[int, ...]
    rel_error: float
    sqnr_db: float

    def to_json(self) -> dict:
        """The layer's entry in the conversion report (shape as a list, an infinite SQNR as None)."""
        # JSON has no infinity: an exact layer (SQNR +inf) is written as null.
        return {"layer": self.layer, "scheme": self.scheme, "shape": list(self.shape),
                "rel_error": self.rel_error, "sqnr_db": self.sqnr_db if math.isfinite(self.sqnr_db) else None}


@dataclass
class ConvertResult:
    """What convert() wrote and measured."""

    output: Path  # the file, or the per-block folder
    files: list[Path]  # every tensor file written
    report: Path | None  # the quality report json, if written
    scheme: str
    source_bytes: int
    output_bytes: int
    seconds: float
    layers: list[LayerError] = field(default_factory=list)

    @property
    def mib_per_s(self) -> float:
        """Source bytes converted per second."""
        return self.source_bytes / (1 << 20) / max(self.seconds, 1e-9)

    @property
    def mean_rel_error(self) -> float | None:
        """Mean relative error of the quantized layers (None when nothing was quantized)."""
        return mean_rel_error(self.layers)

    @property
    def mean_sqnr_db(self) -> float | None:
        """Mean SQNR of the quantized layers in dB, over those with a finite one (None when none has)."""
        return mean_sqnr_db(self.layers)

    @property
    def worst(self) -> list[LayerError]:
        """The layers with the largest relative error, worst first."""
        return worst_layers(self.layers)


def mean_rel_error(layers: list[LayerError]) -> float | None:
    """The mean relative error of the quantized layers (None without any)."""
    return sum(e.rel_error for e in layers) / len(layers) if layers else None


def mean_sqnr_db(layers: list[LayerError]) -> float | None:
    """The mean SQNR of the layers whose SQNR is finite (an exact layer's is +inf)."""
    finite = [e.sqnr_db for e in layers if math.isfinite(e.sqnr_db)]
    return sum(finite) / len(finite) if finite else None


def worst_layers(layers: list[LayerError]) -> list[LayerError]:
    """The WORST_COUNT layers with the largest relative error, worst first."""
    return sorted(layers, key=lambda e: e.rel_error, reverse=True)[:WORST_COUNT]


@dataclass(frozen=True)
class _Plan:
    """What becomes of one source tensor: its output tensors, output file and quantization scheme."""

    source: SourceTensor
    group: str  # output file name
    outputs: tuple[TensorSpec, ...]
    scheme: str | None  # "fp8"/"int8" when quantized


# ---------------------------------------------------------------------------------------------- checks


def _check_options(scheme: str, out_dtype: torch.dtype, keep: Sequence[str]) -> None:
    if scheme not in fmt.SCHEMES:
        raise ConvertError(f"unknown scheme {scheme!r}; expected one of {fmt.SCHEMES}")
    if out_dtype not in OUT_DTYPES:
        raise ConvertError(f"out_dtype must be one of {tuple(OUT_DTYPES)}, got {out_dtype}")
    if scheme == "bf16" and out_dtype != torch.bfloat16:
        raise ConvertError(f"scheme 'bf16' stores every tensor in bf16; it conflicts with out_dtype {out_dtype}")
    for pattern in keep:
        if not isinstance(pattern, str) or not pattern:
            raise ConvertError(f"--keep patterns must be non-empty strings, got {pattern!r}")


def _report_path(dst: Path, per_block: bool) -> Path:
    """Where the quality report goes: inside a per-block folder, beside a single file."""
    return dst / fmt.REPORT_NAME if per_block else dst.with_name(f"{dst.name}.{fmt.REPORT_NAME}")


def _check_paths(src: Path, dst: Path, per_block: bool, force: bool, loras: Sequence[Path] = ()) -> None:
    if dst.name in ("", ".", ".."):
        raise ConvertError(f"{dst}: give the output's own name (a file, or with --per-block a folder)")
    if not per_block and dst.suffix != ".safetensors":
        raise ConvertError(f"{dst}: a single-file output must end in .safetensors (or use --per-block for a folder)")
    report = _report_path(dst, per_block=False)
    # The LoRA files are read to the end too: even with force, an output replacing one would destroy an
    # input. So would the report beside the output, which force replaces (or removes, for a per-block one).
    for what, path in [("source", src), *(("LoRA", lora) for lora in loras)]:
        s = path.resolve()
        for out, name in ((dst, "output"), (report, "report beside the output")):
            o = out.resolve()
            if s == o or s in o.parents or o in s.parents:
                raise ConvertError(f"{out}: the {name} must not be, contain or lie inside the {what} {path}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise ConvertError(f"{dst}: already exists; pass force=True to replace it")
    _check_replaceable(dst)
    if (report.exists() or report.is_symlink()) and not force:
        # Written or removed (a per-block output has its report inside) beside the output: somebody's file
        # all the same.
        raise ConvertError(f"{report}: already exists; pass force=True to replace it")
    _check_report_replaceable(report)
    if not dst.parent.is_dir():
        what = "is a file, not a folder" if dst.parent.exists() else "does not exist"
        raise ConvertError(f"{dst.parent}: the output folder {what}")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise ConvertError(f"{dst.parent}: the output folder is not writable")


def _check_replaceable(dst: Path) -> None:
    """--force replaces a file, or a folder holding nothing but a per-block output's files."""
    if dst.is_dir() and not dst.is_symlink():
        foreign = sorted(p.name for p in dst.iterdir() if not _is_per_block_file(p))
        if foreign:
            raise ConvertError(f"{dst}: a folder holding more than a dit8 per-block output (e.g. {foreign[0]}); "
                               f"--force replaces only such outputs, so remove it yourself or choose another name")


def _check_report_replaceable(report: Path) -> None:
    """--force replaces a report file beside the output, never a folder of that name."""
    if report.is_dir() and not report.is_symlink():
        raise ConvertError(f"{report}: a folder where the output's report goes; --force replaces only a report "
                           f"file, so remove it yourself or choose another name")


def _is_per_block_file(path: Path) -> bool:
    """Whether `path` is one of the files a per-block output holds (what --force may delete with it)."""
    name = path.name
    return path.is_file() and (name in (fmt.NON_BLOCK_NAME, fmt.INDEX_NAME, fmt.REPORT_NAME)
                               or (name.startswith("block_") and name.endswith(".safetensors")
                                   and name[len("block_"):-len(".safetensors")].isdigit()))


# How each 8-bit format open_dit recognises is called in convert's refusal of it.
_QUANTIZED_FORMATS = {DIT8: "a dit8 packed file", LIGHTX2V: "LightX2V's 8-bit format",
                      COMFYUI_FP8: "ComfyUI's scaled fp8 format", FP8_UNSCALED: "an fp8 cast without scales"}
_FLOAT_SOURCES = "convert reads float checkpoints (fp32/bf16/fp16/fp64)"


def _check_float_source(dit: DitCheckpoint) -> None:
    """convert reads float checkpoints: an 8-bit file is refused with its format named, and the readers that
    take it as it is (requantizing 8-bit codes, or dequantizing them, would add their error to the new one)."""
    if dit.quantized:
        module = next(iter(dit.quantized))
        info = dit.info(module + ".weight")
        dtype = str(info.dtype).removeprefix("torch.")
        scaled = "" if dit.quantized[module] == UNSCALED else " with a scale"
        raise CheckpointError(f"{dit.path}: already quantized ({_QUANTIZED_FORMATS[dit.format]}: "
                              f"{dit.names[module + '.weight']!r} is {dtype}{scaled}); {_FLOAT_SOURCES}, so "
                              f"convert the float release instead. load_dit and `dit8 generate --dit` read it as "
                              f"it is")
    for file_key in dit.names.values():
        info = dit.checkpoint.infos[file_key]
        if info.dtype not in SOURCE_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {file_key!r} is {str(info.dtype).removeprefix('torch.')}; "
                                  f"{_FLOAT_SOURCES}")


# ---------------------------------------------------------------------------------------------- plan


def _quantized_layers(config: WanConfig, scheme: str, keep: Sequence[str]) -> set[str]:
    """Block linears (module names) to quantize: all of them but those matching a keep pattern."""
    if scheme not in fmt.QUANT_SCHEMES:
        if keep:
            raise ConvertError(f"--keep leaves layers out of the quantization; scheme {scheme!r} quantizes none")
        return set()
    linears = [f"blocks.{n}.{name}" for n in range(config.num_layers) for name in block_linears(config)]
    for pattern in keep:
        if not any(fnmatch.fnmatchcase(layer, pattern) for layer in linears):
            raise ConvertError(f"--keep pattern {pattern!r} matches no quantizable layer (e.g. "
                               f"{linears[0]!r}; patterns match layer names without '.weight')")
    quantized = {layer for layer in linears if not any(fnmatch.fnmatchcase(layer, p) for p in keep)}
    if not quantized:
        raise ConvertError(f"--keep {' '.join(keep)} keeps every block linear, so nothing would be {scheme}: "
                           f"use --scheme bf16 for a checkpoint without 8-bit layers")
    return quantized


def _group_of(official: str, per_block: bool, single_name: str) -> str:
    if not per_block:
        return single_name
    parts = official.split(".")
    return fmt.block_file_name(int(parts[1])) if parts[0] == "blocks" else fmt.NON_BLOCK_NAME


def _plan(reader: SourceReader, quantized: set[str], scheme: str, out_dtype: torch.dtype,
          per_block: bool, single_name: str) -> list[_Plan]:
    plans = []
    for t in reader.tensors:
        layer = t.official.removesuffix(".weight")
        group = _group_of(t.official, per_block, single_name)
        if t.official.endswith(".weight") and layer in quantized:
            out, _ = t.info.shape
            outputs = (TensorSpec(t.official, t.info.shape, SCHEME_DTYPES[scheme]),
                       TensorSpec(layer + fmt.WEIGHT_SCALE_SUFFIX, (out, 1), torch.float32))
            plans.append(_Plan(t, group, outputs, scheme))
        else:
            plans.append(_Plan(t, group, (TensorSpec(t.official, t.info.shape, out_dtype),), None))
    return plans


def _schemes_map(config: WanConfig, quantized: set[str], scheme: str, hp: str) -> dict[str, str]:
    """`dit8.schemes`: one `blocks.*.<linear>` entry where every block agrees, per-layer entries
    where --keep made them differ, and "*" (everything else) last."""
    schemes: dict[str, str] = {}
    groups: dict[str, str] = {}
    for name in block_linears(config):
        layers = [f"blocks.{n}.{name}" for n in range(config.num_layers)]
        hits = [layer for layer in layers if layer in quantized]
        if hits and len(hits) == len(layers):
            groups[f"blocks.*.{name}"] = scheme
        else:
            schemes.update(dict.fromkeys(hits, scheme))
    return {**schemes, **groups, "*": hp}


def _metadata(dit: DitCheckpoint, scheme: str, hp: str, quantized: set[str], keep: Sequence[str],
              lora: LoraSet) -> dict[str, str]:
    from dit8 import __version__

    return {
        fmt.KEY_FORMAT: fmt.FORMAT_NAME,
        fmt.KEY_FORMAT_VERSION: str(fmt.FORMAT_VERSION),
        fmt.KEY_CONFIG: json.dumps(dit.config.to_dict()),
        fmt.KEY_SCHEME: scheme,
        fmt.KEY_DTYPE: hp,
        fmt.KEY_SCHEMES: json.dumps(_schemes_map(dit.config, quantized, scheme, hp)),
        fmt.KEY_KEPT: json.dumps(list(keep)),
        fmt.KEY_LORA: json.dumps(lora.describe()),
        fmt.KEY_SOURCE_LAYOUT: dit.layout,
        fmt.KEY_SOURCE_DIGEST: DIGEST_PLACEHOLDER,  # replaced once every source byte has been read
        fmt.KEY_TOOL_VERSION: __version__,
    }


# ---------------------------------------------------------------------------------------------- work


def _require_finite(summary: torch.Tensor, block: torch.Tensor, t: SourceTensor, merged: list[str],
                    stored: torch.dtype | None = None) -> None:
    """Raise if the values written hold NaN/Inf, given `summary`, a NaN-propagating reduction of them
    (amax, scales); `merged`: the LoRA files whose deltas were added; `stored`: the dtype they were cast
    to, if any.

    torch.isfinite over every element costs 3x a row amax, and quantizing computes one anyway; the full
    check runs only to word the error."""
    if bool(torch.isfinite(summary).all()):
        return
    check_finite(block, t.file_key, t.info.file)  # raises if the source itself is not finite
    causes = [f"merging the LoRA {', '.join(merged)}"] if merged else []
    if stored is not None:
        causes.append(f"the cast to {stored} (largest finite value {torch.finfo(stored).max:.4g})")
    raise CheckpointError(f"{t.info.file}: tensor {t.file_key!r} is finite in the file but not after "
                          + (" and ".join(causes) or "its conversion"))


def _convert_tensor(plan: _Plan, reader: SourceReader, lora: LoraSet, writer: SafetensorsWriter,
                    writes: InOrderWorker, progress: Progress) -> LayerError | None:
    """Stream one source tensor into `writer` (through `writes`); returns its quantization error if it
    was quantized."""
    t = plan.source
    row_elems = max(1, math.prod(t.info.shape[1:]))
    max_bytes = max(1, BLOCK_ELEMENTS // row_elems) * row_elems * t.info.dtype.itemsize
    merged = [str(d.file.spec.path) for d in lora.deltas.get(t.official, ())]
    scales, signal, noise, start = [], 0.0, 0.0, 0
    for block in reader.blocks(t, max_bytes):
        rows = lora.merge_rows(t.official, block.float(), start) if merged else block
        start += block.shape[0] if block.dim() else 1
        if plan.scheme is None:
            rows = rows.to(plan.outputs[0].dtype)  # checked after the cast: fp16 overflows past 65504
            _require_finite(torch.stack(torch.aminmax(rows)), block, t, merged, rows.dtype)  # NaN-propagating
            writes.submit(writer.write_rows, plan.outputs[0].key, rows)
        else:
            q, scale, (s, n) = quantize_weight_measured(rows, plan.scheme)
            # A finite scale iff the whole row is; float64 sources may pass float32's range in the cast.
            _require_finite(scale, block, t, merged, torch.float32 if block.dtype == torch.float64 else None)
            writes.submit(writer.write_rows, plan.outputs[0].key, q)
            scales.append(scale)
            signal, noise = signal + s, noise + n
        progress.update(block.nbytes)
    if plan.scheme is None:
        return None
    writes.submit(writer.write, plan.outputs[1].key, torch.cat(scales))
    rel, sqnr = errors_from_sums(signal, noise)
    return LayerError(t.official.removesuffix(".weight"), plan.scheme, t.info.shape, rel, sqnr)


def _report(src: Path, dst: Path, scheme: str, layers: list[LayerError]) -> dict:
    # Absolute: the report is read later, from wherever its reader stands.
    return {"source": str(src.absolute()), "output": str(dst.absolute()), "scheme": scheme,
            "layers": [e.to_json() for e in layers], "mean_rel_error": mean_rel_error(layers),
            "mean_sqnr_db": mean_sqnr_db(layers), "worst": [e.to_json() for e in worst_layers(layers)]}


def _install(built: Path, dst: Path, beside: Path | None, *, force: bool, work: Path) -> None:
    """Move `built` to `dst`, with the report `beside` (None for no report) to `dst`'s report path.

    Without `force` nothing is replaced: DST and its report were absent when the conversion started,
    and whatever appeared there since is somebody else's. With `force`, a file onto a file is one
    atomic rename; a folder is moved aside into `work` first. A report describes the model file next to
    it, so the old report is moved aside before the model is replaced and the new one put in place
    after: an interruption in between leaves no report rather than a stale one, and a failed install
    puts the old report back."""
    report = _report_path(dst, per_block=False)
    if not force:
        for moved, target in ((built, dst), (beside, report)):
            if moved is None:
                continue
            try:
                _move_without_replacing(moved, target)
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
                model = "" if target == dst else f"; the model is at {dst}, without its report"
                raise ConvertError(f"{target}: appeared while converting and was left as it is{model}; pass "
                                   f"force=True to replace it") from None
        fsync_folder(dst.parent)
        return
    _check_replaceable(dst)  # again: they may have changed during the conversion
    _check_report_replaceable(report)
    old_report = work / "old_report" if report.exists() or report.is_symlink() else None
    if old_report is not None:
        os.replace(report, old_report)
    try:
        if not (dst.exists() or dst.is_symlink()) or (built.is_file() and dst.is_file() and not dst.is_symlink()):
            os.replace(built, dst)
        else:
            # os.replace cannot put anything onto a non-empty folder: move the old one aside first.
            trash = work / "old"
            os.replace(dst, trash)
            try:
                os.replace(built, dst)
            except BaseException:
                os.replace(trash, dst)
                raise
    except BaseException:
        if old_report is not None:
            os.replace(old_report, report)
        raise
    if beside is not None:
        os.replace(beside, report)
    fsync_folder(dst.parent)


def _move_without_replacing(path: Path, dst: Path) -> None:
    """Rename `path` to `dst` unless something is there (OSError EEXIST, ENOTEMPTY or ENOTDIR)."""
    if path.is_dir():
        os.rename(path, dst)  # fails onto a file or a non-empty folder; an empty folder loses nothing
        return
    try:
        os.link(path, dst)  # fails when dst exists, with no moment between a check and the move
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(path, dst)
        return
    path.unlink()


# Conversions running now (in this process's threads) and torch's thread count before the first of them.
_converting = {"count": 0, "threads": 0}
_converting_lock = threading.Lock()


@contextmanager
def _threads_beside_helpers() -> Iterator[None]:
    """torch's intra-op threads one fewer for the duration (at least one), then as they were.

    The source is hashed and the output written on two helper threads (InOrderWorker) beside the
    quantization. With torch's default of one thread per core they compete for the cores, and each
    quantization op, split over every core, waits for its slowest part: on 2 cores each op took
    ~8 ms per 4 M elements with 2 threads and 2-4 ms with 1. The count is process-wide: conversions
    that overlap (in several threads) lower it once, and the last to end puts it back."""
    with _converting_lock:
        if _converting["count"] == 0:
            _converting["threads"] = torch.get_num_threads()
            torch.set_num_threads(max(1, _converting["threads"] - 1))
        _converting["count"] += 1
    try:
        yield
    finally:
        with _converting_lock:
            _converting["count"] -= 1
            if _converting["count"] == 0:
                torch.set_num_threads(_converting["threads"])


# ---------------------------------------------------------------------------------------------- API


def convert(src: str | Path, dst: str | Path, *, scheme: str = "fp8",
            lora: str | Path | LoraSpec | Iterable[LoraArg] | None = None, keep: Sequence[str] = (),
            per_block: bool = False, force: bool = False, out_dtype: torch.dtype = torch.bfloat16,
            report: bool = True, progress: bool | None = None) -> ConvertResult:
    """Convert the float DiT checkpoint `src` to the dit8 packed format at `dst`.

    src: any float checkpoint dit8.open_dit reads (file, shards, per-block folder, .pth; any layout); an
        8-bit one (dit8 packed, LightX2V, ComfyUI scaled fp8, an fp8 cast) is refused, naming its format.
    dst: a `.safetensors` file, or with per_block=True a folder of `block_N.safetensors`,
        `non_block.safetensors` and `model.safetensors.index.json`; neither `src` nor a LoRA file, nor
        inside or around one (ConvertError, even with force).
    scheme: "fp8" or "int8" quantizes the block linears (weights [out, in] + `weight_scale` [out, 1]
        fp32); "bf16" only casts.
    lora: LoRA files, each "path[:strength]" (a str), a Path (strength 1), (path, strength) or a LoraSpec
        (or one of them alone but the pair), merged in fp32 before quantizing.
    keep: fnmatch patterns of block linears left in high precision, e.g. "blocks.0.*".
    out_dtype: dtype of every tensor that is not quantized.
    report: write the per-layer quality report json (`<dst>.quant_report.json`, or `quant_report.json`
        in a per-block folder) when anything is quantized.
    progress: draw a progress bar (default: when stderr is a terminal).

    torch runs on one intra-op thread fewer while converting (the source is hashed and the output
    written on two helper threads beside it); the count is put back on return (by the last to return,
    where conversions in several threads overlap).

    Raises CheckpointError (bad source or LoRA, naming file and key) or ConvertError (bad request);
    in either case, and on any other error, nothing is left at or beside `dst`.
    """
    # A string is truthy: force="no" replaced dst, per_block="no" wrote a folder.
    for name, switch in (("per_block", per_block), ("force", force), ("report", report)):
        if not isinstance(switch, bool):
            raise ConvertError(f"{name} must be True or False, got {switch!r}")
    if progress is not None and not isinstance(progress, bool):
        raise ConvertError(f"progress must be True, False or None, got {progress!r}")
    # Other types failed in Path() or list() with a TypeError naming no argument (and lora=0 was no LoRA).
    for name, path in (("src", src), ("dst", dst)):
        if not isinstance(path, (str, os.PathLike)):
            raise ConvertError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
        if str(path) == "":  # Path("") is the current folder: a mistake, not a request for it
            raise ConvertError(f"{name}: the path is empty")
    src, dst = Path(src), Path(dst)
    if not isinstance(keep, (str, Iterable)) or isinstance(keep, (bytes, bytearray)):
        raise ConvertError(f"keep must be an fnmatch pattern (str) or a sequence of them, got {type(keep).__name__}")
    keep = [keep] if isinstance(keep, str) else list(keep)  # one pattern, not its characters
    if isinstance(lora, (str, os.PathLike, LoraSpec)):  # one LoRA (a tuple is a sequence of them)
        lora = [lora]
    elif lora is not None and (not isinstance(lora, Iterable) or isinstance(lora, (bytes, bytearray))):
        raise ConvertError(f"lora must be a LoRA (a path, \"path:strength\" or a LoraSpec) or a sequence of "
                           f"LoRAs, got {type(lora).__name__}")
    _check_options(scheme, out_dtype, keep)
    loras = [parse_lora(arg) for arg in lora or ()]
    try:
        _check_paths(src, dst, per_block, force, [spec.path for spec in loras])
    except OSError as err:  # a name too long for the file system, a folder that cannot be listed
        raise ConvertError(f"{err.filename or dst}: {err.strerror or err}") from None
    started = time.monotonic()
    dit = open_dit(src)  # validates names, shapes, config and the packed-format version
    try:
        _check_float_source(dit)
    except BaseException:
        dit.checkpoint.close()  # (a .pth source holds its tensors until then)
        raise
    with (SourceReader(dit) as reader, LoraSet(loras, expected_shapes(dit.config)) as lora_set,
          _threads_beside_helpers()):
        quantized = _quantized_layers(dit.config, scheme, keep)
        hp = OUT_DTYPES[out_dtype]
        metadata = _metadata(dit, scheme, hp, quantized, keep, lora_set)
        # Everything is built in a work folder beside dst and moved into place at the very end.
        build_name = "model" if per_block else "model.safetensors"
        plans = _plan(reader, quantized, scheme, out_dtype, per_block, build_name)
        try:
            with work_folder(dst) as work:
                build = work / build_name
                if per_block:
                    os.mkdir(build, 0o777)  # 0o777 & ~umask, like any folder the user makes
                layers = _write_all(plans, build if per_block else work, metadata, reader, lora_set, progress)
                report_obj = _report(src, dst, scheme, layers) if report and quantized else None
                if per_block:
                    _write_index(build, plans, metadata)
                report_path = _report_path(dst, per_block)
                report_temp = None
                if report_obj is not None:
                    report_temp = build / fmt.REPORT_NAME if per_block else work / "report.json"
                    write_json(report_temp, report_obj)
                _install(build, dst, beside=None if per_block else report_temp, force=force, work=work)
        except OSError as err:  # the disk filled, a file size limit, the folder went away
            raise ConvertError(f"{dst}: cannot write the output ({err.strerror or err}); nothing was "
                               f"left behind") from err
    final = sorted({dst / plan.group for plan in plans}) if per_block else [dst]
    return ConvertResult(dst, final, report_path if report_obj is not None else None, scheme, reader.total_bytes,
                         sum(f.stat().st_size for f in final), time.monotonic() - started, layers)


def _write_all(plans: list[_Plan], folder: Path, metadata: dict[str, str], reader: SourceReader,
               lora: LoraSet, progress: bool | None) -> list[LayerError]:
    """Write every output file into `folder` (names: the plans' groups); returns the per-layer errors.
    All writers are open together (a source file may interleave blocks); all are discarded on error."""
    specs: dict[str, list[TensorSpec]] = {}
    for plan in plans:
        specs.setdefault(plan.group, []).extend(plan.outputs)
    writers: dict[str, SafetensorsWriter] = {}
    try:
        for group, group_specs in specs.items():
            writers[group] = SafetensorsWriter(folder / group, group_specs, metadata)
        layers: list[LayerError] = []
        with Progress(reader.total_bytes, "converting", enabled=progress) as bar, InOrderWorker("write") as writes:
            for plan in plans:
                error = _convert_tensor(plan, reader, lora, writers[plan.group], writes, bar)
                if error is not None:
                    layers.append(error)
        # The digest needs every source byte, so it lands in the headers last (same length as the placeholder).
        metadata[fmt.KEY_SOURCE_DIGEST] = reader.digest()
        for writer in writers.values():
            writer.update_metadata(fmt.KEY_SOURCE_DIGEST, metadata[fmt.KEY_SOURCE_DIGEST])
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        for group in writers:
            (folder / group).unlink(missing_ok=True)  # closed ones were renamed into place
        raise
    return layers


def _write_index(folder: Path, plans: list[_Plan], metadata: dict[str, str]) -> None:
    """The per-block index: every file's metadata plus total_size (the tensors' bytes, as in Hugging Face's
    sharded checkpoints), and key -> file."""
    weight_map = {spec.key: plan.group for plan in plans for spec in plan.outputs}
    total = sum(spec.nbytes for plan in plans for spec in plan.outputs)
    write_json(folder / fmt.INDEX_NAME, {"metadata": {**metadata, "total_size": total}, "weight_map": weight_map})
