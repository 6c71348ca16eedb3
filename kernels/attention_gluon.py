"""bf16 flash attention for Hopper in Gluon (Triton's explicit-layout dialect): a candidate for the
bf16 path of `attention`, run by the GPU tests and the attention benchmark, and by the op only where
DIT8_GLUON asks (kernels/candidates.py).

Why a second kernel. In the `tl.dot` kernels (kernels/attention_triton.py) every warpgroup waits for
each of its matrix products right after issuing it (the SASS has `WARPGROUP.DEPBAR.LE gsb0, 0x0`
after the last HGMMA of q·kᵀ and of P·V), so its tensor cores idle through its own softmax and only
another program on the SM can fill them. Gluon issues the products asynchronously and waits where it
is told (`warpgroup_mma(..., is_async=True)`, `warpgroup_mma_wait(n)`), and feeds K and V through TMA
into a ring of shared-memory stages guarded by mbarriers, with no address arithmetic per element.

Schedule of key block j (FlashAttention-3's overlap of the softmax with P·V, within one warpgroup):
    wait for block j's keys (mbarrier), then for P_{j-2}·v_{j-2}; rescale acc by alpha_{j-1};
    refill the stage block j - 2 held; issue S_j = q·k_jᵀ and P_{j-1}·v_{j-1};
    wait for S_j only (one product may stay in flight); softmax of block j (P_j, alpha_j)
    while P_{j-1}·v_{j-1} runs.
The wait for P·V sits at the top of the next block, behind the mbarrier wait (a loop in the machine
code): placed after the softmax in the same block, ptxas moves it ahead of the exp2s, which undoes the
overlap (seen in the SASS). Issuing S_j before that wait, to run q·kᵀ under the rescale, makes ptxas
serialize every product (its warning C7514: acc is read while a product is in flight). acc always holds
the sum for keys up to j - 2 relative to m_{j-2} until it is rescaled; P_{j-1} is relative to m_{j-1},
so the order rescale-then-add is exact.

Two kernels: in `_attention_kernel` the multiplying warps also issue the loads (the compiler puts CTA
barriers around each TMA issue); in `_attention_ws_kernel` one more warp (24 registers, setmaxnreg)
issues every load and the multiplying warps hand each stage back through an mbarrier (`empty`): their
key loop has 486 instead of 530 instructions a warp and 3 barriers among themselves instead of 5 of the
whole CTA (sm_90a, triton 3.6).

Scope: bf16 q/k/v [B, L, H, D] with unit stride along D and 16-byte aligned rows, head_dim 128,
sm_90. One launch per batch element: each launch's TMA descriptors span that element's rows only, so
the tail blocks read zeros past its end. Keys past Lk get score -inf; query rows past Lq are computed
and not stored.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_triton import LOG2E, _check_keys
from .buffers import new_output
from .checks import OpArgumentError

# The TMA load was renamed after triton 3.6 (async_copy_global_to_shared -> async_load), same arguments.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_M = 128  # query rows per program: two warpgroups of 64
BLOCK_N = 128  # keys per block
STAGES = 3  # K/V stages in shared memory: 3 x 64 KiB + q's 32 KiB, within Hopper's 227 KiB
NUM_WARPS = 8
HEAD_DIM = 128


@gluon.jit
def _softmax_update(s, m_i, l_i, start_n, Lk, qk_scale, s_layout: gl.constexpr, BLOCK: gl.constexpr,
                    MASK: gl.constexpr):
    """Online-softmax update of (m, l) by a block of raw scores s, in log2 units (qk_scale carries
    log2(e)/√D): the weights p = exp2(s·scale - m_new), alpha = exp2(m_old - m_new), l and m."""
    if MASK:
        cols = start_n + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((cols < Lk)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)  # 0 on the first block (m_old = -inf)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    return p, alpha, l_i * alpha + gl.sum(p, 1), m_new


@gluon.jit
def _load_stage(k_desc, v_desc, bars, k_smem, v_smem, stage, block, col, pred, BLOCK: gl.constexpr):
    """TMA of key block `block` (its k and v rows, columns col:col + D) into `stage`, signalled on its
    mbarrier; nothing when `pred` is false."""
    bar = bars.index(stage)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    _tma_load(k_desc, [block * BLOCK, col], bar, k_smem.index(stage), pred=pred)
    _tma_load(v_desc, [block * BLOCK, col], bar, v_smem.index(stage), pred=pred)


@gluon.jit
def _attend_block(acc, p_busy, p_next, alpha, l_i, m_i, j, q_smem, k_smem, v_smem, bars, empty, k_desc, v_desc,
                  zero_s, col, n_blocks, Lk, qk_scale, s_layout: gl.constexpr, o_layout: gl.constexpr,
                  p_layout: gl.constexpr, BLOCK: gl.constexpr, NSTAGES: gl.constexpr, MASK: gl.constexpr,
                  WS: gl.constexpr):
    """Key block j >= 1 of the schedule in the module docstring. p_busy: the registers of P_{j-2}, read
    by the product in flight; p_next: P_{j-1} as the product's operand."""
    stage = j % NSTAGES
    mbarrier.wait(bars.index(stage), (j // NSTAGES) & 1)
    acc, p_busy = warpgroup_mma_wait(0, deps=(acc, p_busy))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    # Block j - 2's stage is free now (both its products are done): with WS, back to the loading warp;
    # otherwise the block NSTAGES - 2 ahead goes there.
    if WS:
        mbarrier.arrive(empty.index((j + NSTAGES - 2) % NSTAGES), count=1, pred=j >= 2)
    else:
        ahead = j - 2 + NSTAGES
        _load_stage(k_desc, v_desc, bars, k_smem, v_smem, ahead % NSTAGES, ahead, col,
                    (j >= 2) & (ahead < n_blocks), BLOCK)
    s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    acc = warpgroup_mma(p_next, v_smem.index((j - 1) % NSTAGES), acc, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s, ))
    p, alpha, l_i, m_i = _softmax_update(s, m_i, l_i, j * BLOCK, Lk, qk_scale, s_layout, BLOCK, MASK)
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    return acc, p_next, p_op, alpha, l_i, m_i


@gluon.jit
def _attend(q_smem, k_smem, v_smem, q_bar, bars, empty, k_desc, v_desc, Out, stride_om, off_m, col, Lq, Lk,
            qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGES: gl.constexpr,
            WS: gl.constexpr, num_warps: gl.constexpr):
    """One program's attention once its loads are under way: the schedule of the module docstring,
    the output tile stored. WS: the stages go back to the loading warp (`empty`) instead of being
    refilled here."""
    # Products on 16 x N x 16 instructions over the warps stacked along M (64 rows a warpgroup).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    n_blocks = gl.cdiv(Lk, BLOCK_N)
    full = Lk // BLOCK_N  # blocks without keys past Lk
    mbarrier.wait(q_bar, 0)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))
    p_busy = gl.zeros([BLOCK_M, BLOCK_N], gl.bfloat16, layout=p_layout)

    # Block 0: its scores waited for at once.
    mbarrier.wait(bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    if full == 0:
        p, alpha, l_i, m_i = _softmax_update(s, m_i, l_i, 0, Lk, qk_scale, s_layout, BLOCK_N, True)
    else:
        p, alpha, l_i, m_i = _softmax_update(s, m_i, l_i, 0, Lk, qk_scale, s_layout, BLOCK_N, False)
    p_next = gl.convert_layout(p.to(gl.bfloat16), p_layout)

    for j in range(1, full):
        acc, p_busy, p_next, alpha, l_i, m_i = _attend_block(
            acc, p_busy, p_next, alpha, l_i, m_i, j, q_smem, k_smem, v_smem, bars, empty, k_desc, v_desc, zero_s,
            col, n_blocks, Lk, qk_scale, s_layout, o_layout, p_layout, BLOCK_N, NSTAGES, False, WS)
    if (full > 0) & (full < n_blocks):  # the last block, with keys past Lk
        acc, p_busy, p_next, alpha, l_i, m_i = _attend_block(
            acc, p_busy, p_next, alpha, l_i, m_i, full, q_smem, k_smem, v_smem, bars, empty, k_desc, v_desc, zero_s,
            col, n_blocks, Lk, qk_scale, s_layout, o_layout, p_layout, BLOCK_N, NSTAGES, True, WS)

    # The last block's P·V.
    acc, p_busy = warpgroup_mma_wait(0, deps=(acc, p_busy))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    acc = warpgroup_mma(p_next, v_smem.index((n_blocks - 1) % NSTAGES), acc, is_async=True)
    acc, p_next = warpgroup_mma_wait(0, deps=(acc, p_next))

    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(Out + rows[:, None].to(gl.int64) * stride_om + col + cols[None, :], out.to(gl.bfloat16),
             mask=(rows < Lq)[:, None])


@gluon.jit
def stage_barriers(NSTAGES: gl.constexpr):
    """The mbarriers of a program's loads, initialized: q's, each stage's (`bars`: its tiles arrived) and
    each stage's release (`empty`: the multiplying warps are done with it; warp-specialized kernels)."""
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NSTAGES):
        mbarrier.init(bars.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    return q_bar, bars, empty


@gluon.jit
def invalidate_barriers(q_bar, bars, empty, NSTAGES: gl.constexpr):
    """The end of `stage_barriers`' mbarriers."""
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NSTAGES):
        mbarrier.invalidate(bars.index(i))
        mbarrier.invalidate(empty.index(i))


@gluon.jit
def _attention_kernel(q_desc, k_desc, v_desc, Out, stride_om, Lq, Lk, qk_scale,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NSTAGES: gl.constexpr,
                      num_warps: gl.constexpr):
    """The multiplying warps also issue the loads (a stage refilled right after the wait that frees it)."""
    off_m = gl.program_id(0) * BLOCK_M
    col = gl.program_id(1) * HEAD_DIM  # the head's columns in the [L, H·D] rows
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NSTAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NSTAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar, bars, empty = stage_barriers(NSTAGES)

    n_blocks = gl.cdiv(Lk, BLOCK_N)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [off_m, col], q_bar, q_smem)
    for i in gl.static_range(NSTAGES):
        _load_stage(k_desc, v_desc, bars, k_smem, v_smem, i, i, col, i < n_blocks, BLOCK_N)
    _attend(q_smem, k_smem, v_smem, q_bar, bars, empty, k_desc, v_desc, Out, stride_om, off_m, col, Lq, Lk,
            qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NSTAGES, False, num_warps)
    invalidate_barriers(q_bar, bars, empty, NSTAGES)


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, bars, empty, off_m, col, Lk,
                    BLOCK_N: gl.constexpr, NSTAGES: gl.constexpr):
    """The loading warp: q, then every key block into the stage ring, each stage once the multiplying
    warps have released it (its first use needs no release: the wait on the opposite parity of a fresh
    barrier returns at once)."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [off_m, col], q_bar, q_smem)
    for j in range(gl.cdiv(Lk, BLOCK_N)):
        stage = j % NSTAGES
        mbarrier.wait(empty.index(stage), ((j // NSTAGES) & 1) ^ 1)
        _load_stage(k_desc, v_desc, bars, k_smem, v_smem, stage, j, col, True, BLOCK_N)


@gluon.jit
def _attention_ws_kernel(q_desc, k_desc, v_desc, Out, stride_om, Lq, Lk, qk_scale,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                         NSTAGES: gl.constexpr, num_warps: gl.constexpr):
    """Warp-specialized: one more warp (24 registers, setmaxnreg) issues every load, and the multiplying
    warps hand the stages back through mbarriers, without the CTA barriers of a TMA issue in their loop."""
    off_m = gl.program_id(0) * BLOCK_M
    col = gl.program_id(1) * HEAD_DIM
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NSTAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NSTAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar, bars, empty = stage_barriers(NSTAGES)
    gl.warp_specialize([
        (_attend, (q_smem, k_smem, v_smem, q_bar, bars, empty, k_desc, v_desc, Out, stride_om, off_m, col, Lq, Lk,
                   qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, NSTAGES, True, num_warps)),
        (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, bars, empty, off_m, col, Lk,
                           BLOCK_N, NSTAGES)),
    ], [1], [24])
    invalidate_barriers(q_bar, bars, empty, NSTAGES)


def shared_layout() -> gl.NVMMASharedLayout:
    """The shared-memory layout of every tile (q, k, v: [128, 128] bf16)."""
    return gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.bfloat16)


def _rows_descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A TMA descriptor of one batch element x [L, H, D] as rows [L, H·D], blocks of [block_rows, D]."""
    L, H, D = x.shape
    return TensorDescriptor(x, [L, H * D], [x.stride(0), 1], [block_rows, D], shared_layout())


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   warp_specialized: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v for bf16 q [B, Lq, H, 128], k and v [B, Lk, H, 128] on a Hopper GPU; out [B,
    Lq, H, D] bf16. `warp_specialized`: the kernel whose loads a warp of their own issues. OpArgumentError
    for inputs outside the kernel's scope (module docstring)."""
    B, Lq, H, D = q.shape
    _check_keys("attention", "k", k.shape[1])
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != torch.bfloat16 or x.device.type != "cuda":
            raise OpArgumentError(f"attention (gluon): {name} must be a bf16 CUDA tensor, got {x.dtype} on {x.device}")
        if x.shape[-1] != HEAD_DIM or x.stride(3) != 1 or x.stride(2) != HEAD_DIM:
            raise OpArgumentError(f"attention (gluon): {name} must hold rows of {H} x {HEAD_DIM} contiguous channels, "
                                  f"got shape {tuple(x.shape)}, strides {x.stride()}")
        if x.data_ptr() % 16 or (x.stride(1) * 2) % 16 or (x.stride(0) * 2) % 16:
            raise OpArgumentError(f"attention (gluon): {name}'s rows must be 16-byte aligned (TMA)")
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        raise OpArgumentError("attention (gluon): the kernel is written for Hopper (sm_90)")
    out = new_output(q.shape, torch.bfloat16, q.device)
    if Lq == 0 or H == 0:
        return out
    grid = (triton.cdiv(Lq, BLOCK_M), H)
    kernel = _attention_ws_kernel if warp_specialized else _attention_kernel
    with torch.cuda.device(q.device):
        for b in range(B):
            kernel[grid](
                _rows_descriptor(q[b], BLOCK_M), _rows_descriptor(k[b], BLOCK_N), _rows_descriptor(v[b], BLOCK_N),
                out[b], out.stride(1), Lq, k.shape[1], LOG2E / math.sqrt(D),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, NSTAGES=STAGES, num_warps=NUM_WARPS)
    return out
