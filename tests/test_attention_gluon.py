"""The Gluon bf16 attention kernel for Hopper (kernels/attention_gluon.py), a candidate for the bf16
path: against float64 on the GPU (its error at most twice torch SDPA's), its argument checks, and a
compile check of the schedule it exists for (opt-in without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from dit8 import kernels as ops
from dit8.kernels import OpArgumentError
from test_attention_triton import attention64, check_output, rel_err

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _gluon():
    from dit8.kernels import attention_gluon

    return attention_gluon


def _qkv(b, lq, lk, h, *, seed, offsets=False, fused=False):
    """bf16 q [b, lq, h, 128], k and v [b, lk, h, 128] on the GPU; `fused`: views of one QKV tensor
    (lq == lk), as the QKV GEMM leaves them; `offsets`: per-channel offsets in q and k."""
    gen = torch.Generator().manual_seed(seed)
    if fused:
        qkv = torch.randn(b, lq, 3, h, 128, generator=gen)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q, k, v = (torch.randn(b, n, h, 128, generator=gen) for n in (lq, lk, lk))
    if offsets:
        q, k = q + 8 * torch.randn(128, generator=gen), k + 8 * torch.randn(128, generator=gen)
    return [t.bfloat16().cuda() for t in (q, k, v)]


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel is written for Hopper GPUs (sm_90)")
# A kernel waiting on a barrier that never completes blocks in the driver, where no signal reaches
# Python: the thread method ends the (xdist worker) process instead, and the other tests go on. A
# compile and a run take a few seconds: a short limit keeps a kernel that hangs in every test from
# spending the test run's time.
@pytest.mark.timeout(45, method="thread")
@pytest.mark.parametrize("b, lq, lk, h, kind", [
    (2, 300, 257, 3, "plain"),  # keys: two full blocks and a tail of 1; queries: a partial block
    (1, 77, 1, 2, "plain"),  # one key
    (1, 129, 128, 2, "plain"),  # keys exactly one block, no tail
    (1, 1000, 1500, 3, "offsets"),
    (1, 1000, 1000, 4, "fused"),  # strided views of one QKV tensor
    (1, 4099, 4099, 2, "plain"),  # 33 key blocks: the stage ring wraps many times
])
@pytest.mark.parametrize("warp_specialized", [False, True], ids=["", "ws"])
def test_gluon_attention_within_twice_sdpa_error(b, lq, lk, h, kind, warp_specialized):
    q, k, v = _qkv(b, lq, lk, h, seed=b + lq + lk, offsets=kind == "offsets", fused=kind == "fused")
    out = _gluon().attention_bf16(q, k, v, warp_specialized=warp_specialized)
    check_output(out, q)
    ref = attention64(q, k, v)
    assert rel_err(out, ref) <= 2 * rel_err(ops.attention(q, k, v, backend="torch"), ref)


def test_gluon_attention_names_what_it_cannot_take():
    g = _gluon()
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(OpArgumentError, match="q must be a bf16 CUDA tensor"):
        g.attention_bf16(q, q, q)
    with pytest.raises(OpArgumentError, match="k has no keys"):
        g.attention_bf16(q, q[:, :0], q[:, :0])
    if torch.cuda.is_available():
        x = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(OpArgumentError, match="rows of 2 x 128 contiguous channels"):
            g.attention_bf16(x, x, x)


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("DIT8_SM90_COMPILE") != "1",
                    reason="opt-in compile check for machines without a GPU: set DIT8_SM90_COMPILE=1")
@pytest.mark.parametrize("warp_specialized", [False, True], ids=["", "ws"])
def test_gluon_attention_overlaps_its_softmax_with_pv_on_hopper(warp_specialized):
    from compile_check import run_without_interpreter

    r = run_without_interpreter("test_attention_gluon", "sm90_schedule", (warp_specialized, ))
    # Within Hopper's 227 KiB of shared memory, no spills, and the products asynchronous (ptxas serializes
    # them where other instructions read an accumulator while a product may still write it).
    assert r["spills"] == 0 and 0 < r["shared"] <= 227 * 1024 and not r["wgmma_serialized"], r
    # The key loop: both products issued, then a wait that leaves one in flight (q·kᵀ done, P·V not),
    # then every exp2 of the block; the wait for P·V comes only in the next block.
    assert r["waits_for_one"] == 1 and r["exp2_after_it"] >= 64 and r["waits_for_all_after_it"] == 0, r


def sm90_schedule(warp_specialized: bool) -> dict:
    """Compile the kernel for sm_90a (without TRITON_INTERPRET) and describe its key loop (with warp
    specialization: that of the multiplying warps)."""
    from compile_check import compile_gluon_kernel, key_loop_overlap

    g = _gluon()
    desc = f"tensordesc<bf16[{g.BLOCK_N}, {g.HEAD_DIM}],{g.shared_layout()!r}>"
    kernel = g._attention_ws_kernel if warp_specialized else g._attention_kernel
    report, sass = compile_gluon_kernel(
        kernel, dict(q_desc=desc, k_desc=desc, v_desc=desc, Out="*bf16", stride_om="i32", Lq="i32", Lk="i32",
                     qk_scale="fp32"),
        dict(BLOCK_M=g.BLOCK_M, BLOCK_N=g.BLOCK_N, HEAD_DIM=g.HEAD_DIM, NSTAGES=g.STAGES, num_warps=g.NUM_WARPS),
        num_warps=g.NUM_WARPS, aligned=("Out", "stride_om"))
    return report | key_loop_overlap(sass)
