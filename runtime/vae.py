"""The Wan2.1 video VAE (spec/pipeline.md, "VAE"): a causal 3D convolutional autoencoder with stride
(4, 8, 8) in (time, height, width) and 16 latent channels.

Module and tensor names follow the official `Wan2.1_VAE.pth`, so `WanVAE.state_dict()` keys are the
file's keys (`encoder.downsamples.5.time_conv.weight`, `decoder.upsamples.4.shortcut.weight`, ...).

Time is causal everywhere: a 3D convolution sees the current frame and the two before it, never a later
one. Encode feeds the video in chunks of 1, 4, 4, ... frames and decode feeds one latent frame at a
time; between chunks every causal layer keeps what it needs of the past (the last two input frames of a
3-tap convolution) in a `Cache` that lives only for one encode or decode call, so memory is that of
one chunk and how later frames are grouped does not change the result. The first frame is special: it
is encoded alone into latent frame 0 and latent frame 0 decodes to that one frame; every later latent
frame stands for 4 frames, so 81 frames <-> 21 latent frames.

Decode splits the decoder in two: the *stem* (conv1 and the middle blocks, with the one attention layer,
at latent resolution) runs on whole frames; the *upsampling path* (everything after, only convolutions
and nearest upsampling) can run in spatial tiles. Each tile is widened by `decoder_halo` latent pixels,
the radius of the path's receptive field, and the widening is cut away afterwards, so tiled decode
equals whole-frame decode. `decode_memory` estimates the memory a decode needs (see its docstring for
the 480P figures).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import open_weights_file, require_float_weight
from .errors import CheckpointError, InputError
from .model_folder import VAE_FILE

__all__ = ["LATENT_MEAN", "LATENT_STD", "VAEConfig", "WanVAE", "decode_memory", "decoder_halo"]

# Per-channel statistics of Wan2.1 latents: the pipeline works with (mu - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# What causal layers remember between chunks, keyed by the layer itself; one per encode/decode call
# (or per decode tile), so a model holds no state and can serve several calls.
Cache = dict[nn.Module, torch.Tensor | None]
# progress(done, total): called after each chunk of latent frames (of each tile when tiling).
ProgressFn = Callable[[int, int], object]


@dataclass(frozen=True)
class VAEConfig:
    """Dimensions of a Wan VAE; the defaults are Wan2.1's. `temperal_downsample` keeps the official
    spelling; entry i says whether encoder level i also halves time (the decoder mirrors it)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                             f"downsampling level), got {self.temperal_downsample}")
        if self.dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1 or min(self.dim_mult) < 1:
            raise ValueError(f"VAE dimensions must be positive: {self}")

    @property
    def time_stride(self) -> int:
        """Video frames per latent frame (after the first)."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def space_stride(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_mean(self) -> tuple[float, ...]:
        """Wan2.1's statistics for 16 latent channels; no normalisation (0) for another width."""
        return LATENT_MEAN if self.z_dim == len(LATENT_MEAN) else (0.0,) * self.z_dim

    @property
    def latent_std(self) -> tuple[float, ...]:
        """Wan2.1's per-channel latent standard deviations; 1 for another width."""
        return LATENT_STD if self.z_dim == len(LATENT_STD) else (1.0,) * self.z_dim

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a video of `frames` frames (the first alone, then one per time_stride)."""
        return (frames - 1) // self.time_stride + 1

    def video_frames(self, latent_frames: int) -> int:
        """Video frames `latent_frames` latent frames decode to."""
        return (latent_frames - 1) * self.time_stride + 1


# ----------------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Conv3d):
    """Conv3d zero-padded in time on the past side only (`2·padding[0]` frames) and symmetrically in
    space. With a cache, the past comes from the previous chunk instead of zeros; the cache then keeps
    the last `2·padding[0]` input frames (zeros before the clip's start) for the next chunk."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=(0, ph, pw))
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.time_pad:
            if cache is None:
                x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
            else:
                past = cache.get(self)
                if past is None:
                    past = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
                x = torch.cat([past, x], dim=2)
                cache[self] = x[:, :, -self.time_pad:].clone()  # clone: do not keep the chunk alive
        return super().forward(x)


class RMSNorm(nn.Module):
    """`normalize(x over channels) · sqrt(C) · gamma`; gamma is [C, 1, 1] for images, [C, 1, 1, 1] for
    videos, as stored. Statistics in fp32 for low-precision inputs."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float() if x.element_size() < 4 else x, dim=1).to(x.dtype)
        return y.mul_(self.gamma * self.scale)


def _norm_silu(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(norm(x), inplace=True)


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1x1 conv on the shortcut when the width
    changes. `residual` keeps the official slot numbering: 0 norm, 2 conv, 3 norm, 6 conv."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(),  # slot 5: dropout, training only
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(_norm_silu(norm1, x), cache)
        h = conv2(_norm_silu(norm2, h), cache)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(y).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # each [b·t, h·w, c]
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        y = self.proj(y.transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D layer to each frame of [B, C, T, H, W]; one frame at a time bounds the transient
    memory of upsampling to one frame."""
    out = None
    for i in range(x.shape[2]):
        y = fn(x[:, :, i])
        if out is None:
            out = y.new_empty(y.shape[0], y.shape[1], x.shape[2], *y.shape[2:])
        out[:, :, i] = y
    return out


class Resample(nn.Module):
    """Halve or double height and width (a 2D conv per frame), and for the "3d" modes time as well.

    downsample3d: frame 0 passes through; later output frame k is a 3-tap, stride-2 time convolution of
      frames 2k-2, 2k-1, 2k (the cache holds the previous chunk's last frame).
    upsample3d: frame 0 stays one frame; each later frame becomes two, the two halves of a causal
      3-tap time convolution with 2C outputs, interleaved in time.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            # slot 0: nearest 2x upsampling (no weights), slot 1: conv to half the width
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        else:
            # slot 0: pad right and bottom by one pixel, slot 1: stride-2 conv
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            if self in cache:  # a later chunk: double its frames
                b, c, t, h, w = x.shape
                x = self.time_conv(x, cache).view(b, 2, c, t, h, w)
                x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            else:  # the first frame stays one frame
                cache[self] = None
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            last = x[:, :, -1:].clone()
            if self in cache:
                x = self.time_conv(torch.cat([cache[self], x], dim=2))
            cache[self] = last  # on the first chunk, frame 0 passes through unchanged
        return x


class Encoder(nn.Module):
    """conv1 -> per level: residual blocks (+ downsample) -> middle (res, attention, res) -> head."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                time = config.temperal_downsample[level]
                layers.append(Resample(out_dim, "downsample3d" if time else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        width = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width),
                                     ResidualBlock(width, width)])
        self.head = nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, 2 * config.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.head[2](_norm_silu(self.head[0], x), cache)


def decoder_dims(config: VAEConfig) -> list[int]:
    """The decoder's widths: the stem's, then each level's output (the reversed encoder widths)."""
    mult = config.dim_mult
    return [config.dim * m for m in (mult[-1], *mult[::-1])]


class Decoder(nn.Module):
    """conv1 -> middle (res, attention, res) = the stem; then per level: residual blocks (+ upsample,
    which halves the width) -> head = the upsampling path."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        mult, dims = config.dim_mult, decoder_dims(config)
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        time_up = config.temperal_downsample[::-1]
        layers: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the previous level's upsample conv halved the width
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if time_up[level] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def stem(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(z, cache)
        for layer in self.middle:
            x = layer(x, cache)
        return x

    def upsample(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        for layer in self.upsamples:
            x = layer(x, cache)
        return self.head[2](_norm_silu(self.head[0], x), cache)


def decoder_halo(config: VAEConfig) -> int:
    """Radius, in latent pixels, of the receptive field of the decoder's upsampling path: how far
    outside a tile's own area its pixels depend on the stem's output. 13 for Wan2.1.

    Walking back from the output: the head conv reaches 1 pixel, each residual block 2 (two 3x3 convs),
    each upsample's conv 1 at the finer resolution, and the nearest 2x upsampling halves the reach
    (rounded up, since tile edges sit on whole coarse pixels).
    """
    reach = 1
    for level in reversed(range(len(config.dim_mult))):
        reach += 2 * (config.num_res_blocks + 1)
        if level > 0:
            reach = math.ceil((reach + 1) / 2)
    return reach


# ----------------------------------------------------------------------------------------------------
# The model


class WanVAE(nn.Module):
    """The Wan2.1 VAE: `encode` video to normalised latents, `decode` them back to video.

    Load with `WanVAE.from_pth`. The official code runs it in fp32; bf16/fp16 also work (norm
    statistics stay fp32), with outputs always returned in fp32.
    """

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # -> mu, log_var
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    # -- loading ------------------------------------------------------------------------------------

    @classmethod
    def from_pth(cls, path: str | Path, *, device: str | torch.device,
                 dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Load `Wan2.1_VAE.pth` (or a .safetensors with the same keys). Dimensions are read from the
        tensor shapes; missing, unexpected or mis-shaped tensors raise CheckpointError naming the file
        and the key."""
        with open_weights_file(path, "VAE", VAE_FILE) as ckpt:
            shapes = {key: info.shape for key, info in ckpt.infos.items()}
            config = config_from_shapes(shapes, source=str(ckpt.path))
            return cls._build(config, shapes, ckpt.read, source=str(ckpt.path), device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, weights: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, source: str = "state dict") -> "WanVAE":
        """Build from official-named tensors in memory (same checks as `from_pth`)."""
        shapes = {key: tuple(t.shape) for key, t in weights.items()}
        config = config_from_shapes(shapes, source=source)
        return cls._build(config, shapes, weights.__getitem__, source=source, device=device, dtype=dtype)

    @classmethod
    def _build(cls, config: VAEConfig, shapes: Mapping[str, tuple[int, ...]],
               read: Callable[[str], torch.Tensor], *, source: str, device: str | torch.device,
               dtype: torch.dtype) -> "WanVAE":
        if not dtype.is_floating_point:
            raise ValueError(f"the VAE computes in a floating-point dtype, not {dtype}")
        with torch.device("meta"):
            model = cls(config)
        expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        for key in sorted(expected):
            if key not in shapes:
                raise CheckpointError(f"{source}: missing tensor {key!r} (a Wan VAE with {config})")
            if shapes[key] != expected[key]:
                raise CheckpointError(f"{source}: tensor {key!r} has shape {shapes[key]}, expected "
                                      f"{expected[key]} for a Wan VAE with {config}")
        extra = sorted(set(shapes) - set(expected))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r}{more}: not part of a Wan VAE "
                                  f"with {config}")
        state = {}
        for key in expected:
            t = read(key)
            require_float_weight(t.dtype, source, key)
            # copy: `read` may give the memory-mapped file's tensor (a .pth) or the caller's; kept as it is
            # (same device and dtype), the model would change with the file rewritten in place (and
            # crash with it truncated) or with the caller's tensors.
            state[key] = t.to(device=device, dtype=dtype, copy=True)
        model.load_state_dict(state, assign=True)
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the weights)."""
        return self.conv1.weight.dtype

    # -- encode -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, progress: ProgressFn | None = None) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> normalised latents `(mu - mean) / std`
        [B, z_dim, (F-1)//4 + 1, H/8, W/8] in fp32. F must be 4k+1 and H, W multiples of 8.

        Frames go through the encoder in chunks 1, 4, 4, ... (one latent frame each; `progress` after
        each). Only the mean of the posterior is returned, as the pipeline uses it.
        """
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != 3:
            raise InputError(f"video must be [batch, 3, frames, height, width], got {tuple(video.shape)}")
        if not video.is_floating_point():  # uint8 pixels would be taken as values up to 255
            raise InputError(f"video must be floating point in [-1, 1], got {video.dtype}")
        b, _, frames, height, width = video.shape
        ts, ss = cfg.time_stride, cfg.space_stride
        if frames < 1 or (frames - 1) % ts:
            raise InputError(f"frame count must be {ts}k+1 (1, {ts + 1}, {2 * ts + 1}, ...), got {frames}")
        if height % ss or width % ss or height == 0 or width == 0:
            raise InputError(f"height and width must be positive multiples of {ss}, got {height}x{width}")
        latent_frames = cfg.latent_frames(frames)
        cache: Cache = {}
        out = None
        for i in range(latent_frames):
            start, stop = (0, 1) if i == 0 else (1 + ts * (i - 1), 1 + ts * i)
            chunk = self.encoder(video[:, :, start:stop].to(self.device, self.dtype), cache)
            if out is None:
                out = chunk.new_empty(b, chunk.shape[1], latent_frames, *chunk.shape[3:])
            out[:, :, i:i + 1] = chunk
            if progress is not None:
                progress(i + 1, latent_frames)
        mu = self.conv1(out)[:, :cfg.z_dim].float()
        mean, std = self._stats(mu.device)
        return (mu - mean) / std

    # -- decode -------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tile: int | None = None, frames_per_chunk: int = 1,
               output_device: str | torch.device | None = None,
               progress: ProgressFn | None = None) -> torch.Tensor:
        """Normalised latents [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], fp32.
        NaN and ±Inf (from such latents, or an overflow) come out as they are, not clamped to finite values.

        Memory options (results are the same either way):
        - `tile`: run the upsampling path on spatial tiles of `tile` x `tile` latent pixels (each
          widened by `decoder_halo` = 13 pixels of context) instead of whole frames;
        - `frames_per_chunk`: latent frames per decoder call after the first (1 = the reference; more is
          faster on a GPU and costs memory);
        - `output_device`: where the output video is assembled (e.g. "cpu" to keep it off the GPU).
        `decode_memory` estimates the activations of a given choice (bench/RESULTS.md: the measured
        peaks). `progress(done, total)` is called after each chunk of each tile (`done` and `total` count
        latent frames over all tiles).
        """
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.z_dim:
            raise InputError(f"latents must be [batch, {cfg.z_dim}, frames, height, width], "
                             f"got {tuple(latents.shape)}")
        if latents.shape[2] < 1 or 0 in latents.shape[3:]:
            raise InputError(f"latents must have at least one frame and pixel, got {tuple(latents.shape)}")
        if not latents.is_floating_point():
            raise InputError(f"latents must be floating point, got {latents.dtype}")
        # numbers.Integral: numpy's integers too; a float would fail deep inside as a range() step
        if (isinstance(frames_per_chunk, bool) or not isinstance(frames_per_chunk, numbers.Integral)
                or frames_per_chunk < 1):
            raise InputError(f"frames_per_chunk must be an integer of at least 1, got {frames_per_chunk!r}")
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1):
            raise InputError(f"tile must be a positive number of latent pixels or None, got {tile!r}")
        b, _, t, h, w = latents.shape
        mean, std = self._stats(self.device)
        z = self.conv2((latents.to(self.device, torch.float32) * std + mean).to(self.dtype))

        # The stem on whole frames, one latent frame at a time; attention needs the whole frame.
        cache: Cache = {}
        stem = None
        for i in range(t):
            x = self.decoder.stem(z[:, :, i:i + 1], cache)
            if stem is None:
                stem = x.new_empty(b, x.shape[1], t, h, w)
            stem[:, :, i:i + 1] = x
        del z, cache

        ss, ts = cfg.space_stride, cfg.time_stride
        out = torch.empty(b, 3, cfg.video_frames(t), ss * h, ss * w, dtype=torch.float32,
                          device=output_device if output_device is not None else self.device)
        tiles = list(_tiles(h, w, tile, decoder_halo(cfg)))
        done, total = 0, len(tiles) * t
        for (y0, y1, x0, x1), (hy0, hy1, hx0, hx1) in tiles:
            cache = {}
            for a, c in _chunks(t, frames_per_chunk):
                x = self.decoder.upsample(stem[:, :, a:c, hy0:hy1, hx0:hx1], cache)
                x = x[..., ss * (y0 - hy0):ss * (y1 - hy0), ss * (x0 - hx0):ss * (x1 - hx0)]
                f0 = 0 if a == 0 else 1 + ts * (a - 1)
                # The reference's clamp, but for ±Inf: clamped to ±1 it would pass for a saturated pixel,
                # and the caller's check for an overflow (the pipeline's NumericalError) would never see it.
                out[:, :, f0:f0 + x.shape[2], ss * y0:ss * y1, ss * x0:ss * x1] = torch.where(
                    x.isinf(), x, x.clamp(-1, 1))
                done += c - a
                if progress is not None:
                    progress(done, total)
        return out

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latent_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.latent_std, dtype=torch.float32, device=device).view(shape)
        return mean, std


def _chunks(t: int, per_chunk: int) -> Iterator[tuple[int, int]]:
    """Latent frame ranges: [0, 1) alone (it decodes to a single frame), then `per_chunk` at a time."""
    yield 0, 1
    for a in range(1, t, per_chunk):
        yield a, min(a + per_chunk, t)


def _tiles(h: int, w: int, tile: int | None, halo: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(core, widened) latent-pixel boxes (y0, y1, x0, x1) covering an h x w frame."""
    if tile is None or tile >= max(h, w):
        yield (0, h, 0, w), (0, h, 0, w)
        return
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            yield (y0, y1, x0, x1), (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo))


# ----------------------------------------------------------------------------------------------------
# Dimensions from a checkpoint


_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


def _levels(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[int, set[str]]:
    """Index -> kinds of sub-layer ("residual", "shortcut", "resample", "time_conv") under `prefix`."""
    levels: dict[int, set[str]] = {}
    for key in shapes:
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            # Only plain decimals (int() refuses some digits, such as "²", and runs of over 4300): any other
            # key is left to the check of the tensor names, which calls it unexpected.
            if rest and _INDEX.fullmatch(index):
                levels.setdefault(int(index), set()).add(rest.split(".")[0])
    return levels


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], *, source: str) -> VAEConfig:
    """Read dim, z_dim, dim_mult, num_res_blocks and temperal_downsample off the official key layout:
    `encoder.downsamples` holds num_res_blocks residual blocks per level, a resample between levels,
    with a `time_conv` where time is halved too."""
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: missing tensor {key!r}: not a Wan VAE checkpoint")
        if len(shapes[key]) != ndim:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {shapes[key]}, expected {ndim} dims")
        return shapes[key]

    dim = shape("encoder.conv1.weight", 5)[0]
    z_dim = shape("conv2.weight", 5)[0]
    blocks = _levels(shapes, "encoder.downsamples.")
    resamples = sorted(i for i, kinds in blocks.items() if "resample" in kinds)
    if not resamples:
        raise CheckpointError(f"{source}: no 'encoder.downsamples.N.resample.*' tensors: not a Wan VAE "
                              f"checkpoint")
    num_res_blocks = resamples[0]
    dim_mult, temporal = [], []
    for level in range(len(resamples) + 1):
        first = level * (num_res_blocks + 1)
        width = shape(f"encoder.downsamples.{first}.residual.2.weight", 5)[0]
        if width % dim:
            raise CheckpointError(f"{source}: tensor 'encoder.downsamples.{first}.residual.2.weight' has "
                                  f"{width} output channels, not a multiple of dim {dim}")
        dim_mult.append(width // dim)
        if level < len(resamples):
            temporal.append("time_conv" in blocks.get(first + num_res_blocks, set()))
    try:
        return VAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=num_res_blocks,
                         temperal_downsample=tuple(temporal))
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# Memory


def decode_memory(config: VAEConfig, latent_shape: tuple[int, int, int], *, batch: int = 1,
                  dtype: torch.dtype = torch.float32, tile: int | None = None,
                  frames_per_chunk: int = 1) -> dict[str, int]:
    """Estimate, in bytes, the activation memory a `decode` of latents (T, h, w) = `latent_shape` holds
    at its peak on the compute device. Not included: the weights (Wan2.1: 127M parameters, 0.47 GiB
    fp32), the fp32 output video (4·3·F·H·W bytes, 0.36 GiB at 480P/81 frames; `output_device="cpu"`
    keeps it off the device) and convolution workspace (cuDNN's; the CPU's im2col is far larger).

    Terms (every activation in `dtype`, times `batch`):
    - stem: the stem output kept for every latent frame, C0·T·h·w (C0 = dim·dim_mult[-1]);
    - cache: for one tile, each 3-tap causal conv of the upsampling path keeps 2 input frames;
    - work: the largest step of one chunk. A residual block at its conv holds its input, the
      normalised copy, the time-padded copy (+2 frames) and the output: (2 + (n+2)/n)·A_in + A_out for
      activations of n frames.

    Wan2.1 at 480x832, 81 frames (T=21, 60x104), batch 1, fp32, untiled, one latent frame per chunk:
    stem 0.19 GiB + cache 3.45 GiB + work 2.57 GiB = 6.2 GiB of activations; with the weights (0.47
    GiB) and the output (0.36 GiB) on the device, 7.0 GiB. bf16 about halves the activation terms (3.1 GiB).
    `tile=32` cuts cache and work to a tile's widened area (58x58 of 60x104 latent pixels): 3.4 GiB of
    activations, at 2.4x the upsampling compute, as neighbouring tiles recompute the 13-pixel halo;
    `tile=16`: 1.9 GiB. `frames_per_chunk=2` raises work to 4.9 GiB.
    Measured on an H200 (bench/RESULTS.md; max_memory_allocated less the resident weights and inputs):
    8.5 GiB whole-frame and 3.7 GiB with `tile=32`. What the terms leave out (convolution workspace,
    the cuDNN kernels' temporaries) added 2.3 and 0.2 GiB: a bound for a GPU is the measurement, not
    this estimate.
    """
    t, h, w = latent_shape
    size = torch.empty((), dtype=dtype).element_size() * batch
    halo = decoder_halo(config)
    whole = tile is None or tile >= max(h, w)
    th = h if whole else min(h, tile + 2 * halo)
    tw = w if whole else min(w, tile + 2 * halo)
    levels, dims = len(config.dim_mult), decoder_dims(config)
    time_up = config.temperal_downsample[::-1]
    cache = work = 0
    frames = min(frames_per_chunk, max(t - 1, 1))
    for level in range(levels):
        pixels = th * tw * 4 ** level
        in_dim = dims[level] // 2 if level > 0 else dims[level]
        out_dim = dims[level + 1]
        conv_inputs = [in_dim] + [out_dim] * (2 * (config.num_res_blocks + 1) - 1)
        cache += 2 * sum(conv_inputs) * pixels
        step = (2 + (frames + 2) / frames) * in_dim * frames * pixels + out_dim * frames * pixels
        work = max(work, int(step))
        if level < levels - 1 and time_up[level]:
            cache += 2 * out_dim * pixels  # the upsample's time conv
            frames *= 2
    cache += 2 * dims[-1] * th * tw * 4 ** (levels - 1)  # the head conv
    stem = dims[0] * t * h * w
    return {"stem": stem * size, "cache": cache * size, "work": work * size,
            "total": (stem + cache + work) * size}
