"""quantize_per_token and scaled_mm torch references against float64 computations.

Tolerances are derived from the rounding each step is allowed: u32 = 2^-24 per fp32 operation, one
rounding of the output dtype (u = 2^-8 for bf16, 2^-11 for fp16), and for fp8 accumulation the
standard bound |Σ fl - Σ exact| <= K·u32·Σ|x·w|.
"""

from __future__ import annotations

import math

import pytest
import torch

from dit8.kernels import BackendError, OpArgumentError, quantize_per_token, scaled_mm
from dit8.kernels.quantize import QMAX, SCALE_FLOOR
from dit8.kernels.triton_support import interpreting
from dit8.testing import random_w8a8_operands

FP8 = torch.float8_e4m3fn
QDTYPES = (torch.int8, FP8)
U32 = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SHAPES = [(77, 61), (1, 1), (3, 200), (128, 256), (16, 4096)]  # (M, K), mostly not multiples of 16/128


def _randn(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes, as activations have.
    return (torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[0])[:, None]).to(dtype)


# --------------------------------------------------------------------------------- quantize_per_token


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_matches_float64(shape, qdtype, xdtype):
    x = _randn(shape, seed=shape[0] * 7919 + shape[1], dtype=xdtype)
    q, scale = quantize_per_token(x, qdtype)
    assert q.dtype == qdtype and q.shape == x.shape and scale.dtype == torch.float32 and scale.shape == (shape[0],)

    x64 = x.double()
    qmax = QMAX[qdtype]
    want_scale = x64.abs().amax(1).clamp_min(SCALE_FLOOR) / qmax
    # One fp32 rounding of the division (amax itself is exact in fp32).
    torch.testing.assert_close(scale.double(), want_scale, rtol=U32, atol=0)

    y = x64 / scale.double()[:, None]  # the exact value each element is rounded from
    qf = q.double()
    assert qf.abs().max() <= qmax
    if qdtype == torch.int8:
        # Round to nearest; y carries at most one fp32 rounding (relative u32) before it.
        assert ((qf - y).abs() <= 0.5 + y.abs() * 2 * U32).all()
        # Away from ties the result is exactly round-half-even of the float64 value.
        far = ((y - y.floor()) - 0.5).abs() > 1e-5
        assert torch.equal(qf[far], y.round()[far])
    else:
        # e4m3: 3 mantissa bits, so half a spacing is <= |y|·2^-4 (normal) or 2^-10 (subnormal).
        assert ((qf - y).abs() <= torch.maximum(y.abs() * 2.0 ** -4, torch.full_like(y, 2.0 ** -10)) * (1 + 1e-6)).all()
        assert not torch.isnan(qf).any()
    # The largest element of every (non-zero) row lands on ±qmax.
    assert (qf.abs().amax(1) == qmax).all()


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_half_inputs_equal_their_fp32_upcast(xdtype, qdtype):
    x = _randn((33, 70), seed=3, dtype=xdtype)
    q, s = quantize_per_token(x, qdtype)
    q32, s32 = quantize_per_token(x.float(), qdtype)
    assert torch.equal(q.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(s, s32)


def test_int8_rounds_half_to_even():
    # amax 127 makes the scale exactly 1, so the ties are exact.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]])
    q, s = quantize_per_token(x, torch.int8)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_zero_row_gets_floor_scale_and_zeros(qdtype):
    x = torch.zeros(3, 9)
    x[1] = torch.linspace(-1, 1, 9)
    q, s = quantize_per_token(x, qdtype)
    assert s[0].item() == pytest.approx(SCALE_FLOOR / QMAX[qdtype], rel=1e-6)
    assert (q[0].float() == 0).all() and (q[2].float() == 0).all()
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_tiny_rows_keep_their_own_scale(qdtype):
    # The floor only keeps all-zero rows finite (1e-12): a row of magnitude 1e-9 still spans the full code
    # range, its scale amax / qmax.
    x = torch.tensor([[1e-9, -5e-10, 2.5e-10]])
    q, s = quantize_per_token(x, qdtype)
    assert s.item() == pytest.approx(1e-9 / QMAX[qdtype], rel=1e-6)
    assert q[0, 0].float().item() == QMAX[qdtype]


def test_fp8_never_nan_at_extreme_magnitudes():
    x = torch.tensor([[3e38, -3e38, 1.0], [1e-30, -1e-30, 0.0], [448.0, 447.0, -448.0]])
    q, s = quantize_per_token(x, FP8)
    assert not torch.isnan(q.float()).any() and torch.isfinite(s).all()
    assert q[0, 0].float().item() == 448.0 and q[0, 1].float().item() == -448.0


def test_quantize_per_token_argument_errors():
    x = torch.randn(4, 8)
    with pytest.raises(OpArgumentError, match="x must have 2 dimensions"):
        quantize_per_token(x[None], torch.int8)
    with pytest.raises(OpArgumentError, match="x has dtype"):
        quantize_per_token(x.to(torch.int32), torch.int8)
    with pytest.raises(OpArgumentError, match="dtype must be one of"):
        quantize_per_token(x, torch.float16)
    with pytest.raises(OpArgumentError, match="rows must not be empty"):
        quantize_per_token(torch.randn(4, 0), torch.int8)
    with pytest.raises(OpArgumentError, match="must be a torch.Tensor"):
        quantize_per_token([[1.0]], torch.int8)
    with pytest.raises(BackendError):
        quantize_per_token(x, torch.int8, backend="nope")
    with pytest.raises(BackendError):
        quantize_per_token(x, torch.int8, backend="cuda")  # no CUDA backend on CPU tensors


# ---------------------------------------------------------------------------------------- scaled_mm


def _operands(M, N, K, qdtype, seed):
    return random_w8a8_operands(M, N, K, qdtype, seed=seed)


def _reference(xq, xs, wq, ws, bias):
    """float64 result and a float64 bound on |products| (for accumulation error)."""
    x, w = xq.double(), wq.double()
    acc = x @ w.t()
    absacc = x.abs() @ w.abs().t()
    scale = xs.double()[:, None] * ws.double()[None, :]
    out = acc * scale + (0 if bias is None else bias.double()[None, :])
    return out, absacc * scale


@pytest.mark.parametrize("MNK", [(77, 45, 61), (1, 1, 1), (3, 200, 33), (64, 128, 256), (5, 7, 1000)])
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_matches_float64(MNK, qdtype, out_dtype, with_bias):
    M, N, K = MNK
    xq, xs, wq, ws, bias = _operands(M, N, K, qdtype, seed=M * 1000 + N + K)
    bias = bias.to(out_dtype) if with_bias else None
    out = scaled_mm(xq, xs, wq, ws, bias, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    ref, mag = _reference(xq, xs, wq, ws, bias)
    # int8 sums are exact (|acc| < 2^24 here, so even the fp32 conversion is exact); fp8 sums carry
    # K·u32 relative to Σ|x·w|. The epilogue adds ~3 fp32 roundings, the output one of its dtype.
    accum = 0.0 if qdtype == torch.int8 else K * U32
    b = 0 if bias is None else bias.double().abs()[None, :]
    bound = accum * mag + 4 * U32 * (mag + b) + UNIT_ROUNDOFF[out_dtype] * ref.abs() + 1e-30
    assert ((out.double() - ref).abs() <= bound).all()


def test_scaled_mm_int8_accumulation_is_exact():
    M, N, K = 9, 11, 1000
    xq, _, wq, _, _ = _operands(M, N, K, torch.int8, seed=7)
    ones_m, ones_n = torch.ones(M), torch.ones(N)
    out = scaled_mm(xq, ones_m, wq, ones_n, out_dtype=torch.float32)
    exact = xq.long() @ wq.long().t()  # |exact| < 2^24, so it is exact in fp32
    assert torch.equal(out, exact.float())


def test_w8a8_composition_approximates_float_matmul():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(40, 96, generator=gen)
    w = torch.randn(24, 96, generator=gen) / 10
    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for qdtype in (torch.int8, FP8):
        xq, xs = quantize_per_token(x, qdtype)
        wq, ws = quantize_per_token(w, qdtype)
        out = scaled_mm(xq, xs, wq, ws, out_dtype=torch.float32)
        # Independent random rounding errors of the two operands add in quadrature in the product.
        err_x, err_w = rel(xq.double() * xs.double()[:, None], x), rel(wq.double() * ws.double()[:, None], w)
        assert rel(out, x.double() @ w.double().t()) < 2 * math.hypot(err_x, err_w)


def test_scaled_mm_argument_errors():
    xq, xs, wq, ws, bias = _operands(4, 5, 6, torch.int8, seed=1)
    fq, _, fw, _, _ = _operands(4, 5, 6, FP8, seed=1)
    cases = [
        (dict(xq=xq.float()), "xq has dtype"),
        (dict(wq=fw), "must have the same dtype"),
        (dict(xq=fq), "must have the same dtype"),
        (dict(wq=wq[:, :5]), "disagree on K"),
        (dict(xq=xq[None]), "xq must have 2 dimensions"),
        (dict(x_scale=xs[:, None]), "x_scale has shape"),
        (dict(x_scale=xs[:3]), "x_scale has shape"),
        (dict(w_scale=ws.bfloat16()), "w_scale has dtype"),
        (dict(bias=bias[:4]), "bias has shape"),
        (dict(bias=bias.long()), "bias has dtype"),
        (dict(out_dtype=torch.int8), "out_dtype must be one of"),
        (dict(x_scale=xs.to("meta")), "x_scale is on meta"),
        (dict(wq=wq.to("meta")), "wq is on meta"),
    ]
    for override, message in cases:
        args = dict(xq=xq, x_scale=xs, wq=wq, w_scale=ws, bias=bias, out_dtype=torch.bfloat16)
        args.update(override)
        with pytest.raises(OpArgumentError, match=message):
            scaled_mm(**args)
    with pytest.raises(BackendError):
        scaled_mm(xq, xs, wq, ws, backend="cuda")  # no CUDA backend for CPU tensors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scaled_mm_takes_an_empty_batch_with_its_gate(backend):
    """M = 0 rows of B = 0 samples, as residual_add takes them: an empty [0, N] result, not a complaint that
    the gate's 0 rows do not divide the 0 rows."""
    if backend == "triton" and not interpreting():
        pytest.skip("the triton backend on CPU tensors needs the interpreter (TRITON_INTERPRET=1)")
    xq, xs, wq, ws, bias = _operands(0, 5, 6, torch.int8, seed=1)
    out = scaled_mm(xq, xs, wq, ws, bias, residual=torch.zeros(0, 5), gate=torch.zeros(0, 5), backend=backend)
    assert out.shape == (0, 5) and out.dtype == torch.float32
    with pytest.raises(OpArgumentError, match="gate has 0 rows, which do not divide the 4 rows"):
        scaled_mm(*_operands(4, 5, 6, torch.int8, seed=1)[:4], residual=torch.zeros(4, 5), gate=torch.zeros(0, 5))


@pytest.mark.parametrize("MNK", [(77, 45, 61), (64, 128, 256), (5, 7, 1000)])
@pytest.mark.parametrize("epilogue", ["gelu_tanh", "gated_residual", "residual"])
def test_scaled_mm_epilogues_match_float64(MNK, epilogue):
    """The reference's fused epilogues, which the kernels' error budgets are measured by: with INT8's exact
    sums, what is left is the epilogue's fp32 arithmetic, a few roundings (8 units of fp32 in norm; GELU's
    tanh form evaluated in fp32 keeps its relative error near one unit where its output is not tiny)."""
    M, N, K = MNK
    xq, xs, wq, ws, bias = _operands(M, N, K, torch.int8, seed=M + N + K)
    gen = torch.Generator().manual_seed(K)
    residual, gate = torch.randn(M, N, generator=gen), torch.randn(1, N, generator=gen)
    y = (xq.double() @ wq.double().t()) * xs.double()[:, None] * ws.double()[None, :] + bias.double()[None, :]
    if epilogue == "gelu_tanh":
        out = scaled_mm(xq, xs, wq, ws, bias, torch.float32, activation="gelu_tanh")
        ref = want = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    else:
        gated = epilogue == "gated_residual"
        out = scaled_mm(xq, xs, wq, ws, bias, residual=residual, gate=gate if gated else None)
        want = gate.double() * y if gated else y
        ref = residual.double() + want
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert ((out.double() - ref).norm() / want.norm()).item() <= 8 * U32
