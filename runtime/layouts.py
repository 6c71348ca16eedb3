"""Key layouts of Wan2.1 DiT checkpoints: detection and mapping to the official names.

Everything inside dit8 uses the official names (spec: `blocks.N.self_attn.q.weight`, ...). Diffusers
names map one-to-one without reshapes; ComfyUI files prefix the official names.
"""

from __future__ import annotations

import re
from typing import Iterable

from .config import WanConfig

OFFICIAL, DIFFUSERS, COMFYUI = "official", "diffusers", "comfyui"
LAYOUTS = (OFFICIAL, DIFFUSERS, COMFYUI)
COMFYUI_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# Module paths outside the blocks: official -> diffusers.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
# Module paths inside `blocks.N.`: official -> diffusers.
_IN_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "norm3": "norm2",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
# Leaf names a module path may carry (quantized files add the scale tensors).
LEAVES = ("weight", "bias", "weight_scale", "scale_weight")

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _split_leaf(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    if leaf in LEAVES:
        return module, "." + leaf
    return key, ""  # a bare parameter such as `head.modulation`


def _translate(key: str, top: dict[str, str], block: dict[str, str]) -> str | None:
    module, leaf = _split_leaf(key)
    m = _BLOCK_KEY.match(module)
    if m:
        inner = block.get(m.group(2))
        return None if inner is None else f"blocks.{m.group(1)}.{inner}{leaf}"
    outer = top.get(module)
    return None if outer is None else outer + leaf


_TOP_LEVEL_BACK = {v: k for k, v in _TOP_LEVEL.items()}
_IN_BLOCK_BACK = {v: k for k, v in _IN_BLOCK.items()}


def _shows_layout(key: str, layout: str) -> bool:
    if layout == COMFYUI:
        return key.startswith(COMFYUI_PREFIXES)
    return layout == DIFFUSERS and (key.startswith("condition_embedder.") or key.endswith(".scale_shift_table"))


def detect_layout(keys: Iterable[str]) -> str:
    """Name the layout of a checkpoint from its keys: official, diffusers or comfyui."""
    keys = list(keys)
    return next((layout for layout in (COMFYUI, DIFFUSERS) if layout_evidence(keys, layout) is not None), OFFICIAL)


def layout_evidence(keys: Iterable[str], layout: str) -> str | None:
    """The first of `keys` by which detect_layout found `layout` (None for official, found by default)."""
    return next((k for k in keys if _shows_layout(k, layout)), None)


def to_official(key: str, layout: str) -> str | None:
    """The official name of `key` in `layout`, or None where the key has no official counterpart."""
    if layout == OFFICIAL:
        return key
    if layout == COMFYUI:
        for prefix in COMFYUI_PREFIXES:
            if key.startswith(prefix):
                return key[len(prefix):]
        return None
    if layout == DIFFUSERS:
        return _translate(key, _TOP_LEVEL_BACK, _IN_BLOCK_BACK)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def from_official(key: str, layout: str) -> str:
    """The name of official key `key` in `layout`."""
    if layout == OFFICIAL:
        return key
    if layout == COMFYUI:
        return COMFYUI_PREFIXES[0] + key
    if layout == DIFFUSERS:
        name = _translate(key, _TOP_LEVEL, _IN_BLOCK)
        if name is None:
            raise KeyError(f"{key!r} is not an official Wan2.1 DiT key")
        return name
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def expected_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a float checkpoint of `config`, official names, with its shape."""
    C = config.dim
    pt, ph, pw = config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (C, config.in_dim, pt, ph, pw), "patch_embedding.bias": (C,),
        "text_embedding.0.weight": (C, config.text_dim), "text_embedding.0.bias": (C,),
        "text_embedding.2.weight": (C, C), "text_embedding.2.bias": (C,),
        "time_embedding.0.weight": (C, config.freq_dim), "time_embedding.0.bias": (C,),
        "time_embedding.2.weight": (C, C), "time_embedding.2.bias": (C,),
        "time_projection.1.weight": (6 * C, C), "time_projection.1.bias": (6 * C,),
        "head.modulation": (1, 2, C),
        "head.head.weight": (config.out_dim * pt * ph * pw, C), "head.head.bias": (config.out_dim * pt * ph * pw,),
    }
    if config.is_i2v:
        E = config.clip_dim
        shapes.update({
            "img_emb.proj.0.weight": (E,), "img_emb.proj.0.bias": (E,),
            "img_emb.proj.1.weight": (E, E), "img_emb.proj.1.bias": (E,),
            "img_emb.proj.3.weight": (C, E), "img_emb.proj.3.bias": (C,),
            "img_emb.proj.4.weight": (C,), "img_emb.proj.4.bias": (C,),
        })
    for n in range(config.num_layers):
        b = f"blocks.{n}."
        shapes[b + "modulation"] = (1, 6, C)
        shapes[b + "norm3.weight"] = (C,)
        shapes[b + "norm3.bias"] = (C,)
        for name, (out, inp) in block_linears(config).items():
            shapes[f"{b}{name}.weight"] = (out, inp)
            shapes[f"{b}{name}.bias"] = (out,)
        for norm in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k"):
            shapes[f"{b}{norm}.weight"] = (C,)
        if config.is_i2v:
            shapes[b + "cross_attn.norm_k_img.weight"] = (C,)
    return shapes


def block_linears(config: WanConfig) -> dict[str, tuple[int, int]]:
    """The linear layers of one block (names inside `blocks.N.`) with their [out, in] shapes."""
    C, F = config.dim, config.ffn_dim
    names = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
             "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"]
    if config.is_i2v:
        names += ["cross_attn.k_img", "cross_attn.v_img"]
    linears = {name: (C, C) for name in names}
    linears["ffn.0"] = (F, C)
    linears["ffn.2"] = (C, F)
    return linears
