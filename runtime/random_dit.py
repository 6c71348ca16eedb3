"""A WanDiT with random weights made on its device, and random inputs for it: what `dit8 bench dit`,
the fast-path tests and the CUDA-graph tests run, at any size, with no checkpoint.

The model never exists on the CPU: `build_model` allocates the WanDiT on the device and fills every
buffer in place, one tensor at a time; 8-bit schemes quantize each block linear there, per output
channel, as spec/quant-formats.md says.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from dit8.converters.quantize_weights import SCHEME_DTYPES, dequantize_weight, quantize_weight

from .conditioning import latent_shape
from .config import WanConfig
from .layouts import block_linears
from .loader import QUANT_DTYPES, default_dtype
from .model import WanDiT
from .packed_format import WEIGHT_SCALE_SUFFIX
from .parallel import SequenceParallel
from .testing import scale_random_

CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 256 patches and the class token


def quantized_layers(config: WanConfig, scheme: str) -> dict[str, torch.dtype]:
    """The block linears an 8-bit scheme quantizes (LightX2V's 12 per block), module name -> dtype."""
    if scheme == "bf16":
        return {}
    linears = block_linears(config)
    return {f"blocks.{n}.{name}": SCHEME_DTYPES[scheme] for n in range(config.num_layers) for name in linears}


def build_model(config: WanConfig, *, scheme: str = "bf16", device: str | torch.device = "cuda",
                dtype: torch.dtype | None = None, backend: str = "auto", attention: str = "bf16",
                seed: int = 0, parallel: SequenceParallel | None = None) -> WanDiT:
    """A WanDiT of `config` on `device` with random weights made there (see `init_random_`); the same
    weights in every process of a `parallel` group, drawn from the same seeds."""
    device = torch.device(device)
    model = WanDiT(config, device=device, dtype=dtype or default_dtype(device), backend=backend,
                   attention=attention, quantized=quantized_layers(config, scheme), parallel=parallel)
    init_random_(model, seed=seed)
    return model


def _draw(name: str, shape: torch.Size, device: torch.device, seed: int) -> torch.Tensor:
    """The fp32 value of tensor `name`, scaled as dit8.testing.random_weights scales it.

    Each tensor has its own generator seeded from its name, so a tensor's values do not depend on the
    scheme or on which other tensors exist: a float and a quantized model of one seed share weights."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return scale_random_(name, torch.randn(shape, generator=gen, device=device, dtype=torch.float32))


@torch.no_grad()
def init_random_(model: WanDiT, *, seed: int = 0) -> None:
    """Fill every buffer of `model` in place on its device, one tensor at a time (memory holds the
    model plus one fp32 tensor). 8-bit layers get their float draw quantized per output channel."""
    quantized = model.setup.quantized
    device = model.setup.device
    for name, buffer in model.named_buffers():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight_scale":
            continue  # written with its weight
        value = _draw(name, buffer.shape, device, seed)
        if leaf == "weight" and module in quantized:
            value, scale = quantize_weight(value, QUANT_DTYPES[quantized[module]])
            model.get_buffer(module + WEIGHT_SCALE_SUFFIX).copy_(scale)
        buffer.copy_(value)
        del value


def float_weight(model: WanDiT, key: str) -> torch.Tensor:
    """The float value of official tensor `key` of `model`: 8-bit weights dequantized (fp32)."""
    module = key.removesuffix(".weight")
    if key.endswith(".weight") and module in model.setup.quantized:
        return dequantize_weight(model.get_buffer(key), model.get_buffer(module + WEIGHT_SCALE_SUFFIX))
    return model.get_buffer(key)


# -- inputs --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Random inputs of one generation: noise latents x [1, 16, T, H, W] fp32, timestep t [1], text
    [1, text_len, text_dim], CLIP features [1, 257, clip_dim], y [1, in_dim − 16, T, H, W], and the
    patch grid of x (the model's tokens)."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    clip_fea: torch.Tensor
    y: torch.Tensor
    grid: tuple[int, int, int]


def random_conditioning(config: WanConfig, frames: int, size: tuple[int, int], *,
                        device: str | torch.device, seed: int = 0) -> Conditioning:
    """Inputs for `frames` frames of `size` (width, height) px, drawn on the device. Text is all
    text_len rows (what the T5 encoder gives after padding) so diffusers sees the same context."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    width, height = size
    c, T, h, w = latent_shape(frames, height, width, channels=config.out_dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    pt, ph, pw = config.patch_size
    return Conditioning(x=randn(1, c, T, h, w), t=torch.full((1,), 1000.0, device=device),
                        context=randn(1, config.text_len, config.text_dim),
                        clip_fea=randn(1, CLIP_TOKENS, config.clip_dim),
                        y=randn(1, config.in_dim - config.out_dim, T, h, w), grid=(T // pt, h // ph, w // pw))
