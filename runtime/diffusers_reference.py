"""diffusers' WanTransformer3DModel on a dit8 model's weights: the baseline `dit8 bench dit --compare
diffusers` times, and an independent implementation the tests compare against. diffusers is optional
(a test-only dependency): everything here imports it when called."""

from __future__ import annotations

import torch

from .layouts import DIFFUSERS, from_official
from .model import WanDiT
from .packed_format import WEIGHT_SCALE_SUFFIX
from .random_dit import Conditioning, float_weight


def to_diffusers(model: WanDiT, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """diffusers' WanTransformer3DModel (SDPA attention) holding `model`'s weights, 8-bit ones dequantized,
    on the model's device, built there (meta construction, then one tensor at a time). dtype: default the
    model's compute dtype; as diffusers' from_pretrained(torch_dtype=...) does, the modules it lists in
    _keep_in_fp32_modules stay fp32. Raises ImportError without diffusers."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    cfg, device = model.config, model.setup.device
    dtype = dtype or model.setup.dtype
    with torch.device("meta"):
        ref = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim if cfg.is_i2v else None)
    keep = ref._keep_in_fp32_modules or []
    for name, param in ref.named_parameters():
        param.data = param.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    ref.to_empty(device=device)
    # RoPE tables are computed in __init__ (non-persistent buffers): on meta they were never made.
    ref.rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, ref.config.rope_max_seq_len).to(device)
    names = {from_official(k, DIFFUSERS): k for k, _ in model.named_buffers() if not k.endswith(WEIGHT_SCALE_SUFFIX)}
    state = ref.state_dict()
    if set(names) != set(state):
        raise RuntimeError(f"diffusers' WanTransformer3DModel tensors differ from dit8's: "
                           f"{sorted(set(names) ^ set(state))[:5]}")
    with torch.no_grad():
        for name, key in names.items():
            state[name].copy_(float_weight(model, key))
    return ref.eval().requires_grad_(False)


def diffusers_inputs(ref: torch.nn.Module, cond: Conditioning) -> dict:
    """Keyword arguments of the diffusers forward for `cond`: x and y concatenated, in its dtype."""
    dtype = ref.proj_out.weight.dtype
    return dict(hidden_states=torch.cat([cond.x, cond.y], dim=1).to(dtype), timestep=cond.t,
                encoder_hidden_states=cond.context.to(dtype), encoder_hidden_states_image=cond.clip_fea.to(dtype),
                return_dict=False)


def diffusers_skip_reason() -> str | None:
    """Why diffusers cannot be used here, or None where it can."""
    try:
        import diffusers  # noqa: F401
        from diffusers import WanTransformer3DModel  # noqa: F401
    except Exception as err:  # ImportError, or a diffusers that does not import with this torch
        return f"diffusers is not importable ({type(err).__name__}: {err})"
    return None


