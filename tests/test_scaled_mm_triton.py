"""The Triton scaled GEMM and its fused epilogues (kernels/scaled_mm_triton.py, `scaled_mm(...,
backend="triton")`) against float64, on fresh random operands.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1) with small shapes whose M, N and K are not multiples of the tiles; with a GPU the
same tests run compiled on CUDA tensors, and the GPU-only tests below add the Wan2.1 shapes and the
comparison with cuBLAS. Outputs are poisoned with NaN (DIT8_POISON_OUTPUTS=1), so an element a kernel
forgets to write fails every comparison.

Reference: the float64 result of the very operands the kernel receives (8-bit codes, fp32 scales,
bias, residual, gate), so the error measured is the kernel's, not the quantization's. Budgets:
- relative error ‖out - ref‖ / ‖ref‖ at most 2x that of the same-precision computation on the same
  operands and output dtype: the torch reference op (the spec), and for FP8 on a GPU also the tensor
  cores' own FP8 accumulation as cuBLAS does it (Hopper keeps fewer bits than fp32 between promotions,
  which an fp32 output shows); with a residual the error is taken relative to the update
  ‖ref - residual‖, so that a wrong gate row cannot hide under a large residual;
- INT8: the int32 accumulation is exact, and the epilogue does the reference's fp32 operations in the
  reference's order, so under the interpreter (numpy: no fused multiply-add) every result without GELU
  equals the torch reference bit for bit; with scales 1 and fp32 output it is the exact integer.
K: the plain kernel takes any K; the TMA kernel needs K % 16 == 0 (16-byte row strides of 8-bit
operands) and otherwise falls back to the plain kernel, so its own tests use K multiple of 16.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from dit8.kernels import BackendError, OpArgumentError, quantize_per_token, scaled_mm  # noqa: E402
from dit8.kernels import gemm_configs  # noqa: E402
from dit8.kernels import scaled_mm_triton as impl  # noqa: E402
from dit8.kernels.gemm_configs import GemmConfig  # noqa: E402
from dit8.kernels.triton_support import interpreting  # noqa: E402
from dit8.testing import random_w8a8_operands  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
QDTYPES = [torch.int8, FP8]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# GELU's exp2 overflows to inf for very negative inputs (giving the right -0); numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
# What a GPU run of a test verifies (tests/conftest.py): the plain and the fused-epilogue kernel.
PLAIN = pytest.mark.verifies("scaled_mm", backend="triton")
FUSED = pytest.mark.verifies("scaled_mm_fused", backend="triton")


@pytest.fixture(autouse=True)
def _triton_kernels_only(monkeypatch):
    """These tests verify the Triton kernels: no Gluon kernel routed in on Hopper (kernels/candidates.py;
    those have tests/test_scaled_mm_gluon.py)."""
    monkeypatch.setenv("DIT8_GLUON", "")


def qname(q):
    return "int8" if q == torch.int8 else "fp8"


def operands(M, N, K, qdtype, seed, bias_dtype=None):
    """Random 8-bit codes over the whole range (fp8: normals and subnormals), scales of different
    magnitudes per row/column, bias: (xq, x_scale, wq, w_scale, bias or None) on DEVICE."""
    if qdtype == FP8 and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the triton FP8 GEMM needs FP8 tensor cores (sm_89+)")
    tensors = random_w8a8_operands(M, N, K, qdtype, seed=seed, bias_dtype=bias_dtype)
    return [t if t is None else t.to(DEVICE) for t in tensors]


def residual_and_gate(M, N, batches, seed):
    gen = torch.Generator().manual_seed(seed)
    # The GEMM values above are O(10-100): a residual of the same order and gates of either sign.
    residual = torch.randn(M, N, generator=gen) * 30
    gate = torch.randn(batches, N, generator=gen)
    return residual.to(DEVICE), gate.to(DEVICE)


def reference64(xq, xs, wq, ws, bias=None, activation=None, residual=None, gate=None, rows_per_batch=1,
                product=None):
    """The fused op in float64 on the same operands; `product`: xq · wqᵀ as some GEMM accumulated it
    (default: exact)."""
    product = xq.double() @ wq.double().t() if product is None else product.double()
    y = product * xs.double()[:, None] * ws.double()[None, :]
    if bias is not None:
        y = y + bias.double()[None, :]
    if activation == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    if residual is not None:
        if gate is not None:
            y = gate.double()[torch.arange(y.shape[0], device=y.device) // rows_per_batch] * y
        y = residual.double() + y
    return y


def rel_err(out, ref, residual=None):
    base = ref if residual is None else ref - residual.double()
    return ((out.double() - ref).norm() / base.norm()).item()


def _zero_padded(t, rows, cols):
    out = torch.zeros(rows, cols, dtype=torch.uint8, device=t.device).view(t.dtype)
    out[:t.shape[0], :t.shape[1]] = t
    return out


def fp8_tensor_core_product(xq, wq, fast_accum=False):
    """xq · wqᵀ as cuBLAS's FP8 GEMM accumulates it on this GPU (use_fast_accum as given): unit
    tensor-wise scales and fp32 output (which row-wise scaling does not offer everywhere), operands
    zero-padded to the multiples of 16 cuBLASLt needs (exact zeros: the sums do not change)."""
    (M, K), N = xq.shape, wq.shape[0]
    up = lambda n: max(16, -(-n // 16) * 16)  # noqa: E731
    one = torch.ones((), device=xq.device)
    out = torch._scaled_mm(_zero_padded(xq, up(M), up(K)), _zero_padded(wq, up(N), up(K)).t(), scale_a=one,
                           scale_b=one, out_dtype=torch.float32, use_fast_accum=fast_accum)
    return out[:M, :N]


def gate_rows(xq, epilogue) -> int:
    """rows_per_batch as the op reads it: given, or M // (gate rows)."""
    gate = epilogue.get("gate")
    return epilogue.get("rows_per_batch") or (xq.shape[0] // gate.shape[0] if gate is not None else 1)


def tensor_core_error(xq, xs, wq, ws, bias, out_dtype, ref, *, fast_accum=False, **epilogue):
    """For FP8 on a GPU, the error of the op computed with the tensor cores' FP8 accumulation (cuBLAS's,
    the epilogue exact, then rounded to out_dtype); 0 elsewhere. FP8 tensor cores accumulate with fewer
    bits than fp32 (Hopper keeps about 14 between promotions), so there the fp32 torch reference is not
    the same precision and the budget doubles the larger of the two errors. fast_accum: for a kernel
    configuration that never promotes (Triton's default on Hopper), cuBLAS's use_fast_accum=True is the
    same computation."""
    if xq.dtype != FP8 or xq.device.type != "cuda" or xq.shape[1] == 0:
        return 0.0
    residual = epilogue.get("residual")
    tensor_cores = reference64(xq, xs, wq, ws, bias, epilogue.get("activation"), residual, epilogue.get("gate"),
                               gate_rows(xq, epilogue), product=fp8_tensor_core_product(xq, wq, fast_accum))
    return rel_err(tensor_cores.to(out_dtype), ref, residual)


def check_output(out, shape, dtype):
    assert out.shape == shape and out.dtype == dtype and out.device.type == DEVICE
    assert torch.isfinite(out).all(), "kernel left elements unwritten (NaN poison) or overflowed"


def check_against_torch(xq, xs, wq, ws, bias, out_dtype, *, config=None, **epilogue):
    """Run the triton backend (through the op, or the impl with `config`) and the torch reference;
    assert the 2x budget (and bit equality where it is exact); return (triton err, same-precision err)."""
    M, N = xq.shape[0], wq.shape[0]
    gate, rows = epilogue.get("gate"), gate_rows(xq, epilogue)
    if config is None:
        out = scaled_mm(xq, xs, wq, ws, bias, out_dtype, backend="triton", **epilogue)
    else:
        out = impl.scaled_mm(xq, xs, wq, ws, bias, out_dtype, config=config, **{**epilogue, "rows_per_batch": rows})
    check_output(out, (M, N), out_dtype)
    ref = reference64(xq, xs, wq, ws, bias, epilogue.get("activation"), epilogue.get("residual"), gate, rows)
    err = rel_err(out, ref, epilogue.get("residual"))
    ref_op = scaled_mm(xq, xs, wq, ws, bias, out_dtype, backend="torch", **epilogue)
    fast_accum = config is not None and config.fp8_promote is None
    err_same = max(rel_err(ref_op, ref, epilogue.get("residual")),
                   tensor_core_error(xq, xs, wq, ws, bias, out_dtype, ref, fast_accum=fast_accum, **epilogue))
    assert err <= 2 * err_same, (err, err_same)
    if interpreting() and xq.dtype == torch.int8 and epilogue.get("activation") is None:
        assert torch.equal(out, ref_op)
    return err, err_same


# ----------------------------------------------------------------------------------------------------
# Plain GEMM through the op (the plain kernel: the one the interpreter runs by default)
# ----------------------------------------------------------------------------------------------------

# M, N, K off the interpreter's 64 x 64 x 64 tiles (GPU: 128 x 128/256 x 128). SMALL: 2 x 1 tiles,
# K tail of 61. LARGE: 5 x 3 tiles, so more than one group of the tile order (GROUP_M = 2 there) and a
# short last group, K = 2 x 64 + 8.
SMALL, LARGE = (77, 45, 61), (300, 130, 136)


@PLAIN
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_scaled_mm_within_twice_torch_error(qdtype, out_dtype, with_bias):
    args = operands(*SMALL, qdtype, seed=7 + with_bias, bias_dtype=out_dtype if with_bias else None)
    check_against_torch(*args, out_dtype)


@PLAIN
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_scaled_mm_several_tile_groups(qdtype, out_dtype):
    args = operands(*LARGE, qdtype, seed=8, bias_dtype=torch.float32)
    check_against_torch(*args, out_dtype)


@PLAIN
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_scaled_mm_thousand_rows(qdtype):
    args = operands(1000, 72, 80, qdtype, seed=1000, bias_dtype=torch.float32)
    check_against_torch(*args, torch.bfloat16)


@PLAIN
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (5, 7, 1000), (3, 200, 33), (4, 9, 0)])
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_scaled_mm_edge_shapes(M, N, K, qdtype):
    xq, xs, wq, ws, bias = operands(M, N, K, qdtype, seed=M + N + K, bias_dtype=torch.bfloat16)
    out = scaled_mm(xq, xs, wq, ws, bias, torch.float32, backend="triton")
    check_output(out, (M, N), torch.float32)
    ref = reference64(xq, xs, wq, ws, bias)
    if K == 0:
        assert torch.equal(out, bias.float().expand(M, N))  # an empty sum is 0: out = bias
    else:
        err_torch = rel_err(scaled_mm(xq, xs, wq, ws, bias, torch.float32, backend="torch"), ref)
        err_same = max(err_torch, tensor_core_error(xq, xs, wq, ws, bias, torch.float32, ref))
        assert rel_err(out, ref) <= 2 * err_same, (rel_err(out, ref), err_same)


@PLAIN
def test_empty_output():
    xq, xs, wq, ws, _ = operands(0, 5, 16, FP8, seed=3)
    assert scaled_mm(xq, xs, wq, ws, backend="triton").shape == (0, 5)


def _meta_operands(M, N, K=16):
    """Unallocated int8 operands and scales (the checks before any allocation only read shapes)."""
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    return meta(M, K, dtype=torch.int8), meta(M), meta(N, K, dtype=torch.int8), meta(N)


def _strided(rows, cols, row_stride):
    return torch.empty(rows, row_stride, device="meta")[:, :cols]


# A tile past the last row or column (256 at most) must stay in int32: wrapped, those rows pass the
# store's mask. Inside a tile, row · row stride + column of the output, residual and gate is an int32
# offset from the tile's 64-bit base: wrapped, it writes the wrong memory.
PAST_32_BITS = {
    "rows": (dict(M=2 ** 31 - 255, N=16), {}, "xq"),
    "columns": (dict(M=1, N=2 ** 31 - 255), {}, "wq"),
    # 256 rows of 8,400,000 outputs: a 4.3 GB bf16 output from a 134 MB weight.
    "output tile": (dict(M=256, N=8_400_000), {}, "the output"),
    "residual tile": (dict(M=256, N=64), dict(residual=_strided(256, 64, 8_421_505)), "residual"),
    "gate": (dict(M=3, N=64), dict(residual=_strided(3, 64, 64), gate=_strided(3, 64, 2 ** 30)), "gate"),
}


@pytest.mark.parametrize("case", PAST_32_BITS)
def test_shapes_past_the_kernels_32_bit_offsets_are_refused(case):
    shape, epilogue, name = PAST_32_BITS[case]
    out_dtype = torch.float32 if epilogue else torch.bfloat16
    with pytest.raises(OpArgumentError, match=f"scaled_mm: {name} is too large for the triton kernel's 32-bit"):
        impl.scaled_mm(*_meta_operands(**shape), out_dtype=out_dtype, **epilogue)


def test_the_32_bit_offset_limits_are_the_last_elements_addressed():
    impl.check_offsets(2 ** 31 - 256, 16)
    impl.check_offsets(1, 2 ** 31 - 256)
    impl.check_offsets(2, 8_400_000)  # one row apart in a tile
    impl.check_offsets(256, 64, residual_stride=8_421_504)  # 255 · 8,421,504 + 63 = 2^31 - 1
    impl.check_offsets(3, 64, gate_stride=2 ** 30 - 32)
    impl.check_offsets(4, 64, gate_stride=2 ** 30, rows_per_batch=2)  # two gate rows read


@PLAIN
def test_int8_accumulation_is_exact():
    # |acc| <= 1000 · 128² < 2^24: the exact integer is representable in the fp32 output.
    xq, _, wq, _, _ = operands(70, 50, 1000, torch.int8, seed=7)
    ones_m, ones_n = torch.ones(70, device=DEVICE), torch.ones(50, device=DEVICE)
    out = scaled_mm(xq, ones_m, wq, ones_n, out_dtype=torch.float32, backend="triton")
    assert torch.equal(out, (xq.cpu().long() @ wq.cpu().long().t()).float().to(DEVICE))


@PLAIN
def test_strided_operands():
    """Operands with non-unit strides (views) give the same result as contiguous copies."""
    xq, xs, wq, ws, bias = operands(40, 30, 96, FP8, seed=11, bias_dtype=torch.float32)
    x_big = torch.zeros(40, 200, dtype=torch.uint8, device=DEVICE).view(FP8)
    x_big[:, 50:146] = xq  # row stride 200, a 50-column offset
    out = scaled_mm(x_big[:, 50:146], xs, wq, ws, bias, torch.float32, backend="triton")
    assert torch.equal(out, scaled_mm(xq, xs, wq, ws, bias, torch.float32, backend="triton"))
    out_t = scaled_mm(xq, xs, wq.t().contiguous().t(), ws, bias, torch.float32, backend="triton")  # K stride != 1
    assert torch.equal(out_t, out)


@PLAIN
@FUSED
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_strided_scales_bias_residual_and_gate(qdtype):
    """Scales, bias, residual and gate as views with non-unit strides (every other element of wider
    tensors): the kernels index them as contiguous, so the wrapper must copy them first. Same result as
    contiguous copies, and within budget against float64."""
    M, N, K = 77, 45, 61
    xq, xs, wq, ws, bias = operands(M, N, K, qdtype, seed=19, bias_dtype=torch.float32)
    residual, gate = residual_and_gate(M, N, 2, seed=20)

    def every_other(t):  # the same values, with stride 2 along the last dimension
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]

    views = [every_other(t) for t in (xs, ws, bias, residual, gate)]
    assert all(t.stride(-1) == 2 for t in views)
    xs_v, ws_v, bias_v, residual_v, gate_v = views
    plain = scaled_mm(xq, xs_v, wq, ws_v, bias_v, torch.bfloat16, backend="triton")
    assert torch.equal(plain, scaled_mm(xq, xs, wq, ws, bias, torch.bfloat16, backend="triton"))
    check_against_torch(xq, xs_v, wq, ws_v, bias_v, torch.bfloat16)
    fused = scaled_mm(xq, xs_v, wq, ws_v, bias_v, residual=residual_v, gate=gate_v, rows_per_batch=39,
                      backend="triton")
    assert torch.equal(fused, scaled_mm(xq, xs, wq, ws, bias, residual=residual, gate=gate, rows_per_batch=39,
                                        backend="triton"))
    check_against_torch(xq, xs_v, wq, ws_v, bias_v, torch.float32, residual=residual_v, gate=gate_v,
                        rows_per_batch=39)


# ----------------------------------------------------------------------------------------------------
# Fused epilogues
# ----------------------------------------------------------------------------------------------------

@FUSED
@pytest.mark.parametrize("M, N, K, out_dtype", [(*SMALL, torch.bfloat16), (*SMALL, torch.float16),
                                                (*SMALL, torch.float32), (*LARGE, torch.bfloat16)])
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_gelu_epilogue(M, N, K, out_dtype, qdtype):
    args = operands(M, N, K, qdtype, seed=M + 2 * N + K, bias_dtype=torch.float32)
    check_against_torch(*args, out_dtype, activation="gelu_tanh")


@FUSED
@pytest.mark.parametrize("M, N, K, batches, rows_per_batch, variant", [
    (*SMALL, 3, 26, "gate"),         # uneven: the last sample has 25 rows
    (*SMALL, 3, 26, "gate_gelu"),
    (*SMALL, 1, None, "no_gate"),
    (*LARGE, 3, None, "gate"),       # default rows_per_batch = M // B = 100
    (*LARGE, 2, None, "gate_gelu"),
])
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_residual_epilogue(M, N, K, batches, rows_per_batch, variant, qdtype):
    xq, xs, wq, ws, bias = operands(M, N, K, qdtype, seed=M + N + batches, bias_dtype=torch.bfloat16)
    residual, gate = residual_and_gate(M, N, batches, seed=M * N)
    epilogue = dict(residual=residual)
    if variant != "no_gate":
        epilogue.update(gate=gate, rows_per_batch=rows_per_batch)
    if variant == "gate_gelu":
        epilogue["activation"] = "gelu_tanh"
    check_against_torch(xq, xs, wq, ws, bias, torch.float32, **epilogue)
    # The residual itself is not modified.
    assert torch.equal(residual, residual_and_gate(M, N, batches, seed=M * N)[0])


@FUSED
def test_gate_rows_follow_rows_per_batch():
    """Each sample's rows use its own gate row: zero gates leave exactly the residual."""
    xq, xs, wq, ws, _ = operands(90, 40, 32, FP8, seed=5)
    residual, gate = residual_and_gate(90, 40, 3, seed=6)
    gate[1] = 0
    out = scaled_mm(xq, xs, wq, ws, residual=residual, gate=gate, rows_per_batch=30, backend="triton")
    assert torch.equal(out[30:60], residual[30:60])
    assert not torch.equal(out[:30], residual[:30]) and not torch.equal(out[60:], residual[60:])


# ----------------------------------------------------------------------------------------------------
# Other kernel configurations: the TMA persistent kernel, wide tiles with a sliced epilogue
# ----------------------------------------------------------------------------------------------------

needs_tma = pytest.mark.skipif(not impl.tma_available(torch.device(DEVICE)),
                               reason="tensor descriptors (TMA) not available here")


@PLAIN
@needs_tma
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_persistent_tma_kernel(qdtype, out_dtype):
    # 3 x 3 tiles over 3 programs (interpreter): each program loops over 3 tiles across groups.
    cfg = GemmConfig(64, 64, 64, 2, 4, 1, persistent=True) if interpreting() else \
        gemm_configs.TABLE[("sm_90", qname(qdtype), "large")]
    args = operands(150, 130, 144, qdtype, seed=208, bias_dtype=torch.float32)
    check_against_torch(*args, out_dtype, config=cfg)


@PLAIN
@needs_tma
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_hopper_table_tiles_with_a_k_tail(qdtype):
    # The sm_90 "large" entries as they are (the promoted FP8 one 256 deep in K, and FP8's fast
    # accumulation tiles), on a K that ends part way into a K tile: the descriptors' zero fill must
    # leave the sums exact.
    configs = [gemm_configs.TABLE[("sm_90", qname(qdtype), "large")]]
    if qdtype == FP8:
        configs.append(gemm_configs.FAST_ACCUMULATION["sm_90"])
    for cfg in configs:
        check_against_torch(*operands(150, 300, 600, qdtype, seed=211, bias_dtype=torch.float32), torch.bfloat16,
                            config=cfg)


@PLAIN
@FUSED
@needs_tma
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_persistent_tma_store(qdtype):
    """tma_store: the output written through a descriptor, one per epilogue slice (64-column tiles: 2
    slices with a residual). M = 150 ends part way into a tile (the descriptor leaves out the rows past
    it); N = 136 too, a multiple of 8 as a bf16 descriptor needs. N = 130 cannot be described (rows of 260
    bytes, not a multiple of 16): the kernel stores through pointers then."""
    cfg = GemmConfig(64, 64, 64, 2, 4, 1, persistent=True, tma_store=True)
    for n in (136, 130):
        xq, xs, wq, ws, bias = operands(150, n, 144, qdtype, seed=212 + n, bias_dtype=torch.float32)
        check_against_torch(xq, xs, wq, ws, bias, torch.bfloat16, config=cfg)
        check_against_torch(xq, xs, wq, ws, bias, torch.bfloat16, config=cfg, activation="gelu_tanh")
        residual, gate = residual_and_gate(150, n, 3, seed=213 + n)
        check_against_torch(xq, xs, wq, ws, bias, torch.float32, config=cfg, residual=residual, gate=gate)


@FUSED
@needs_tma
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_persistent_tma_kernel_fused(qdtype):
    cfg = GemmConfig(64, 64, 64, 2, 4, 1, persistent=True) if interpreting() else \
        gemm_configs.TABLE[("sm_90", qname(qdtype), "large")]
    xq, xs, wq, ws, bias = operands(150, 130, 144, qdtype, seed=209, bias_dtype=torch.float32)
    residual, gate = residual_and_gate(150, 130, 3, seed=210)
    check_against_torch(xq, xs, wq, ws, bias, torch.float32, config=cfg, residual=residual, gate=gate,
                        activation="gelu_tanh")
    check_against_torch(xq, xs, wq, ws, bias, torch.bfloat16, config=cfg, activation="gelu_tanh")


@PLAIN
@FUSED
@pytest.mark.parametrize("split_case", ["plain_2_slices", "residual_4_slices"])
def test_wide_tile_sliced_epilogue(split_case):
    """128-column tiles: the epilogue runs in 2 (plain) or 4 (with residual) column slices."""
    cfg = GemmConfig(64, 128, 64, 2, 4, 1)
    residual = split_case.startswith("residual")
    assert gemm_configs.epilogue_split(cfg, residual) == (4 if residual else 2)
    xq, xs, wq, ws, bias = operands(100, 300, 64, torch.int8, seed=12, bias_dtype=torch.float32)
    if residual:
        res, gate = residual_and_gate(100, 300, 2, seed=13)
        check_against_torch(xq, xs, wq, ws, bias, torch.float32, config=cfg, residual=res, gate=gate)
    else:
        check_against_torch(xq, xs, wq, ws, bias, torch.bfloat16, config=cfg)


@PLAIN
@pytest.mark.parametrize("promote", [None, 32])
def test_fp8_promoted_accumulation_runs(promote):
    """fp8_promote (max_num_imprecise_acc) changes only Hopper's accumulation; the result stays within
    budget wherever it runs."""
    cfg = GemmConfig(64, 64, 64, 2, 4, 1, fp8_promote=promote)
    check_against_torch(*operands(77, 70, 200, FP8, seed=14), torch.float32, config=cfg)


@PLAIN
@pytest.mark.parametrize("K", [256, 200, 150], ids=["even", "tail", "odd_tiles"])
def test_fp8_split_accumulation(K):
    """Two accumulators alternating by K tile (fp8_accumulators=2): K a multiple of both tiles (no
    masks), a K tail in the odd accumulator's last tile, and an odd number of K tiles, whose last
    step's second tile lies wholly past K and must add nothing."""
    cfg = GemmConfig(64, 64, 64, 2, 4, 1, fp8_accumulators=2)
    check_against_torch(*operands(77, 70, K, FP8, seed=15, bias_dtype=torch.float32), torch.float32, config=cfg)


@PLAIN
@needs_tma
def test_fp8_split_accumulation_persistent():
    # 3 K tiles of 64: the last step's second descriptor load starts past K and reads zeros.
    cfg = GemmConfig(64, 64, 64, 2, 4, 1, persistent=True, fp8_accumulators=2)
    check_against_torch(*operands(150, 130, 144, FP8, seed=16, bias_dtype=torch.float32), torch.bfloat16,
                        config=cfg)


# ----------------------------------------------------------------------------------------------------
# Argument errors
# ----------------------------------------------------------------------------------------------------

def test_fused_argument_errors():
    xq, xs, wq, ws, bias = operands(6, 5, 16, FP8, seed=1, bias_dtype=torch.float32)
    residual, gate = residual_and_gate(6, 5, 2, seed=2)
    cases = [
        (dict(activation="relu"), "activation must be None or one of"),
        (dict(gate=gate), "gate and rows_per_batch need a residual"),
        (dict(rows_per_batch=3), "gate and rows_per_batch need a residual"),
        (dict(residual=residual.double()), "residual has dtype"),
        (dict(residual=residual.bfloat16()), "residual has dtype"),
        (dict(residual=residual[:5]), "residual has shape"),
        (dict(residual=residual[None]), "residual has shape"),
        (dict(residual=residual.to("meta")), "residual is on meta"),
        (dict(residual=residual, out_dtype=torch.bfloat16), "out_dtype must be torch.float32"),
        (dict(residual=residual, rows_per_batch=3), "rows_per_batch needs a gate"),
        (dict(residual=residual, gate=gate[:, :4]), "gate has shape"),
        (dict(residual=residual, gate=gate[0]), "gate must have 2 dimensions"),
        (dict(residual=residual, gate=gate.half()), "gate has dtype"),
        (dict(residual=residual, gate=gate.to("meta")), "gate is on meta"),
        (dict(residual=residual, gate=torch.ones(4, 5, device=DEVICE)), "do not divide"),
        (dict(residual=residual, gate=gate, rows_per_batch=2), "need 3 gate rows, gate has 2"),
        (dict(residual=residual, gate=gate, rows_per_batch=0), "rows_per_batch must be a positive int"),
        (dict(residual=residual, gate=gate, rows_per_batch=2.5), "rows_per_batch must be a positive int"),
        (dict(wq=wq.to(torch.int8)), "must have the same dtype"),
        (dict(x_scale=xs[:3]), "x_scale has shape"),
    ]
    for override, message in cases:
        args = dict(xq=xq, x_scale=xs, wq=wq, w_scale=ws, bias=bias)
        args.update(override)
        for backend in ("torch", "triton"):
            with pytest.raises(OpArgumentError, match=message):
                scaled_mm(**args, backend=backend)


@PLAIN
def test_rows_per_batch_past_the_rows_is_one_batch():
    """Any rows_per_batch >= M puts every row in batch 0, however large (past the kernels' 64-bit integers)."""
    xq, xs, wq, ws, _ = operands(6, 16, 32, FP8, seed=8, bias_dtype=None)
    residual, gate = residual_and_gate(6, 16, 1, seed=9)
    for backend in ("torch", "triton"):
        expected = scaled_mm(xq, xs, wq, ws, residual=residual, gate=gate, rows_per_batch=6, backend=backend)
        got = scaled_mm(xq, xs, wq, ws, residual=residual, gate=gate, rows_per_batch=2 ** 70, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@PLAIN
def test_default_out_dtype_and_plain_contract():
    xq, xs, wq, ws, bias = operands(8, 16, 32, FP8, seed=4, bias_dtype=torch.float32)
    residual, _ = residual_and_gate(8, 16, 1, seed=5)
    assert scaled_mm(xq, xs, wq, ws, bias, backend="triton").dtype == torch.bfloat16
    assert scaled_mm(xq, xs, wq, ws, bias, residual=residual, backend="triton").dtype == torch.float32
    # The contract's positional form: (xq, x_scale, wq, w_scale, bias, out_dtype).
    assert scaled_mm(xq, xs, wq, ws, bias, torch.float16, backend="triton").dtype == torch.float16


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU: the interpreter is what runs the triton backend")
def test_auto_backend_on_cpu_is_the_reference():
    xq, xs, wq, ws, _ = operands(4, 4, 16, FP8, seed=8)
    assert torch.equal(scaled_mm(xq, xs, wq, ws), scaled_mm(xq, xs, wq, ws, backend="torch"))
    with pytest.raises(BackendError):
        scaled_mm(xq, xs, wq, ws, backend="cuda")


# ----------------------------------------------------------------------------------------------------
# torch.compile and the torch.library op
# ----------------------------------------------------------------------------------------------------

def test_the_gemm_op_passes_opcheck():
    """dit8::scaled_mm_triton: schema, fake implementation (shape, dtype, strides, device of the real
    output), no mutated input, for the plain GEMM and each epilogue."""
    M, N, K = 9, 24, 32
    for qdtype in QDTYPES:
        xq, xs, wq, ws, bias = operands(M, N, K, qdtype, seed=40, bias_dtype=torch.bfloat16)
        residual, gate = residual_and_gate(M, N, 3, seed=41)
        # (opcheck's schema test compares inputs before and after with a multiplication, which torch
        # has no float8_e4m3fn kernel for: the int8 operands run it, the fp8 ones the rest.)
        utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        utils = utils[qdtype == FP8:]

        def check(*args):
            torch.library.opcheck(torch.ops.dit8.scaled_mm_triton.default, args, test_utils=utils)

        for out_dtype in OUT_DTYPES:
            check(xq, xs, wq, ws, bias, out_dtype, None, None, None, 1)
        check(xq, xs, wq, ws, None, torch.float32, "gelu_tanh", None, None, 1)
        check(xq, xs, wq, ws, bias, torch.float32, None, residual, gate, 3)
        check(xq[:, :K - 1], xs, wq[:, :K - 1], ws, None, torch.float32, None, residual.t().contiguous().t(), None, 1)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_torch_compile_traces_the_gemm_whole(qdtype):
    """torch.compile(fullgraph=True) takes the Triton GEMM as one op with a fake implementation: the
    launch wrapper (its configuration lookup, the TMA checks that read data pointers, the autotuner)
    and the kernel launch are not traced. Results equal eager's; a second token count runs too."""
    N, K = 24, 32
    _, _, wq, ws, bias = operands(1, N, K, qdtype, seed=42, bias_dtype=torch.float32)

    def step(xq, xs, residual):
        y = scaled_mm(xq, xs, wq, ws, bias, torch.bfloat16, backend="triton")
        return y, scaled_mm(xq, xs, wq, ws, None, activation="gelu_tanh", residual=residual, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for M in (9, 13):
        xq, xs, _, _, _ = operands(M, N, K, qdtype, seed=43 + M)
        residual, _ = residual_and_gate(M, N, 1, seed=44 + M)
        for a, b in zip(compiled(xq, xs, residual), step(xq, xs, residual)):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# The config table (pure Python)
# ----------------------------------------------------------------------------------------------------

def test_config_table_is_consistent():
    for (arch, kind, cls), cfg in gemm_configs.TABLE.items():
        assert arch in gemm_configs.ARCHS and kind in gemm_configs.KINDS and cls in ("large", "small")
        for v in (cfg.block_m, cfg.block_n, cfg.block_k):
            assert v >= 16 and v & (v - 1) == 0, cfg
        assert cfg.block_k >= 32  # FP8 / INT8 MMA instructions take K = 32 per step
        assert cfg.pipeline_bytes() <= gemm_configs.SHARED_MEMORY_LIMIT[arch], cfg
        assert not cfg.persistent or arch == "sm_90", "TMA kernel entries are Hopper-only"
        if cfg.fp8_promote is not None:  # a second accumulator tile: 128 x 128 on 8 warps at most
            assert kind == "fp8" and cfg.block_m * cfg.block_n <= 128 * 128 * cfg.num_warps // 8
    for cfg in gemm_configs.HOPPER_SWEEP:
        assert cfg.pipeline_bytes() <= gemm_configs.SHARED_MEMORY_LIMIT["sm_90"], cfg
        assert cfg.fp8_accumulators in (1, 2) and (cfg.fp8_accumulators == 1 or cfg.fp8_promote is None), cfg
    assert ("sm_80", "fp8", "large") not in gemm_configs.TABLE  # A100: no FP8 tensor cores
    assert gemm_configs.shape_class(32760, 5120) == "large"
    assert gemm_configs.shape_class(32760, 13824) == "large"
    assert gemm_configs.shape_class(512, 5120) == "small"
    assert gemm_configs.arch_name((9, 0)) == "sm_90" and gemm_configs.arch_name((12, 0)) is None
    assert gemm_configs.table_config(None, "fp8", 32760, 5120, 5120) is None  # unknown GPU: autotune
    # Hopper FP8: fast accumulation for large outputs up to FAST_ACCUMULATION_MAX_K, promoted beyond.
    fast, table = gemm_configs.FAST_ACCUMULATION["sm_90"], gemm_configs.TABLE
    assert fast.fp8_promote is None and fast.persistent
    assert fast.pipeline_bytes() <= gemm_configs.SHARED_MEMORY_LIMIT["sm_90"]
    assert gemm_configs.table_config("sm_90", "fp8", 32760, 13824, 5120) == fast
    assert gemm_configs.table_config("sm_90", "fp8", 32760, 5120, 13824) == table[("sm_90", "fp8", "large")]
    assert gemm_configs.table_config("sm_90", "fp8", 512, 5120, 4096) == table[("sm_90", "fp8", "small")]
    assert gemm_configs.table_config("sm_90", "int8", 32760, 5120, 5120) == table[("sm_90", "int8", "large")]
    assert gemm_configs.table_config("sm_89", "fp8", 32760, 5120, 5120) == table[("sm_89", "fp8", "large")]
    # The boundaries: four waves of 128 x 256 tiles on 132 SMs are "large"; K = FAST_ACCUMULATION_MAX_K is fast.
    four_waves = 4 * 132 * 128
    assert gemm_configs.shape_class(four_waves, 256) == "large"
    assert gemm_configs.shape_class(four_waves - 128, 256) == "small"
    K = gemm_configs.FAST_ACCUMULATION_MAX_K
    assert gemm_configs.table_config("sm_90", "fp8", 32760, 5120, K) == fast
    assert gemm_configs.table_config("sm_90", "fp8", 32760, 5120, K + 1) == table[("sm_90", "fp8", "large")]
    # Promotion every fp8_promote products, at most every K tile (tl.dot's max_num_imprecise_acc).
    deep = GemmConfig(128, 128, 64, 8, 8, 3, fp8_promote=128)
    assert impl.accumulation(deep, False, promotes=True) == (64, 1)
    assert impl.accumulation(deep, False, promotes=False) == (None, 1)
    if DEVICE == "cpu":
        assert impl.pick_config("fp8", 32760, 5120, 5120, torch.device("cpu")) == gemm_configs.INTERPRETER


# ----------------------------------------------------------------------------------------------------
# GPU only: Wan2.1 shapes against float64 and against cuBLAS
# ----------------------------------------------------------------------------------------------------

def cublas_result(xq, xs, wq, ws, out_dtype, fast_accum=False):
    """The cuBLAS result the issue compares with: torch._scaled_mm with row-wise scales (FP8), or
    torch._int_mm followed by the dequantization in fp32 (INT8). An fp32 FP8 result takes unit
    tensor-wise scales and the dequantization after: not every torch build offers row-wise scaling
    with fp32 output."""
    if xq.dtype == FP8 and out_dtype == torch.float32:
        return fp8_tensor_core_product(xq, wq, fast_accum) * xs[:, None] * ws[None, :]
    if xq.dtype == FP8:
        return torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return (torch._int_mm(xq, wq.t()).float() * xs[:, None] * ws[None, :]).to(out_dtype)


def quantized_operands(M, N, K, qdtype, seed):
    if qdtype == FP8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K)
    xq, xs = quantize_per_token(x, qdtype, backend="torch")
    wq, ws = quantize_per_token(w, qdtype, backend="torch")
    return xq, xs, wq, ws


@PLAIN
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M, N, K", [(77, 5120, 5120), (1000, 5120, 5120), (1000, 5008, 4112)] + [
    # The float64 references at Wan's shapes take 10-12 GB each: one at a time under pytest-xdist.
    pytest.param(*shape, marks=pytest.mark.xdist_group("wan_shapes")) for shape in
    [(32760, 5120, 5120), (32760, 13824, 5120)]])
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
def test_gpu_error_within_twice_cublas(M, N, K, qdtype):
    xq, xs, wq, ws = quantized_operands(M, N, K, qdtype, seed=M + N + K)
    ref = reference64(xq, xs, wq, ws)
    out = scaled_mm(xq, xs, wq, ws, out_dtype=torch.bfloat16, backend="triton")
    check_output(out, (M, N), torch.bfloat16)
    err, err_cublas = rel_err(out, ref), rel_err(cublas_result(xq, xs, wq, ws, torch.bfloat16), ref)
    print(f"\n{qname(qdtype)} {M}x{N}x{K}: triton {err:.3e}, cuBLAS {err_cublas:.3e}, ratio {err / err_cublas:.2f}")
    assert err <= 2 * err_cublas, (err, err_cublas)


@PLAIN
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_gpu_fast_accumulation_within_twice_cublas_fast(out_dtype):
    """Triton's default FP8 accumulation (no promotion) against cuBLAS's use_fast_accum=True."""
    xq, xs, wq, ws = quantized_operands(4096, 5120, 5120, FP8, seed=5)
    ref = reference64(xq, xs, wq, ws)
    cfg = GemmConfig(128, 256, 128, 8, 8, 3)
    out = impl.scaled_mm(xq, xs, wq, ws, None, out_dtype, config=cfg)
    err, err_fast = rel_err(out, ref), rel_err(cublas_result(xq, xs, wq, ws, out_dtype, fast_accum=True), ref)
    err_default = rel_err(cublas_result(xq, xs, wq, ws, out_dtype), ref)
    print(f"\nfast accumulation {out_dtype}: triton {err:.3e}, cuBLAS fast {err_fast:.3e}, "
          f"cuBLAS default {err_default:.3e}")
    assert err <= 2 * err_fast, (err, err_fast)


# ----------------------------------------------------------------------------------------------------
# Without a GPU: compile every table entry for its GPU, which the interpreter never does
# (tests/compile_check.py). ~1-5 s per kernel variant on a small CPU, so opt-in:
#     DIT8_GEMM_COMPILE=1 python -m pytest tests/test_scaled_mm_triton.py -k compile
# ----------------------------------------------------------------------------------------------------

EPILOGUES = ("plain", "gelu", "residual")


def compile_for_target(arch: str, kind: str, cfg: GemmConfig, epilogue: str) -> dict:
    """Compile the kernel `cfg` selects for `arch` ("sm_90", "sm_89", "sm_80") with the given epilogue,
    as the JIT would specialize it for the Wan shapes (N, K and strides multiples of 16); the report of
    compile_check.compile_kernel. Must run without TRITON_INTERPRET."""
    from compile_check import compile_kernel

    cap = {"sm_90": 90, "sm_89": 89, "sm_80": 80}[arch]
    code = "fp8e4nv" if kind == "fp8" else "i8"
    residual = epilogue == "residual"
    persistent = cfg.persistent and cap >= 90
    kernel = impl._scaled_mm_persistent_kernel if persistent else impl._scaled_mm_kernel
    split = gemm_configs.epilogue_split(cfg, residual)
    out = "fp32" if residual else "bf16"
    tma_store = persistent and cfg.tma_store
    types = dict(X="*" + code, W="*" + code, XS="*fp32", WS="*fp32", Bias="*bf16", Res="*fp32", Gate="*fp32",
                 Out=f"tensordesc<{out}[{cfg.block_m}, {cfg.block_n // split}]>" if tma_store else "*" + out,
                 x_desc=f"tensordesc<{code}[{cfg.block_m}, {cfg.block_k}]>",
                 w_desc=f"tensordesc<{code}[{cfg.block_n}, {cfg.block_k}]>")
    promote, accumulators = impl.accumulation(cfg, kind == "int8", promotes=cap == 90)
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                      IS_INT8=kind == "int8", FP8_PROMOTE=promote, ACCUMULATORS=accumulators,
                      EPILOGUE_SPLIT=split, HAS_BIAS=True, ACTIVATION=int(epilogue == "gelu"),
                      HAS_RESIDUAL=residual, HAS_GATE=residual, ROUND_BF16=False, NUM_PROGRAMS=132, EVEN_K=True,
                      TMA_STORE=tma_store)
    constexprs = {n: v for n, v in constexprs.items() if n in kernel.arg_names}
    aligned = {"N", "K", "stride_xm", "stride_wn", "stride_om", "stride_rm", "stride_gb"}
    return compile_kernel(kernel, types, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                          arch=cap, aligned=aligned)


def table_entries() -> dict[tuple[str, str, str], GemmConfig]:
    """Every committed configuration by (arch, kind, class): the table's, and the FP8 fast-accumulation
    entries as class "fast"."""
    return gemm_configs.TABLE | {(arch, "fp8", "fast"): cfg for arch, cfg in gemm_configs.FAST_ACCUMULATION.items()}


def compile_table() -> dict:
    """compile_for_target for every committed entry and epilogue: {"arch kind class epilogue": result}."""
    return {f"{arch} {kind} {cls} {epi}": compile_for_target(arch, kind, cfg, epi)
            for (arch, kind, cls), cfg in table_entries().items() for epi in EPILOGUES}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("DIT8_GEMM_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_GEMM_COMPILE=1")
def test_table_configs_compile():
    from compile_check import run_without_interpreter

    results = run_without_interpreter("test_scaled_mm_triton", "compile_table")
    for key, r in results.items():
        arch, kind, cls, epi = key.split()
        cfg = table_entries()[(arch, kind, cls)]
        assert r["shared"] <= gemm_configs.SHARED_MEMORY_LIMIT[arch], (key, r)
        assert r["registers"] > 0, (key, r)  # ptxas accepted the PTX
        assert r["wgmma"] == (arch == "sm_90") and not r["wgmma_serialized"], (key, r)
        assert r["tma"] == (cfg.persistent and arch == "sm_90"), (key, r)
        # No spills, except the one measured and accepted in gemm_configs (sm_80 128 x 256 residual).
        if not (arch == "sm_80" and cls == "large" and epi == "residual"):
            assert r["spills"] == 0, (key, r)


def compile_hopper_sweep() -> dict:
    """compile_for_target of every HOPPER_SWEEP entry, for both kinds where the entry applies to INT8 (no
    FP8 accumulation setting), with every epilogue: {"config kind epilogue": result}."""
    return {f"{cfg.name()} {kind} {epi}": compile_for_target("sm_90", kind, cfg, epi)
            for cfg in gemm_configs.HOPPER_SWEEP for kind in gemm_configs.KINDS
            if kind == "fp8" or (cfg.fp8_promote is None and cfg.fp8_accumulators == 1) for epi in EPILOGUES}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("DIT8_GEMM_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_GEMM_COMPILE=1")
def test_hopper_sweep_candidates_compile():
    """Every candidate the sweep times fits the shared memory, spills nothing and keeps its wgmma
    asynchronous: ptxas serializes every wgmma when a non-wgmma instruction writes an accumulator inside
    the pipeline (as the flattened persistent loop did with two accumulators), which would make a
    candidate slow for a reason a sweep would not show. ~2 minutes on the 2-core CPU."""
    from compile_check import run_without_interpreter

    results = run_without_interpreter("test_scaled_mm_triton", "compile_hopper_sweep")
    assert len(results) >= 3 * len(gemm_configs.HOPPER_SWEEP), results.keys()
    for key, r in results.items():
        assert r["shared"] <= gemm_configs.SHARED_MEMORY_LIMIT["sm_90"], (key, r)
        assert r["wgmma"] and not r["wgmma_serialized"] and r["spills"] == 0, (key, r)
        assert r["tma"] == ("tma_persistent" in key), (key, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M, N, K", [(1000, 520, 1032), (16, 520, 1032), (1000, 520, 1030)],
                         ids=["int_mm", "few_rows", "odd_k"])
def test_gpu_int8_reference_sums_exactly(M, N, K):
    """The torch reference's INT8 GEMM on CUDA (cuBLAS's integer GEMM where it takes the operands, float64
    where not) gives the CPU reference's exact sums: the same output bit for bit."""
    operands = random_w8a8_operands(M, N, K, torch.int8, seed=M + K)
    want = scaled_mm(*operands, out_dtype=torch.float32, backend="torch")
    got = scaled_mm(*(t.cuda() for t in operands), out_dtype=torch.float32, backend="torch")
    assert torch.equal(got.cpu(), want)


def test_fp8_tensor_cores_by_gpu_generation(monkeypatch):
    """"auto" sends FP8 GEMMs to the torch reference on GPUs without FP8 tensor cores (sm_80, sm_86)."""
    from dit8.kernels import registry

    cuda = torch.device("cuda", 0)
    for capability, has in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((12, 0), True)):
        monkeypatch.setattr(registry, "_capability", lambda device, c=capability: c)
        assert registry.has_fp8_tensor_cores(cuda) is has
    assert registry.has_fp8_tensor_cores(torch.device("cpu"))


def _listed_configs() -> list[GemmConfig]:
    """Every configuration a GPU may run: the table's, fast accumulation's, the autotuner's and the sweep's."""
    listed = [*gemm_configs.TABLE.values(), *gemm_configs.FAST_ACCUMULATION.values(), *gemm_configs.CANDIDATES,
              *gemm_configs.HOPPER_SWEEP]
    return list(dict.fromkeys(listed))


@PLAIN
@pytest.mark.parametrize("qdtype", QDTYPES, ids=qname)
@pytest.mark.parametrize("cfg", _listed_configs(), ids=GemmConfig.name)
def test_every_listed_config(cfg, qdtype):
    """Each listed tile on a problem that is no multiple of it in M, N or K, against float64: the autotuner
    and the sweeps choose among them by time alone."""
    if cfg.persistent and not impl.tma_available(torch.device(DEVICE)):
        pytest.skip("a persistent (TMA) configuration; tensor descriptors are not available here")
    if DEVICE == "cuda" and cfg.pipeline_bytes() > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
        pytest.skip(f"{cfg.name()} needs more shared memory than this GPU's blocks may take")
    check_against_torch(*operands(150, 300, 200, qdtype, seed=217, bias_dtype=torch.float32), torch.bfloat16,
                        config=cfg)


def test_autotuned_tiles_are_kept_per_epilogue(monkeypatch):
    """On a GPU the table does not know, a tile timed for the plain GEMM is not reused for a fused epilogue,
    whose registers may make it spill: each (problem, epilogue) is timed on its own."""
    monkeypatch.setattr(impl, "_capability", lambda device: (8, 6))  # no table entries (an RTX 30xx)
    monkeypatch.setattr(impl, "_TUNED", {})
    cuda = torch.device("cuda", 0)
    tile = GemmConfig(128, 256, 64, 8, 8, 3)
    impl._TUNED[impl._tune_key((8, 6), "int8", 4096, 5120, 5120, "")] = tile
    assert impl.pick_config("int8", 4096, 5120, 5120, cuda) is tile
    residual, gate = torch.zeros(1), torch.zeros(1)
    for epilogue in (impl.epilogue_name(None, residual, None), impl.epilogue_name(None, residual, gate),
                     impl.epilogue_name("gelu_tanh", None, None)):
        assert impl.pick_config("int8", 4096, 5120, 5120, cuda, epilogue) is None
