"""8-bit attention for Hopper in Gluon: the recipes of kernels/attention_8bit_triton.py (INT8 q·kᵀ on
smoothed q and k; P·V on centred v in FP8 e4m3, "fp8", or INT8 with P relative to each block's row max,
"int8"), a candidate for the op's 8-bit paths, run by the GPU tests and the attention benchmark, and by
the op only where DIT8_GLUON asks ("attention_8bit", kernels/candidates.py).

It takes the operands `quantize_for_attention` prepares for the Triton kernel (q codes per block of a
program's 128 or 64 rows, k codes and bias per key, v - v̄ codes stored [B, H, D, Lk]) and computes the
same arithmetic with the schedule of kernels/attention_gluon.py: the softmax of key block j runs while
the tensor cores multiply P_{j-1}·V, where the Triton kernel waits for each product right after issuing
it. What differs from the bf16 kernel there:

- P goes through shared memory (two buffers, one per block in flight). The wait that keeps the register
  operand of an asynchronous product alive takes no 8-bit tensors (triton 3.6 and 3.9 fail to lower
  it), so P_j is stored, fenced for the tensor cores, and read from there by block j + 1's product.
- Each block's P·V runs from zero into registers of its own and is added to acc when done (Hopper's FP8
  MMA accumulates with reduced precision, so it only ever sums one block's products, as the Triton
  kernel's max_num_imprecise_acc=BLOCK_N; the INT8 recipe scales each block's product by its own r).
  Block j adds P_{j-2}·V: acc = acc·alpha_{j-2} + pv_{j-2}·r_{j-2}, where acc held the sum up to block
  j - 3 relative to m_{j-3}.
- Scores: the int32 dot x_n of key n becomes fp32 by adding the bits of M = 1.5·2^23 (exact below
  2^22, as `_int_to_float`), and the dequantizing FMA folds the subtraction of M in: s_n = (M + x_n)·c_n
  + d_n with c_n = q_scale·k_scale_n and d_n = bias_n - M·c_n, one FMA a score instead of an add and
  an FMA. d_n's rounding moves key n's scores by at most 0.75 units of c_n, a step of the integer
  dot, where the rounding of the q and k codes already moves them by hundreds. INT8 P·V products fold
  the same way into acc's rescaling (`_add_product`).
- Each key's scale and bias come from a planar copy [B·H, 2, Lk rounded up to 16] (scales, then
  biases), so that a thread loads the two neighbouring keys it holds in one 8-byte load.

Scope: bf16 q/k/v [B, L, H, 128], sm_90. The TMA descriptors take q and k codes as rows [B·H·L, 128]:
a tail block reads the next head's rows, which are finite codes (queries not stored, keys given bias
-inf); v's descriptor spans exactly Lk keys of each channel, so its tail reads zeros, never the
padding of its rows.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_8bit_triton import FP8_MAX, RECIPES, Quantized8bit, quantize_for_attention
from .attention_gluon import _tma_load, invalidate_barriers, stage_barriers
from .attention_triton import _check_keys, _unit_d
from .buffers import new_output
from .checks import OpArgumentError

# Renamed after triton 3.6 (thread_barrier -> barrier).
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK_M = 128  # query rows per program (one q scale): two warpgroups of 64
# The query blocks a program may take: 128 rows on two warpgroups (8 warps), or 64 on one (4 warps; the
# "wg" configuration). Every block of P and each stage's release waits at a barrier of all the
# program's warps: with one warpgroup a program, that barrier holds back no other warpgroup, and two
# programs an SM (82 KiB of shared memory, at most 255 registers a thread) run on their own schedules.
BLOCK_MS = (128, 64)
# The configurations kernels/candidates.py routes ("attention_8bit"), as keyword arguments of
# attention_8bit.
CONFIGS = {"default": dict(warp_specialized=False, block_m=128), "ws": dict(warp_specialized=True, block_m=128),
           "wg": dict(warp_specialized=False, block_m=64)}
# Keys per block. With 128, a thread holds 64 registers each of acc, the P·V product in flight and the
# scores, and 64 of the keys' scales and biases: 255 registers and spills inside the key loop (sm_90a,
# triton 3.6). With 64: 231, no spills.
BLOCK_N = 64
STAGES = 4  # k and v stages of 16 KiB, with q's 16 KiB and P's 2 x 8 KiB: 96 KiB
HEAD_DIM = 128
_M = gl.constexpr(12582912.0)  # 1.5·2^23: floats from 2^23 to 2^24 step by exactly 1
_LOG2_FP8_MAX = gl.constexpr(math.log2(FP8_MAX))  # P is scaled to e4m3's largest value


@gluon.jit
def _scores(x, q_scale, KS, stride_ks, start_n, Lk, s_layout: gl.constexpr, BLOCK: gl.constexpr,
            MASK: gl.constexpr):
    """A block of int32 dots x as scores in log2 units, relative to nothing yet: x·q_scale·k_scale_n +
    bias_n (module docstring). Keys past Lk (MASK) get -inf."""
    cols = start_n + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
    if MASK:
        ok = cols < Lk
        k_scale = gl.load(KS + cols, mask=ok, other=0.0)
        bias = gl.load(KS + stride_ks + cols, mask=ok, other=float("-inf"))
    else:
        k_scale = gl.load(KS + cols)
        bias = gl.load(KS + stride_ks + cols)
    c = q_scale * k_scale
    d = gl.fma(c, -_M, bias)
    x_m = (x + 0x4B400000).to(gl.float32, bitcast=True)  # M + x, exactly
    return x_m * c[None, :] + d[None, :]


@gluon.jit
def _softmax_update(s, m_i, l_i, PV_INT8: gl.constexpr):
    """Online-softmax update of (m, l) by a block of scores, as the Triton kernel's recipes: the P codes
    of the block, alpha = exp2(m_old - m_new), the factor r of the block's product, l and m.
    FP8: P scaled by 448 straight from exp2 (log2(448) taken off the max; l sums the same scaled weights,
    so it cancels), r = 1. INT8: P relative to the block's own row max in steps of 1/127, r = exp2(block
    max - m_new)."""
    if PV_INT8:
        block_max = gl.max(s, 1)
        m_new = gl.maximum(m_i, block_max)
        alpha = gl.exp2(m_i - m_new)  # 0 on the first block (m_old = -inf)
        r = gl.exp2(block_max - m_new)
        p = gl.exp2(s - block_max[:, None])
        l_i = l_i * alpha + r * gl.sum(p, 1)
        # p·127 rounded to an integer in the FMA with 1.5·2^23: its bits' low byte is the code.
        codes = gl.fma(p, 127.0, _M).to(gl.int32, bitcast=True).to(gl.int8)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        r = alpha  # (unused: the product is relative to m_new)
        p = gl.exp2(s - (m_new - _LOG2_FP8_MAX)[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        codes = p.to(gl.float8e4nv)
    return codes, alpha, r, l_i, m_new


@gluon.jit
def _store_p(codes, p_smem, buffer):
    """P's codes into their shared-memory buffer, visible to the tensor cores of every warp."""
    p_smem.index(buffer).store(codes)
    fence_async_shared()
    _cta_barrier()


@gluon.jit
def _add_product(acc, pv, alpha, r, o_layout: gl.constexpr, PV_INT8: gl.constexpr):
    """acc·alpha + pv·r, acc and the block's product pv relative to the same maximum. INT8: pv's int32 sums
    (below 127·127·BLOCK_N < 2^22) become M + pv exactly by adding the bits of M, whose subtraction folds
    into acc's rescaling: (M + pv)·r + (acc·alpha - M·r), an error of at most 0.75·r a block (one unit of
    an integer sum), where acc holds thousands of units."""
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    if PV_INT8:
        r_o = gl.convert_layout(r, gl.SliceLayout(1, o_layout))[:, None]
        pv_m = (pv + 0x4B400000).to(gl.float32, bitcast=True)
        return pv_m * r_o + (acc * alpha_o - _M * r_o)
    else:
        return acc * alpha_o + pv


@gluon.jit
def _load_stage(k_desc, v_desc, bars, k_smem, v_smem, stage, block, k_row, v_row, pred, BLOCK: gl.constexpr):
    """TMA of key block `block` (its k rows and its columns of vᵀ) into `stage`, signalled on its mbarrier;
    nothing when `pred` is false."""
    bar = bars.index(stage)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    _tma_load(k_desc, [k_row + block * BLOCK, 0], bar, k_smem.index(stage), pred=pred)
    _tma_load(v_desc, [v_row, block * BLOCK], bar, v_smem.index(stage), pred=pred)


@gluon.jit
def _attend_block(acc, pv, alpha1, alpha2, r1, r2, l_i, m_i, j, q_smem, k_smem, v_smem, p_smem, bars, empty, k_desc,
                  v_desc, zero_s, zero_o, k_row, v_row, n_blocks, Lk, q_scale, KS, stride_ks, s_layout: gl.constexpr,
                  o_layout: gl.constexpr, BLOCK: gl.constexpr, NSTAGES: gl.constexpr, MASK: gl.constexpr,
                  WS: gl.constexpr, PV_INT8: gl.constexpr):
    """Key block j >= 1: add P_{j-2}·V, issue S_j = q·k_jᵀ and P_{j-1}·V, softmax of block j while the
    latter runs. alpha1, alpha2 (r1, r2): alpha (r) of blocks j - 1 and j - 2."""
    stage = j % NSTAGES
    mbarrier.wait(bars.index(stage), (j // NSTAGES) & 1)
    pv = warpgroup_mma_wait(0, deps=(pv, ))
    acc = _add_product(acc, pv, alpha2, r2, o_layout, PV_INT8)
    # Block j - 2's stage is free now (both its products are done): with WS, back to the loading warp;
    # otherwise the block NSTAGES - 2 ahead goes there.
    if WS:
        mbarrier.arrive(empty.index((j + NSTAGES - 2) % NSTAGES), count=1, pred=j >= 2)
    else:
        ahead = j - 2 + NSTAGES
        _load_stage(k_desc, v_desc, bars, k_smem, v_smem, ahead % NSTAGES, ahead, k_row, v_row,
                    (j >= 2) & (ahead < n_blocks), BLOCK)
    x = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    pv = warpgroup_mma(p_smem.index((j - 1) % 2), v_smem.index((j - 1) % NSTAGES).permute((1, 0)), zero_o,
                       use_acc=False, is_async=True)
    x = warpgroup_mma_wait(1, deps=(x, ))
    s = _scores(x, q_scale, KS, stride_ks, j * BLOCK, Lk, s_layout, BLOCK, MASK)
    codes, alpha, r, l_i, m_i = _softmax_update(s, m_i, l_i, PV_INT8)
    _store_p(codes, p_smem, j % 2)
    return acc, pv, alpha, alpha1, r, r1, l_i, m_i


@gluon.jit
def _attend(q_smem, k_smem, v_smem, p_smem, q_bar, bars, empty, k_desc, v_desc, QScale, KSB, stride_ksb, stride_ks,
            VMean, VScale, Out, stride_ob, stride_om, stride_oh, pid_m, bh, H, Lq, Lk, n_qblocks,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGES: gl.constexpr,
            WS: gl.constexpr, PV_INT8: gl.constexpr, num_warps: gl.constexpr):
    """One program's attention once its loads are under way: the schedule of the module docstring, the
    output tile stored. WS: the stages go back to the loading warp (`empty`) instead of being refilled
    here. PV_INT8: the "int8" recipe's P·V (else "fp8")."""
    k_row = bh * Lk  # the head's first row of k codes, [B·H·Lk, D]
    v_row = bh * HEAD_DIM  # its first channel of vᵀ codes, [B·H·D, Lk]
    # Products on 16 x N x 32 instructions (8-bit operands) over the warps stacked along M.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 32])
    n_blocks = gl.cdiv(Lk, BLOCK_N)
    q_scale = gl.load(QScale + bh * n_qblocks + pid_m)
    KS = KSB + bh.to(gl.int64) * stride_ksb
    full = Lk // BLOCK_N  # blocks without keys past Lk
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    pv_type: gl.constexpr = gl.int32 if PV_INT8 else gl.float32
    zero_o = gl.zeros([BLOCK_M, HEAD_DIM], pv_type, layout=o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    pv = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], pv_type, layout=o_layout))
    mbarrier.wait(q_bar, 0)

    # Block 0: its scores waited for at once. Until block 2 adds a product, acc and pv are zeros, whatever
    # the alphas and rs (1 to start).
    mbarrier.wait(bars.index(0), 0)
    x = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    x = warpgroup_mma_wait(0, deps=(x, ))
    if full == 0:
        s = _scores(x, q_scale, KS, stride_ks, 0, Lk, s_layout, BLOCK_N, True)
    else:
        s = _scores(x, q_scale, KS, stride_ks, 0, Lk, s_layout, BLOCK_N, False)
    codes, alpha1, r1, l_i, m_i = _softmax_update(s, m_i, l_i, PV_INT8)
    _store_p(codes, p_smem, 0)
    alpha2 = gl.full([BLOCK_M], 1.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    r2 = alpha2

    for j in range(1, full):
        acc, pv, alpha1, alpha2, r1, r2, l_i, m_i = _attend_block(
            acc, pv, alpha1, alpha2, r1, r2, l_i, m_i, j, q_smem, k_smem, v_smem, p_smem, bars, empty, k_desc,
            v_desc, zero_s, zero_o, k_row, v_row, n_blocks, Lk, q_scale, KS, stride_ks, s_layout, o_layout, BLOCK_N,
            NSTAGES, False, WS, PV_INT8)
    if (full > 0) & (full < n_blocks):  # the last block, with keys past Lk
        acc, pv, alpha1, alpha2, r1, r2, l_i, m_i = _attend_block(
            acc, pv, alpha1, alpha2, r1, r2, l_i, m_i, full, q_smem, k_smem, v_smem, p_smem, bars, empty, k_desc,
            v_desc, zero_s, zero_o, k_row, v_row, n_blocks, Lk, q_scale, KS, stride_ks, s_layout, o_layout, BLOCK_N,
            NSTAGES, True, WS, PV_INT8)

    # The last two blocks' P·V.
    pv = warpgroup_mma_wait(0, deps=(pv, ))
    acc = _add_product(acc, pv, alpha2, r2, o_layout, PV_INT8)
    pv = warpgroup_mma(p_smem.index((n_blocks - 1) % 2), v_smem.index((n_blocks - 1) % NSTAGES).permute((1, 0)),
                       zero_o, use_acc=False, is_async=True)
    pv = warpgroup_mma_wait(0, deps=(pv, ))
    acc = _add_product(acc, pv, alpha1, r1, o_layout, PV_INT8)

    # v was centred and divided by its channel scales: undo both (FP8 P's 448 is in l too, and cancels;
    # INT8 P's 127 is not).
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    v_scale = gl.load(VScale + bh * HEAD_DIM + cols)
    if PV_INT8:
        v_scale = v_scale / 127.0
    v_mean = gl.load(VMean + bh * HEAD_DIM + cols)
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None] * v_scale[None, :] + v_mean[None, :]
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    base = Out + (bh // H).to(gl.int64) * stride_ob + (bh % H) * stride_oh
    gl.store(base + rows[:, None].to(gl.int64) * stride_om + cols[None, :], out.to(gl.bfloat16),
             mask=(rows < Lq)[:, None])


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, bars, empty, pid_m, bh, Lq, Lk,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGES: gl.constexpr):
    """The loading warp: q, then every key block into the stage ring, each stage once the multiplying
    warps have released it (its first use needs no release: the wait on the opposite parity of a fresh
    barrier returns at once)."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [bh * Lq + pid_m * BLOCK_M, 0], q_bar, q_smem)
    for j in range(gl.cdiv(Lk, BLOCK_N)):
        stage = j % NSTAGES
        mbarrier.wait(empty.index(stage), ((j // NSTAGES) & 1) ^ 1)
        _load_stage(k_desc, v_desc, bars, k_smem, v_smem, stage, j, bh * Lk, bh * HEAD_DIM, True, BLOCK_N)


# Lk is never specialized: at Lk == 1 (a launch argument equal to 1 becomes a constant) triton 3.6 fails an
# assertion while lowering the kernel to LLVM.
@gluon.jit(do_not_specialize=["Lk"])
def _attention_8bit_kernel(q_desc, k_desc, v_desc, QScale, KSB, stride_ksb, stride_ks, VMean, VScale, Out,
                           stride_ob, stride_om, stride_oh, H, Lq, Lk, n_qblocks,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                           NSTAGES: gl.constexpr, WS: gl.constexpr, PV_INT8: gl.constexpr, num_warps: gl.constexpr):
    """Query block program_id(0) of head program_id(1) (batch·H + head). Without WS the multiplying warps
    also issue the loads (a stage refilled right after the wait that frees it); with WS one more warp (24
    registers, setmaxnreg) issues every load, and the multiplying warps hand the stages back through
    mbarriers, without the CTA barriers of a TMA issue in their loop."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NSTAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NSTAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
    p_smem = gl.allocate_shared_memory(v_desc.dtype, [2, BLOCK_M, BLOCK_N],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], v_desc.dtype))
    q_bar, bars, empty = stage_barriers(NSTAGES)
    if WS:
        gl.warp_specialize([
            (_attend, (q_smem, k_smem, v_smem, p_smem, q_bar, bars, empty, k_desc, v_desc, QScale, KSB, stride_ksb,
                       stride_ks, VMean, VScale, Out, stride_ob, stride_om, stride_oh, pid_m, bh, H, Lq, Lk,
                       n_qblocks, BLOCK_M, BLOCK_N, HEAD_DIM, NSTAGES, True, PV_INT8, num_warps)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, bars, empty, pid_m, bh, Lq,
                               Lk, BLOCK_M, BLOCK_N, HEAD_DIM, NSTAGES)),
        ], [1], [24])
    else:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [bh * Lq + pid_m * BLOCK_M, 0], q_bar, q_smem)
        for i in gl.static_range(NSTAGES):
            _load_stage(k_desc, v_desc, bars, k_smem, v_smem, i, i, bh * Lk, bh * HEAD_DIM, i < gl.cdiv(Lk, BLOCK_N),
                        BLOCK_N)
        _attend(q_smem, k_smem, v_smem, p_smem, q_bar, bars, empty, k_desc, v_desc, QScale, KSB, stride_ksb,
                stride_ks, VMean, VScale, Out, stride_ob, stride_om, stride_oh, pid_m, bh, H, Lq, Lk, n_qblocks,
                BLOCK_M, BLOCK_N, HEAD_DIM, NSTAGES, False, PV_INT8, num_warps)
    invalidate_barriers(q_bar, bars, empty, NSTAGES)


def num_warps(block_m: int) -> int:
    """The multiplying warps of a program of `block_m` query rows: a warpgroup per 64."""
    return block_m // 16


def shared_layout(rows: int, cols: int, dtype: gl.dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout of an operand tile [rows, cols] of 8-bit codes."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], dtype)


def _descriptors(x: Quantized8bit) -> tuple[TensorDescriptor, TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of the q and k codes as rows [B·H·L, D] and of the vᵀ codes as [B·H·D, Lk] (rows
    `x.v.stride(2)` apart: only the Lk keys, not the padding)."""
    B, H, Lq, D = x.q.shape
    Lk = x.k.shape[2]
    q_rows, k_rows = x.q.view(B * H * Lq, D), x.k.view(B * H * Lk, D)
    q_desc = TensorDescriptor(q_rows, [B * H * Lq, D], [D, 1], [x.block_m, D], shared_layout(x.block_m, D, gl.int8))
    k_desc = TensorDescriptor(k_rows, [B * H * Lk, D], [D, 1], [BLOCK_N, D], shared_layout(BLOCK_N, D, gl.int8))
    v_codes = gl.int8 if x.pv == "int8" else gl.float8e4nv
    v_desc = TensorDescriptor(x.v, [B * H * D, Lk], [x.v.stride(2), 1], [D, BLOCK_N],
                              shared_layout(D, BLOCK_N, v_codes))
    return q_desc, k_desc, v_desc


def planar_scales(x: Quantized8bit) -> torch.Tensor:
    """Each key's scale and bias as [B·H, 2, Lk rounded up to 16] fp32 (scales, then biases; the padding
    is never read)."""
    B, H, Lk, _ = x.k_scale_bias.shape
    planar = new_output((B * H, 2, triton.cdiv(Lk, 16) * 16), torch.float32, x.k.device)
    planar[:, :, :Lk] = x.k_scale_bias.view(B * H, Lk, 2).transpose(1, 2)
    return planar


def check_scope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: str) -> None:
    """OpArgumentError unless the kernel takes these inputs (module docstring's scope)."""
    if precision not in RECIPES:
        raise OpArgumentError(f"attention (gluon 8-bit): precision must be 'int8' or 'fp8', got {precision!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.bfloat16 or t.device.type != "cuda":
            raise OpArgumentError(f"attention (gluon 8-bit): {name} must be a bf16 CUDA tensor, got {t.dtype} on "
                                  f"{t.device}")
        if t.shape[-1] != HEAD_DIM:
            raise OpArgumentError(f"attention (gluon 8-bit): head_dim must be {HEAD_DIM}, got {t.shape[-1]}")
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        raise OpArgumentError("attention (gluon 8-bit): the kernel is written for Hopper (sm_90)")


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, precision: str, *,
                   warp_specialized: bool = False, block_m: int = BLOCK_M) -> torch.Tensor:
    """`attention(q, k, v, precision=precision)` ("int8" or "fp8": the Triton kernel's RECIPES) for bf16 q
    [B, Lq, H, 128], k and v [B, Lk, H, 128] on a Hopper GPU: quantized by the Triton kernels, attended by
    this one (`warp_specialized`: the kernel whose loads a warp of their own issues; `block_m`: query
    rows per program, one of BLOCK_MS). Out [B, Lq, H, D] bf16. OpArgumentError for inputs outside the
    kernel's scope."""
    check_scope(q, k, v, precision)
    if block_m not in BLOCK_MS:
        raise OpArgumentError(f"attention (gluon 8-bit): block_m must be one of {BLOCK_MS}, got {block_m}")
    _check_keys("attention", "k", k.shape[1])
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return new_output(q.shape, torch.bfloat16, q.device)
    q, k, v = _unit_d(q, k, v)
    qk, pv = RECIPES[precision]
    with torch.cuda.device(q.device):
        x = quantize_for_attention(q, k, v, qk=qk, pv=pv, block_m=block_m, block_n=BLOCK_N, operand_order=False)
        return attention_from_quantized(x, warp_specialized=warp_specialized)


def attention_from_quantized(x: Quantized8bit, *, warp_specialized: bool = False) -> torch.Tensor:
    """The kernel on operands `quantize_for_attention` prepared (INT8 q·kᵀ, INT8 or FP8 P·V, blocks of
    x.block_m (one of BLOCK_MS, a program's query rows) x BLOCK_N); out [B, Lq, H, D] bf16."""
    B, H, Lq, D = x.q.shape
    Lk = x.k.shape[2]
    if (x.q.dtype != torch.int8 or x.pv == "fp16" or x.block_m not in BLOCK_MS or x.block_n != BLOCK_N
            or D != HEAD_DIM or x.v_in_operand_order):
        raise OpArgumentError(f"attention (gluon 8-bit): needs INT8 q·kᵀ and 8-bit P·V operands quantized in blocks "
                              f"of {' or '.join(map(str, BLOCK_MS))} x {BLOCK_N} with head_dim {HEAD_DIM}, v's "
                              f"keys in their order (operand_order=False)")
    if x.v.stride(2) % 16 or x.v.data_ptr() % 16:
        raise OpArgumentError("attention (gluon 8-bit): vᵀ rows must be 16-byte aligned (TMA)")
    out = new_output((B, Lq, H, D), torch.bfloat16, x.q.device)
    planar = planar_scales(x)
    grid = (triton.cdiv(Lq, x.block_m), B * H)
    _attention_8bit_kernel[grid](
        *_descriptors(x), x.q_scale, planar, planar.stride(0), planar.stride(1), x.v_mean, x.v_scale, out,
        out.stride(0), out.stride(1), out.stride(2), H, Lq, Lk, x.q_scale.shape[2],
        BLOCK_M=x.block_m, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, NSTAGES=STAGES, WS=warp_specialized,
        PV_INT8=x.pv == "int8", num_warps=num_warps(x.block_m))
    return out
