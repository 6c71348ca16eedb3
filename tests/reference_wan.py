"""Independent float64 reference of the Wan2.1 DiT forward pass (test oracle).

This module is a from-scratch transcription of ``shared/spec/wan21-dit.md`` in plain torch.
It deliberately imports nothing from the project (runtime, kernels, converters) so that it can
serve as an independent oracle for the executor's output.

Everything is computed in float64. With ``matmul_dtype`` set (bf16 or fp16) the official
mixed-precision rounding points are emulated while still computing in float64 between them:

* every Linear in the blocks, ``text_embedding``, the ``img_emb`` linears and the patch embedding:
  input, weight and bias are rounded to ``matmul_dtype``, the product (+ bias) is computed in
  float64 and the result is rounded to ``matmul_dtype``;
* attention (self and cross): q, k, v are rounded before attention, the attention output after;
* ``time_embedding``, ``time_projection``, ``head.head``, all norms, modulation, residual adds and
  RoPE stay float64 (no rounding).

Layers given as 8-bit weights with a per-channel ``weight_scale`` (LightX2V's format) are emulated
as W8A8: the input is quantized per token to the same 8-bit type and the rest stays float64.

Weights use the official key names (``patch_embedding.weight``, ``blocks.N.self_attn.q.weight``,
...). All model dimensions are read from tensor shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["reference_forward"]

F64 = torch.float64

# Query rows processed per attention chunk (bounds memory of the explicit L x L score matrix).
_ATTN_Q_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _round(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round a float64 tensor to ``dtype`` and back (identity when dtype is None)."""
    return x if dtype is None else x.to(dtype).to(F64)


def _w(weights: dict, name: str) -> torch.Tensor:
    """Fetch a weight by official name as float64."""
    return weights[name].to(F64)


def _fake_quantize_rows(x: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    """Symmetric per-row (per-token) quantization to ``qdtype`` and back, in float64."""
    qmax = 127.0 if qdtype == torch.int8 else 448.0
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    y = x / scale
    q = y.round().clamp(-128, 127) if qdtype == torch.int8 else y.clamp(-qmax, qmax).to(qdtype).to(F64)
    return q * scale


def _linear_w8a8(weights: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """W8A8 emulation: an 8-bit weight [out, in] with its per-channel ``weight_scale``; the input is
    quantized per token to the weight's 8-bit type; everything else is exact float64."""
    q = weights[prefix + ".weight"]
    w = q.to(F64) * weights[prefix + ".weight_scale"].to(F64).reshape(-1, 1)
    out = _fake_quantize_rows(x, q.dtype) @ w.transpose(0, 1)
    if prefix + ".bias" in weights:
        out = out + _w(weights, prefix + ".bias")
    return out


def _linear(weights: dict, prefix: str, x: torch.Tensor, md: torch.dtype | None) -> torch.Tensor:
    """``x @ W^T + b`` with optional mixed-precision rounding of input, weight, bias and output.

    A layer stored 8-bit (with ``<prefix>.weight_scale``) is emulated as W8A8 instead.
    """
    if prefix + ".weight_scale" in weights:
        return _linear_w8a8(weights, prefix, x)
    w = _round(_w(weights, prefix + ".weight"), md)
    out = _round(x, md) @ w.transpose(0, 1)
    if prefix + ".bias" in weights:
        out = out + _round(_w(weights, prefix + ".bias"), md)
    return _round(out, md)


def _linear_f64(weights: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Linear that always stays in float64 (time embedding, time projection, head)."""
    return _linear(weights, prefix, x, None)


def _layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim, biased variance; optional affine."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased
    out = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * w.

    Applied to q/k over the FULL width C (all heads together), before the head split.
    """
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------

def _sinusoid(t: torch.Tensor, width: int) -> torch.Tensor:
    """Timestep sinusoid [B, width].

    TRAP: the output is [cos(t*f), sin(t*f)] -- COS FIRST -- with f_j = 10000^(-j/half),
    j = 0..half-1 (exponent divided by half, not by width).
    """
    half = width // 2
    j = torch.arange(half, dtype=F64, device=t.device)
    freqs = torch.pow(10000.0, -j / half)
    ang = t.to(F64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def _patch_embed(weights: dict, x: torch.Tensor, md: torch.dtype | None) -> torch.Tensor:
    """Conv3d with kernel = stride = patch size -> [B, C, T', H', W']."""
    w = _round(_w(weights, "patch_embedding.weight"), md)
    b = _round(_w(weights, "patch_embedding.bias"), md)
    stride = tuple(w.shape[2:])
    out = F.conv3d(_round(x, md), w, b, stride=stride)
    return _round(out, md)


def _text_embed(weights: dict, context: torch.Tensor, text_len: int,
                md: torch.dtype | None) -> torch.Tensor:
    """Zero-pad to text_len rows, then Linear -> GELU(tanh) -> Linear.

    Padded rows become a constant non-zero vector and are attended to (no key mask).
    """
    b, n, d = context.shape
    if n > text_len:
        raise ValueError(f"context has {n} rows > text_len={text_len}")
    padded = torch.zeros(b, text_len, d, dtype=F64, device=context.device)
    padded[:, :n] = context.to(F64)
    h = _linear(weights, "text_embedding.0", padded, md)
    h = _gelu_tanh(h)
    return _linear(weights, "text_embedding.2", h, md)


def _img_embed(weights: dict, clip_fea: torch.Tensor, md: torch.dtype | None) -> torch.Tensor:
    """img_emb.proj: LayerNorm(1e-5, affine) -> Linear -> GELU(erf) -> Linear -> LayerNorm(1e-5, affine)."""
    h = _layer_norm(clip_fea.to(F64), 1e-5, _w(weights, "img_emb.proj.0.weight"),
                    _w(weights, "img_emb.proj.0.bias"))
    h = _linear(weights, "img_emb.proj.1", h, md)
    h = _gelu_erf(h)
    h = _linear(weights, "img_emb.proj.3", h, md)
    return _layer_norm(h, 1e-5, _w(weights, "img_emb.proj.4.weight"),
                       _w(weights, "img_emb.proj.4.bias"))


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------

def _rope_angles(head_dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Angles [L, head_dim // 2] for the 3D RoPE over patch grid (f, h, w).

    Real widths per axis are [d - 4*(d//6), 2*(d//6), 2*(d//6)] (44/42/42 for d=128, i.e.
    22/21/21 complex pairs), ordered frame, row, column inside each head. Pair j of an axis with
    real width D has angle pos * 10000^(-2j/D): each axis is normalised by ITS OWN width D.
    """
    d = head_dim
    widths = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]
    f, h, w = grid
    per_axis = []
    for n_pos, width in zip((f, h, w), widths):
        j = torch.arange(width // 2, dtype=F64)
        inv = torch.pow(torch.tensor(10000.0, dtype=F64), -2.0 * j / width)
        pos = torch.arange(n_pos, dtype=F64)
        per_axis.append(pos[:, None] * inv[None, :])  # [n_pos, width/2]
    af, ah, aw = per_axis
    ang = torch.cat([
        af[:, None, None, :].expand(f, h, w, -1),
        ah[None, :, None, :].expand(f, h, w, -1),
        aw[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1)
    # token index = f*(H'*W') + h*W' + w, matching the row-major reshape below
    return ang.reshape(f * h * w, d // 2)


def _rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x [B, L, heads, d] with angles [L, d/2].

    TRAP: INTERLEAVED pairs -- channels (2k, 2k+1) form one complex number; NOT the half-split
    (rotate_half) layout.
    """
    cos = torch.cos(angles)[None, :, None, :]
    sin = torch.sin(angles)[None, :, None, :]
    x_even = x[..., 0::2]
    x_odd = x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               md: torch.dtype | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out; q [B, Lq, n, d], k/v [B, Lk, n, d] -> [B, Lq, n*d].

    No mask. q, k, v are rounded to md before, the output after.
    """
    q, k, v = _round(q, md), _round(k, md), _round(v, md)
    b, lq, n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    qh = q.permute(0, 2, 1, 3)  # [B, n, Lq, d]
    kh = k.permute(0, 2, 1, 3)
    vh = v.permute(0, 2, 1, 3)
    outs = []
    for s in range(0, lq, _ATTN_Q_CHUNK):
        scores = (qh[:, :, s:s + _ATTN_Q_CHUNK] @ kh.transpose(-1, -2)) * scale
        scores = scores - scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores)
        p = p / p.sum(dim=-1, keepdim=True)
        outs.append(p @ vh)
    out = torch.cat(outs, dim=2).permute(0, 2, 1, 3).reshape(b, lq, n * d)
    return _round(out, md)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, l, c = x.shape
    return x.reshape(b, l, num_heads, c // num_heads)


def _self_attn(weights: dict, p: str, x: torch.Tensor, angles: torch.Tensor, num_heads: int,
               eps: float, md: torch.dtype | None) -> torch.Tensor:
    q = _rms_norm(_linear(weights, p + "q", x, md), _w(weights, p + "norm_q.weight"), eps)
    k = _rms_norm(_linear(weights, p + "k", x, md), _w(weights, p + "norm_k.weight"), eps)
    v = _linear(weights, p + "v", x, md)
    q = _rope(_heads(q, num_heads), angles)
    k = _rope(_heads(k, num_heads), angles)
    out = _attention(q, k, _heads(v, num_heads), md)
    return _linear(weights, p + "o", out, md)


def _cross_attn(weights: dict, p: str, x: torch.Tensor, context: torch.Tensor, n_img: int,
                num_heads: int, eps: float, md: torch.dtype | None) -> torch.Tensor:
    """Cross attention (no RoPE). For I2V the first n_img context rows are the image tokens:
    two separate softmaxes with a shared q, outputs summed, then o."""
    img, txt = context[:, :n_img], context[:, n_img:]
    q = _rms_norm(_linear(weights, p + "q", x, md), _w(weights, p + "norm_q.weight"), eps)
    k = _rms_norm(_linear(weights, p + "k", txt, md), _w(weights, p + "norm_k.weight"), eps)
    v = _linear(weights, p + "v", txt, md)
    qh = _heads(q, num_heads)
    out = _attention(qh, _heads(k, num_heads), _heads(v, num_heads), md)
    if n_img > 0:
        k_img = _rms_norm(_linear(weights, p + "k_img", img, md),
                          _w(weights, p + "norm_k_img.weight"), eps)
        v_img = _linear(weights, p + "v_img", img, md)
        out = out + _attention(qh, _heads(k_img, num_heads), _heads(v_img, num_heads), md)
    return _linear(weights, p + "o", out, md)


# ---------------------------------------------------------------------------------------------
# block, head, unpatchify
# ---------------------------------------------------------------------------------------------

def _block(weights: dict, i: int, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
           n_img: int, angles: torch.Tensor, num_heads: int, eps: float,
           md: torch.dtype | None) -> torch.Tensor:
    p = f"blocks.{i}."
    # modulation [1, 6, C] + e0 [B, 6, C], chunk order:
    # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    m = _w(weights, p + "modulation") + e0
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        m[:, k][:, None, :] for k in range(6))

    h = _layer_norm(x, eps) * (1.0 + scale_msa) + shift_msa
    x = x + _self_attn(weights, p + "self_attn.", h, angles, num_heads, eps, md) * gate_msa

    h = _layer_norm(x, eps, _w(weights, p + "norm3.weight"), _w(weights, p + "norm3.bias"))
    x = x + _cross_attn(weights, p + "cross_attn.", h, context, n_img, num_heads, eps, md)

    h = _layer_norm(x, eps) * (1.0 + scale_mlp) + shift_mlp
    h = _gelu_tanh(_linear(weights, p + "ffn.0", h, md))
    x = x + _linear(weights, p + "ffn.2", h, md) * gate_mlp
    return x


def _head(weights: dict, x: torch.Tensor, e: torch.Tensor, eps: float) -> torch.Tensor:
    """TRAP: the head modulates with e [B, C] (time_embedding output), NOT e0.
    head.modulation [1, 2, C] + e chunked as (shift, scale). Stays float64."""
    m = _w(weights, "head.modulation") + e[:, None, :]
    shift, scale = m[:, 0][:, None, :], m[:, 1][:, None, :]
    h = _layer_norm(x, eps) * (1.0 + scale) + shift
    return _linear_f64(weights, "head.head", h)


def _unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int],
                out_dim: int) -> torch.Tensor:
    """[B, L, pt*ph*pw*out_dim] -> [B, out_dim, f*pt, h*ph, w*pw].

    TRAP: the features are ordered (pt, ph, pw, c) with c FASTEST -- the opposite of the Conv3d
    weight's input order (c slowest).
    """
    b = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch
    x = x.reshape(b, f, h, w, pt, ph, pw, out_dim)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b, c, f, pt, h, ph, w, pw
    return x.reshape(b, out_dim, f * pt, h * ph, w * pw)


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

def reference_forward(weights: dict[str, torch.Tensor], x, t, context, clip_fea=None, y=None, *,
                      num_heads: int, eps: float = 1e-6, text_len: int = 512,
                      matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Wan2.1 DiT forward in float64 (optionally emulating bf16/fp16 matmul rounding).

    x [B, 16, T, H, W] noisy latent; t [B] float timesteps; context [B, Lctx <= text_len, text_dim];
    I2V only (``img_emb.proj.0.weight`` present): clip_fea [B, Lclip, clip_dim], y [B, Cy, T, H, W].
    Returns the velocity [B, out_dim, T, H, W] in float64.
    """
    md = matmul_dtype
    w_patch = weights["patch_embedding.weight"]
    dim, in_dim = int(w_patch.shape[0]), int(w_patch.shape[1])
    patch = tuple(int(s) for s in w_patch.shape[2:])
    out_dim = int(weights["head.head.weight"].shape[0]) // (patch[0] * patch[1] * patch[2])
    freq_dim = int(weights["time_embedding.0.weight"].shape[1])
    n_layers = 0
    while f"blocks.{n_layers}.modulation" in weights:
        n_layers += 1
    is_i2v = "img_emb.proj.0.weight" in weights
    if dim % num_heads:
        raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
    head_dim = dim // num_heads

    x = torch.as_tensor(x).to(F64)
    b = x.shape[0]
    t = torch.as_tensor(t).to(F64).reshape(-1)
    if t.numel() == 1:  # a single timestep is broadcast over the batch
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"t has {t.numel()} entries for batch {b}")

    # 1. (I2V: noise first, then condition) patch embedding, tokens [B, L, C]
    if is_i2v:
        if y is None or clip_fea is None:
            raise ValueError("I2V weights need clip_fea and y")
        x = torch.cat([x, torch.as_tensor(y).to(F64)], dim=1)
    if x.shape[1] != in_dim:
        raise ValueError(f"input has {x.shape[1]} channels, patch embedding expects {in_dim}")
    h = _patch_embed(weights, x, md)
    grid = tuple(int(s) for s in h.shape[2:])
    tokens = h.flatten(2).transpose(1, 2)  # token index f*(H'W') + h*W' + w

    # 2. time: sinusoid (cos first) -> time_embedding (SiLU) -> e; SiLU -> time_projection -> e0
    s = _sinusoid(t, freq_dim)
    e = _linear_f64(weights, "time_embedding.2", _silu(_linear_f64(weights, "time_embedding.0", s)))
    e0 = _linear_f64(weights, "time_projection.1", _silu(e)).reshape(b, 6, dim)

    # 3./4. context: text (zero-padded to text_len) and, for I2V, image tokens first
    ctx = _text_embed(weights, torch.as_tensor(context), text_len, md)
    n_img = 0
    if is_i2v:
        img = _img_embed(weights, torch.as_tensor(clip_fea), md)
        n_img = img.shape[1]
        ctx = torch.cat([img, ctx], dim=1)

    # 5. blocks
    angles = _rope_angles(head_dim, grid).to(tokens.device)
    for i in range(n_layers):
        tokens = _block(weights, i, tokens, e0, ctx, n_img, angles, num_heads, eps, md)

    # 6./7. head and unpatchify
    out = _head(weights, tokens, e, eps)
    return _unpatchify(out, grid, patch, out_dim)
