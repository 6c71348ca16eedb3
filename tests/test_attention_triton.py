"""The Triton attention kernels (kernels/attention_triton.py) against float64, on fresh random inputs.

Without a GPU they run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), with small shapes whose lengths are not multiples of the blocks; with a GPU the
same tests run compiled on CUDA tensors. Outputs are poisoned with NaN (DIT8_POISON_OUTPUTS=1), so an
element a kernel forgets to write fails every comparison.

The reference is the float64 attention of the very inputs the kernel receives (already rounded to
their dtype): the error measured is the kernel's, not the input rounding's. Error budgets:
- bf16/fp16/fp32 path: at most 2x the error of torch SDPA (the reference op) on the same inputs.
- 8-bit paths: the issue's target (relative error <= 3%, cosine >= 0.999) on Gaussian q/k/v and on
  q/k with large per-channel offsets (as RMS-normed q/k have). Beside it, a float64 emulation of the
  same algorithm (`emulate_8bit`: same smoothing, same per-block codes, exact sums) says how much error
  the quantization itself costs; the kernel must not add to it beyond its fp32 arithmetic.
- Plain per-tensor FP8 attention (`emulate_per_tensor_fp8`) is shown to fail on the offset inputs.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from dit8 import kernels as ops  # noqa: E402
from dit8.kernels import OpArgumentError  # noqa: E402
from dit8.kernels import attention_8bit_triton as impl8  # noqa: E402
from dit8.kernels import attention_triton as impl  # noqa: E402
from dit8.kernels.buffers import new_output  # noqa: E402
from dit8.kernels.gemm_configs import SHARED_MEMORY_LIMIT  # noqa: E402
from dit8.kernels.triton_support import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
LOG2E = math.log2(math.e)
# What a GPU run of a test verifies (tests/conftest.py).
ATTENTION = pytest.mark.verifies("attention", backend="triton")
CROSS = pytest.mark.verifies("cross_attention", backend="triton")

# (Lq, Lk, D): lengths off the block sizes (interpreter blocks 64 x 32, GPU 128 x 128), Lq != Lk.
SHAPES = [(77, 45, 16), (200, 129, 64)]
B, H = 2, 3


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_qkv(lq, lk, d, *, seed, dtype, offsets=False, heads=H):
    """q [B, Lq, heads, D], k and v [B, Lk, heads, D]; with `offsets`, q and k get a large per-channel offset
    (8 standard deviations, the same for every token and head) as RMS-normed q/k carry."""
    q, k, v = (randn(B, n, heads, d, seed=seed + i) for i, n in enumerate((lq, lk, lk)))
    if offsets:
        q = q + 8 * randn(d, seed=seed + 3)
        k = k + 8 * randn(d, seed=seed + 4)
    return [t.to(dtype).to(DEVICE) for t in (q, k, v)]


def attention64(q, k, v):
    """softmax(q·kᵀ/√D)·v in float64, [B, Lq, H, D]."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def check_output(out, like):
    assert out.shape == like.shape and out.dtype == like.dtype and out.device == like.device
    assert torch.isfinite(out).all(), "kernel left elements unwritten (NaN poison) or overflowed"


# ----------------------------------------------------------------------------------------------------
# bf16 / fp16 / fp32 flash attention
# ----------------------------------------------------------------------------------------------------

@ATTENTION
@pytest.mark.parametrize("lq, lk, d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_flash_attention_within_twice_sdpa_error(lq, lk, d, dtype):
    q, k, v = make_qkv(lq, lk, d, seed=lq + lk + d, dtype=dtype)
    ref = attention64(q, k, v)
    out = ops.attention(q, k, v, precision="bf16", backend="triton")
    check_output(out, q)
    sdpa_err = rel_err(ops.attention(q, k, v, backend="torch"), ref)
    # fp32: both errors are a few fp32 roundings (~1e-7); the floor of 16 fp32 ulps (2^-20) keeps the
    # factor 2 from judging noise.
    floor = 2.0 ** -20 if dtype == torch.float32 else 0.0
    assert rel_err(out, ref) <= 2 * sdpa_err + floor


@ATTENTION
def test_single_query_and_single_key():
    q, k, v = make_qkv(1, 1, 32, seed=5, dtype=torch.bfloat16)
    out = ops.attention(q, k, v, backend="triton")
    check_output(out, q)
    # One key: the softmax weight is exactly 1, the output is v rounded to bf16 (exact here).
    assert torch.equal(out, v)


def fused_qkv(lq, d, *, seed, dtype):
    """q, k, v as the QKV GEMM leaves them: views into one [B, L, 3, H, D] buffer (row stride 3·H·D)."""
    qkv = randn(B, lq, 3, H, d, seed=seed).to(dtype).to(DEVICE)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


@ATTENTION
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reads_strided_views_without_copies(precision):
    q, k, v = fused_qkv(70, 32, seed=11, dtype=torch.bfloat16)
    assert not q.is_contiguous()
    out = ops.attention(q, k, v, precision=precision, backend="triton")
    check_output(out, q)
    assert out.is_contiguous()
    ref = attention64(q, k, v)
    if precision == "bf16":
        contiguous = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="triton")
        # The strides change which addresses are read, not the arithmetic: identical results.
        assert torch.equal(out, contiguous)
        assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)
    else:
        # (the torch mean over a strided view may sum in another order: compare with float64 only)
        assert rel_err(out, ref) <= 0.03 and cosine(out, ref) >= 0.999


@ATTENTION
@CROSS
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_inputs_with_a_channel_stride_are_read_as_their_copies(precision):
    """q, k, v whose channels are not adjacent (every other element of a wider tensor): the kernels read
    rows of contiguous channels, so the wrappers copy such inputs first; the result is that of the
    contiguous tensors. (The 8-bit path's torch means may sum a strided view in another order: there the
    bound against float64.)"""
    wide = [randn(B, n, H, 2 * 24, seed=41 + i).bfloat16().to(DEVICE) for i, n in enumerate((40, 37, 37))]
    q, k, v = (t[..., ::2] for t in wide)
    assert q.stride(-1) == 2
    dense = [t.contiguous() for t in (q, k, v)]
    out = ops.attention(q, k, v, precision=precision, backend="triton")
    check_output(out, q)
    ref = attention64(q, k, v)
    if precision == "bf16":
        assert torch.equal(out, ops.attention(*dense, backend="triton"))
        assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)
        k_img, v_img = (randn(B, 9, H, 2 * 24, seed=44 + i).bfloat16().to(DEVICE)[..., ::2] for i in range(2))
        cross = ops.cross_attention(q, k, v, k_img, v_img, backend="triton")
        check_output(cross, q)
        assert torch.equal(cross, ops.cross_attention(*dense, k_img.contiguous(), v_img.contiguous(),
                                                      backend="triton"))
    else:
        cfg = impl.pick_config("8bit", 24)
        emu = emulate_8bit(q, k, v, *impl8.RECIPES[precision], cfg.block_m, cfg.block_n)
        assert rel_err(out, ref) <= 1.2 * rel_err(emu, ref) + 2e-3


def _tma_runs(q) -> bool:
    """Whether the bf16 kernel's TMA configuration runs its TMA kernel here (Hopper or later, or the
    interpreter), not the pointer kernel it falls back to."""
    return interpreting() or torch.cuda.get_device_capability(q.device) >= (9, 0)


def _with_tma(d: int) -> impl.AttnConfig:
    return dataclasses.replace(impl.pick_config("bf16", d), tma=True)


@ATTENTION
@pytest.mark.parametrize("layout", ["contiguous", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lq, lk, d", SHAPES)
def test_tma_loads_give_the_pointer_loads_result(lq, lk, d, dtype, layout):
    """The TMA kernel reads q, k and v as [B·L, H·D] matrices: a block past the end of a batch's rows reads
    the next batch's (or TMA's zeros), which must not count, and a short tail (up to SHORT_TAIL keys: Lk =
    45 and 129 in the interpreter's 32-key blocks) is read through pointers. Same arithmetic as the
    pointer kernel: the outputs differ by their rounding at most, where a key lost or read from another
    batch would move them by its weight, ~2%."""
    if layout == "fused":
        q, _, _ = fused_qkv(lq, d, seed=21, dtype=dtype)
        _, k, v = fused_qkv(lk, d, seed=22, dtype=dtype)
    else:
        q, k, v = make_qkv(lq, lk, d, seed=21, dtype=dtype)
    cfg = _with_tma(d)
    assert (impl.tma_views(cfg, q, k, v) is not None) == _tma_runs(q)
    out = impl.attention_bf16(q, k, v, config=cfg)
    check_output(out, q)
    pointer = impl.attention_bf16(q, k, v, config=dataclasses.replace(cfg, tma=False))
    assert rel_err(out, pointer) <= 2.0 ** -10, rel_err(out, pointer)
    ref = attention64(q, k, v)
    assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)


@CROSS
@pytest.mark.parametrize("images", [True, False], ids=["text+image", "text"])
def test_cross_attention_tma_loads_give_the_pointer_loads_result(images):
    """As test_tma_loads_give_the_pointer_loads_result, for the fused cross-attention (B = 2; the keys'
    tails are short and long in the interpreter's blocks)."""
    q, _, _ = fused_qkv(77, 32, seed=31, dtype=torch.bfloat16)
    _, k, v = fused_qkv(45, 32, seed=32, dtype=torch.bfloat16)
    k_img, v_img = make_qkv(1, 19, 32, seed=33, dtype=torch.bfloat16)[1:] if images else (None, None)
    cfg = dataclasses.replace(impl.pick_config("cross", 32), tma=True)
    assert (impl.tma_views(cfg, q, k, v) is not None) == _tma_runs(q)
    out = impl.cross_attention(q, k, v, k_img, v_img, config=cfg)
    check_output(out, q)
    pointer = impl.cross_attention(q, k, v, k_img, v_img, config=dataclasses.replace(cfg, tma=False))
    assert rel_err(out, pointer) <= 2.0 ** -10, rel_err(out, pointer)
    ref = attention64(q, k, v) + (attention64(q, k_img, v_img) if images else 0)
    assert rel_err(out, ref) <= 2 * rel_err(ops.cross_attention(q, k, v, k_img, v_img, backend="torch"), ref)


@ATTENTION
def test_tma_views_only_where_tma_can_read_the_layout():
    q, k, v = make_qkv(77, 45, 32, seed=23, dtype=torch.bfloat16)
    cfg = _with_tma(32)
    heads_apart = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] view of [B, H, L, D]
    odd_rows = torch.zeros(B, 77, H * 32 + 1, dtype=q.dtype, device=q.device)[..., :H * 32].view(B, 77, H, 32)
    assert impl.tma_views(cfg, heads_apart, k, v) is None
    assert impl.tma_views(cfg, odd_rows, k, v) is None  # rows 2·(3·32 + 1) bytes apart: not 16-byte aligned
    assert impl.tma_views(cfg, q.float(), k.float(), v.float()) is None
    # The pointer kernel serves what TMA cannot read.
    out = impl.attention_bf16(heads_apart, k, v, config=cfg)
    check_output(out, q)
    ref = attention64(q, k, v)
    assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)


@ATTENTION
@pytest.mark.parametrize("precision", ["bf16", "int8", "fp8"])
def test_head_dim_not_a_power_of_two(precision):
    # head_dim 24 (a small model's) is padded to 32 inside the kernels; the padding must stay invisible.
    q, k, v = make_qkv(40, 37, 24, seed=61, dtype=torch.bfloat16, offsets=precision != "bf16")
    ref = attention64(q, k, v)
    out = ops.attention(q, k, v, precision=precision, backend="triton")
    check_output(out, q)
    if precision == "bf16":
        assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)
    else:
        cfg = impl.pick_config("8bit", 24)
        emu = emulate_8bit(q, k, v, *impl8.RECIPES[precision], cfg.block_m, cfg.block_n)
        assert rel_err(out, ref) <= 1.2 * rel_err(emu, ref) + 2e-3


@ATTENTION
@CROSS
@pytest.mark.parametrize("tail", [0, 1, 16, 17, -1], ids=lambda t: f"tail{t}")
def test_every_tail_length(tail):
    """Keys past the last full block: none, a short tail (up to SHORT_TAIL keys, its own small block), a
    long one (a full masked block), up to a block less one key (tail -1)."""
    block_n = impl.pick_config("bf16", 32).block_n
    lk = 2 * block_n + (tail % block_n)
    q, k, v = make_qkv(40, lk, 32, seed=91 + tail, dtype=torch.bfloat16)
    ref = attention64(q, k, v)
    out = ops.attention(q, k, v, backend="triton")
    check_output(out, q)
    assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)
    img_n = impl.pick_config("cross", 32).block_n + (tail % impl.pick_config("cross", 32).block_n)
    _, k_img, v_img = make_qkv(1, img_n, 32, seed=191 + tail, dtype=torch.bfloat16)
    ref = ref + attention64(q, k_img, v_img)
    out = ops.cross_attention(q, k, v, k_img, v_img, backend="triton")
    check_output(out, q)
    assert rel_err(out, ref) <= 2 * rel_err(ops.cross_attention(q, k, v, k_img, v_img, backend="torch"), ref)


@CROSS
def test_cross_attention_head_dim_not_a_power_of_two():
    q, k, v = make_qkv(40, 37, 24, seed=71, dtype=torch.bfloat16)
    _, k_img, v_img = make_qkv(1, 9, 24, seed=81, dtype=torch.bfloat16)
    ref = attention64(q, k, v) + attention64(q, k_img, v_img)
    out = ops.cross_attention(q, k, v, k_img, v_img, backend="triton")
    check_output(out, q)
    assert rel_err(out, ref) <= 2 * rel_err(ops.cross_attention(q, k, v, k_img, v_img, backend="torch"), ref)


def test_unsupported_arguments_are_refused():
    with pytest.raises(OpArgumentError, match="head_dim"):
        ops.attention(*make_qkv(8, 8, 264, seed=0, dtype=torch.float32), backend="triton")
    with pytest.raises(OpArgumentError, match="no keys"):
        q, k, v = make_qkv(8, 0, 16, seed=0, dtype=torch.float32)
        ops.attention(q, k, v, backend="triton")


# The longest sequence of Wan's contiguous q, k and v rows (40 heads x 128 = 5120 elements apart) whose
# (batch, head) slices the kernels address with int32 offsets: (L - 1)·5120 + 127 <= 2^31 - 1. Reached by
# a 720P video of 465 frames or more (3600 tokens a latent frame).
WAN_MAX_TOKENS = (2 ** 31 - 1 - 127) // 5120 + 1


def _meta(L, heads=40, d=128, *, batch=1):
    """An unallocated bf16 [batch, L, heads, d] (the checks before any allocation only read shapes)."""
    return torch.empty(batch, L, heads, d, dtype=torch.bfloat16, device="meta")


LONG_SEQUENCE_CALLS = {
    "bf16 q": (lambda: impl.attention_bf16(_meta(WAN_MAX_TOKENS + 1), _meta(64), _meta(64)), "q"),
    "bf16 k v": (lambda: impl.attention_bf16(_meta(64), _meta(WAN_MAX_TOKENS + 1), _meta(WAN_MAX_TOKENS + 1)),
                 "k"),
    # q rows 0 elements apart: only the (contiguous) output's rows are too far apart.
    "bf16 output": (lambda: impl.attention_bf16(_meta(1).expand(1, WAN_MAX_TOKENS + 1, 40, 128), _meta(64),
                                                _meta(64)), "the output"),
    "cross q": (lambda: impl.cross_attention(_meta(WAN_MAX_TOKENS + 1), _meta(512), _meta(512), _meta(257),
                                             _meta(257)), "q"),
    "cross k_img": (lambda: impl.cross_attention(_meta(64), _meta(512), _meta(512), _meta(WAN_MAX_TOKENS + 1),
                                                 _meta(WAN_MAX_TOKENS + 1)), "k_img"),
    "int8 q": (lambda: impl8.attention_8bit(_meta(WAN_MAX_TOKENS + 1), _meta(64), _meta(64), "int8"), "q"),
    # One head of 96 channels: the rows fit, v's codes (96 rows of the keys padded to 32) do not.
    "int8 v codes": (lambda: impl8.quantize_for_attention(
        _meta(64, 1, 96), _meta(22_369_621, 1, 96), _meta(22_369_621, 1, 96), qk="int8", pv="int8", block_m=64,
        block_n=64), "v's codes"),
    "from quantized output": (lambda: impl8.attention_from_quantized(impl8.Quantized8bit(
        torch.empty(1, 40, WAN_MAX_TOKENS + 1, 128, dtype=torch.int8, device="meta"), None, None, None, None, None,
        None, 64, 32), torch.bfloat16, impl.AttnConfig(64, 32, 4, 1)), "the output"),
}


@pytest.mark.parametrize("call", LONG_SEQUENCE_CALLS)
def test_sequences_past_the_kernels_32_bit_offsets_are_refused(call):
    # Past 2^31 - 1 an int32 offset wraps and the kernel reads and writes the wrong memory, silently.
    fn, name = LONG_SEQUENCE_CALLS[call]
    with pytest.raises(OpArgumentError, match=f"{name} is too large for the triton kernel's 32-bit offsets"):
        fn()


def test_the_32_bit_offset_limit_is_the_last_element_of_a_slice():
    from dit8.kernels.attention import check_slice_offsets

    check_slice_offsets("attention", dict(q=_meta(WAN_MAX_TOKENS, batch=2), k=_meta(WAN_MAX_TOKENS, batch=2),
                                          v=_meta(WAN_MAX_TOKENS, batch=2)))
    # The batch sits in the 64-bit base: a second sample changes nothing, one more token does.
    with pytest.raises(OpArgumentError, match=r"419,432 rows 5,120 elements apart.*= 2,147,486,847"):
        check_slice_offsets("attention", dict(q=_meta(WAN_MAX_TOKENS + 1), k=_meta(8), v=_meta(8)))


@pytest.mark.parametrize("heads, head_dim", [(40, 128), (2, 16), (5, 96)])
def test_max_attention_tokens_is_where_the_kernels_start_refusing(heads, head_dim):
    from dit8.kernels.attention import check_slice_offsets, max_attention_tokens

    limit = max_attention_tokens("int8", "auto", heads, head_dim)
    assert limit == max_attention_tokens("fp8", "triton", heads, head_dim)
    assert limit == max_attention_tokens("bf16", "triton", heads, head_dim)  # asked for by name: no way out
    for within in (_meta(limit, heads, head_dim), _meta(1, heads, head_dim).expand(1, limit, heads, head_dim)):
        check_slice_offsets("attention", dict(q=within, k=within, v=within))
    past = _meta(limit + 1, heads, head_dim)
    with pytest.raises(OpArgumentError, match="q is too large"):
        check_slice_offsets("attention", dict(q=past, k=past, v=past))
    # 16-bit attention on "auto" goes to torch past the limit, and torch has none.
    assert max_attention_tokens("bf16", "auto", heads, head_dim) is None
    assert max_attention_tokens("bf16", "torch", heads, head_dim) is None


def test_wans_limit_is_max_attention_tokens():
    from dit8.kernels.attention import max_attention_tokens

    assert max_attention_tokens("int8", "auto", 40, 128) == WAN_MAX_TOKENS == 419_431


def test_auto_gives_sequences_past_the_kernels_offsets_to_torch(monkeypatch):
    attention_ops = importlib.import_module("dit8.kernels.attention")  # (dit8.kernels.attention is the op)
    asked = []
    monkeypatch.setattr(attention_ops, "resolve", lambda op, backend, *a, **kw: asked.append(backend) or
                        (lambda *args: None))
    long, short = _meta(WAN_MAX_TOKENS + 1), _meta(WAN_MAX_TOKENS)
    ops.attention(long, long, long, backend="auto")
    ops.attention(short, short, short, backend="auto")
    ops.attention(long, long, long, backend="triton")  # asked for: refused by the kernel's wrapper instead
    ops.cross_attention(long, _meta(512), _meta(512), _meta(257), _meta(257), backend="auto")
    ops.cross_attention(short, _meta(512), _meta(512), _meta(257), _meta(257), backend="auto")
    assert asked == ["torch", "auto", "triton", "torch", "auto"]


def test_interpreter_rounding_workaround_rounds_to_nearest_even():
    if not interpreting():
        pytest.skip("the workaround only runs under the Triton interpreter")
    # The interpreter's own fp32 -> fp8 cast turns 7.9 into 4.0 and its fp32 -> bf16 cast truncates;
    # the kernels' pre-rounding must make both agree with torch's round-to-nearest-even casts.
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y8, Y16, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(X + offs)
        tl.store(Y8 + offs, impl8._to_fp8(tl.minimum(tl.maximum(x, -448.0), 448.0), True))
        tl.store(Y16 + offs, impl.round_bf16(x).to(tl.bfloat16))  # kernels/rounding_triton.py's

    special = [7.9, -7.9, 447.0, 1.0625, 1.1875, 0.0, 3 * 2.0 ** -10, 5 * 2.0 ** -10, -0.0049, 2.0 ** -6]
    # Magnitudes from 2^-12 (e4m3 subnormals) to 2^10 (saturation), both signs, and ties.
    x = randn(4096 - len(special), seed=1) * torch.exp2(torch.linspace(-12, 10, 4096 - len(special)))
    x = torch.cat([x, torch.tensor(special)])
    y8, y16 = (new_output(x.shape, dtype, x.device) for dtype in (FP8, torch.bfloat16))  # NaN-filled
    cast[(1,)](x, y8, y16, N=x.numel())
    assert torch.equal(y8.float(), x.clamp(-448, 448).to(FP8).float())
    assert torch.equal(y16.float(), x.to(torch.bfloat16).float())


def test_int_to_float_is_exact_on_the_dot_products_range():
    # The 8-bit kernels' int32 -> fp32 without a conversion instruction: exact below 2^22 in magnitude,
    # which holds every 8-bit dot product the kernels compute (127 · 127 · 256 at most).
    import triton
    import triton.language as tl

    @triton.jit
    def convert(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, impl8._int_to_float(tl.load(X + offs)))

    bound = 2 ** 22 - 1
    assert 127 * 127 * impl.MAX_HEAD_DIM <= bound
    special = torch.tensor([0, 1, -1, 127 * 127 * 256, -127 * 127 * 256, bound, -bound], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([special, torch.randint(-bound, bound + 1, (4096 - len(special),), generator=gen,
                                          dtype=torch.int32)]).to(DEVICE)
    y = torch.full(x.shape, float("nan"), device=DEVICE)
    convert[(1,)](x, y, N=x.numel())
    assert torch.equal(y, x.float())


# ----------------------------------------------------------------------------------------------------
# 8-bit attention
# ----------------------------------------------------------------------------------------------------

def _e4m3(x):
    """Round float64 values to e4m3 (torch's round-to-nearest-even cast), back to float64."""
    return x.float().clamp(-448, 448).to(FP8).double()


def _quantize_blocks64(x, block, qk):
    """Symmetric per-block codes of x [B, L, H, D] (one scale per `block` rows per head), dequantized."""
    out = torch.empty_like(x)
    qmax = 127.0 if qk == "int8" else 448.0
    for start in range(0, x.shape[1], block):
        t = x[:, start:start + block]
        scale = t.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / qmax
        y = t / scale
        codes = torch.sign(y) * torch.floor(y.abs() + 0.5) if qk == "int8" else _e4m3(y)
        out[:, start:start + block] = codes * scale
    return out


def emulate_8bit(q, k, v, qk, pv, block_m, block_n, smooth_v=True, running_max=False):
    """The 8-bit algorithm in float64: K and Q mean smoothing (q's mean term back as a per-key bias),
    q codes per block of block_m rows and k codes per key, exact dot products, softmax, P·V with P and
    v rounded as `pv` does ("fp16": no rounding modelled, P's 16-bit rounding is far below the 8-bit
    error; "fp8": e4m3 P scaled by 448 and per-channel e4m3 v - v̄, v̄ added back; "int8": per-channel
    int8 v - v̄ and, per block of block_n keys, P / (the block's row max) in steps of 1/127;
    `smooth_v=False` leaves v̄ in). The softmax denominator is the exact one, as in the kernel.
    `running_max`: FP8 P rounded as the kernel rounds it, at the scale of the running row max of the key
    blocks so far (an online softmax's), instead of the final one. [B, Lq, H, D] float64."""
    q, k, v = q.double(), k.double(), v.double()
    c = LOG2E / math.sqrt(q.shape[-1])
    q_mean, k_mean = q.mean(1, keepdim=True), k.mean(1, keepdim=True)
    qc = _quantize_blocks64((q - q_mean) * c, block_m, qk)
    kc = _quantize_blocks64(k - k_mean, 1, qk)  # one scale per key
    bias = torch.einsum("bxhd,bkhd->bhxk", q_mean * c, k - k_mean)
    s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) + bias  # log2 units
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    if pv != "fp16":
        v_mean = v.mean(1, keepdim=True) if smooth_v else torch.zeros_like(v[:, :1])
        qmax = 127 if pv == "int8" else 448
        v_scale = (v - v_mean).abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
        y = (v - v_mean) / v_scale
        v = (torch.round(y) if pv == "int8" else _e4m3(y)) * v_scale + v_mean
    if pv == "fp8" and running_max:
        blocks = s.split(block_n, dim=-1)
        running = torch.stack([b.amax(-1) for b in blocks], dim=-1).cummax(-1).values[..., None]
        final = running[..., -1, :]
        p = torch.cat([_e4m3(torch.exp2(b - running[..., j, :]) * 448) / 448 * torch.exp2(running[..., j, :] - final)
                       for j, b in enumerate(blocks)], dim=-1)
    elif pv == "fp8":
        p = _e4m3(p * 448) / 448
    elif pv == "int8":
        blocks = p.split(block_n, dim=-1)
        p = torch.cat([torch.round(b / b.amax(-1, keepdim=True) * 127) / 127 * b.amax(-1, keepdim=True)
                       for b in blocks], dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p / denom, v)


def emulate_per_tensor_fp8(q, k, v):
    """Plain FP8 attention: q, k, v each with one e4m3 scale for the whole tensor, P in e4m3, no
    smoothing. [B, Lq, H, D] float64."""
    def per_tensor(x):
        scale = x.double().abs().amax() / 448
        return _e4m3(x.double() / scale) * scale
    scores = torch.einsum("bqhd,bkhd->bhqk", per_tensor(q), per_tensor(k)) / math.sqrt(q.shape[-1])
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = _e4m3(p * 448) / 448 / p.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", weights, per_tensor(v))


KINDS = ["gaussian", "offsets", "v_offsets"]
# The operand formats (q·kᵀ, P·V) measured: both precisions' recipes, 16-bit P·V and all-FP8.
FORMATS = [impl8.RECIPES["int8"], impl8.RECIPES["fp8"], ("int8", "fp16"), ("fp8", "fp8")]
_RESULTS = {}


def eight_bit_result(formats, kind):
    """(errors of the kernel, of the emulation of its algorithm, of per-tensor FP8), each (rel, cos),
    on bf16 inputs [2, 200, 3, 64] / [2, 129, 3, 64]; computed once per (formats, kind). "offsets":
    q and k with large per-channel offsets; "v_offsets": v with per-channel means (as a projection's
    output has)."""
    key = (formats, kind)
    if key not in _RESULTS:
        q, k, v = make_qkv(200, 129, 64, seed=100 + KINDS.index(kind), dtype=torch.bfloat16,
                           offsets=kind == "offsets")
        if kind == "v_offsets":
            v = (v.float() + 4 * randn(64, seed=99).to(v.device)).to(v.dtype)
        ref = attention64(q, k, v)
        qk, pv = formats
        out = impl8.attention_8bit(q, k, v, "int8", qk=qk, pv=pv)
        check_output(out, q)
        cfg = impl.pick_config("8bit", 64)
        emu = emulate_8bit(q, k, v, qk, pv, cfg.block_m, cfg.block_n)
        naive = emulate_per_tensor_fp8(q, k, v)
        _RESULTS[key] = tuple((rel_err(x, ref), cosine(x, ref)) for x in (out, emu, naive))
    return _RESULTS[key]


@ATTENTION
@pytest.mark.parametrize("kind", KINDS)
def test_int8_meets_the_accuracy_target(kind):
    (err, cos), _, _ = eight_bit_result(impl8.RECIPES["int8"], kind)
    assert err <= 0.03 and cos >= 0.999, (err, cos)


@ATTENTION
@pytest.mark.parametrize("kind", ["offsets", "v_offsets"])
def test_fp8_meets_the_accuracy_target_on_offset_inputs(kind):
    (err, cos), _, _ = eight_bit_result(impl8.RECIPES["fp8"], kind)
    assert err <= 0.03 and cos >= 0.999, (err, cos)


# A target, not a correctness check: no `verifies` mark (an unexpected pass must not unverify the kernel).
@pytest.mark.xfail(strict=True, reason="FP8 P·V rounds every p and every v to e4m3 (3 mantissa bits, "
                   "~2.5% rms each): ~3.4% relative error on zero-mean Gaussian data, above the 3% "
                   "target. precision='int8' (INT8 P·V, P relative to each key block's max) meets it.")
def test_fp8_meets_the_accuracy_target_on_gaussian_inputs():
    (err, cos), _, _ = eight_bit_result(impl8.RECIPES["fp8"], "gaussian")
    assert err <= 0.03 and cos >= 0.999, (err, cos)


@ATTENTION
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("formats", FORMATS, ids="-".join)
def test_8bit_error_is_that_of_its_quantization(formats, kind):
    (err, cos), (emu_err, emu_cos), _ = eight_bit_result(formats, kind)
    # The kernel differs from the exact-arithmetic emulation by fp32 rounding, the bf16 output rounding
    # (2^-9 relative, ~1e-3 rms) and, for FP8 P, rounding P against the running instead of the final
    # row max (same distribution): 20% on top of the emulation's error plus 2e-3 covers them.
    assert err <= 1.2 * emu_err + 2e-3, (err, emu_err)
    # 0.998, below the issue's 0.999: FP8 q·kᵀ (no recipe's) reaches 0.9988 on Gaussian data; the recipes'
    # 0.999 is asserted by the accuracy-target tests above.
    assert cos >= (0.999 if formats in impl8.RECIPES.values() else 0.998), cos


@ATTENTION
@pytest.mark.parametrize("kind", ["gaussian", "offsets"])
@pytest.mark.parametrize("formats", [*impl8.RECIPES.values(), ("int8", "fp16")], ids="-".join)
def test_8bit_kernel_follows_its_emulation(formats, kind):
    """Output against output, not error against error: with fp32 in and out, the kernel is the
    emulated algorithm up to codes that land on the other side of a rounding boundary (fp32 against
    float64 arithmetic before the rounding) and, for 16-bit P·V, v's fp16 rounding (2^-11 relative).
    FP8 P is emulated as the kernel rounds it, against the running row max."""
    q, k, v = make_qkv(200, 129, 64, seed=11, dtype=torch.float32, offsets=kind == "offsets")
    cfg = impl.pick_config("8bit", 64)
    out = impl8.attention_8bit(q, k, v, "int8", qk=formats[0], pv=formats[1])
    emu = emulate_8bit(q, k, v, *formats, cfg.block_m, cfg.block_n, running_max=True)
    emu_err = rel_err(emu, attention64(q, k, v))
    assert rel_err(out, emu) <= 0.1 * emu_err + 2.0 ** -11, (rel_err(out, emu), emu_err)


@ATTENTION
def test_int8_qk_errs_less_than_fp8_qk():
    # Why both recipes use INT8 q·kᵀ: same P·V, only the q·kᵀ format differs.
    (int8_err, _), _, _ = eight_bit_result(impl8.RECIPES["fp8"], "gaussian")
    (fp8_err, _), _, _ = eight_bit_result(("fp8", "fp8"), "gaussian")
    assert int8_err < 0.85 * fp8_err, (int8_err, fp8_err)


@ATTENTION
def test_v_smoothing_removes_the_error_of_v_channel_means():
    # fp32 in and out: no 16-bit output rounding to hide the difference.
    q, k, v = make_qkv(200, 129, 64, seed=5, dtype=torch.float32)
    v = v + 4 * randn(64, seed=6).to(v.device)
    ref = attention64(q, k, v)
    cfg = impl.pick_config("8bit", 64)
    unsmoothed = rel_err(emulate_8bit(q, k, v, "int8", "fp8", cfg.block_m, cfg.block_n, smooth_v=False), ref)
    err = rel_err(ops.attention(q, k, v, precision="fp8", backend="triton"), ref)
    assert err < unsmoothed / 3, (err, unsmoothed)


@ATTENTION
@pytest.mark.parametrize("formats", FORMATS, ids="-".join)
def test_smoothing_beats_per_tensor_fp8_on_offset_inputs(formats):
    (err, cos), _, (naive_err, naive_cos) = eight_bit_result(formats, "offsets")
    # Per-tensor scales spend the 8 bits on the offsets: the scores lose their small variations.
    assert naive_err > 0.1 and naive_cos < 0.99, (naive_err, naive_cos)
    assert err < naive_err / 5, (err, naive_err)


@ATTENTION
@pytest.mark.parametrize("qk", ["int8", "fp8"])
def test_8bit_kernel_on_its_quantized_operands(qk):
    """Quantization kernel and attention kernel separately: the codes against a torch recomputation,
    then the kernel's output against float64 attention over the dequantized operands (pv="fp16", so
    the only rounding left is the kernel's own)."""
    q, k, v = make_qkv(77, 45, 32, seed=7, dtype=torch.bfloat16, offsets=True)
    cfg = impl.pick_config("8bit", 32)
    x = impl8.quantize_for_attention(q, k, v, qk=qk, pv="fp16", block_m=cfg.block_m, block_n=cfg.block_n)

    # Codes: torch recomputation of the same fp32 arithmetic; q per block of rows, k per row.
    c = impl.LOG2E / math.sqrt(32)
    q_mean = q.mean(dim=1, dtype=torch.float32)
    k_mean = k.mean(dim=1, dtype=torch.float32)
    q_centred = ((q.float() - q_mean[:, None]) * c).transpose(1, 2)  # [B, H, L, D]
    k_centred = (k.float() - k_mean[:, None]).transpose(1, 2)
    # A tensor divisor: CUDA divides by a Python number through its reciprocal (1 ulp off).
    qmax = torch.tensor(127.0 if qk == "int8" else 448.0, device=q.device)

    def check_codes(got, y):
        if qk == "int8":
            assert ((got - y.double()).abs() <= 0.5 + 1e-4).all()
        else:
            # e4m3 round-to-nearest: within half a spacing (|y|·2^-4, subnormals 2^-10).
            bound = torch.maximum(y.double().abs() * 2.0 ** -4, torch.full_like(got, 2.0 ** -10))
            assert ((got - y.double()).abs() <= bound * (1 + 1e-6)).all()

    # Compiled for a GPU, the kernels' fp32 division is div.full.f32 (at most 2 ulp off; the interpreter
    # and torch round exactly): scales agree to 2 ulp.
    two_ulp = 2.0 ** -22
    for i in range(x.q_scale.shape[2]):
        rows = q_centred[:, :, i * cfg.block_m:(i + 1) * cfg.block_m]
        scale = rows.abs().amax(dim=(2, 3)) / qmax
        torch.testing.assert_close(x.q_scale[:, :, i], scale, rtol=two_ulp, atol=0)
        check_codes(x.q[:, :, i * cfg.block_m:(i + 1) * cfg.block_m].double(), rows / scale[..., None, None])
    k_scale = k_centred.abs().amax(dim=3) / qmax
    assert x.k_scale.shape == k_scale.shape
    torch.testing.assert_close(x.k_scale, k_scale, rtol=two_ulp, atol=0)
    check_codes(x.k.double(), k_centred / k_scale[..., None])
    bias = torch.einsum("bhd,blhd->bhl", q_mean.double() * c, k.double() - k_mean.double()[:, None])
    torch.testing.assert_close(x.bias.double(), bias, rtol=1e-5, atol=1e-5 * bias.abs().max().item())

    out = impl8.attention_from_quantized(x, torch.float32)
    assert torch.isfinite(out).all() and out.shape == q.shape
    qd, kd, bias, vd = x.dequantized()
    s = torch.einsum("bhqd,bhkd->bhqk", qd, kd) + bias[:, :, None, :]
    ref = torch.einsum("bhqk,bhkd->bqhd", torch.softmax(s * math.log(2), -1), vd)
    # Interpreter: fp32 arithmetic only (exp2, sums). GPU: P is rounded to bf16 (2^-9 relative).
    assert rel_err(out, ref) <= (1e-5 if interpreting() else 2.0 ** -8)


def test_smoothing_mean_samples_evenly_spaced_tokens():
    x = randn(2, 77, 3, 8, seed=31).to(torch.bfloat16)
    torch.testing.assert_close(impl8.smoothing_mean(x, 8), x[:, ::10].float().mean(1), rtol=0, atol=0)  # 8 of 77
    torch.testing.assert_close(impl8.smoothing_mean(x, 77), x.float().mean(1), rtol=0, atol=0)
    torch.testing.assert_close(impl8.smoothing_mean(x), x.float().mean(1), rtol=0, atol=0)  # L <= MEAN_ROWS


@ATTENTION
@pytest.mark.parametrize("recipe", ["int8", "fp8"])
@pytest.mark.parametrize("kind", ["offsets", "v_offsets"])
def test_8bit_accuracy_with_means_of_a_token_sample(monkeypatch, recipe, kind):
    """Sequences longer than MEAN_ROWS centre q, k and v on the means of a sample of their tokens: the
    smoothing identity holds for any centre (the bias and v̄ restore it), so the output still meets the
    issue's target. Here 16 of 200 queries and 15 of 129 keys, a cruder sample than Wan's 1 in 16."""
    monkeypatch.setattr(impl8, "MEAN_ROWS", 16)
    q, k, v = make_qkv(200, 129, 64, seed=41, dtype=torch.bfloat16, offsets=kind == "offsets")
    if kind == "v_offsets":
        v = (v.float() + 4 * randn(64, seed=42).to(v.device)).to(v.dtype)
    out = impl8.attention_8bit(q, k, v, recipe)
    check_output(out, q)
    ref = attention64(q, k, v)
    err, cos = rel_err(out, ref), cosine(out, ref)
    assert err <= 0.03 and cos >= 0.999, (err, cos)
    # The bias is the sampled q̄'s: c·q̄·(k - k̄) with both means from the sample.
    cfg = impl.pick_config("8bit", 64)
    x = impl8.quantize_for_attention(q, k, v, qk="int8", pv=impl8.RECIPES[recipe][1], block_m=cfg.block_m,
                                     block_n=cfg.block_n)
    q_mean, k_mean = q[:, ::13].double().mean(1), k[:, ::9].double().mean(1)
    bias = torch.einsum("bhd,blhd->bhl", q_mean * LOG2E / 8, k.double() - k_mean[:, None])
    torch.testing.assert_close(x.bias.double(), bias, rtol=1e-5, atol=1e-5 * bias.abs().max().item())


@ATTENTION
@pytest.mark.parametrize("d", [24, 32])
@pytest.mark.parametrize("lk", [45, 97])
@pytest.mark.parametrize("pv", ["int8", "fp8"])
def test_v_codes_against_float64(pv, lk, d):
    """_quantize_v_kernel on its own (the attention tests see it only through the output): v's per-channel
    mean and scale, and every code against float64 arithmetic on the same v. Lk off the kernel's 64-key
    blocks; head_dim 24 padded to 32 inside. v with channel means, so that the centring matters."""
    q, k, v = make_qkv(77, lk, d, seed=29 + lk + d, dtype=torch.bfloat16)
    v = (v.float() + 4 * randn(d, seed=30).to(v.device)).to(v.dtype)
    cfg = impl.pick_config("8bit", d)
    x = impl8.quantize_for_attention(q, k, v, qk="int8", pv=pv, block_m=cfg.block_m, block_n=cfg.block_n,
                                     operand_order=False)
    qmax = 127.0 if pv == "int8" else 448.0
    v64 = v.double().permute(0, 2, 3, 1)  # [B, H, D, Lk], as the codes are stored
    assert x.v.shape == v64.shape and x.v.dtype == (torch.int8 if pv == "int8" else FP8)
    # The mean: an fp32 sum of Lk terms, each adding at most one fp32 rounding of the running sum.
    mean64 = v64.mean(-1)
    assert ((x.v_mean.double() - mean64).abs() <= lk * 2.0 ** -24 * v64.abs().mean(-1)).all()
    # The scale: amax|v - mean| over the sequence / qmax, from the kernel's own mean; two fp32 roundings
    # (the difference, the division).
    centred = v64 - x.v_mean.double()[..., None]
    torch.testing.assert_close(x.v_scale.double(), centred.abs().amax(-1) / qmax, rtol=2.0 ** -22, atol=0)
    # The codes: (v - mean) / scale rounded, from fp32 arithmetic (two roundings, 2^-23 of |y| at most).
    y = centred / x.v_scale.double()[..., None]
    codes = x.v.double()
    assert codes.abs().max() <= qmax
    if pv == "int8":
        half_step = torch.full_like(y, 0.5)
    else:  # e4m3: half a spacing, |y|·2^-4 for normals, 2^-10 for subnormals
        half_step = torch.maximum(y.abs() * 2.0 ** -4, torch.full_like(y, 2.0 ** -10))
    assert ((codes - y).abs() <= half_step + y.abs() * 2.0 ** -22).all()
    # Each channel's largest deviation from its mean takes the largest code: the scale is the one used.
    assert (codes.abs().amax(-1) == qmax).all()


@pytest.mark.parametrize("pv", ["int8", "fp8"])
def test_v_codes_in_operand_order_are_the_codes_permuted(pv):
    """v's 8-bit codes stored for the Triton kernel's P·V (keys permuted within groups of 32) are the codes
    of the natural order moved to their positions, nothing else; Lk = 45 ends inside a group."""
    assert sorted(impl8.key_at_position(torch.arange(64)).tolist()) == list(range(64))
    assert impl8.key_at_position(torch.arange(32, 64)).min() == 32  # groups stay in place
    q, k, v = make_qkv(77, 45, 32, seed=3, dtype=torch.bfloat16)
    cfg = impl.pick_config("8bit", 32)
    ordered, natural = (impl8.quantize_for_attention(q, k, v, qk="int8", pv=pv, block_m=cfg.block_m,
                                                     block_n=cfg.block_n, operand_order=order)
                        for order in (True, False))
    assert ordered.v_in_operand_order and not natural.v_in_operand_order
    assert ordered.v.shape[-1] == 64 and natural.v.shape[-1] == 45
    positions = torch.arange(64, device=ordered.v.device)
    keys = impl8.key_at_position(positions)
    held = keys < 45
    assert torch.equal(ordered.v[..., positions[held]].view(torch.int8), natural.v[..., keys[held]].view(torch.int8))
    assert torch.equal(ordered.dequantized()[3], natural.dequantized()[3])
    with pytest.raises(OpArgumentError, match="key blocks of 16"):
        impl8.quantize_for_attention(q, k, v, qk="int8", pv=pv, block_m=64, block_n=16)


@ATTENTION
@pytest.mark.parametrize("lk", [45, 37, 129])
@pytest.mark.parametrize("pv", ["int8", "fp8"])
def test_v_in_operand_order_changes_only_the_summation_order(pv, lk):
    """The same quantized operands with v's keys in the operand order and in their own: P·V sums the
    same products in another order (INT8: exact integer sums, so equal; FP8: the MMA's accumulator
    rounds differently, well under the recipe's own error), where a key lost or a padding code read at
    the end of the sequence (Lk off the groups of 32) moves the output by about that key's weight: 4-14x
    the recipe's error on these sizes."""
    q, k, v = make_qkv(77, lk, 32, seed=13, dtype=torch.float32)
    cfg = impl.pick_config("8bit", 32)
    outs = [impl8.attention_from_quantized(
        impl8.quantize_for_attention(q, k, v, qk="int8", pv=pv, block_m=cfg.block_m, block_n=cfg.block_n,
                                     operand_order=order), torch.float32) for order in (True, False)]
    for out in outs:
        check_output(out, q)
    recipe_err = rel_err(outs[1], attention64(q, k, v))
    assert rel_err(outs[0], outs[1]) <= 0.05 * recipe_err, (rel_err(outs[0], outs[1]), recipe_err)


@ATTENTION
@pytest.mark.parametrize("operand_order", [True, False], ids=["operand_order", "key_order"])
@pytest.mark.parametrize("pv", ["int8", "fp8"])
@pytest.mark.parametrize("lq, lk", [(77, 45), (200, 129), (33, 97)])
def test_8bit_tma_loads_give_the_pointer_loads_result(lq, lk, pv, operand_order):
    """The TMA kernel reads the codes as [B·H·L, D] and [B·H·D, keys] matrices: a tail block's rows past a
    head's are the next head's (or TMA's zeros), and v's stored positions past Lk (the operand order's
    padding, poisoned by DIT8_POISON_OUTPUTS) are zeroed. Same quantized operands, same arithmetic: the
    same output, where a key lost or read from another head moves it by that key's weight, ~1-5%. Lk = 97:
    a tail of one key past a full group of 32 (operand order: 31 padding positions in the last block)."""
    # Two heads of two batch rows: every head's rows have another (b, h)'s rows after or before them.
    q, k, v = make_qkv(lq, lk, 32, seed=17, dtype=torch.bfloat16, offsets=True, heads=2)
    cfg = impl.pick_config("8bit", 32)
    x = impl8.quantize_for_attention(q, k, v, qk="int8", pv=pv, block_m=cfg.block_m, block_n=cfg.block_n,
                                     operand_order=operand_order)
    tma = dataclasses.replace(cfg, tma=True)
    assert (impl8.tma_views_8bit(tma, x) is not None) == _tma_runs(q)
    out = impl8.attention_from_quantized(x, q.dtype, config=tma)
    check_output(out, q)
    pointer = impl8.attention_from_quantized(x, q.dtype, config=cfg)
    assert rel_err(out, pointer) <= 2.0 ** -20, rel_err(out, pointer)
    emu = emulate_8bit(q, k, v, "int8", pv, cfg.block_m, cfg.block_n)
    ref = attention64(q, k, v)
    assert rel_err(out, ref) <= 1.2 * rel_err(emu, ref) + 2e-3


@ATTENTION
def test_8bit_tma_views_only_where_tma_can_read_the_codes():
    q, k, v = make_qkv(77, 45, 24, seed=19, dtype=torch.bfloat16)
    cfg = dataclasses.replace(impl.pick_config("8bit", 24), tma=True)
    padded = impl8.quantize_for_attention(q, k, v, qk="int8", pv="int8", block_m=cfg.block_m, block_n=cfg.block_n)
    assert impl8.tma_views_8bit(cfg, padded) is None  # head_dim 24, padded to 32 in the dots: TMA would not zero it
    sixteen_bit = impl8.quantize_for_attention(q[..., :16].contiguous(), k[..., :16].contiguous(),
                                               v[..., :16].contiguous(), qk="int8", pv="fp16",
                                               block_m=cfg.block_m, block_n=cfg.block_n)
    assert impl8.tma_views_8bit(cfg, sixteen_bit) is None  # 16-bit P·V reads v itself
    # The pointer kernel serves them.
    out = impl8.attention_8bit(q, k, v, "int8", config=cfg)
    check_output(out, q)
    ref = attention64(q, k, v)
    emu = emulate_8bit(q, k, v, "int8", "int8", cfg.block_m, cfg.block_n)
    assert rel_err(out, ref) <= 1.2 * rel_err(emu, ref) + 2e-3


@ATTENTION
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_8bit_fp16_inputs_and_output(precision):
    """fp16 q, k, v (the other 8-bit tests take bf16 or fp32): read by the quantize kernels and the output
    stored in fp16, within the bound of the other inputs' dtypes of the float64 emulation of the same
    blocks' quantization."""
    q, k, v = make_qkv(77, 45, 32, seed=83, dtype=torch.float16, offsets=True)
    out = ops.attention(q, k, v, precision=precision, backend="triton")
    check_output(out, q)
    ref = attention64(q, k, v)
    cfg = impl.pick_config("8bit", 32)
    emu = emulate_8bit(q, k, v, *impl8.RECIPES[precision], cfg.block_m, cfg.block_n)
    assert rel_err(out, ref) <= 1.2 * rel_err(emu, ref) + 2e-3, (rel_err(out, ref), rel_err(emu, ref))


@ATTENTION
def test_8bit_single_query_is_within_fp16_rounding():
    # Lq = 1: q minus its mean is 0, every score is the fp32 bias; the per-block scale must not be 0/0.
    q, k, v = make_qkv(1, 45, 16, seed=9, dtype=torch.float32, offsets=True)
    out = impl8.attention_8bit(q, k, v, "int8", pv="fp16")  # 16-bit P·V: no 8-bit rounding after the scores
    check_output(out, q)
    assert rel_err(out, attention64(q, k, v)) <= 1e-3  # v rounded to fp16 (2^-11) for P·V


# ----------------------------------------------------------------------------------------------------
# Fused I2V cross-attention
# ----------------------------------------------------------------------------------------------------

@CROSS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_fused_cross_attention_against_float64(dtype):
    q, k, v = make_qkv(77, 45, 32, seed=21, dtype=dtype)
    _, k_img, v_img = make_qkv(1, 19, 32, seed=31, dtype=dtype)
    ref = attention64(q, k, v) + attention64(q, k_img, v_img)
    out = ops.cross_attention(q, k, v, k_img, v_img, backend="triton")
    check_output(out, q)
    torch_err = rel_err(ops.cross_attention(q, k, v, k_img, v_img, backend="torch"), ref)
    floor = 2.0 ** -20 if dtype == torch.float32 else 0.0
    assert rel_err(out, ref) <= 2 * torch_err + floor


@CROSS
def test_cross_attention_without_image_keys_is_attention():
    q, k, v = make_qkv(40, 45, 16, seed=41, dtype=torch.bfloat16)
    out = ops.cross_attention(q, k, v, backend="triton")
    check_output(out, q)
    expected = ops.attention(q, k, v, backend="triton")
    if interpreting():  # one configuration for both kernels: the same arithmetic
        assert torch.equal(out, expected)
    else:  # key blocks of 64 (cross) and 128 (self): sums may round apart, by the output's bf16 step
        assert rel_err(out, expected) <= 2.0 ** -8


# ----------------------------------------------------------------------------------------------------
# torch.compile and the torch.library ops
# ----------------------------------------------------------------------------------------------------

def test_the_attention_ops_pass_opcheck():
    """dit8::attention_triton, dit8::attention_8bit_triton and dit8::cross_attention_triton: schemas, fake
    implementations (shape, dtype, strides, device of the real output), no mutated input; strided views
    (the QKV GEMM's output) and odd lengths."""
    q, k, v = fused_qkv(21, 16, seed=51, dtype=torch.bfloat16)
    _, k_img, v_img = make_qkv(1, 5, 16, seed=52, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.dit8.attention_triton.default, (q, k, v))
    torch.library.opcheck(torch.ops.dit8.attention_triton.default, [t.float().contiguous() for t in (q, k, v)])
    for precision in ("int8", "fp8"):
        torch.library.opcheck(torch.ops.dit8.attention_8bit_triton.default, (q, k, v, precision))
    torch.library.opcheck(torch.ops.dit8.cross_attention_triton.default, (q, k_img, v_img, k_img, v_img))
    torch.library.opcheck(torch.ops.dit8.cross_attention_triton.default, (q, k_img, v_img, None, None))


def test_torch_compile_traces_the_attention_kernels_whole():
    """torch.compile(fullgraph=True) takes each attention kernel as one op with a fake implementation: the
    launch wrappers (configuration lookup, the TMA checks that read data pointers, the 8-bit paths'
    quantization launches) and the kernels are not traced. Results equal eager's; a second sequence
    length runs too."""
    def step(q, k, v, k_img, v_img):
        return (ops.attention(q, k, v, backend="triton"), ops.attention(q, k, v, precision="int8", backend="triton"),
                ops.cross_attention(q, k_img, v_img, k_img, v_img, backend="triton"))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for lq in (21, 30):
        q, k, v = fused_qkv(lq, 16, seed=53 + lq, dtype=torch.bfloat16)
        _, k_img, v_img = make_qkv(1, 5, 16, seed=54 + lq, dtype=torch.bfloat16)
        for a, b in zip(compiled(q, k, v, k_img, v_img), step(q, k, v, k_img, v_img)):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Every listed configuration: the tables', the small-shared-memory and wide ones, the sweeps' candidates
# ----------------------------------------------------------------------------------------------------

def _listed(*paths: str) -> list:
    """pytest params (config, head_dim, dtype) of every configuration a GPU may run for these paths."""
    listed = [(cfg, d, torch.bfloat16) for (p, d), cfg in impl._CONFIGS.items() if p in paths]
    listed += [(cfg, 128, torch.bfloat16) for (p, _), cfg in impl._SMALL_SHARED_MEMORY_CONFIGS.items() if p in paths]
    candidates = {"bf16": impl.TMA_CANDIDATES, "cross": impl.CROSS_TMA_CANDIDATES,
                  "8bit": (*impl.EIGHT_BIT_TMA_CANDIDATES, impl.THREE_PER_SM)}
    listed += [(cfg, 128, torch.bfloat16) for path in paths for cfg in candidates.get(path, ())]
    listed.append((impl._WIDE_CONFIG, 200, torch.bfloat16))
    if {"bf16", "cross"} & set(paths):
        listed += [(cfg, d, torch.float32)
                   for d, cfg in ((128, impl._FP32_CONFIGS[128]), (200, impl._FP32_CONFIGS[256]))]
    unique = dict.fromkeys(listed)
    return [pytest.param(cfg, d, dtype, id=f"{_config_id(cfg)}-d{d}-{'fp32' if dtype == torch.float32 else 'bf16'}")
            for cfg, d, dtype in unique]


def _config_id(cfg) -> str:
    cap = f"_r{cfg.max_registers}" if cfg.max_registers else ""
    return f"{cfg.block_m}x{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}{'_tma' if cfg.tma else ''}{cap}"


# Heads of the listed-configuration tests: two batch rows of two heads still put a neighbouring batch row
# and head next to every block (the TMA tiles read q, k and v as [B·L, H·D] and the codes as
# [B·H·L, D] matrices), at two thirds of the interpreter time of three heads (these tests took a fifth
# of the CPU suite's time).
LISTED_HEADS = 2


def _sized_for_this_device():
    if DEVICE == "cuda" and impl.shared_memory_of(torch.device("cuda")) < impl.HOPPER_SHARED_MEMORY:
        pytest.skip("the listed tiles are sized for Hopper's shared memory; pick_config serves this GPU's")


@ATTENTION
@pytest.mark.parametrize("cfg, d, dtype", _listed("bf16"))
def test_every_listed_bf16_config(cfg, d, dtype):
    _sized_for_this_device()
    q, k, v = make_qkv(150, 200, d, seed=71, dtype=dtype, heads=LISTED_HEADS)
    ref = attention64(q, k, v)
    out = impl.attention_bf16(q, k, v, config=cfg)
    check_output(out, q)
    floor = 2.0 ** -20 if dtype == torch.float32 else 0.0
    assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref) + floor


@CROSS
@pytest.mark.parametrize("cfg, d, dtype", _listed("cross"))
def test_every_listed_cross_config(cfg, d, dtype):
    """128 text keys (whole blocks of every tile) and 45 image keys (a tail on every tile)."""
    _sized_for_this_device()
    q, _, _ = make_qkv(150, 1, d, seed=72, dtype=dtype, heads=LISTED_HEADS)
    _, k, v = make_qkv(1, 128 + 45, d, seed=73, dtype=dtype, heads=LISTED_HEADS)
    k_txt, v_txt, k_img, v_img = k[:, :128], v[:, :128], k[:, 128:], v[:, 128:]
    ref = attention64(q, k_txt, v_txt) + attention64(q, k_img, v_img)
    out = impl.cross_attention(q, k_txt, v_txt, k_img, v_img, config=cfg)
    check_output(out, q)
    floor = 2.0 ** -20 if dtype == torch.float32 else 0.0
    assert rel_err(out, ref) <= 2 * rel_err(ops.cross_attention(q, k_txt, v_txt, k_img, v_img, backend="torch"),
                                            ref) + floor


@ATTENTION
@pytest.mark.parametrize("formats", [*impl8.RECIPES.values(), ("int8", "fp16")], ids="-".join)
@pytest.mark.parametrize("cfg, d, dtype", _listed("8bit", "8bit_pv16"))
def test_every_listed_8bit_config(cfg, d, dtype, formats):
    """Within the bound of the GPU test at head_dim 128 (test_head_dim_128_long_sequences_on_gpu) of the
    float64 emulation of the same blocks' quantization."""
    _sized_for_this_device()
    q, k, v = make_qkv(150, 200, d, seed=74, dtype=dtype, offsets=True, heads=LISTED_HEADS)
    ref = attention64(q, k, v)
    out = impl8.attention_8bit(q, k, v, "int8", qk=formats[0], pv=formats[1], config=cfg)
    check_output(out, q)
    emu_err = rel_err(emulate_8bit(q, k, v, *formats, cfg.block_m, cfg.block_n), ref)
    assert rel_err(out, ref) <= 1.2 * emu_err + 2e-3, (rel_err(out, ref), emu_err)


# ----------------------------------------------------------------------------------------------------
# GPU only: the Hopper configurations at head_dim 128 with sequence tails
# ----------------------------------------------------------------------------------------------------

@ATTENTION
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "int8", "fp8"])
def test_head_dim_128_long_sequences_on_gpu(precision):
    q, k, v = make_qkv(1000, 1500, 128, seed=51, dtype=torch.bfloat16, offsets=True)
    ref = attention64(q, k, v)
    out = ops.attention(q, k, v, precision=precision, backend="triton")
    check_output(out, q)
    err, cos = rel_err(out, ref), cosine(out, ref)
    if precision == "bf16":
        assert err <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)
    else:
        cfg = impl.pick_config("8bit", 128, shared_memory=impl.shared_memory_of(q.device))
        emu_err = rel_err(emulate_8bit(q, k, v, *impl8.RECIPES[precision], cfg.block_m, cfg.block_n), ref)
        assert err <= 1.2 * emu_err + 2e-3 and cos >= 0.998, (err, emu_err, cos)
        if precision == "int8":
            assert err <= 0.03 and cos >= 0.999, (err, cos)


def test_gpus_with_less_shared_memory_get_tiles_that_fit(monkeypatch):
    # The choice as a GPU launch makes it (the interpreter always takes its own small blocks); that the
    # tiles fit and do not spill is test_kernels_compile_for_ampere_and_ada's.
    monkeypatch.setattr(impl, "interpreting", lambda: False)
    for path in ("bf16", "8bit", "8bit_pv16"):
        hopper = impl.pick_config(path, 128)
        ada = impl.pick_config(path, 128, shared_memory=SHARED_MEMORY_LIMIT["sm_89"])
        ampere = impl.pick_config(path, 128, shared_memory=SHARED_MEMORY_LIMIT["sm_80"])
        assert ada.block_n < hopper.block_n and ada == ampere
    # The cross-attention's Hopper tile fits there but spills (attention_triton: _SMALL_SHARED_MEMORY_CONFIGS).
    cross_ada = impl.pick_config("cross", 128, shared_memory=SHARED_MEMORY_LIMIT["sm_89"])
    assert cross_ada != impl.pick_config("cross", 128)
    assert cross_ada == impl.pick_config("cross", 128, shared_memory=SHARED_MEMORY_LIMIT["sm_80"])
    assert impl.shared_memory_of(torch.device("cpu")) == impl.HOPPER_SHARED_MEMORY == SHARED_MEMORY_LIMIT["sm_90"]


def test_gpu_tiles_by_head_dim(monkeypatch):
    monkeypatch.setattr(impl, "interpreting", lambda: False)
    for path in ("bf16", "8bit", "8bit_pv16", "cross"):
        assert impl.pick_config(path, 64) == impl._CONFIGS[(path, 64)]  # the 64 tiles up to 64 inclusive
        assert impl.pick_config(path, 65) == impl._CONFIGS[(path, 128)]
    # tl.dot's smallest reduction on a GPU: narrow heads are padded to 16 channels (32 for 8-bit operands).
    assert impl._block_d("attention", 8) == 16
    assert impl._block_d("attention", 8, impl.DOT8_MIN_REDUCTION) == impl.DOT8_MIN_REDUCTION
    assert impl._block_d("attention", 96) == 128


def test_a_register_cap_reaches_the_gpu_launch_only(monkeypatch):
    # The interpreter's launcher knows no register cap; a GPU launch passes it to ptxas as maxnreg.
    capped = impl.AttnConfig(64, 64, 4, 3, max_registers=168)
    monkeypatch.setattr(impl, "interpreting", lambda: True)
    assert capped.launch_options() == dict(num_warps=4, num_stages=3)
    monkeypatch.setattr(impl, "interpreting", lambda: False)
    assert capped.launch_options() == dict(num_warps=4, num_stages=3, maxnreg=168)
    assert impl.AttnConfig(64, 64, 4, 3).launch_options() == dict(num_warps=4, num_stages=3)


def test_fp8_attention_needs_fp8_tensor_cores(monkeypatch):
    from dit8.kernels import registry

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(registry, "_capability", lambda device: (8, 0))  # an A100, without touching CUDA
    with pytest.raises(registry.BackendError, match=r"attention: precision='fp8' needs FP8 tensor cores \(sm_89 "
                                                    r"or newer\); this GPU is sm_80: use precision='int8' or 'bf16'"):
        registry.require_fp8_tensor_cores("attention: precision='fp8'", cuda, "use precision='int8' or 'bf16'")
    monkeypatch.setattr(registry, "_capability", lambda device: (8, 9))
    registry.require_fp8_tensor_cores("attention: precision='fp8'", cuda, "unused")
    registry.require_fp8_tensor_cores("attention: precision='fp8'", torch.device("cpu"), "unused")  # interpreter


def test_an_fp8_attention_is_refused_before_it_runs_on_a_gpu_without_fp8(monkeypatch):
    # What a model checks when it is built (check_attention_runs): on an A100 with a Triton kernel that
    # runs, "int8" passes and "fp8" names the missing tensor cores.
    from dit8.kernels import registry
    from dit8.kernels.attention import check_attention_runs

    monkeypatch.setattr(registry, "_capability", lambda device: (8, 0))
    impls = dict(registry._OPS["attention"])
    impls["triton"] = registry._Impl(impls["triton"].fn, lambda device: True)
    monkeypatch.setitem(registry._OPS, "attention", impls)
    cuda = torch.device("cuda", 0)
    check_attention_runs("int8", "auto", cuda)
    with pytest.raises(registry.NoFP8Error, match=r"attention: precision='fp8' needs FP8 tensor cores .*sm_80"):
        check_attention_runs("fp8", "auto", cuda)


# ----------------------------------------------------------------------------------------------------
# Without a GPU: compile for Hopper (sm_90a), which the interpreter never does (tests/compile_check.py)
# ----------------------------------------------------------------------------------------------------
# ~60 s for all the kernels on a small CPU, so opt-in:
#     DIT8_SM90_COMPILE=1 python -m pytest tests/test_attention_triton.py -k hopper

COMPILE_CHECK = pytest.mark.skipif(
    torch.cuda.is_available() or __import__("os").environ.get("DIT8_SM90_COMPILE") != "1",
    reason="opt-in compile check for machines without a GPU: set DIT8_SM90_COMPILE=1")

# Integer arguments that are multiples of 16 at Wan's sizes (every stride of the [B, L, H, D] views of
# the QKV GEMMs' outputs and of the kernels' own buffers); the JIT specializes on them, and so do we.
ALIGNED_STRIDES = {f"stride_{t}{a}" for t in ("q", "k", "v", "o", "ki", "vi", "x") for a in "bmnhl"} | {
    "stride_qbh", "stride_qd", "stride_vd"}


def build(kernel, pointers, constexprs, cfg, ones=(), arch=90) -> dict:
    """compile_check.compile_kernel's report for one kernel variant, plus whether its strides were taken
    as aligned: the padded head dims (the tests' odd sizes) get the JIT's other specialization, strides
    that are not multiples of 16, loaded without async copies."""
    from compile_check import compile_kernel

    types = {n: "*" + t for n, t in pointers.items()} | {"qk_scale": "fp32", "factor": "fp32"}
    aligned = constexprs["HEAD_DIM"] == constexprs["BLOCK_D"]
    report = compile_kernel(kernel, types, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                            arch=arch, aligned=ALIGNED_STRIDES - set(ones) if aligned else (), ones=ones,
                            max_registers=cfg.max_registers)
    return report | {"aligned": aligned}


# Triton's pointer type of each operand format (16-bit P·V reads v as it is, bf16 here).
TRITON_TYPE = {"fp16": "bf16", "int8": "i8", "fp8": "fp8e4nv"}


def attention_variant(dt: str, head_dim: int, cfg, arch: int = 90) -> dict:
    """build's report for the flash attention kernel on `dt` ("bf16", "fp16", "fp32") inputs."""
    return build(impl._attention_kernel, dict.fromkeys(["Q", "K", "V", "Out"], dt),
                 dict(HEAD_DIM=head_dim, BLOCK_D=impl._block_d("attention", head_dim), BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, DOT_FP32=dt == "fp32", INTERPRET=False), cfg, arch=arch)


def tma_variant(cross: bool, head_dim: int, cfg) -> dict:
    """compile_check.compile_kernel's report for the bf16 flash attention kernel (`cross`: the fused
    cross-attention kernel) reading through TMA descriptors (sm_90a)."""
    from compile_check import compile_kernel

    kernel = impl._cross_attention_tma_kernel if cross else impl._attention_tma_kernel
    keys_values = ["KD", "VD", "KID", "VID"] if cross else ["KD", "VD"]
    types = {"QD": f"tensordesc<bf16[{cfg.block_m},{head_dim}]>", "qk_scale": "fp32",
             **dict.fromkeys(keys_values, f"tensordesc<bf16[{cfg.block_n},{head_dim}]>"),
             **dict.fromkeys(["Out", "K", "V", "KI", "VI"], "*bf16")}
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_FP32=False, INTERPRET=False)
    if cross:
        constexprs["HAS_IMG"] = True
    return compile_kernel(kernel, types, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                          aligned=ALIGNED_STRIDES, max_registers=cfg.max_registers) | {"aligned": True}


def cross_attention_variant(head_dim: int, cfg, arch: int = 90) -> dict:
    """build's report for the fused I2V cross-attention kernel on bf16 inputs."""
    return build(impl._cross_attention_kernel, dict.fromkeys(["Q", "K", "V", "KI", "VI", "Out"], "bf16"),
                 dict(HAS_IMG=True, HEAD_DIM=head_dim, BLOCK_D=impl._block_d("attention", head_dim),
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_FP32=False, INTERPRET=False), cfg, arch=arch)


def attention_8bit_variant(qk: str, pv: str, head_dim: int, cfg, arch: int = 90) -> dict:
    """build's report for the 8-bit kernel with q·kᵀ in `qk` and P·V in `pv`, v's unit stride as
    launched: its channels ([B, L, H, D]) or its keys (the 8-bit codes, stored [B, H, D, L])."""
    pointers = dict(Q=TRITON_TYPE[qk], K=TRITON_TYPE[qk], V=TRITON_TYPE[pv], Out="bf16",
                    **dict.fromkeys(["QScale", "KScaleBias", "VMean", "VScale"], "fp32"))
    return build(impl8._attention_8bit_kernel, pointers,
                 dict(HEAD_DIM=head_dim, BLOCK_D=impl._block_d("attention", head_dim, impl.DOT8_MIN_REDUCTION),
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_INT8=qk == "int8", PV=pv,
                      PV_BITS=arch // 10 in (9, 10),
                      V_ORDERED=pv != "fp16", DOT_FP32=False, INTERPRET=False), cfg,
                 ones=("stride_vd",) if pv == "fp16" else ("stride_vn",),
                 arch=arch)


def tma_tag(cfg) -> str:
    """"128 x 128 x 3": block_m x block_n x stages."""
    return f"{cfg.block_m} x {cfg.block_n} x {cfg.num_stages}"


def tma_8bit_variant(qk: str, pv: str, head_dim: int, cfg) -> dict:
    """compile_check.compile_kernel's report for the 8-bit kernel (v's codes in operand order) reading its
    codes through TMA descriptors (sm_90a)."""
    from compile_check import compile_kernel

    types = {"QD": f"tensordesc<{TRITON_TYPE[qk]}[{cfg.block_m},{head_dim}]>",
             "KD": f"tensordesc<{TRITON_TYPE[qk]}[{cfg.block_n},{head_dim}]>",
             "VD": f"tensordesc<{TRITON_TYPE[pv]}[{head_dim},{cfg.block_n}]>", "Out": "*bf16",
             **dict.fromkeys(["QScale", "KScaleBias", "VMean", "VScale"], "*fp32")}
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QK_INT8=qk == "int8", PV=pv,
                      PV_BITS=True, V_ORDERED=True, INTERPRET=False)
    return compile_kernel(impl8._attention_8bit_tma_kernel, types, constexprs, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages, aligned=("stride_ob", "stride_om", "stride_oh"),
                          max_registers=cfg.max_registers) | {"aligned": True}


def compile_for_sm90() -> dict[str, dict]:
    """Compile every kernel at Wan's head_dim 128 with its GPU configuration for sm_90a (also head_dim 80,
    padded to 128, and 256); {kernel variant: build's report}. Must run without TRITON_INTERPRET."""
    d = 128
    width_tag = lambda width: f", head_dim {width}" if width != d else ""  # noqa: E731
    kernels = {}
    for dt, tdt in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        for width in (d, 256):
            kernels[f"attention {dt}" + width_tag(width)] = attention_variant(
                dt, width, impl.pick_config("bf16", width, tdt))
    kernels["attention bf16, head_dim 80"] = attention_variant("bf16", 80, impl.pick_config("bf16", 80))
    for cfg in impl.TMA_CANDIDATES:
        kernels[f"attention bf16, TMA loads, {tma_tag(cfg)}"] = tma_variant(False, d, cfg)
    for width in (d, 256):
        kernels["cross_attention bf16" + width_tag(width)] = cross_attention_variant(
            width, impl.pick_config("cross", width))
    for cfg in impl.CROSS_TMA_CANDIDATES:
        kernels[f"cross_attention bf16, TMA loads, {tma_tag(cfg)}"] = tma_variant(True, d, cfg)
    for qk in ("int8", "fp8"):
        for pv in impl8.PV_FORMATS:
            # Also a head_dim under the 8-bit dots' smallest reduction (the tests' 16), padded as launched,
            # and the wide configuration.
            for width in (d, 16, 256):
                kernels[f"attention {qk} q·k, {pv} P·V" + width_tag(width)] = attention_8bit_variant(
                    qk, pv, width, impl.pick_config(impl8.config_path(pv), width))
        for pv in ("int8", "fp8"):
            kernels[f"attention {qk} q·k, {pv} P·V, three per SM"] = attention_8bit_variant(
                qk, pv, d, impl.THREE_PER_SM)
            if qk == "int8":  # (both recipes' q·kᵀ)
                for cfg in impl.EIGHT_BIT_TMA_CANDIDATES:
                    capped = ", three per SM" if cfg.max_registers else ""
                    kernels[f"attention {qk} q·k, {pv} P·V, TMA loads, {tma_tag(cfg)}{capped}"] = tma_8bit_variant(
                        qk, pv, d, cfg)
        c = impl.pick_config("8bit", d)
        for per_row, block in ((False, c.block_m), (True, c.block_n)):  # q per block; k per row, with bias
            kernels[f"quantize {qk}, per {'row' if per_row else 'block'}"] = build(
                impl8._quantize_blocks_kernel,
                dict(X="bf16", Xq=TRITON_TYPE[qk], **dict.fromkeys(["Mean", "Qbar", "Scale"], "fp32")),
                dict(HEAD_DIM=d, BLOCK_D=d, BLOCK=block, PER_ROW=per_row, TO_INT8=qk == "int8", INTERPRET=False),
                impl.AttnConfig(0, 0, impl8._quantize_warps(block), 1))
    for pv in ("int8", "fp8"):
        kernels[f"quantize v {pv}"] = build(
            impl8._quantize_v_kernel, dict(V="bf16", Vq=TRITON_TYPE[pv], VMean="fp32", VScale="fp32"),
            dict(HEAD_DIM=d, BLOCK_D=d, BLOCK=64, TO_INT8=pv == "int8", OPERAND_ORDER=True, INTERPRET=False),
            impl.AttnConfig(0, 0, 4, 1))
    return kernels


@pytest.mark.slow
@COMPILE_CHECK
def test_kernels_compile_for_hopper():
    from compile_check import run_without_interpreter

    kernels = run_without_interpreter("test_attention_triton", "compile_for_sm90")
    assert all(v["registers"] > 0 for v in kernels.values()), kernels  # ptxas accepted every PTX
    # Every attention kernel's dots must map to Hopper's warpgroup MMA, fp32 "ieee" dots excepted, and
    # fit in one block's shared memory (the interpreter has no limit; a GPU refuses the launch).
    assert all(v["wgmma"] for k, v in kernels.items() if "fp32" not in k and "quantize" not in k), kernels
    # ... and ptxas kept them asynchronous (no serialization warning).
    assert not [k for k, v in kernels.items() if v["wgmma_serialized"]], kernels
    too_big = {k: v["shared"] for k, v in kernels.items() if v["shared"] > SHARED_MEMORY_LIMIT["sm_90"]}
    assert not too_big, too_big
    # No register spills inside the key loop where the strides are aligned, as at Wan's sizes: such a
    # spill is a local-memory round trip per key block. (Unaligned strides, the tests' odd sizes, are a
    # correctness path: the bf16 kernel spills 88 bytes there with triton 3.6.) The fp32 precision path
    # keeps whole fp32 tiles per thread for its CUDA-core dots; its tiles hold spills to at most 2 KiB
    # (at 64 x 64 they spill ~58 KB).
    # The quantize kernels have no loop: no spills at all there.
    # The sweep's register-capped tile is exempt: a candidate that spills only loses the sweep (triton
    # 3.6 compiles it without; 3.9 puts 8-12 local-memory accesses in its loop).
    attention = {k: v for k, v in kernels.items() if "quantize" not in k}
    assert all(v["loop_instructions"] > 0 for v in attention.values()), attention  # the key loop was found
    spilled = {k: (v["spills"], v["local_in_loops"]) for k, v in attention.items() if v["aligned"] and (
        "three per SM" not in k) and (
        v["spills"] > 2048 if "fp32" in k else v["local_in_loops"] > 0)}
    spilled |= {k: v["spills"] for k, v in kernels.items() if "quantize" in k and v["spills"]}
    assert not spilled, spilled
    # The TMA candidates load through descriptors, with fewer instructions in the key loop than pointer
    # loads of the same tile.
    tma = {k: v for k, v in kernels.items() if "TMA loads" in k}
    assert len(tma) == len(impl.TMA_CANDIDATES) + len(impl.CROSS_TMA_CANDIDATES) + \
        2 * len(impl.EIGHT_BIT_TMA_CANDIDATES), tma
    assert all(v["tma"] for v in tma.values()), tma
    for kernel, tile in (("attention bf16", "128 x 128 x 3"), ("cross_attention bf16", "64 x 64 x 3"),
                         ("attention int8 q·k, int8 P·V", "64 x 128 x 3"),
                         ("attention int8 q·k, fp8 P·V", "64 x 128 x 3")):
        assert tma[f"{kernel}, TMA loads, {tile}"]["loop_instructions"] < kernels[kernel]["loop_instructions"], tma
    # The cross-attention's table tile keeps two programs an SM (plus the 1 KiB reserved for each).
    assert 2 * (tma["cross_attention bf16, TMA loads, 64 x 64 x 3"]["shared"] + 1024) <= 228 * 1024, tma
    # 8-bit P·V takes P in registers with v's keys in the operand order: no lane shuffles move it there.
    assert not {k: v["loop_index_shuffles"] for k, v in attention.items() if v["loop_index_shuffles"]}
    # The sweep's register-capped tile: within its cap, and three programs' shared memory (plus the 1 KiB
    # the hardware reserves per block) within an SM's 228 KiB.
    capped = {k: v for k, v in kernels.items() if k.endswith("three per SM")}
    assert len(capped) == 6 and all(v["registers"] <= impl.THREE_PER_SM.max_registers
                                    and 3 * (v["shared"] + 1024) <= 228 * 1024 for v in capped.values()), capped
    # v's codes are stored keys-contiguous; the sequence length (Wan's 32,760) is no multiple of 16, so a
    # key mask on every store would make them single bytes: the full blocks must store 16 bytes at once.
    assert all(v["wide_global_stores"] for k, v in kernels.items() if k.startswith("quantize v")), kernels


def compile_for_smaller_gpus() -> dict[str, dict]:
    """Compile the head_dim 128 kernels with the configurations GPUs of less shared memory get
    (pick_config's shared_memory) for sm_80 (A100) and sm_89 (L40S, RTX 4090): {"variant, sm_XY": build's
    report}. FP8 P·V only on sm_89 (sm_80 has no FP8 tensor cores). Must run without TRITON_INTERPRET."""
    d = 128
    kernels = {}
    for arch in ("sm_80", "sm_89"):
        cap, limit = int(arch[3:]), SHARED_MEMORY_LIMIT[arch]
        kernels[f"attention bf16, {arch}"] = attention_variant(
            "bf16", d, impl.pick_config("bf16", d, shared_memory=limit), arch=cap)
        kernels[f"cross_attention bf16, {arch}"] = cross_attention_variant(
            d, impl.pick_config("cross", d, shared_memory=limit), arch=cap)
        for pv in ("fp16", "int8", "fp8") if cap >= 89 else ("fp16", "int8"):
            kernels[f"attention int8 q·k, {pv} P·V, {arch}"] = attention_8bit_variant(
                "int8", pv, d, impl.pick_config(impl8.config_path(pv), d, shared_memory=limit), arch=cap)
    return kernels


@pytest.mark.slow
@COMPILE_CHECK
def test_kernels_compile_for_ampere_and_ada():
    # GPUs with less shared memory per block than Hopper (A100: 163 KiB; L40S, RTX 4090: 99 KiB) get
    # tiles that fit it, and that spill nothing inside their key loops there either.
    from compile_check import run_without_interpreter

    kernels = run_without_interpreter("test_attention_triton", "compile_for_smaller_gpus")
    assert len(kernels) == 9 and all(v["registers"] > 0 and v["loop_instructions"] > 0 for v in kernels.values())
    too_big = {k: v["shared"] for k, v in kernels.items() if v["shared"] > SHARED_MEMORY_LIMIT[k.split(", ")[-1]]}
    assert not too_big, too_big
    assert not {k: v["local_in_loops"] for k, v in kernels.items() if v["local_in_loops"]}


def test_int8_pv_products_by_bits_where_registers_allow(monkeypatch):
    """The bit-trick conversion of INT8 P·V products needs Hopper's (and datacenter Blackwell's) registers:
    off on sm_80, sm_89 and sm_120, where the key loop would spill."""
    from dit8.kernels import attention_8bit_triton as impl8

    for capability, want in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert impl8.pv_products_by_bits(torch.device("cuda", 0)) is want
    assert impl8.pv_products_by_bits(torch.device("cpu"))


def test_auto_gives_heads_wider_than_the_kernels_take_to_torch(monkeypatch):
    # "auto" chose the Triton kernel, which refused the head: a model of another head width failed on
    # its first forward instead of running on SDPA.
    from dit8.kernels.attention import MAX_HEAD_DIM

    monkeypatch.setenv("DIT8_BACKEND", "triton")  # what "auto" takes first, on a CPU too
    gen = torch.Generator().manual_seed(11)
    q, k, v, k_img, v_img = (torch.randn(1, n, 2, MAX_HEAD_DIM + 64, generator=gen).to(DEVICE) for n in (5, 7, 7, 3, 3))
    assert torch.equal(ops.attention(q, k, v), ops.attention(q, k, v, backend="torch"))
    assert torch.equal(ops.cross_attention(q, k, v, k_img, v_img),
                       ops.cross_attention(q, k, v, k_img, v_img, backend="torch"))
    with pytest.raises(OpArgumentError, match=f"supports head_dim up to {MAX_HEAD_DIM}, got {MAX_HEAD_DIM + 64}"):
        ops.attention(q, k, v, backend="triton")
    with pytest.raises(OpArgumentError, match=f"up to {MAX_HEAD_DIM}"):  # no torch 8-bit path to fall back to
        ops.attention(q, k, v, precision="int8")
    # A head of exactly MAX_HEAD_DIM is still the kernel's.
    called = []
    # (a clone: the kernel runs as a torch.library op, whose output may not be one of its inputs)
    monkeypatch.setattr(impl, "attention_bf16", lambda q, k, v: called.append(q.shape[-1]) or q.clone())
    q = torch.randn(1, 5, 2, MAX_HEAD_DIM, generator=gen).to(DEVICE)
    ops.attention(q, q, q)
    assert called == [MAX_HEAD_DIM]
