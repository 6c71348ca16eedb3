"""Triton backend of the fused memory-bound ops (kernels/fused_spec.py says what they compute): the rows
kernel (per-token quantization, GELU + quantization, LayerNorm / RMSNorm with affine or adaLN modulation,
optionally quantized) and the q/k RMSNorm + RoPE kernel.

Only the kernels/*_triton.py modules import triton; the op files import this one lazily from their
registered functions.
The kernels are registered as torch.library custom ops (`dit8::rows_triton`, `dit8::qk_norm_rope_triton`,
`dit8::residual_add_triton`) with fake implementations, so they compose with torch.compile and CUDA
graph capture.

One program per row (rows) or per token (qk_norm_rope): the row stays in registers when it fits (up to
MAX_TILE elements, padded to powers of two: a row of C columns is a tile of the largest power of two
<= C and a tail tile after it), so it is read from memory once. Longer rows loop over chunks,
re-reading the row for each pass (statistics, amax, output).

Interpreter (TRITON_INTERPRET=1 on CPU tensors, how the CPU tests run these kernels): bf16 and e4m3
outputs are rounded in fp32 first (kernels/rounding_triton.py), so the stored values are those a GPU
gives. fp16 and int8 conversions need no help (int8 values are rounded with `_rint` first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fused_spec as spec
from .buffers import new_output
from .checks import check_int32_offset
from .quantize import QMAX, SCALE_FLOOR
from .registry import require_fp8_tensor_cores
from .rounding_triton import BIAS_2_23, round_bf16, round_e4m3
from .scaled_mm_triton import _GELU_C0, _GELU_C1
from .triton_support import interpreting, on_tensor_device

# Largest register tile (elements) of one row; longer rows take the chunked path.
MAX_TILE = 16384
# Chunk of the chunked path.
CHUNK = 4096
# Whether a row held in registers loads its per-column operands (weight, bias, modulation) with the row,
# ahead of the statistics, rather than after them: a tuning knob, timed by bench/test_bench_fused.py's
# sweep; ahead costs registers (fewer programs an SM), after waits for them past the statistics.
PREFETCH_PARAMS = False
# Per GPU generation (CUDA compute capability): {(op, row width): (warps, operands ahead)} of the rows
# kernel where bench/test_bench_fused.py's sweep measured them faster than the default (_num_warps,
# PREFETCH_PARAMS); bench/rows_choice.py prints the entries from the sweep's results.
# Hopper: on an H100 (triton 3.6, 32,760 rows of 5120), LayerNorm (+ modulation) + FP8 quantization took
# 0.310 (0.309) ms, 90% of the copy rate, on 4 warps with operands loaded after the statistics, against
# 0.378 (0.354) on the default 8 (bench/RESULTS.md, 2026-11-26 evening).
ROWS_TUNED: dict[tuple[int, int], dict[tuple[str, int], tuple[int, bool]]] = {
    (9, 0): {("layer_norm_modulate_quant", 5120): (4, False), ("layer_norm_quant", 5120): (4, False)},
}

_INT8_MAX = tl.constexpr(QMAX[torch.int8])
_FP8_MAX = tl.constexpr(QMAX[torch.float8_e4m3fn])
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32

# Output kinds (constexpr): what the store converts to and how.
_OUT_FLOAT, _OUT_BF16, _OUT_INT8, _OUT_FP8 = 0, 1, 2, 3


def _out_kind(dtype: torch.dtype) -> int:
    return {torch.bfloat16: _OUT_BF16, torch.int8: _OUT_INT8, torch.float8_e4m3fn: _OUT_FP8}.get(dtype, _OUT_FLOAT)


# ----------------------------------------------------------------------------------------------------
# Element helpers
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _rint(y):
    """Round half to even for |y| < 2^22 (8-bit codes are), by adding and subtracting BIAS_2_23: exact in
    the interpreter, where numpy rounds fp32 additions the same way (a GPU converts with one
    instruction instead, _codes)."""
    return (y + BIAS_2_23) - BIAS_2_23


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _gelu_tanh(x, INTERPRET: tl.constexpr):
    """GELU, tanh approximation, in fp32, as the GEMM epilogue computes it: 0.5·x·(1 + tanh(u)) =
    x·sigmoid(2u) = x / (1 + 2^(x·(-C0 - C1·x²))). The hardware exp2 and reciprocal err by a few fp32
    ulps, a millionth of an 8-bit code step. exp2 overflows to +inf for very negative x: -0, the limit.
    Instructions, since GELU + quantization is the one rows op near the SM's issue rate (bench/RESULTS.md):
    the sign sits in the constants (-x would cost an add: 0 - x), and the quotient is x times the
    reciprocal (MUFU.RCP and a multiply, where `/` adds a range check and two scalings for divisors
    past 2^126). Past 2^126 the quotient is below 2^-122 in magnitude and the flushed reciprocal makes it
    -0: far below anything a bf16 value or an 8-bit code resolves."""
    e = 1.0 + tl.math.exp2(x * (-_GELU_C0 - _GELU_C1 * x * x))
    if INTERPRET:
        return x / e
    return x * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [e], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _store_float(ptrs, y, mask, OUT: tl.constexpr, INTERPRET: tl.constexpr):
    if OUT == 1 and INTERPRET:  # _OUT_BF16
        y = round_bf16(y)
    tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _divide_by_scale(y, scale, rcp):
    """y / scale correctly rounded (as div_rn), given rcp = div_rn(1, scale), by a multiply and two FMAs
    instead of a division each: q0 = y·rcp is within one ulp of y/scale, and one step with the exact
    remainder rounds it correctly (Markstein's theorem), barring underflow of the remainder, which
    happens only for quotients far below the smallest 8-bit code. The remainder is taken as
    q0·scale - y so that ±0 keeps its sign; an infinite scale (a row holding an Inf) enters it as the
    largest float, so that finite y still gives ±0 as y / inf does. csrc/common.cuh's ScaleDivisor is
    the same computation."""
    q0 = y * rcp
    # (Negation as a product with -1: Triton 3.6 compiles unary minus to 0 - x, which turns -0 into +0.)
    minus_r = tl.fma(q0, tl.minimum(scale, _FLT_MAX), y * -1.0)
    return tl.fma(minus_r * -1.0, rcp, q0)


@triton.jit
def _codes(y, scale, OUT: tl.constexpr, INTERPRET: tl.constexpr):
    """8-bit codes of y / scale (correctly rounded division), kernels/quantize.py's rounding."""
    if INTERPRET:  # (numpy divides exactly; the interpreter of triton < 3.9 computes tl.fma in two roundings)
        v = tl.math.div_rn(y, scale)
    else:
        v = _divide_by_scale(y, scale, tl.math.div_rn(1.0, scale))
    # The reference clamps to the code range, but y / scale never leaves it: scale = amax / qmax rounded,
    # so |y| <= qmax·(1 + 2^-23), which rounds to ±qmax (NaN stays NaN). On a GPU the conversions
    # round and saturate on their own, without the two clamps.
    if OUT == 2:  # _OUT_INT8: half to even
        if INTERPRET:
            return tl.minimum(tl.maximum(_rint(v), -128.0), 127.0).to(tl.int8)
        # One saturating conversion (F2I.S8), where rounding by adding BIAS_2_23 and converting takes three.
        return tl.inline_asm_elementwise("cvt.rni.sat.s8.f32 $0, $1;", "=r,f", [v], dtype=tl.int32, is_pure=True,
                                         pack=1).to(tl.int8)
    else:  # _OUT_FP8: nearest even (the GPU's conversion saturates at ±448)
        if INTERPRET:
            v = round_e4m3(tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX))
        return v.to(tl.float8e4nv)


@triton.jit
def _scale_of(amax, OUT: tl.constexpr):
    """max(amax, floor) / qmax, NaN kept."""
    amax = _max_nan(amax, _SCALE_FLOOR)
    if OUT == 2:
        return tl.math.div_rn(amax, _INT8_MAX)
    else:
        return tl.math.div_rn(amax, _FP8_MAX)


# ----------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _rows_load(x_row, offs, mask, ACT: tl.constexpr, INTERPRET: tl.constexpr):
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:
        x = _gelu_tanh(x, INTERPRET)  # gelu(0) = 0: masked lanes stay 0
    return x


@triton.jit
def _rows_params(offs, mask, W, Bias, shift_row, scale_row, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 HAS_MOD: tl.constexpr):
    """The per-column operands of _rows_finish (weight, bias, modulation scale and shift; 0 where absent)."""
    w = tl.load(W + offs, mask=mask, other=0.0) if HAS_W else 0.0
    b = tl.load(Bias + offs, mask=mask, other=0.0) if HAS_B else 0.0
    sc = tl.load(scale_row + offs, mask=mask, other=0.0) if HAS_MOD else 0.0
    sh = tl.load(shift_row + offs, mask=mask, other=0.0) if HAS_MOD else 0.0
    return w, b, sc, sh


@triton.jit
def _rows_finish(y, mask, mean, rstd, params, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 HAS_MOD: tl.constexpr, PADDED: tl.constexpr):
    """Input values -> output values, in the torch reference's order: normalise, affine, modulate, with
    the operands of _rows_params. PADDED: lanes past the row's end are set to 0 (the amax and the sums
    read them)."""
    w, b, sc, sh = params
    if NORM != 0:
        y = (y - mean) * rstd
    if HAS_W:
        y = y * w
    if HAS_B:
        y = y + b
    if HAS_MOD:
        y = y * (1.0 + sc) + sh
    if PADDED:
        y = tl.where(mask, y, 0.0)
    return y


@triton.jit
def _rows_kernel(X, stride_x, Out, OutScale, W, Bias, Shift, Scale, stride_shift, stride_scale,
                 rows_per_batch, C, n, eps,  # n: C as a float (never specialised to a constant)
                 NORM: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 HAS_MOD: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr, TAIL_C: tl.constexpr,
                 SINGLE: tl.constexpr, EXACT: tl.constexpr, PREFETCH: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    out_row = Out + row * C
    batch = row // rows_per_batch
    shift_row = Shift + batch * stride_shift
    scale_row = Scale + batch * stride_scale
    QUANT: tl.constexpr = OUT >= 2
    offs0 = tl.arange(0, BLOCK_C)

    if SINGLE:
        # The whole row is in registers, read once, every pass from there: a tile of BLOCK_C columns and,
        # when C is no power of two, a tail tile of TAIL_C after it (5120 = 4096 + 1024: no lanes
        # wasted on padding, where one tile of 8192 would spend 37% of its instructions on them).
        # EXACT: the tiles hold exactly C columns (Wan's 5120), so no lane needs zeroing.
        PADDED: tl.constexpr = not EXACT
        mask = offs0 < C
        x = _rows_load(x_row, offs0, mask, ACT, INTERPRET)
        if TAIL_C > 0:
            offs1 = BLOCK_C + tl.arange(0, TAIL_C)
            mask1 = offs1 < C
            x1 = _rows_load(x_row, offs1, mask1, ACT, INTERPRET)
        if PREFETCH:  # issued with the row's loads, ahead of the statistics' barriers
            params = _rows_params(offs0, mask, W, Bias, shift_row, scale_row, HAS_W, HAS_B, HAS_MOD)
            if TAIL_C > 0:
                params1 = _rows_params(offs1, mask1, W, Bias, shift_row, scale_row, HAS_W, HAS_B, HAS_MOD)
        mean = 0.0
        rstd = 1.0
        if NORM == 1:
            total = tl.sum(x, 0)
            if TAIL_C > 0:
                total += tl.sum(x1, 0)
            mean = tl.math.div_rn(total, n)
            d = tl.where(mask, x - mean, 0.0) if PADDED else x - mean
            squares = tl.sum(d * d, 0)
            if TAIL_C > 0:
                d1 = tl.where(mask1, x1 - mean, 0.0) if PADDED else x1 - mean
                squares += tl.sum(d1 * d1, 0)
            rstd = tl.math.rsqrt(tl.math.div_rn(squares, n) + eps)
        elif NORM == 2:
            squares = tl.sum(x * x, 0)
            if TAIL_C > 0:
                squares += tl.sum(x1 * x1, 0)
            rstd = tl.math.rsqrt(tl.math.div_rn(squares, n) + eps)
        if not PREFETCH:
            params = _rows_params(offs0, mask, W, Bias, shift_row, scale_row, HAS_W, HAS_B, HAS_MOD)
        y = _rows_finish(x, mask, mean, rstd, params, NORM, HAS_W, HAS_B, HAS_MOD, PADDED)
        if TAIL_C > 0:
            if not PREFETCH:
                params1 = _rows_params(offs1, mask1, W, Bias, shift_row, scale_row, HAS_W, HAS_B, HAS_MOD)
            y1 = _rows_finish(x1, mask1, mean, rstd, params1, NORM, HAS_W, HAS_B, HAS_MOD, PADDED)
        if QUANT:
            amax = tl.reduce(tl.abs(y), 0, _max_nan)
            if TAIL_C > 0:
                amax = _max_nan(amax, tl.reduce(tl.abs(y1), 0, _max_nan))
            scale = _scale_of(amax, OUT)
            tl.store(OutScale + row, scale)
            tl.store(out_row + offs0, _codes(y, scale, OUT, INTERPRET), mask=mask)
            if TAIL_C > 0:
                tl.store(out_row + offs1, _codes(y1, scale, OUT, INTERPRET), mask=mask1)
        else:
            _store_float(out_row + offs0, y, mask, OUT, INTERPRET)
            if TAIL_C > 0:
                _store_float(out_row + offs1, y1, mask1, OUT, INTERPRET)
    else:
        # Chunked: one sweep per statistic, then the output sweep; the re-reads mostly hit the caches.
        mean = 0.0
        rstd = 1.0
        if NORM != 0:
            acc = tl.zeros([BLOCK_C], tl.float32)
            for start in range(0, C, BLOCK_C):
                offs = start + offs0
                x = _rows_load(x_row, offs, offs < C, ACT, INTERPRET)
                if NORM == 2:
                    acc += x * x
                else:
                    acc += x
            if NORM == 1:
                mean = tl.math.div_rn(tl.sum(acc, 0), n)
                acc = tl.zeros([BLOCK_C], tl.float32)
                for start in range(0, C, BLOCK_C):
                    offs = start + offs0
                    mask = offs < C
                    d = tl.where(mask, _rows_load(x_row, offs, mask, ACT, INTERPRET) - mean, 0.0)
                    acc += d * d
            rstd = tl.math.rsqrt(tl.math.div_rn(tl.sum(acc, 0), n) + eps)
        if QUANT:
            amax = tl.zeros([BLOCK_C], tl.float32)
            for start in range(0, C, BLOCK_C):
                offs = start + offs0
                mask = offs < C
                params = _rows_params(offs, mask, W, Bias, shift_row, scale_row, HAS_W, HAS_B, HAS_MOD)
                y = _rows_finish(_rows_load(x_row, offs, mask, ACT, INTERPRET), mask, mean, rstd, params, NORM, HAS_W,
                                 HAS_B, HAS_MOD, True)
                amax = _max_nan(amax, tl.abs(y))
            scale = _scale_of(tl.reduce(amax, 0, _max_nan), OUT)
            tl.store(OutScale + row, scale)
        for start in range(0, C, BLOCK_C):
            offs = start + offs0
            mask = offs < C
            params = _rows_params(offs, mask, W, Bias, shift_row, scale_row, HAS_W, HAS_B, HAS_MOD)
            y = _rows_finish(_rows_load(x_row, offs, mask, ACT, INTERPRET), mask, mean, rstd, params, NORM, HAS_W,
                             HAS_B, HAS_MOD, True)
            if QUANT:
                tl.store(out_row + offs, _codes(y, scale, OUT, INTERPRET), mask=mask)
            else:
                _store_float(out_row + offs, y, mask, OUT, INTERPRET)


def row_tiles(C: int) -> tuple[int, int]:
    """(BLOCK_C, TAIL_C) of a row held in registers: the largest power of two <= C, and the tail's tile
    (a power of two, 0 when C is one); together at most next_power_of_2(C), usually far less."""
    head = 1 << (C.bit_length() - 1)
    return head, (triton.next_power_of_2(C - head) if C > head else 0)


def _num_warps(elements: int) -> int:
    """A power of two of warps, 4 to 16, for 16 to 31 fp32 elements per thread where the row has 2048 to
    8191 (32 at 16384: GELU's 13,824 columns): the tiles then take 30-80 registers a thread, so that two
    or more programs share an SM (memory-bound kernels need the loads of several rows in flight), and
    few warps keep the cross-warp reductions short. Never 32: two programs of 1024 threads share an SM
    only at 32 registers a thread or fewer, which depends on the compiler (GELU + quantization of 13,824
    columns on 32 warps, sm_90a: 32 with triton 3.6, 42 with 3.9, one program an SM; on 16 warps: 53
    and 49, two either way)."""
    return max(4, min(16, 1 << (max(elements // 512, 1).bit_length() - 1)))


def rows_op_name(norm: int, act: int, modulate: bool, quantized: bool) -> str:
    """The op (its registry name) a launch of the rows kernel computes."""
    if act:
        return "gelu_tanh_quant"
    if norm == 0:
        return "quantize_per_token"
    if norm == 2:
        return "rms_norm"
    return ("layer_norm_modulate" if modulate else "layer_norm") + ("_quant" if quantized else "")


def rows_launch(op: str, C: int, device: torch.device) -> tuple[int, bool]:
    """(warps, operands ahead) of the rows kernel for `op` on rows of C held in registers on `device`:
    ROWS_TUNED's entry, else the default."""
    if device.type == "cuda":
        tuned = ROWS_TUNED.get(torch.cuda.get_device_capability(device), {}).get((op, C))
        if tuned is not None:
            return tuned
    return _num_warps(sum(row_tiles(C))), PREFETCH_PARAMS


def _require_e4m3(op: str, out_dtype: torch.dtype, device: torch.device) -> None:
    # Triton has no e4m3 type below sm_89: the kernel would fail to compile with a compiler error.
    if out_dtype == torch.float8_e4m3fn:
        require_fp8_tensor_cores(f"{op} to float8_e4m3fn with backend='triton'", device,
                                 "use int8, or backend='cuda' or 'torch'")


@on_tensor_device
def launch_rows(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                shift: torch.Tensor | None, scale: torch.Tensor | None, norm: int, act: int, rows_per_batch: int,
                eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the rows kernel (fused_spec.py); the arguments must pass spec.check_rows."""
    spec.check_rows("rows_triton", x, weight, bias, shift, scale, norm, act, rows_per_batch, out_dtype)
    op = rows_op_name(norm, act, shift is not None, out_dtype in (torch.int8, torch.float8_e4m3fn))
    _require_e4m3(op, out_dtype, x.device)
    out, out_scale = spec.rows_outputs(x, out_dtype, new_output)
    M, C = x.shape
    if M == 0:
        return out, out_scale
    tile = triton.next_power_of_2(C)
    single = tile <= MAX_TILE
    block, tail = row_tiles(C) if single else (CHUNK, 0)
    warps, prefetch = rows_launch(op, C, x.device) if single else (_num_warps(block), False)
    dummy = out_scale if out_scale.numel() else x  # never read when the flag is off
    _rows_kernel[(M,)](
        x, x.stride(0), out, dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        shift.stride(0) if shift is not None else 0, scale.stride(0) if scale is not None else 0,
        max(rows_per_batch, 1), C, float(C), eps,
        NORM=norm, ACT=act, HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=shift is not None,
        OUT=_out_kind(out_dtype), BLOCK_C=block, TAIL_C=tail, SINGLE=single, EXACT=single and block + tail == C,
        PREFETCH=prefetch, INTERPRET=interpreting(), num_warps=warps)
    return out, out_scale


# ----------------------------------------------------------------------------------------------------
# q/k RMSNorm + RoPE
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _rotate(x, r, W, chan, mask, cos, sin, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Heads [BLOCK_H, head_dim] of one token's row: times the RMSNorm factor r and the weight, then each
    head's pairs (2j, 2j+1) rotated by angle j."""
    y = x * r * tl.load(W + chan, mask=mask, other=0.0)
    a, b = tl.split(tl.reshape(y, (BLOCK_H, BLOCK_D // 2, 2)))
    rot = tl.join(a * cos - b * sin, a * sin + b * cos)
    return tl.reshape(rot, (BLOCK_H, BLOCK_D))


@triton.jit
def _qk_store(out_ptrs, y, mask, scale_ptrs, h_ok, OUT: tl.constexpr, INTERPRET: tl.constexpr):
    if OUT >= 2:
        # One scale per head row: amax over the head's channels. Masked lanes hold 0 (x and the weight
        # load as 0 there, and rotation pairs never straddle the mask), so they need no select.
        amax = tl.reduce(tl.abs(y), 1, _max_nan)
        scale = _scale_of(amax, OUT)
        tl.store(scale_ptrs, scale, mask=h_ok)
        tl.store(out_ptrs, _codes(y, scale[:, None], OUT, INTERPRET), mask=mask)
    else:
        _store_float(out_ptrs, y, mask, OUT, INTERPRET)


@triton.jit
def _norm_rope_row(x_row, W, out_row, scale_ptrs, L, H, n, eps, cos, sin,
                   HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, TAIL_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   OUT: tl.constexpr, INTERPRET: tl.constexpr):
    """One token's q or k row [H · HEAD_DIM]: RMSNorm over all of it, RoPE per head, stored. The heads
    lie in a tile of BLOCK_H and, when H is no power of two, a tail tile of TAIL_H after it (Wan's 40
    heads = 32 + 8: no lanes spent on padding heads)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    mask = h_ok[:, None] & d_ok
    chan = offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    x = tl.load(x_row + chan, mask=mask, other=0.0).to(tl.float32)
    squares = tl.sum(tl.sum(x * x, 1), 0)
    if TAIL_H > 0:
        offs_h1 = BLOCK_H + tl.arange(0, TAIL_H)
        h1_ok = offs_h1 < H
        mask1 = h1_ok[:, None] & d_ok
        chan1 = offs_h1[:, None] * HEAD_DIM + offs_d[None, :]
        x1 = tl.load(x_row + chan1, mask=mask1, other=0.0).to(tl.float32)
        squares += tl.sum(tl.sum(x1 * x1, 1), 0)
    r = tl.math.rsqrt(tl.math.div_rn(squares, n) + eps)
    _qk_store(out_row + chan, _rotate(x, r, W, chan, mask, cos, sin, BLOCK_H, BLOCK_D), mask,
              scale_ptrs + offs_h * L, h_ok, OUT, INTERPRET)
    if TAIL_H > 0:
        _qk_store(out_row + chan1, _rotate(x1, r, W, chan1, mask1, cos, sin, TAIL_H, BLOCK_D), mask1,
                  scale_ptrs + offs_h1 * L, h1_ok, OUT, INTERPRET)


@triton.jit
def _qk_norm_rope_kernel(Q, K, stride_qb, stride_ql, stride_kb, stride_kl, WQ, WK, Cos, Sin,
                         QOut, KOut, QScale, KScale, L, H, n, eps,
                         HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, TAIL_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, OUT: tl.constexpr, INTERPRET: tl.constexpr):
    l = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    C = H * HEAD_DIM  # n: the same as a float
    # The token's angles, shared by q and k and by every head.
    offs_j = tl.arange(0, BLOCK_D // 2)
    cos = tl.load(Cos + l * HALF + offs_j, mask=offs_j < HALF, other=1.0)[None, :]
    sin = tl.load(Sin + l * HALF + offs_j, mask=offs_j < HALF, other=0.0)[None, :]
    out_row = (b * L + l) * C
    scale_at = b * H * L + l  # [b, h, l] of the scales, at h = 0

    _norm_rope_row(Q + b * stride_qb + l * stride_ql, WQ, QOut + out_row, QScale + scale_at, L, H, n, eps, cos, sin,
                   HEAD_DIM, BLOCK_H, TAIL_H, BLOCK_D, OUT, INTERPRET)
    _norm_rope_row(K + b * stride_kb + l * stride_kl, WK, KOut + out_row, KScale + scale_at, L, H, n, eps, cos, sin,
                   HEAD_DIM, BLOCK_H, TAIL_H, BLOCK_D, OUT, INTERPRET)


@on_tensor_device
def launch_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the q/k RMSNorm + RoPE kernel (fused_spec.py); the arguments must pass spec.check_qk."""
    spec.check_qk("qk_norm_rope_triton", q, k, weight_q, weight_k, cos, sin, heads, out_dtype)
    _require_e4m3("qk_norm_rope_quant", out_dtype, q.device)
    B, L, C = q.shape
    if spec.is_quant(out_dtype):
        # A token's scales [B, H, L] lie L apart, at offsets h·L from its head 0: an int32 product.
        check_int32_offset("qk_norm_rope_quant", "q", (heads - 1) * L,
                           f"the scales of {heads:,} heads of {L:,} tokens, (heads - 1)·tokens")
    q_out, k_out, q_scale, k_scale = spec.qk_outputs(q, heads, out_dtype, new_output)
    if B * L == 0:
        return q_out, k_out, q_scale, k_scale
    D = C // heads
    block_h, tail_h = row_tiles(heads)
    block_d = max(2, triton.next_power_of_2(D))
    if (block_h + tail_h) * block_d > MAX_TILE:
        op = "qk_norm_rope_quant" if spec.is_quant(out_dtype) else "qk_norm_rope"
        raise spec.OpArgumentError(f"{op}: the triton backend handles up to {MAX_TILE} channels with "
                                   f"head_dim padded to a power of two, got {heads} x {D}")
    quant = q_scale.numel() > 0  # else the scale pointers are never written: pass the outputs
    _qk_norm_rope_kernel[(L, B)](
        q, k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), weight_q, weight_k, cos, sin,
        q_out, k_out, q_scale if quant else q_out, k_scale if quant else k_out,
        L, heads, float(C), eps,
        HEAD_DIM=D, BLOCK_H=block_h, TAIL_H=tail_h, BLOCK_D=block_d, OUT=_out_kind(out_dtype),
        INTERPRET=interpreting(), num_warps=_num_warps((block_h + tail_h) * block_d))
    return q_out, k_out, q_scale, k_scale


# ----------------------------------------------------------------------------------------------------
# Gated residual add (the float linears' epilogue, which cuBLAS cannot take)
# ----------------------------------------------------------------------------------------------------

# Columns per program of the residual add: 1024 fp32 values, 8 per thread on 4 warps.
RESIDUAL_BLOCK = 1024


@triton.jit
def _residual_add_kernel(X, Y, Gate, Out, stride_y, C, rows_per_batch, HAS_GATE: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Out[r] = X[r] + Y[r] · Gate[r // rows_per_batch] in fp32, for one block of one row's columns. One
    pass over x, y and out instead of eager torch's three (y to fp32, the product, the sum)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C
    y = tl.load(Y + row * stride_y + offs, mask=ok).to(tl.float32)
    if HAS_GATE:
        y = y * tl.load(Gate + (row // rows_per_batch) * C + offs, mask=ok)
    tl.store(Out + row * C + offs, tl.load(X + row * C + offs, mask=ok) + y, mask=ok)


@on_tensor_device
def launch_residual_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """x [B, L, C] fp32 + y [B, L, C] (any float dtype) · gate [B, C] fp32 (or None), in fp32."""
    spec.check_residual("residual_add_triton", x, y, gate)
    B, L, C = x.shape
    x = x.contiguous()
    y = y.reshape(B * L, C)
    if y.stride(1) != 1:
        y = y.contiguous()
    out = new_output(x.shape, torch.float32, x.device)
    if x.numel():
        gate_arg = gate.contiguous() if gate is not None else x
        _residual_add_kernel[(B * L, triton.cdiv(C, RESIDUAL_BLOCK))](
            x, y, gate_arg, out, y.stride(0), C, L, HAS_GATE=gate is not None, BLOCK=RESIDUAL_BLOCK,
            num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("dit8::rows_triton", mutates_args=())
def rows_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor | None,
            scale: torch.Tensor | None, norm: int, act: int, rows_per_batch: int, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton rows kernel as a torch.library op: `launch_rows`."""
    return launch_rows(x, weight, bias, shift, scale, norm, act, rows_per_batch, eps, out_dtype)


@rows_op.register_fake
def _(x, weight, bias, shift, scale, norm, act, rows_per_batch, eps, out_dtype):
    spec.check_rows("rows_triton", x, weight, bias, shift, scale, norm, act, rows_per_batch, out_dtype)
    return spec.rows_outputs(x, out_dtype, spec.fake_alloc)


@torch.library.custom_op("dit8::qk_norm_rope_triton", mutates_args=())
def qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton q/k RMSNorm + RoPE kernel as a torch.library op: `launch_qk_norm_rope`."""
    return launch_qk_norm_rope(q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype)


@qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype):
    spec.check_qk("qk_norm_rope_triton", q, k, weight_q, weight_k, cos, sin, heads, out_dtype)
    return spec.qk_outputs(q, heads, out_dtype, spec.fake_alloc)


@torch.library.custom_op("dit8::residual_add_triton", mutates_args=())
def residual_add_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The Triton residual-add kernel as a torch.library op: `launch_residual_add`."""
    return launch_residual_add(x, y, gate)


@residual_add_op.register_fake
def _(x, y, gate):
    spec.check_residual("residual_add_triton", x, y, gate)
    return x.new_empty(x.shape, dtype=torch.float32)
