"""The Gluon FP8 GEMM for Hopper (kernels/scaled_mm_gluon.py), a candidate for the promoted FP8 entries:
against float64 on the GPU (error at most twice that of the same-precision computations, as for the
Triton kernel: the torch reference op and cuBLAS's promoted FP8 accumulation), its argument checks, and
a compile check of the schedule it exists for (opt-in without a GPU).

Shapes: M, N and K not multiples of the tiles (TMA zero-fills the tails), one K tile and an odd or even
number of K tiles (the loop handles the products in pairs), and more tiles than programs (each program
walks several tiles, its loads running ahead across tile boundaries)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon dialect")

from dit8.kernels import OpArgumentError  # noqa: E402
from dit8.kernels import scaled_mm as op  # noqa: E402
from dit8.kernels import scaled_mm_gluon as g  # noqa: E402
from test_scaled_mm_triton import (check_output, gate_rows, operands, quantized_operands, reference64,  # noqa: E402
                                   rel_err, residual_and_gate, tensor_core_error)

FP8 = torch.float8_e4m3fn
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def on_hopper(test=None, *, seconds: int = 45):
    """The marks of a GPU test of the kernel (`@on_hopper`, or `@on_hopper(seconds=...)` for a longer one)."""
    def mark(test):
        marks = [
            pytest.mark.gpu,
            pytest.mark.skipif(not HOPPER, reason="the Gluon GEMM is written for Hopper GPUs (sm_90)"),
            # A kernel waiting on a barrier that never completes blocks in the driver, where no signal
            # reaches Python: the thread method ends the (xdist worker) process instead, and the other
            # tests go on. A compile and a run take a few seconds: a short limit keeps a kernel that hangs
            # in every test from spending the test run's time.
            pytest.mark.timeout(seconds, method="thread"),
            # On Hopper the triton backend routes its GEMMs to the adopted Gluon kernels
            # (kernels/candidates.py ADOPTED): their tests vouch for that backend too.
            pytest.mark.verifies("scaled_mm", "scaled_mm_fused", backend="triton"),
        ]
        for m in marks:
            test = m(test)
        return test

    return mark(test) if test is not None else mark


def configuration(name: str) -> g.GluonGemmConfig:
    """CANDIDATES[name], or FAST for "fast" (FP8) and "int8"."""
    return g.FAST if name in ("fast", "int8") else g.CANDIDATES[name]


def check_within_budget(xq, xs, wq, ws, bias, out_dtype, config=g.DEFAULT, **epilogue):
    """Run the kernel; assert its error against float64 is at most 2x the larger of the torch
    reference op's and cuBLAS's FP8 accumulation's, promoted or, for the fast-accumulation kernel,
    cuBLAS's use_fast_accum=True (with a residual: relative to the update)."""
    out = g.scaled_mm(xq, xs, wq, ws, bias, out_dtype, config=config, **epilogue)
    check_output(out, (xq.shape[0], wq.shape[0]), out_dtype)
    residual = epilogue.get("residual")
    ref = reference64(xq, xs, wq, ws, bias, epilogue.get("activation"), residual, epilogue.get("gate"),
                      gate_rows(xq, epilogue))
    err = rel_err(out, ref, residual)
    ref_op = op(xq, xs, wq, ws, bias, out_dtype, backend="torch", **epilogue)
    tensor_cores = tensor_core_error(xq, xs, wq, ws, bias, out_dtype, ref, fast_accum=config.fast_accumulation,
                                     **epilogue)
    err_same = max(rel_err(ref_op, ref, residual), tensor_cores)
    assert err <= 2 * err_same, (err, err_same)
    return out


@pytest.mark.parametrize("M, N, K, out_dtype", [
    (77, 45, 16, torch.bfloat16),  # one K tile, zero-filled past K; a partial tile in M and N
    (300, 130, 144, torch.float16),  # two K tiles (even), 3 x 2 output tiles
    (1000, 5008, 4112, torch.bfloat16),  # 33 K tiles (odd), N and K off the tile multiples
    (4096, 5120, 640, torch.float32),  # 1280 tiles over the SMs: each program walks ~10 tiles
], ids=lambda x: str(x).removeprefix("torch."))
@pytest.mark.parametrize("config", [*g.CANDIDATES, "fast"])
@on_hopper
def test_gluon_gemm_within_twice_the_same_precision_error(M, N, K, out_dtype, config):
    xq, xs, wq, ws, bias = operands(M, N, K, FP8, seed=M + N + K, bias_dtype=torch.bfloat16)
    check_within_budget(xq, xs, wq, ws, bias, out_dtype, configuration(config))


@pytest.mark.parametrize("M, N, K, out_dtype", [
    (77, 45, 16, torch.bfloat16), (300, 130, 144, torch.float16), (4096, 5120, 640, torch.float32),
], ids=lambda x: str(x).removeprefix("torch."))
@on_hopper
def test_gluon_int8_gemm_within_twice_the_reference_error(M, N, K, out_dtype):
    """FAST on INT8 codes: exact int32 accumulation, so the torch reference (_int_mm, then the fp32
    epilogue) is the same-precision computation."""
    xq, xs, wq, ws, bias = operands(M, N, K, torch.int8, seed=M + N + K, bias_dtype=torch.bfloat16)
    check_within_budget(xq, xs, wq, ws, bias, out_dtype, g.FAST)


@pytest.mark.parametrize("variant", ["gate", "no_gate", "gate_gelu", "gelu"])
@pytest.mark.parametrize("config", ["default", "ws", "split", "fast", "int8"])
@on_hopper
def test_gluon_gemm_fused_epilogues(variant, config):
    # N off the 128- and 256-column tiles: the residual and gate loads and the stores of a tail tile.
    M, N, K = 1000, 650, 272
    xq, xs, wq, ws, bias = operands(M, N, K, torch.int8 if config == "int8" else FP8, seed=7,
                                    bias_dtype=torch.float32)
    residual, gate = residual_and_gate(M, N, 4, seed=8)
    epilogue = {} if variant == "gelu" else dict(residual=residual)
    if variant.startswith("gate"):
        epilogue.update(gate=gate, rows_per_batch=250)
    if variant.endswith("gelu"):
        epilogue["activation"] = "gelu_tanh"
    check_within_budget(xq, xs, wq, ws, bias, torch.float32, configuration(config), **epilogue)
    assert torch.equal(residual, residual_and_gate(M, N, 4, seed=8)[0])


@pytest.mark.parametrize("config", ["default", "ws", "split"])
@on_hopper(seconds=120)
@pytest.mark.xdist_group("wan_shapes")  # the float64 reference takes ~10 GB
def test_gluon_gemm_at_the_ffn_down_projection(config):
    """Wan's K = 13824 linear (where the table keeps promoted tiles), against cuBLAS's default mode."""
    xq, xs, wq, ws = quantized_operands(32760, 5120, 13824, FP8, seed=3)  # made on the GPU
    config = g.CANDIDATES[config]
    out = g.scaled_mm(xq, xs, wq, ws, out_dtype=torch.bfloat16, config=config)
    check_output(out, (32760, 5120), torch.bfloat16)
    ref = reference64(xq, xs, wq, ws)
    cublas = torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16)
    err, err_cublas = rel_err(out, ref), rel_err(cublas, ref)
    print(f"\ngluon {err:.3e}, cuBLAS {err_cublas:.3e}, ratio {err / err_cublas:.2f}")
    assert err <= 2 * err_cublas, (err, err_cublas)


def test_gluon_gemm_names_what_it_cannot_take():
    xq = torch.zeros(8, 32, dtype=FP8)
    s8, s4 = torch.ones(8), torch.ones(4)
    with pytest.raises(OpArgumentError, match="xq must be a CUDA tensor of float8_e4m3fn for the gluon promoted"):
        g.scaled_mm(xq, s8, xq[:4], s4)
    x8 = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(OpArgumentError, match="must be a CUDA tensor of float8_e4m3fn for the"):  # FP8 only
        g.scaled_mm(x8, s8, x8[:4], s4)
    with pytest.raises(OpArgumentError, match="float8_e4m3fn or int8 for the gluon fast"):
        g.scaled_mm(x8, s8, x8[:4], s4, config=g.FAST)
    with pytest.raises(OpArgumentError, match="disagree on K"):  # the op's own checks come first
        g.scaled_mm(xq, s8, xq[:4, :16], s4)
    with pytest.raises(OpArgumentError, match="gate and rows_per_batch need a residual"):
        g.scaled_mm(xq, s8, xq[:4], s4, gate=torch.ones(1, 4))
    if torch.cuda.is_available():
        x = torch.zeros(8, 40, dtype=FP8, device="cuda")[:, :24]  # a 40-byte row stride
        with pytest.raises(OpArgumentError, match="16-byte aligned rows"):
            g.scaled_mm(x, s8.cuda(), x[:4], s4.cuda())


# ----------------------------------------------------------------------------------------------------
# Without a GPU: the schedule the kernel exists for, from its sm_90a machine code (opt-in, ~5 s a variant):
#     DIT8_SM90_COMPILE=1 python -m pytest tests/test_scaled_mm_gluon.py -k hopper
# ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("DIT8_SM90_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_SM90_COMPILE=1")
@pytest.mark.parametrize("epilogue", ["plain", "gelu", "residual"])
@pytest.mark.parametrize("config", [name for name, cfg in g.CANDIDATES.items() if not cfg.split_accumulation])
def test_gluon_gemm_adds_each_product_while_the_next_runs_on_hopper(config, epilogue):
    from compile_check import run_without_interpreter

    r = run_without_interpreter("test_scaled_mm_gluon", "sm90_schedule", (config, epilogue))
    # Within Hopper's 227 KiB of shared memory, no spills, and the products asynchronous (ptxas serializes
    # them where other instructions read an accumulator while a product may still write it).
    assert r["spills"] == 0 and 0 < r["shared"] <= 227 * 1024 and not r["wgmma_serialized"], r
    # The K loop (two products an iteration; with warp specialization, that of the multiplying warps):
    # each wait leaves one product in flight, never none, and after each wait comes the fp32 add of a
    # whole 64-register product, before the next product is issued.
    assert r["waits_for_one"] == 2 and r["waits_for_all"] == 0 and r["adds_after_each_wait"] == [64, 64], r


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("DIT8_SM90_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_SM90_COMPILE=1")
@pytest.mark.parametrize("epilogue", ["plain", "gelu", "residual"])
@pytest.mark.parametrize("codes", ["fp8", "int8"])
def test_gluon_fast_gemm_keeps_one_product_in_flight_on_hopper(codes, epilogue):
    from compile_check import run_without_interpreter

    r = run_without_interpreter("test_scaled_mm_gluon", "sm90_schedule", ("fast", epilogue, codes))
    # No spills in the K loop (triton 3.6 moves one value of the residual epilogue to memory, once a tile,
    # outside it), within shared memory, products asynchronous; in the K loop one wait that leaves the
    # product just issued in flight, and no wait for all.
    assert r["spills_in_k_loop"] == 0 and r["spills"] <= 8, r
    assert 0 < r["shared"] <= 227 * 1024 and not r["wgmma_serialized"], r
    assert r["waits_for_one"] == 1 and r["waits_for_all"] == 0, r


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("DIT8_SM90_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_SM90_COMPILE=1")
@pytest.mark.parametrize("epilogue", ["plain", "gelu", "residual"])
def test_gluon_split_gemm_never_waits_for_an_add_on_hopper(epilogue):
    from compile_check import run_without_interpreter

    r = run_without_interpreter("test_scaled_mm_gluon", "sm90_schedule", ("split", epilogue))
    # Two K steps an iteration, one into each accumulator: each wait leaves the product just issued in
    # flight (completing the other accumulator's), none waits for all, and no fp32 add is in the loop.
    # sm_90a, triton 3.6: 107 instructions a warp an iteration (53.5 a 128-deep step, against 112.5 for
    # the promoted warp-specialized kernel), 168 registers.
    assert r["spills"] == 0 and 0 < r["shared"] <= 227 * 1024 and not r["wgmma_serialized"], r
    assert r["waits_for_one"] == 2 and r["waits_for_all"] == 0 and r["adds_in_k_loop"] == 0, r


def sm90_schedule(config: str, epilogue: str, codes: str = "fp8") -> dict:
    """Compile configuration(config) with the given epilogue and operand codes for sm_90a (without
    TRITON_INTERPRET), as specialized for Wan's shapes (N, K and the strides multiples of 16), and
    describe its K loop."""
    import re

    from compile_check import compile_gluon_kernel, loops

    cfg = configuration(config)
    dtype, name = (torch.int8, "i8") if codes == "int8" else (FP8, "fp8e4nv")
    desc = {rows: f"tensordesc<{name}[{rows}, {cfg.block_k}],{g.operand_layout(rows, cfg.block_k, dtype)!r}>"
            for rows in (cfg.block_m, cfg.block_n)}
    residual = epilogue == "residual"
    specialized = cfg.warp_specialized or cfg.fast_accumulation or cfg.split_accumulation
    types = dict(a_desc=desc[cfg.block_m], b_desc=desc[cfg.block_n], XS="*fp32", WS="*fp32", Bias="*fp32",
                 Res="*fp32", Gate="*fp32", Out="*fp32" if residual else "*bf16", M="i32", N="i32", K="i32",
                 stride_om="i32", stride_rm="i32", stride_gb="i32", rows_per_batch="i32")
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                      NSTAGES=cfg.num_stages, NUM_PROGRAMS=132, HAS_BIAS=True, ACTIVATION=int(epilogue == "gelu"),
                      HAS_RESIDUAL=residual, HAS_GATE=residual, num_warps=cfg.num_warps,
                      **({"FAST": cfg.fast_accumulation, "SPLIT": cfg.split_accumulation, "IS_INT8": codes == "int8"}
                         if specialized else {}))
    kernel = g._gemm_ws_kernel if specialized else g._fp8_gemm_kernel
    report, sass = compile_gluon_kernel(kernel, types, constexprs, num_warps=cfg.num_warps,
                                        aligned=("Out", "Res", "Gate", "N", "K", "stride_om", "stride_rm", "stride_gb"))
    # 64 x N x 32 instructions a warpgroup issues per K loop iteration: the promoted kernels' loops take
    # two products, the fast kernel's one, whose INT8 instructions cover half its 256 columns each.
    products = (1 if cfg.fast_accumulation else 2) * cfg.block_k // 32 * (2 if codes == "int8" else 1)
    body = min((b for b in loops(sass) if sum(re.search(r"\b[QI]GMMA", x) is not None for x in b) == products),
               key=len)
    if cfg.fast_accumulation or cfg.split_accumulation:
        return report | dict(spills_in_k_loop=sum(bool(re.search(r"\b(LDL|STL)\b", x)) for x in body),
                             adds_in_k_loop=sum(bool(re.match(r"FADD\b", x)) for x in body),
                             waits_for_one=sum("DEPBAR.LE gsb0, 0x1" in x for x in body),
                             waits_for_all=sum("DEPBAR.LE gsb0, 0x0" in x for x in body))
    first_wait = next(i for i, x in enumerate(body) if "WARPGROUP.DEPBAR" in x)
    body = body[first_wait:] + body[:first_wait]  # the loop as a cycle, from its first wait
    adds = []  # per wait, the fp32 adds between it and the next product's first instruction
    for i, x in enumerate(body):
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in x:
            span = body[i + 1:] + body[:i]
            issue = next(j for j, y in enumerate(span) if "QGMMA" in y and "!UPT" in y)
            adds.append(sum(bool(re.match(r"FADD\b", y)) for y in span[:issue]))
    return report | dict(waits_for_one=len(adds), waits_for_all=sum("DEPBAR.LE gsb0, 0x0" in x for x in body),
                         adds_after_each_wait=adds)
