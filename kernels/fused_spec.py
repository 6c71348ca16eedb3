"""What the fused memory-bound kernels take and return, shared by their Triton (fused_triton.py) and CUDA
(cuda_ext.py) backends: argument checks done before any launch, and the output shapes (also the fake /
meta implementations of their torch.library ops, so torch.compile can trace them without running them).

Two kernels serve every fused op:

- **rows**: one pass over the rows of a 2-D activation x [M, C] (unit column stride, any row stride):
  optional activation (`ACT_GELU_TANH`), optional normalisation over the row (`NORM_LAYER`: LayerNorm,
  biased variance; `NORM_RMS`: RMSNorm), optional affine `· weight + bias` ([C] fp32), optional adaLN
  modulation `· (1 + scale[b]) + shift[b]` with shift/scale rows of [B, C] fp32 and b = row //
  rows_per_batch; then either a float store (out [M, C] of out_dtype) or per-row symmetric 8-bit
  quantization (out [M, C] int8 / e4m3 codes and scale [M] fp32, the quantize_per_token contract).
  Everything is computed in fp32.
- **qk_norm_rope**: q and k [B, L, C] (unit channel stride, any batch/token strides: views of one QKV
  GEMM output are read in place), RMSNorm over the full width C with weights [C], then 3D RoPE on
  interleaved pairs of every head (cos/sin [L, D/2] fp32 from dit8.rope.rope_table); outputs
  [B, L, H, D] contiguous, float, or 8-bit codes with one scale per (batch, head, token):
  q_scale/k_scale [B, H, L] fp32 (see kernels/qk_norm_rope.py for that layout's contract).

Both return a fixed number of tensors (torch.library ops must): float outputs come with empty scale
tensors.
"""

from __future__ import annotations

from typing import Callable

import torch

from .checks import FLOAT_DTYPES, OpArgumentError, check_rows_not_empty, check_shape, check_tensor

NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2
ACT_NONE, ACT_GELU_TANH = 0, 1

QUANT_OUT = (torch.int8, torch.float8_e4m3fn)
OUT_DTYPES = FLOAT_DTYPES + QUANT_OUT

# How the output helpers allocate: alloc(shape, dtype, device), buffers.new_output or fake_alloc.
Alloc = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def is_quant(dtype: torch.dtype) -> bool:
    """Whether `dtype` is one of the 8-bit code types (the kernels then write codes and scales)."""
    return dtype in QUANT_OUT


def check_rows(op: str, x, weight, bias, shift, scale, norm: int, act: int, rows_per_batch: int,
               out_dtype: torch.dtype) -> None:
    """Raise OpArgumentError unless the rows kernel can run these arguments as given."""
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_rows_not_empty(op, x)
    M, C = x.shape
    if x.stride(1) != 1 and C > 1:
        raise OpArgumentError(f"{op}: x must have unit column stride, got strides {x.stride()}")
    if norm not in (NORM_NONE, NORM_LAYER, NORM_RMS):
        raise OpArgumentError(f"{op}: norm must be 0, 1 or 2, got {norm}")
    if act not in (ACT_NONE, ACT_GELU_TANH):
        raise OpArgumentError(f"{op}: act must be 0 or 1, got {act}")
    if out_dtype not in OUT_DTYPES:
        raise OpArgumentError(f"{op}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(op, name, p, dtypes=(torch.float32,), device=x.device)
            check_shape(op, name, p, (C,))
            if not p.is_contiguous():
                raise OpArgumentError(f"{op}: {name} must be contiguous")
    if (shift is None) != (scale is None):
        raise OpArgumentError(f"{op}: shift and scale go together")
    if shift is not None:
        for name, p in (("shift", shift), ("scale", scale)):
            check_tensor(op, name, p, ndim=2, dtypes=(torch.float32,), device=x.device)
            check_shape(op, name, p, (None, C))
            if p.stride(1) != 1:
                raise OpArgumentError(f"{op}: {name} must have unit column stride, got strides {p.stride()}")
        if shift.shape[0] != scale.shape[0]:
            raise OpArgumentError(f"{op}: shift and scale have {shift.shape[0]} and {scale.shape[0]} rows")
        if rows_per_batch <= 0 or M > shift.shape[0] * rows_per_batch:
            raise OpArgumentError(f"{op}: {M} rows need rows_per_batch > 0 and at most "
                                  f"{shift.shape[0]} batches of it, got rows_per_batch={rows_per_batch}")


def rows_outputs(x: torch.Tensor, out_dtype: torch.dtype, alloc: Alloc) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [M, C] of out_dtype, scale [M] fp32 or [0]) allocated by `alloc(shape, dtype, device)`."""
    M, C = x.shape
    out = alloc((M, C), out_dtype, x.device)
    scale = alloc((M,) if is_quant(out_dtype) else (0,), torch.float32, x.device)
    return out, scale


def check_qk_shapes(op: str, q, k, weight_q, weight_k, cos, sin, heads: int,
                    weight_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """Raise OpArgumentError unless q and k [B, L, C] (one float dtype), the norm weights [C] and the
    RoPE tables [L, head_dim/2] fp32 fit together, C being `heads` heads of an even head_dim."""
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_rows_not_empty(op, q, "q")
    B, L, C = q.shape
    check_tensor(op, "k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_shape(op, "k", k, (B, L, C))
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise OpArgumentError(f"{op}: heads must be a positive int, got {heads!r}")
    if C % heads:
        raise OpArgumentError(f"{op}: width {C} is not a multiple of heads={heads}")
    D = C // heads
    if D % 2:
        raise OpArgumentError(f"{op}: head_dim {D} must be even (RoPE rotates channel pairs)")
    for name, w in (("weight_q", weight_q), ("weight_k", weight_k)):
        check_tensor(op, name, w, dtypes=weight_dtypes, device=q.device)
        check_shape(op, name, w, (C,))
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(op, name, t, dtypes=(torch.float32,), device=q.device)
        check_shape(op, name, t, (L, D // 2))


def check_qk(op: str, q, k, weight_q, weight_k, cos, sin, heads: int, out_dtype: torch.dtype) -> None:
    """check_qk_shapes, and what the kernels add: fp32 contiguous weights and tables, unit channel
    strides, an output dtype they write."""
    check_qk_shapes(op, q, k, weight_q, weight_k, cos, sin, heads, weight_dtypes=(torch.float32,))
    for name, t in (("q", q), ("k", k)):
        if t.stride(2) != 1 and t.shape[2] > 1:
            raise OpArgumentError(f"{op}: {name} must have unit channel stride, got strides {t.stride()}")
    for name, t in (("weight_q", weight_q), ("weight_k", weight_k), ("cos", cos), ("sin", sin)):
        if not t.is_contiguous():
            raise OpArgumentError(f"{op}: {name} must be contiguous")
    if out_dtype not in OUT_DTYPES:
        raise OpArgumentError(f"{op}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def check_residual(op: str, x, y, gate) -> None:
    """Raise OpArgumentError unless x [B, L, C] fp32, y [B, L, C] float and gate [B, C] fp32 (or None)
    fit together: what the residual-add kernel reads."""
    check_tensor(op, "x", x, ndim=3, dtypes=(torch.float32,))
    check_tensor(op, "y", y, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape(op, "y", y, tuple(x.shape))
    if gate is not None:
        check_tensor(op, "gate", gate, dtypes=(torch.float32,), device=x.device)
        check_shape(op, "gate", gate, (x.shape[0], x.shape[2]))


def qk_outputs(q: torch.Tensor, heads: int, out_dtype: torch.dtype,
               alloc: Alloc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_out, k_out [B, L, H, D] of out_dtype, q_scale, k_scale [B, H, L] fp32 or [0])."""
    B, L, C = q.shape
    shape = (B, L, heads, C // heads)
    sshape = (B, heads, L) if is_quant(out_dtype) else (0,)
    return (alloc(shape, out_dtype, q.device), alloc(shape, out_dtype, q.device),
            alloc(sshape, torch.float32, q.device), alloc(sshape, torch.float32, q.device))


def fake_alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The `alloc` of the fake implementations: an uninitialised tensor (a fake one under tracing)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# Calling a backend (the op files' registered functions go through these)
# ----------------------------------------------------------------------------------------------------

def cuda_runs_on(device: torch.device) -> bool:
    """runs_on of the "cuda" registrations; imports cuda_ext (and may build it) only for CUDA tensors."""
    if device.type != "cuda":
        return False
    from . import cuda_ext

    return cuda_ext.cuda_available(device)


def _backend_ops(backend: str):
    if backend == "cuda":
        from . import cuda_ext as module
    else:
        from . import fused_triton as module
    return module


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., C] as the 2-D [M, C] the rows kernel reads: a view when the layout allows, else a copy."""
    if x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] == 1):
        return x
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def run_rows(backend: str, x: torch.Tensor, *, out_dtype: torch.dtype, norm: int = NORM_NONE,
             act: int = ACT_NONE, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, rows_per_batch: int = 1,
             eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows kernel of `backend` ("triton" or "cuda") on x [..., C] -> (out [M, C], scale [M] or [0])."""
    def f32(p):
        return None if p is None else p.float().contiguous()

    def rows_of(p):  # [B, C] fp32 with unit column stride
        return None if p is None else (p if p.stride(-1) == 1 else p.contiguous())

    return _backend_ops(backend).rows_op(as_rows(x), f32(weight), f32(bias), rows_of(shift), rows_of(scale),
                                         norm, act, rows_per_batch, float(eps), out_dtype)


def run_qk(backend: str, q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
           out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q/k RMSNorm + RoPE kernel of `backend` -> (q_out, k_out, q_scale, k_scale)."""
    def unit_last(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    return _backend_ops(backend).qk_norm_rope_op(
        unit_last(q), unit_last(k), weight_q.float().contiguous(), weight_k.float().contiguous(),
        cos.contiguous(), sin.contiguous(), heads, float(eps), out_dtype)
