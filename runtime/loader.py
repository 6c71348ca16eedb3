"""load_dit: checkpoint on disk -> WanDiT, validating every tensor name, shape and value."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint
from .config import WAN_HEAD_DIM, WanConfig, check_against_config_json, config_json_values, read_config_json
from .errors import CheckpointError
from .layouts import detect_layout, expected_shapes, from_official, to_official
from .model import WanDiT
from .progress import Progress

# Our packed files carry the model configuration in their header metadata under this key.
METADATA_CONFIG_KEY = "dit8.config"


@dataclass
class DitCheckpoint:
    """An opened, validated DiT checkpoint: its files, layout, configuration and key names."""

    checkpoint: Checkpoint
    layout: str
    config: WanConfig
    names: dict[str, str]  # official key -> key in the file

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def file_of(self, official_key: str) -> Path:
        return self.checkpoint.infos[self.names[official_key]].file


def _infer_config(shapes: dict[str, tuple[int, ...]], source: Path, layout: str,
                  num_heads: int | None) -> WanConfig:
    """Every dimension from tensor shapes; the head count, which no shape shows, is `num_heads` as a
    config states it, or else Wan's 128-wide heads."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: missing tensor {from_official(key, layout)!r}")
        if len(shapes[key]) != ndim:
            raise CheckpointError(f"{source}: tensor {from_official(key, layout)!r} has shape {shapes[key]}, "
                                  f"expected {ndim} dimensions")
        return shapes[key]

    dim, in_dim, *patch = shape("patch_embedding.weight", 5)
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not blocks:
        raise CheckpointError(f"{source}: no transformer blocks found")
    clip = shapes.get("img_emb.proj.0.weight")
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise CheckpointError(f"{source}: dim {dim} is not a multiple of {WAN_HEAD_DIM}, so the head count "
                                  f"is unknown; put a config.json with num_heads beside the weights")
        num_heads = dim // WAN_HEAD_DIM
    try:
        return WanConfig(
        dim=dim, in_dim=in_dim, patch_size=tuple(patch),
        ffn_dim=shape("blocks.0.ffn.0.weight", 2)[0],
        num_layers=max(blocks) + 1,
        out_dim=shape("head.head.weight", 2)[0] // math.prod(patch),
        freq_dim=shape("time_embedding.0.weight", 2)[1],
        text_dim=shape("text_embedding.0.weight", 2)[1],
        clip_dim=None if clip is None else clip[0],
        num_heads=num_heads,
    )
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _check_tensor_set(ckpt: Checkpoint, names: dict[str, str], config: WanConfig, layout: str) -> None:
    expected = expected_shapes(config)
    for official, file_key in names.items():
        info = ckpt.infos[file_key]
        if official not in expected:
            raise CheckpointError(f"{info.file}: unexpected tensor {file_key!r} for a {config.variant} model "
                                  f"of {config.num_layers} blocks")
        if info.shape != expected[official]:
            raise CheckpointError(f"{info.file}: tensor {file_key!r} has shape {info.shape}, "
                                  f"expected {expected[official]}")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: tensor {file_key!r} has dtype {info.dtype}, expected a float")
    missing = [from_official(k, layout) for k in expected if k not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: missing tensor {missing[0]!r}{more}")


def _stated_configs(ckpt: Checkpoint) -> list[tuple[Path, dict]]:
    """The configurations stated beside the weights: our header metadata, then a config.json."""
    stated = []
    if METADATA_CONFIG_KEY in ckpt.metadata:
        try:
            stated.append((ckpt.path, json.loads(ckpt.metadata[METADATA_CONFIG_KEY])))
        except ValueError as err:
            raise CheckpointError(f"{ckpt.path}: corrupt {METADATA_CONFIG_KEY} metadata: {err}") from None
    if ckpt.config_json is not None:
        stated.append((ckpt.config_json, read_config_json(ckpt.config_json)))
    return stated


def open_dit(path: str | Path) -> DitCheckpoint:
    """Open and validate a DiT checkpoint's names, shapes and config without reading tensor data."""
    ckpt = open_checkpoint(path)
    layout = detect_layout(ckpt.keys())
    names: dict[str, str] = {}
    for key, info in ckpt.infos.items():
        official = to_official(key, layout)
        if official is None:
            raise CheckpointError(f"{info.file}: unexpected tensor {key!r} in a {layout}-layout checkpoint")
        names[official] = key
    shapes = {official: ckpt.infos[key].shape for official, key in names.items()}
    stated = _stated_configs(ckpt)
    heads = [config_json_values(raw)["num_heads"] for _, raw in stated if "num_heads" in config_json_values(raw)]
    config = _infer_config(shapes, ckpt.path, layout, heads[0] if heads else None)
    for source, raw in stated:
        config = check_against_config_json(config, raw, source)
    _check_tensor_set(ckpt, names, config, layout)
    return DitCheckpoint(ckpt, layout, config, names)


def check_finite(tensor: torch.Tensor, key: str, file: Path) -> None:
    """Raise CheckpointError naming the file and key if `tensor` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        bad = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise CheckpointError(f"{file}: tensor {key!r} contains {bad} values")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 matmuls on GPUs (as the official code runs), fp32 on CPUs (where bf16 is slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_dit(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             backend: str = "auto", attention: str = "bf16", progress: bool | None = None) -> WanDiT:
    """Load a Wan2.1 DiT from a checkpoint file or folder.

    path: `.safetensors`, `.pth`/`.pt`, a folder of shards with an index json, or a folder of
        per-block files; official, diffusers or ComfyUI key layout; I2V or T2V (found from the keys).
    device: where the model lives and computes.
    dtype: compute dtype of the matmuls and attention; default bf16 on CUDA, fp32 on CPU.
    backend: op backend for every layer ("auto", "torch", "triton", "cuda").
    attention: self-attention precision, "bf16" or an 8-bit path ("int8", "fp8").
    progress: draw a progress bar (default: when stderr is a terminal).

    Tensors are read one at a time into the model's preallocated storage, so memory holds the model
    plus one tensor. Raises CheckpointError naming the file and key for any problem in the checkpoint.
    """
    device = torch.device(device)
    dit = open_dit(path)
    model = WanDiT(dit.config, device=device, dtype=dtype or default_dtype(device), backend=backend,
                   attention=attention)
    total = sum(dit.checkpoint.infos[k].nbytes for k in dit.names.values())
    with dit.checkpoint, Progress(total, "loading", enabled=progress) as bar:
        for official, file_key in dit.names.items():
            tensor = dit.checkpoint.read(file_key)
            check_finite(tensor, file_key, dit.file_of(official))
            model.get_buffer(official).copy_(tensor)
            bar.update(tensor.nbytes)
            del tensor  # free it before the next read, so memory holds the model plus one tensor
    return model


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
        "config": dit.config.to_dict(),
        "parameters": sum(math.prod(i.shape) for i in infos),
        "tensors_by_dtype": dict(tensors),
        "bytes_by_dtype": dict(nbytes),
        "metadata": dict(dit.checkpoint.metadata),
    }
