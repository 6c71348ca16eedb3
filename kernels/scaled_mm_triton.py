"""Triton kernels of the scaled GEMM (kernels/scaled_mm.py).

Only the kernels/*_triton.py modules import triton; kernels/scaled_mm.py imports this one lazily from the
registered functions, which call the GEMM as the torch.library op `dit8::scaled_mm_triton` (`scaled_mm_op`,
with a fake implementation): torch.compile then takes it whole, as it does the fused ops, instead of tracing
the launch wrapper (configuration lookup, autotuning, TMA checks that read data pointers).

out[m, n] = epilogue(acc[m, n]) with acc = Σ_k xq[m, k] · wq[n, k]:
- int8 x int8: tensor-core int32 accumulation (exact: |acc| <= K · 2^14 < 2^31 for K < 131,072);
- fp8 e4m3 x e4m3: fp32 accumulation. On Hopper the tensor cores sum FP8 products in reduced
  precision; GemmConfig.fp8_promote makes the kernel move the partial sum into a true fp32
  accumulator every that many products, and GemmConfig.fp8_accumulators = 2 alternates the K tiles
  between two fast accumulators added in fp32 at the end (kernels/gemm_configs.py explains both);
- epilogue in fp32, in the reference's order: y = acc · x_scale[m] · w_scale[n] (+ bias[n]); then
  optionally y = gelu_tanh(y); then optionally y = residual[m, n] + gate[m // rows_per_batch, n] · y
  (residual without gate: residual + y); one rounding to the output dtype.

Two GEMM kernels share the tile order and the epilogue:
- `_scaled_mm_kernel` ("plain"): one program per output tile, operands through tl.load, K loop
  software-pipelined by num_stages. Runs on every GPU with 8-bit tensor cores and in the interpreter;
  this is the kernel the CPU tests run by default.
- `_scaled_mm_persistent_kernel` ("tma_persistent", Hopper): one program per SM looping over the
  tiles, operands through TMA tensor descriptors (host-side triton.tools.tensor_descriptor), whose
  hardware bounds handling zero-fills the M/N/K tails, so the K loop has no masks at all. TMA needs
  16-byte-aligned row strides (K % 16 == 0 for 8-bit operands) and aligned bases; operands that do not
  qualify run the plain kernel with the same tiles. With GemmConfig.tma_store the output tile goes
  out through a descriptor too, where the output's rows are 16-byte aligned. The interpreters of
  triton 3.6 and 3.9 run it too (tensor descriptors become masked loads and stores), and the tests
  cover it where `tma_available()`.

Tile order (both kernels): tiles are numbered in groups of GROUP_M tile rows; within a group the
order walks down the GROUP_M rows of one tile column, then moves one column right. Programs running
at the same time then share their W tiles (one column) and X tiles (GROUP_M rows) through L2 instead
of each streaming a different W column from memory.

Tails: the plain kernel reads rows m >= M and n >= N as copies of valid rows (indices taken modulo M
and N), so its K loop needs no M/N masks, and masks K only when K % BLOCK_K != 0; nothing computed
for those rows is stored. Every store is masked to the [M, N] output.

Interpreter (TRITON_INTERPRET=1, CPU tensors; spec/gpu-notes.md): FP8 and INT8 dots are exact, but
the fp32 -> bf16 conversion truncates. For bf16 outputs under the interpreter the epilogue therefore
rounds in fp32 first (kernels/rounding_triton.py, ROUND_BF16=True), so that the conversion which follows
is exact and gives what a GPU's round-to-nearest-even conversion gives.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import candidates, gemm_configs
from .buffers import new_output
from .checks import OpArgumentError, check_int32_offset
from .gemm_configs import GemmConfig
from .registry import require_fp8_tensor_cores
from .rounding_triton import round_bf16
from .triton_support import interpreting, tensor_device

ACTIVATION_CODES = {None: 0, "gelu_tanh": 1}
# GELU(tanh) as y·sigmoid(2u), u = √(2/π)·(y + 0.044715·y³), since (1 + tanh(u))/2 = sigmoid(2u); with
# exp2 for exp: sigmoid(2u) = 1 / (1 + 2^(-2u·log2 e)). _GELU_C0 = 2·√(2/π)·log2(e), _GELU_C1 = 0.044715·C0.
_GELU_C0 = tl.constexpr(2.0 * 0.7978845608028654 * 1.4426950408889634)
_GELU_C1 = tl.constexpr(0.044715 * 2.0 * 0.7978845608028654 * 1.4426950408889634)


# ----------------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(tile row, tile column) of linear tile number `tile` in the grouped order (module docstring)."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)  # the last group may be shorter
    within = tile % tiles_per_group
    return first_m + within % rows_in_group, within // rows_in_group


@triton.jit
def _mma(a, b, acc, IS_INT8: tl.constexpr, FP8_PROMOTE: tl.constexpr):
    """acc + a · bᵀ for a [BM, BK] and b [BN, BK] (b is W's tile, K contiguous: the K-major B operand
    that Hopper's FP8 wgmma requires)."""
    if IS_INT8:
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=FP8_PROMOTE)
    return acc


@triton.jit
def _load_k_tile(x_ptrs, w_ptrs, offs_k, k_left, EVEN_K: tl.constexpr):
    """The X and W tiles of one K step of the plain kernel; with k_left < BLOCK_K (a K tail, or none
    left at all) the columns past K read as zeros, which add nothing to the dot."""
    if EVEN_K:
        return tl.load(x_ptrs), tl.load(w_ptrs)
    k_ok = offs_k < k_left
    return tl.load(x_ptrs, mask=k_ok[None, :], other=0.0), tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)


@triton.jit
def _epilogue_part(acc, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out,
                   stride_om, stride_rm, stride_gb, rows_per_batch,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   HAS_GATE: tl.constexpr, ROUND_BF16: tl.constexpr, TMA_STORE: tl.constexpr):
    """Scales, bias, activation, gated residual and the masked store of one accumulator tile whose
    rows start at off_m and columns at off_n, all in fp32 in the reference's order (module docstring).
    Row offsets: the tile's base in 64 bits (M·N may pass 2^31 elements), offsets inside it in 32.
    TMA_STORE: Out is a tensor descriptor of the output with this tile's block shape; the tensor
    memory accelerator writes the tile (and leaves out what lies past M and N)."""
    rows = tl.arange(0, acc.shape[0])
    cols = tl.arange(0, acc.shape[1])
    offs_m = off_m + rows
    offs_n = off_n + cols
    mask_m = offs_m < M
    mask_n = offs_n < N
    xs = tl.load(XS + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(WS + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        # gelu_tanh(y) = y / (1 + 2^(y·(-C0 - C1·y²))); overflow of exp2 (y very negative) gives -0. The
        # sign sits in the constants (-y costs an add: 0 - y) and the quotient is the hardware's approximate
        # one (2 ulps, far below the output's rounding), where div_rn took twice the instructions: the tile
        # loop of the 128 x 256 fast tiles (sm_90a, triton 3.6) runs 2,578 instructions a thread instead of
        # 3,857, against 1,310 without GELU.
        y = y / (1.0 + tl.math.exp2(y * (-_GELU_C0 - _GELU_C1 * y * y)))
    mask = mask_m[:, None] & mask_n[None, :]
    tile_m = off_m.to(tl.int64)
    if HAS_RESIDUAL:
        r = tl.load(Res + tile_m * stride_rm + off_n + (rows[:, None] * stride_rm + cols[None, :]), mask=mask,
                    other=0.0)
        if HAS_GATE:
            batch = offs_m // rows_per_batch
            g = tl.load(Gate + off_n + (batch[:, None] * stride_gb + cols[None, :]), mask=mask, other=0.0)
            y = r + g * y
        else:
            y = r + y
    if ROUND_BF16:
        y = round_bf16(y)
    if TMA_STORE:
        Out.store([off_m, off_n], y.to(Out.dtype))
    else:
        tl.store(Out + tile_m * stride_om + off_n + (rows[:, None] * stride_om + cols[None, :]),
                 y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _split_columns(acc):
    """The left and right column halves of a 2-D tile."""
    return tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, acc.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm, stride_gb,
              rows_per_batch, EPILOGUE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
              ROUND_BF16: tl.constexpr, TMA_STORE: tl.constexpr):
    """The epilogue of an accumulator tile, run on EPILOGUE_SPLIT (1, 2 or 4) column slices in turn:
    the residual and gate tiles loaded beside the accumulator, their pointers and the store's layout
    conversion then take that fraction of the registers (ptxas -v: the unsplit residual epilogue of a
    128 x 128 tile on 8 warps spills)."""
    if EPILOGUE_SPLIT == 1:
        slices = (acc, )
    else:
        left, right = _split_columns(acc)
        if EPILOGUE_SPLIT == 2:
            slices = (left, right)
        else:
            a, b = _split_columns(left)
            c, d = _split_columns(right)
            slices = (a, b, c, d)
    width: tl.constexpr = acc.shape[1] // EPILOGUE_SPLIT
    for i in tl.static_range(EPILOGUE_SPLIT):
        _epilogue_part(slices[i], off_m, off_n + i * width, M, N, XS, WS, Bias, Res, Gate, Out, stride_om,
                       stride_rm, stride_gb, rows_per_batch, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE,
                       ROUND_BF16, TMA_STORE)


# ----------------------------------------------------------------------------------------------------
# GEMM kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _scaled_mm_kernel(X, W, XS, WS, Bias, Res, Gate, Out, M, N, K,
                      stride_xm, stride_wn, stride_om, stride_rm, stride_gb, rows_per_batch,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, IS_INT8: tl.constexpr, FP8_PROMOTE: tl.constexpr,
                      ACCUMULATORS: tl.constexpr, EVEN_K: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      HAS_GATE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Plain kernel: one program per output tile (see the module docstring). X [M, K] and W [N, K]
    have unit stride along K; Out, Res and Gate unit stride along N."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Tail rows read valid rows (modulo M, N) so that the loads need no M/N masks; never stored.
    x_ptrs = X + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + (offs_n % N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT8 else tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # ACCUMULATORS == 2: the odd K tiles' sum
    for kt in tl.range(0, tl.cdiv(K, BLOCK_K * ACCUMULATORS)):
        k_left = K - kt * (BLOCK_K * ACCUMULATORS)
        a, b = _load_k_tile(x_ptrs, w_ptrs, offs_k, k_left, EVEN_K)
        acc = _mma(a, b, acc, IS_INT8, FP8_PROMOTE)
        if ACCUMULATORS == 2:
            a, b = _load_k_tile(x_ptrs + BLOCK_K, w_ptrs + BLOCK_K, offs_k, k_left - BLOCK_K, EVEN_K)
            acc_odd = _mma(a, b, acc_odd, False, None)
        x_ptrs += BLOCK_K * ACCUMULATORS
        w_ptrs += BLOCK_K * ACCUMULATORS
    if ACCUMULATORS == 2:
        acc += acc_odd
    _epilogue(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm,
              stride_gb, rows_per_batch, EPILOGUE_SPLIT, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE,
              ROUND_BF16, False)


@triton.jit
def _scaled_mm_persistent_kernel(x_desc, w_desc, XS, WS, Bias, Res, Gate, Out, M, N, K,
                                 stride_om, stride_rm, stride_gb, rows_per_batch,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr, IS_INT8: tl.constexpr,
                                 FP8_PROMOTE: tl.constexpr, ACCUMULATORS: tl.constexpr,
                                 EPILOGUE_SPLIT: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                                 HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, ROUND_BF16: tl.constexpr,
                                 TMA_STORE: tl.constexpr):
    """Persistent TMA kernel: program p computes tiles p, p + NUM_PROGRAMS, ... in the grouped order.
    The descriptors zero-fill reads past M, N and K, so the K loop carries no masks. flatten=True lets
    Triton pipeline the tile loop and the K loop as one, so the next tile's first loads are in flight
    while this tile's epilogue runs. TMA_STORE: Out is the output's descriptor (GemmConfig.tma_store)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # Flattened, a second accumulator's reset for each new tile lands inside the wgmma pipeline, and ptxas
    # then serializes every wgmma (info C7515): with two accumulators the tile loop stays a loop.
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=ACCUMULATORS == 1):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT8 else tl.float32)
        acc_odd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # as in the plain kernel
        for kt in range(0, k_tiles, ACCUMULATORS):
            a = x_desc.load([off_m, kt * BLOCK_K])
            b = w_desc.load([off_n, kt * BLOCK_K])
            acc = _mma(a, b, acc, IS_INT8, FP8_PROMOTE)
            if ACCUMULATORS == 2:  # a tile past K (odd k_tiles) reads as zeros
                a = x_desc.load([off_m, (kt + 1) * BLOCK_K])
                b = w_desc.load([off_n, (kt + 1) * BLOCK_K])
                acc_odd = _mma(a, b, acc_odd, False, None)
        if ACCUMULATORS == 2:
            acc += acc_odd
        _epilogue(acc, off_m, off_n, M, N, XS, WS, Bias, Res, Gate, Out, stride_om, stride_rm, stride_gb,
                  rows_per_batch, EPILOGUE_SPLIT, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, HAS_GATE, ROUND_BF16,
                  TMA_STORE)


# ----------------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------------

def _capability(device: torch.device) -> tuple[int, int] | None:
    return None if device.type != "cuda" else torch.cuda.get_device_capability(device)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_available(device: torch.device) -> bool:
    """Whether the persistent TMA kernel can run on `device`: Hopper or later on CUDA; on CPU tensors
    an interpreter that implements tensor descriptors (triton 3.9 does)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    from triton.runtime import interpreter
    return interpreting() and hasattr(interpreter.InterpreterBuilder, "create_descriptor_load")


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can describe: unit inner stride, 16-byte aligned base and row stride."""
    return (t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


# The longest tile side of any configuration (gemm_configs.py's tables and candidates, scaled_mm_gluon.py's).
MAX_TILE_SIDE = 256


def check_offsets(M: int, N: int, residual_stride: int | None = None, gate_stride: int | None = None,
                  rows_per_batch: int = 1) -> None:
    """OpArgumentError unless the GEMM kernels' 32-bit offsets address an [M, N] problem: the row and column
    indices of the last tiles (up to a tile past M and N; wrapped, those rows would pass the store's mask),
    the offsets inside an output or residual tile (row · row stride + column: the tile's base alone is
    64-bit) and in the gate (batch · row stride + column). The strides are those the kernel reads (the
    output's is N)."""
    if M == 0 or N == 0:
        return
    op = "scaled_mm"
    check_int32_offset(op, "xq", M + MAX_TILE_SIDE - 1, f"{M:,} rows and a tile of {MAX_TILE_SIDE} past them")
    check_int32_offset(op, "wq", N + MAX_TILE_SIDE - 1, f"{N:,} columns and a tile of {MAX_TILE_SIDE} past them")
    tile_rows = min(M, MAX_TILE_SIDE) - 1
    for name, stride in (("the output", N), ("residual", residual_stride)):
        if stride is not None:
            check_int32_offset(op, name, tile_rows * stride + N - 1, f"{tile_rows} rows {stride:,} elements apart "
                               f"in a tile, {tile_rows}·{stride:,} + {N:,} - 1")
    if gate_stride is not None:
        batches = (M - 1) // rows_per_batch + 1
        check_int32_offset(op, "gate", (batches - 1) * gate_stride + N - 1, f"{batches:,} rows {gate_stride:,} "
                           f"elements apart, {batches - 1:,}·{gate_stride:,} + {N:,} - 1")


_TUNED: dict[tuple, GemmConfig] = {}


def pick_config(kind: str, M: int, N: int, K: int, device: torch.device, epilogue: str = "") -> GemmConfig | None:
    """The configuration for this problem: the interpreter's, else the committed table's entry for
    this GPU and shape class, else one autotuned earlier in this process for this `epilogue`
    (`epilogue_name`); None = autotune now."""
    if device.type != "cuda":
        return gemm_configs.INTERPRETER
    cap = _capability(device)
    cfg = gemm_configs.table_config(gemm_configs.arch_name(cap), kind, M, N, K)
    if cfg is not None:
        return cfg
    return _TUNED.get(_tune_key(cap, kind, M, N, K, epilogue))


def epilogue_name(activation: str | None, residual: torch.Tensor | None, gate: torch.Tensor | None) -> str:
    """The epilogue a launch fuses, as the autotuner keys its choice: the fastest tile of a plain GEMM
    may spill with a residual's registers (128 x 256 on sm_86)."""
    return activation or ("gated_residual" if gate is not None else "residual" if residual is not None else "")


def _tune_key(cap, kind, M, N, K, epilogue) -> tuple:
    return (cap, kind, gemm_configs.shape_class(M, N), triton.next_power_of_2(M), N, K, epilogue)


def accumulation(cfg: GemmConfig, is_int8: bool, *, promotes: bool) -> tuple[int | None, int]:
    """(FP8_PROMOTE, ACCUMULATORS) of a launch of `cfg`: FP8 promotion every fp8_promote products (at most
    the K tile) where `promotes` (Hopper, and the interpreter), else fp8_accumulators fast accumulators;
    INT8 accumulates exactly in one."""
    if is_int8:
        return None, 1
    if cfg.fp8_promote is not None and promotes:
        return min(cfg.fp8_promote, cfg.block_k), 1
    return None, cfg.fp8_accumulators


def launch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor, *, activation: str | None = None,
           residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, rows_per_batch: int = 1,
           config: GemmConfig) -> torch.Tensor:
    """Run one configuration into `out` (allocated by the caller). Arguments as checked by
    kernels/scaled_mm.py; X and W with unit stride along K, Out/Res/Gate along N."""
    M, K = xq.shape
    N = wq.shape[0]
    cfg = config
    is_int8 = xq.dtype == torch.int8
    interp = interpreting()
    promote, accumulators = accumulation(cfg, is_int8, promotes=interp or _capability(xq.device) == (9, 0))
    dummy = x_scale  # pointer for the absent optional operands (never read: their flags are off)
    common = dict(
        XS=x_scale, WS=w_scale, Bias=bias if bias is not None else dummy,
        Res=residual if residual is not None else dummy, Gate=gate if gate is not None else dummy,
        Out=out, M=M, N=N, K=K, stride_om=out.stride(0),
        stride_rm=residual.stride(0) if residual is not None else 0,
        stride_gb=gate.stride(0) if gate is not None else 0, rows_per_batch=rows_per_batch,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        IS_INT8=is_int8, FP8_PROMOTE=promote, ACCUMULATORS=accumulators,
        EPILOGUE_SPLIT=gemm_configs.epilogue_split(cfg, residual is not None),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATION_CODES[activation],
        HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None,
        ROUND_BF16=interp and out.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if cfg.persistent and tma_available(xq.device) and _tma_ok(xq) and _tma_ok(wq):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(xq, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(wq, [cfg.block_n, cfg.block_k])
        tma_store = cfg.tma_store and _tma_ok(out)
        if tma_store:  # one epilogue slice a store
            common["Out"] = TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n // common["EPILOGUE_SPLIT"]])
        # The interpreter: a few programs, so that each loops over several tiles.
        programs = min(tiles, 3 if xq.device.type != "cuda" else _sm_count(xq.device.index or 0))
        _scaled_mm_persistent_kernel[(programs,)](x_desc, w_desc, NUM_PROGRAMS=programs, TMA_STORE=tma_store,
                                                  **common)
    else:
        _scaled_mm_kernel[(tiles,)](xq, wq, stride_xm=xq.stride(0), stride_wn=wq.stride(0),
                                    EVEN_K=K % (cfg.block_k * accumulators) == 0, **common)
    return out


def _autotune(key, args, kwargs) -> GemmConfig:
    """Time every candidate on these operands (do_bench median) and keep the fastest for `key`."""
    from triton.testing import do_bench

    times = {}
    for cfg in gemm_configs.CANDIDATES:
        try:
            times[cfg] = do_bench(lambda cfg=cfg: launch(*args, **kwargs, config=cfg), return_mode="median")
        except (triton.runtime.errors.OutOfResources, triton.CompilationError):
            continue  # does not fit this GPU's shared memory or registers
    if not times:
        raise RuntimeError("scaled_mm: no candidate configuration of the triton GEMM runs on this GPU")
    best = min(times, key=times.get)
    _TUNED[key] = best
    return best


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
              activation: str | None = None, residual: torch.Tensor | None = None,
              gate: torch.Tensor | None = None, rows_per_batch: int = 1,
              config: GemmConfig | None = None) -> torch.Tensor:
    """The triton backend of dit8.kernels.scaled_mm (arguments checked there). `config` overrides the
    table (tests and benchmarks); a persistent config falls back to the plain kernel where TMA cannot
    describe the operands."""
    M, K = xq.shape
    N = wq.shape[0]
    kind = "int8" if xq.dtype == torch.int8 else "fp8"
    if kind == "fp8":
        require_fp8_tensor_cores("scaled_mm: the triton backend's FP8 GEMM", xq.device,
                                 "use int8 weights or backend='torch'")
    # (A residual or gate without unit column stride is read as its contiguous copy, below.)
    check_offsets(M, N, None if residual is None else residual.stride(0) if residual.stride(1) == 1 else N,
                  None if gate is None else gate.stride(0) if gate.stride(1) == 1 else N, rows_per_batch)
    out = new_output((M, N), out_dtype, xq.device)
    if M == 0 or N == 0:
        return out
    # Unit inner strides (the kernels' vectorized loads and stores assume them); copies otherwise.
    xq, wq = (t if t.stride(1) == 1 else t.contiguous() for t in (xq, wq))
    x_scale, w_scale = x_scale.contiguous(), w_scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    if gate is not None and gate.stride(1) != 1:
        gate = gate.contiguous()
    args = (xq, x_scale, wq, w_scale, bias, out)
    kwargs = dict(activation=activation, residual=residual, gate=gate, rows_per_batch=rows_per_batch)
    with tensor_device(xq):
        epilogue = epilogue_name(activation, residual, gate)
        cfg = config or pick_config(kind, M, N, K, xq.device, epilogue)
        if cfg is None:
            cfg = _autotune(_tune_key(_capability(xq.device), kind, M, N, K, epilogue), args, kwargs)
        if config is None:
            trial = "gemm_int8" if kind == "int8" else "gemm" if cfg.fp8_promote is not None else "gemm_fast"
            if (gluon := candidates.routed(trial, xq.device)) is not None:
                from . import scaled_mm_gluon

                gluon_cfg = scaled_mm_gluon.CANDIDATES[gluon] if trial == "gemm" else scaled_mm_gluon.FAST
                try:  # on trial (kernels/candidates.py); outside its scope the Triton kernel runs
                    return scaled_mm_gluon.launch(*args, **kwargs, config=gluon_cfg)
                except OpArgumentError:
                    pass
        return launch(*args, **kwargs, config=cfg)


# ----------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("dit8::scaled_mm_triton", mutates_args=())
def scaled_mm_op(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, activation: str | None,
                 residual: torch.Tensor | None, gate: torch.Tensor | None, rows_per_batch: int) -> torch.Tensor:
    """The Triton GEMM as a torch.library op: `scaled_mm`, arguments checked by kernels/scaled_mm.py."""
    return scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype, activation=activation, residual=residual,
                     gate=gate, rows_per_batch=rows_per_batch)


@scaled_mm_op.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype, activation, residual, gate, rows_per_batch):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)
