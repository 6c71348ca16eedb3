"""FP8 scaled GEMM for Hopper in Gluon (Triton's explicit-layout dialect), promoting every K tile
without stalling the tensor cores: a candidate for the promoted FP8 entries of kernels/gemm_configs.py,
run by the GPU tests and the GEMM benchmark, and by the op where kernels/candidates.py routes it (on
Hopper its ADOPTED entries, or what DIT8_GLUON asks for).

Why a second kernel. Hopper's FP8 MMA sums its products in reduced precision, so the accurate mode
(cuBLAS's default, the Triton kernel's `fp8_promote`) moves each K tile's partial sum into an fp32
accumulator. With `tl.dot`, ptxas waits for every MMA before that add (its info C7517): the tensor
cores idle through the add, and on an H200 the promoted Triton tile ran 1.84 ms against 1.37 ms for
the same tile unpromoted (bench/RESULTS.md, GEMM). Here each K tile's product starts from zero in
registers of its own, and the add of tile i - 1 runs while tile i's product is in flight:

    wait for K tile i's operands (mbarrier); issue P_i = a_i · b_iᵀ from zero (asynchronous);
    wait until only P_i is in flight (P_{i-1} done); refill P_{i-1}'s stage; acc += P_{i-1}.

Three fp32 tiles live in the registers: acc, P_i and P_{i-1}; at 128 x 128 on 8 warps (two
warpgroups of 64 rows) that is 3 x 64 a thread. The error is that of promotion every BLOCK_K products,
as cuBLAS's default mode and the Triton kernel's promoted entries have it.

Persistent: one program per SM walks its tiles in the grouped order of the Triton kernels, and the
TMA loads run NSTAGES K steps ahead through one sequence that crosses tile boundaries, so the next
tile's operands arrive during this tile's epilogue. The descriptors zero-fill reads past M, N and K.

Two kernels (GluonGemmConfig.warp_specialized):
- `_fp8_gemm_kernel`: the multiplying warps also issue the loads, a stage's refill right after the
  wait that frees it (the compiler puts CTA barriers around each TMA issue);
- `_gemm_ws_kernel`: one more warp issues every load, and the multiplying warps hand each stage
  back through an mbarrier (`empty`) instead. Their loop loses the loads' bookkeeping and barriers
  (112 instead of 156 instructions a warp per 128-deep step, sm_90a), and the load warp runs on 24
  registers (setmaxnreg) so that the multiplying warps keep 240.

And one without promotion (`FAST`, `_gemm_ws_kernel` with FAST): 128 x 256 tiles, each K step's product
accumulated in place by the tensor cores, warp-specialized as above; its K loop issues 57 instructions a
warp per 128-deep step, and the epilogue runs on the two 128-column halves in turn. For FP8 that is
cuBLAS's use_fast_accum=True, a candidate for the Triton table's fast-accumulation tiles; it also takes
INT8 operands (int32 accumulation, exact), a candidate for the table's INT8 tiles.

And split accumulation (CANDIDATES["split"], `_mma_split_partition`), a candidate for the promoted
entries too: 128 x 128 tiles, warp-specialized, the K steps alternating between two accumulator tiles
that the tensor cores add into in place, summed in fp32 after the loop (kernels/gemm_configs.py explains
the error). Nothing waits for an add: 53.5 instructions a warp per 128-deep step against the promoted
kernel's 112.5 (sm_90a, triton 3.6), 168 registers. Its error budget is the promoted one: the Triton
kernel's split accumulation erred 1.49x cuBLAS's default mode at K = 13824 on an H100.

Epilogue (fp32, the reference's order, as kernels/scaled_mm_triton.py): y = acc · x_scale[m] ·
w_scale[n] (+ bias[n]); optionally GELU(tanh); optionally residual[m, n] + gate[m // rows_per_batch,
n] · y; one rounding to the output dtype. The tile passes through shared memory and is finished in
slices of 32 columns (`_epilogue`).

Scope: e4m3 x e4m3 (and int8 x int8 with `FAST`) on sm_90; xq [M, K] and wq [N, K] with K > 0, unit
stride along K and 16-byte aligned rows and bases (K % 16 == 0). No interpreter: Gluon kernels run on
the GPU only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .buffers import new_output
from .checks import OpArgumentError
from .scaled_mm import _check_args, _check_epilogue
from .scaled_mm_triton import ACTIVATION_CODES, _GELU_C0, _GELU_C1, _sm_count, _tile_coords  # shared

# The TMA load was renamed after triton 3.6 (async_copy_global_to_shared -> async_load), same arguments.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# The CTA-wide barrier was renamed too (thread_barrier -> barrier).
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

FP8 = torch.float8_e4m3fn
# The epilogue's slices, and the shared-memory layout the fp32 tile passes through: 16-byte units XOR-
# swizzled across 8 rows, so that the accumulator's stores (pairs of columns, 8 rows a warp) and the
# slices' loads (4 columns a thread) spread over the banks.
EPILOGUE_COLS = gl.constexpr(32)
ACC_STAGING = gl.constexpr(gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0]))


@dataclass(frozen=True)
class GluonGemmConfig:
    """Tile, tile-order group and pipeline depth of the kernel. Shared memory: num_stages x (block_m +
    block_n) x block_k bytes of operand stages and the epilogue's fp32 tile (64 KiB at 128 x 128), within
    Hopper's 227 KiB; three fp32 tiles of 64 registers a thread at 128 x 128 on 8 warps (module
    docstring)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_stages: int = 4
    num_warps: int = 8  # the warps that multiply
    warp_specialized: bool = False  # one more warp issues the loads (`_gemm_ws_kernel`)
    # The tensor cores' own accumulation over the whole K loop (`_gemm_ws_kernel` with FAST, warp-specialized,
    # 128 x 256): for FP8 as cuBLAS's use_fast_accum=True and the Triton table's FAST_ACCUMULATION tiles;
    # for INT8 exact.
    fast_accumulation: bool = False
    # FP8 split accumulation (`_mma_split_partition`, warp-specialized): the tensor cores accumulate in
    # place, the K steps alternating between two accumulator tiles that are added in fp32 after the loop.
    split_accumulation: bool = False

    def name(self) -> str:
        """A unique readable name, e.g. "gluon promoted 128x128x128 g8 s4 w8 ws" (benchmark rows)."""
        mode = "fast" if self.fast_accumulation else "split" if self.split_accumulation else "promoted"
        return (f"gluon {mode} {self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} "
                f"s{self.num_stages} w{self.num_warps}{' ws' if self.warp_specialized else ''}")


DEFAULT = GluonGemmConfig()
# Timed beside DEFAULT by the GEMM benchmark: a deeper pipeline; promotion every 256 products (as the
# Triton table's promoted entry; half the adds and loop overhead per product, two 64 KiB stages); and
# both depths warp-specialized.
CANDIDATES = {
    "default": DEFAULT,
    "stages5": GluonGemmConfig(num_stages=5),
    "k256": GluonGemmConfig(block_k=256, num_stages=2),
    "ws": GluonGemmConfig(warp_specialized=True),
    "ws_k256": GluonGemmConfig(block_k=256, num_stages=2, warp_specialized=True),
    "split": GluonGemmConfig(warp_specialized=True, split_accumulation=True),
}
# Accumulation in place: for FP8 the GEMMs the Triton table gives its FAST_ACCUMULATION tiles (K <= 8192),
# a candidate against those, not a promoted kernel; and every INT8 GEMM.
FAST = GluonGemmConfig(block_n=256, num_stages=3, warp_specialized=True, fast_accumulation=True)


@gluon.jit
def _schedule(M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
              NUM_PROGRAMS: gl.constexpr):
    """(output tiles along M, along N, this program's tiles, K steps a tile) of the persistent schedule."""
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    return num_pid_m, num_pid_n, gl.cdiv(num_pid_m * num_pid_n - gl.program_id(0), NUM_PROGRAMS), gl.cdiv(K, BLOCK_K)


@gluon.jit
def _tile_origin(t, num_pid_m, num_pid_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                 NUM_PROGRAMS: gl.constexpr):
    """(first row, first column) of this program's t-th tile."""
    pid_m, pid_n = _tile_coords(gl.program_id(0) + t * NUM_PROGRAMS, num_pid_m, num_pid_n, GROUP_M)
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@gluon.jit
def _load_next(a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k, ld_t, ld_m, ld_n, my_tiles, K, num_pid_m, num_pid_n,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
               NSTAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    """TMA of the loads' next K step into stage ld % NSTAGES, signalled on that stage's mbarrier: the
    program's ld-th step, K offset ld_k of its tile ld_t, whose origin is (ld_m, ld_n); nothing once
    the tiles are done. Returns the cursor (ld, ld_k, ld_t, ld_m, ld_n) moved one step on: the tile
    order's divisions run once per tile, not per step."""
    stage = ld % NSTAGES
    bar = bars.index(stage)
    pred = ld_t < my_tiles
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    _tma_load(a_desc, [ld_m, ld_k], bar, a_smem.index(stage), pred=pred)
    _tma_load(b_desc, [ld_n, ld_k], bar, b_smem.index(stage), pred=pred)
    ld_k += BLOCK_K
    if ld_k >= K:
        ld_k = 0
        ld_t += 1
        # Past the program's last tile the loads are off; the clamp keeps the tile order's divisions
        # on tiles that exist (its last group's row count would be 0 there).
        ld_m, ld_n = _tile_origin(gl.minimum(ld_t, my_tiles - 1), num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M,
                                  NUM_PROGRAMS)
    return ld + 1, ld_k, ld_t, ld_m, ld_n


@gluon.jit
def _issue_product(a_smem, b_smem, bars, zero, step, BLOCK_K: gl.constexpr, NSTAGES: gl.constexpr):
    """Wait for the operands of the program's K step `step` and issue their product from zero,
    asynchronously. The FP8 MMA sums all BLOCK_K products in its own precision; the caller adds the
    result into fp32. (`zero` costs no registers: ptxas reads the zero register for it.)"""
    stage = step % NSTAGES
    mbarrier.wait(bars.index(stage), (step // NSTAGES) & 1)
    return warpgroup_mma(a_smem.index(stage), b_smem.index(stage).permute((1, 0)), zero, use_acc=False,
                         is_async=True, max_num_imprecise_acc=BLOCK_K)


@gluon.jit
def _retire(acc, pending, a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k, ld_t, ld_m, ld_n, my_tiles, K, num_pid_m,
            num_pid_n, IN_FLIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
            GROUP_M: gl.constexpr, NSTAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    """Wait until at most IN_FLIGHT products are in flight, which completes `pending`; refill its stage
    with the loads' next step; add it into acc. Returns acc and the loads' cursor (`_load_next`)."""
    done = warpgroup_mma_wait(IN_FLIGHT, deps=(pending, ))
    ld, ld_k, ld_t, ld_m, ld_n = _load_next(a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k, ld_t, ld_m, ld_n, my_tiles,
                                            K, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NSTAGES,
                                            NUM_PROGRAMS)
    return acc + done, ld, ld_k, ld_t, ld_m, ld_n


@gluon.jit
def _epilogue(acc, acc_smem, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm, stride_gb,
              rows_per_batch, HAS_BIAS: gl.constexpr, ACTIVATION: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
              HAS_GATE: gl.constexpr, num_warps: gl.constexpr):
    """Scales, bias, activation, gated residual and the masked store of one tile (module docstring).

    The tile goes through shared memory and comes back in slices of EPILOGUE_COLS columns, four
    consecutive values a thread: the residual, gate and output then move in full lines, and only a
    slice's pointers are live at once (the accumulator's own layout, a pair of columns a thread, left
    the residual epilogue spilling). The tile's base offsets in 64 bits (M·N may pass 2^31 elements),
    offsets inside it in 32."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    BLOCK_N: gl.constexpr = acc.shape[1]
    _cta_barrier()  # every warp has read the previous tile's slices
    acc_smem.store(acc)
    _cta_barrier()
    layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[32 // (EPILOGUE_COLS // 4),
                                            EPILOGUE_COLS // 4], warps_per_cta=[num_warps, 1], order=[1, 0])
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    offs_m = off_m + rows
    mask_m = offs_m < M
    xs = gl.load(XS + offs_m, mask=mask_m, other=0.0)
    tile_m = off_m.to(gl.int64)
    for j in gl.static_range(BLOCK_N // EPILOGUE_COLS):
        cols = j * EPILOGUE_COLS + gl.arange(0, EPILOGUE_COLS, layout=gl.SliceLayout(0, layout))
        offs_n = off_n + cols
        mask_n = offs_n < N
        ws = gl.load(WS + offs_n, mask=mask_n, other=0.0)
        y = acc_smem.slice(j * EPILOGUE_COLS, EPILOGUE_COLS, dim=1).load(layout) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y = y + gl.load(Bias + offs_n, mask=mask_n, other=0.0).to(gl.float32)[None, :]
        if ACTIVATION == 1:
            y = y / (1.0 + gl.exp2(y * (-_GELU_C0 - _GELU_C1 * y * y)))  # as the Triton epilogue (its comment)
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RESIDUAL:
            r = gl.load(Res + tile_m * stride_rm + off_n + (rows[:, None] * stride_rm + cols[None, :]), mask=mask,
                        other=0.0)
            if HAS_GATE:
                batch = offs_m // rows_per_batch
                g = gl.load(Gate + off_n + (batch[:, None] * stride_gb + cols[None, :]), mask=mask, other=0.0)
                y = r + g * y
            else:
                y = r + y
        gl.store(Out + tile_m * stride_om + off_n + (rows[:, None] * stride_om + cols[None, :]),
                 y.to(Out.dtype.element_ty), mask=mask)


@gluon.jit
def _fp8_gemm_kernel(a_desc, b_desc, XS, WS, Bias, Res, Gate, Out, M, N, K,
                     stride_om, stride_rm, stride_gb, rows_per_batch,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                     NSTAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, HAS_BIAS: gl.constexpr,
                     ACTIVATION: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr,
                     num_warps: gl.constexpr):
    # The products on 16 x BLOCK_N x 32 FP8 instructions, warps stacked along M (64 rows a warpgroup).
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    num_pid_m, num_pid_n, my_tiles, k_tiles = _schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, NUM_PROGRAMS)

    a_smem = gl.allocate_shared_memory(a_desc.dtype, [NSTAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [NSTAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    acc_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_N], ACC_STAGING)
    for i in gl.static_range(NSTAGES):
        mbarrier.init(bars.index(i), count=1)
    # The loads' cursor (module docstring): NSTAGES steps ahead of the products.
    ld_m, ld_n = _tile_origin(0, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M, NUM_PROGRAMS)
    ld, ld_k, ld_t = 0, 0, 0
    for i in gl.static_range(NSTAGES):
        ld, ld_k, ld_t, ld_m, ld_n = _load_next(a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k, ld_t, ld_m, ld_n,
                                                my_tiles, K, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, BLOCK_K,
                                                GROUP_M, NSTAGES, NUM_PROGRAMS)

    # After each wait, the stage of the product it completed is refilled with the loads' next step, and
    # that product is added into acc while the next one runs (`_retire`). The loop issues two products per
    # iteration: a product in flight across the back edge then always sits in the same registers (a
    # copy would read an MMA's accumulator mid-flight, and ptxas then serializes every MMA: its C7514).
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
    step = 0  # the program's next K step to multiply
    for t in range(my_tiles):
        off_m, off_n = _tile_origin(t, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M, NUM_PROGRAMS)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
        pending_y = _issue_product(a_smem, b_smem, bars, zero, step, BLOCK_K, NSTAGES)
        for _ in range(1, k_tiles - 1, 2):
            pending_x = _issue_product(a_smem, b_smem, bars, zero, step + 1, BLOCK_K, NSTAGES)
            acc, ld, ld_k, ld_t, ld_m, ld_n = _retire(acc, pending_y, a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k,
                                                      ld_t, ld_m, ld_n, my_tiles, K, num_pid_m, num_pid_n, 1, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, GROUP_M, NSTAGES, NUM_PROGRAMS)
            pending_y = _issue_product(a_smem, b_smem, bars, zero, step + 2, BLOCK_K, NSTAGES)
            acc, ld, ld_k, ld_t, ld_m, ld_n = _retire(acc, pending_x, a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k,
                                                      ld_t, ld_m, ld_n, my_tiles, K, num_pid_m, num_pid_n, 1, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, GROUP_M, NSTAGES, NUM_PROGRAMS)
            step += 2
        # The last one or two products; each branch ends with nothing in flight (a product in flight
        # across the join would be copied).
        if k_tiles % 2 == 0:
            pending_x = _issue_product(a_smem, b_smem, bars, zero, step + 1, BLOCK_K, NSTAGES)
            acc, ld, ld_k, ld_t, ld_m, ld_n = _retire(acc, pending_y, a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k,
                                                      ld_t, ld_m, ld_n, my_tiles, K, num_pid_m, num_pid_n, 1, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, GROUP_M, NSTAGES, NUM_PROGRAMS)
            acc, ld, ld_k, ld_t, ld_m, ld_n = _retire(acc, pending_x, a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k,
                                                      ld_t, ld_m, ld_n, my_tiles, K, num_pid_m, num_pid_n, 0, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, GROUP_M, NSTAGES, NUM_PROGRAMS)
            step += 2
        else:
            acc, ld, ld_k, ld_t, ld_m, ld_n = _retire(acc, pending_y, a_desc, b_desc, bars, a_smem, b_smem, ld, ld_k,
                                                      ld_t, ld_m, ld_n, my_tiles, K, num_pid_m, num_pid_n, 0, BLOCK_M,
                                                      BLOCK_N, BLOCK_K, GROUP_M, NSTAGES, NUM_PROGRAMS)
            step += 1
        _epilogue(acc, acc_smem, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm, stride_gb,
                  rows_per_batch, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE, num_warps)

    for i in gl.static_range(NSTAGES):
        mbarrier.invalidate(bars.index(i))


# ----------------------------------------------------------------------------------------------------
# The warp-specialized variant: one warp issues the loads, the other warps only multiply and add
# ----------------------------------------------------------------------------------------------------

@gluon.jit
def _load_partition(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, NSTAGES: gl.constexpr,
                    NUM_PROGRAMS: gl.constexpr):
    """The loading warp: every K step of the program's tiles, in order, into the stage ring. A stage is
    refilled once the multiplying warps have released it (`empty`); its first use needs no release (the
    wait on the opposite parity of a fresh barrier returns at once)."""
    num_pid_m, num_pid_n, my_tiles, k_tiles = _schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, NUM_PROGRAMS)
    for t in range(my_tiles):
        off_m, off_n = _tile_origin(t, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M, NUM_PROGRAMS)
        for kt in range(k_tiles):
            ld = t * k_tiles + kt
            stage = ld % NSTAGES
            mbarrier.wait(empty.index(stage), ((ld // NSTAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            _tma_load(a_desc, [off_m, kt * BLOCK_K], bar, a_smem.index(stage))
            _tma_load(b_desc, [off_n, kt * BLOCK_K], bar, b_smem.index(stage))


@gluon.jit
def _release(acc, pending, empty, step, IN_FLIGHT: gl.constexpr, NSTAGES: gl.constexpr):
    """Wait until at most IN_FLIGHT products are in flight, which completes `pending` (K step `step`);
    give its stage back to the loading warp; add it into acc."""
    done = warpgroup_mma_wait(IN_FLIGHT, deps=(pending, ))
    mbarrier.arrive(empty.index(step % NSTAGES), count=1)
    return acc + done


@gluon.jit
def _mma_partition(a_smem, b_smem, ready, empty, acc_smem, XS, WS, Bias, Res, Gate, Out, M, N, K, stride_om,
                   stride_rm, stride_gb, rows_per_batch, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, NSTAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                   HAS_BIAS: gl.constexpr, ACTIVATION: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
                   HAS_GATE: gl.constexpr, num_warps: gl.constexpr):
    """The multiplying warps: the products, their promotion and the epilogue, as in `_fp8_gemm_kernel`."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    num_pid_m, num_pid_n, my_tiles, k_tiles = _schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, NUM_PROGRAMS)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
    step = 0
    for t in range(my_tiles):
        off_m, off_n = _tile_origin(t, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M, NUM_PROGRAMS)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
        pending_y = _issue_product(a_smem, b_smem, ready, zero, step, BLOCK_K, NSTAGES)
        for _ in range(1, k_tiles - 1, 2):
            pending_x = _issue_product(a_smem, b_smem, ready, zero, step + 1, BLOCK_K, NSTAGES)
            acc = _release(acc, pending_y, empty, step, 1, NSTAGES)
            pending_y = _issue_product(a_smem, b_smem, ready, zero, step + 2, BLOCK_K, NSTAGES)
            acc = _release(acc, pending_x, empty, step + 1, 1, NSTAGES)
            step += 2
        if k_tiles % 2 == 0:
            pending_x = _issue_product(a_smem, b_smem, ready, zero, step + 1, BLOCK_K, NSTAGES)
            acc = _release(acc, pending_y, empty, step, 1, NSTAGES)
            acc = _release(acc, pending_x, empty, step + 1, 0, NSTAGES)
            step += 2
        else:
            acc = _release(acc, pending_y, empty, step, 0, NSTAGES)
            step += 1
        _epilogue(acc, acc_smem, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm, stride_gb,
                  rows_per_batch, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE, num_warps)


# ----------------------------------------------------------------------------------------------------
# Fast accumulation: 128 x 256 tiles, each product accumulated in place by the tensor cores
# ----------------------------------------------------------------------------------------------------

@gluon.jit
def _mma_fast_partition(a_smem, b_smem, ready, empty, acc_smem, XS, WS, Bias, Res, Gate, Out, M, N, K, stride_om,
                        stride_rm, stride_gb, rows_per_batch, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, NSTAGES: gl.constexpr,
                        NUM_PROGRAMS: gl.constexpr, HAS_BIAS: gl.constexpr, ACTIVATION: gl.constexpr,
                        HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, IS_INT8: gl.constexpr,
                        num_warps: gl.constexpr):
    """The multiplying warps: each K step's product accumulated into acc by the tensor cores (one
    accumulator tile, 128 registers a thread; int32 for INT8), the stage of the product before it
    released as soon as that product is done; the epilogue in two halves of 128 columns."""
    # The MMA instructions are 64 x N x 32 a warpgroup; Triton's INT8 instructions stop at N = 128.
    INSTR_N: gl.constexpr = 128 if IS_INT8 else BLOCK_N
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, INSTR_N, 32])
    num_pid_m, num_pid_n, my_tiles, k_tiles = _schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, NUM_PROGRAMS)
    step = 0
    for t in range(my_tiles):
        off_m, off_n = _tile_origin(t, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M, NUM_PROGRAMS)
        # A fresh tile each time (its value unused: the first product has use_acc=False), so that the last
        # tile's registers are free for the epilogue.
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, BLOCK_N], gl.int32 if IS_INT8 else gl.float32,
                                          layout=acc_layout))
        for kt in range(k_tiles):
            stage = step % NSTAGES
            mbarrier.wait(ready.index(stage), (step // NSTAGES) & 1)
            acc = warpgroup_mma(a_smem.index(stage), b_smem.index(stage).permute((1, 0)), acc, use_acc=kt > 0,
                                is_async=True)
            # The product before this one is done (this one may still run: acc stays an accumulator).
            acc = warpgroup_mma_init(warpgroup_mma_wait(1, deps=(acc, )))
            mbarrier.arrive(empty.index((step + NSTAGES - 1) % NSTAGES), count=1, pred=kt > 0)
            step += 1
        done = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((step + NSTAGES - 1) % NSTAGES), count=1)
        done = done.to(gl.float32)  # (a no-op for FP8) the epilogue's fp32, as the Triton kernel converts
        left, right = gl.split(gl.permute(gl.reshape(done, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))
        _epilogue(left, acc_smem, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm, stride_gb,
                  rows_per_batch, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE, num_warps)
        _epilogue(right, acc_smem, off_m, off_n + BLOCK_N // 2, M, N, XS, WS, Bias, Res, Gate, Out, stride_om,
                  stride_rm, stride_gb, rows_per_batch, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE, num_warps)


# ----------------------------------------------------------------------------------------------------
# Split accumulation: two accumulator tiles, the K steps alternating between them
# ----------------------------------------------------------------------------------------------------

@gluon.jit
def _split_step(a_smem, b_smem, ready, empty, acc, other, step, use_acc, release, NSTAGES: gl.constexpr):
    """One K step: issue its product into acc (in place, asynchronously); wait until it alone is in
    flight, which completes the product before it (into `other`); give that one's stage back."""
    stage = step % NSTAGES
    mbarrier.wait(ready.index(stage), (step // NSTAGES) & 1)
    acc = warpgroup_mma(a_smem.index(stage), b_smem.index(stage).permute((1, 0)), acc, use_acc=use_acc,
                        is_async=True)
    other = warpgroup_mma_init(warpgroup_mma_wait(1, deps=(other, )))
    mbarrier.arrive(empty.index((step + NSTAGES - 1) % NSTAGES), count=1, pred=release)
    return acc, other


@gluon.jit
def _mma_split_partition(a_smem, b_smem, ready, empty, acc_smem, XS, WS, Bias, Res, Gate, Out, M, N, K, stride_om,
                         stride_rm, stride_gb, rows_per_batch, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, NSTAGES: gl.constexpr,
                         NUM_PROGRAMS: gl.constexpr, HAS_BIAS: gl.constexpr, ACTIVATION: gl.constexpr,
                         HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, num_warps: gl.constexpr):
    """The multiplying warps of split accumulation: even K steps accumulate into acc0 and odd ones into
    acc1, in place, by the tensor cores (two tiles of 64 registers a thread at 128 x 128), so that each
    sums half the products at about 1/√2 of the result's magnitude; the two are added in fp32 after the
    loop. Nothing waits for an add: each step's wait leaves its own product in flight and completes the
    other accumulator's."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
    num_pid_m, num_pid_n, my_tiles, k_tiles = _schedule(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, NUM_PROGRAMS)
    step = 0
    for t in range(my_tiles):
        off_m, off_n = _tile_origin(t, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M, NUM_PROGRAMS)
        # Fresh tiles (each one's first product has use_acc=False), so that the last tile's registers are
        # free for the epilogue; acc1 stays zero where K has a single step.
        acc0 = warpgroup_mma_init(gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout))
        acc1 = warpgroup_mma_init(gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout))
        # The step before a tile's first was released with the previous tile's last: no release there.
        for kt in range(0, k_tiles - 1, 2):
            acc0, acc1 = _split_step(a_smem, b_smem, ready, empty, acc0, acc1, step, kt > 0, kt > 0, NSTAGES)
            acc1, acc0 = _split_step(a_smem, b_smem, ready, empty, acc1, acc0, step + 1, kt > 0, True, NSTAGES)
            step += 2
        if k_tiles % 2 == 1:
            acc0, acc1 = _split_step(a_smem, b_smem, ready, empty, acc0, acc1, step, k_tiles > 1, k_tiles > 1,
                                     NSTAGES)
            step += 1
        done0, done1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        mbarrier.arrive(empty.index((step + NSTAGES - 1) % NSTAGES), count=1)
        _epilogue(done0 + done1, acc_smem, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm,
                  stride_gb, rows_per_batch, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE, num_warps)


@gluon.jit
def _gemm_ws_kernel(a_desc, b_desc, XS, WS, Bias, Res, Gate, Out, M, N, K,
                    stride_om, stride_rm, stride_gb, rows_per_batch,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                    NSTAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, HAS_BIAS: gl.constexpr,
                    ACTIVATION: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr,
                    FAST: gl.constexpr, SPLIT: gl.constexpr, IS_INT8: gl.constexpr, num_warps: gl.constexpr):
    """The warp-specialized kernels: the load warp (`_load_partition`) and the multiplying warps, which
    promote every K tile (`_mma_partition`), or with FAST accumulate in place (`_mma_fast_partition`,
    whose epilogue stages half its 256 columns at a time), or with SPLIT in place into two tiles
    (`_mma_split_partition`)."""
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [NSTAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [NSTAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSTAGES, 1], mbarrier.MBarrierLayout())
    acc_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_N // 2 if FAST else BLOCK_N], ACC_STAGING)
    for i in gl.static_range(NSTAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    if SPLIT:
        gl.warp_specialize([
            (_mma_split_partition, (a_smem, b_smem, ready, empty, acc_smem, XS, WS, Bias, Res, Gate, Out, M, N, K,
                                    stride_om, stride_rm, stride_gb, rows_per_batch, BLOCK_M, BLOCK_N, BLOCK_K,
                                    GROUP_M, NSTAGES, NUM_PROGRAMS, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE,
                                    num_warps)),
            (_load_partition, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                               GROUP_M, NSTAGES, NUM_PROGRAMS)),
        ], [1], [24])
    elif FAST:
        gl.warp_specialize([
            (_mma_fast_partition, (a_smem, b_smem, ready, empty, acc_smem, XS, WS, Bias, Res, Gate, Out, M, N, K,
                                   stride_om, stride_rm, stride_gb, rows_per_batch, BLOCK_M, BLOCK_N, BLOCK_K,
                                   GROUP_M, NSTAGES, NUM_PROGRAMS, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE,
                                   IS_INT8, num_warps)),
            (_load_partition, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                               GROUP_M, NSTAGES, NUM_PROGRAMS)),
        ], [1], [24])
    else:
        gl.warp_specialize([
            (_mma_partition, (a_smem, b_smem, ready, empty, acc_smem, XS, WS, Bias, Res, Gate, Out, M, N, K,
                              stride_om, stride_rm, stride_gb, rows_per_batch, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                              NSTAGES, NUM_PROGRAMS, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE, num_warps)),
            (_load_partition, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                               GROUP_M, NSTAGES, NUM_PROGRAMS)),
        ], [1], [24])
    for i in gl.static_range(NSTAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


def operand_layout(rows: int, block_k: int, dtype: torch.dtype = FP8) -> gl.NVMMASharedLayout:
    """The shared-memory layout of an operand tile [rows, block_k] of 8-bit codes (e4m3 or int8)."""
    return gl.NVMMASharedLayout.get_default_for([rows, block_k], gl.int8 if dtype == torch.int8 else gl.float8e4nv)


def _check_operands(xq: torch.Tensor, wq: torch.Tensor, config: GluonGemmConfig) -> None:
    """The kernel's scope (module docstring), beyond the op's argument checks."""
    dtypes = (FP8, torch.int8) if config.fast_accumulation else (FP8, )
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dtype not in dtypes or t.device.type != "cuda":
            raise OpArgumentError(f"scaled_mm (gluon): {name} must be a CUDA tensor of "
                                  f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)} for the "
                                  f"{config.name()} kernel, got {t.dtype} on {t.device}")
        if t.stride(1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16:
            raise OpArgumentError(f"scaled_mm (gluon): {name} must have unit stride along K and 16-byte "
                                  f"aligned rows (TMA), got strides {t.stride()}")
    if torch.cuda.get_device_capability(xq.device)[0] != 9:
        raise OpArgumentError("scaled_mm (gluon): the kernel is written for Hopper (sm_90)")


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
              activation: str | None = None, residual: torch.Tensor | None = None,
              gate: torch.Tensor | None = None, rows_per_batch: int | None = None,
              config: GluonGemmConfig = DEFAULT) -> torch.Tensor:
    """`dit8.kernels.scaled_mm` for FP8 operands (and INT8 with FAST) on a Hopper GPU, with the same
    arguments, checks and result (FP8 accumulation promoted every config.block_k products, or not at all
    with FAST). OpArgumentError for operands outside the kernel's scope (module docstring)."""
    out_dtype = out_dtype or (torch.float32 if residual is not None else torch.bfloat16)
    _check_args(xq, x_scale, wq, w_scale, bias, out_dtype)
    rows_per_batch = _check_epilogue(xq, wq, out_dtype, activation, residual, gate, rows_per_batch)
    out = new_output((xq.shape[0], wq.shape[0]), out_dtype, xq.device)
    return launch(xq, x_scale, wq, w_scale, bias, out, activation=activation, residual=residual, gate=gate,
                  rows_per_batch=rows_per_batch, config=config)


def launch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor, *, activation: str | None = None,
           residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, rows_per_batch: int = 1,
           config: GluonGemmConfig = DEFAULT) -> torch.Tensor:
    """Run the kernel into `out` [M, N] (allocated by the caller) on arguments the op has checked;
    OpArgumentError, before any launch, for operands outside the kernel's scope."""
    _check_operands(xq, wq, config)
    M, K = xq.shape
    N = wq.shape[0]
    if M == 0 or N == 0:
        return out
    if K == 0:
        raise OpArgumentError("scaled_mm (gluon): K must be positive (a TMA descriptor has no empty dimension)")
    x_scale, w_scale = x_scale.contiguous(), w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    residual = residual.contiguous() if residual is not None else None
    gate = gate.contiguous() if gate is not None else None
    cfg = config
    a_desc = TensorDescriptor(xq, [M, K], [xq.stride(0), 1], [cfg.block_m, cfg.block_k],
                              operand_layout(cfg.block_m, cfg.block_k, xq.dtype))
    b_desc = TensorDescriptor(wq, [N, K], [wq.stride(0), 1], [cfg.block_n, cfg.block_k],
                              operand_layout(cfg.block_n, cfg.block_k, wq.dtype))
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    programs = min(tiles, _sm_count(xq.device.index or 0))
    dummy = x_scale  # pointer for the absent optional operands (never read: their flags are off)
    specialized = cfg.warp_specialized or cfg.fast_accumulation or cfg.split_accumulation
    kernel = _gemm_ws_kernel if specialized else _fp8_gemm_kernel
    with torch.cuda.device(xq.device):
        kernel[(programs,)](
            a_desc, b_desc, x_scale, w_scale, bias if bias is not None else dummy,
            residual if residual is not None else dummy, gate if gate is not None else dummy, out, M, N, K,
            out.stride(0), residual.stride(0) if residual is not None else 0,
            gate.stride(0) if gate is not None else 0, rows_per_batch,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            NSTAGES=cfg.num_stages, NUM_PROGRAMS=programs, HAS_BIAS=bias is not None,
            ACTIVATION=ACTIVATION_CODES[activation], HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None,
            num_warps=cfg.num_warps,
            **({"FAST": cfg.fast_accumulation, "SPLIT": cfg.split_accumulation, "IS_INT8": xq.dtype == torch.int8}
               if specialized else {}))
    return out
