"""8-bit attention (SageAttention-style) in Triton: the quantization of q, k and v, and the kernel.

With c = log2(e)/√D, q̄ and k̄ the per-channel means over the sequence (per batch, head), and
q' = q - q̄, k' = k - k̄:
    c·q·k_n = c·q'·k'_n + c·q̄·k'_n + c·q·k̄
The last term is the same for every key of a query row: softmax ignores it (K smoothing). The middle
term depends only on the key: it is a per-key bias b_n = c·q̄·k'_n, computed in fp32 while k is being
quantized (Q smoothing with the correction added back). What is left for the 8-bit dot is q'·k'_n:
both factors are centred, so their per-block amax is set by their variation, not by the large
per-channel offsets that RMS-normed q/k carry, and the 8-bit steps shrink accordingly.

The identity holds for any vectors q̄, k̄ (and v̄ below): the means only make the centred values small.
So they are taken over an evenly spaced sample of at most MEAN_ROWS tokens (`smoothing_mean`): at Wan's
32,760 tokens one in 16, whose mean lies within ~2% of a token's spread of the full one (1/√2048 for
independent tokens), for a sixteenth of the reads (three full reductions over q, k and v took 15 ms of
an I2V-14B forward on an H100, 2026-11-27).

Quantization: c·q' per BLOCK_M rows (per head) and k' per row (per key), symmetric, fp32 scales. The
kernel dequantizes a score tile with one fused multiply-add per score, s·(q_scale·k_scale_n) + b_n,
where q_scale·k_scale_n is a vector over the block's keys: per-key scales cost one vector multiply per
key block over one scale per block, and err ~15% less (a key's codes span its own range). Per-query
scales would cost a multiply per score. Each key's scale and bias are stored side by side and read
as one [BLOCK_N, 2] tile (as two vectors, every thread holding a column copied them element by
element: ~85 more instructions in the loop).
P·V: "fp16" = P rounded to v's 16-bit type (fp16 for fp32 v), fp32 accumulation. The 8-bit ones
centre V on its per-channel mean v̄ (V smoothing: every row of softmax weights sums to 1, so
P·v = P·(v - v̄) + v̄, and the mean goes back on in the epilogue) and quantize it per channel (per
batch, head, over the sequence):
- "int8": v - v̄ in int8 steps of amax/127; each block's P relative to the block's own row max,
  p̃ = exp2(s - max_block) in [0, 1] with a 1 in every row, rounded to multiples of 1/127; the int32
  product is rescaled by r = exp2(max_block - m) (m the running max), which is exact because r is
  constant along the row. Scaling by the block max, not the running max, keeps the large weights of
  every block at full 7-bit precision; ~1.5% relative error on Gaussian data.
- "fp8": v - v̄ and P·448 in e4m3; each tile's product accumulated from zero in fp32 and then added to
  the running accumulator (two-level accumulation, so the reduced-precision accumulator of Hopper's
  FP8 MMA only ever sums BLOCK_N products). e4m3 keeps 3 mantissa bits, a ~2.5% rms relative rounding
  of every p and every v: ~3.4% relative error on zero-mean Gaussian data whatever the scales.

Layout, online softmax, the split key loop and the interpreter workarounds are those of
kernels/attention_triton.py, whose device functions these kernels share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention import check_rows_offset, check_slice_offsets
from .attention_triton import (DOT8_MIN_REDUCTION, LAST_COMPILED, LOG2E, AttnConfig, _add_pv, _bhd_strides,
                               _block_d, _check_keys, _fresh_state, _load_tile, _softmax_step, _store_out_tile, _unit_d,
                               pick_config, shared_memory_of)
from .buffers import new_output
from .checks import OpArgumentError
from .quantize import QMAX, SCALE_FLOOR
from .registry import require_fp8_tensor_cores
from .rounding_triton import BIAS_2_23, round_e4m3
from .triton_support import interpreting, on_tensor_device, tensor_device

# Tokens whose per-channel mean centres q, k and v (evenly spaced over the sequence; all of a shorter one).
MEAN_ROWS = 2048

# Largest magnitudes of the 8-bit codes, and the floor of a block's amax: an all-zero block (e.g. q minus
# its mean when Lq = 1) gets a tiny finite scale instead of 0/0. As for per-token quantization.
INT8_MAX = QMAX[torch.int8]
FP8_MAX = QMAX[torch.float8_e4m3fn]
# The same numbers as kernel constants (a @triton.jit function may only read constexpr globals).
_INT8_MAX = tl.constexpr(INT8_MAX)
_FP8_MAX = tl.constexpr(FP8_MAX)
_LOG2_FP8_MAX = tl.constexpr(math.log2(FP8_MAX))
_SCALE_FLOOR = tl.constexpr(SCALE_FLOOR)


@triton.jit
def _to_fp8(x, INTERPRET: tl.constexpr):
    """fp32 -> e4m3 with round-to-nearest-even; x must already lie in [-448, 448]."""
    if INTERPRET:
        x = round_e4m3(x)
    return x.to(tl.float8e4nv)


# The key order of P·V's operands. The 8-bit tensor cores take P as their register operand, a layout in which
# a thread holds four consecutive keys (k = 4i..4i+3 and 16+4i..16+4i+3 of every 32, i = lane % 4); the
# score tile P comes from gives it pairs 8 keys apart (2i, 2i+1, 8+2i, 9+2i, ...). Moving P between the two
# takes lane shuffles and byte selects: 48 of the 771 instructions a key block of the FP8 P·V kernel
# (64 x 128, sm_90a, triton 3.6). A product over keys is the same in any order of its keys as long as both
# operands follow it. So v's codes are stored with the keys of each group of 32 in the order that makes the
# score tile's pairs the operand's fours (`operand_order`), and P is relabelled the same way, which only
# renames registers: the shuffles disappear (718 instructions).
KEY_GROUP = 32


@triton.jit
def _operand_order(x, ROWS: tl.constexpr, KEYS: tl.constexpr):
    """x [ROWS, KEYS] with its keys permuted within each group of 32: position k takes key
    key_at_position(k). A register renaming for P in the layout of a score tile."""
    return x.reshape(ROWS, KEYS // 32, 2, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(ROWS, KEYS)


@triton.jit
def _key_at_position(k):
    """The key that position k holds in the operand order: bits (0, 1, 2, 3, 4) of the key are bits
    (0, 2, 3, 1, 4) of the position; groups of 32 stay in place."""
    return (k & ~0x0E) | (((k >> 2) & 3) << 1) | (((k >> 1) & 1) << 3)


# The same on an integer torch tensor (for `Quantized8bit.dequantized`): the jitted function's Python.
key_at_position = _key_at_position.fn


@triton.jit
def _rows_of_program(H, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """A quantize program's place in its grid (blocks of BLOCK rows, batch x head): (row block,
    batch·H + head, batch, head, the block's rows, the channels); batch and head as int64 offsets."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_l = pid_l * BLOCK + tl.arange(0, BLOCK)
    return pid_l, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), offs_l, tl.arange(0, BLOCK_D)


# Quantization of the 8-bit operands. The sequence statistics (sampled means, v's extremes) are torch
# reductions over views, no copies; the per-block quantization is this kernel.
@triton.jit
def _quantize_blocks_kernel(X, Mean, Qbar, Xq, Scale,
                            stride_xb, stride_xl, stride_xh,
                            stride_qb, stride_ql, stride_qh,
                            H, L, n_blocks, factor,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                            PER_ROW: tl.constexpr, TO_INT8: tl.constexpr, INTERPRET: tl.constexpr):
    """Xq[rows] = quant((X[rows] - Mean) · factor / scale) for one block of BLOCK rows of one (batch,
    head), scale = amax / QMAX of the block (q: Scale[b, h, block]) or, with PER_ROW, of each row (k:
    Scale[b, h, row, 0], and Scale[b, h, row, 1] = the row's bias (X[row] - Mean)·factor·Qbar)."""
    pid_l, pid_bh, b, h, offs_l, offs_d = _rows_of_program(H, BLOCK, BLOCK_D)
    row_ok = (offs_l < L)[:, None]
    d_ok = offs_d < HEAD_DIM
    x = _load_tile(X + b * stride_xb + h * stride_xh + offs_l[:, None] * stride_xl + offs_d[None, :],
                   offs_l, L, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    mean = tl.load(Mean + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    # Rows past L must stay 0 after centring, or they would inflate the block's amax.
    x = tl.where(row_ok, (x - mean[None, :]) * factor, 0.0)
    if PER_ROW:
        qbar = tl.load(Qbar + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        bias = tl.sum(x * qbar[None, :], 1)
        tl.store(Scale + (pid_bh.to(tl.int64) * L + offs_l) * 2 + 1, bias, mask=offs_l < L)
    qmax = _INT8_MAX if TO_INT8 else _FP8_MAX
    row_amax = tl.max(tl.abs(x), 1)
    if PER_ROW:
        scale = tl.maximum(row_amax, _SCALE_FLOOR) / qmax
        y = x / scale[:, None]
    else:
        scale = tl.maximum(tl.max(row_amax, 0), _SCALE_FLOOR) / qmax
        y = x / scale
    if TO_INT8:
        # Round half away from zero: the int conversion truncates towards zero.
        xq = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)
    else:
        # Clamp first: a value that rounds past 448 must saturate, not become NaN.
        xq = _to_fp8(tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX), INTERPRET)
    tl.store(Xq + b * stride_qb + h * stride_qh + offs_l[:, None] * stride_ql + offs_d[None, :], xq,
             mask=row_ok & d_ok[None, :])
    if PER_ROW:
        tl.store(Scale + (pid_bh.to(tl.int64) * L + offs_l) * 2, scale, mask=offs_l < L)
    else:
        tl.store(Scale + pid_bh * n_blocks + pid_l, scale)


@triton.jit
def _quantize_v_kernel(V, VMean, VScale, Vq, stride_vb, stride_vl, stride_vh, stride_qbh, stride_qd,
                       H, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                       TO_INT8: tl.constexpr, OPERAND_ORDER: tl.constexpr, INTERPRET: tl.constexpr):
    """Vq[b, h, d, l] = int8 or e4m3 of (V[b, l, h, d] - VMean[b, h, d]) / VScale[b, h, d]: centred,
    per-channel scales, stored transposed (keys contiguous) because Hopper's 8-bit MMAs want their B
    operand K-major. OPERAND_ORDER: position l holds key _key_at_position(l) (BLOCK a multiple of 32)."""
    _, pid_bh, b, h, offs_l, offs_d = _rows_of_program(H, BLOCK, BLOCK_D)
    ok = (offs_l < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :],
                   offs_l, L, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    mean = tl.load(VMean + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    scale = tl.load(VScale + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=1.0)
    v = (v - mean[None, :]) / scale[None, :]
    if TO_INT8:
        vq = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int8)  # half away from zero; |v| <= 127
    else:
        vq = _to_fp8(tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX), INTERPRET)
    if OPERAND_ORDER:
        vq = tl.trans(_operand_order(tl.trans(vq), BLOCK_D, BLOCK))
        ok = (_key_at_position(offs_l) < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
    vq_ptrs = Vq + pid_bh.to(tl.int64) * stride_qbh + offs_d[None, :] * stride_qd + offs_l[:, None]
    # Keys run along the stored rows: a mask on them (L, e.g. 32,760, is no multiple of 16) turns every
    # 16-byte store into single bytes (with the mask on every block: 0.85 ms a call at Wan's size on an
    # H200, against 0.15 ms for q's quantization, which moves as many bytes). Only the last block needs it.
    if (tl.program_id(0) + 1) * BLOCK <= L and BLOCK_D == HEAD_DIM:
        tl.store(vq_ptrs, vq)
    else:
        tl.store(vq_ptrs, vq, mask=ok)


@triton.jit
def _int_to_float(x):
    """An int32 tile of magnitude below 2^22 as fp32, exactly, without a conversion instruction: added
    to the bits of 1.5·2^23 it is that float plus x (BIAS_2_23), and subtracting 1.5·2^23 leaves x.

    Integer-to-float conversions run at a fraction of the fp32 rate, as exp2 does (triton-lang/triton
    #4563 replaced 8-bit conversions with bit operations on Hopper for that reason), and the 8-bit
    kernels converted every score beside its exp2; an integer add and a float add run on full-rate
    pipes. The 8-bit dot products stay below 127·127·256 < 2^22 for head dims and key blocks up to
    256. Compiled, the 8-bit kernel folds the subtraction into the multiply-add that follows instead
    (`_attend_8bit_tiles`). The INT8 P·V products go this way too where `pv_products_by_bits` says so
    (PV_BITS): compiled for sm_89, the kernel then spills inside its loop."""
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - BIAS_2_23


def pv_products_by_bits(device: torch.device) -> bool:
    """Whether the INT8 P·V recipe converts its int32 products with `_int_to_float` (PV_BITS): on
    Hopper and datacenter Blackwell (sm_90, sm_100), and in the interpreter (which runs both ways to the
    same values); not on sm_80, sm_89 or sm_120, where the extra registers spill inside the key loop."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] in (9, 10)


@triton.jit
def _key_scales(kb_base, offs_n, Lk, MASK_N: tl.constexpr):
    """(scale, bias) of the keys offs_n, read side by side as one [BLOCK_N, 2] tile. Keys past the end
    (MASK_N) get bias -inf: score -inf, weight 0, whatever their codes."""
    kb_ptrs = kb_base + offs_n[:, None] * 2 + tl.arange(0, 2)[None, :]
    if MASK_N:
        k_scale, bias = tl.split(tl.load(kb_ptrs, mask=(offs_n < Lk)[:, None], other=0.0))
        bias = tl.where(offs_n < Lk, bias, float("-inf"))
    else:
        k_scale, bias = tl.split(tl.load(kb_ptrs))
    return k_scale, bias


@triton.jit
def _attend_8bit_block(acc, l_i, m_i, q, q_scale, k_base, kb_base, v_base,
                       stride_kn, stride_vn, stride_vd, start_n, Lk,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASK_N: tl.constexpr, QK_INT8: tl.constexpr, PV: tl.constexpr, PV_BITS: tl.constexpr,
                       V_ORDERED: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """Add keys [start_n, start_n + BLOCK_N) to the running (acc, l, m), loading them through pointers."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    # Keys past the end (MASK_N) load k = 0 and v = 0: finite, so their 0 weights add nothing.
    k = _load_tile(k_ptrs, offs_n, Lk, MASK_N, HEAD_DIM, BLOCK_D)
    k_scale, bias = _key_scales(kb_base, offs_n, Lk, MASK_N)
    if MASK_N and V_ORDERED:
        # Position n of the stored keys holds key _key_at_position(n): mask by that (past Lk: padding).
        v = _load_tile(v_ptrs, _key_at_position(offs_n), Lk, True, HEAD_DIM, BLOCK_D)
    else:
        v = _load_tile(v_ptrs, offs_n, Lk, MASK_N, HEAD_DIM, BLOCK_D)
    return _attend_8bit_tiles(acc, l_i, m_i, q, q_scale, k, k_scale, bias, v, BLOCK_D, BLOCK_N, QK_INT8, PV,
                              PV_BITS, V_ORDERED, DOT_FP32, INTERPRET)


@triton.jit
def _attend_8bit_tiles(acc, l_i, m_i, q, q_scale, k, k_scale, bias, v,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, PV: tl.constexpr,
                       PV_BITS: tl.constexpr, V_ORDERED: tl.constexpr, DOT_FP32: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """The online-softmax step and P·V of a loaded key block: codes k [BLOCK_N, BLOCK_D], each key's scale
    and bias (`_key_scales`), v's codes (or 16-bit values) [BLOCK_N, BLOCK_D]."""
    # Dequantize (the scales already carry log2(e)/√D) and add the q-mean correction of each key.
    c = q_scale * k_scale
    if QK_INT8 and not INTERPRET:
        # The exact integer sums x offset by 1.5·2^23 in their bits read as floats (_int_to_float without
        # its subtraction), the subtraction folded into each key's bias: s = (1.5·2^23 + x)·c +
        # (bias - 1.5·2^23·c), one fused multiply-add a score where the conversion took an add more.
        # The folded bias is rounded at the magnitude of 1.5·2^23·c: each key's scores move by about one
        # unit of its integer sums, which moved the output by ~0.1% of the quantization's own error in
        # a float64 model (bench/RESULTS.md, Attention). The interpreter keeps the unfolded form:
        # without a fused multiply-add the product would round at that magnitude too.
        s = (tl.dot(q, tl.trans(k), out_dtype=tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)
        s = s * c[None, :] + (bias - c * BIAS_2_23)[None, :]
    else:
        if QK_INT8:
            s = _int_to_float(tl.dot(q, tl.trans(k), out_dtype=tl.int32))  # exact integer sums
        else:
            s = tl.dot(q, tl.trans(k), max_num_imprecise_acc=BLOCK_D)
        s = s * c[None, :] + bias[None, :]
    if PV == "int8":
        # Online softmax with P relative to this block's row max (the module docstring's "int8").
        block_max = tl.max(s, 1)
        m_new = tl.maximum(m_i, block_max)
        alpha = tl.math.exp2(m_i - m_new)
        r = tl.math.exp2(block_max - m_new)
        p = tl.math.exp2(s - block_max[:, None])
        l_i = l_i * alpha + r * tl.sum(p, 1)
        m_i = m_new
        # p·127 rounded to an integer by adding 1.5·2^23 in the same fused multiply-add: the sum's
        # low mantissa bits are the integer (round half to even), read by reinterpreting the bits.
        # One floating-point instruction instead of a float-to-int conversion (a quarter-rate unit).
        # (The interpreter's fma rounds twice: a code may differ by one step there, never on a GPU.)
        pq = (tl.fma(p, _INT8_MAX, BIAS_2_23).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)
        if V_ORDERED:
            pq = _operand_order(pq, pq.shape[0], BLOCK_N)
        pv = tl.dot(pq, v, out_dtype=tl.int32)
        if PV_BITS:
            # (_int_to_float, its subtraction folded as above) acc·alpha + pv·r = (1.5·2^23 + pv)·r +
            # (acc·alpha - 1.5·2^23·r): two multiply-adds an element where three instructions were. The
            # second rounds at the magnitude of 1.5·2^23·r, an error of about r against a block's
            # products of up to 127·127·BLOCK_N·r.
            pv = (pv + 0x4B400000).to(tl.float32, bitcast=True)
            acc = pv * r[:, None] + (acc * alpha[:, None] - (r * BIAS_2_23)[:, None])
        else:
            acc = acc * alpha[:, None] + pv.to(tl.float32) * r[:, None]
    elif PV == "fp8":
        # The weights scaled by 448 straight from exp2, log2(448) taken off the max instead of a
        # multiply per weight: at most 448 (e4m3's largest, and any fp32 excess rounds back to it). l
        # sums the same scaled weights, so the 448 cancels in acc / l.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - (m_new - _LOG2_FP8_MAX)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        p8 = _to_fp8(p, INTERPRET)
        if V_ORDERED:
            p8 = _operand_order(p8, p8.shape[0], BLOCK_N)
        acc = acc * alpha[:, None] + tl.dot(p8, v, max_num_imprecise_acc=BLOCK_N)
    else:
        p, alpha, l_i, m_i = _softmax_step(m_i, l_i, s, 1.0)
        # Re-base the accumulator on the new max before adding this block's contribution.
        acc = _add_pv(acc * alpha[:, None], p, v, DOT_FP32)
    return acc, l_i, m_i


@triton.jit
def _attention_8bit_kernel(Q, QScale, K, KScaleBias, V, VMean, VScale, Out,
                           stride_qb, stride_qm, stride_qh,
                           stride_kb, stride_kn, stride_kh,
                           stride_vb, stride_vn, stride_vh, stride_vd,
                           stride_ob, stride_om, stride_oh,
                           H, Lq, Lk, n_qblocks,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, PV: tl.constexpr,
                           PV_BITS: tl.constexpr, V_ORDERED: tl.constexpr, DOT_FP32: tl.constexpr,
                           INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   offs_m, Lq, True, HEAD_DIM, BLOCK_D)
    q_scale = tl.load(QScale + pid_bh * n_qblocks + pid_m)
    k_base = K + b * stride_kb + h * stride_kh
    kb_base = KScaleBias + pid_bh.to(tl.int64) * Lk * 2
    v_base = V + b * stride_vb + h * stride_vh

    m_i, l_i, acc = _fresh_state(BLOCK_M, BLOCK_D)
    full_end = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_8bit_block(acc, l_i, m_i, q, q_scale, k_base, kb_base, v_base,
                                           stride_kn, stride_vn, stride_vd, start_n, Lk, HEAD_DIM, BLOCK_D,
                                           BLOCK_N, False, QK_INT8, PV, PV_BITS, V_ORDERED, DOT_FP32,
                                           INTERPRET)
    if full_end < Lk:
        acc, l_i, m_i = _attend_8bit_block(acc, l_i, m_i, q, q_scale, k_base, kb_base, v_base,
                                           stride_kn, stride_vn, stride_vd, full_end, Lk, HEAD_DIM, BLOCK_D,
                                           BLOCK_N, True, QK_INT8, PV, PV_BITS, V_ORDERED, DOT_FP32,
                                           INTERPRET)
    out = _finish_8bit(acc, l_i, VMean, VScale, pid_bh, HEAD_DIM, BLOCK_D, PV)
    _store_out_tile(Out + b * stride_ob + h * stride_oh, stride_om, pid_m, Lq, out, BLOCK_M, HEAD_DIM,
                    BLOCK_D, INTERPRET)


@triton.jit
def _finish_8bit(acc, l_i, VMean, VScale, pid_bh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 PV: tl.constexpr):
    """The output tile: acc normalised by l and, for 8-bit P·V, v's centring and channel scales undone
    (INT8 P was scaled by 127; FP8 P's 448 is in l too, and cancelled)."""
    out = acc / l_i[:, None]
    if PV != "fp16":
        offs_d = tl.arange(0, BLOCK_D)
        v_scale = tl.load(VScale + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        v_mean = tl.load(VMean + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        if PV == "int8":
            v_scale = v_scale / _INT8_MAX
        out = out * v_scale[None, :] + v_mean[None, :]
    return out


@triton.jit
def _attention_8bit_tma_kernel(QD, QScale, KD, KScaleBias, VD, VMean, VScale, Out,
                               stride_ob, stride_om, stride_oh, H, Lq, Lk, n_qblocks,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               QK_INT8: tl.constexpr, PV: tl.constexpr, PV_BITS: tl.constexpr,
                               V_ORDERED: tl.constexpr, INTERPRET: tl.constexpr):
    """_attention_8bit_kernel with the codes read through TMA descriptors (`tma_views_8bit`): q's and k's
    as [B·H·L, D] matrices, v's as [B·H·D, keys]. A tail block's rows past this head's are the next
    head's (or TMA's zeros): finite codes, rows that are not stored (q) and keys of score -inf (k)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    q = QD.load([pid_bh * Lq + pid_m * BLOCK_M, 0])
    q_scale = tl.load(QScale + pid_bh * n_qblocks + pid_m)
    k_row = pid_bh * Lk
    v_row = pid_bh * HEAD_DIM
    kb_base = KScaleBias + pid_bh.to(tl.int64) * Lk * 2
    m_i, l_i, acc = _fresh_state(BLOCK_M, HEAD_DIM)
    full_end = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        k_scale, bias = _key_scales(kb_base, start_n + tl.arange(0, BLOCK_N), Lk, False)
        acc, l_i, m_i = _attend_8bit_tiles(acc, l_i, m_i, q, q_scale, KD.load([k_row + start_n, 0]), k_scale,
                                           bias, tl.trans(VD.load([v_row, start_n])), HEAD_DIM, BLOCK_N, QK_INT8,
                                           PV, PV_BITS, V_ORDERED, False, INTERPRET)
    if full_end < Lk:
        offs_n = full_end + tl.arange(0, BLOCK_N)
        k_scale, bias = _key_scales(kb_base, offs_n, Lk, True)
        v = VD.load([v_row, full_end])
        if V_ORDERED:
            # The stored positions up to Lk rounded up to KEY_GROUP hold keys past Lk there: padding,
            # never written (an FP8 NaN code would turn its 0 weight into NaN). Zeroed.
            v = tl.where((_key_at_position(offs_n) < Lk)[None, :], v, tl.zeros_like(v))
        acc, l_i, m_i = _attend_8bit_tiles(acc, l_i, m_i, q, q_scale, KD.load([k_row + full_end, 0]), k_scale,
                                           bias, tl.trans(v), HEAD_DIM, BLOCK_N, QK_INT8, PV, PV_BITS, V_ORDERED,
                                           False, INTERPRET)
    out = _finish_8bit(acc, l_i, VMean, VScale, pid_bh, HEAD_DIM, HEAD_DIM, PV)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    _store_out_tile(Out + b * stride_ob + h * stride_oh, stride_om, pid_m, Lq, out, BLOCK_M, HEAD_DIM, HEAD_DIM,
                    INTERPRET)


@dataclass
class Quantized8bit:
    """The operands of the 8-bit kernel, as `quantize_for_attention` prepares them.

    q [B, H, Lq, D] and k [B, H, Lk, D] int8 or e4m3: c·(q - q̄) and k - k̄ in per-block codes;
    q_scale [B, H, cdiv(Lq, block_m)] fp32 (q per block of rows);
    k_scale_bias [B, H, Lk, 2] fp32: each key's scale (k per row) and its bias c·q̄·(k - k̄), c =
    log2(e)/√D (so q_scale·k_scale·(q·k) + bias is the score in log2 units, up to a per-row constant);
    v: v itself ([B, Lk, H, D] bf16/fp16, fp32 inputs converted to fp16) for pv="fp16", or for pv
    "int8" / "fp8" the codes of v - v̄ stored [B, H, D, Lk] (row stride padded to 16) with v_mean (v̄)
    and v_scale [B, H, D] fp32; with v_in_operand_order the codes' keys are in the operand order of each
    group of 32 (KEY_GROUP; key_at_position) and the view spans Lk rounded up to 32.
    """
    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale_bias: torch.Tensor
    v: torch.Tensor
    v_mean: torch.Tensor | None
    v_scale: torch.Tensor | None
    block_m: int
    block_n: int
    v_in_operand_order: bool = False

    @property
    def pv(self) -> str:
        """The P·V format these operands were prepared for (one of PV_FORMATS)."""
        return "fp16" if self.v_scale is None else "int8" if self.v.dtype == torch.int8 else "fp8"

    @property
    def k_scale(self) -> torch.Tensor:
        """[B, H, Lk] fp32 (a view)."""
        return self.k_scale_bias[..., 0]

    @property
    def bias(self) -> torch.Tensor:
        """[B, H, Lk] fp32 (a view)."""
        return self.k_scale_bias[..., 1]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q', k', bias, v) in float64, [B, H, L, D] / [B, H, Lk]: what the kernel multiplies, for tests."""
        q_scale = self.q_scale.double().repeat_interleave(self.block_m, dim=2)[:, :, :self.q.shape[2], None]
        q = self.q.double() * q_scale
        k = self.k.double() * self.k_scale.double()[..., None]
        if self.v_scale is None:
            v = self.v.double().transpose(1, 2)
        else:
            v = self.v.double()
            if self.v_in_operand_order:
                keys = torch.arange(v.shape[-1], device=v.device)
                v = torch.empty_like(v).index_copy_(-1, key_at_position(keys), v)[..., :self.k.shape[2]]
            v = v * self.v_scale.double()[..., None] + self.v_mean.double()[..., None]
            v = v.transpose(2, 3)
        return q, k, self.bias.double(), v


def _quantize_warps(block: int) -> int:
    """Warps of the quantize kernel for a block of `block` rows x 128 channels: one thread's share of the
    fp32 tile stays under ~64 values, so the memory-bound kernel keeps enough warps resident per SM
    (128 rows in 4 warps take ~240 registers a thread, in 8 warps ~110; ptxas -v, sm_90a)."""
    return 8 if block >= 128 else 4


def smoothing_mean(x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """[B, H, D] fp32 per-channel mean of x [B, L, H, D] over the tokens 0, s, 2s, ... with s =
    ceil(L / rows) (rows: MEAN_ROWS by default): at most `rows` of them, every token when L <= rows.
    A strided view, no copy."""
    step = -(-x.shape[1] // (rows or MEAN_ROWS))
    return x[:, ::step].mean(dim=1, dtype=torch.float32).contiguous()


@on_tensor_device
def quantize_for_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, qk: str, pv: str,
                           block_m: int, block_n: int, operand_order: bool = True,
                           mean_rows: int | None = None) -> Quantized8bit:
    """Smooth and quantize q and k (qk "int8" or "fp8") and prepare v (pv "fp16", "int8" or "fp8"); 8-bit v
    codes with their keys in the operand order (KEY_GROUP; block_n must then be a multiple of 32) unless
    `operand_order` is False. The smoothing means come from at most `mean_rows` tokens (smoothing_mean; MEAN_ROWS
    by default)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    if operand_order and pv != "fp16" and block_n % KEY_GROUP:
        raise OpArgumentError(f"attention: key blocks of {block_n} cannot take v in the operand order (groups of "
                              f"{KEY_GROUP} keys)")
    c = LOG2E / math.sqrt(D)
    block_d = _block_d("attention", D)
    check_slice_offsets("attention", dict(q=q, k=k, v=v), EIGHT_BIT_HINT)
    # The codes are addressed with 32-bit offsets too: q's and k's [B, H, L, D] (rows D apart), v's
    # [B, H, D, keys padded to KEY_GROUP] (rows of the padded keys) and k's scales and biases [B, H, Lk, 2].
    lk_pad = triton.cdiv(Lk, KEY_GROUP) * KEY_GROUP
    for name, rows, stride, width in (("q's codes", Lq, D, D), ("k's codes", Lk, D, D),
                                      ("v's codes", D, lk_pad, lk_pad), ("k's scales", Lk, 2, 2)):
        check_rows_offset("attention", name, rows, stride, width, EIGHT_BIT_HINT)
    qdtype = torch.int8 if qk == "int8" else torch.float8_e4m3fn
    q_mean = smoothing_mean(q, mean_rows)  # [B, H, D] fp32
    k_mean = smoothing_mean(k, mean_rows)
    qbar_c = (q_mean * c).contiguous()

    def quantize(x, mean, factor, block, per_row):
        L = x.shape[1]
        n_blocks = triton.cdiv(L, block)
        xq = new_output((B, H, L, D), qdtype, dev)
        scale = new_output((B, H, L, 2) if per_row else (B, H, n_blocks), torch.float32, dev)
        _quantize_blocks_kernel[(n_blocks, B * H)](
            x, mean, qbar_c, xq, scale, *_bhd_strides(x), xq.stride(0), xq.stride(2), xq.stride(1),
            H, L, n_blocks, factor,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK=block, PER_ROW=per_row, TO_INT8=qk == "int8",
            INTERPRET=interpreting(), num_warps=_quantize_warps(block))
        return xq, scale

    q8, q_scale = quantize(q, q_mean, c, block_m, False)
    k8, k_scale_bias = quantize(k, k_mean, 1.0, block_n, True)

    if pv != "fp16":
        # amax of |v - v̄| over the whole sequence from v's own extremes: no centred copy needed.
        v_mean = smoothing_mean(v, mean_rows)
        v_min, v_max = torch.aminmax(v, dim=1)
        v_amax = torch.maximum(v_max.float() - v_mean, v_mean - v_min.float())
        v_scale = (v_amax.clamp_min(SCALE_FLOOR) / (INT8_MAX if pv == "int8" else FP8_MAX)).contiguous()
        # 16-byte aligned rows keep the K-major loads vectorized; the operand order permutes whole groups.
        group = KEY_GROUP if operand_order else 16
        lk_pad = triton.cdiv(Lk, group) * group
        v_dtype = torch.int8 if pv == "int8" else torch.float8_e4m3fn
        # Poisoned in full under DIT8_POISON_OUTPUTS: the attention kernel must never read the padding.
        v_store = new_output((B, H, D, lk_pad), v_dtype, dev)
        _quantize_v_kernel[(triton.cdiv(Lk, 64), B * H)](
            v, v_mean, v_scale, v_store, *_bhd_strides(v), v_store.stride(1), v_store.stride(2),
            H, Lk, HEAD_DIM=D, BLOCK_D=block_d, BLOCK=64, TO_INT8=pv == "int8", OPERAND_ORDER=operand_order,
            INTERPRET=interpreting(), num_warps=4)
        v_out = v_store if operand_order else v_store[..., :Lk]
    else:
        v_mean = v_scale = None
        v_out = v if v.dtype in (torch.bfloat16, torch.float16) else v.to(torch.float16)
    return Quantized8bit(q8, q_scale, k8, k_scale_bias, v_out, v_mean, v_scale, block_m, block_n,
                         v_in_operand_order=pv != "fp16" and operand_order)


# What an OpArgumentError of the kernels' 32-bit offsets suggests (attention.check_slice_offsets).
EIGHT_BIT_HINT = "precision='bf16' with backend='torch' (SDPA, 64-bit offsets) takes it"

# The operand formats (q·kᵀ, P·V) of each 8-bit precision. Both use INT8 q·kᵀ: on Gaussian q/k it
# errs ~3x less than e4m3 (7 bits of uniform steps in a block against 3 mantissa bits) and runs at
# the same tensor-core rate. Both run P·V on 8-bit tensor cores too, at twice the 16-bit rate: "int8"
# with block-max-relative INT8 P (~1.5% error on Gaussian data), "fp8" with e4m3 P (SageAttention2's
# recipe, ~3.4%). `attention_8bit(..., qk=, pv=)` overrides either: pv="fp16" (16-bit P·V,
# SageAttention's first recipe, ~1.2%) or qk="fp8".
RECIPES = {"int8": ("int8", "int8"), "fp8": ("int8", "fp8")}
PV_FORMATS = ("fp16", "int8", "fp8")


def config_path(pv: str) -> str:
    """The `pick_config` path of the 8-bit kernel with P·V in `pv`: 16-bit P·V takes its own tiles."""
    return "8bit_pv16" if pv == "fp16" else "8bit"


@on_tensor_device
def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: str, *,
                   qk: str | None = None, pv: str | None = None,
                   config: AttnConfig | None = None) -> torch.Tensor:
    """8-bit attention with the operand formats of RECIPES[precision] ("int8" or "fp8"), or those
    given: q·kᵀ in `qk` ("int8" or "fp8") after smoothing, P·V in `pv` (one of PV_FORMATS).
    Output [B, Lq, H, D] in q's dtype."""
    if precision not in RECIPES:
        raise OpArgumentError(f"attention: 8-bit precision must be 'int8' or 'fp8', got {precision!r}")
    qk = qk or RECIPES[precision][0]
    pv = pv or RECIPES[precision][1]
    if qk not in ("int8", "fp8"):
        raise OpArgumentError(f"attention: qk must be 'int8' or 'fp8', got {qk!r}")
    if pv not in PV_FORMATS:
        raise OpArgumentError(f"attention: pv must be one of {PV_FORMATS}, got {pv!r}")
    if "fp8" in (qk, pv):
        require_fp8_tensor_cores("attention: FP8 " + ("q·kᵀ" if qk == "fp8" else "P·V"), q.device,
                                 "use precision='int8' or 'bf16'")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    _block_d("attention", D)
    _check_keys("attention", "k", Lk)
    q, k, v = _unit_d(q, k, v)
    check_slice_offsets("attention", dict(q=q, k=k, v=v), EIGHT_BIT_HINT)
    out = new_output(q.shape, q.dtype, q.device)
    if Lq == 0 or B * H == 0:
        return out
    cfg = config or pick_config(config_path(pv), D, shared_memory=shared_memory_of(q.device))
    x = quantize_for_attention(q, k, v, qk=qk, pv=pv, block_m=cfg.block_m, block_n=cfg.block_n)
    return _launch_8bit(x, out, cfg)


def _launch_8bit(x: Quantized8bit, out: torch.Tensor, cfg: AttnConfig) -> torch.Tensor:
    B, H, Lq, D = x.q.shape
    Lk = x.k.shape[2]
    pv = x.pv
    if pv != "fp16":
        # [B, H, D, Lk] storage read as [B, Lk, H, D] tiles: (batch, key, head, channel) strides.
        v_strides = (x.v.stride(0), x.v.stride(3), x.v.stride(1), x.v.stride(2))
        v_mean, v_scale = x.v_mean, x.v_scale
    else:
        v_strides = (x.v.stride(0), x.v.stride(1), x.v.stride(2), x.v.stride(3))
        v_mean = v_scale = x.q_scale  # placeholders, never read with 16-bit P·V
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    descriptors = tma_views_8bit(cfg, x) if cfg.tma else None
    if descriptors is not None:
        QD, KD, VD = descriptors
        LAST_COMPILED["attention_8bit"] = _attention_8bit_tma_kernel[grid](
            QD, x.q_scale, KD, x.k_scale_bias, VD, x.v_mean, x.v_scale, out, *_bhd_strides(out),
            H, Lq, Lk, x.q_scale.shape[2],
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_INT8=x.q.dtype == torch.int8, PV=pv,
            PV_BITS=pv_products_by_bits(x.q.device), V_ORDERED=x.v_in_operand_order, INTERPRET=interpreting(),
            **cfg.launch_options())
        return out
    LAST_COMPILED["attention_8bit"] = _attention_8bit_kernel[grid](
        x.q, x.q_scale, x.k, x.k_scale_bias, x.v, v_mean, v_scale, out,
        x.q.stride(0), x.q.stride(2), x.q.stride(1),
        x.k.stride(0), x.k.stride(2), x.k.stride(1),
        *v_strides,
        *_bhd_strides(out),
        H, Lq, Lk, x.q_scale.shape[2],
        HEAD_DIM=D, BLOCK_D=_block_d("attention", D, DOT8_MIN_REDUCTION), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, QK_INT8=x.q.dtype == torch.int8,
        PV=pv, PV_BITS=pv_products_by_bits(x.q.device), V_ORDERED=x.v_in_operand_order, DOT_FP32=interpreting(),
        INTERPRET=interpreting(),
        **cfg.launch_options())
    return out


def tma_views_8bit(cfg: AttnConfig, x: Quantized8bit) -> tuple | None:
    """TMA descriptors of the 8-bit codes for `_attention_8bit_tma_kernel`: q [B·H·Lq, D] and k [B·H·Lk, D]
    in blocks of cfg's rows and keys x D, v's codes [B·H·D, keys] in blocks of D x keys; None where that
    kernel cannot run: not Hopper or later (nor the interpreter), 16-bit P·V (v is not codes), or a head
    dim other than the padded one the dots take (TMA would not zero the padding channels)."""
    B, H, Lq, D = x.q.shape
    device = x.q.device
    gpu_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    if not (gpu_ok or interpreting()) or x.pv == "fp16" or D != _block_d("attention", D, DOT8_MIN_REDUCTION):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    q, k, v = x.q, x.k, x.v
    # (quantize_for_attention writes q and k contiguous and v's rows 16-byte aligned.)
    if not (q.is_contiguous() and k.is_contiguous() and v.stride(3) == 1 and v.stride(1) == D * v.stride(2)
            and v.stride(0) == H * v.stride(1) and v.stride(2) % 16 == 0):
        return None
    keys = v.shape[3]
    return (TensorDescriptor(q, [B * H * Lq, D], [D, 1], [cfg.block_m, D]),
            TensorDescriptor(k, [B * H * k.shape[2], D], [D, 1], [cfg.block_n, D]),
            TensorDescriptor(v, [B * H * D, keys], [v.stride(2), 1], [D, cfg.block_n]))


def attention_from_quantized(x: Quantized8bit, out_dtype: torch.dtype,
                             config: AttnConfig | None = None) -> torch.Tensor:
    """Run the 8-bit kernel on operands already prepared by `quantize_for_attention` (for tests that
    separate the kernel's arithmetic from the quantization error). Output [B, Lq, H, D]."""
    B, H, Lq, D = x.q.shape
    cfg = config or pick_config(config_path(x.pv), D, shared_memory=shared_memory_of(x.q.device))
    if (cfg.block_m, cfg.block_n) != (x.block_m, x.block_n):
        raise OpArgumentError("attention: the config's blocks must match the quantization blocks")
    check_rows_offset("attention", "the output", Lq, H * D, D, EIGHT_BIT_HINT)
    out = new_output((B, Lq, H, D), out_dtype, x.q.device)
    with tensor_device(out):
        return _launch_8bit(x, out, cfg)


# ----------------------------------------------------------------------------------------------------
# torch.library op (see attention_triton.py)
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("dit8::attention_8bit_triton", mutates_args=())
def attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: str) -> torch.Tensor:
    """The 8-bit attention (its quantization and kernel launches) as a torch.library op: `attention_8bit`
    with RECIPES[precision], arguments checked by kernels/attention.py."""
    return attention_8bit(q, k, v, precision)


@attention_8bit_op.register_fake
def _(q, k, v, precision):
    return q.new_empty(q.shape)
