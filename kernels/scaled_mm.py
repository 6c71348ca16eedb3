"""scaled_mm: the W8A8 GEMM, out = (xq · wqᵀ) · x_scale[:, None] · w_scale[None, :] + bias.

Reference semantics every backend matches:
- int8 × int8: exact integer accumulation (what int32 tensor-core accumulators give for any K a model
  uses), then the integer sum is converted to fp32;
- fp8 e4m3 × e4m3: products are exact in fp32 and are accumulated in fp32 (order unspecified). On
  Hopper the Triton backend lets the tensor cores accumulate at their own reduced precision where K
  is at most 8192, as cuBLAS's fast mode does: measured there at 1.35x the error of cuBLAS's default
  mode, within the 2x the benchmarks hold it to (kernels/gemm_configs.py);
- epilogue in fp32, in this order: `acc · x_scale[m]`, then `· w_scale[n]`, then `+ bias[n]` (bias
  upcast to fp32), then one rounding to `out_dtype`.

Fused epilogues (keyword arguments of `scaled_mm`), applied in fp32 after the bias and before the single
rounding, in this order (the executor's 8-bit output projections add into the residual stream here:
gated for self-attention's o and the FFN's down projection, ungated for cross-attention's o; its FFN-up
output goes through GELU separately, fused with the down projection's input quantization where that is
8-bit):
- `activation="gelu_tanh"`: y = GELU with the tanh approximation (F.gelu(y, approximate="tanh"));
- `residual` [M, N] fp32 (the residual stream, rows = tokens of B samples of `rows_per_batch` rows each)
  with optional `gate` [B, N] fp32: out = residual[m, n] + gate[m // rows_per_batch, n] · y (without
  gate: residual + y). The output is then fp32: the new residual stream. The GEMM value y is not
  rounded to a 16-bit type first (the unfused GEMM-then-`residual_add` path rounds it once more).

Backends: "torch" (this file: the reference, the spec) and "triton" (kernels/scaled_mm_triton.py,
imported lazily so that dit8 imports without triton: FP8 on sm_89+, INT8 on any GPU with 8-bit tensor
cores, and in the Triton interpreter on CPU tensors). Registry ops: "scaled_mm" (plain; a backend may
implement only this one) and "scaled_mm_fused" (with the epilogue arguments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import FLOAT_DTYPES, OpArgumentError, check_shape, check_tensor
from .quantize import QUANT_DTYPES
from .registry import has_fp8_tensor_cores, register, resolve
from .triton_support import triton_runs_on

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACTIVATIONS = ("gelu_tanh",)


def _int_mm_fits(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether cuBLAS's integer GEMM (torch._int_mm) takes these operands, its int32 sums exact."""
    (M, K), N = xq.shape, wq.shape[0]
    return xq.is_cuda and M > 16 and K % 8 == 0 and N % 8 == 0 and 0 < K < 2 ** 31 // 2 ** 14  # |product| <= 2^14


def _accumulate(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq · wqᵀ as fp32: exact for int8, fp32-accumulated for fp8."""
    if xq.dtype == torch.int8:
        if _int_mm_fits(xq, wq):
            # The same exact sums at integer tensor-core speed: float64 matmul runs at 1/64 of the fp32
            # rate on most GPUs (minutes a forward at Wan's shapes where "auto" serves this reference).
            try:
                return torch._int_mm(xq, wq.t()).float()
            except RuntimeError:  # a layout or GPU this torch's cuBLAS path does not take
                pass
        # |product| <= 2^14, so float64 sums stay exact up to K = 2^39 (any real K), and float64
        # matmul runs on every device, unlike integer matmul.
        return (xq.double() @ wq.double().t()).float()
    return xq.float() @ wq.float().t()


def _gemm_fp32(xq, x_scale, wq, w_scale, bias) -> torch.Tensor:
    out = _accumulate(xq, wq) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out


@register("scaled_mm", "torch")
def _scaled_mm_torch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _gemm_fp32(xq, x_scale, wq, w_scale, bias).to(out_dtype)


@register("scaled_mm_fused", "torch")
def _scaled_mm_fused_torch(xq, x_scale, wq, w_scale, bias, out_dtype, activation, residual, gate,
                           rows_per_batch) -> torch.Tensor:
    y = _gemm_fp32(xq, x_scale, wq, w_scale, bias)
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        if gate is not None:
            rows = torch.arange(y.shape[0], device=y.device) // rows_per_batch
            y = gate[rows] * y
        y = residual + y
    return y.to(out_dtype)


@register("scaled_mm", "triton", runs_on=triton_runs_on)
def _scaled_mm_triton(xq, x_scale, wq, w_scale, bias, out_dtype):
    from . import scaled_mm_triton as impl  # lazy: triton is an optional dependency

    return impl.scaled_mm_op(xq, x_scale, wq, w_scale, bias, out_dtype, None, None, None, 1)


@register("scaled_mm_fused", "triton", runs_on=triton_runs_on)
def _scaled_mm_fused_triton(xq, x_scale, wq, w_scale, bias, out_dtype, activation, residual, gate,
                            rows_per_batch):
    from . import scaled_mm_triton as impl

    return impl.scaled_mm_op(xq, x_scale, wq, w_scale, bias, out_dtype, activation, residual, gate, rows_per_batch)


def _check_args(xq, x_scale, wq, w_scale, bias, out_dtype) -> None:
    op = "scaled_mm"
    check_tensor(op, "xq", xq, ndim=2, dtypes=QUANT_DTYPES)
    check_tensor(op, "wq", wq, ndim=2, dtypes=QUANT_DTYPES, device=xq.device)
    if wq.dtype != xq.dtype:
        raise OpArgumentError(f"{op}: xq ({xq.dtype}) and wq ({wq.dtype}) must have the same dtype")
    (M, K), (N, Kw) = xq.shape, wq.shape
    if Kw != K:
        raise OpArgumentError(f"{op}: xq [M, K] = {tuple(xq.shape)} and wq [N, K] = {tuple(wq.shape)} "
                              f"disagree on K")
    check_tensor(op, "x_scale", x_scale, dtypes=(torch.float32,), device=xq.device)
    check_shape(op, "x_scale", x_scale, (M,))
    check_tensor(op, "w_scale", w_scale, dtypes=(torch.float32,), device=xq.device)
    check_shape(op, "w_scale", w_scale, (N,))
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, device=xq.device)
        check_shape(op, "bias", bias, (N,))
    if out_dtype not in OUT_DTYPES:
        raise OpArgumentError(f"{op}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _check_epilogue(xq, wq, out_dtype, activation, residual, gate, rows_per_batch) -> int:
    """Checks of the fused-epilogue arguments; returns rows_per_batch (1 without a gate)."""
    op = "scaled_mm"
    if activation is not None and activation not in ACTIVATIONS:
        raise OpArgumentError(f"{op}: activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    if residual is None:
        if gate is not None or rows_per_batch is not None:
            raise OpArgumentError(f"{op}: gate and rows_per_batch need a residual")
        return 1
    (M, _), N = xq.shape, wq.shape[0]
    check_tensor(op, "residual", residual, dtypes=(torch.float32,), device=xq.device)
    check_shape(op, "residual", residual, (M, N))
    if out_dtype != torch.float32:
        raise OpArgumentError(f"{op}: with a residual the output is the fp32 residual stream; "
                              f"out_dtype must be torch.float32 or None, got {out_dtype}")
    if gate is None:
        if rows_per_batch is not None:
            raise OpArgumentError(f"{op}: rows_per_batch needs a gate")
        return 1
    check_tensor(op, "gate", gate, ndim=2, dtypes=(torch.float32,), device=xq.device)
    check_shape(op, "gate", gate, (None, N))
    B = gate.shape[0]
    if rows_per_batch is None:
        if M == 0:  # an empty batch: no row reads the gate, whatever its row count (residual_add's B = 0)
            return 1
        if B == 0 or M % B != 0:
            raise OpArgumentError(f"{op}: gate has {B} rows, which do not divide the {M} rows of xq evenly; "
                                  f"pass rows_per_batch")
        return M // B
    if isinstance(rows_per_batch, bool) or not isinstance(rows_per_batch, int) or rows_per_batch < 1:
        raise OpArgumentError(f"{op}: rows_per_batch must be a positive int, got {rows_per_batch!r}")
    if M > 0 and (M - 1) // rows_per_batch >= B:
        raise OpArgumentError(f"{op}: {M} rows at rows_per_batch={rows_per_batch} need "
                              f"{(M - 1) // rows_per_batch + 1} gate rows, gate has {B}")
    # Past M every value means one batch; the kernels take it as a 64-bit integer.
    return min(rows_per_batch, max(M, 1))


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
              activation: str | None = None, residual: torch.Tensor | None = None,
              gate: torch.Tensor | None = None, rows_per_batch: int | None = None,
              backend: str = "auto") -> torch.Tensor:
    """W8A8 matmul: xq [M, K] and wq [N, K] (both float8_e4m3fn or both int8), x_scale [M] and
    w_scale [N] fp32, optional bias [N] (fp32/bf16/fp16) -> [M, N] of out_dtype (bf16, fp16 or fp32;
    None means bf16, or fp32 when a residual is given).

    out = (xq · wqᵀ) · x_scale[:, None] · w_scale[None, :] + bias; see the module docstring for the
    accumulation each backend guarantees.

    Fused epilogues (module docstring), in this order after the bias, all in fp32:
    - activation: None or "gelu_tanh" (GELU, tanh approximation);
    - residual [M, N] fp32, optional gate [B, N] fp32 and rows_per_batch (default M // B):
      out = residual + gate[m // rows_per_batch] · y, an fp32 [M, N] result (out_dtype must be fp32
      or None). Without gate: residual + y.
    """
    if out_dtype is None:
        out_dtype = torch.float32 if residual is not None else torch.bfloat16
    _check_args(xq, x_scale, wq, w_scale, bias, out_dtype)
    if backend == "auto" and xq.dtype == torch.float8_e4m3fn and not has_fp8_tensor_cores(xq.device):
        backend = "torch"  # no FP8 kernel runs on this GPU (A100, RTX 30xx); the reference does
    if activation is None and residual is None and gate is None and rows_per_batch is None:
        return resolve("scaled_mm", backend, xq.device)(xq, x_scale, wq, w_scale, bias, out_dtype)
    rows_per_batch = _check_epilogue(xq, wq, out_dtype, activation, residual, gate, rows_per_batch)
    return resolve("scaled_mm_fused", backend, xq.device)(xq, x_scale, wq, w_scale, bias, out_dtype,
                                                          activation, residual, gate, rows_per_batch)
