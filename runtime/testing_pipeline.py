"""A whole tiny random model folder laid out as a published release (official Wan2.1-I2V-14B-480P, or
one of LightX2V's distilled layouts), for the pipeline's tests and `dit8 demo`. Every file has the real
name and key layout, so it loads through the real code paths; only the widths are tiny."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import WanConfig, tiny_config
from .layouts import block_linears
from .model_folder import CLIP_FILE, CLIP_QUANTIZED, T5_FILE, T5_QUANTIZED, TOKENIZER_FOLDER, VAE_FILE
from .packed_format import QUANT_SCHEMES, WEIGHT_SCALE_SUFFIX
from .testing import random_weights, write_checkpoint, write_config_json
from .testing_encoders import tiny_clip_config, tiny_t5_config, write_tiny_clip, write_tiny_t5, write_tiny_tokenizer
from .testing_vae import tiny_vae_config, write_random_vae

__all__ = ["FOLDER_KINDS", "quantize_lightx2v", "write_tiny_model_folder"]

# kind -> where the DiT goes below the model folder ("" for the official shards at the top)
FOLDER_KINDS = {
    "official": "",
    "distill_models": "distill_models/distill_model.safetensors",
    "distill_fp8": "distill_fp8",
    "distill_int8": "distill_int8",
    "fp8": "fp8",
    "int8": "int8",
    "single_file": "wan2.1_i2v_480p_lightx2v_4step.safetensors",
    "single_file_fp8": "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors",
    "single_file_int8": "wan2.1_i2v_480p_int8_lightx2v_4step.safetensors",
}


def quantize_lightx2v(weights: dict[str, torch.Tensor], config: WanConfig, scheme: str) -> dict[str, torch.Tensor]:
    """LightX2V's 8-bit DiT: the block linears symmetric per output channel (scale = amax/qmax, as
    `.weight_scale` [out, 1] fp32), everything else bf16."""
    qmax, qdtype = {"fp8": (448.0, torch.float8_e4m3fn), "int8": (127.0, torch.int8)}[scheme]
    quantized = {f"blocks.{n}.{name}" for n in range(config.num_layers) for name in block_linears(config)}
    out = {}
    for key, value in weights.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in quantized:
            w = value.float()
            scale = w.abs().amax(1, keepdim=True).clamp_min(1e-5) / qmax
            q = w / scale
            out[key] = q.round().clamp(-128, 127).to(qdtype) if scheme == "int8" else q.to(qdtype)
            out[module + WEIGHT_SCALE_SUFFIX] = scale
        else:
            out[key] = value.to(torch.bfloat16)
    return out


def write_tiny_model_folder(path: str | Path, *, kind: str = "official", seed: int = 0,
                            config: WanConfig | None = None, encoders_beside_dit: bool = False,
                            vae_dim: int = 8) -> Path:
    """Write a tiny random I2V model folder at `path` and return it.

    kind: one of FOLDER_KINDS. "official": fp32 DiT shards + index json at the top; "distill_models":
    a bf16 single file there; the fp8/int8 kinds: LightX2V per-block 8-bit files (block_N.safetensors +
    non_block.safetensors); "single_file*": LightX2V's newer single files at the top.
    Always: config.json (official style) and google/umt5-xxl/ (tokenizer) at the top, and the T5 .pth,
    CLIP .pth and Wan2.1_VAE.pth at the top, or beside the DiT with `encoders_beside_dit`.
    The widths match each other: `tiny_config("i2v")` (text 64, CLIP 32), `tiny_t5_config()`,
    `tiny_clip_config()`, `tiny_vae_config(vae_dim)`.
    """
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; expected one of {list(FOLDER_KINDS)}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    config = config or tiny_config("i2v")
    weights = random_weights(config, seed=seed)
    where = FOLDER_KINDS[kind]
    if kind == "official":
        write_checkpoint(weights, root, fmt="sharded", config=config)
        dit_folder = root
    elif kind in ("distill_models", "single_file"):
        write_checkpoint(weights, root / where, dtype=torch.bfloat16)
        dit_folder = (root / where).parent
    elif kind.startswith("single_file_"):
        write_checkpoint(quantize_lightx2v(weights, config, kind.rsplit("_", 1)[1]), root / where)
        dit_folder = root
    else:
        scheme = "int8" if "int8" in kind else "fp8"
        write_checkpoint(quantize_lightx2v(weights, config, scheme), root / where, fmt="per_block")
        dit_folder = root / where
        # The release also holds quantized encoders here, which dit8 does not read.
        for name in (T5_QUANTIZED[QUANT_SCHEMES.index(scheme)], CLIP_QUANTIZED[QUANT_SCHEMES.index(scheme)]):
            torch.save({"placeholder": torch.zeros(1)}, dit_folder / name)
    write_config_json(config, root)
    encoders = dit_folder if encoders_beside_dit else root
    write_tiny_t5(encoders / T5_FILE, tiny_t5_config(dim=config.text_dim, dim_attn=config.text_dim), seed=seed + 1)
    write_tiny_clip(encoders / CLIP_FILE, tiny_clip_config(dim=config.clip_dim), seed=seed + 2)
    write_random_vae(encoders / VAE_FILE, tiny_vae_config(vae_dim), seed=seed + 3)
    write_tiny_tokenizer(root / TOKENIZER_FOLDER)
    (root / "README.tiny-random.json").write_text(json.dumps(
        {"note": "tiny RANDOM weights written by dit8.testing_pipeline; not a real model", "kind": kind,
         "seed": seed}, indent=2))
    return root
