"""Triton kernels of the attention ops: flash attention (bf16/fp16/fp32) and the fused I2V
cross-attention; the launch configurations and the device functions the 8-bit paths
(kernels/attention_8bit_triton.py) share with them.

Only the kernels/*_triton.py modules import triton; kernels/attention.py imports this one lazily from the
registered functions, which call the kernels as torch.library ops (`dit8::attention_triton`,
`dit8::cross_attention_triton`, and `dit8::attention_8bit_triton` in attention_8bit_triton.py) with fake
implementations: torch.compile then takes each whole, as it does the fused ops, instead of tracing the
launch wrappers (configuration lookup, TMA checks that read data pointers).

Layout: q [B, Lq, H, D], k and v [B, Lk, H, D] are read through their strides, exactly as the QKV GEMMs
(or RoPE) leave them: no transposes or copies around the kernels. A configuration with `tma` (bf16 and
cross-attention) reads them through TMA descriptors of their [B·L, H·D] views instead, where Hopper can
(`tma_views`).
One program computes BLOCK_M query rows of one (batch, head) and walks over all keys in blocks of
BLOCK_N; the programs of one (batch, head) are adjacent in the grid, so its K/V stay in L2.

Online softmax (flash attention), in the log2 domain: scores are multiplied by log2(e) (folded into the
softmax scale) so that exp2, the instruction the hardware has, gives exp. Per query row the kernel keeps
m (the largest score seen so far), l (the sum of exp2(score - m)) and acc (the sum of
exp2(score - m)·v), all fp32. When a new block raises m to m', the old l and acc were computed relative
to the old m and are rescaled by exp2(m - m') before the new block is added; at the end acc / l is the
softmax-weighted sum. Subtracting the running max keeps every exp2 argument <= 0, so nothing overflows.

Keys past the end (the tail block when Lk is not a multiple of BLOCK_N) get score -inf, hence weight 0.
The key loop is split in two: the full blocks without any masking, then one masked tail block, so that
the long-sequence case (Lk = 32,760 = 255·128 + 120) pays for masks once per row block, not per block.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) a bf16 tl.dot is silently wrong and
bf16 arithmetic overflows (spec/gpu-notes.md), so the wrappers pass DOT_FP32=True there: 16-bit tiles
are converted to fp32 after loading and the dots run in fp32. On a GPU the dots run on bf16/fp16 (or
int8/fp8) tensor cores with fp32 accumulation. The interpreter's fp32 -> bf16 conversion also truncates
instead of rounding to nearest, and its fp32 -> fp8 conversion loses the carry into the exponent (7.9
becomes 4.0); under INTERPRET=True the kernels therefore round in fp32 first (kernels/rounding_triton.py),
so the conversion that follows is exact and the results are those a GPU gives.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .attention import MAX_HEAD_DIM, check_slice_offsets
from .buffers import new_output
from .checks import OpArgumentError
from .gemm_configs import SHARED_MEMORY_LIMIT
from .rounding_triton import round_bf16
from .triton_support import interpreting, on_tensor_device

LOG2E = 1.4426950408889634

# The compiled kernel of each wrapper's last launch, for diagnostics (on CUDA it has n_regs and
# n_spills: the attention kernels sit near the 255-register limit, see _CONFIGS). Empty in the interpreter.
LAST_COMPILED: dict[str, object] = {}


# ----------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """One launch configuration of the attention kernels: tile, warps, pipeline depth, register cap and
    how q, k and v are loaded."""
    block_m: int  # query rows per program (also the granularity of q's 8-bit scales)
    block_n: int  # keys per inner step (also the key blocks of the int8 P·V path's P scales)
    num_warps: int
    num_stages: int
    # Registers per thread ptxas may use (None: its own choice, up to 255). An SM holds 64K registers,
    # so 4-warp programs capped at 168 fit three to an SM where 255 fit two.
    max_registers: int | None = None
    # Load q, k and v through TMA descriptors (on Hopper, where the inputs' layout allows it: `tma_views`,
    # and for the 8-bit kernel's codes attention_8bit_triton.tma_views_8bit): one elected thread issues
    # each tile's copy, where the pointer loads spend 30-45 address and copy instructions a key block on
    # every thread. Elsewhere the pointer kernels run.
    tma: bool = False

    def launch_options(self) -> dict[str, int]:
        """The launch keywords of this configuration."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_registers is not None and not interpreting():
            options["maxnreg"] = self.max_registers
        return options


# Keyed by (path, head_dim bound). At head_dim 128 these are the fastest of the candidates that
# DIT8_ATTN_SWEEP=1 bench/test_bench_attention.py timed at Wan's shapes (B=1, H=40, D=128; self: L=32,760;
# cross: 32,760 queries over 512 + 257 keys; bench/RESULTS.md):
# - bf16: 128 x 128 in 8 warps with TMA loads: 37.4 ms against 44.4 with pointer loads and cuDNN's 38.5
#   (H200, triton 3.6, 2026-11-26, night run). Fewer address instructions and 187 registers instead
#   of 252;
# - 8-bit P·V: 64 x 128 in 4 warps with TMA loads: INT8 / FP8 P·V 35.8 / 34.3 ms against 37.1 / 35.0
#   with pointer loads, 42.3 / 41.5 for 128 x 128 in 8 warps and 40.5 / 36.3 for the 168-register 64 x 64
#   (H200, triton 3.6, 2026-11-27). One warpgroup per program (236 / 252 registers, 106 KiB of shared
#   memory) leaves room for two programs per SM, whose softmax and dots can overlap;
# - cross: 64 x 64 in 4 warps with TMA loads: 1.28 ms over the model's side-by-side keys against 1.45
#   with pointer loads, 1.36 for 128 x 128 in 8 warps and 1.42 for two cuDNN calls (H200, 2026-11-27).
#   (BLOCK_N 128 on 4 warps spills: the text result stays live across the image keys.)
# TMA needs Hopper or later and a layout it can describe (`tma_views`); elsewhere the same tile runs with
# pointer loads. Head_dim 64 keeps the untimed starting points. Compiled for sm_90a
# (tests/test_attention_triton.py -k hopper), every tile below uses wgmma and spills nothing inside its
# key loop.
_CONFIGS = {
    ("bf16", 64): AttnConfig(128, 128, 8, 3),
    ("bf16", 128): AttnConfig(128, 128, 8, 3, tma=True),
    ("8bit", 64): AttnConfig(128, 128, 8, 3),
    ("8bit", 128): AttnConfig(64, 128, 4, 3, tma=True),
    ("8bit_pv16", 64): AttnConfig(128, 128, 8, 3),
    ("8bit_pv16", 128): AttnConfig(128, 128, 8, 3),  # 64 x 128 spills inside its loop with 16-bit P·V
    ("cross", 64): AttnConfig(128, 64, 8, 2),
    ("cross", 128): AttnConfig(64, 64, 4, 3, tma=True),
}
# A candidate of the benchmark's sweep for the 8-bit paths: 64 x 64 tiles on 4 warps capped at 168
# registers and 57 KiB of shared memory, so that three programs share an SM where two of the 64 x 128
# tiles do. Compiled for sm_90a by triton 3.6 it spills nothing with either P·V format (3.9: 8-12
# local-memory accesses in the key loop). On the H100 (2026-11-26) it took 43.19 ms (INT8 P·V) and 37.44
# (FP8 P·V) against the table tile's 39.55 and 36.67: not adopted.
THREE_PER_SM = AttnConfig(64, 64, 4, 3, max_registers=168)
# Candidates of the sweep for the bf16 path, with TMA loads (the first is the table's). Compiled for
# sm_90a by triton 3.6: 128 x 128 takes 487 instructions a warp a key block (530 with pointer loads) and
# 187 registers (252); 128 x 64, 335 and 138. (Capped at 128 registers, so that two 8-warp programs would
# share an SM, ptxas serializes the 128 x 64 tile's wgmma instructions.) Timed on the H200 (night run,
# ms): 37.4, 45.6 (2 stages), 41.3 (128 x 64). Two variants timed there and dropped: re-basing acc only
# when a block's max passed the running one by 2^8 (44.0: the program-wide decision's CTA barriers cost
# more than the multiplies it skips), and two 64-row q tiles a program sharing each key block, whose
# products ptxas issued among the other tile's softmax (40.8, 128 x 64 on 4 warps; 45.4, 256 x 64 on 8).
TMA_CANDIDATES = (AttnConfig(128, 128, 8, 3, tma=True), AttnConfig(128, 128, 8, 2, tma=True),
                  AttnConfig(128, 64, 8, 3, tma=True))
# The same for the cross-attention: its table tile (335 instructions a 64-key block instead of 364, 203
# registers instead of 255, still two programs an SM), 128 x 128 on 8 warps (487 a 128-key block, 251
# registers, 161 KiB of shared memory: one program an SM; Wan's 512 + 257 keys take 4 + 2 blocks and
# the one-key tail), and 128 x 64 on 8 warps. On the H200 (night run, before the TMA kernels took
# short tails) 64 x 64 took 1.33 ms and 128 x 64 1.55; with short tails (2026-11-27) 64 x 64 1.28 and
# 128 x 128 1.36. Halving the programs' re-reads of the keys and
# values from L2 did not pay: with pointer loads the 64-row tile kept L2 at 50% of its peak throughput
# (Nsight Compute), so L2 was not its limit.
CROSS_TMA_CANDIDATES = (AttnConfig(64, 64, 4, 3, tma=True), AttnConfig(128, 128, 8, 2, tma=True),
                        AttnConfig(128, 64, 8, 2, tma=True))
# The same for the 8-bit kernel (its codes read through TMA descriptors, attention_8bit_triton.
# tma_views_8bit): the table's tile; 128 x 128 on 8 warps, each key block loaded once for twice the rows;
# and the three-programs-an-SM tile. Compiled for sm_90a by triton 3.6, FP8 / INT8 P·V: 702 / 918
# instructions a warp a key block (718 / 935 with pointer loads), 236 / 252 registers (254 / 255);
# 128 x 128: 710 / 926, 238 / 254; 64 x 64 capped at 168: 454 / 628 a 64-key block, no spills. Timed on
# the H200 (2026-11-27): the first is the table's (see _CONFIGS); TMA loads saved 2-3.5% of its time.
EIGHT_BIT_TMA_CANDIDATES = (AttnConfig(64, 128, 4, 3, tma=True), AttnConfig(128, 128, 8, 3, tma=True),
                            dataclasses.replace(THREE_PER_SM, tma=True))
# GPUs whose blocks may take less shared memory than Hopper's 227 KiB (sm_80: 163 KiB; sm_86 and sm_89:
# 99 KiB): the head_dim 128 tiles that fit 99 KiB and, compiled for sm_80 and sm_89, spill
# nothing in their loops (128 x 128 bf16 needs 128 KiB there; the 8-bit kernel at 128 x 128 in 2 stages
# spills inside its loop). The cross-attention's Hopper tile, 64 x 64 on 4 warps, fits but spills 0.7-1.3
# KB a thread there (with triton 3.9 inside its key loop); 128 x 64 on 8 warps spills 84-120 bytes, none
# in its loops (triton 3.6 and 3.9). The others fit as they are.
HOPPER_SHARED_MEMORY = SHARED_MEMORY_LIMIT["sm_90"]
_SMALL_SHARED_MEMORY_CONFIGS = {
    ("bf16", 128): AttnConfig(128, 64, 8, 3),
    ("8bit", 128): AttnConfig(128, 64, 8, 3),
    ("8bit_pv16", 128): AttnConfig(128, 64, 8, 3),
    ("cross", 128): AttnConfig(128, 64, 8, 2),
}
# Head dims up to 256 (not Wan's, kept working for other models): smaller tiles, same for every path;
# at 64 x 32 in 8 warps no path spills (at 64 x 64 the cross kernel does).
_WIDE_CONFIG = AttnConfig(64, 32, 8, 2)
# fp32 inputs ("ieee" fp32 dots on CUDA cores, a precision path, not a fast one): each thread holds
# its share of the fp32 tiles and of the unrolled dot; small tiles keep the spills to 0.6-2 KB, none
# inside the key loop (64 x 64 tiles spill ~58 KB per thread with triton 3.6).
_FP32_CONFIGS = {128: AttnConfig(32, 32, 8, 2), 256: AttnConfig(16, 16, 4, 2)}
# The interpreter runs one program at a time in numpy: small blocks so that the CPU tests with their
# small shapes still cover several query blocks, several key blocks, and a tail of each.
_INTERPRETER_CONFIG = AttnConfig(64, 32, 4, 1)


def pick_config(path: str, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                shared_memory: int = HOPPER_SHARED_MEMORY) -> AttnConfig:
    """The launch configuration of `path` ("bf16", "8bit", "8bit_pv16" for 16-bit P·V, or "cross") for
    this head_dim and input dtype, on a GPU whose blocks may take `shared_memory` bytes
    (`shared_memory_of(device)`)."""
    if interpreting():
        return _INTERPRETER_CONFIG
    if dtype == torch.float32 and not path.startswith("8bit"):
        return _FP32_CONFIGS[128 if head_dim <= 128 else 256]
    if head_dim > 128:
        return _WIDE_CONFIG
    key = (path, 64 if head_dim <= 64 else 128)
    if shared_memory < HOPPER_SHARED_MEMORY and key in _SMALL_SHARED_MEMORY_CONFIGS:
        return _SMALL_SHARED_MEMORY_CONFIGS[key]
    return _CONFIGS[key]


def shared_memory_of(device: torch.device) -> int:
    """The shared memory one block may take on `device` (opt-in), in bytes; Hopper's off CUDA."""
    return _shared_memory_of(device.index) if device.type == "cuda" else HOPPER_SHARED_MEMORY


@functools.cache
def _shared_memory_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


# tl.dot's smallest reduction for 8-bit operands on a GPU (16-bit operands: 16); the interpreter does
# not check it.
DOT8_MIN_REDUCTION = 32


def _block_d(op: str, head_dim: int, min_reduction: int = 16) -> int:
    """The padded head_dim the kernels work on: tl.arange needs a power of two and tl.dot a reduction
    of at least min_reduction (16 for 16-bit operands, DOT8_MIN_REDUCTION for 8-bit ones). Channels
    past head_dim are loaded as 0, which adds nothing to q·k, and not stored."""
    if head_dim > MAX_HEAD_DIM:
        raise OpArgumentError(f"{op}: the triton backend supports head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
    return max(min_reduction, triton.next_power_of_2(head_dim))


# What an OpArgumentError of check_slice_offsets suggests for the 16-bit kernels.
TORCH_HINT = "backend='torch' (SDPA, 64-bit offsets) takes it"


def _check_keys(op: str, name: str, lk: int) -> None:
    if lk == 0:
        raise OpArgumentError(f"{op}: {name} has no keys; softmax over an empty set is undefined")


# ----------------------------------------------------------------------------------------------------
# Shared pieces of the kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, offs_rows, n_rows, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile. Rows at or past n_rows (when MASK_ROWS) and channels at or past
    HEAD_DIM (when the head dim was padded to BLOCK_D) read as 0: finite, and adding nothing to a dot."""
    offs_d = tl.arange(0, BLOCK_D)
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=(offs_rows < n_rows)[:, None], other=0.0)
        return tl.load(ptrs, mask=(offs_rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _add_pv(acc, p, v, DOT_FP32: tl.constexpr):
    """acc + P·V with fp32 accumulation. On GPUs P is rounded to v's 16-bit type for the tensor cores,
    as every flash attention does (2^-9 relative for bf16, averaging out over the keys); under the
    interpreter, whose 16-bit dots are wrong, the dot runs in fp32."""
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc


@triton.jit
def _softmax_step(m_i, l_i, s, scale):
    """One online-softmax update for a block of scores s·scale [BLOCK_M, BLOCK_N] in log2 units
    (scale > 0).

    Returns p = exp2(s·scale - m_new), alpha = exp2(m_old - m_new) (the factor that re-bases the old l
    and acc on the new max), the updated l and the new max. The scale is applied to the row maxima and
    inside exp2's argument, one fused multiply-add per score, not in a multiply of its own."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    # alpha <= 1; it is 0 on the first block (m_old = -inf), which discards the empty initial state.
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * scale - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_new, m_new


@triton.jit
def _attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, Lk, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """Add keys [start_n, start_n + BLOCK_N) to the running (acc, l, m) of a 16/32-bit q tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    # Keys past the end (MASK_N) load as 0 (finite, so 0-weight · v stays 0) and get score -inf below.
    k = _load_tile(k_ptrs, offs_n, Lk, MASK_N, HEAD_DIM, BLOCK_D)
    v = _load_tile(v_ptrs, offs_n, Lk, MASK_N, HEAD_DIM, BLOCK_D)
    return _attend_tiles(acc, l_i, m_i, q, k, v, offs_n, Lk, qk_scale, MASK_N, DOT_FP32)


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k, v, offs_n, Lk, qk_scale, MASK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """Add the loaded key block k, v (keys offs_n; with MASK_N those at or past Lk get score -inf, their
    rows must be finite) to the running (acc, l, m)."""
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASK_N:
        s = tl.where((offs_n < Lk)[None, :], s, float("-inf"))
    p, alpha, l_i, m_i = _softmax_step(m_i, l_i, s, qk_scale)
    # Re-base the accumulator on the new max before adding this block's contribution.
    acc = acc * alpha[:, None]
    return _add_pv(acc, p, v, DOT_FP32), l_i, m_i


# The key block of a tail this short or shorter (the smallest reduction of a 16-bit dot).
SHORT_TAIL = tl.constexpr(16)


@triton.jit
def _fresh_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The running (max, l, acc) of an online softmax before its first key block."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, HEAD_DIM], tl.float32))


@triton.jit
def _attend(q, k_base, v_base, stride_kn, stride_vn, Lk, qk_scale,
            BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT_FP32: tl.constexpr):
    """softmax(q·kᵀ·scale)·v for one q tile over all Lk keys of one (batch, head): [BLOCK_M, BLOCK_D]
    fp32, already normalised by the softmax denominator."""
    m_i, l_i, acc = _fresh_state(BLOCK_M, BLOCK_D)
    full_end = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n,
                                      Lk, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_FP32)
    if Lk - full_end > SHORT_TAIL:
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_end,
                                      Lk, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_FP32)
    elif full_end < Lk:
        # A few keys past the last full block (Wan's 257 image keys: one) take a block of SHORT_TAIL keys,
        # not a full one: in the cross-attention that full block was a thirteenth of a program's work.
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_end,
                                      Lk, qk_scale, HEAD_DIM, BLOCK_D, SHORT_TAIL, True, DOT_FP32)
    # Lk >= 1 (checked by the wrappers), so every row saw at least one finite score and l >= 1.
    return acc / l_i[:, None]


@triton.jit
def _load_q_tile(q_base, stride_qm, pid_m, Lq, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # Rows past Lq load as 0: they compute a harmless uniform softmax and are not stored.
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, Lq, True, HEAD_DIM, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _store_out_tile(o_base, stride_om, pid_m, Lq, out, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if INTERPRET:
        if o_base.dtype.element_ty == tl.bfloat16:
            out = round_bf16(out)
    ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, out.to(o_base.dtype.element_ty), mask=(offs_m < Lq)[:, None])
    else:  # padded channels are not stored
        tl.store(ptrs, out.to(o_base.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------------
# bf16 / fp16 / fp32 self-attention and the fused cross-attention
# ----------------------------------------------------------------------------------------------------
# Grid: (cdiv(Lq, BLOCK_M), B·H). Programs of one (batch, head) are launched next to each other, so the
# K/V of that head stay in L2 while its query blocks stream through them.

@triton.jit
def _attention_kernel(Q, K, V, Out,
                      stride_qb, stride_qm, stride_qh,
                      stride_kb, stride_kn, stride_kh,
                      stride_vb, stride_vn, stride_vh,
                      stride_ob, stride_om, stride_oh,
                      H, Lq, Lk, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 base offsets: B·L·H·D passes 2^31 for long videos in a batch.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q = _load_q_tile(Q + b * stride_qb + h * stride_qh, stride_qm, pid_m, Lq, BLOCK_M, HEAD_DIM, BLOCK_D,
                     DOT_FP32)
    out = _attend(q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                  stride_kn, stride_vn, Lk, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32)
    _store_out_tile(Out + b * stride_ob + h * stride_oh, stride_om, pid_m, Lq, out, BLOCK_M, HEAD_DIM,
                    BLOCK_D, INTERPRET)


@triton.jit
def _attend_tma(q, KD, VD, K, V, stride_kn, stride_vn, k_row, col, Lk, qk_scale, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """_attend with k and v read through TMA descriptors of their [B·L, H·D] views (`tma_views`), this
    (batch, head)'s keys from row k_row and channels from column col (the tail: `_attend_tma_tail`)."""
    m_i, l_i, acc = _fresh_state(BLOCK_M, HEAD_DIM)
    full_end = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, KD.load([k_row + start_n, col]),
                                      VD.load([k_row + start_n, col]), start_n + tl.arange(0, BLOCK_N), Lk,
                                      qk_scale, False, DOT_FP32)
    acc, l_i, m_i = _attend_tma_tail(acc, l_i, m_i, q, KD, VD, K, V, stride_kn, stride_vn, k_row, col, full_end,
                                     Lk, qk_scale, HEAD_DIM, BLOCK_N, DOT_FP32)
    return acc / l_i[:, None]


@triton.jit
def _attend_tma_tail(acc, l_i, m_i, q, KD, VD, K, V, stride_kn, stride_vn, k_row, col, full_end, Lk, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """The keys from full_end to Lk (fewer than BLOCK_N) of a TMA kernel's key loop. A block through the
    descriptors reads rows past this batch's: the next batch's or, past the last, zeros (TMA fills them),
    finite, and their scores are -inf. A tail of at most SHORT_TAIL keys is read through the pointers K
    and V (the same views, rows stride_kn and stride_vn apart) as a block of SHORT_TAIL keys, as _attend
    does: a descriptor's block is fixed."""
    if Lk - full_end > SHORT_TAIL:
        acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, KD.load([k_row + full_end, col]),
                                      VD.load([k_row + full_end, col]), full_end + tl.arange(0, BLOCK_N), Lk,
                                      qk_scale, True, DOT_FP32)
    elif full_end < Lk:
        row = k_row.to(tl.int64)
        acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, K + row * stride_kn + col, V + row * stride_vn + col,
                                      stride_kn, stride_vn, full_end, Lk, qk_scale, HEAD_DIM, HEAD_DIM, SHORT_TAIL,
                                      True, DOT_FP32)
    return acc, l_i, m_i


@triton.jit
def _tma_program(QD, Lq, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr):
    """A TMA kernel's program: (batch, head, the head's first channel, its q tile)."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    q = QD.load([b * Lq + tl.program_id(0) * BLOCK_M, h * HEAD_DIM])
    if DOT_FP32:
        q = q.to(tl.float32)
    return b, h, h * HEAD_DIM, q


@triton.jit
def _attention_tma_kernel(QD, KD, VD, K, V, Out, stride_kn, stride_vn, stride_ob, stride_om, stride_oh, H, Lq, Lk,
                          qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """_attention_kernel with q, k and v read through TMA descriptors (`tma_views`; k and v also as
    pointers, for a short tail)."""
    b, h, col, q = _tma_program(QD, Lq, H, HEAD_DIM, BLOCK_M, DOT_FP32)
    out = _attend_tma(q, KD, VD, K, V, stride_kn, stride_vn, b * Lk, col, Lk, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_N,
                      DOT_FP32)
    _store_out_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, stride_om, tl.program_id(0),
                    Lq, out, BLOCK_M, HEAD_DIM, HEAD_DIM, INTERPRET)


@triton.jit
def _cross_attention_tma_kernel(QD, KD, VD, KID, VID, K, V, KI, VI, Out, stride_kn, stride_vn, stride_kin,
                                stride_vin, stride_ob, stride_om, stride_oh, H, Lq, Lk, Lki, qk_scale,
                                HAS_IMG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """_cross_attention_kernel with q and the keys and values read through TMA descriptors (`tma_views`;
    the keys and values also as pointers, for short tails: Wan's 257 image keys)."""
    b, h, col, q = _tma_program(QD, Lq, H, HEAD_DIM, BLOCK_M, DOT_FP32)
    out = _attend_tma(q, KD, VD, K, V, stride_kn, stride_vn, b * Lk, col, Lk, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_N,
                      DOT_FP32)
    if HAS_IMG:
        out += _attend_tma(q, KID, VID, KI, VI, stride_kin, stride_vin, b * Lki, col, Lki, qk_scale, BLOCK_M,
                           HEAD_DIM, BLOCK_N, DOT_FP32)
    _store_out_tile(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, stride_om, tl.program_id(0),
                    Lq, out, BLOCK_M, HEAD_DIM, HEAD_DIM, INTERPRET)


@triton.jit
def _cross_attention_kernel(Q, K, V, KI, VI, Out,
                            stride_qb, stride_qm, stride_qh,
                            stride_kb, stride_kn, stride_kh,
                            stride_vb, stride_vn, stride_vh,
                            stride_kib, stride_kin, stride_kih,
                            stride_vib, stride_vin, stride_vih,
                            stride_ob, stride_om, stride_oh,
                            H, Lq, Lk, Lki, qk_scale,
                            HAS_IMG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                            INTERPRET: tl.constexpr):
    """Wan I2V cross-attention: softmax(q·kᵀ)·v + softmax(q·k_imgᵀ)·v_img with one q tile load and one
    output store; the two softmaxes are separate (each normalised by its own denominator)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q = _load_q_tile(Q + b * stride_qb + h * stride_qh, stride_qm, pid_m, Lq, BLOCK_M, HEAD_DIM, BLOCK_D,
                     DOT_FP32)
    out = _attend(q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                  stride_kn, stride_vn, Lk, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32)
    if HAS_IMG:
        out += _attend(q, KI + b * stride_kib + h * stride_kih, VI + b * stride_vib + h * stride_vih,
                       stride_kin, stride_vin, Lki, qk_scale, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_FP32)
    _store_out_tile(Out + b * stride_ob + h * stride_oh, stride_om, pid_m, Lq, out, BLOCK_M, HEAD_DIM,
                    BLOCK_D, INTERPRET)


def _dot_fp32(x: torch.Tensor) -> bool:
    # fp32 inputs attend in fp32 ("ieee" dots, not tf32); under the interpreter everything does.
    return interpreting() or x.dtype == torch.float32


def _bhd_strides(x: torch.Tensor) -> tuple[int, int, int]:
    # [B, L, H, D] -> (batch, row, head) strides; the kernels assume a unit stride along D.
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_d(*xs: torch.Tensor) -> list[torch.Tensor]:
    # The kernels read rows of D contiguous elements. A tensor with another D stride (never produced by
    # the model) is copied once rather than supported by a slower kernel variant.
    return [x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in xs]


@on_tensor_device
def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   config: AttnConfig | None = None) -> torch.Tensor:
    """Flash attention in the inputs' dtype (bf16/fp16 tensor cores, fp32 stays fp32)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    block_d = _block_d("attention", D)
    _check_keys("attention", "k", Lk)
    q, k, v = _unit_d(q, k, v)
    check_slice_offsets("attention", dict(q=q, k=k, v=v), TORCH_HINT)
    out = new_output(q.shape, q.dtype, q.device)
    if Lq == 0 or B * H == 0:
        return out
    cfg = config or pick_config("bf16", D, q.dtype, shared_memory_of(q.device))
    descriptors = tma_views(cfg, q, k, v) if cfg.tma else None
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    if descriptors is not None:
        LAST_COMPILED["attention"] = _attention_tma_kernel[grid](
            *descriptors, k, v, out, k.stride(1), v.stride(1), *_bhd_strides(out), H, Lq, Lk, LOG2E / math.sqrt(D),
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_FP32=_dot_fp32(q),
            INTERPRET=interpreting(), **cfg.launch_options())
        return out
    LAST_COMPILED["attention"] = _attention_kernel[grid](
        q, k, v, out, *_bhd_strides(q), *_bhd_strides(k), *_bhd_strides(v), *_bhd_strides(out),
        H, Lq, Lk, LOG2E / math.sqrt(D),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_FP32=_dot_fp32(q),
        INTERPRET=interpreting(), **cfg.launch_options())
    return out


def _as_rows(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row stride) of x [B, L, H, D] viewed as a matrix [B·L, H·D] whose rows are one (batch,
    position) each, or None where its strides do not allow that view (heads not D apart, channels not
    contiguous, batches not L rows apart)."""
    B, L, H, D = x.shape
    sb, sl, sh, sd = x.stride()
    if sd != 1 or (H > 1 and sh != D) or (B > 1 and sb != L * sl):
        return None
    return B * L, sl


def tma_views(cfg: AttnConfig, q: torch.Tensor, *keys_values: torch.Tensor) -> tuple | None:
    """TMA descriptors of q and of each key or value tensor as [B·L, H·D] matrices, with blocks of cfg's
    rows (q) or keys x D, for the TMA kernels; None where they cannot run: not Hopper or later (nor the
    interpreter), fp32 inputs, a head dim that is no power of two (the tile would take the next head's
    channels), or a layout TMA cannot describe (`_as_rows`; rows and base addresses 16-byte aligned)."""
    D = q.shape[-1]
    gpu_ok = q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) >= (9, 0)
    if not (gpu_ok or interpreting()) or q.dtype == torch.float32 or D != _block_d("attention", D):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    descriptors = []
    for x, block in ((q, cfg.block_m), *((x, cfg.block_n) for x in keys_values)):
        rows = _as_rows(x)
        if rows is None or (rows[1] * x.element_size()) % 16 or x.data_ptr() % 16:
            return None
        descriptors.append(TensorDescriptor(x, [rows[0], x.shape[2] * D], [rows[1], 1], [block, D]))
    return tuple(descriptors)


@on_tensor_device
def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None,
                    v_img: torch.Tensor | None, *, config: AttnConfig | None = None) -> torch.Tensor:
    """Fused text + image cross-attention, one launch."""
    B, Lq, H, D = q.shape
    block_d = _block_d("cross_attention", D)
    _check_keys("cross_attention", "k", k.shape[1])
    has_img = k_img is not None
    if has_img:
        _check_keys("cross_attention", "k_img", k_img.shape[1])
    else:
        k_img, v_img = k, v  # placeholders, never read (HAS_IMG=False)
    q, k, v, k_img, v_img = _unit_d(q, k, v, k_img, v_img)
    check_slice_offsets("cross_attention", dict(q=q, k=k, v=v, k_img=k_img if has_img else None,
                                                v_img=v_img if has_img else None), TORCH_HINT)
    out = new_output(q.shape, q.dtype, q.device)
    if Lq == 0 or B * H == 0:
        return out
    cfg = config or pick_config("cross", D, q.dtype, shared_memory_of(q.device))
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    descriptors = tma_views(cfg, q, k, v, k_img, v_img) if cfg.tma else None
    if descriptors is not None:
        LAST_COMPILED["cross_attention"] = _cross_attention_tma_kernel[grid](
            *descriptors, k, v, k_img, v_img, out, k.stride(1), v.stride(1), k_img.stride(1), v_img.stride(1),
            *_bhd_strides(out), H, Lq, k.shape[1], k_img.shape[1], LOG2E / math.sqrt(D),
            HAS_IMG=has_img, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_FP32=_dot_fp32(q),
            INTERPRET=interpreting(), **cfg.launch_options())
        return out
    LAST_COMPILED["cross_attention"] = _cross_attention_kernel[grid](
        q, k, v, k_img, v_img, out, *_bhd_strides(q), *_bhd_strides(k), *_bhd_strides(v),
        *_bhd_strides(k_img), *_bhd_strides(v_img), *_bhd_strides(out),
        H, Lq, k.shape[1], k_img.shape[1], LOG2E / math.sqrt(D),
        HAS_IMG=has_img, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_FP32=_dot_fp32(q),
        INTERPRET=interpreting(), **cfg.launch_options())
    return out


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("dit8::attention_triton", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The flash attention kernel as a torch.library op: `attention_bf16`, arguments checked by
    kernels/attention.py."""
    return attention_bf16(q, k, v)


@attention_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


@torch.library.custom_op("dit8::cross_attention_triton", mutates_args=())
def cross_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None,
                       v_img: torch.Tensor | None) -> torch.Tensor:
    """The fused cross-attention kernel as a torch.library op: `cross_attention`, arguments checked by
    kernels/attention.py."""
    return cross_attention(q, k, v, k_img, v_img)


@cross_attention_op.register_fake
def _(q, k, v, k_img, v_img):
    return q.new_empty(q.shape)
