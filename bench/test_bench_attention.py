"""Attention benchmarks: the Triton kernels against torch SDPA (cuDNN and FlashAttention-2 backends)
in the same run, at Wan2.1-14B 480P sizes (B=1, H=40, D=128, 32,760 tokens; 512 text and 257 image
keys for cross-attention).

    python -m pytest bench/test_bench_attention.py -q --benchmark-json=attn.json

extra_info of each benchmark: ms (do_bench median), tflops (4·B·H·Lq·Lk·D per call; for the 8-bit paths
a bf16-equivalent rate), ratio = cuDNN ms / ms, rel_err against the cuDNN output, and for the 8-bit
paths quantize_ms (the smoothing and quantization of q, k, v, included in ms); n_regs / n_spills of
the Triton kernel; baseline: the SDPA backend of the baseline (cudnn, or flash where cuDNN refuses).
DIT8_ATTN_SWEEP=1 also times every candidate launch configuration (for tuning the config table).
Without CUDA: smoke mode (tiny shapes, one run each, Triton in the interpreter).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from dit8 import kernels as ops

triton = pytest.importorskip("triton", reason="triton is not installed")
from dit8.kernels import attention_8bit_triton as impl8  # noqa: E402
from dit8.kernels import attention_triton as impl  # noqa: E402
from dit8.kernels.buffers import poisoned_outputs  # noqa: E402

# (B, L, H, D) of the self-attention and (Lq, Ltext, Limage) of the cross-attention.
FULL = dict(self_shape=(1, 32760, 40, 128), cross=(32760, 512, 257))
SMOKE = dict(self_shape=(1, 100, 2, 32), cross=(70, 40, 19))


def sdpa_backend(name: str, device: str):
    """Context forcing torch SDPA onto one backend (on CPU: the math backend, smoke mode only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device != "cuda":
        return sdpa_kernel([SDPBackend.MATH])
    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]])


def inputs(shape, lk, device, seed=0):
    B, L, H, D = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, L, H, D, device=device, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, lk, H, D, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, lk, H, D, device=device, generator=gen, dtype=torch.bfloat16)
    return q, k, v


def kernel_info(name: str) -> dict:
    """Registers and spills of the last compiled launch of a Triton wrapper (CUDA only)."""
    compiled = impl.LAST_COMPILED.get(name)
    return {k: getattr(compiled, k) for k in ("n_regs", "n_spills") if hasattr(compiled, k)}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _sdpa_call(name, device, q, k, v):
    def run():
        with sdpa_backend(name, device):
            return ops.attention(q, k, v, backend="torch")
    return run


def _cross_call(name, device, q, k, v, k_img, v_img):
    """The cross-attention baseline: the text and the image attention as two SDPA calls of `name`."""
    def run():
        with sdpa_backend(name, device):
            return ops.cross_attention(q, k, v, k_img, v_img, backend="torch")
    return run


def baseline(cache: dict, key, make_call, gpu_time) -> tuple[float, torch.Tensor, str]:
    """(ms, output, SDPA backend) of the baseline, measured once per session: cuDNN, or FlashAttention
    where cuDNN refuses these inputs (named in each row's `baseline`), so that one missing backend
    costs its own row, not every row."""
    if key not in cache:
        error = None
        for backend in ("cudnn", "flash"):
            fn = make_call(backend)
            try:
                out = fn()
            except RuntimeError as err:  # "No available kernel"
                error = error or err
                continue
            cache[key] = (gpu_time(fn), out, backend)
            break
        else:
            raise error
    return cache[key]


# torch_reference: the op's torch backend, SDPA on whatever backend torch picks (the reference "auto"
# would run where the Triton kernel is not verified); triton_bf16: the bf16 kernel on the table's
# configuration (on Hopper with TMA loads; the sweep times the other candidates); triton_bf16_pointer:
# the same tile with pointer loads; triton_int8 / triton_fp8: the two 8-bit precisions (INT8 q·kᵀ; INT8
# or FP8 P·V); triton_int8_pv16: INT8 q·kᵀ with 16-bit P·V; *_three_per_sm: the 8-bit precisions on the
# register-capped candidate tile (attention_triton.THREE_PER_SM); triton_int8_pointer /
# triton_fp8_pointer: the table's tile with pointer loads (on Hopper the table's loads through TMA).
SELF_IMPLS = ["sdpa_cudnn", "sdpa_flash", "torch_reference", "triton_bf16", "triton_bf16_pointer", "triton_int8",
              "triton_fp8", "triton_int8_pv16", "triton_int8_three_per_sm", "triton_fp8_three_per_sm",
              "triton_int8_pointer", "triton_fp8_pointer"]


@pytest.mark.parametrize("name", SELF_IMPLS)
def test_self_attention(name, device, smoke, record, gpu_time, baseline_cache):
    shape = (SMOKE if smoke else FULL)["self_shape"]
    B, L, H, D = shape
    q, k, v = inputs(shape, L, device)
    base_ms, base_out, base_name = baseline(baseline_cache, ("attention", shape),
                                            lambda backend: _sdpa_call(backend, device, q, k, v), gpu_time)

    info = {}
    if name.startswith("sdpa_"):
        fn = _sdpa_call(name.removeprefix("sdpa_"), device, q, k, v)
    elif name == "triton_bf16_pointer":
        config = dataclasses.replace(impl.pick_config("bf16", D, shared_memory=impl.shared_memory_of(q.device)),
                                     tma=False)
        fn = lambda: impl.attention_bf16(q, k, v, config=config)  # noqa: E731
        info.update(config=str(config))
    elif name in ("torch_reference", "triton_bf16"):
        backend = {"torch_reference": "torch", "triton_bf16": "triton"}[name]
        fn = lambda: ops.attention(q, k, v, precision="bf16", backend=backend)  # noqa: E731
        # The two backends "auto" chooses between for bf16 (bench/fastest_backends.py reads these).
        info.update(op="attention", backend=backend, case="bf16")
    else:
        qk, pv = {"triton_int8": impl8.RECIPES["int8"], "triton_fp8": impl8.RECIPES["fp8"],
                  "triton_int8_pv16": ("int8", "fp16")}[name.removesuffix("_three_per_sm").removesuffix("_pointer")]
        config = impl.THREE_PER_SM if name.endswith("_three_per_sm") else None
        if name.endswith("_pointer"):
            table = impl.pick_config(impl8.config_path(pv), D, shared_memory=impl.shared_memory_of(q.device))
            config = dataclasses.replace(table, tma=False)
        fn = lambda: impl8.attention_8bit(q, k, v, "int8", qk=qk, pv=pv, config=config)  # noqa: E731
        cfg = config or impl.pick_config(impl8.config_path(pv), D, shared_memory=impl.shared_memory_of(q.device))
        info["quantize_ms"] = round(gpu_time(lambda: impl8.quantize_for_attention(
            q, k, v, qk=qk, pv=pv, block_m=cfg.block_m, block_n=cfg.block_n)), 4)
        info.update(qk=qk, pv=pv, config=str(cfg))
    with poisoned_outputs():  # the check call: every element written
        out = fn()
    if name.startswith("triton_"):
        info.update(kernel_info("attention" if name.startswith("triton_bf16") else "attention_8bit"))
    assert out.shape == q.shape and torch.isfinite(out).all()
    err = rel_err(out, base_out)
    # A wrong kernel must not produce a benchmark number: 8-bit within its error budget (~3.4% for
    # FP8 P·V, tests/test_attention_triton.py), the others within bf16 rounding of cuDNN.
    eight_bit = "int8" in name or "fp8" in name
    assert err < (0.08 if eight_bit else 0.02), err
    record(fn, flops=4 * B * H * L * L * D, baseline_ms=base_ms, baseline=base_name, rel_err=round(err, 5),
           shape=list(shape), **info)


# triton_fused: the fused kernel on the table's configuration (on Hopper: TMA loads), a key loop over the
# text keys, then one over the image keys; triton_fused_pointer: the table's tile with pointer loads;
# triton_fused_tma_128x128: 128 x 128 tiles (attention_triton.CROSS_TMA_CANDIDATES[1]; Hopper).
CROSS_IMPLS = ["cudnn_two_calls", "flash_two_calls", "triton_fused", "triton_fused_pointer",
               "triton_fused_tma_128x128"]


@pytest.mark.parametrize("name", CROSS_IMPLS)
def test_cross_attention(name, device, smoke, record, gpu_time, baseline_cache):
    lq, lt, li = (SMOKE if smoke else FULL)["cross"]
    B, _, H, D = (SMOKE if smoke else FULL)["self_shape"]
    q, k, v = inputs((B, lq, H, D), lt, device)
    _, k_img, v_img = inputs((B, 1, H, D), li, device, seed=1)

    def two_calls(backend):
        return _cross_call(backend, device, q, k, v, k_img, v_img)

    base_ms, base_out, base_name = baseline(baseline_cache, ("cross_attention", (B, lq, lt, li, H, D)),
                                            two_calls, gpu_time)
    if name == "triton_fused":
        fn = lambda: ops.cross_attention(q, k, v, k_img, v_img, backend="triton")  # noqa: E731
    elif name == "triton_fused_pointer":
        config = dataclasses.replace(impl.pick_config("cross", D, shared_memory=impl.shared_memory_of(q.device)),
                                     tma=False)
        fn = lambda: impl.cross_attention(q, k, v, k_img, v_img, config=config)  # noqa: E731
    elif name == "triton_fused_tma_128x128":
        config = impl.CROSS_TMA_CANDIDATES[1]
        if impl.tma_views(config, q, k, v, k_img, v_img) is None:
            pytest.skip("TMA loads need a Hopper (or later) GPU")
        fn = lambda: impl.cross_attention(q, k, v, k_img, v_img, config=config)  # noqa: E731
    else:
        fn = two_calls(name.removesuffix("_two_calls"))
    with poisoned_outputs():
        out = fn()
    info = kernel_info("cross_attention") if name.startswith("triton_fused") else {}
    err = rel_err(out, base_out)
    assert torch.isfinite(out).all() and err < 0.02, err
    record(fn, flops=4 * B * H * lq * (lt + li) * D, baseline_ms=base_ms, baseline=base_name,
           rel_err=round(err, 5), shape=[B, lq, lt, li, H, D], **info)


SWEEP = [impl.AttnConfig(*c) for c in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
                                       (128, 128, 8, 4), (64, 64, 4, 3), (64, 128, 4, 2), (64, 128, 4, 3),
                                       (64, 128, 4, 4), (256, 64, 8, 2)]] + [impl.THREE_PER_SM]


def tile_name(cfg: impl.AttnConfig) -> str:
    """"64x128_w4_s2" (block_m x block_n, warps, stages; "_r168" where registers are capped, "_tma" with TMA
    loads)."""
    cap = f"_r{cfg.max_registers}" if cfg.max_registers else ""
    return f"{cfg.block_m}x{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}{cap}{'_tma' if cfg.tma else ''}"


@pytest.mark.skipif(os.environ.get("DIT8_ATTN_SWEEP") != "1" or not torch.cuda.is_available(),
                    reason="config sweep: set DIT8_ATTN_SWEEP=1 on a CUDA machine")
@pytest.mark.timeout(0)  # compiles every candidate: longer than the suite's per-test limit
@pytest.mark.parametrize("path", ["bf16", "int8", "fp8", "pv16", "cross"])
def test_config_sweep(path, device, record, gpu_time, baseline_cache, sound_configs, sweep_candidates,
                      candidate_failures):
    """Every candidate's time and error against the SDPA output (DIT8_SWEEP_ONLY narrows them by
    tile_name; the path's own configuration is always timed, as `table`); `best` is the fastest of
    those within 2x the lowest error (a fast wrong kernel never wins), its ratio to the SDPA baseline.
    "pv16": the 8-bit kernel with 16-bit P·V (config path "8bit_pv16"). "cross": the fused text + image
    kernel at Wan's cross-attention shape, against two SDPA calls."""
    B, L, H, D = FULL["self_shape"]
    if path == "cross":
        lq, lt, li = FULL["cross"]
        q, k, v = inputs((B, lq, H, D), lt, device)
        _, k_img, v_img = inputs((B, 1, H, D), li, device, seed=1)

        base_ms, base_out, base_name = baseline(
            baseline_cache, ("cross_attention", (B, lq, lt, li, H, D)),
            lambda backend: _cross_call(backend, device, q, k, v, k_img, v_img), gpu_time)
        flops = 4 * B * H * lq * (lt + li) * D
    else:
        q, k, v = inputs(FULL["self_shape"], L, device)
        base_ms, base_out, base_name = baseline(baseline_cache, ("attention", FULL["self_shape"]),
                                                lambda backend: _sdpa_call(backend, device, q, k, v), gpu_time)
        flops = 4 * B * H * L * L * D

    def call(cfg):
        if path == "cross":
            return lambda: impl.cross_attention(q, k, v, k_img, v_img, config=cfg)
        if path == "bf16":
            return lambda: impl.attention_bf16(q, k, v, config=cfg)
        if path == "pv16":
            return lambda: impl8.attention_8bit(q, k, v, "int8", pv="fp16", config=cfg)
        return lambda: impl8.attention_8bit(q, k, v, path, config=cfg)

    table = impl.pick_config({"int8": "8bit", "fp8": "8bit", "pv16": "8bit_pv16"}.get(path, path), D,
                             shared_memory=impl.shared_memory_of(q.device))
    times, errors = {}, {}
    # (The TMA candidates of each kernel; 16-bit P·V has none.)
    candidates = SWEEP + list({"bf16": impl.TMA_CANDIDATES, "cross": impl.CROSS_TMA_CANDIDATES,
                               "int8": impl.EIGHT_BIT_TMA_CANDIDATES, "fp8": impl.EIGHT_BIT_TMA_CANDIDATES
                               }.get(path, ()))
    failed = {}
    for cfg in sweep_candidates(candidates, tile_name, [table]):
        with candidate_failures(failed, tile_name(cfg)):
            with poisoned_outputs():
                errors[cfg] = rel_err(call(cfg)(), base_out)
            times[cfg] = gpu_time(call(cfg))
    best = min(sound_configs(times, errors), key=times.get)
    extra = dict(table=tile_name(table), ms_table=round(times[table], 3)) if table in times else {}
    record(call(best), flops=flops, baseline_ms=base_ms, baseline=base_name, best=tile_name(best),
           rel_err=round(errors[best], 5),
           sweep={tile_name(c): [round(t, 3), round(errors[c], 5)] for c, t in times.items()}, failed=failed, **extra)
