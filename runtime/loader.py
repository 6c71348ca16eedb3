"""load_dit: checkpoint on disk -> WanDiT, validating every tensor name, shape and value."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo, as_path, open_checkpoint
from .config import (UNSHAPED_FIELDS, WAN_HEAD_DIM, WanConfig, check_against_config_json, config_json_values,
                     read_config_json)
from .devices import resolve_device
from .errors import CheckpointError, InputError, releases_frames
from .layouts import block_linears, detect_layout, expected_shapes, from_official, layout_evidence, to_official
from .model import WanDiT
from .packed_format import (FORMAT_NAME, HIGH_PRECISION_DTYPES, KEY_CONFIG, KEY_DTYPE, KEY_SCHEME, KEY_SCHEMES,
                            METADATA_KEYS, SCHEME_DTYPES, SCHEMES, WEIGHT_SCALE_SUFFIX, check_format_version,
                            scheme_of)
from .parallel import SequenceParallel
from .progress import Progress


# Quantized weight dtypes and the scale tensors that accompany them.
QUANT_DTYPES = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}
CHANNEL_SCALE = WEIGHT_SCALE_SUFFIX  # LightX2V and dit8: [out, 1] (or [out]) per output channel
TENSOR_SCALE = ".scale_weight"   # ComfyUI scaled fp8: one scale per tensor
UNSCALED = ""  # fp8 weights cast without scales (ComfyUI's and others' fp8_e4m3fn files): a scale of 1
WAN21_LATENT_CHANNELS = 16  # what every Wan2.1 DiT predicts (out_dim): the channels of Wan2.1's VAE latents
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor; carries no weights
# ComfyUI's static activation scale beside a `.scale_weight`, for its own fp8 matmul. Activations here are
# quantized per token on every call, so it is passed over (but for a check of its dtype and size).
INPUT_SCALE = ".scale_input"

FLOAT, DIT8, LIGHTX2V, COMFYUI_FP8, FP8_UNSCALED = ("float", "dit8 packed", "lightx2v", "comfyui scaled-fp8",
                                                   "unscaled fp8")


@dataclass
class DitCheckpoint:
    """An opened, validated DiT checkpoint: its files, layout, format, configuration and key names."""

    checkpoint: Checkpoint
    layout: str
    config: WanConfig
    names: dict[str, str]  # official key -> key in the file
    format: str = FLOAT
    quantized: dict[str, str] = field(default_factory=dict)  # module -> scale key suffix

    @property
    def path(self) -> Path:
        """The checkpoint's file or folder, as given."""
        return self.checkpoint.path

    def file_of(self, official_key: str) -> Path:
        """The file that holds official tensor `official_key`."""
        return self.info(official_key).file

    def info(self, official_key: str) -> TensorInfo:
        """Dtype, shape and file of official tensor `official_key`, read from the header."""
        return self.checkpoint.infos[self.names[official_key]]

    def runtime_quantized(self) -> dict[str, torch.dtype]:
        """The quantized modules the model runs as W8A8 (block linears); others are dequantized on load."""
        linears = block_linears(self.config)
        return {module: self.info(module + ".weight").dtype for module in self.quantized
                if module.startswith("blocks.") and module.split(".", 2)[2] in linears}


# The tensors whose shapes give the model's dimensions (_infer_config reads only these), with their ranks.
DIMENSION_SOURCES = {"patch_embedding.weight": 5, "blocks.0.ffn.0.weight": 2, "head.head.weight": 2,
                     "time_embedding.0.weight": 2, "text_embedding.0.weight": 2, "img_emb.proj.0.weight": 1}


# The depth of the published Wan2.1 DiTs, by (dim, ffn_dim) (spec/wan21-dit.md). Without a config stating
# num_layers, a checkpoint of their width with fewer blocks has lost its last ones: a per-block folder
# missing its last file shows no gap in the block numbers.
PUBLISHED_DEPTHS = {(5120, 13824): 40, (1536, 8960): 30}
# A block number as the official names write it: decimal without leading zeros, of a sane length (int() of an
# arbitrary run of digits may fail: "²" is a digit, 5000 digits exceed Python's limit). Any other is no block's.
_BLOCK_NUMBER = re.compile(r"blocks\.(0|[1-9][0-9]{0,8})\.")


_DIT_BLOCK_KEY = re.compile(r"blocks\.\d+\.(self_attn|cross_attn|modulation)\b")


def _block_number(official: str) -> int | None:
    """The block an official key is of (`blocks.N.`), or None."""
    match = _BLOCK_NUMBER.match(official)
    return None if match is None else int(match[1])


def _check_block_numbers(ckpt: Checkpoint, names: dict[str, str]) -> None:
    """Blocks are numbered from 0 without a gap. Checked before the expected tensor set is built from the
    highest number: a stray key of a far block (blocks.99999999.x) would make it, and its check, that long."""
    last: dict[int, str] = {}  # block -> a key of it
    for official, file_key in names.items():
        block = _block_number(official)
        if block is not None:
            last.setdefault(block, file_key)
    if not last:
        return
    gap = next(n for n in range(len(last) + 1) if n not in last)
    top = max(last)
    if gap < top:
        raise CheckpointError(f"{ckpt.path}: block {gap} has no tensors, but {last[top]!r} (in "
                              f"{ckpt.infos[last[top]].file.name}) is of block {top}: blocks are numbered from 0 "
                              f"without gaps")


def _infer_config(shapes: dict[str, tuple[int, ...]], source: Path, layout: str,
                  num_heads: int | None, heads_source: Path | None = None) -> WanConfig:
    """Every dimension from tensor shapes; the head count, which no shape shows, is `num_heads` as a
    config (`heads_source`) states it, or else Wan's 128-wide heads."""

    def shape(key: str) -> tuple[int, ...]:
        ndim = DIMENSION_SOURCES[key]
        if key not in shapes:
            raise CheckpointError(f"{source}: missing tensor {from_official(key, layout)!r}")
        if len(shapes[key]) != ndim:
            raise CheckpointError(f"{source}: tensor {from_official(key, layout)!r} has shape {shapes[key]}, "
                                  f"expected {ndim} dimensions")
        if 0 in shapes[key]:
            raise CheckpointError(f"{source}: tensor {from_official(key, layout)!r} has shape {shapes[key]}, "
                                  f"with a dimension of size 0")
        return shapes[key]

    dim, in_dim, *patch = shape("patch_embedding.weight")
    blocks = {n for n in map(_block_number, shapes) if n is not None}
    if not blocks:
        raise CheckpointError(f"{source}: no transformer blocks found")
    clip = shape("img_emb.proj.0.weight") if "img_emb.proj.0.weight" in shapes else None  # T2V has none
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise CheckpointError(f"{source}: dim {dim} is not a multiple of {WAN_HEAD_DIM}, so the head count "
                                  f"is unknown; put a config.json with num_heads beside the weights")
        num_heads = dim // WAN_HEAD_DIM
    try:
        return WanConfig(
            dim=dim, in_dim=in_dim, patch_size=tuple(patch),
            ffn_dim=shape("blocks.0.ffn.0.weight")[0],
            num_layers=max(blocks) + 1,
            out_dim=shape("head.head.weight")[0] // math.prod(patch),
            freq_dim=shape("time_embedding.0.weight")[1],
            text_dim=shape("text_embedding.0.weight")[1],
            clip_dim=None if clip is None else clip[0],
            num_heads=num_heads,
        )
    except ValueError as err:
        stated = f" (num_heads {num_heads!r} from {heads_source})" if heads_source is not None else ""
        raise CheckpointError(f"{source}: {err}{stated}") from None


def _find_quantized(ckpt: Checkpoint, names: dict[str, str], config: WanConfig, *,
                    casts: bool = True) -> dict[str, str]:
    """Modules whose weight is 8-bit, each with the suffix of its scale tensor (UNSCALED: none).
    casts: whether fp8 tensors without any scale may be a plain cast (not in a format that has scales)."""
    quantized: dict[str, str] = {}
    for official, file_key in names.items():
        for suffix in (CHANNEL_SCALE, TENSOR_SCALE):
            if official.endswith(suffix):
                module = official[: -len(suffix)]
                if module in quantized:
                    raise CheckpointError(f"{ckpt.infos[file_key].file}: {module!r} has both "
                                          f"{CHANNEL_SCALE} and {TENSOR_SCALE}")
                weight = names.get(module + ".weight")
                if weight is None or ckpt.infos[weight].dtype not in QUANT_DTYPES:
                    raise CheckpointError(f"{ckpt.infos[file_key].file}: scale {file_key!r} belongs to no "
                                          f"8-bit weight")
                scale_dtype = ckpt.infos[file_key].dtype
                if not scale_dtype.is_floating_point or scale_dtype.itemsize < 2:
                    # (An 8-bit scale would otherwise be taken for a weight that lacks its own scale.)
                    raise CheckpointError(f"{ckpt.infos[file_key].file}: scale {file_key!r} has dtype {scale_dtype}, "
                                          f"expected a float of 16 bits or more")
                quantized[module] = suffix
    unscaled = {official: file_key for official, file_key in names.items()
                if ckpt.infos[file_key].dtype in QUANT_DTYPES and official.removesuffix(".weight") not in quantized}
    if (casts and unscaled and not quantized
            and all(ckpt.infos[k].dtype == torch.float8_e4m3fn for k in unscaled.values())):
        # fp8 tensors and no scale at all: a plain cast to e4m3, whose values are the weights. Its block
        # linears run as FP8 GEMMs with a scale of 1; its other fp8 tensors are read as the floats they are.
        linears = {f"blocks.{n}.{name}.weight" for n in range(config.num_layers) for name in block_linears(config)}
        return {official.removesuffix(".weight"): UNSCALED for official in unscaled if official in linears}
    if unscaled:  # beside scales of other tensors, or int8 (whose codes mean nothing without a scale)
        # Named: an int8 tensor where there is one (among fp8 ones without scales, it is the one at fault).
        official, file_key = min(unscaled.items(), key=lambda item: ckpt.infos[item[1]].dtype != torch.int8)
        raise CheckpointError(f"{ckpt.infos[file_key].file}: 8-bit tensor {file_key!r} has no scale "
                              f"({official.removesuffix('.weight')}{CHANNEL_SCALE} or {TENSOR_SCALE})")
    return quantized


def _check_tensor_set(ckpt: Checkpoint, names: dict[str, str], config: WanConfig, layout: str,
                      quantized: dict[str, str]) -> None:
    expected: dict[str, tuple[tuple[int, ...], ...]] = {k: (s,) for k, s in expected_shapes(config).items()}
    for module, suffix in quantized.items():
        if suffix == UNSCALED:
            continue
        out = expected.get(module + ".weight", ((0,),))[0][0]
        expected[module + suffix] = ((out, 1), (out,)) if suffix == CHANNEL_SCALE else ((), (1,))
    for official, file_key in names.items():
        info = ckpt.infos[file_key]
        if official not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {file_key!r} for the {config.variant} model "
                                  f"of {config.num_layers} blocks")
        if info.shape not in expected[official]:
            # The expected shape comes from the tensors the dimensions were read from: one of those may be
            # the one at fault.
            sources = ", ".join(repr(from_official(k, layout)) for k in DIMENSION_SOURCES if k in names)
            raise CheckpointError(f"{info.file}: tensor {file_key!r} has shape {info.shape}, "
                                  f"expected {' or '.join(map(str, expected[official]))} (by the dimensions "
                                  f"read from {sources})")
        if not info.dtype.is_floating_point and info.dtype not in QUANT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {file_key!r} has dtype {info.dtype}, expected a float")
    missing = [from_official(k, layout) for k in expected if k not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: missing tensor {missing[0]!r}{more}")


def _stated_configs(ckpt: Checkpoint) -> list[tuple[Path, dict]]:
    """The configurations stated beside the weights: our header metadata, then a config.json."""
    stated = []
    if KEY_CONFIG in ckpt.metadata:
        try:
            raw = json.loads(ckpt.metadata[KEY_CONFIG])
        except (ValueError, RecursionError) as err:
            raise CheckpointError(f"{ckpt.path}: corrupt {KEY_CONFIG} metadata: {err}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{ckpt.path}: corrupt {KEY_CONFIG} metadata: not a JSON object")
        stated.append((ckpt.path, raw))
    if ckpt.config_json is not None:
        stated.append((ckpt.config_json, read_config_json(ckpt.config_json)))
    return stated


def _check_configs_agree(stated: list[tuple[Path, dict]]) -> None:
    """The fields no tensor shape tells (UNSHAPED_FIELDS) must be the same in every config that states
    them: the others are checked against the weights, these are taken from the configs."""
    first: dict[str, tuple[object, Path]] = {}
    for source, raw in stated:
        for name, value in config_json_values(raw).items():
            if name not in UNSHAPED_FIELDS:
                continue
            if name in first and first[name][0] != value:
                raise CheckpointError(f"{source}: {name} = {value!r} disagrees with {first[name][1]} "
                                      f"({first[name][0]!r})")
            first.setdefault(name, (value, source))


def _lora_key(keys: Iterable[str]) -> str | None:
    """The first of `keys` that names a LoRA's low-rank factor, as converters/lora_formats.py reads them."""
    from dit8.converters.lora_formats import KOHYA_PREFIX, ROLES  # (the converters import this module)

    factors = tuple(suffix for suffix, role in ROLES.items() if role in ("up", "down"))
    return next((key for key in keys if key.startswith(KOHYA_PREFIX) or key.endswith(factors)), None)


def _check_input_scale(ckpt: Checkpoint, key: str) -> None:
    """A ComfyUI `.scale_input` (INPUT_SCALE) is one float; anything else there is a damaged or misread
    file, refused rather than passed over. (Its value is not read: open_dit reads no tensor data.)"""
    info = ckpt.infos[key]
    if not info.dtype.is_floating_point or math.prod(info.shape) != 1:
        raise CheckpointError(f"{info.file}: tensor {key!r} is {str(info.dtype).removeprefix('torch.')} of shape "
                              f"{list(info.shape)}; ComfyUI's input scale is one float")


def open_dit(path: str | Path, config_json: str | Path | None = None) -> DitCheckpoint:
    """Open and validate a DiT checkpoint's names, shapes and config without reading tensor data.
    config_json: another config.json the checkpoint must agree with, besides the one beside it."""
    if config_json is not None:  # (an empty string would name the current folder)
        config_json = as_path(config_json, "config_json")
    ckpt = open_checkpoint(path)
    version = check_format_version(ckpt.metadata, ckpt.path)
    for key in [k for k in ckpt.infos if k.rpartition(".")[2] == SCALED_FP8_MARKER]:
        del ckpt.infos[key]
    for key in [k for k in ckpt.infos if k.endswith(INPUT_SCALE)]:
        if key.removesuffix(INPUT_SCALE) + TENSOR_SCALE in ckpt.infos:  # (else refused below as unexpected)
            _check_input_scale(ckpt, key)
            del ckpt.infos[key]
    lora = _lora_key(ckpt.infos)
    if lora is not None:  # else read as a DiT missing every tensor but the blocks' (or all of them)
        file = ckpt.infos[lora].file
        part = f", read as a part of the checkpoint folder {ckpt.path}" if file != ckpt.path else ""
        raise CheckpointError(f"{file}: a LoRA (tensors such as {lora!r}), not a DiT checkpoint{part}: merge it "
                              f"into its base model with `dit8 convert BASE DST --lora FILE`")
    layout = detect_layout(ckpt.keys())
    names: dict[str, str] = {}
    for key, info in ckpt.infos.items():
        official = to_official(key, layout)
        if official is None:
            # Which key made it that layout: in a folder whose files mix layouts, the odd file may be that one.
            evidence = layout_evidence(ckpt.infos, layout)
            shown = "" if evidence is None else f" (as {evidence!r} in {ckpt.infos[evidence].file.name} shows)"
            raise CheckpointError(f"{info.file}: unexpected tensor {key!r} in a {layout}-layout checkpoint{shown}")
        if official in names:
            # ComfyUI's two prefixes name one tensor twice: which copy is meant is a guess.
            other = names[official]
            raise CheckpointError(f"{info.file}: tensors {other!r} (in {ckpt.infos[other].file.name}) and {key!r} "
                                  f"are both {official!r}")
        names[official] = key
    # (T5's blocks are "blocks.N.attn...": a DiT's hold self_attn, cross_attn and modulation.)
    if "patch_embedding.weight" not in names and not any(_DIT_BLOCK_KEY.match(k) for k in names):
        held = (f"{len(ckpt.infos)} tensors such as " + ", ".join(repr(k) for k in list(ckpt.infos)[:3])
                if ckpt.infos else "no tensors")
        raise CheckpointError(f"{ckpt.path}: not a Wan2.1 DiT checkpoint (no patch_embedding, no DiT blocks; it holds "
                              f"{held}): the VAE, T5 and CLIP files are not DiTs")
    shapes = {official: ckpt.infos[key].shape for official, key in names.items()}
    stated = _stated_configs(ckpt)
    if config_json is not None and config_json != ckpt.config_json:
        stated.append((config_json, read_config_json(config_json)))
    _check_configs_agree(stated)
    heads = [(config_json_values(raw)["num_heads"], source) for source, raw in stated
             if "num_heads" in config_json_values(raw)]
    _check_block_numbers(ckpt, names)
    config = _infer_config(shapes, ckpt.path, layout, *(heads[0] if heads else (None, None)))
    if not config.is_i2v and config.in_dim != config.out_dim:
        # Checked before any config.json, whose model_type "i2v" would otherwise be said to disagree.
        raise CheckpointError(f"{ckpt.path}: in_dim {config.in_dim} and out_dim {config.out_dim} without an image "
                              f"branch (img_emb), as in Wan2.2's I2V-A14B: not a Wan2.1 DiT (I2V ones have img_emb, "
                              f"T2V ones in_dim = out_dim), which is what dit8 runs")
    for source, raw in stated:
        config = check_against_config_json(config, raw, source)
    depth = PUBLISHED_DEPTHS.get((config.dim, config.ffn_dim))
    depth_stated = any("num_layers" in config_json_values(raw) for _, raw in stated)
    if depth is not None and config.num_layers < depth and not depth_stated:
        raise CheckpointError(f"{ckpt.path}: blocks 0-{config.num_layers - 1} only, where the Wan2.1 DiTs of dim "
                              f"{config.dim} have {depth}: the tensors of the last blocks are missing (a lost file?); "
                              f"a model of another depth needs a config.json with num_layers beside the weights")
    if config.out_dim != WAN21_LATENT_CHANNELS:
        # Wan2.2's TI2V-5B has Wan2.1's tensor names at 48 channels, for its own VAE: the shapes would load,
        # and its forward (per-token timesteps) would silently compute something else.
        raise CheckpointError(f"{ckpt.path}: out_dim {config.out_dim}: Wan2.1 DiTs predict the "
                              f"{WAN21_LATENT_CHANNELS} latent channels of Wan2.1's VAE (48 is Wan2.2's TI2V-5B): "
                              f"not a model dit8 runs")
    # A dit8 packed file's 8-bit weights always have their scales: one without any lost them.
    quantized = _find_quantized(ckpt, names, config, casts=version is None)
    _check_tensor_set(ckpt, names, config, layout, quantized)
    if version is not None:
        _check_packed_metadata(ckpt, names, config, quantized)
        fmt = DIT8
    elif any(suffix == TENSOR_SCALE for suffix in quantized.values()):
        fmt = COMFYUI_FP8
    elif any(suffix == UNSCALED for suffix in quantized.values()):
        fmt = FP8_UNSCALED
    else:
        fmt = LIGHTX2V if quantized else FLOAT
    return DitCheckpoint(ckpt, layout, config, names, fmt, quantized)


def _check_packed_metadata(ckpt: Checkpoint, names: dict[str, str], config: WanConfig,
                           quantized: dict[str, str]) -> None:
    """A dit8 packed file's header says what its tensors are: every key of the format, a configuration
    equal to the one its shapes give, and each 8-bit weight of the dtype its `dit8.schemes` entry names."""
    meta, path = ckpt.metadata, ckpt.path
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: {FORMAT_NAME} file without the header metadata {missing}")
    if meta[KEY_SCHEME] not in SCHEMES:
        raise CheckpointError(f"{path}: {KEY_SCHEME} is {meta[KEY_SCHEME]!r}, expected one of {SCHEMES}")
    try:
        stated = WanConfig.from_dict(json.loads(meta[KEY_CONFIG]))
        schemes = json.loads(meta[KEY_SCHEMES])
        if not isinstance(schemes, dict) or not all(isinstance(v, str) for v in schemes.values()):
            raise TypeError(f"{KEY_SCHEMES} is not an object of scheme names")
    except (ValueError, RecursionError, TypeError) as err:  # (InputError is a ValueError)
        raise CheckpointError(f"{path}: corrupt {FORMAT_NAME} header metadata: {err}") from None
    if stated != config:
        differ = [f for f, v in stated.to_dict().items() if config.to_dict()[f] != v]
        raise CheckpointError(f"{path}: {KEY_CONFIG} disagrees with the tensors in {differ}")
    if meta[KEY_DTYPE] not in HIGH_PRECISION_DTYPES:
        raise CheckpointError(f"{path}: {KEY_DTYPE} is {meta[KEY_DTYPE]!r}, expected one of "
                              f"{tuple(HIGH_PRECISION_DTYPES)}")
    codes = {names[module + ".weight"] for module in quantized}
    for key, info in ckpt.infos.items():
        if key not in codes and not key.endswith(WEIGHT_SCALE_SUFFIX) \
                and info.dtype != HIGH_PRECISION_DTYPES[meta[KEY_DTYPE]]:
            raise CheckpointError(f"{info.file}: tensor {key!r} is {info.dtype}, but {KEY_DTYPE} says the "
                                  f"unquantized tensors are {meta[KEY_DTYPE]}")
    unknown = sorted({scheme for scheme in schemes.values() if scheme not in SCHEMES})
    if unknown:
        raise CheckpointError(f"{path}: {KEY_SCHEMES} names the schemes {unknown}, expected only {SCHEMES}")
    if quantized and meta[KEY_SCHEME] not in SCHEME_DTYPES:
        raise CheckpointError(f"{path}: {KEY_SCHEME} is {meta[KEY_SCHEME]!r}, but the file holds 8-bit weights "
                              f"({next(iter(quantized))}.weight, ...)")
    for module, suffix in quantized.items():
        info = ckpt.infos[names[module + ".weight"]]
        scheme = scheme_of(schemes, module)
        if SCHEME_DTYPES.get(scheme) != info.dtype:
            raise CheckpointError(f"{info.file}: {module}.weight is {info.dtype}, but {KEY_SCHEMES} gives "
                                  f"{module!r} the scheme {scheme!r}")
        # The format's scales: [out, 1] fp32 per output channel (packed_format.py).
        scale = ckpt.infos[names[module + suffix]] if suffix != UNSCALED else None
        if scale is None or suffix != CHANNEL_SCALE or scale.dtype != torch.float32 \
                or tuple(scale.shape) != (info.shape[0], 1):
            found = "no scale" if scale is None else f"{module}{suffix} {tuple(scale.shape)} {scale.dtype}"
            raise CheckpointError(f"{info.file}: {module}.weight has {found}; a {FORMAT_NAME} file gives each "
                                  f"8-bit weight a {module}{CHANNEL_SCALE} of shape ({info.shape[0]}, 1), "
                                  f"torch.float32")
    # The other way round: a block linear the header calls 8-bit must hold codes (a kept layer relabelled).
    for module in (f"blocks.{n}.{name}" for n in range(config.num_layers) for name in block_linears(config)):
        scheme = scheme_of(schemes, module)
        if module not in quantized and scheme in SCHEME_DTYPES:
            info = ckpt.infos[names[module + ".weight"]]
            raise CheckpointError(f"{info.file}: {module}.weight is {info.dtype} without a weight scale, but "
                                  f"{KEY_SCHEMES} gives {module!r} the scheme {scheme!r}")


def check_finite(tensor: torch.Tensor, key: str, file: Path) -> None:
    """Raise CheckpointError naming the file and key if `tensor` holds NaN or Inf."""
    if tensor.dtype == torch.float8_e4m3fn:
        # e4m3fn has no infinities; NaN is every exponent and mantissa bit set. (No isfinite for fp8.)
        if ((tensor.view(torch.uint8) & 0x7F) == 0x7F).any():
            raise CheckpointError(f"{file}: tensor {key!r} contains NaN values")
        return
    if not tensor.is_floating_point():
        return
    if tensor.dtype in (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        tensor = tensor.float()  # torch has no isfinite for these; their one NaN code reads as NaN
    if not torch.isfinite(tensor).all():
        bad = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise CheckpointError(f"{file}: tensor {key!r} contains {bad} values")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 matmuls on GPUs (as the official code runs), fp32 on CPUs (where bf16 is slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@releases_frames
def load_dit(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             backend: str = "auto", attention: str = "bf16", progress: bool | None = None,
             config_json: str | Path | None = None, parallel: SequenceParallel | None = None) -> WanDiT:
    """Load a Wan2.1 DiT from a checkpoint file or folder.

    path: `.safetensors`, `.pth`/`.pt`/`.bin`, a folder of shards with an index json, or a folder of
        per-block files; official, diffusers or ComfyUI key layout; I2V or T2V (found from the keys).
    device: where the model lives and computes.
    dtype: compute dtype of the matmuls and attention; default bf16 on CUDA, fp32 on CPU.
    backend: "auto", "torch", or "triton"/"cuda" (every op that has that kernel runs it, the others as
        "auto" does).
    attention: self-attention precision, "bf16" or an 8-bit path ("int8", "fp8").
    progress: draw a progress bar (default: when stderr is a terminal).
    config_json: another config.json the checkpoint must agree with, besides one beside the weights
        (a model folder's: the blocks of a per-block folder say nothing of the block files missing).
    parallel: split each forward over a torch.distributed group (sequence parallelism, WanDiT).

    Tensors are read one at a time into the model's preallocated storage, so memory holds the model
    plus one tensor. Raises CheckpointError naming the file and key for any problem in the checkpoint;
    the exception of a load that failed part way holds none of the model (`errors.releases_frames`).
    """
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress must be True, False or None, got {progress!r}")
    device = resolve_device(device)
    dit = open_dit(path, config_json)
    runtime_quantized = dit.runtime_quantized()
    model = WanDiT(dit.config, device=device, dtype=dtype or default_dtype(device), backend=backend,
                   attention=attention, quantized=runtime_quantized, parallel=parallel)
    scales = {module + suffix for module, suffix in dit.quantized.items() if suffix != UNSCALED}
    total = sum(dit.checkpoint.infos[k].nbytes for k in dit.names.values())
    with dit.checkpoint, Progress(total, "loading", enabled=progress) as bar:
        for official in dit.names:
            if official in scales:
                continue  # read with its weight
            tensor = _read_checked(dit, official)
            module = official.removesuffix(".weight")
            target = model.get_buffer(official)
            overflows = _narrows(tensor.dtype, target.dtype)
            what = f"tensor {dit.names[official]!r}"
            if module in dit.quantized:
                scale = _read_scale(dit, module)
                if module + dit.quantized[module] in scales:  # skipped where the loop meets it: counted here
                    bar.update(dit.info(module + dit.quantized[module]).nbytes)
                if module in runtime_quantized:
                    model.get_buffer(module + CHANNEL_SCALE).copy_(scale)
                else:  # an 8-bit layer the model runs in high precision
                    # The scale along the first (output) dimension, whatever the tensor's rank: a cast's
                    # norm weights are 1-D, its patch embedding 5-D.
                    tensor = tensor.float() * scale.reshape(-1, *[1] * (tensor.dim() - 1))
                    overflows, what = True, what + " times its scale"
            if overflows:
                # Finite in the file, a value may still overflow the model's type, or its product with the
                # scale overflow fp32: what the model holds is checked.
                tensor = tensor.to(target.dtype)
                _check_no_overflow(tensor, what, dit.file_of(official))
            target.copy_(tensor)
            bar.update(dit.info(official).nbytes)
            del tensor  # free it before the next read, so memory holds the model plus one tensor
    return model


def _narrows(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether converting floats of `source` to `target` can turn finite values into infinities."""
    return source.is_floating_point and target.is_floating_point and \
        torch.finfo(target).max < torch.finfo(source).max


def _check_no_overflow(tensor: torch.Tensor, what: str, file: Path) -> None:
    """CheckpointError unless `tensor`, converted from finite values, is finite: none overflowed its type."""
    if not torch.isfinite(tensor).all():
        hint = "; load it with dtype torch.bfloat16 or torch.float32" if tensor.dtype == torch.float16 else ""
        raise CheckpointError(f"{file}: {what} overflows {str(tensor.dtype).removeprefix('torch.')} (magnitudes "
                              f"above {torch.finfo(tensor.dtype).max:.4g}){hint}")


def _read_checked(dit: DitCheckpoint, official: str) -> torch.Tensor:
    tensor = dit.checkpoint.read(dit.names[official])
    check_finite(tensor, dit.names[official], dit.file_of(official))
    return tensor


def _read_scale(dit: DitCheckpoint, module: str) -> torch.Tensor:
    """A quantized layer's scale as [out, 1] or [1, 1] fp32, checked finite and positive."""
    if dit.quantized[module] == UNSCALED:
        return torch.ones(1, 1)
    key = module + dit.quantized[module]
    scale = _read_checked(dit, key).float().reshape(-1, 1)
    _check_no_overflow(scale, f"scale {dit.names[key]!r}", dit.file_of(key))  # (float64 scales)
    if not (scale > 0).all():
        raise CheckpointError(f"{dit.file_of(key)}: scale {dit.names[key]!r} has values <= 0")
    return scale


def summarize(dit: DitCheckpoint) -> dict:
    """What `dit8 info` prints: layout, variant, dimensions, parameter count, tensors and bytes per dtype."""
    infos = [dit.checkpoint.infos[k] for k in dit.names.values()]
    tensors = Counter(str(i.dtype).removeprefix("torch.") for i in infos)
    nbytes: Counter = Counter()
    for info in infos:
        nbytes[str(info.dtype).removeprefix("torch.")] += info.nbytes
    return {
        "path": str(dit.path),
        "files": len(dit.checkpoint.files),
        "layout": dit.layout,
        "variant": dit.config.variant,
        "format": dit.format,
        "quantized_layers": {scheme: sum(1 for m in dit.quantized
                                         if QUANT_DTYPES[dit.info(m + ".weight").dtype] == scheme)
                             for scheme in sorted(set(QUANT_DTYPES.values()))} if dit.quantized else {},
        "config": dit.config.to_dict(),
        # The model's parameters: the 8-bit weights' scales are part of their encoding, not parameters.
        "parameters": sum(math.prod(dit.info(k).shape) for k in dit.names
                          if not k.endswith((CHANNEL_SCALE, TENSOR_SCALE))),
        "tensors_by_dtype": dict(tensors),
        "bytes_by_dtype": dict(nbytes),
        "metadata": dict(dit.checkpoint.metadata),
    }
