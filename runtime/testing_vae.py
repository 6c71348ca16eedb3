"""Random Wan VAE weights under the official `Wan2.1_VAE.pth` key names, at any width, for tests, the
demo and benchmarks (random weights at the real shapes). No download involved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .vae import VAEConfig, WanVAE

__all__ = ["build_random_vae", "random_vae_weights", "tiny_vae_config", "write_random_vae"]


def tiny_vae_config(dim: int = 8, **overrides: Any) -> VAEConfig:
    """The Wan2.1 VAE layout (4 levels, 2 residual blocks, 16 latent channels, stride 4x8x8) at base
    width `dim` instead of 96: the real key names with tiny tensors."""
    return VAEConfig(dim=dim, **overrides)


def random_vae_weights(config: VAEConfig | None = None, *, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for `config` (the real Wan2.1 dimensions by default), official names, scaled so
    activations stay O(1): convs ~ N(0, 1/fan_in), biases small, norm gains near 1, and the decoder's
    last conv at half gain so most decoded pixels fall inside [-1, 1] rather than on the clamp."""
    config = config or VAEConfig()
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in WanVAE(config).state_dict().items()}
    weights = {}
    for key, shape in shapes.items():
        if key.endswith(".gamma"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=gen) / fan_in ** 0.5
            if key == "decoder.head.2.weight":
                t *= 0.5
        weights[key] = t.to(dtype)
    return weights


def write_random_vae(path: str | Path, config: VAEConfig | None = None, *, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write random weights to `path` as the official release does (a torch-saved state dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_vae_weights(config, seed=seed, dtype=dtype), path)
    return path


def build_random_vae(config: VAEConfig | None = None, *, device: str | torch.device,
                     dtype: torch.dtype = torch.float32, seed: int = 0) -> WanVAE:
    """A WanVAE (the real Wan2.1 dimensions by default) with random weights drawn directly on `device`,
    in place: no CPU copy and no file. Same scaling as `random_vae_weights`; the values differ (drawn
    by the device's generator)."""
    if not dtype.is_floating_point:
        raise ValueError(f"the VAE computes in a floating-point dtype, not {dtype}")
    with torch.device("meta"):
        model = WanVAE(config or VAEConfig())
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if key.endswith(".gamma"):
                t.normal_(1.0, 0.1, generator=gen)
            elif key.endswith(".bias"):
                t.normal_(0.0, 0.05, generator=gen)
            else:
                std = t[0].numel() ** -0.5  # N(0, 1/fan_in)
                t.normal_(0.0, 0.5 * std if key == "decoder.head.2.weight" else std, generator=gen)
    return model.eval().requires_grad_(False)
