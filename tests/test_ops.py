"""The op layer: registry and backend selection, argument checks, torch references against float64."""

import math
import os

import pytest
import torch

from dit8 import kernels as ops
from dit8.kernels import BackendError, OpArgumentError
from dit8.rope import rope_axis_widths, rope_table


# The torch reference ops in fp32 against float64: each output element carries a handful of fp32 roundings
# (and the reductions' summation error over at most a few hundred terms), well within 16 units of 2^-24.
FP32_FEW_ROUNDINGS = 16 * 2.0 ** -24


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_every_op_has_a_torch_reference_on_cpu():
    backends = ops.available_backends("cpu")
    for op in ("linear", "layer_norm", "layer_norm_modulate", "rms_norm", "rope", "attention",
               "cross_attention", "activation", "residual_add"):
        assert "torch" in backends[op], op
    with pytest.raises(BackendError, match="'gpu' is not a device name"):
        ops.available_backends("gpu")


def test_explicit_backend_is_strict():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert ops.linear(x, w, backend="torch").shape == (3, 5)
    with pytest.raises(BackendError, match="cuda"):
        ops.linear(x, w, backend="cuda")
    with pytest.raises(BackendError, match="unknown backend"):
        ops.linear(x, w, backend="fast")


def test_an_explicit_backend_that_cannot_run_says_why(monkeypatch):
    from dit8.kernels import cuda_ext, registry

    x = torch.randn(3, 8)
    with pytest.raises(BackendError, match=r"rope: there is no 'triton' kernel of this op, on any device; "
                                           r"its backends: \['torch'\]"):
        ops.rope(torch.randn(1, 3, 2, 8), torch.randn(3, 4), torch.randn(3, 4), backend="triton")
    with pytest.raises(BackendError, match="cannot run on cpu tensors here .the CUDA kernels take CUDA tensors"):
        ops.quantize_per_token(x, torch.int8, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="cannot run on cpu tensors here .on CPU tensors the Triton kernels run "
                                           "only in the interpreter: TRITON_INTERPRET=1"):
        ops.quantize_per_token(x, torch.int8, backend="triton")
    # A GPU where the CUDA extension cannot be built: the error gives the build's reason.
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    monkeypatch.delenv("DIT8_CUDA_EXT", raising=False)

    def load():
        raise cuda_ext.CudaExtError("cannot build the CUDA extension: missing nvcc (the CUDA toolkit; set CUDA_HOME)")

    monkeypatch.setattr(cuda_ext, "load", load)
    cuda_ext._load_error.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CUDA kernels unavailable"), \
                pytest.raises(BackendError, match=r"quantize_per_token: backend 'cuda' cannot run on cuda tensors here "
                                                  r"\(cannot build the CUDA extension: missing nvcc"):
            registry.resolve("quantize_per_token", "cuda", gpu)
    finally:
        cuda_ext._load_error.cache_clear()
    monkeypatch.setenv("DIT8_CUDA_EXT", "0")
    with pytest.raises(BackendError, match=r"cannot run on cuda tensors here \(the CUDA extension is disabled "
                                           r"\(DIT8_CUDA_EXT=0\)\)"):
        registry.resolve("quantize_per_token", "cuda", gpu)


def test_without_triton_an_op_asked_for_its_kernels_says_how_to_install_it(monkeypatch):
    """dit8 installed without its [triton] extra: "auto" runs the torch reference, and a call only the Triton
    kernels can serve names the extra (8-bit attention has no torch reference to offer in their place)."""
    from dit8.kernels import triton_support

    monkeypatch.setattr(triton_support, "_TRITON_INSTALLED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 8)
    xq, scale = ops.quantize_per_token(x, torch.int8)
    torch.testing.assert_close(xq.float() * scale[:, None], x, atol=scale.max().item(), rtol=0)
    with pytest.raises(BackendError, match=r"quantize_per_token: backend 'triton' cannot run on cpu tensors here "
                                           r"\(triton is not installed: pip install 'dit8\[triton\]'\); "
                                           r"usable: \['torch'\]"):
        ops.quantize_per_token(x, torch.int8, backend="triton")
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(BackendError, match=r"attention: backend 'triton' cannot run .*; usable: \[\]$"):
        ops.attention(q, q, q, precision="int8", backend="triton")
    with pytest.raises(BackendError, match=r"attention: this path has no torch reference; .*TRITON_INTERPRET=1\); "
                                           r"triton is not installed: pip install 'dit8\[triton\]'$"):
        ops.attention(q, q, q, precision="int8")


def test_environment_variable_sets_the_default(monkeypatch):
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    monkeypatch.setenv("DIT8_BACKEND", "torch")
    torch.testing.assert_close(ops.linear(x, w), x @ w.T)
    monkeypatch.setenv("DIT8_BACKEND", "cuda")  # an op without that backend falls back to auto's order
    torch.testing.assert_close(ops.linear(x, w), x @ w.T)
    monkeypatch.setenv("DIT8_BACKEND", "bogus")
    with pytest.raises(BackendError, match="DIT8_BACKEND"):
        ops.linear(x, w)


@pytest.mark.parametrize("call, match", [
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 6)), r"x has shape \(3, 4\)"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randint(0, 3, (5, 4))), "weight has dtype"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, dtype=torch.float64)), "bias"),
    (lambda: ops.linear(torch.randn(3, 4, device="meta"), torch.randn(5, 4)), "on meta"),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(7), eps=1e-6), "weight has shape"),
    (lambda: ops.rope(torch.randn(1, 3, 2, 8), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4)), "cos"),
    (lambda: ops.attention(torch.randn(1, 3, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8)), "v has shape"),
    (lambda: ops.attention(torch.randn(1, 3, 2, 8), torch.randn(1, 4, 2, 8).half(), torch.randn(1, 4, 2, 8)),
     "k has dtype"),
    (lambda: ops.attention(*(torch.randn(1, 3, 2, 8),) * 3, precision="fp4"), "precision"),
    (lambda: ops.attention(*(torch.randn(1, 3, 2, 8),) * 3, precision="int8", backend="torch"), "int8"),
    (lambda: ops.residual_add(torch.randn(1, 3, 4).half(), torch.randn(1, 3, 4)), "x has dtype"),
    (lambda: ops.residual_add(torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(2, 4)), "gate"),
    (lambda: ops.activation(torch.randn(3), "relu"), "kind"),
    (lambda: ops.cross_attention(*(torch.randn(1, 3, 2, 8),) * 3, k_img=torch.randn(1, 3, 2, 8)), "both"),
    (lambda: ops.layer_norm(torch.randn(2, 8), eps=1e-6, out_dtype=torch.int8), "out_dtype must be"),
    (lambda: ops.layer_norm(torch.tensor(1.0), eps=1e-6), "x must have at least one dimension"),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(8), eps=1e-6, out_dtype="bf16"), "out_dtype must be"),
    (lambda: ops.layer_norm_modulate(torch.randn(1, 2, 8), *(torch.randn(1, 8),) * 2, eps=1e-6,
                                     out_dtype=torch.int8), "out_dtype must be"),
    (lambda: ops.rope(torch.randn(1, 3, 2, 8), torch.randn(3, 4), torch.randn(3, 4), out_dtype=torch.int8),
     "out_dtype must be"),
    (lambda: ops.rope(torch.randn(1, 3, 2, 7), torch.randn(3, 3), torch.randn(3, 3)), "must be even"),
    (lambda: ops.attention(*(torch.randn(1, 3, 2, 0),) * 3), "head_dim must not be 0"),
    (lambda: ops.attention(torch.randn(1, 3, 2, 8), *(torch.randn(1, 0, 2, 8),) * 2, backend="torch"), "k has no keys"),
    (lambda: ops.cross_attention(*(torch.randn(1, 3, 2, 8),) * 3, torch.randn(1, 3, 2, 8).half(),
                                 torch.randn(1, 3, 2, 8)), "k_img has dtype"),
    (lambda: ops.cross_attention(*(torch.randn(1, 3, 2, 8),) * 3, torch.randn(1, 3, 2, 8), torch.randn(1, 4, 2, 8)),
     "v_img has shape"),
    (lambda: ops.cross_attention(*(torch.randn(1, 3, 2, 8),) * 3, *(torch.randn(1, 0, 2, 8),) * 2, backend="torch"),
     "k_img has no keys"),
    (lambda: ops.layer_norm(torch.randn(2, 3, 0), eps=1e-6, backend="torch"), "rows must not be empty"),
    (lambda: ops.rms_norm(torch.randn(2, 0), torch.randn(0), eps=1e-6, backend="torch"), "rows must not be empty"),
    (lambda: ops.layer_norm_modulate(torch.randn(1, 2, 0), *(torch.randn(1, 0),) * 2, eps=1e-6, backend="torch"),
     "rows must not be empty"),
    (lambda: ops.qk_norm_rope_quant(*(torch.randn(1, 3, 0),) * 2, *(torch.ones(0),) * 2, *(torch.ones(3, 0),) * 2,
                                    heads=2, eps=1e-6, dtype=torch.int8, backend="torch"),
     r"qk_norm_rope_quant: q has shape \(1, 3, 0\); rows must not be empty"),
    (lambda: ops.layer_norm(torch.randn(2, 8), eps=None), "eps must be a finite number"),
    (lambda: ops.layer_norm(torch.randn(2, 8), eps=10 ** 400), "eps must be a finite number"),  # past float
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(8), eps=-1.0), "eps must be a finite number"),
    (lambda: ops.layer_norm_modulate(torch.randn(1, 2, 8), *(torch.randn(1, 8),) * 2, eps=float("nan")),
     "eps must be a finite number"),
    (lambda: ops.qk_norm_rope(*(torch.randn(1, 3, 8),) * 2, *(torch.ones(8),) * 2, *(torch.ones(3, 2),) * 2,
                              heads=2, eps="1e-6"), "eps must be a finite number"),
    (lambda: ops.layer_norm_quant(torch.randn(2, 8), eps=True, dtype=torch.int8), "eps must be a finite number"),
    (lambda: ops.qk_norm_rope(*(torch.randn(1, 3, 8),) * 2, *(torch.ones(8),) * 2, *(torch.ones(3, 4),) * 2,
                              heads=True, eps=1e-6), "heads must be a positive int, got True"),
    (lambda: ops.qk_norm_rope(*(torch.randn(1, 3, 8),) * 2, *(torch.ones(8),) * 2, *(torch.ones(3, 2),) * 2,
                              heads=2.0, eps=1e-6), r"heads must be a positive int, got 2\.0"),
    (lambda: ops.qk_norm_rope_quant(*(torch.randn(1, 3, 8),) * 2, *(torch.ones(8),) * 2, *(torch.ones(3, 2),) * 2,
                                    heads=0, eps=1e-6, dtype=torch.int8), "heads must be a positive int, got 0"),
    (lambda: ops.qk_norm_rope(*(torch.randn(1, 3, 8),) * 2, *(torch.ones(8),) * 2, *(torch.ones(3, 2),) * 2,
                              heads=3, eps=1e-6), "width 8 is not a multiple of heads=3"),
    # An integer x would be cast to the weight's dtype without a word.
    (lambda: ops.linear(torch.randint(0, 3, (3, 4)), torch.randn(5, 4)), "x must be a floating-point tensor"),
    # A bias of another float dtype than the weight's would fail inside F.linear, naming no argument.
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5).bfloat16()), "bias has dtype"),
    (lambda: ops.qk_norm_rope_quant(*(torch.randn(1, 3, 8),) * 2, *(torch.ones(8),) * 2, *(torch.ones(3, 2),) * 2,
                                    heads=2, eps=1e-6, dtype=torch.float16), "dtype must be one of"),
    (lambda: ops.rms_norm(torch.tensor(1.0), torch.ones(1), eps=1e-6), "x must have at least one dimension"),
])
def test_bad_arguments_name_the_op_and_argument(call, match):
    with pytest.raises(OpArgumentError, match=match):
        call()


def test_kernels_refuse_inputs_that_require_grad_while_autograd_records():
    """The kernel backends have no backward: an output of theirs would silently drop out of a gradient.
    The torch reference differentiates; under no_grad the kernels run."""
    from dit8.kernels.registry import _OPS
    from dit8.kernels.triton_support import interpreting

    q = torch.randn(1, 4, 2, 16, requires_grad=True)
    assert ops.attention(q, q, q, backend="torch").grad_fn is not None
    for op, impls in _OPS.items():
        for backend, impl in impls.items():
            if backend == "torch":
                continue
            # Refused before anything runs: the arguments are not even looked at.
            with pytest.raises(BackendError, match=f"{op}: .* requires grad, and the {backend} kernels compute no "
                                                   "gradients; call under torch.no_grad"):
                impl.fn(q, q, q, q, q, q, q, q, q, q)
    if interpreting():
        with pytest.raises(BackendError, match="attention: q requires grad"):
            ops.attention(q, q.detach(), q.detach(), backend="triton")
        with torch.no_grad():
            kernel, reference = ops.attention(q, q, q, backend="triton"), ops.attention(q, q, q, backend="torch")
            torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)


def test_layer_norm_modulate_against_float64():
    x, shift, scale = torch.randn(2, 37, 48) * 3 + 1, torch.randn(2, 48), torch.randn(2, 48)
    x64 = x.double()
    normed = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-6)
    ref = normed * (1 + scale.double()[:, None]) + shift.double()[:, None]
    out = ops.layer_norm_modulate(x.bfloat16(), shift, scale, eps=1e-6, out_dtype=torch.float32)
    # bf16 input: the only error is the input rounding, which LayerNorm passes through (~2^-9).
    assert rel_err(out, ref) < 2 * rel_err(x.bfloat16(), x)
    out32 = ops.layer_norm_modulate(x, shift, scale, eps=1e-6, out_dtype=torch.float32)
    assert rel_err(out32, ref) < FP32_FEW_ROUNDINGS


def rms_norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float64: eps inside the root, then the weight."""
    x64 = x.double()
    return x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps) * w.double()


def test_rms_norm_against_float64():
    x, w = torch.randn(5, 33, 64), torch.randn(64)
    ref = rms_norm64(x, w, 1e-6)
    assert rel_err(ops.rms_norm(x, w, eps=1e-6), ref) < FP32_FEW_ROUNDINGS


def test_norm_references_take_their_eps():
    """Rows of mean square ~1e-6, where an eps of 1e-4 dominates (F.layer_norm's default is 1e-5): the
    references add it inside the root. The float64 tests above have variances far above eps, where
    dropping it stays within fp32 error, and the kernels' eps test bounds them by the reference's error."""
    eps = 1e-4
    x, w, b = torch.randn(4, 64) * 1e-3, torch.randn(64), torch.randn(64)
    assert rel_err(ops.rms_norm(x, w, eps=eps), rms_norm64(x, w, eps)) < FP32_FEW_ROUNDINGS
    x64 = x.double()
    centred = x64 - x64.mean(-1, keepdim=True)
    ln = centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + eps) * w.double() + b.double()
    assert rel_err(ops.layer_norm(x, w, b, eps=eps), ln) < FP32_FEW_ROUNDINGS


def test_eps_zero_is_a_valid_epsilon():
    # eps must be a finite number >= 0: 0 (int or float) is the plain normalisation.
    x, w = torch.randn(3, 16), torch.randn(16)
    ref = rms_norm64(x, w, 0)
    for eps in (0, 0.0):
        assert rel_err(ops.rms_norm(x, w, eps=eps), ref) < FP32_FEW_ROUNDINGS
        assert ops.layer_norm(x, eps=eps).isfinite().all()


def test_out_dtype_defaults_to_the_inputs_dtype():
    bf16 = torch.bfloat16
    x, w = torch.randn(2, 3, 8, dtype=bf16), torch.ones(8)
    shift, scale = torch.zeros(2, 8), torch.zeros(2, 8)
    cos, sin = torch.ones(3, 2), torch.zeros(3, 2)
    assert ops.layer_norm(x, eps=1e-6).dtype == bf16
    assert ops.layer_norm_modulate(x, shift, scale, eps=1e-6).dtype == bf16
    assert ops.rms_norm(x, w, eps=1e-6).dtype == bf16
    assert ops.rope(x.unflatten(-1, (2, 4)), cos, sin).dtype == bf16
    assert all(t.dtype == bf16 for t in ops.qk_norm_rope(x, x, w, w, cos, sin, heads=2, eps=1e-6))
    assert ops.rms_norm(x, w, eps=1e-6, out_dtype=torch.float32).dtype == torch.float32


def test_rope_equals_complex_rotation_in_float64():
    grid, head_dim = (3, 5, 7), 128
    cos, sin = rope_table(grid, head_dim)
    x = torch.randn(2, math.prod(grid), 3, head_dim)
    # Official form: interleaved pairs as complex numbers times polar(1, angle).
    angles = torch.atan2(sin.double(), cos.double())
    ref = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
                             * torch.polar(torch.ones_like(angles), angles)[:, None, :]).flatten(-2)
    assert rel_err(ops.rope(x, cos, sin, out_dtype=torch.float32), ref) < FP32_FEW_ROUNDINGS


def test_qk_norm_rope_against_float64():
    """The reference composes rms_norm over the full width (all heads together) with each head's rotation:
    against that in float64, with the angles the tables hold, within a few fp32 roundings."""
    grid, heads, head_dim = (2, 3, 4), 3, 16
    cos, sin = rope_table(grid, head_dim)
    angles = torch.atan2(sin.double(), cos.double())
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    gen = torch.Generator().manual_seed(24)
    q, k = (torch.randn(2, 24, heads * head_dim, generator=gen) * 3 + 1 for _ in range(2))
    wq, wk = torch.randn(heads * head_dim, generator=gen), torch.randn(heads * head_dim, generator=gen)
    out_q, out_k = ops.qk_norm_rope(q, k, wq, wk, cos, sin, heads=heads, eps=1e-6, out_dtype=torch.float32)
    for x, w, out in ((q, wq, out_q), (k, wk, out_k)):
        normed = rms_norm64(x, w, 1e-6).unflatten(-1, (heads, head_dim))
        want = torch.view_as_real(torch.view_as_complex(normed.unflatten(-1, (-1, 2)).contiguous())
                                  * rotation).flatten(-2)
        assert out.shape == (2, 24, heads, head_dim)
        assert rel_err(out, want) < FP32_FEW_ROUNDINGS


def test_rope_table_angles():
    assert rope_axis_widths(128) == (44, 42, 42)
    grid = (2, 3, 4)
    cos, sin = rope_table(grid, 128)
    assert cos.shape == (24, 64) and cos.dtype == torch.float32
    token = 1 * 12 + 2 * 4 + 3  # frame 1, row 2, column 3
    angle = torch.atan2(sin[token].double(), cos[token].double())
    expected = torch.cat([1 * 10000 ** (-torch.arange(0, 44, 2, dtype=torch.float64) / 44),
                          2 * 10000 ** (-torch.arange(0, 42, 2, dtype=torch.float64) / 42),
                          3 * 10000 ** (-torch.arange(0, 42, 2, dtype=torch.float64) / 42)])
    wrapped = torch.remainder(expected + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(angle, wrapped, atol=1e-6, rtol=0)


def test_rope_table_angles_are_float64_up_to_the_last_position():
    # Angles reach 1023 radians on the last position: built in fp32 they would be off by ~1e-4 (the
    # official table is float64, rounded to fp32 only as cos/sin). Each axis in turn runs to the end.
    from dit8.rope import MAX_POSITIONS

    widths = (44, 42, 42)
    for axis in range(3):
        grid = tuple(MAX_POSITIONS if a == axis else 1 for a in range(3))
        cos, sin = rope_table(grid, 128)
        pos = torch.arange(MAX_POSITIONS, dtype=torch.float64)[:, None]
        parts = [pos * 10000.0 ** (-torch.arange(0, w, 2, dtype=torch.float64) / w) if a == axis
                 else torch.zeros(MAX_POSITIONS, w // 2, dtype=torch.float64) for a, w in enumerate(widths)]
        angles = torch.cat(parts, dim=1)
        # cos/sin of the exact angle, rounded once to fp32 (half an fp32 ulp of 1 is 2^-25)
        torch.testing.assert_close(cos.double(), angles.cos(), atol=2.0 ** -24, rtol=0)
        torch.testing.assert_close(sin.double(), angles.sin(), atol=2.0 ** -24, rtol=0)


def test_attention_against_float64():
    q, k, v = torch.randn(2, 19, 3, 16), torch.randn(2, 23, 3, 16), torch.randn(2, 23, 3, 16)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 4
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    assert rel_err(ops.attention(q, k, v), ref) < FP32_FEW_ROUNDINGS
    both = ops.cross_attention(q, k, v, k[:, :7], v[:, :7])
    scores_img = torch.einsum("bqhd,bkhd->bhqk", q.double(), k[:, :7].double()) / 4
    ref_img = torch.einsum("bhqk,bkhd->bqhd", scores_img.softmax(-1), v[:, :7].double())
    assert rel_err(both, ref + ref_img) < FP32_FEW_ROUNDINGS


def test_residual_add_and_activations():
    # Against float64, not the reference's own fp32 expression (which would pass whatever that computes):
    # each element is at most two fp32 roundings (the gate's product, the sum) from the exact value.
    x, y, gate = torch.randn(2, 5, 8), torch.randn(2, 5, 8).bfloat16(), torch.randn(2, 8)
    want = x.double() + y.double() * gate.double()[:, None, :]
    assert rel_err(ops.residual_add(x, y, gate), want) < FP32_FEW_ROUNDINGS
    assert rel_err(ops.residual_add(x, y), x.double() + y.double()) < FP32_FEW_ROUNDINGS
    z = torch.randn(100).double()
    tanh = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    assert rel_err(ops.activation(z.float(), "gelu_tanh"), tanh) < FP32_FEW_ROUNDINGS
    assert rel_err(ops.activation(z.float(), "gelu"), 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))) < FP32_FEW_ROUNDINGS
    assert rel_err(ops.activation(z.float(), "silu"), z * torch.sigmoid(z)) < FP32_FEW_ROUNDINGS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_linear_against_float64(dtype):
    """x cast to the weight's dtype, then x·wᵀ + bias accumulated in fp32 and rounded once to the weight's
    dtype: within the error of rounding the float64 result to that dtype, plus a few fp32 roundings (a
    16-bit accumulation over K = 300 would be ~√K times that rounding)."""
    gen = torch.Generator().manual_seed(300)
    x = torch.randn(2, 37, 300, generator=gen)
    w = (torch.randn(45, 300, generator=gen) / math.sqrt(300)).to(dtype)
    b = torch.randn(45, generator=gen).to(dtype)
    for bias in (b, None):
        out = ops.linear(x, w, bias)
        assert out.dtype == dtype and out.shape == (2, 37, 45)
        want = x.to(dtype).double() @ w.double().t() + (0 if bias is None else bias.double())
        assert rel_err(out, want) <= rel_err(want.to(dtype), want) + FP32_FEW_ROUNDINGS


def test_auto_picks_only_kernels_verified_on_a_gpu(monkeypatch):
    from dit8.kernels import registry

    monkeypatch.setattr(registry, "_OPS", {})
    registry.register("probe", "torch")(lambda: "torch")
    registry.register("probe", "cuda", runs_on=lambda d: True)(lambda: "cuda")
    monkeypatch.setattr(registry, "_capability", lambda device: (9, 0))
    gpu = torch.device("cuda")
    assert registry.resolve("probe", "auto", gpu)() == "torch"
    assert registry.resolve("probe", "cuda", gpu)() == "cuda"
    monkeypatch.setattr(registry, "GPU_VERIFIED", {(8, 0): frozenset({("probe", "cuda")})})
    assert registry.resolve("probe", "auto", gpu)() == "torch"  # verified on another generation only
    monkeypatch.setattr(registry, "GPU_VERIFIED", {(9, 0): frozenset({("probe", "cuda")})})
    assert registry.resolve("probe", "auto", gpu)() == "cuda"
    monkeypatch.setattr(registry, "GPU_VERIFIED", {})
    monkeypatch.setenv("DIT8_BACKEND", "cuda")
    assert registry.resolve("probe", "auto", gpu)() == "cuda"


def test_auto_picks_the_kernels_a_verified_file_names(monkeypatch, tmp_path):
    # DIT8_VERIFIED: what a GPU test run on this machine verified (bench/verified_backends.py --json)
    # instead of the committed entries.
    import json

    from dit8.kernels import registry

    monkeypatch.setattr(registry, "_OPS", {})
    registry.register("probe", "torch")(lambda: "torch")
    registry.register("probe", "cuda", runs_on=lambda d: True)(lambda: "cuda")
    monkeypatch.setattr(registry, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(registry, "GPU_VERIFIED", {})
    monkeypatch.delenv("DIT8_BACKEND", raising=False)
    gpu = torch.device("cuda")
    other, here = tmp_path / "sm89.json", tmp_path / "sm90.json"
    other.write_text(json.dumps({"capability": [8, 9], "verified": [["probe", "cuda"]]}))
    here.write_text(json.dumps({"capability": [9, 0], "verified": [["probe", "cuda"]]}))
    monkeypatch.setenv("DIT8_VERIFIED", str(other))
    assert registry.resolve("probe", "auto", gpu)() == "torch"  # another generation's run
    assert "sm_90" in registry.reference_only_notice("auto", gpu)
    monkeypatch.setenv("DIT8_VERIFIED", str(here))
    assert registry.resolve("probe", "auto", gpu)() == "cuda"
    assert registry.reference_only_notice("auto", gpu) is None
    # The file replaces the committed entry of its generation: a kernel that failed here is not run.
    monkeypatch.setattr(registry, "GPU_VERIFIED", {(9, 0): frozenset({("probe", "cuda")})})
    here.write_text(json.dumps({"capability": [9, 0], "verified": []}))
    registry._verified_file.cache_clear()
    assert registry.resolve("probe", "auto", gpu)() == "torch"
    for bad in ("[1, 2]", '{"capability": [9, 0]}', "{not json"):
        path = tmp_path / f"bad{len(bad)}.json"
        path.write_text(bad)
        monkeypatch.setenv("DIT8_VERIFIED", str(path))
        with pytest.raises(registry.BackendError, match=f"DIT8_VERIFIED={path}: not a file of verified kernels"):
            registry.resolve("probe", "auto", gpu)
    monkeypatch.setenv("DIT8_VERIFIED", str(tmp_path / "missing.json"))
    with pytest.raises(registry.BackendError, match="missing.json: not a file of verified kernels"):
        registry.resolve("probe", "auto", gpu)


def test_auto_takes_an_unverified_kernel_where_the_reference_cannot_serve(monkeypatch):
    from dit8.kernels import registry

    monkeypatch.setattr(registry, "_OPS", {})
    registry.register("probe", "torch")(lambda: "torch")
    registry.register("probe", "triton", runs_on=lambda d: True)(lambda: "triton")
    monkeypatch.setattr(registry, "GPU_VERIFIED", {})
    monkeypatch.setattr(registry, "_capability", lambda device: (9, 0))
    assert registry.resolve("probe", "auto", torch.device("cuda"), reference=False)() == "triton"
    with pytest.raises(registry.BackendError, match="no torch reference.*backend='triton'"):
        registry.resolve("probe", "auto", torch.device("cpu"), reference=False)
    monkeypatch.setenv("DIT8_BACKEND", "triton")  # the interpreter on CPU, when asked for
    assert registry.resolve("probe", "auto", torch.device("cpu"), reference=False)() == "triton"


def test_auto_prefers_the_backend_measured_fastest_on_this_gpu(monkeypatch):
    from dit8.kernels import registry

    monkeypatch.setattr(registry, "_OPS", {})
    for name in ("torch", "triton", "cuda"):
        registry.register("probe", name, runs_on=lambda d: True)(lambda name=name: name)
    monkeypatch.setattr(registry, "GPU_VERIFIED", {(9, 0): frozenset({("probe", "cuda"), ("probe", "triton")})})
    monkeypatch.setattr(registry, "_capability", lambda device: (9, 0))
    gpu = torch.device("cuda")
    assert registry.resolve("probe", "auto", gpu)() == "cuda"  # BACKENDS order without a measurement
    monkeypatch.setattr(registry, "FASTEST", {(9, 0): {"probe": "triton"}, (8, 9): {"probe": "cuda"}})
    assert registry.resolve("probe", "auto", gpu)() == "triton"
    monkeypatch.setattr(registry, "GPU_VERIFIED", {(9, 0): frozenset({("probe", "cuda")})})
    assert registry.resolve("probe", "auto", gpu)() == "cuda"  # not verified: the table is not enough
    monkeypatch.setattr(registry, "FASTEST", {(9, 0): {"probe": "torch"}})
    assert registry.resolve("probe", "auto", gpu)() == "torch"  # the reference measured faster
    assert registry.resolve("probe", "auto", gpu, reference=False)() == "cuda"  # ... unless it cannot serve
    monkeypatch.setenv("DIT8_BACKEND", "torch")
    assert registry.resolve("probe", "auto", gpu)() == "torch"  # the environment comes first
    monkeypatch.setattr(registry, "GPU_VERIFIED", {(9, 0): frozenset({("probe", "cuda"), ("probe", "triton")})})
    monkeypatch.setattr(registry, "FASTEST", {(9, 0): {"probe": "triton"}})
    monkeypatch.setenv("DIT8_BACKEND", "cuda")
    assert registry.resolve("probe", "auto", gpu)() == "cuda"  # ... before the measured fastest


def test_a_gpu_without_verified_kernels_is_told_so(monkeypatch):
    from dit8.kernels import registry

    monkeypatch.setattr(registry, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(registry, "GPU_VERIFIED", {})
    monkeypatch.delenv("DIT8_BACKEND", raising=False)
    gpu = torch.device("cuda")
    assert "sm_90" in registry.reference_only_notice("auto", gpu)
    assert registry.reference_only_notice("torch", gpu) is None  # asked for the reference
    assert registry.reference_only_notice("auto", torch.device("cpu")) is None
    monkeypatch.setattr(registry, "GPU_VERIFIED", {(9, 0): frozenset({("rms_norm", "triton")})})
    assert registry.reference_only_notice("auto", gpu) is None
    monkeypatch.setattr(registry, "GPU_VERIFIED", {})
    monkeypatch.setenv("DIT8_BACKEND", "triton")
    assert registry.reference_only_notice("auto", gpu) is None


def test_checking_a_backend_asks_only_that_backend(monkeypatch):
    """The cuda predicate may build the CUDA extension: checking "triton" or "auto" must not call it."""
    from dit8.kernels import registry

    def cuda_runs_on(device):
        raise AssertionError("the cuda backend was asked")

    monkeypatch.setattr(registry, "_OPS", {})
    registry.register("probe", "torch")(lambda: "torch")
    registry.register("probe", "cuda", runs_on=cuda_runs_on)(lambda: "cuda")
    registry.register("probe", "triton", runs_on=lambda d: d.type == "cuda")(lambda: "triton")
    gpu = torch.device("cuda")
    assert registry.backend_runs_on("triton", gpu) and registry.backend_runs_on("auto", gpu)
    assert not registry.backend_runs_on("triton", torch.device("cpu"))
    assert registry.model_backend("probe", "triton", gpu) == "triton"
    assert registry.model_backend("probe", "triton", torch.device("cpu")) == "auto"  # its kernel cannot run there
    with pytest.raises(registry.BackendError, match="unknown backend"):
        registry.backend_runs_on("cudnn", gpu)


def test_poisoned_outputs_for_a_check_call(monkeypatch):
    from dit8.kernels.buffers import new_output, poisoned_outputs

    monkeypatch.delenv("DIT8_POISON_OUTPUTS", raising=False)
    with poisoned_outputs():
        assert torch.isnan(new_output((3,), torch.float32, torch.device("cpu"))).all()
        assert (new_output((2,), torch.int8, torch.device("cpu")) == -128).all()
    assert "DIT8_POISON_OUTPUTS" not in os.environ  # as it was
    monkeypatch.setenv("DIT8_POISON_OUTPUTS", "0")
    with poisoned_outputs():
        pass
    assert os.environ["DIT8_POISON_OUTPUTS"] == "0"


def _operands_of_every_op():
    """(op name, call(**tensors), tensors) for every op with more than one tensor operand, on the CPU."""
    r = torch.randn
    q4 = dict(q=r(1, 3, 2, 8), k=r(1, 4, 2, 8), v=r(1, 4, 2, 8))
    rows = dict(x=r(1, 3, 8))
    mod = dict(shift=r(1, 8), scale=r(1, 8))
    qk = dict(q=r(1, 3, 16), k=r(1, 3, 16), weight_q=r(16), weight_k=r(16), cos=r(3, 4), sin=r(3, 4))
    return [
        ("attention", lambda **t: ops.attention(**t, backend="torch"), q4),
        ("cross_attention", lambda **t: ops.cross_attention(**t, backend="torch"),
         {**q4, "k_img": r(1, 5, 2, 8), "v_img": r(1, 5, 2, 8)}),
        ("linear", lambda **t: ops.linear(**t, backend="torch"), dict(x=r(3, 4), weight=r(5, 4), bias=r(5))),
        ("rms_norm", lambda **t: ops.rms_norm(**t, eps=1e-6, backend="torch"), {**rows, "weight": r(8)}),
        ("layer_norm", lambda **t: ops.layer_norm(**t, eps=1e-6, backend="torch"),
         {**rows, "weight": r(8), "bias": r(8)}),
        ("layer_norm_modulate", lambda **t: ops.layer_norm_modulate(**t, eps=1e-6, backend="torch"), {**rows, **mod}),
        ("layer_norm_modulate_quant", lambda **t: ops.layer_norm_modulate_quant(**t, eps=1e-6, dtype=torch.int8,
                                                                                backend="torch"), {**rows, **mod}),
        ("layer_norm_quant", lambda **t: ops.layer_norm_quant(**t, eps=1e-6, dtype=torch.int8, backend="torch"),
         {**rows, "weight": r(8), "bias": r(8)}),
        ("rope", lambda **t: ops.rope(**t, backend="torch"), dict(x=r(1, 3, 2, 8), cos=r(3, 4), sin=r(3, 4))),
        ("qk_norm_rope", lambda **t: ops.qk_norm_rope(**t, heads=2, eps=1e-6, backend="torch"), qk),
        ("qk_norm_rope_quant", lambda **t: ops.qk_norm_rope_quant(**t, heads=2, eps=1e-6, dtype=torch.int8,
                                                                  backend="torch"), qk),
        ("residual_add", lambda **t: ops.residual_add(**t, backend="torch"), dict(x=r(1, 3, 4), y=r(1, 3, 4),
                                                                                 gate=r(1, 4))),
    ]


@pytest.mark.parametrize("op, call, tensors", _operands_of_every_op(), ids=lambda v: v if isinstance(v, str) else "")
def test_an_operand_on_another_device_is_named(op, call, tensors):
    """Every tensor operand after the first, moved alone to another device, is refused at the op's boundary
    with the arguments' names (not by torch further in, whose message names none): the one moved, or the
    one the op checks against it (linear checks x against its weight)."""
    call(**tensors)  # as given, the operands are fine
    for name in list(tensors)[1:]:
        moved = {**tensors, name: tensors[name].to("meta")}
        with pytest.raises(OpArgumentError, match=rf"{op}: ({name} is on meta|\w+ is on cpu but the other operands "
                                                  rf"are on meta)"):
            call(**moved)
