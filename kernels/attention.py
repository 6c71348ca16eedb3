"""Attention ops on [B, L, H, D] tensors: softmax(q·kᵀ/√D)·v, bidirectional, no mask.

Backends:
- "torch": the reference, F.scaled_dot_product_attention in the inputs' dtype; no 8-bit paths.
- "triton" (kernels/attention_triton.py and attention_8bit_triton.py, imported lazily so dit8 imports
  without triton): flash attention with online softmax for precision "bf16"; the 8-bit paths "int8"
  (INT8 q·kᵀ and INT8 P·V) and "fp8" (INT8 q·kᵀ, FP8 e4m3 P·V), both with K, Q and V mean-smoothing
  (q's term added back as a per-key fp32 bias), per-block scales, statistics and accumulation in
  fp32; and the fused I2V cross-attention (text and image softmaxes in one launch). It needs
  head_dim <= 256 (Wan's 128 is the tuned case; other widths are padded to a power of two >= 16,
  >= 32 on the 8-bit paths; backend "auto" gives wider heads in 16-bit precision to torch) and at
  least one key. Its kernels address each (batch, head) slice with 32-bit offsets (`slice_offset`):
  Wan's self-attention fits up to 419,431 tokens; "auto" gives longer 16-bit attention to torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit8.choices import PRECISIONS

from .checks import FLOAT_DTYPES, INT32_MAX, OpArgumentError, check_int32_offset, check_shape, check_tensor
from .registry import BackendError, register, require_fp8_tensor_cores, resolve
from .triton_support import triton_runs_on


# The widest head the kernels take (their tiles keep a row of q, k and v in registers); "auto" leaves
# wider heads to SDPA.
MAX_HEAD_DIM = 256


def _auto_for_head_dim(backend: str, head_dim: int) -> str:
    return "torch" if backend == "auto" and head_dim > MAX_HEAD_DIM else backend


def slice_offset(rows: int, row_stride: int, head_dim: int) -> int:
    """The largest element offset the Triton kernels form in 32 bits in a [B, rows, H, head_dim] tensor whose
    rows are row_stride elements apart: they address each (batch, head) slice from a 64-bit base with
    int32 offsets, up to (rows - 1)·row_stride + head_dim - 1. Wan's contiguous rows of 40 heads x 128
    (5120 elements) fit up to 419,431 rows (tokens)."""
    return (rows - 1) * row_stride + head_dim - 1 if rows > 0 else 0


def kernel_row_stride(x: torch.Tensor) -> int:
    """The row stride of x [B, L, H, D] as the Triton kernels read it: a tensor with another channel stride
    is read as its contiguous copy."""
    return x.stride(1) if x.stride(-1) == 1 or x.shape[-1] == 1 else x.shape[2] * x.shape[3]


def _slices(named: dict[str, torch.Tensor | None]) -> list[tuple[str, int, int]]:
    """(argument, rows, row stride) of every tensor of `named` ({argument: [B, L, H, D] or None}, q first)
    and of the contiguous output of q's shape, as the Triton kernels read and write them."""
    q = named["q"]
    return [*((n, t.shape[1], kernel_row_stride(t)) for n, t in named.items() if t is not None),
            ("the output", q.shape[1], q.shape[2] * q.shape[3])]


def check_rows_offset(op: str, name: str, rows: int, row_stride: int, width: int, hint: str = "") -> None:
    """OpArgumentError naming `name` unless `rows` rows of `width` elements, row_stride apart, fit the
    Triton kernels' 32-bit offsets (`slice_offset`)."""
    check_int32_offset(op, name, slice_offset(rows, row_stride, width), f"{rows:,} rows {row_stride:,} elements "
                       f"apart, (rows - 1)·{row_stride:,} + {width} - 1", hint)


def check_slice_offsets(op: str, named: dict[str, torch.Tensor | None], hint: str = "") -> None:
    """OpArgumentError unless every tensor of `named` ({argument: [B, L, H, D] or None}, q first) and the
    contiguous output of q's shape fit the Triton kernels' 32-bit offsets (`slice_offset`)."""
    D = named["q"].shape[3]
    for name, rows, stride in _slices(named):
        check_rows_offset(op, name, rows, stride, D, hint)


def max_attention_tokens(precision: str, backend: str, heads: int, head_dim: int) -> int | None:
    """The most tokens (rows of q, k and v, each a contiguous row of heads x head_dim) that
    `attention(precision=precision, backend=backend)` takes, or None where it takes any number: the Triton
    kernels bound them through their 32-bit offsets (`slice_offset`). "auto" gives longer 16-bit attention
    to torch; the 8-bit paths have no such way out. Lets a caller refuse a sequence before the work that
    leads up to its attention."""
    if backend == "torch" or (precision == "bf16" and backend != "triton"):
        return None
    return (INT32_MAX - head_dim + 1) // (heads * head_dim) + 1


def _auto_for_offsets(backend: str, named: dict[str, torch.Tensor | None]) -> str:
    """"torch" where "auto" would hand the tensors of `named` to a Triton kernel that cannot address them
    (`check_slice_offsets`): SDPA indexes in 64 bits."""
    D = named["q"].shape[3]
    if backend == "auto" and any(slice_offset(rows, stride, D) > INT32_MAX for _, rows, stride in _slices(named)):
        return "torch"
    return backend


def _sdpa(q, k, v):
    # SDPA wants [B, H, L, D]; the transposes are views, SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@register("attention", "torch")
def _attention_torch(q, k, v, precision):
    if precision != "bf16":
        raise OpArgumentError(f"attention: the torch reference has no {precision!r} path; use precision='bf16' "
                              f"or the Triton kernels (backend='triton')")
    return _sdpa(q, k, v)


@register("attention", "triton", runs_on=triton_runs_on)
def _attention_triton(q, k, v, precision):
    # lazy: triton is an optional dependency
    if precision == "bf16":
        from .attention_triton import attention_op

        return attention_op(q, k, v)
    from .attention_8bit_triton import attention_8bit_op

    return attention_8bit_op(q, k, v, precision)


def check_attention_runs(precision: str, backend: str, device: torch.device) -> None:
    """Raise BackendError unless `attention(..., precision=precision, backend=backend)` can run on
    `device` tensors here: lets a model refuse an 8-bit attention before it loads its weights."""
    if precision == "bf16":
        return
    if backend == "torch":
        raise BackendError(f"attention: the torch reference has no {precision!r} path; use backend='triton' "
                           f"or backend='auto'")
    resolve("attention", backend, device, reference=False)
    if precision == "fp8":
        require_fp8_tensor_cores("attention: precision='fp8'", device, "use precision='int8' or 'bf16'")


def _check_qkv(op: str, q, k, v, k_name: str = "k", v_name: str = "v") -> None:
    check_tensor(op, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, _, H, D = q.shape
    if D == 0:
        raise OpArgumentError(f"{op}: q has shape {tuple(q.shape)}; head_dim must not be 0")
    check_tensor(op, k_name, k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_shape(op, k_name, k, (B, None, H, D))
    check_tensor(op, v_name, v, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_shape(op, v_name, v, tuple(k.shape))
    if k.shape[1] == 0:  # on every backend alike (SDPA would return zeros)
        raise OpArgumentError(f"{op}: {k_name} has no keys; softmax over an empty set is undefined")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, precision: str = "bf16",
              backend: str = "auto") -> torch.Tensor:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype, scale 1/√D.

    precision "bf16" attends in the inputs' own dtype (fp32 inputs stay fp32); "int8" and "fp8" are
    the 8-bit paths of the kernel backends (triton), both on 8-bit tensor cores for q·kᵀ and P·V:
    "int8" keeps the relative error under 2% on Gaussian and on offset (RMS-normed-like) q/k; "fp8"
    has e4m3's larger error: ~3.4% on zero-mean Gaussian data, under 3% on offset q/k or v with
    channel means, and needs FP8 tensor cores (sm_89 or newer). bench/RESULTS.md has the measured errors.
    """
    if precision not in PRECISIONS:
        raise OpArgumentError(f"attention: precision must be one of {PRECISIONS}, got {precision!r}")
    _check_qkv("attention", q, k, v)
    if precision == "bf16":
        backend = _auto_for_offsets(_auto_for_head_dim(backend, q.shape[-1]), dict(q=q, k=k, v=v))
    return resolve("attention", backend, q.device, reference=precision == "bf16")(q, k, v, precision)


@register("cross_attention", "torch")
def _cross_attention_torch(q, k, v, k_img, v_img):
    out = _sdpa(q, k, v)
    if k_img is not None:
        out = out + _sdpa(q, k_img, v_img)
    return out


@register("cross_attention", "triton", runs_on=triton_runs_on)
def _cross_attention_triton(q, k, v, k_img, v_img):
    from . import attention_triton as impl  # lazy: triton is an optional dependency

    return impl.cross_attention_op(q, k, v, k_img, v_img)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                    v_img: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Wan's cross-attention: attention of q over the text keys plus, for I2V, a second softmax
    attention of the same q over the image keys; returns their sum [B, Lq, H, D]."""
    _check_qkv("cross_attention", q, k, v)
    if (k_img is None) != (v_img is None):
        raise OpArgumentError("cross_attention: give both k_img and v_img or neither")
    if k_img is not None:
        _check_qkv("cross_attention", q, k_img, v_img, "k_img", "v_img")
    backend = _auto_for_offsets(_auto_for_head_dim(backend, q.shape[-1]),
                                dict(q=q, k=k, v=v, k_img=k_img, v_img=v_img))
    return resolve("cross_attention", backend, q.device)(q, k, v, k_img, v_img)
