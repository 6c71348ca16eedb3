"""Tiny random text and image encoders under the real key names, and a tiny tokenizer folder, for the
tests and the demo. The files have the official layout, so they load through the real code paths:
`T5Encoder.from_pth`, `CLIPVisionEncoder.from_pth` and `Tokenizer.from_folder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .clip import CLIPVisionConfig, CLIPVisionEncoder
from .t5 import T5Config, T5Encoder

__all__ = ["TINY_WORDS", "build_random_clip", "build_random_t5", "random_clip_weights", "random_t5_weights",
           "tiny_clip_config", "tiny_t5_config", "write_tiny_clip", "write_tiny_t5", "write_tiny_tokenizer"]


def tiny_t5_config(**overrides: Any) -> T5Config:
    """umT5's layout at toy size; dim 64 matches `tiny_config().text_dim`, vocab covers the tiny tokenizer."""
    base = dict(vocab=128, dim=64, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=2, num_buckets=32)
    return T5Config(**{**base, **overrides})


def tiny_clip_config(**overrides: Any) -> CLIPVisionConfig:
    """ViT-H/14's layout at toy width; 224×224 images and 14-pixel patches keep the real 257 tokens, dim
    32 matches `tiny_config().clip_dim`, and 16 heads is what `from_pth` assumes by default."""
    base = dict(image_size=224, patch_size=14, dim=32, mlp_dim=128, num_heads=16, num_layers=3)
    return CLIPVisionConfig(**{**base, **overrides})


def _linear(gen: torch.Generator, out_features: int, in_features: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5


def _norm(gen: torch.Generator, dim: int) -> torch.Tensor:
    return 1 + 0.1 * torch.randn(dim, generator=gen)


def random_t5_weights(config: T5Config, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 weights under Wan's T5 key names, scaled so activations stay O(1) through every layer
    (q is scaled down by sqrt(head_dim) since T5 does not scale its scores)."""
    gen = torch.Generator().manual_seed(seed)
    c = config
    head_dim = c.dim_attn // c.num_heads
    w = {"token_embedding.weight": torch.randn(c.vocab, c.dim, generator=gen)}
    for i in range(c.num_layers):
        p = f"blocks.{i}."
        w[p + "norm1.weight"] = _norm(gen, c.dim)
        w[p + "attn.q.weight"] = _linear(gen, c.dim_attn, c.dim, head_dim ** -0.5)
        w[p + "attn.k.weight"] = _linear(gen, c.dim_attn, c.dim)
        w[p + "attn.v.weight"] = _linear(gen, c.dim_attn, c.dim)
        w[p + "attn.o.weight"] = _linear(gen, c.dim, c.dim_attn)
        w[p + "norm2.weight"] = _norm(gen, c.dim)
        w[p + "ffn.gate.0.weight"] = _linear(gen, c.dim_ffn, c.dim)
        w[p + "ffn.fc1.weight"] = _linear(gen, c.dim_ffn, c.dim)
        w[p + "ffn.fc2.weight"] = _linear(gen, c.dim, c.dim_ffn)
        w[p + "pos_embedding.embedding.weight"] = torch.randn(c.num_buckets, c.num_heads, generator=gen)
    w["norm.weight"] = _norm(gen, c.dim)
    return w


def _clip_block(gen: torch.Generator, prefix: str, dim: int, mlp_dim: int) -> dict[str, torch.Tensor]:
    return {
        prefix + "norm1.weight": _norm(gen, dim), prefix + "norm1.bias": 0.05 * torch.randn(dim, generator=gen),
        prefix + "attn.to_qkv.weight": _linear(gen, 3 * dim, dim),
        prefix + "attn.to_qkv.bias": 0.05 * torch.randn(3 * dim, generator=gen),
        prefix + "attn.proj.weight": _linear(gen, dim, dim),
        prefix + "attn.proj.bias": 0.05 * torch.randn(dim, generator=gen),
        prefix + "norm2.weight": _norm(gen, dim), prefix + "norm2.bias": 0.05 * torch.randn(dim, generator=gen),
        prefix + "mlp.0.weight": _linear(gen, mlp_dim, dim),
        prefix + "mlp.0.bias": 0.05 * torch.randn(mlp_dim, generator=gen),
        prefix + "mlp.2.weight": _linear(gen, dim, mlp_dim),
        prefix + "mlp.2.bias": 0.05 * torch.randn(dim, generator=gen),
    }


def random_clip_weights(config: CLIPVisionConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole CLIP file under Wan/open-clip names: the vision tower (every block,
    post_norm and head included) plus a few text-tower tensors and `log_scale`, which loading skips."""
    gen = torch.Generator().manual_seed(seed)
    c, p = config, config.patch_size
    w = {
        "visual.patch_embedding.weight": _linear(gen, c.dim, 3 * p * p).view(c.dim, 3, p, p),
        "visual.cls_embedding": 0.5 * torch.randn(1, 1, c.dim, generator=gen),
        "visual.pos_embedding": 0.5 * torch.randn(1, c.num_tokens, c.dim, generator=gen),
        "visual.pre_norm.weight": _norm(gen, c.dim), "visual.pre_norm.bias": 0.05 * torch.randn(c.dim, generator=gen),
    }
    for i in range(c.num_layers):
        w.update(_clip_block(gen, f"visual.transformer.{i}.", c.dim, c.mlp_dim))
    w["visual.post_norm.weight"] = _norm(gen, c.dim)
    w["visual.post_norm.bias"] = torch.zeros(c.dim)
    w["visual.head"] = torch.randn(c.dim, 16, generator=gen)
    w["log_scale"] = torch.tensor(2.6593)
    text_dim = 24
    w["textual.token_embedding.weight"] = torch.randn(50, text_dim, generator=gen)
    w["textual.pos_embedding.weight"] = torch.randn(20, text_dim, generator=gen)
    w["textual.norm.weight"] = _norm(gen, text_dim)
    w["textual.blocks.0.attn.q.weight"] = _linear(gen, text_dim, text_dim)
    w["textual.head.0.weight"] = _linear(gen, 20, text_dim)
    return w


def build_random_t5(config: T5Config | None = None, *, device: torch.device | str,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> T5Encoder:
    """A T5Encoder (umT5-XXL by default) with random weights drawn directly on `device`, in place: no CPU
    copy of the model and no file, so the real size (5.7 B parameters, 11.4 GB in bf16) fits a GPU
    benchmark. Same scaling as `random_t5_weights`; the values differ (drawn by the device's generator)."""
    config = config or T5Config()
    model = T5Encoder(config, device=device, dtype=dtype)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    head_dim = config.dim_attn // config.num_heads
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                t.normal_(1.0, 0.1, generator=gen)
            elif name == "token_embedding.weight" or name.endswith("pos_embedding.embedding.weight"):
                t.normal_(0.0, 1.0, generator=gen)
            else:  # a linear [out, in]; q scaled down by sqrt(head_dim), as T5 does not scale its scores
                scale = head_dim ** -0.5 if name.endswith("attn.q.weight") else 1.0
                t.normal_(0.0, scale / t.shape[1] ** 0.5, generator=gen)
    return model.eval()


def build_random_clip(config: CLIPVisionConfig | None = None, *, device: torch.device | str,
                      dtype: torch.dtype = torch.float16, seed: int = 0) -> CLIPVisionEncoder:
    """A CLIPVisionEncoder (ViT-H/14 by default: the first 31 of 32 blocks) with random weights drawn
    directly on `device`, in place (no CPU copy, no file). Same scaling as `random_clip_weights`; the
    values differ (drawn by the device's generator)."""
    config = config or CLIPVisionConfig()
    model = CLIPVisionEncoder(config, device=device, dtype=dtype)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        # state_dict: the persistent tensors only (not CLIP's mean/std constants)
        for name, t in model.state_dict(keep_vars=True).items():
            if name in ("cls_embedding", "pos_embedding"):
                t.normal_(0.0, 0.5, generator=gen)
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "pre_norm.weight":
                t.normal_(1.0, 0.1, generator=gen)
            elif name.endswith(".bias"):
                t.normal_(0.0, 0.05, generator=gen)
            else:  # linear [out, in] or the patch convolution [C, 3, p, p]: N(0, 1/fan_in)
                t.normal_(0.0, t[0].numel() ** -0.5, generator=gen)
    return model.eval()


def _save(weights: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(dtype).contiguous() for k, v in weights.items()}, path)
    return path


def write_tiny_t5(path: str | Path, config: T5Config | None = None, *, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write random T5 weights as a `.pth` in the layout of `models_t5_umt5-xxl-enc-bf16.pth`."""
    return _save(random_t5_weights(config or tiny_t5_config(), seed=seed), path, dtype)


def write_tiny_clip(path: str | Path, config: CLIPVisionConfig | None = None, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write random CLIP weights as a `.pth` in the layout of
    `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`. Load it with the config's num_heads."""
    return _save(random_clip_weights(config or tiny_clip_config(), seed=seed), path, dtype)


TINY_WORDS = ("a the of and in on with at to is are from by cat dog bird fish horse person woman man child "
              "walks runs jumps flies swims sits looks smiles dances through over under across near street "
              "beach forest city river sky sea snow rain sun night day red blue green white black small big "
              "slowly quickly camera moves zooms pans video scene light").split()


def write_tiny_tokenizer(folder: str | Path, words: list[str] | tuple[str, ...] = TINY_WORDS) -> Path:
    """Write a word-level tokenizer.json (+ special_tokens_map.json) with umT5's special ids: <pad> 0,
    </s> 1, <unk> 2. Like the real file, its post-processor appends </s> (the Tokenizer must not rely on
    it, and must not add a second one). Returns the folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [w for w in dict.fromkeys(words) if w not in specials])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens(specials)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
    return folder
