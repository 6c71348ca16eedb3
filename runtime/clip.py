"""The CLIP ViT-H/14 vision tower of Wan2.1 I2V
(`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, open-clip/Wan key names under `visual.`).

Wan conditions on the output of the first 31 of the 32 blocks (the penultimate block), without the
post-norm or the projection head: [B, 257, 1280] for a 224×224 image (16×16 patches of 14 plus the
CLS token). The tower is a pre-norm ViT:

    x = pre_norm(cat[cls, patch_conv(image)] + pos)
    x = x + proj(attention(to_qkv(norm1(x))));  x = x + mlp(norm2(x))   (exact GELU, LayerNorm eps 1e-5)

Only the blocks that are used are loaded; the last block, `visual.post_norm`, `visual.head`, the text
tower (`textual.*`) and `log_scale` are recognised and skipped.

Numerics: residual stream and LayerNorms in fp32; matmuls and attention in the compute dtype (fp16 in
the reference). Preprocessing runs in fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, load_encoder_weights, open_weights_file
from .errors import CheckpointError, InputError
from .model_folder import CLIP_FILE
from .t5 import Linear

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPVisionConfig", "CLIPVisionEncoder"]

# OpenAI CLIP's normalisation, which Wan's open-clip ViT-H uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREFIX = "visual."


# Blocks of the vision towers whose width and patch identify them: the file's highest block index
# decides which block's output is the penultimate one, so a tower known to have more is refused.
KNOWN_BLOCK_COUNTS = {(1280, 14): 32}  # ViT-H/14, Wan's open-clip xlm-roberta-large-vit-huge-14


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Dimensions of the vision tower; defaults are ViT-H/14's. All but `num_heads` and `eps` are read
    from the weight shapes when loading (the file does not record the head count)."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32  # blocks in the file; the encoder runs the first num_layers - 1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_layers < 2:
            raise ValueError(f"num_layers {self.num_layers}: the penultimate block needs at least 2")

    @property
    def num_tokens(self) -> int:
        """Patches of an image_size image plus the class token (257 for ViT-H/14 at 224)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, **fixed: int) -> "CLIPVisionConfig":
        """Read the dimensions from the tensor shapes of a checkpoint under open-clip/Wan key names;
        `fixed` gives those the shapes do not record (num_heads)."""
        def shape(key: str) -> tuple[int, ...]:
            if PREFIX + key not in ckpt.infos:
                raise CheckpointError(f"{ckpt.path}: missing tensor {PREFIX + key!r}; not a Wan CLIP checkpoint")
            return ckpt.infos[PREFIX + key].shape

        layers = {int(m.group(1)) for k in ckpt.keys() if (m := re.match(r"visual\.transformer\.(\d+)\.", k))}
        if not layers:
            raise CheckpointError(f"{ckpt.path}: no vision blocks ({PREFIX}transformer.N.*); not a Wan CLIP checkpoint")
        try:
            dim, _, patch, _ = shape("patch_embedding.weight")
            known = KNOWN_BLOCK_COUNTS.get((dim, patch))
            if known is not None and max(layers) + 1 != known:
                # The count decides which block's output is used: one missing at the end would silently
                # shift the encoder's output to an earlier block.
                raise CheckpointError(f"{ckpt.path}: a vision tower of width {dim} and {patch}-pixel patches "
                                      f"(ViT-H/14) has {known} blocks ({PREFIX}transformer.0-{known - 1}); this one "
                                      f"has {max(layers) + 1}: a truncated or different checkpoint")
            grid = round((shape("pos_embedding")[1] - 1) ** 0.5)
            return cls(**{**dict(image_size=grid * patch, patch_size=patch, dim=dim, num_layers=max(layers) + 1,
                                 mlp_dim=shape("transformer.0.mlp.0.weight")[0]), **fixed})
        except (ValueError, IndexError) as err:  # shapes of the wrong rank, or dimensions that do not fit
            raise CheckpointError(f"{ckpt.path}: not a CLIP vision tower of the expected layout: {err}") from None


class LayerNorm(nn.Module):
    """Affine LayerNorm, fp32 parameters and statistics, output in `out_dtype`."""

    weight: torch.Tensor  # buffers: declared, as register_buffer hides their types from type checkers
    bias: torch.Tensor

    def __init__(self, dim: int, eps: float, device: torch.device):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(dim, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight, self.bias, self.eps).to(out_dtype)


class PatchEmbedding(nn.Module):
    """Conv2d with kernel = stride = patch and no bias (the tower is pre-norm): image -> [B, patches, C]."""

    weight: torch.Tensor

    def __init__(self, dim: int, patch: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("weight", torch.empty(dim, 3, patch, patch, dtype=dtype, device=device))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.weight.shape[-1]
        return F.conv2d(pixels.to(self.weight.dtype), self.weight, stride=p).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: CLIPVisionConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.heads = config.num_heads
        self.to_qkv = Linear(config.dim, 3 * config.dim, dtype, device, bias=True)  # rows: q, then k, then v
        self.proj = Linear(config.dim, config.dim, dtype, device, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.to_qkv(x).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, config: CLIPVisionConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.dtype = dtype
        self.norm1 = LayerNorm(config.dim, config.eps, device)
        self.attn = Attention(config, dtype, device)
        self.norm2 = LayerNorm(config.dim, config.eps, device)
        # `mlp.0` and `mlp.2` as in the official Sequential (GELU at index 1; exact, not tanh or quick).
        self.mlp = nn.Sequential(Linear(config.dim, config.mlp_dim, dtype, device, bias=True), nn.GELU(),
                                 Linear(config.mlp_dim, config.dim, dtype, device, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, self.dtype)).float()
        return x + self.mlp(self.norm2(x, self.dtype)).float()


class CLIPVisionEncoder(nn.Module):
    """The vision tower up to its penultimate block. Build it with `CLIPVisionEncoder.from_pth`; tensors
    are allocated here, uninitialised. Its state_dict() keys are the file's without `visual.`.

    dtype: compute dtype of the patch convolution, matmuls and attention (fp16 or bf16 on a GPU, fp32).
    """

    cls_embedding: torch.Tensor
    pos_embedding: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: CLIPVisionConfig, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        device = torch.device(device)
        self.config, self.dtype = config, dtype
        C, p = config.dim, config.patch_size
        self.patch_embedding = PatchEmbedding(C, p, dtype, device)
        self.register_buffer("cls_embedding", torch.empty(1, 1, C, dtype=torch.float32, device=device))
        self.register_buffer("pos_embedding", torch.empty(1, config.num_tokens, C, dtype=torch.float32, device=device))
        self.pre_norm = LayerNorm(C, config.eps, device)
        # Only the blocks whose output is used: all but the last.
        self.transformer = nn.ModuleList(Block(config, dtype, device) for _ in range(config.num_layers - 1))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.pos_embedding.device

    @classmethod
    def from_pth(cls, path: str | Path, *, device: torch.device | str, dtype: torch.dtype,
                 num_heads: int = 16) -> "CLIPVisionEncoder":
        """Load the vision tower from Wan's CLIP `.pth` (or a .safetensors of that layout), one tensor at a
        time. Dimensions come from the tensor shapes; `num_heads` (16 for ViT-H/14) is not recorded.

        Raises CheckpointError naming the file and key for a missing, unexpected or mis-shaped tensor.
        """
        with open_weights_file(path, "CLIP encoder", CLIP_FILE) as ckpt:
            config = CLIPVisionConfig.from_checkpoint(ckpt, num_heads=num_heads)
            model = cls(config, device=device, dtype=dtype)
            last = f"{PREFIX}transformer.{config.num_layers - 1}."

            def unused(key: str) -> bool:
                # The text tower, the CLIP logit scale, and the vision parts after the penultimate block.
                return (key.startswith("textual.") or key == "log_scale" or key.startswith(last)
                        or key.startswith(f"{PREFIX}post_norm.") or key == f"{PREFIX}head")

            load_encoder_weights(model, ckpt, prefix=PREFIX, skip=unused)
        return model.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> normalised pixels [B, 3, S, S] fp32, S = image_size: bicubic
        resize of the whole image (no crop, no antialias, no clamp: as the reference's F.interpolate),
        mapped to [0, 1], normalised with CLIP's mean and std."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            raise InputError(f"images must be a float tensor [batch, 3, height, width] in [-1, 1], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if 0 in images.shape:  # the resize and the attention fail on it with torch's own errors
            raise InputError(f"images must hold at least one image of at least one pixel, got {tuple(images.shape)}")
        size = (self.config.image_size,) * 2
        x = F.interpolate(images.to(self.device, torch.float32), size=size, mode="bicubic", align_corners=False)
        return (x * 0.5 + 0.5 - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Output of the penultimate block [B, tokens, dim] (compute dtype) for normalised pixels
        [B, 3, image_size, image_size]."""
        S = self.config.image_size
        if not isinstance(pixels, torch.Tensor):
            raise InputError(f"pixels must be a tensor (batch, 3, {S}, {S}), got {type(pixels).__name__}")
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S) or pixels.shape[0] < 1:
            raise InputError(f"pixels have shape {tuple(pixels.shape)}; expected (batch, 3, {S}, {S})")
        patches = self.patch_embedding(pixels.to(self.device)).float()
        x = torch.cat([self.cls_embedding.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embedding
        x = self.pre_norm(x, torch.float32)
        for block in self.transformer:
            x = block(x)
        return x.to(self.dtype)

    if TYPE_CHECKING:  # nn.Module's __call__ returns Any: callers get forward's types
        __call__ = forward

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP features [B, 257, 1280] (for ViT-H/14) of images [B, 3, H, W] in [-1, 1]."""
        return self(self.preprocess(images))
