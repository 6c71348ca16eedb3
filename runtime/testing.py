"""Test fixtures as a library: random Wan2.1 DiT weights and inputs, and checkpoint writers for every
layout and file format dit8 reads. Used by the tests, the demo and the benchmarks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import WanConfig, tiny_config
from .layouts import DIFFUSERS, LAYOUTS, OFFICIAL, expected_shapes, from_official

__all__ = ["FORMATS", "LAYOUTS", "fp8_refusal_as_skip", "random_inputs", "random_w8a8_operands", "random_weights",
           "scale_random_", "tiny_config", "write_checkpoint", "write_config_json"]

# single .safetensors, single .pth, a folder of shards with an index json, a folder of per-block files
FORMATS = ("safetensors", "pth", "sharded", "per_block")


def scale_random_(name: str, t: torch.Tensor) -> torch.Tensor:
    """Scale standard-normal draws `t` of the DiT tensor `name` in place, so that activations stay O(1)
    through every block: modulation tables 0.2, biases 0.05, norm weights 1 ± 0.1, matrices 1/√fan_in."""
    if name.endswith("modulation"):
        return t.mul_(0.2)
    if name.endswith(".bias"):
        return t.mul_(0.05)
    if t.dim() == 1:  # norm weights
        return t.mul_(0.1).add_(1)
    return t.div_(math.prod(t.shape[1:]) ** 0.5)


def random_weights(config: WanConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under official names (`scale_random_`), drawn on the CPU in key order."""
    gen = torch.Generator().manual_seed(seed)
    return {key: scale_random_(key, torch.randn(shape, generator=gen)).to(dtype)
            for key, shape in expected_shapes(config).items()}


def random_inputs(config: WanConfig, *, batch: int = 2, latent_size: tuple[int, int, int] = (2, 4, 6),
                  text_rows: int = 7, clip_tokens: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    """Keyword arguments for `WanDiT.__call__`: latents of `latent_size` (frames, height, width), a
    different timestep per batch row, and conditioning of the right widths."""
    gen = torch.Generator().manual_seed(seed)
    T, H, W = latent_size
    x_channels = config.out_dim if config.is_i2v else config.in_dim
    inputs = {
        "x": torch.randn(batch, x_channels, T, H, W, generator=gen),
        "t": torch.rand(batch, generator=gen, dtype=torch.float64).float() * 1000,
        "context": torch.randn(batch, text_rows, config.text_dim, generator=gen),
    }
    if config.is_i2v:
        inputs["clip_fea"] = torch.randn(batch, clip_tokens, config.clip_dim, generator=gen)
        inputs["y"] = torch.randn(batch, config.in_dim - x_channels, T, H, W, generator=gen)
    return inputs


def random_w8a8_operands(M: int, N: int, K: int, qdtype: torch.dtype, *, seed: int,
                         bias_dtype: torch.dtype | None = torch.float32) -> list[torch.Tensor | None]:
    """Operands of `dit8.kernels.scaled_mm` on the CPU: [xq, x_scale, wq, w_scale, bias]. The 8-bit codes
    cover the whole range (fp8: normals and subnormals), scales differ in magnitude per row/column;
    bias is None when bias_dtype is None."""
    gen = torch.Generator().manual_seed(seed)
    if qdtype == torch.int8:
        xq = torch.randint(-128, 128, (M, K), generator=gen, dtype=torch.int8)
        wq = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    else:
        xq = (torch.randn(M, K, generator=gen) * 100).clamp(-448, 448).to(qdtype)
        wq = (torch.randn(N, K, generator=gen) * 100).clamp(-448, 448).to(qdtype)
    xs = torch.rand(M, generator=gen) * 1e-2 + 1e-4
    ws = torch.rand(N, generator=gen) * 1e-2 + 1e-4
    bias = None if bias_dtype is None else (torch.randn(N, generator=gen) * 10).to(bias_dtype)
    return [xq, xs, wq, ws, bias]


def write_config_json(config: WanConfig, folder: str | Path, layout: str = OFFICIAL) -> Path:
    """Write config.json as the official release (WanModel) or diffusers (WanTransformer3DModel) does."""
    if layout == DIFFUSERS:
        raw = {"_class_name": "WanTransformer3DModel", "patch_size": list(config.patch_size),
               "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
               "in_channels": config.in_dim, "out_channels": config.out_dim, "text_dim": config.text_dim,
               "freq_dim": config.freq_dim, "ffn_dim": config.ffn_dim, "num_layers": config.num_layers,
               "eps": config.eps, "image_dim": config.clip_dim, "qk_norm": "rms_norm_across_heads"}
    else:
        raw = {"_class_name": "WanModel", "model_type": config.variant, "text_len": config.text_len,
               "in_dim": config.in_dim, "dim": config.dim, "ffn_dim": config.ffn_dim,
               "freq_dim": config.freq_dim, "out_dim": config.out_dim, "num_heads": config.num_heads,
               "num_layers": config.num_layers, "eps": config.eps, "patch_size": list(config.patch_size),
               "text_dim": config.text_dim}
    path = Path(folder) / "config.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def _block_of(key: str) -> str:
    parts = key.split(".")
    return f"block_{parts[1]}" if parts[0] == "blocks" else "non_block"


def write_checkpoint(weights: dict[str, torch.Tensor], path: str | Path, *, layout: str = OFFICIAL,
                     fmt: str = "safetensors", dtype: torch.dtype | None = None,
                     config: WanConfig | None = None, shards: int = 3) -> Path:
    """Write official-named `weights` to `path` in `layout` and file format `fmt` (see FORMATS).

    For "safetensors" and "pth", `path` is the file; for "sharded" and "per_block" it is a folder.
    With `config`, a config.json in that layout's style is written beside the weights (it carries the
    head count and text length, which shapes do not show). Returns the path to load.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    path = Path(path)
    tensors = {from_official(k, layout): (v if dtype is None else v.to(dtype)).contiguous()
               for k, v in weights.items()}
    folder = path if fmt in ("sharded", "per_block") else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(tensors, str(path))
    elif fmt == "pth":
        torch.save(tensors, path)
    elif fmt == "sharded":
        keys = list(tensors)
        per_shard = -(-len(keys) // shards)
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i * per_shard:(i + 1) * per_shard]
            save_file({k: tensors[k] for k in part}, str(folder / name))
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:  # per_block: LightX2V's block_N.safetensors plus one file of the other tensors
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for official, name in zip(weights, tensors):
            groups.setdefault(_block_of(official), {})[name] = tensors[name]
        for group, part in groups.items():
            save_file(part, str(folder / f"{group}.safetensors"))
    if config is not None:
        write_config_json(config, folder, layout)
    return path


def fp8_refusal_as_skip(item, call, report) -> None:
    """For a pytest_runtest_makereport hook: a test stopped by a kernel's refusal of FP8 on a GPU without
    it (A100, RTX 30xx) is reported skipped, with the refusal as its reason. The FP8 cases of tests and
    benchmarks that cover both 8-bit formats cannot run there; their INT8 cases still do."""
    from dit8.kernels.registry import NoFP8Error

    if call.when == "call" and call.excinfo is not None and call.excinfo.errisinstance(NoFP8Error):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
