"""The dit8 packed checkpoint format: names, version, header metadata keys, and the version check.

Version 1 (what this module writes and reads):
- A superset of LightX2V's files: official Wan2.1 key names; a quantized linear `<p>` keeps
  `<p>.weight` as int8 or float8_e4m3fn in the original [out, in] layout (no transpose, no padding of
  K or N, no tiling) and adds `<p>.weight_scale`, [out, 1] fp32, symmetric per output channel, with
  `w ≈ weight.float() · weight_scale`. Every other tensor is stored in one high-precision dtype
  (bf16 unless asked otherwise).
- One `.safetensors` file, or per block: `block_N.safetensors` (everything under `blocks.N.`),
  `non_block.safetensors` (the rest) and `model.safetensors.index.json` ({"metadata", "weight_map"}).
  Every file carries the full header metadata below.
- Header metadata (`__metadata__`, string values):
  - `dit8.format` = "dit8.packed", `dit8.format_version` = "1"
  - `dit8.config`: json of WanConfig.to_dict() (every dimension; the variant follows from `clip_dim`, null for T2V)
  - `dit8.scheme`: the requested scheme ("fp8", "int8" or "bf16"); `dit8.dtype`: the high-precision
    dtype of the unquantized tensors ("bf16", "fp16" or "fp32")
  - `dit8.schemes`: json object, module pattern -> scheme; resolve with `scheme_of` (an exact module
    name wins, then the first fnmatch pattern in order; "*" comes last and covers everything else)
  - `dit8.kept`: json list of the --keep patterns (layers left in high precision)
  - `dit8.lora`: json list of {"file", "strength"} merged before quantization (empty if none)
  - `dit8.source_layout`: official / diffusers / comfyui
  - `dit8.source_digest`: "sha256:<hex>" of the source files (`SourceReader.digest`; the module
    docstring of converters/source.py says what is hashed)
  - `dit8.tool_version`: the dit8 version that wrote the file
A later version that changes any of this (a pre-arranged kernel layout, padding) bumps
FORMAT_VERSION; readers reject versions they do not know through `check_format_version`.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Mapping

import torch

from dit8.choices import QUANT_SCHEMES, SCHEMES  # noqa: F401 (the format's schemes; the loader, converter, ... import them from here)
from dit8.errors import CheckpointError

FORMAT_NAME = "dit8.packed"
FORMAT_VERSION = 1

KEY_FORMAT = "dit8.format"
KEY_FORMAT_VERSION = "dit8.format_version"
KEY_CONFIG = "dit8.config"
KEY_SCHEME = "dit8.scheme"
KEY_DTYPE = "dit8.dtype"
KEY_SCHEMES = "dit8.schemes"
KEY_KEPT = "dit8.kept"
KEY_LORA = "dit8.lora"
KEY_SOURCE_LAYOUT = "dit8.source_layout"
KEY_SOURCE_DIGEST = "dit8.source_digest"
KEY_TOOL_VERSION = "dit8.tool_version"
METADATA_KEYS = (KEY_FORMAT, KEY_FORMAT_VERSION, KEY_CONFIG, KEY_SCHEME, KEY_DTYPE, KEY_SCHEMES, KEY_KEPT,
                 KEY_LORA, KEY_SOURCE_LAYOUT, KEY_SOURCE_DIGEST, KEY_TOOL_VERSION)

SCHEME_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}  # the 8-bit schemes' weight dtypes
# `dit8.dtype`: the dtype of every tensor that is neither 8-bit codes nor their scales (always fp32).
HIGH_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_SCALE_SUFFIX = ".weight_scale"

# File names of the per-block layout.
INDEX_NAME = "model.safetensors.index.json"
NON_BLOCK_NAME = "non_block.safetensors"
REPORT_NAME = "quant_report.json"


def block_file_name(block: int) -> str:
    """The file of block `block` in the per-block layout (the non-block tensors: NON_BLOCK_NAME)."""
    return f"block_{block}.safetensors"


def check_format_version(metadata: Mapping[str, str], path: str | Path) -> int | None:
    """The packed-format version of a file's header metadata, or None when the file is not a dit8
    packed file (no `dit8.format` key: a float, LightX2V or ComfyUI file).

    Raises CheckpointError naming `path` for another format name, a missing or malformed version, or
    a version this dit8 does not know (a newer dit8 wrote it).
    """
    name = metadata.get(KEY_FORMAT)
    if name is None:
        return None
    if name != FORMAT_NAME:
        raise CheckpointError(f"{path}: unknown checkpoint format {name!r} in {KEY_FORMAT} "
                              f"(this dit8 reads {FORMAT_NAME!r})")
    raw = metadata.get(KEY_FORMAT_VERSION)
    # ASCII digits only: int() would also take " 1", "1_0" and other scripts' digits, which no writer makes.
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit()):
        raise CheckpointError(f"{path}: {FORMAT_NAME} file without a valid {KEY_FORMAT_VERSION} "
                              f"(found {raw!r})")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: {FORMAT_NAME} version {version} was written by a newer dit8; "
                              f"this dit8 reads up to version {FORMAT_VERSION}: upgrade dit8 or "
                              f"convert the source again")
    if version < 1:
        raise CheckpointError(f"{path}: unknown {FORMAT_NAME} version {version}")
    return version


def scheme_of(schemes: Mapping[str, str], module: str) -> str | None:
    """The scheme `dit8.schemes` gives `module` (e.g. "blocks.3.ffn.0"): an exact entry, else the
    first matching fnmatch pattern in order; None if nothing matches."""
    if module in schemes:
        return schemes[module]
    for pattern, scheme in schemes.items():
        if fnmatch.fnmatchcase(module, pattern):
            return scheme
    return None
