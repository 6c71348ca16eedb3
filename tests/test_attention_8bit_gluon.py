"""The Gluon 8-bit attention kernel for Hopper (kernels/attention_8bit_gluon.py), a candidate for the 8-bit
paths: on the GPU against float64 (held to the bound of the Triton 8-bit kernel: the error of an exact
emulation of the recipe, plus 20% and 2e-3) and against the Triton kernel on the same quantized
operands; its argument checks; and a compile check of its schedule (opt-in without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from dit8.kernels import OpArgumentError, candidates
from dit8.kernels import attention_8bit_triton as impl8
from dit8.kernels.attention_triton import AttnConfig
from test_attention_gluon import HOPPER, _qkv
from test_attention_triton import attention64, check_output, emulate_8bit, rel_err


def _gluon():
    from dit8.kernels import attention_8bit_gluon

    return attention_8bit_gluon


# The kernel's configurations (attention_8bit_gluon.CONFIGS, named as kernels/candidates.py routes them).
CONFIGS = candidates.CONFIGURATIONS["attention_8bit"]


def on_hopper(test):
    """The marks of a GPU test of the kernel. As the bf16 Gluon kernel's tests: a kernel hung on a barrier
    ends its (xdist worker) process, not the test run."""
    for mark in (pytest.mark.gpu, pytest.mark.timeout(45, method="thread"),
                 pytest.mark.skipif(not HOPPER, reason="the Gluon kernel is written for Hopper GPUs (sm_90)")):
        test = mark(test)
    return test


@on_hopper
@pytest.mark.parametrize("b, lq, lk, h, kind", [
    (2, 300, 257, 3, "plain"),  # keys: four full blocks and a tail of 1; queries: a partial block
    (1, 77, 1, 2, "plain"),  # one key
    (1, 129, 128, 2, "plain"),  # keys exactly two blocks, no tail
    (1, 1000, 1500, 3, "offsets"),  # q and k with large channel offsets (smoothing at work)
    (1, 1000, 1000, 4, "fused"),  # strided views of one QKV tensor
    (1, 4099, 4099, 2, "plain"),  # 65 key blocks: the stage ring and P's buffers wrap many times
])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gluon_8bit_error_is_that_of_its_quantization(b, lq, lk, h, kind, precision, config):
    g = _gluon()
    block_m = g.CONFIGS[config]["block_m"]
    q, k, v = _qkv(b, lq, lk, h, seed=b + lq + lk, offsets=kind == "offsets", fused=kind == "fused")
    out = g.attention_8bit(q, k, v, precision, **g.CONFIGS[config])
    check_output(out, q)
    ref = attention64(q, k, v)
    emu = emulate_8bit(q, k, v, *impl8.RECIPES[precision], block_m, g.BLOCK_N)
    # The bound tests/test_attention_triton.py holds the Triton kernel to (fp32 arithmetic, bf16 output).
    assert rel_err(out, ref) <= 1.2 * rel_err(emu, ref) + 2e-3, (rel_err(out, ref), rel_err(emu, ref))


@on_hopper
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gluon_8bit_is_the_triton_kernel_on_the_same_operands(precision, config):
    """Same codes, same key blocks in the same order, so the same running maxima. The scores differ by
    the rounding of the folded constant (module docstring: at most 0.75 of an integer step of the dot),
    which now and then moves a P code across a rounding boundary (simulated on such inputs for FP8 P, it
    moved the output by 0.2% of the recipe's error), and by the order of fp32 sums (INT8: the folded
    constant of the products, under one unit of an integer sum a block); each output is rounded to bf16.
    So the outputs differ by a small fraction of the recipe's own error against float64 (~2-3%), where a
    different algorithm would differ by about that error."""
    g = _gluon()
    kwargs = g.CONFIGS[config]
    warp_specialized, block_m = kwargs["warp_specialized"], kwargs["block_m"]
    q, k, v = _qkv(2, 700, 600, 3, seed=5, offsets=True)
    qk, pv = impl8.RECIPES[precision]
    x = impl8.quantize_for_attention(q, k, v, qk=qk, pv=pv, block_m=block_m, block_n=g.BLOCK_N, operand_order=False)
    out = g.attention_from_quantized(x, warp_specialized=warp_specialized)
    check_output(out, q)
    triton_out = impl8.attention_from_quantized(x, torch.bfloat16, AttnConfig(block_m, g.BLOCK_N, block_m // 16, 3))
    recipe_err = rel_err(triton_out, attention64(q, k, v))
    assert rel_err(out, triton_out) <= 0.25 * recipe_err, (rel_err(out, triton_out), recipe_err)


def test_gluon_8bit_names_what_it_cannot_take():
    g = _gluon()
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(OpArgumentError, match="q must be a bf16 CUDA tensor"):
        g.attention_8bit(q, q, q, "fp8")
    with pytest.raises(OpArgumentError, match="precision must be 'int8' or 'fp8', got 'bf16'"):
        g.check_scope(q, q, q, "bf16")
    # Operands quantized for another block size (the interpreter's) are refused before any launch.
    y = q.float().to("cuda" if torch.cuda.is_available() else "cpu")
    x = impl8.quantize_for_attention(y, y, y, qk="int8", pv="fp8", block_m=64, block_n=32)
    with pytest.raises(OpArgumentError, match="quantized in blocks of 128 or 64 x 64"):
        g.attention_from_quantized(x)
    # So are v codes in the Triton kernel's key order.
    x = impl8.quantize_for_attention(y, y, y, qk="int8", pv="fp8", block_m=64, block_n=64)
    with pytest.raises(OpArgumentError, match="operand_order=False"):
        g.attention_from_quantized(x)
    if torch.cuda.is_available():
        x = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(OpArgumentError, match="head_dim must be 128"):
            g.attention_8bit(x, x, x, "int8")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("DIT8_SM90_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_SM90_COMPILE=1")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gluon_8bit_overlaps_its_softmax_with_pv_on_hopper(precision, config):
    import triton

    from compile_check import run_without_interpreter

    kwargs = _gluon().CONFIGS[config]
    warp_specialized, block_m = kwargs["warp_specialized"], kwargs["block_m"]
    if precision == "int8" and not warp_specialized and tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 9):
        pytest.skip("triton 3.9 spills the INT8 kernel without warp specialization in its key loop (255 "
                    "registers, 10 local accesses); 3.6, the GPU machines' version, does not")

    r = run_without_interpreter("test_attention_8bit_gluon", "sm90_schedule", (precision, warp_specialized, block_m))
    # Within Hopper's 227 KiB of shared memory, no spills, the products asynchronous.
    assert r["spills"] == 0 and 0 < r["shared"] <= 227 * 1024 and not r["wgmma_serialized"], r
    if block_m == 64:  # two programs an SM, each with its own barriers (BLOCK_MS)
        assert 2 * (r["shared"] + 1024) <= 228 * 1024 and 2 * 128 * r["registers"] <= 65536, r
    # The key loop: both products issued, then a wait that leaves P·V in flight, then every exp2 of the
    # block (a thread's 32 scores and its two rows' alphas, and INT8's rs); the wait for P·V comes only in
    # the next block.
    assert r["waits_for_one"] == 1 and r["exp2_after_it"] >= 34 and r["waits_for_all_after_it"] == 0, r


def sm90_schedule(precision: str, warp_specialized: bool, block_m: int) -> dict:
    """Compile the kernel for sm_90a (without TRITON_INTERPRET) and describe its key loop (with warp
    specialization: that of the multiplying warps)."""
    from compile_check import compile_gluon_kernel, key_loop_overlap
    from triton.experimental.gluon import language as gl

    g = _gluon()
    D = g.HEAD_DIM
    v_name, v_type = ("i8", gl.int8) if precision == "int8" else ("fp8e4nv", gl.float8e4nv)
    types = dict(q_desc=f"tensordesc<i8[{block_m}, {D}],{g.shared_layout(block_m, D, gl.int8)!r}>",
                 k_desc=f"tensordesc<i8[{g.BLOCK_N}, {D}],{g.shared_layout(g.BLOCK_N, D, gl.int8)!r}>",
                 v_desc=f"tensordesc<{v_name}[{D}, {g.BLOCK_N}],{g.shared_layout(D, g.BLOCK_N, v_type)!r}>",
                 QScale="*fp32", KSB="*fp32", stride_ksb="i32", stride_ks="i32", VMean="*fp32", VScale="*fp32",
                 Out="*bf16", stride_ob="i32", stride_om="i32", stride_oh="i32", H="i32", Lq="i32", Lk="i32",
                 n_qblocks="i32")
    report, sass = compile_gluon_kernel(
        g._attention_8bit_kernel, types,
        dict(BLOCK_M=block_m, BLOCK_N=g.BLOCK_N, HEAD_DIM=D, NSTAGES=g.STAGES, WS=warp_specialized,
             PV_INT8=precision == "int8", num_warps=g.num_warps(block_m)),
        num_warps=g.num_warps(block_m), aligned=("KSB", "stride_ksb", "stride_ks", "Out", "stride_om", "stride_oh"))
    return report | key_loop_overlap(sass)
