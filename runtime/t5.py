"""The umT5-XXL text encoder of Wan2.1 (`models_t5_umt5-xxl-enc-bf16.pth`), under Wan's own key names.

A T5 encoder with the umT5 changes: every layer has its own relative position bias (not only the
first), and the vocabulary is 256,384 pieces. Per layer, with x the residual stream:

    x = x + o(attention(q, k, v of rms_norm1(x), bias = position bias of the layer + padding mask))
    x = x + fc2(gelu_tanh(gate(h)) · fc1(h)),  h = rms_norm2(x)

and a final RMSNorm. T5 quirks kept exactly: RMSNorm without mean subtraction (eps 1e-6), attention
scores are plain dot products (no 1/sqrt(d): T5 folds it into its weights), no biases anywhere.

Numerics: the residual stream and every norm are fp32; the matmuls and attention run in the compute
dtype (bf16 in the reference). The output is in the compute dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, load_encoder_weights, open_weights_file
from .errors import CheckpointError, InputError
from .model_folder import T5_FILE

__all__ = ["T5Config", "T5Encoder"]


@dataclass(frozen=True)
class T5Config:
    """Dimensions of a umT5 encoder; the defaults are umT5-XXL's. All but `max_distance` and `eps` are
    read from the weight shapes when loading."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096  # num_heads · head_dim
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not a multiple of num_heads {self.num_heads}")

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "T5Config":
        """Read the dimensions from the tensor shapes of a checkpoint under Wan's key names."""
        def shape(key: str) -> tuple[int, ...]:
            if key not in ckpt.infos:
                raise CheckpointError(f"{ckpt.path}: missing tensor {key!r}; not a Wan umT5 encoder checkpoint")
            return ckpt.infos[key].shape

        layers = {int(m.group(1)) for k in ckpt.keys() if (m := re.match(r"blocks\.(\d+)\.", k))}
        if not layers:
            raise CheckpointError(f"{ckpt.path}: no encoder blocks (blocks.N.*); not a Wan umT5 encoder checkpoint")
        try:
            vocab, dim = shape("token_embedding.weight")
            num_buckets, num_heads = shape("blocks.0.pos_embedding.embedding.weight")
            return cls(vocab=vocab, dim=dim, dim_attn=shape("blocks.0.attn.q.weight")[0],
                       dim_ffn=shape("blocks.0.ffn.fc1.weight")[0], num_heads=num_heads,
                       num_layers=max(layers) + 1, num_buckets=num_buckets)
        except (ValueError, IndexError) as err:  # shapes of the wrong rank, or dimensions that do not fit
            raise CheckpointError(f"{ckpt.path}: not a umT5 encoder of the expected layout: {err}") from None


# -- layers: tensors are buffers named as in the official checkpoint, so state_dict() keys are Wan's --


class Linear(nn.Module):
    weight: torch.Tensor  # buffers: declared, as register_buffer hides their types from type checkers
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 bias: bool = False):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Embedding(nn.Module):
    weight: torch.Tensor

    def __init__(self, num: int, dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("weight", torch.empty(num, dim, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """T5's LayerNorm: x / rms(x) · weight, no mean subtraction, no bias; statistics in fp32."""

    weight: torch.Tensor

    def __init__(self, dim: int, eps: float, device: torch.device):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(out_dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device) -> torch.Tensor:
    """Bucket [L, L] of the offset key − query, bidirectional: half the buckets for keys after the
    query, half for keys before; within each half, offsets below a quarter of the buckets are exact,
    larger ones share logarithmically wider buckets up to `max_distance`, beyond which all share one."""
    offset = torch.arange(length, device=device)[None, :] - torch.arange(length, device=device)[:, None]
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    exact = half // 2
    # For distance 0 the log is -inf; torch.where discards it, but clamp so the cast stays defined.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """One layer's learned bias per (bucket, head); umT5 has one of these in every layer."""

    def __init__(self, config: T5Config, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.embedding = Embedding(config.num_buckets, config.num_heads, dtype, device)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]


class Attention(nn.Module):
    def __init__(self, config: T5Config, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.heads = config.num_heads
        self.q, self.k, self.v = (Linear(config.dim, config.dim_attn, dtype, device) for _ in range(3))
        self.o = Linear(config.dim_attn, config.dim, dtype, device)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # T5 scores are unscaled dot products: scale=1, not 1/sqrt(head_dim).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """Gated GELU: fc2(gelu_tanh(gate(x)) · fc1(x)). `gate` keeps the official Sequential's name, so
    its Linear is `gate.0`."""

    def __init__(self, config: T5Config, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.gate = nn.Sequential(Linear(config.dim, config.dim_ffn, dtype, device), nn.GELU(approximate="tanh"))
        self.fc1 = Linear(config.dim, config.dim_ffn, dtype, device)
        self.fc2 = Linear(config.dim_ffn, config.dim, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class Block(nn.Module):
    def __init__(self, config: T5Config, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.dtype = dtype
        self.norm1 = RMSNorm(config.dim, config.eps, device)
        self.attn = Attention(config, dtype, device)
        self.norm2 = RMSNorm(config.dim, config.eps, device)
        self.ffn = FeedForward(config, dtype, device)
        self.pos_embedding = RelativePositionBias(config, dtype, device)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        # Padding keys get the lowest finite score, as the reference does; not -inf, so that a row with
        # every key masked stays finite.
        bias = self.pos_embedding(buckets).masked_fill(masked, torch.finfo(self.dtype).min)
        x = x + self.attn(self.norm1(x, self.dtype), bias).float()
        return x + self.ffn(self.norm2(x, self.dtype)).float()


class T5Encoder(nn.Module):
    """The umT5 encoder. Build it with `T5Encoder.from_pth`; tensors are allocated here, uninitialised.

    dtype: compute dtype of the matmuls, attention and embeddings: bf16 as in the reference, or fp32.
    (fp16 runs but T5's feed-forward activations are known to overflow it.)
    """

    def __init__(self, config: T5Config, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        device = torch.device(device)
        self.config, self.dtype = config, dtype
        self.token_embedding = Embedding(config.vocab, config.dim, dtype, device)
        self.blocks = nn.ModuleList(Block(config, dtype, device) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.eps, device)

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        return self.norm.weight.device

    @classmethod
    def from_pth(cls, path: str | Path, *, device: torch.device | str,
                 dtype: torch.dtype) -> "T5Encoder":
        """Load Wan's `models_t5_umt5-xxl-enc-bf16.pth` (or any file of that layout, .pth or
        .safetensors), reading one tensor at a time. Dimensions come from the tensor shapes.

        Raises CheckpointError naming the file and key for a missing, unexpected or mis-shaped tensor.
        """
        with open_weights_file(path, "T5 encoder", T5_FILE) as ckpt:
            model = cls(T5Config.from_checkpoint(ckpt), device=device, dtype=dtype)
            load_encoder_weights(model, ckpt)
        return model.eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, dim] in the compute dtype for token ids [B, L] and mask [B, L] (1 for
        real tokens, EOS included; 0 for padding).

        Padding is masked as keys only, so the rows of real tokens do not depend on how much padding
        follows: callers may cut ids and mask to the longest real length first and get the same rows.
        Rows of padding positions are computed but meaningless; the pipeline drops them.
        """
        cfg = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"ids must be an int64 or int32 tensor [batch, length], got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
                             f"{' ' + str(ids.dtype) if isinstance(ids, torch.Tensor) else ''}")
        if 0 in ids.shape:  # a tokenized prompt has at least its EOS
            raise InputError(f"ids must hold at least one token of one prompt, got shape {tuple(ids.shape)}")
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise InputError(f"mask must be a tensor of the ids' shape {tuple(ids.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab):
            raise InputError(f"token ids must lie in [0, {cfg.vocab}); got {int(ids.min())}..{int(ids.max())}")
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Buckets depend only on the length: computed once, each layer looks up its own bias table.
        buckets = relative_position_buckets(ids.shape[1], cfg.num_buckets, cfg.max_distance, self.device)
        masked = (mask == 0)[:, None, None, :]  # [B, 1, 1, L]: padding as keys
        x = self.token_embedding(ids).float()
        for block in self.blocks:
            x = block(x, buckets, masked)
        return self.norm(x, self.dtype)

    if TYPE_CHECKING:  # nn.Module's __call__ returns Any: callers get forward's types
        __call__ = forward
