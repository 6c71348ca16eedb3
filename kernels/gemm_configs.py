"""Launch configurations of the Triton scaled GEMM (kernels/scaled_mm_triton.py): a committed table
keyed by GPU generation and shape class, and the candidates the autotuner times where the table has
no entry. Pure data and selection logic: nothing here imports triton.

Keys
- GPU: "sm_90" (Hopper: H100/H200; wgmma, TMA), "sm_89" (Ada: L40S, RTX 4090; FP8 and INT8 through
  mma.sync, 99 KB of shared memory per block), "sm_80" (A100; INT8 only: no FP8 tensor cores), from
  torch.cuda.get_device_capability. Any other GPU has no entry and is autotuned.
- kind: "fp8" (e4m3 x e4m3, fp32 accumulation) or "int8" (int32 accumulation).
- shape class: "large" when 128 x 256 tiles give at least four waves on a 132-SM H100 (every
  Wan2.1 linear at 480P has M = 32,760 rows: 5,120 tiles or more), "small" otherwise (the
  once-per-generation text/image k/v projections with 512 and 257 rows, tiny test shapes).

Where the numbers come from. The sm_90 entries are the fastest candidates of the benchmark's sweep
(DIT8_GEMM_SWEEP=1 python -m pytest bench/test_bench_gemm.py -k sweep) on an H200 (2026-11-26, torch
2.11, triton 3.6; bench/RESULTS.md, GEMM): INT8 128 x 256 persistent at 1,150-1,219 TOPS on the three
Wan shapes; promoted FP8 128 x 128 x 256 persistent at 1.651 ms on (32760, 5120, 5120) (the one shape
it was timed on), where the 128-deep promoted tiles took 1.842-2.022 ms and fast accumulation on
128 x 256 tiles 1.246 ms. The Ada and Ampere entries are not timed: each compiles and fits its
GPU's shared memory (tests/test_scaled_mm_triton.py::test_table_configs_compile, from ptxas -v).
Change the table only with the numbers in bench/RESULTS.md.

FP8 accumulation on Hopper. Hopper's FP8 wgmma accumulates in reduced precision (DeepSeek-V3 reports
about 14 bits kept), and Triton by default lets a whole K loop accumulate that way (what cuBLAS calls
use_fast_accum=True). `fp8_promote` = P makes Triton add the tensor-core partial sum into an fp32
accumulator every P products (tl.dot's max_num_imprecise_acc, at most the K tile; DeepSeek-V3 promotes
every 128), at the price of a second accumulator tile in registers (128 x 256 tiles on 8 warps would
need 256 accumulator registers per thread, so the promoted entries use 128 x 128 tiles) and of a
wgmma wait before each add. None = Triton's default (fast) accumulation. Measured on the H200 against
float64 on the same operands (bf16 output, whose rounding alone is ~0.0017): fast accumulation errs
1.35x cuBLAS's default mode at K = 5120 (0.00226 against 0.00167) and 1.96x at K = 13824 (0.00327),
the edge of the 2x accuracy target; promoting every 256 products errs as every 128 (0.001675 against
0.001667) and waits half as often. So FP8 GEMMs with K up to FAST_ACCUMULATION_MAX_K (8192: the Wan
linears with K = 5120, three quarters of the GEMM work) take the fast tiles, and deeper ones (the FFN's
down projection, K = 13824) the promoted table entry.

Split accumulation (`fp8_accumulators` = 2): fast accumulation, but the K tiles alternate between two
accumulator tiles that are added in fp32 after the loop. Each then sums half the products and holds
about 1/√2 of the final magnitude, and the reduced-precision accumulation errs in proportion to both;
fitting the errors above (the accumulation's share grows as K^0.6 at a given magnitude) predicts
about 1.5x cuBLAS's error at K = 13824 instead of 1.96x (1.85x if the two halves' errors were
systematic and added up rather than partly cancelling). The two wgmma chains are independent, so,
unlike promotion, nothing waits; the second accumulator costs registers as promotion does (128 x 128
tiles). Candidates in HOPPER_SWEEP, not in the table: on an H100 at (32760, 5120, 13824) the plain
128 x 128 x 128 tile on 3 stages erred 1.49x cuBLAS's default mode and ran at 0.99x its speed, where the
table's promoted entry errs 1.005x (bench/RESULTS.md, 2026-11-27 run 3).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("fp8", "int8")
ARCHS = ("sm_90", "sm_89", "sm_80")

# Shared memory a block may use (bytes): opt-in maximum per block of each generation.
SHARED_MEMORY_LIMIT = {"sm_90": 232448, "sm_89": 101376, "sm_80": 166912}


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the Triton scaled GEMM: tile, tile order, warps and pipeline depth, and
    the kernel variant (persistent, FP8 accumulation, TMA store)."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # tile rows per group of the grouped tile order (W tiles reused from L2 across a group)
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop (shared-memory buffers of A and B)
    persistent: bool = False  # True: TMA loads, one program per SM looping over tiles (sm_90 only)
    fp8_promote: int | None = None  # see the module docstring; ignored for int8 and off sm_90
    # FP8 without promotion: K tiles alternate between this many accumulators, added in fp32 at the end
    # (module docstring); 1 or 2, ignored for int8 and with fp8_promote.
    fp8_accumulators: int = 1
    # Persistent kernel: the output tile goes out through a TMA descriptor (an asynchronous copy from shared
    # memory) instead of the threads' own stores.
    tma_store: bool = False

    def pipeline_bytes(self) -> int:
        """Shared memory of the K pipeline (8-bit operands): the floor of what the kernel uses."""
        return (self.block_m + self.block_n) * self.block_k * self.num_stages * self.fp8_accumulators

    def name(self) -> str:
        """A unique readable name, e.g. "tma_persistent_128x256x128_g8_w8_s3" (benchmark rows and sweeps)."""
        kind = "tma_persistent" if self.persistent else "plain"
        acc = "" if self.fp8_promote is None else f"_promote{self.fp8_promote}"
        if self.fp8_accumulators > 1:
            acc += f"_acc{self.fp8_accumulators}"
        if self.tma_store:
            acc += "_tmastore"
        return (f"{kind}_{self.block_m}x{self.block_n}x{self.block_k}_g{self.group_m}"
                f"_w{self.num_warps}_s{self.num_stages}{acc}")


C = GemmConfig

# The committed table. See the module docstring for what is and is not measured. ptxas -v (sm_90a,
# epilogue sliced by epilogue_split) of the sm_90 entries: FP8 128 x 128 x 256 promoted, persistent:
# 177-181 registers, no spills, 208 KB shared; INT8 128 x 256 persistent: 222-250 registers, no spills,
# 164-180 KB. The promoted FP8 dot makes ptxas insert wgmma waits (info C7517): the fp32 add of each
# partial sum waits for its wgmma, which the fast-accumulation kernels do not.
TABLE: dict[tuple[str, str, str], GemmConfig] = {
    ("sm_90", "fp8", "large"): C(128, 128, 256, 8, 8, 3, persistent=True, fp8_promote=256),
    ("sm_90", "int8", "large"): C(128, 256, 128, 8, 8, 3, persistent=True),
    ("sm_90", "fp8", "small"): C(128, 128, 128, 8, 8, 4, fp8_promote=128),
    ("sm_90", "int8", "small"): C(128, 128, 128, 8, 8, 4),
    # Ada: 99 KB of shared memory (the large tiles' K pipeline: 64 KB, pipeline_bytes); mma.sync, no TMA.
    ("sm_89", "fp8", "large"): C(128, 128, 64, 8, 8, 4),
    ("sm_89", "int8", "large"): C(128, 128, 64, 8, 8, 4),
    ("sm_89", "fp8", "small"): C(64, 128, 64, 8, 4, 4),
    ("sm_89", "int8", "small"): C(64, 128, 64, 8, 4, 4),
    # Ampere: INT8 only. 128 x 256 on 8 warps: 214 registers; its residual epilogue spills 256 bytes.
    ("sm_80", "int8", "large"): C(128, 256, 64, 8, 8, 3),
    ("sm_80", "int8", "small"): C(128, 128, 64, 8, 4, 4),
}

# FP8 where the tensor cores' own accumulation stays within the accuracy target (the module docstring):
# large outputs with K up to FAST_ACCUMULATION_MAX_K take these tiles, Triton's default accumulation on
# 128 x 256 tiles, the fastest FP8 configuration of the H200 sweep (1.246 ms on (32760, 5120, 5120)
# against 1.651 ms promoted; cuBLAS: 1.397 ms in default mode, 1.229 ms in its fast mode).
FAST_ACCUMULATION_MAX_K = 8192
FAST_ACCUMULATION: dict[str, GemmConfig] = {"sm_90": C(128, 256, 128, 8, 8, 3, persistent=True)}

# What the autotuner times on a GPU the table does not know (and the benchmark sweep on any GPU).
# Plain kernels only: they run on every generation with FP8 (sm_89+) or INT8 (sm_75+) tensor cores.
CANDIDATES: tuple[GemmConfig, ...] = (
    C(128, 256, 64, 8, 8, 3),
    C(128, 128, 128, 8, 8, 3),
    C(128, 128, 64, 8, 4, 4),
    C(64, 128, 64, 8, 4, 4),
    C(128, 64, 64, 8, 4, 4),
    C(64, 64, 64, 8, 4, 3),
)

# Hopper variants the benchmark sweep adds to CANDIDATES. Left out after ptxas -v:
# promoted FP8 on 128 x 256 tiles (255 registers + 244-512 bytes of spills on 8 warps; on 16 warps the
# 128-register cap spills too) and 16-warp 128 x 256 tiles with a residual (272 KB of shared memory).
HOPPER_SWEEP: tuple[GemmConfig, ...] = (
    C(128, 256, 128, 8, 8, 3),                          # the measured floor (spec/gpu-notes.md)
    C(128, 256, 128, 8, 8, 4),
    C(128, 256, 128, 8, 8, 3, persistent=True),
    C(128, 256, 128, 8, 8, 4, persistent=True),
    C(128, 128, 128, 8, 8, 4, persistent=True),
    C(128, 128, 128, 8, 8, 4, persistent=True, fp8_promote=128),
    C(128, 128, 128, 8, 8, 4, fp8_promote=128),
    C(128, 128, 128, 8, 8, 3, persistent=True, fp8_promote=128),
    # Fewer promotion waits: one per 256 products (K tiles of 256); and 64-row tiles on 4 warps, small
    # enough for two programs per SM, so that one's promotion overlaps the other's dots.
    C(128, 128, 256, 8, 8, 3, persistent=True, fp8_promote=256),
    C(128, 128, 256, 8, 8, 3, fp8_promote=256),
    C(64, 128, 128, 8, 4, 4, fp8_promote=128),
    # Split accumulation (module docstring): the fast 128 x 128 tiles with a second accumulator. Each
    # pipeline stage holds two K tiles, so half the stages fit (ptxas -v, sm_90a: 187-234 registers with
    # triton 3.6, 176-188 with 3.9, no spills, 131-197 KB).
    C(128, 128, 128, 8, 8, 2, persistent=True, fp8_accumulators=2),
    C(128, 128, 64, 8, 8, 6, persistent=True, fp8_accumulators=2),
    C(128, 128, 128, 8, 8, 3, fp8_accumulators=2),
    # The table's persistent tiles with the output written by TMA (tma_store). ptxas -v, sm_90a, triton
    # 3.6: 11-27 registers and 25-57 loop instructions fewer than the same tiles' own stores, no spills;
    # the residual epilogue takes 32-48 KiB more shared memory (at most 224 KiB).
    C(128, 256, 128, 8, 8, 3, persistent=True, tma_store=True),
    C(128, 128, 256, 8, 8, 3, persistent=True, fp8_promote=256, tma_store=True),
    C(128, 128, 128, 8, 8, 2, persistent=True, fp8_accumulators=2, tma_store=True),
)

# The Triton interpreter runs one program at a time in numpy: blocks small enough that the CPU test
# shapes span several tiles in M, N and K with tails in each, and several groups of the tile order.
INTERPRETER = C(64, 64, 64, 2, 4, 1)

# 128 x 256 tiles and a 132-SM H100: four waves or more is "large".
_LARGE_TILES = 4 * 132


def arch_name(capability: tuple[int, int]) -> str | None:
    """"sm_90" / "sm_89" / "sm_80" for the generations the table covers, None for any other."""
    name = f"sm_{capability[0]}{capability[1]}"
    return name if name in ARCHS else None


def shape_class(M: int, N: int) -> str:
    """"large" where the output has four waves or more of 128 x 256 tiles (on 132 SMs), else "small"."""
    tiles = -(-M // 128) * -(-N // 256)
    return "large" if tiles >= _LARGE_TILES else "small"


def table_config(arch: str | None, kind: str, M: int, N: int, K: int) -> GemmConfig | None:
    """The committed configuration, or None where the table has no entry (autotune then): FP8 on
    FAST_ACCUMULATION's GPUs takes its entry for large outputs with K up to FAST_ACCUMULATION_MAX_K."""
    if arch is None:
        return None
    cls = shape_class(M, N)
    if kind == "fp8" and cls == "large" and K <= FAST_ACCUMULATION_MAX_K and arch in FAST_ACCUMULATION:
        return FAST_ACCUMULATION[arch]
    return TABLE.get((arch, kind, cls))


def epilogue_split(cfg: GemmConfig, residual: bool) -> int:
    """Column slices (1, 2 or 4) the epilogue of a tile runs in, one after the other: slices of at least
    64 columns (32 when an fp32 residual tile is loaded beside the accumulator), so each slice's stores
    still cover 128-byte rows. From ptxas -v on sm_90a/sm_89/sm_80 (triton 3.9): unsplit, the residual
    epilogue spills on every table tile (76-2320 bytes) and GELU on 128 x 256 (~900 bytes); sliced so,
    none spills except the residual epilogue of sm_80's 128 x 256 tile (256 bytes)."""
    min_cols = 32 if residual else 64
    return max(1, min(4, cfg.block_n // min_cols))
