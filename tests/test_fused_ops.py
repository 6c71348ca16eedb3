"""The fused memory-bound ops against float64 references: per-token quantization, GELU + quantization,
LayerNorm (+ modulation / affine, + quantization), RMSNorm, q/k RMSNorm + RoPE (+ quantization), the
gated residual add.

Backends: the torch reference always; Triton in the interpreter on CPU tensors (small shapes); on a GPU
(`gpu` marker) Triton and the CUDA extension on CUDA tensors, larger shapes, and CUDA against Triton.
Every input is fresh random data; outputs are poisoned (NaN / int minimum) before the kernels write.

Tolerances:
- float outputs: the kernel's relative error against float64 is at most twice the torch reference op's
  error in the same output dtype, plus 4·2^-24 for fp32-rounding-order differences (fp32 outputs);
- quantize_per_token / gelu-free codes: bit-exact with the torch reference (both get the IEEE fp32
  quotient, the kernels on a GPU from the reciprocal and one FMA correction, and round half to even; the
  interpreter kernels pre-round so its conversions are exact too);
- codes after a norm or GELU: the fp32 values the kernel quantizes differ from the reference's by a few
  ulps (GELU: the kernels' x·sigmoid form with the hardware exp2 against torch's tanh),
  so a code may land one step away where the value sits on a rounding boundary: every code is within
  one step of the reference's, at least 99% are equal, and the dequantized values are within half a
  quantization step (plus the fp32 error of the norm) of the float64 result.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from dit8.kernels import OpArgumentError
from dit8.kernels import fused_spec, fused_triton
from dit8.kernels.norm_quant import layer_norm_modulate_quant, layer_norm_quant
from dit8.kernels.elementwise import residual_add
from dit8.kernels.norms import layer_norm, layer_norm_modulate, rms_norm
from dit8.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_quant
from dit8.kernels.quantize import QMAX, SCALE_FLOOR, gelu_tanh_quant, quantize_per_token
from dit8.kernels.triton_support import interpreting
from dit8.rope import rope_axis_widths, rope_table

FP8 = torch.float8_e4m3fn
QDTYPES = (torch.int8, FP8)
U32 = 2.0 ** -24
CUDA = torch.cuda.is_available()
GPU = pytest.mark.gpu
# The q/k tests at Wan's shape hold float64 references of 11-16 GB: under pytest-xdist they run on one
# worker, one at a time, so that several of them do not exhaust the GPU together.
WAN_SHAPES = pytest.mark.xdist_group("wan_shapes_qk")

# (backend, device): Triton in the interpreter here; on a GPU machine both kernel backends on CUDA.
KERNELS = [pytest.param("triton", "cpu", id="triton-interp", marks=pytest.mark.skipif(
    not interpreting(), reason="Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1)"))]
if CUDA:
    KERNELS += [pytest.param("triton", "cuda", id="triton-cuda", marks=GPU),
                pytest.param("cuda", "cuda", id="cuda", marks=GPU)]


def _gen(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, seed, device="cpu", dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=_gen(seed, device), device=device) * scale + offset).to(dtype)


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ (the absolute norm where b is all zero, e.g. the LayerNorm of one channel)."""
    diff = (a.double() - b.double()).norm()
    ref = b.double().norm()
    return (diff / ref if ref > 0 else diff).item()


def float_bound(ref_err: float, out_dtype: torch.dtype) -> float:
    return 2 * ref_err + (4 * U32 if out_dtype == torch.float32 else 0.0)


def big(device: str) -> bool:
    return device == "cuda"


# ----------------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------------

def ln64(x, weight=None, bias=None, shift=None, scale=None, eps=1e-6):
    x = x.double()
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    if shift is not None:
        y = y * (1 + scale.double()[:, None, :]) + shift.double()[:, None, :]
    return y


def rms64(x, weight, eps=1e-6):
    x = x.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight.double()


def angles64(grid, head_dim):
    """[L, head_dim/2] rotation angles in float64 from the patch grid, as the official code builds them."""
    per_axis = []
    for size, width in zip(grid, rope_axis_widths(head_dim)):
        inv = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
        per_axis.append(torch.arange(size, dtype=torch.float64)[:, None] * inv)
    f, h, w = grid
    return torch.cat([per_axis[0][:, None, None].expand(f, h, w, -1), per_axis[1][None, :, None].expand(f, h, w, -1),
                      per_axis[2][None, None, :].expand(f, h, w, -1)], -1).reshape(f * h * w, head_dim // 2)


def rope64(x, angles):
    """Interleaved pairs as complex numbers times e^{i·angle}: x [B, L, H, D] float64."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None, :]).flatten(-2)


# ----------------------------------------------------------------------------------------------------
# quantized-output checks
# ----------------------------------------------------------------------------------------------------

def fp8_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values around |v| (float64): 2^(e-3), subnormal spacing 2^-9 below 2^-6."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -6)))
    return torch.pow(2.0, e - 3)


def check_codes(q, scale, want64, ref_q, ref_scale, qdtype):
    """q/scale: kernel; want64: float64 values [rows..., n]; ref_q/ref_scale: torch reference op."""
    qmax = QMAX[qdtype]
    assert q.dtype == qdtype and q.shape == ref_q.shape and scale.shape == ref_scale.shape
    assert not torch.isnan(scale).any() and not torch.isnan(q.float()).any()
    s = scale.double()
    amax64 = want64.abs().amax(-1).clamp_min(SCALE_FLOOR)
    # The scale comes from fp32 values that carry the norm's rounding: statistics summed in fp32 over
    # up to 13,824 channels, whose error grows as √C·2^-24 (about 7e-6 at that width; on the CPU's
    # narrow rows a few ulps). The bound is set for the GPU's widths; the codes below are held tighter.
    torch.testing.assert_close(s, amax64 / qmax, rtol=1e-5, atol=0)
    codes, ref_codes = q.double(), ref_q.double()
    assert codes.abs().max() <= qmax
    # Dequantized error: half a step of the code grid, plus the fp32 error of the values (1e-5·amax).
    y = want64 / s[..., None]
    half_step = 0.5 if qdtype == torch.int8 else 0.5 * fp8_step(y)
    assert ((codes - y).abs() <= half_step + 1e-5 * qmax + 1e-9).all()
    # Agreement with the reference op: within one step everywhere, equal almost everywhere.
    if qdtype == torch.int8:
        assert (codes - ref_codes).abs().max() <= 1
    else:
        assert ((codes - ref_codes).abs() <= fp8_step(torch.maximum(codes.abs(), ref_codes.abs())) + 1e-12).all()
    assert (codes == ref_codes).double().mean() >= 0.99


# ----------------------------------------------------------------------------------------------------
# quantize_per_token, gelu_tanh_quant
# ----------------------------------------------------------------------------------------------------

def test_row_tiles_cover_the_row_with_little_padding():
    # The tests' widths take every case: exact (96 = 64 + 32, Wan's 5120 = 4096 + 1024), a masked tail
    # (200 = 128 + 128), no tail (1, 4096).
    assert fused_triton.row_tiles(5120) == (4096, 1024) and fused_triton.row_tiles(96) == (64, 32)
    assert fused_triton.row_tiles(200) == (128, 128) and fused_triton.row_tiles(1) == (1, 0)
    for C in range(1, 20000, 7):
        head, tail = fused_triton.row_tiles(C)
        assert head <= C <= head + tail <= triton.next_power_of_2(C)
    # 4 to 16 warps, never 32 (fused_triton._num_warps): GELU's 16,384-wide tiles stay at 16.
    assert fused_triton._num_warps(1) == 4 and fused_triton._num_warps(16384) == 16


@pytest.mark.parametrize("backend, device", KERNELS)
def test_modulated_norms_of_an_empty_sequence(backend, device):
    """x [B, 0, C]: no rows, so an empty result (the kernels' rows_per_batch stays positive)."""
    x = torch.zeros(2, 0, 8, device=device)
    shift, scale = randn((2, 8), 1300, device), randn((2, 8), 1301, device)
    assert layer_norm_modulate(x, shift, scale, eps=1e-6, backend=backend).shape == (2, 0, 8)
    q, s = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=torch.int8, backend=backend)
    assert q.shape == (2, 0, 8) and s.shape == (2, 0)


@pytest.mark.verifies("quantize_per_token")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_quantize_per_token_is_bit_exact(backend, device, qdtype, xdtype):
    shapes = [(37, 200), (5, 96), (3, 1)] + ([(4099, 5120), (333, 13824)] if big(device) else [])
    for i, (M, K) in enumerate(shapes):
        # Rows of very different magnitudes, one all-zero row (padding tokens), ties for int8 (k + 0.5).
        x = randn((M, K), seed=100 + i, device=device) * torch.logspace(-3, 3, M, device=device)[:, None]
        x[M // 2] = 0
        x = x.to(xdtype)
        q, s = quantize_per_token(x, qdtype, backend=backend)
        rq, rs = quantize_per_token(x, qdtype, backend="torch")
        assert torch.equal(s, rs), (M, K)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), (M, K)
        assert s[M // 2] == SCALE_FLOOR / QMAX[qdtype] and (q[M // 2].float() == 0).all()


@pytest.mark.verifies("quantize_per_token")
@pytest.mark.parametrize("backend, device", KERNELS)
def test_fp8_codes_keep_the_sign_of_zero(backend, device):
    # Negative values that round to zero are -0 (code 0x80), as torch's cast makes them; a NaN row gets a
    # NaN scale (its codes are the cast's business: NaN on a GPU, not in the interpreter).
    x = torch.tensor([[-1e-4, 400.0, -0.0, 1e-4, -3e-3], [float("nan"), 1.0, -2.0, 0.0, 3.0]], device=device)
    q, s = quantize_per_token(x, torch.float8_e4m3fn, backend=backend)
    rq, rs = quantize_per_token(x, torch.float8_e4m3fn, backend="torch")
    assert torch.equal(q[0].view(torch.uint8), rq[0].view(torch.uint8)) and q[0].view(torch.uint8)[0] == 0x80
    assert torch.equal(s[0], rs[0]) and torch.isnan(s[1]) and torch.isnan(rs[1])


def _division_cases(n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, scale) fp32 pairs as the quantizers divide them: scales amax / qmax over 84 binades, |y| <= amax
    spread over 40 binades below it, and quotients within a hair of a midpoint between two floats (the
    cases a division that is not correctly rounded gets wrong); signed zeros, Inf and NaN scales."""
    gen = torch.Generator().manual_seed(seed)
    amax = torch.exp2(torch.rand(n, generator=gen) * 84 - 40)
    qmax = torch.where(torch.rand(n, generator=gen) < 0.5, 127.0, 448.0)
    scale = amax / qmax
    y = amax * (torch.rand(n, generator=gen) * 2 - 1) * torch.exp2(-torch.randint(0, 40, (n,), generator=gen).float())
    # Near midpoints: y = fp32(m·scale) with m half-way between two fp32 quotients, m <= qmax.
    k = n // 4
    q = (torch.rand(k, generator=gen) * qmax[:k]).float()
    mid = (q.double() + torch.nextafter(q, torch.tensor(math.inf)).double()) / 2
    y[:k] = (mid * scale[:k].double()).float()
    special_y = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, 0.0, -0.0, 3.0, math.nan])
    special_s = torch.tensor([1.0, 1.0, math.inf, math.inf, math.inf, math.inf, math.inf, math.inf, math.nan, 2.0])
    y = torch.cat([special_y, y])
    scale = torch.cat([special_s, scale])
    return y.to(device), scale.to(device)


@triton.jit
def _divide_kernel(Y, S, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(Y + offs, mask=mask, other=0.0)
    s = tl.load(S + offs, mask=mask, other=1.0)
    tl.store(Out + offs, fused_triton._divide_by_scale(y, s, tl.math.div_rn(1.0, s)), mask=mask)


@triton.jit
def _fma_kernel(A, B, C, Out):
    tl.store(Out, tl.fma(tl.load(A), tl.load(B), tl.load(C)))


def _fma_rounds_once(device: str) -> bool:
    """Whether tl.fma rounds once here (the interpreter of triton < 3.9 computes a·b + c in two steps)."""
    a = torch.tensor([1 + 2.0 ** -12], device=device)
    out = torch.zeros(1, device=device)
    _fma_kernel[(1,)](a, a, -torch.tensor([1 + 2.0 ** -11], device=device), out)
    return out.item() == 2.0 ** -24  # a·a - (1 + 2^-11) exactly; two roundings give 0


@pytest.mark.parametrize("backend, device", [p for p in KERNELS if p.values[0] == "triton"])
def test_division_by_a_row_scale_is_correctly_rounded(backend, device):
    # The quantizers divide by a row's scale with its reciprocal and one FMA correction step (on the GPU;
    # the interpreter runs them with division): the quotients must be those of IEEE division bit for
    # bit (sign of zero and NaN included) wherever they can reach an 8-bit code (|y / scale| >= 2^-12;
    # e4m3's smallest step is 2^-9), zeros included.
    if not _fma_rounds_once(device):
        pytest.skip(f"this triton ({triton.__version__}) interpreter's tl.fma rounds twice")
    y, scale = _division_cases(1 << 18, seed=31, device=device)
    out = torch.full_like(y, math.nan)
    _divide_kernel[(triton.cdiv(y.numel(), 8192),)](y, scale, out, y.numel(), BLOCK=8192)
    want = y / scale
    assert torch.equal(out.isnan(), want.isnan())  # (the sign and payload of a NaN mean nothing)
    reach = (want.abs() >= 2.0 ** -12) | (want == 0)
    assert reach.sum() > 0.5 * y.numel()
    assert torch.equal(out[reach].view(torch.int32), want[reach].view(torch.int32))
    # Below that, within one ulp (the remainder may underflow).
    small = want.abs() < 2.0 ** -12
    assert ((out[small] - want[small]).abs() <= torch.finfo(torch.float32).tiny + want[small].abs() * 2.0 ** -23).all()


@pytest.mark.verifies("quantize_per_token")
@pytest.mark.parametrize("backend, device", KERNELS)
def test_quantize_per_token_strided_rows_and_int8_ties(backend, device):
    # Rows of a wider tensor (row stride > K), and values exactly half-way between int8 codes.
    base = torch.arange(-127, 128, dtype=torch.float32, device=device)
    x = torch.zeros(6, 300, device=device)
    x[:, :255] = base
    x[:, 255] = 127.0  # amax 127 -> scale 1 exactly
    x[:, 256:300] = torch.linspace(-10.5, 10.5, 44, device=device)  # includes k + 0.5 ties
    wide = torch.cat([x, randn((6, 50), 7, device)], dim=1)[:, :300]
    assert wide.stride(0) == 350
    q, s = quantize_per_token(wide, torch.int8, backend=backend)
    rq, rs = quantize_per_token(wide.contiguous(), torch.int8, backend="torch")
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert torch.equal(q[0, 256:300].float(), torch.linspace(-10.5, 10.5, 44, device=device).round())


@pytest.mark.verifies("gelu_tanh_quant")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "f32", "f16"])
def test_gelu_tanh_quant_against_float64(backend, device, qdtype, xdtype):
    # (203 columns: no multiple of a 16-byte vector, so the CUDA rows kernel reads one element an access.)
    shapes = [(37, 200), (4, 96), (3, 203)] + ([(2048, 13824)] if big(device) else [])
    for i, (M, K) in enumerate(shapes):
        x = randn((M, K), seed=200 + i, device=device, scale=3.0).to(xdtype)
        x64 = x.double()
        want = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
        q, s = gelu_tanh_quant(x, qdtype, backend=backend)
        rq, rs = gelu_tanh_quant(x, qdtype, backend="torch")
        check_codes(q, s, want, rq, rs, qdtype)


# ----------------------------------------------------------------------------------------------------
# LayerNorm family, RMSNorm
# ----------------------------------------------------------------------------------------------------

def _ln_inputs(B, L, C, seed, device, xdtype):
    # Residual-stream-like rows: a common offset and a spread of magnitudes.
    x = randn((B, L, C), seed, device, scale=4.0, offset=2.0).to(xdtype)
    shift = randn((B, C), seed + 1, device)
    scale = randn((B, C), seed + 2, device, scale=0.5)
    return x, shift, scale


# (203 columns: no multiple of a 16-byte vector, so the CUDA rows kernel reads one element an access.
# Rows are no kernel's tile: every kernel here takes one row a program (a block in CUDA), so 2 x 13 rows
# reach each batch row's modulation as 2 x 37 did, in a third of the interpreter's time.)
LN_SHAPES = [(2, 13, 200), (1, 5, 96), (3, 2, 1), (2, 9, 203)]
# (16,400 columns: past the CUDA rows kernel's registers for fp32 rows (4,096 vectors of 4), so its
# streamed variant, and past the Triton kernel's register tile, so its chunked loops; 16,403: the streamed
# variant one element an access.)
LN_SHAPES_GPU = [(1, 4099, 5120), (2, 1000, 1536), (1, 3, 16400), (1, 3, 16403)]


def _ln_shapes(device):
    return LN_SHAPES + (LN_SHAPES_GPU if big(device) else [])


@pytest.mark.verifies("layer_norm_modulate")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("xdtype, out_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=["f32-bf16", "f32-f32", "bf16-bf16", "f16-f16"])
def test_layer_norm_modulate_against_float64(backend, device, xdtype, out_dtype):
    for i, (B, L, C) in enumerate(_ln_shapes(device)):
        x, shift, scale = _ln_inputs(B, L, C, 300 + i, device, xdtype)
        # The modulation tables come as views of the [B, 6, C] modulation sum (row stride 6C), as in the model.
        table = torch.stack([shift, scale] * 3, dim=1)
        shift_v, scale_v = table[:, 0], table[:, 1]
        want = ln64(x, shift=shift, scale=scale)
        out = layer_norm_modulate(x, shift_v, scale_v, eps=1e-6, out_dtype=out_dtype, backend=backend)
        ref = layer_norm_modulate(x, shift_v, scale_v, eps=1e-6, out_dtype=out_dtype, backend="torch")
        assert out.dtype == out_dtype and out.shape == x.shape
        assert rel_err(out, want) <= float_bound(rel_err(ref, want), out_dtype), (B, L, C)


@pytest.mark.verifies("layer_norm")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_layer_norm_against_float64(backend, device, affine):
    for i, (B, L, C) in enumerate(_ln_shapes(device)):
        x, w, b = _ln_inputs(B, L, C, 400 + i, device, torch.float32)
        w, b = (w if affine != "none" else None), (b[0] if affine == "weight+bias" else None)
        w = None if w is None else w[0]
        want = ln64(x, w, b)
        for out_dtype in (torch.bfloat16, torch.float32):
            out = layer_norm(x, w, b, eps=1e-6, out_dtype=out_dtype, backend=backend)
            ref = layer_norm(x, w, b, eps=1e-6, out_dtype=out_dtype, backend="torch")
            assert rel_err(out, want) <= float_bound(rel_err(ref, want), out_dtype), (B, L, C, out_dtype)


@pytest.mark.verifies("layer_norm_modulate_quant")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_layer_norm_modulate_quant_against_float64(backend, device, qdtype):
    for i, (B, L, C) in enumerate(_ln_shapes(device)):
        x, shift, scale = _ln_inputs(B, L, C, 500 + i, device, torch.float32)
        want = ln64(x, shift=shift, scale=scale)
        q, s = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=qdtype, backend=backend)
        rq, rs = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=qdtype, backend="torch")
        assert q.shape == (B, L, C) and s.shape == (B, L)
        check_codes(q, s, want, rq, rs, qdtype)


@pytest.mark.verifies("layer_norm_quant")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_layer_norm_quant_against_float64(backend, device, qdtype):
    for i, (B, L, C) in enumerate(_ln_shapes(device)):
        x, w, b = _ln_inputs(B, L, C, 600 + i, device, torch.bfloat16)
        w, b = w[0].float(), b[0].float()
        want = ln64(x, w, b)
        q, s = layer_norm_quant(x, w, b, eps=1e-6, dtype=qdtype, backend=backend)
        rq, rs = layer_norm_quant(x, w, b, eps=1e-6, dtype=qdtype, backend="torch")
        check_codes(q, s, want, rq, rs, qdtype)


@pytest.mark.verifies("rms_norm")
@pytest.mark.parametrize("backend, device", KERNELS)
def test_rms_norm_against_float64(backend, device):
    for i, (B, L, C) in enumerate(_ln_shapes(device)):
        x = randn((B, L, C), 700 + i, device, scale=3.0).bfloat16()
        w = randn((C,), 701 + i, device)
        want = rms64(x, w)
        for out_dtype in (torch.bfloat16, torch.float32):
            out = rms_norm(x, w, eps=1e-6, out_dtype=out_dtype, backend=backend)
            ref = rms_norm(x, w, eps=1e-6, out_dtype=out_dtype, backend="torch")
            assert rel_err(out, want) <= float_bound(rel_err(ref, want), out_dtype), (B, L, C, out_dtype)


@pytest.mark.verifies("layer_norm", "layer_norm_modulate", "layer_norm_quant", "layer_norm_modulate_quant", "rms_norm",
                      "qk_norm_rope", "qk_norm_rope_quant")
@pytest.mark.parametrize("backend, device", KERNELS)
def test_norm_kernels_take_their_eps(backend, device):
    """The other norm tests' rows have variances far above eps; here rows of mean square ~1e-5 make the
    kernels' eps count, at the value given (1e-5 here, Wan's is 1e-6)."""
    eps = 1e-5
    x = randn((2, 9, 203), 1200, device, scale=3e-3, offset=1e-3)
    shift, scale = randn((2, 203), 1201, device), randn((2, 203), 1202, device, scale=0.5)
    w, b = randn((203,), 1203, device, offset=1.0), randn((203,), 1204, device)
    f32 = torch.float32
    for out, ref, want in (
            (layer_norm(x, w, b, eps=eps, out_dtype=f32, backend=backend),
             layer_norm(x, w, b, eps=eps, out_dtype=f32, backend="torch"), ln64(x, w, b, eps=eps)),
            (layer_norm_modulate(x, shift, scale, eps=eps, out_dtype=f32, backend=backend),
             layer_norm_modulate(x, shift, scale, eps=eps, out_dtype=f32, backend="torch"),
             ln64(x, shift=shift, scale=scale, eps=eps)),
            (rms_norm(x, w, eps=eps, out_dtype=f32, backend=backend), rms_norm(x, w, eps=eps, backend="torch"),
             rms64(x, w, eps=eps))):
        assert rel_err(out, want) <= float_bound(rel_err(ref, want), f32)
    q, s = layer_norm_quant(x, w, b, eps=eps, dtype=torch.int8, backend=backend)
    check_codes(q, s, ln64(x, w, b, eps=eps), *layer_norm_quant(x, w, b, eps=eps, dtype=torch.int8, backend="torch"),
                torch.int8)
    q, s = layer_norm_modulate_quant(x, shift, scale, eps=eps, dtype=torch.int8, backend=backend)
    check_codes(q, s, ln64(x, shift=shift, scale=scale, eps=eps),
                *layer_norm_modulate_quant(x, shift, scale, eps=eps, dtype=torch.int8, backend="torch"), torch.int8)

    grid, H, D = (1, 2, 3), 2, 32
    qk = randn((1, 6, 2 * H * D), 1205, device, scale=3e-3, offset=1e-3)
    q, k = qk[..., :H * D], qk[..., H * D:]
    cos, sin = rope_table(grid, D, device=device)
    angles = angles64(grid, D).to(device)
    want = [rope64(rms64(t, w[:H * D], eps=eps).unflatten(-1, (H, D)), angles) for t in (q, k)]
    args = (q, k, w[:H * D], w[:H * D], cos, sin)
    outs = qk_norm_rope(*args, heads=H, eps=eps, out_dtype=f32, backend=backend)
    refs = qk_norm_rope(*args, heads=H, eps=eps, out_dtype=f32, backend="torch")
    for out, ref, want_t in zip(outs, refs, want):
        assert rel_err(out, want_t) <= float_bound(rel_err(ref, want_t), f32)
    out = qk_norm_rope_quant(*args, heads=H, eps=eps, dtype=torch.int8, backend=backend)
    ref = qk_norm_rope_quant(*args, heads=H, eps=eps, dtype=torch.int8, backend="torch")
    check_codes(out.q, out.q_scale.permute(0, 2, 1), want[0], ref.q, ref.q_scale.permute(0, 2, 1), torch.int8)
    check_codes(out.k, out.k_scale.permute(0, 2, 1), want[1], ref.k, ref.k_scale.permute(0, 2, 1), torch.int8)


@pytest.mark.verifies("residual_add")
@pytest.mark.parametrize("backend, device", [p for p in KERNELS if p.values[0] == "triton"])
@pytest.mark.parametrize("ydtype", [torch.bfloat16, torch.float16, torch.float32])
def test_residual_add_against_float64(backend, device, ydtype):
    # (1500: a second 1024-column block with a tail.)
    shapes = LN_SHAPES + [(1, 3, 1500)] + ([(1, 4099, 5120), (1, 7, 2 * 1024 + 7)] if big(device) else [])
    for i, (B, L, C) in enumerate(shapes):
        x = randn((B, L, C), 900 + i, device, scale=4.0, offset=2.0)
        # y as the linears give it, and as a strided view (every other column of a wider tensor).
        wide = randn((B, L, 2 * C), 901 + i, device).to(ydtype)
        gate = randn((B, C), 902 + i, device, scale=0.5)
        for y in (wide[..., :C].contiguous(), wide[..., ::2]):
            for g in (gate, None):
                want = x.double() + y.double() * (1.0 if g is None else g.double()[:, None, :])
                out = residual_add(x, y, g, backend=backend)
                ref = residual_add(x, y, g, backend="torch")
                assert out.dtype == torch.float32 and out.shape == x.shape
                assert rel_err(out, want) <= float_bound(rel_err(ref, want), torch.float32), (B, L, C, g is None)


@pytest.mark.verifies("layer_norm_modulate", "layer_norm_modulate_quant", "rms_norm", "quantize_per_token",
                      "layer_norm", "layer_norm_quant", "gelu_tanh_quant")
@pytest.mark.parametrize("backend, device", [p for p in KERNELS if p.values[0] == "triton"])
def test_rows_chunked_path(backend, device, monkeypatch):
    """Rows longer than the register tile take the chunked loops: same results, for every op the rows
    kernel serves (GELU, affine weight and bias, modulation, 16-bit and 8-bit outputs)."""
    from dit8.kernels import fused_triton

    monkeypatch.setattr(fused_triton, "MAX_TILE", 64)
    monkeypatch.setattr(fused_triton, "CHUNK", 64)
    x, shift, scale = _ln_inputs(2, 9, 200, 800, device, torch.float32)
    want = ln64(x, shift=shift, scale=scale)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = layer_norm_modulate(x, shift, scale, eps=1e-6, out_dtype=out_dtype, backend=backend)
        ref = layer_norm_modulate(x, shift, scale, eps=1e-6, out_dtype=out_dtype, backend="torch")
        assert out.dtype == out_dtype and rel_err(out, want) <= float_bound(rel_err(ref, want), out_dtype)
    w, b = randn((200,), 803, device), randn((200,), 804, device)
    want_affine = ln64(x, w, b)
    out = layer_norm(x, w, b, eps=1e-6, out_dtype=torch.bfloat16, backend=backend)
    ref = layer_norm(x, w, b, eps=1e-6, out_dtype=torch.bfloat16, backend="torch")
    assert rel_err(out, want_affine) <= float_bound(rel_err(ref, want_affine), torch.bfloat16)
    q, s = layer_norm_quant(x, w, b, eps=1e-6, dtype=FP8, backend=backend)
    rq, rs = layer_norm_quant(x, w, b, eps=1e-6, dtype=FP8, backend="torch")
    check_codes(q, s, want_affine, rq, rs, FP8)
    xg = randn((5, 200), 805, device, scale=3.0).bfloat16()
    x64 = xg.double()
    want_gelu = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    for qdtype in (torch.int8, FP8):
        q, s = gelu_tanh_quant(xg, qdtype, backend=backend)
        rq, rs = gelu_tanh_quant(xg, qdtype, backend="torch")
        check_codes(q, s, want_gelu, rq, rs, qdtype)
    q, s = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=torch.int8, backend=backend)
    rq, rs = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=torch.int8, backend="torch")
    check_codes(q, s, want, rq, rs, torch.int8)
    w = randn((200,), 801, device)
    out = rms_norm(x, w, eps=1e-6, out_dtype=torch.float32, backend=backend)
    assert rel_err(out, rms64(x, w)) <= float_bound(rel_err(rms_norm(x, w, eps=1e-6, backend="torch"), rms64(x, w)),
                                                    torch.float32)
    xq = randn((5, 200), 802, device) * 10
    assert all(torch.equal(a, b) for a, b in zip(quantize_per_token(xq, torch.int8, backend=backend),
                                                  quantize_per_token(xq, torch.int8, backend="torch")))


@pytest.mark.parametrize("backend, device", [p for p in KERNELS if p.values[0] == "triton"])
def test_rows_with_operands_loaded_ahead(backend, device, monkeypatch):
    """fused_triton.PREFETCH_PARAMS (a tuning knob the benchmark sweeps): the norms' weight, bias and
    modulation loaded ahead of the statistics give the same results."""
    from dit8.kernels import fused_triton

    monkeypatch.setattr(fused_triton, "PREFETCH_PARAMS", True)
    for i, (B, L, C) in enumerate(_ln_shapes(device)):
        x, shift, scale = _ln_inputs(B, L, C, 900 + i, device, torch.float32)
        want = ln64(x, shift=shift, scale=scale)
        out = layer_norm_modulate(x, shift, scale, eps=1e-6, out_dtype=torch.bfloat16, backend=backend)
        ref = layer_norm_modulate(x, shift, scale, eps=1e-6, out_dtype=torch.bfloat16, backend="torch")
        assert rel_err(out, want) <= float_bound(rel_err(ref, want), torch.bfloat16), (B, L, C)
        q, s = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=FP8, backend=backend)
        rq, rs = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=FP8, backend="torch")
        check_codes(q, s, want, rq, rs, FP8)
        w, b = shift[0], scale[0]
        q, s = layer_norm_quant(x, w, b, eps=1e-6, dtype=torch.int8, backend=backend)
        rq, rs = layer_norm_quant(x, w, b, eps=1e-6, dtype=torch.int8, backend="torch")
        check_codes(q, s, ln64(x, w, b), rq, rs, torch.int8)
        out = rms_norm(x, w, eps=1e-6, out_dtype=torch.float32, backend=backend)
        ref = rms_norm(x, w, eps=1e-6, out_dtype=torch.float32, backend="torch")
        assert rel_err(out, rms64(x, w)) <= float_bound(rel_err(ref, rms64(x, w)), torch.float32), (B, L, C)


def every_other(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values as a view with stride 2 along its last dimension (every other element of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.verifies("layer_norm", "layer_norm_modulate", "rms_norm", "quantize_per_token", "qk_norm_rope")
@pytest.mark.parametrize("backend, device", KERNELS)
def test_operands_with_any_strides_give_the_contiguous_result(backend, device):
    """The kernels read rows with unit column stride and contiguous parameters: an operand laid out otherwise
    (a channel stride of 2, a transposed activation, strided weights, modulation rows or RoPE tables) must
    be copied by the wrappers first, giving the contiguous operands' result, within the float64 bound."""
    B, L, C = 2, 9, 203
    x, shift, scale = _ln_inputs(B, L, C, 1200, device, torch.float32)
    w, b = randn((C,), 1203, device, offset=1.0), randn((C,), 1204, device)
    xs, ws, bs, shift_s, scale_s = (every_other(t) for t in (x, w, b, shift, scale))
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, C] with channels L apart
    assert xs.stride(-1) == 2 and xt.stride(-1) == L and ws.stride(-1) == 2

    out = layer_norm(xs, ws, bs, eps=1e-6, out_dtype=torch.float32, backend=backend)
    assert torch.equal(out, layer_norm(x, w, b, eps=1e-6, out_dtype=torch.float32, backend=backend))
    want = ln64(x, w, b)
    ref = layer_norm(x, w, b, eps=1e-6, out_dtype=torch.float32, backend="torch")
    assert rel_err(out, want) <= float_bound(rel_err(ref, want), torch.float32)

    out = layer_norm_modulate(xt, shift_s, scale_s, eps=1e-6, out_dtype=torch.bfloat16, backend=backend)
    assert torch.equal(out, layer_norm_modulate(x, shift, scale, eps=1e-6, out_dtype=torch.bfloat16,
                                                backend=backend))
    want = ln64(x, shift=shift, scale=scale)
    ref = layer_norm_modulate(x, shift, scale, eps=1e-6, out_dtype=torch.bfloat16, backend="torch")
    assert rel_err(out, want) <= float_bound(rel_err(ref, want), torch.bfloat16)

    out = rms_norm(xt, ws, eps=1e-6, out_dtype=torch.float32, backend=backend)
    assert torch.equal(out, rms_norm(x, w, eps=1e-6, out_dtype=torch.float32, backend=backend))
    ref = rms_norm(x, w, eps=1e-6, out_dtype=torch.float32, backend="torch")
    assert rel_err(out, rms64(x, w)) <= float_bound(rel_err(ref, rms64(x, w)), torch.float32)

    rows = xs[0]  # [L, C] with column stride 2
    for qdtype in QDTYPES:
        q, s = quantize_per_token(rows, qdtype, backend=backend)
        rq, rs = quantize_per_token(rows.contiguous(), qdtype, backend="torch")
        assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))

    grid, H, D = (1, 2, 3), 3, 32
    q, k, wq, wk, cos, sin = _qk_inputs(1, grid, H, D, 1205, device, torch.bfloat16)
    qs, ks, wqs, wks, cos_s, sin_s = (every_other(t) for t in (q, k, wq, wk, cos, sin))
    oq, ok = qk_norm_rope(qs, ks, wqs, wks, cos_s, sin_s, heads=H, eps=1e-6, backend=backend)
    dq, dk = qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, backend=backend)
    assert torch.equal(oq, dq) and torch.equal(ok, dk)
    angles = angles64(grid, D).to(device)
    rq, rk = qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, backend="torch")
    for xq, w_, out, ref in ((q, wq, oq, rq), (k, wk, ok, rk)):
        want = rope64(rms64(xq, w_).unflatten(-1, (H, D)), angles)
        assert rel_err(out, want) <= float_bound(rel_err(ref, want), torch.bfloat16)


@pytest.mark.verifies("residual_add")
@pytest.mark.parametrize("backend, device", [p for p in KERNELS if p.values[0] == "triton"])
def test_residual_add_takes_strided_operands(backend, device):
    """x transposed (not contiguous) and the gate a view of the [B, 6, C] modulation table (row stride 6·C):
    the kernel indexes both as contiguous, so the wrapper copies them; the contiguous operands' result."""
    B, L, C = 2, 7, 203
    x = randn((B, C, L), 1210, device).transpose(1, 2)
    y = randn((B, L, C), 1211, device).bfloat16()
    table = randn((B, 6, C), 1212, device)
    gate = table[:, 2]
    assert not x.is_contiguous() and gate.stride(0) == 6 * C
    out = residual_add(x, y, gate, backend=backend)
    assert torch.equal(out, residual_add(x.contiguous(), y, gate.contiguous(), backend=backend))
    want = x.double() + y.double() * gate.double()[:, None, :]
    ref = residual_add(x, y, gate, backend="torch")
    assert rel_err(out, want) <= float_bound(rel_err(ref, want), torch.float32)


def test_kernel_argument_checks_name_the_kernel_and_argument():
    """What the kernels' own checks refuse (fused_spec, shared by Triton, CUDA and the fake implementations;
    the ops give the kernels only what passes), and the CUDA launchers' device check, which runs before the
    extension is loaded (so here, without a GPU)."""
    from dit8.kernels import cuda_ext

    x = torch.randn(4, 8)
    w = torch.ones(8)
    bad_rows = [
        (dict(x=x.double()), "x has dtype"),
        (dict(weight=w[:6]), r"weight has shape \(6,\); expected \(8,\)"),
        (dict(weight=w.half()), "weight has dtype"),
        (dict(weight=torch.ones(16)[::2]), "weight must be contiguous"),
        (dict(bias=torch.ones(16)[::2]), "bias must be contiguous"),
        (dict(shift=torch.ones(1, 8), scale=torch.ones(2, 8), rows_per_batch=4), "shift and scale have 1 and 2 rows"),
        (dict(shift=torch.ones(1, 16)[:, ::2], scale=torch.ones(1, 8), rows_per_batch=4),
         "shift must have unit column stride"),
        (dict(shift=torch.ones(1, 8), scale=torch.ones(1, 8), rows_per_batch=2), "4 rows need rows_per_batch"),
        (dict(norm=3), "norm must be 0, 1 or 2"),
        (dict(act=2), "act must be 0 or 1"),
        (dict(out_dtype=torch.int32), "out_dtype must be one of"),
    ]
    for over, match in bad_rows:
        args = dict(x=x, weight=None, bias=None, shift=None, scale=None, norm=1, act=0, rows_per_batch=1,
                    out_dtype=torch.int8) | over
        with pytest.raises(OpArgumentError, match=f"rows_triton: {match}"):
            fused_spec.check_rows("rows_triton", **args)
    q = torch.randn(1, 3, 8)
    ones, table = torch.ones(8), torch.ones(3, 2)
    bad_qk = [
        (dict(q=q.transpose(1, 2).contiguous().transpose(1, 2), k=q.transpose(1, 2).contiguous().transpose(1, 2)),
         "q must have unit channel stride"),
        (dict(weight_q=ones.half()), "weight_q has dtype"),
        (dict(weight_k=torch.ones(16)[::2]), "weight_k must be contiguous"),
        (dict(cos=torch.ones(2, 3).T), "cos must be contiguous"),
        (dict(sin=torch.ones(3, 2, dtype=torch.float64)), "sin has dtype"),
        (dict(out_dtype=torch.int32), "out_dtype must be one of"),
    ]
    for over, match in bad_qk:
        args = dict(q=q, k=q, weight_q=ones, weight_k=ones, cos=table, sin=table, heads=2,
                    out_dtype=torch.bfloat16) | over
        with pytest.raises(OpArgumentError, match=f"qk_norm_rope_triton: {match}"):
            fused_spec.check_qk("qk_norm_rope_triton", **args)
    with pytest.raises(OpArgumentError, match="residual_add_triton: y has shape"):
        fused_spec.check_residual("residual_add_triton", q, q[:, :2], None)
    with pytest.raises(OpArgumentError, match="residual_add_triton: gate has dtype"):
        fused_spec.check_residual("residual_add_triton", q, q, torch.ones(1, 8, dtype=torch.float64))
    # The CUDA launchers on CPU tensors that pass the checks: refused, naming the backend and the device.
    with pytest.raises(OpArgumentError, match="rows_cuda: the cuda backend needs CUDA tensors, got one on cpu"):
        cuda_ext.launch_rows(x, None, None, None, None, 1, 0, 1, 1e-6, torch.int8)
    with pytest.raises(OpArgumentError, match="qk_norm_rope_cuda: the cuda backend needs CUDA tensors, got one on cpu"):
        cuda_ext.launch_qk_norm_rope(q, q, ones, ones, table, table, 2, 1e-6, torch.bfloat16)


@pytest.mark.parametrize("backend, device", KERNELS)
def test_qk_norm_rope_wider_than_a_block_is_refused(backend, device):
    """Rows wider than the q/k kernel holds in one program (Triton: MAX_TILE channels, head_dim padded to a
    power of two; CUDA: QK_MAX_THREADS threads of QK_VECS_PER_THREAD vectors) are refused, naming the op,
    before any launch."""
    heads, head_dim = 130, 128  # 16,640 channels
    q = randn((1, 2, heads * head_dim), 1220, device).bfloat16()
    w = torch.ones(heads * head_dim, device=device)
    cos, sin = rope_table((1, 1, 2), head_dim, device=device)
    match = "more than one thread block handles" if backend == "cuda" else "handles up to 16384 channels"
    with pytest.raises(OpArgumentError, match=match):
        qk_norm_rope(q, q, w, w, cos, sin, heads=heads, eps=1e-6, backend=backend)


def test_qk_norm_rope_auto_gives_rows_wider_than_the_kernels_take_to_the_reference(monkeypatch):
    """Where "auto" picks a kernel (a GPU it is verified on), a width it refuses runs on the torch reference."""
    import importlib

    from dit8.kernels.registry import resolve

    module = importlib.import_module("dit8.kernels.qk_norm_rope")  # (the package exports the op by that name)

    heads, head_dim = 130, 128
    q = randn((1, 2, heads * head_dim), 1221, "cpu").bfloat16()
    w = torch.ones(heads * head_dim)
    cos, sin = rope_table((1, 1, 2), head_dim)
    monkeypatch.setattr(module, "resolve", lambda op, backend, device: resolve(
        op, "triton" if backend == "auto" else backend, device))
    expected = qk_norm_rope(q, q, w, w, cos, sin, heads=heads, eps=1e-6, backend="torch")
    got = qk_norm_rope(q, q, w, w, cos, sin, heads=heads, eps=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    codes = qk_norm_rope_quant(q, q, w, w, cos, sin, heads=heads, eps=1e-6, dtype=torch.int8)
    assert torch.equal(codes.q, qk_norm_rope_quant(q, q, w, w, cos, sin, heads=heads, eps=1e-6, dtype=torch.int8,
                                                   backend="torch").q)


def test_triton_qk_norm_rope_quant_refuses_scales_past_32_bit_offsets():
    """The Triton kernel stores each head's scale at offset h·L from the token's: an int32 product, which
    past 2^31 - 1 would wrap and write the wrong memory. 8192 heads of 2 channels (16,384, one tile) over
    262,177 tokens take 43 GB: refused before any allocation (unallocated tensors here); float outputs
    store no scales."""
    heads, head_dim = 8192, 2
    L = (2 ** 31 - 1) // (heads - 1) + 1

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    q, w, cos = meta(1, L, heads * head_dim, dtype=torch.bfloat16), meta(heads * head_dim), meta(L, head_dim // 2)
    with pytest.raises(OpArgumentError, match=r"qk_norm_rope_quant: q is too large .*8,192 heads of 262,177 tokens"):
        fused_triton.launch_qk_norm_rope(q, q, w, w, cos, cos, heads, 1e-6, torch.int8)
    # One token fewer fits: the check passes and the launch fails on the unallocated tensors instead.
    q, cos = q[:, :L - 1], cos[:L - 1]
    with pytest.raises(Exception) as failure:
        fused_triton.launch_qk_norm_rope(q, q, w, w, cos, cos, heads, 1e-6, torch.int8)
    assert not isinstance(failure.value, OpArgumentError)


def test_rows_launch_takes_the_tuned_entry_of_its_op(monkeypatch):
    """fused_triton.ROWS_TUNED (bench/rows_choice.py fills it from the sweep): an entry sets the warps
    and where the operands load for its op and width on its GPU generation; elsewhere the defaults."""
    from dit8.kernels import fused_triton as ft
    from dit8.kernels.registry import _OPS

    ops = {ft.rows_op_name(norm, act, mod, quant) for norm, act, mod, quant in
           [(0, 0, False, True), (0, 1, False, True), (1, 0, True, True), (1, 0, True, False), (1, 0, False, True),
            (1, 0, False, False), (2, 0, False, False)]}
    assert ops == {"quantize_per_token", "gelu_tanh_quant", "layer_norm_modulate_quant", "layer_norm_modulate",
                   "layer_norm_quant", "layer_norm", "rms_norm"} and ops <= set(_OPS)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ft, "ROWS_TUNED", {(9, 0): {("layer_norm_modulate_quant", 5120): (4, True)}})
    cuda = torch.device("cuda", 0)
    default = (ft._num_warps(5120), ft.PREFETCH_PARAMS)
    assert ft.rows_launch("layer_norm_modulate_quant", 5120, cuda) == (4, True)
    assert ft.rows_launch("layer_norm_modulate_quant", 5120, torch.device("cpu")) == default
    assert ft.rows_launch("layer_norm_quant", 5120, cuda) == default
    assert ft.rows_launch("layer_norm_modulate_quant", 3072, cuda) == (ft._num_warps(3072), ft.PREFETCH_PARAMS)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert ft.rows_launch("layer_norm_modulate_quant", 5120, cuda) == default


# ----------------------------------------------------------------------------------------------------
# q/k RMSNorm + RoPE
# ----------------------------------------------------------------------------------------------------

# (B, grid, heads, head_dim): C = 96 and 200 (not powers of two), head_dim 40 (pairs not a power of two)
# Head counts that leave a tile of padding heads (7 = 4 + 4, 11 = 8 + 4), and a head_dim (20) that is no
# multiple of 16 bytes of bf16 (the CUDA kernel's pair path). Tokens are no tile: both kernels take one
# token of one batch row a program (block), and the frame axis is the other cases'. (With 2 x 24 tokens
# the six float64 tests took 79 s in the interpreter; with 2 x 12, 44 s.)
QK_CASES = [(2, (1, 3, 4), 3, 32), (1, (3, 2, 3), 5, 40), (1, (1, 2, 3), 2, 128), (1, (1, 2, 3), 7, 32),
            (1, (2, 1, 2), 11, 40), (1, (2, 2, 1), 3, 20)]
QK_CASES_GPU = [(1, (21, 30, 52), 40, 128), (2, (3, 8, 12), 12, 128)]


def _qk_cases(device):
    return QK_CASES + (QK_CASES_GPU if big(device) else [])


def _qk_inputs(B, grid, H, D, seed, device, dtype):
    L, C = math.prod(grid), H * D
    # One fused QKV output [B, L, 3C]; q and k are strided views of it, as the GEMM leaves them.
    # Per-channel offsets make the rows RMS-normed-like (large common components).
    qkv = (randn((B, L, 3 * C), seed, device, scale=2.0) + randn((3 * C,), seed + 1, device, scale=3.0)).to(dtype)
    wq, wk = randn((C,), seed + 2, device, offset=1.0), randn((C,), seed + 3, device, offset=1.0)
    cos, sin = rope_table(grid, D, device=device)
    return qkv[..., :C], qkv[..., C:2 * C], wq, wk, cos, sin


@WAN_SHAPES
@pytest.mark.verifies("qk_norm_rope")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("xdtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float32), (torch.float16, torch.float16)],
                         ids=["bf16-bf16", "bf16-f32", "f32-f32", "f16-f16"])
def test_qk_norm_rope_against_float64(backend, device, xdtype, out_dtype):
    for i, (B, grid, H, D) in enumerate(_qk_cases(device)):
        q, k, wq, wk, cos, sin = _qk_inputs(B, grid, H, D, 900 + 10 * i, device, xdtype)
        angles = angles64(grid, D).to(device)
        want_q = rope64(rms64(q, wq).unflatten(-1, (H, D)), angles)
        want_k = rope64(rms64(k, wk).unflatten(-1, (H, D)), angles)
        oq, ok = qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, out_dtype=out_dtype, backend=backend)
        rq, rk = qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, out_dtype=out_dtype, backend="torch")
        assert oq.shape == (B, math.prod(grid), H, D) and oq.dtype == out_dtype and oq.is_contiguous()
        assert rel_err(oq, want_q) <= float_bound(rel_err(rq, want_q), out_dtype), (B, grid, H, D)
        assert rel_err(ok, want_k) <= float_bound(rel_err(rk, want_k), out_dtype), (B, grid, H, D)


@WAN_SHAPES
@pytest.mark.verifies("qk_norm_rope")
@pytest.mark.parametrize("backend, device", KERNELS)
def test_qk_norm_rope_reads_views_off_a_16_byte_boundary(backend, device):
    """q and k one element past a 16-byte boundary: vector loads cannot read them in place, so the
    kernel works on aligned copies; at Wan's width (40 x 128) too."""
    B, grid, H, D = (1, (21, 30, 52), 40, 128) if big(device) else (1, (2, 3, 4), 3, 32)
    L, C = math.prod(grid), H * D
    qkv = randn((B, L, 3 * C + 1), 1100, device, scale=2.0).to(torch.bfloat16)
    q, k = qkv[..., 1:C + 1], qkv[..., C + 1:2 * C + 1]
    wq, wk = randn((C,), 1101, device, offset=1.0), randn((C,), 1102, device, offset=1.0)
    cos, sin = rope_table(grid, D, device=device)
    angles = angles64(grid, D).to(device)
    oq, ok = qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, backend=backend)
    rq, rk = qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, backend="torch")
    for x, w, out, ref in ((q, wq, oq, rq), (k, wk, ok, rk)):
        want = rope64(rms64(x, w).unflatten(-1, (H, D)), angles)
        assert rel_err(out, want) <= float_bound(rel_err(ref, want), torch.bfloat16)


@WAN_SHAPES
@pytest.mark.verifies("qk_norm_rope_quant")
@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_qk_norm_rope_quant_against_float64(backend, device, qdtype):
    for i, (B, grid, H, D) in enumerate(_qk_cases(device)):
        q, k, wq, wk, cos, sin = _qk_inputs(B, grid, H, D, 1000 + 10 * i, device, torch.bfloat16)
        angles = angles64(grid, D).to(device)
        out = qk_norm_rope_quant(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, dtype=qdtype, backend=backend)
        ref = qk_norm_rope_quant(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, dtype=qdtype, backend="torch")
        L = math.prod(grid)
        assert out.q.shape == (B, L, H, D) and out.q_scale.shape == (B, H, L) and out.q_scale.is_contiguous()
        for x, w, codes, scale, rcodes, rscale in ((q, wq, out.q, out.q_scale, ref.q, ref.q_scale),
                                                   (k, wk, out.k, out.k_scale, ref.k, ref.k_scale)):
            want = rope64(rms64(x, w).unflatten(-1, (H, D)), angles)  # [B, L, H, D]
            # Compare per (b, h, l) row: scales [B, H, L] against codes [B, L, H, D].
            check_codes(codes, scale.permute(0, 2, 1), want, rcodes, rscale.permute(0, 2, 1), qdtype)
        dq, dk = out.dequantized()
        assert dq.shape == (B, L, H, D) and dk.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------
# argument checks, torch.library registration
# ----------------------------------------------------------------------------------------------------

def test_fused_ops_name_bad_arguments():
    x = torch.randn(2, 3, 8)
    with pytest.raises(OpArgumentError, match="layer_norm_modulate_quant: dtype"):
        layer_norm_modulate_quant(x, torch.randn(2, 8), torch.randn(2, 8), eps=1e-6, dtype=torch.bfloat16)
    with pytest.raises(OpArgumentError, match="shift has shape"):
        layer_norm_modulate_quant(x, torch.randn(1, 8), torch.randn(2, 8), eps=1e-6, dtype=torch.int8)
    with pytest.raises(OpArgumentError, match="gelu_tanh_quant: x must have 2"):
        gelu_tanh_quant(x, torch.int8)
    cos, sin = rope_table((1, 1, 3), 4)
    with pytest.raises(OpArgumentError, match="not a multiple of heads"):
        qk_norm_rope(x, x, torch.ones(8), torch.ones(8), cos, sin, heads=3, eps=1e-6)
    with pytest.raises(OpArgumentError, match="cos has shape"):
        qk_norm_rope(x, x, torch.ones(8), torch.ones(8), cos[:2], sin, heads=2, eps=1e-6)
    with pytest.raises(OpArgumentError, match="k has dtype"):
        qk_norm_rope(x, x.half(), torch.ones(8), torch.ones(8), cos, sin, heads=2, eps=1e-6)
    with pytest.raises(OpArgumentError, match="head_dim 1 must be even"):
        qk_norm_rope(x, x, torch.ones(8), torch.ones(8), cos, sin, heads=8, eps=1e-6)
    # The kernel-level checks (shared by Triton and CUDA, and the fake implementations).
    with pytest.raises(OpArgumentError, match="unit column stride"):
        fused_spec.check_rows("rows", torch.randn(8, 4).T, None, None, None, None, 0, 0, 1, torch.int8)
    with pytest.raises(OpArgumentError, match="shift and scale go together"):
        fused_spec.check_rows("rows", torch.randn(4, 8), None, None, torch.randn(1, 8), None, 1, 0, 4, torch.int8)


def test_torch_library_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and dispatch of the Triton custom ops (interpreter here)."""
    from dit8.kernels import fused_triton  # noqa: F401  (registers the ops)

    device = "cuda" if CUDA else "cpu"
    x = randn((5, 24), 1, device, scale=3.0)
    shift, scale = randn((1, 24), 2, device), randn((1, 24), 3, device)
    torch.library.opcheck(torch.ops.dit8.rows_triton.default,
                          (x, None, None, shift, scale, fused_spec.NORM_LAYER, 0, 5, 1e-6, torch.int8))
    q, k, wq, wk, cos, sin = _qk_inputs(1, (1, 2, 2), 2, 8, 4, device, torch.float32)
    torch.library.opcheck(torch.ops.dit8.qk_norm_rope_triton.default, (q, k, wq, wk, cos, sin, 2, 1e-6, torch.bfloat16))
    fq = torch.ops.dit8.qk_norm_rope_triton.default(q.to("meta"), k.to("meta"), wq.to("meta"), wk.to("meta"),
                                                    cos.to("meta"), sin.to("meta"), 2, 1e-6, torch.int8)
    assert [t.shape for t in fq] == [(1, 4, 2, 8), (1, 4, 2, 8), (1, 2, 4), (1, 2, 4)]
    residual, y, gate = randn((2, 3, 24), 4, device), randn((2, 3, 24), 5, device).bfloat16(), randn((2, 24), 6, device)
    torch.library.opcheck(torch.ops.dit8.residual_add_triton.default, (residual, y, gate))
    torch.library.opcheck(torch.ops.dit8.residual_add_triton.default, (residual, y, None))
    # Called directly, the op checks its arguments too (a gate of one row read past its end for row 2).
    with pytest.raises(OpArgumentError, match=r"residual_add_triton: gate has shape \(1, 24\); expected \(2, 24\)"):
        torch.ops.dit8.residual_add_triton.default(residual, y, gate[:1])
    with pytest.raises(OpArgumentError, match="residual_add_triton: x has dtype"):
        torch.ops.dit8.residual_add_triton.default(residual.bfloat16().to("meta"), y.to("meta"), None)


def _compile_check_inputs(backend: str, device: str):
    """A step of two fused ops, and its inputs, for tracing under torch.compile. Few tokens: the trace does not
    depend on them, and in the Triton interpreter every token is a program (48 tokens took 7 s a step)."""
    B, grid, H, D = 1, (1, 2, 3), 4, 64
    q, k, wq, wk, cos, sin = _qk_inputs(B, grid, H, D, 5, device, torch.bfloat16)
    x, shift, scale = _ln_inputs(1, 6, 256, 6, device, torch.float32)

    def step(x, q, k):
        xq, xs = layer_norm_modulate_quant(x, shift, scale, eps=1e-6, dtype=FP8, backend=backend)
        oq, ok = qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, backend=backend)
        return xq.float() * xs[..., None], oq, ok

    return step, (x, q, k)


@pytest.mark.skipif(not interpreting(), reason="the Triton interpreter's CPU variant of the GPU test below")
def test_triton_ops_trace_whole_under_torch_compile():
    # Dynamo traces the op dispatch too (registry, triton_runs_on): nothing in it may break the graph.
    step, args = _compile_check_inputs("triton", "cpu")
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@GPU
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.verifies("layer_norm_modulate_quant", "qk_norm_rope")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_ops_under_torch_compile_and_cuda_graphs(backend):
    step, (x, q, k) = _compile_check_inputs(backend, "cuda")
    eager = step(x, q, k)
    compiled = torch.compile(step, fullgraph=True)(x, q, k)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(x, q, k)  # warm-up (module loading, autotuning) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = step(x, q, k)
    graph.replay()  # capture only records: the outputs hold values once the graph has run
    torch.cuda.synchronize()
    before = [c.clone() for c in captured]
    for t in (x, q, k):  # new values in the captured input buffers (q and k are views of one tensor)
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for a, b, old in zip(step(x, q, k), captured, before):
        assert torch.equal(a, b) and not torch.equal(b, old)


@GPU
@WAN_SHAPES
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.verifies("qk_norm_rope", "quantize_per_token", backend=("cuda", "triton"))
def test_cuda_and_triton_agree():
    from dit8.kernels import cuda_ext

    if not cuda_ext.cuda_available(torch.device("cuda")):
        pytest.skip("the CUDA extension cannot be built here")
    grid, H, D = (21, 30, 52), 40, 128
    q, k, wq, wk, cos, sin = _qk_inputs(1, grid, H, D, 11, "cuda", torch.bfloat16)
    outs = {be: qk_norm_rope(q, k, wq, wk, cos, sin, heads=H, eps=1e-6, out_dtype=torch.float32, backend=be)
            for be in ("cuda", "triton", "torch")}
    angles = angles64(grid, D).to("cuda")
    for i, (x, w) in enumerate(((q, wq), (k, wk))):
        want = rope64(rms64(x, w).unflatten(-1, (H, D)), angles)
        bound = float_bound(rel_err(outs["torch"][i], want), torch.float32)
        # Each within its bound of float64, so the two within the sum of their bounds of each other.
        assert rel_err(outs["cuda"][i], want) <= bound and rel_err(outs["triton"][i], want) <= bound
        assert rel_err(outs["cuda"][i], outs["triton"][i]) <= 2 * bound
        del want
    x = randn((32760, 5120), 12, "cuda", scale=3.0).bfloat16()
    for qdtype in QDTYPES:
        ca, cb = quantize_per_token(x, qdtype, backend="cuda"), quantize_per_token(x, qdtype, backend="triton")
        assert torch.equal(ca[1], cb[1]) and torch.equal(ca[0].view(torch.uint8), cb[0].view(torch.uint8))


# ----------------------------------------------------------------------------------------------------
# Compile check without a GPU: the Triton kernels at Wan's sizes compile for sm_90a
# (tests/compile_check.py). ~10 s, so opt-in:
#     DIT8_SM90_COMPILE=1 python -m pytest tests/test_fused_ops.py -k hopper
# ----------------------------------------------------------------------------------------------------

def sm90_reports() -> dict[str, dict]:
    """Compile every Triton kernel configuration used at Wan's sizes for sm_90a, specialized as the JIT
    does (C and the strides are multiples of 16 there); {configuration: compile_check report} (run in a
    process without TRITON_INTERPRET)."""
    import triton
    from compile_check import compile_kernel

    from dit8.kernels import fused_triton as ft

    aligned = ("C", "stride_x", "stride_shift", "stride_scale", "stride_qb", "stride_ql", "stride_kb", "stride_kl",
               "stride_y")

    def report(kernel, pointers, constexprs, num_warps) -> dict:
        types = {n: "*" + t for n, t in pointers.items()} | {"eps": "fp32", "n": "fp32"}
        return compile_kernel(kernel, types, constexprs, num_warps=num_warps, aligned=aligned) | {"warps": num_warps}

    result = {}
    rows_ptrs = lambda xd, od: dict(X=xd, Out=od, **dict.fromkeys(["OutScale", "W", "Bias", "Shift", "Scale"], "fp32"))
    for xd, od, out, norm, mod, C in [("fp32", "fp8e4nv", 3, 1, True, 5120), ("fp32", "bf16", 1, 1, True, 5120),
                                      ("fp32", "i8", 2, 1, False, 5120), ("bf16", "fp8e4nv", 3, 0, False, 5120),
                                      ("bf16", "fp8e4nv", 3, 0, False, 13824), ("bf16", "bf16", 1, 2, False, 5120),
                                      ("fp32", "fp8e4nv", 3, 1, True, 40000)]:
        tile = triton.next_power_of_2(C)
        block, tail = ft.row_tiles(C) if tile <= ft.MAX_TILE else (ft.CHUNK, 0)
        result[f"rows {xd}->{od} norm={norm} C={C}"] = report(
            ft._rows_kernel, rows_ptrs(xd, od),
            dict(NORM=norm, ACT=int(C == 13824), HAS_W=not mod and norm == 1, HAS_B=not mod and norm == 1,
                 HAS_MOD=mod, OUT=out, BLOCK_C=block, TAIL_C=tail, SINGLE=tile <= ft.MAX_TILE,
                 EXACT=tile <= ft.MAX_TILE and block + tail == C, PREFETCH=False, INTERPRET=False),
            ft._num_warps(block + tail))
    for od, out in [("bf16", 1), ("fp8e4nv", 3), ("i8", 2), ("fp32", 0)]:
        ptrs = dict(Q="bf16", K="bf16", QOut=od, KOut=od,
                    **dict.fromkeys(["WQ", "WK", "Cos", "Sin", "QScale", "KScale"], "fp32"))
        result[f"qk_norm_rope bf16->{od}"] = report(
            ft._qk_norm_rope_kernel, ptrs,
            dict(HEAD_DIM=128, BLOCK_H=32, TAIL_H=8, BLOCK_D=128, OUT=out, INTERPRET=False), ft._num_warps(5120))
    for yd in ("bf16", "fp32"):
        result[f"residual_add {yd}"] = report(
            ft._residual_add_kernel, dict(X="fp32", Y=yd, Gate="fp32", Out="fp32"),
            dict(HAS_GATE=True, BLOCK=ft.RESIDUAL_BLOCK), 4)
    return result


@pytest.mark.skipif(CUDA or __import__("os").environ.get("DIT8_SM90_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_SM90_COMPILE=1")
def test_triton_kernels_compile_for_hopper():
    from compile_check import run_without_interpreter

    reports = run_without_interpreter("test_fused_ops", "sm90_reports")
    assert len(reports) == 13 and all(r["registers"] > 0 for r in reports.values()), reports  # ptxas accepted
    # No spills (in the chunked path for rows longer than a tile, not Wan's, none inside its loops: with
    # triton 3.6 it spills 4 bytes outside them), and every global load and store of the data at least
    # 32 bits wide (16 bytes where the row allows): these kernels are bound by memory bandwidth, and
    # element-wise 8/16-bit accesses would halve it or worse.
    assert reports["rows fp32->fp8e4nv norm=1 C=40000"]["loop_instructions"] > 0  # its loops were found
    assert not {k: r["spills"] for k, r in reports.items()
                if (r["local_in_loops"] if "C=40000" in k else r["spills"])}
    assert not {k: r["narrow_global_accesses"] for k, r in reports.items() if r["narrow_global_accesses"]}
    # Two programs or more an SM (_num_warps): the rows of one program are read, reduced and written in
    # turn, so a lone program leaves the memory system idle between its loads. An SM holds 2048 threads
    # and 65,536 registers, allocated per thread in multiples of 8.
    programs = {k: min(2048 // (32 * r["warps"]), 65536 // (-(-r["registers"] // 8) * 8 * 32 * r["warps"]))
                for k, r in reports.items() if not k.startswith("residual_add")}
    assert all(n >= 2 for n in programs.values()), programs


def test_triton_e4m3_outputs_are_refused_before_sm89(monkeypatch):
    """Triton has no e4m3 type before sm_89 (A100, RTX 30xx): the rows and q/k kernels refuse FP8 codes there
    with a NoFP8Error naming the op, instead of failing inside the compiler."""
    from dit8.kernels import registry

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(registry, "_capability", lambda device: (8, 0))  # an A100, without touching CUDA
    for op in ("layer_norm_modulate_quant", "qk_norm_rope_quant"):
        with pytest.raises(registry.NoFP8Error, match=f"{op} to float8_e4m3fn with backend='triton' needs FP8 "
                                                      "tensor cores .* sm_80: use int8, or backend='cuda' or 'torch'"):
            fused_triton._require_e4m3(op, FP8, cuda)
        fused_triton._require_e4m3(op, torch.int8, cuda)
    monkeypatch.setattr(registry, "_capability", lambda device: (8, 9))
    fused_triton._require_e4m3("quantize_per_token", FP8, cuda)
    fused_triton._require_e4m3("quantize_per_token", FP8, torch.device("cpu"))  # the interpreter


def test_fp8_refusals_are_reported_as_skips():
    """The tests' and benchmarks' report hook turns a NoFP8Error (and only that) into a skip giving its reason."""
    from types import SimpleNamespace

    from dit8.kernels.registry import BackendError, NoFP8Error
    from dit8.testing import fp8_refusal_as_skip

    item = SimpleNamespace(path="tests/t.py", location=("tests/t.py", 7, "test_x"))
    for error, outcome in ((NoFP8Error("op needs FP8 tensor cores"), "skipped"), (BackendError("other"), "failed")):
        for when, want in (("call", outcome), ("setup", "failed")):
            with pytest.raises(BackendError) as raised:
                raise error
            call = SimpleNamespace(when=when, excinfo=raised)
            report = SimpleNamespace(outcome="failed", longrepr="traceback")
            fp8_refusal_as_skip(item, call, report)
            assert report.outcome == want
            if want == "skipped":
                assert report.longrepr == ("tests/t.py", 7, "Skipped: op needs FP8 tensor cores")
