"""The whole DiT forward (runtime/bench_dit.py, the code `dit8 bench dit` runs): one forward per weight
scheme on random weights built on the device, and diffusers' WanTransformer3DModel (bf16, SDPA) on the
same weights where diffusers is installed.

    python -m pytest bench/test_bench_dit.py -q --benchmark-json=dit.json
    DIT8_BENCH_DIT_LAYERS=8 python -m pytest bench/test_bench_dit.py -q     # fewer blocks: a quick run

CUDA: I2V-14B (40 blocks unless DIT8_BENCH_DIT_LAYERS says otherwise), 480P, 81 frames (32,760 tokens),
bf16 compute, backend "auto" (DIT8_BACKEND=triton picks the Triton kernels). extra_info of each row: ms
(CUDA events, one forward after one warm-up forward), peak_memory (bytes, torch.cuda.max_memory_allocated
over the timed forward) and peak_gib, layers, tokens; of the dit8 rows also scheme, context_ms (the
cross-attention k/v, once per generation), weight_gib, and baseline_ms (diffusers') with ratio =
diffusers ms / ms when the diffusers row (first in this file) ran in the same session; of the diffusers
row rel_diff_dit8 (its output against dit8's on the same weights). The pytest-benchmark time is one more
synchronized forward. The ids name neither the layer count nor the backend: compare saved runs made
with the same DIT8_BENCH_DIT_LAYERS and DIT8_BACKEND.
Without CUDA: smoke mode (tiny config, 1 block, 64x64, 5 frames, once each); the times mean nothing.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from dit8.bench_dit import SCHEMES, BenchSettings, DitBench, check_weights_fit
from dit8.errors import InputError
from dit8.diffusers_reference import diffusers_inputs

GIB = 2 ** 30


def _settings(scheme: str, smoke: bool) -> BenchSettings:
    if smoke:
        return BenchSettings(scheme=scheme, device="cpu", layers=1, size=(64, 64), frames=5, repeat=1)
    layers = int(os.environ.get("DIT8_BENCH_DIT_LAYERS", "0")) or None
    settings = BenchSettings(scheme=scheme, device="cuda", layers=layers, repeat=1)
    try:  # a 24 or 32 GB card holds the 8-bit weights of I2V-14B, not the bf16 ones
        check_weights_fit(settings.model_config(), scheme, torch.cuda.mem_get_info()[0])
    except InputError as err:
        pytest.skip(f"{err} (DIT8_BENCH_DIT_LAYERS sets the blocks)")
    return settings


def _synced(fn, device: torch.device):
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return call


def _fill(extra: dict, bench: DitBench, ms: float, peak: int, smoke: bool) -> None:
    extra["device"] = "cpu (smoke: tiny config)" if smoke else torch.cuda.get_device_name(bench.device)
    extra.update(ms=round(ms, 3), peak_memory=peak, peak_gib=round(peak / GIB, 2),
                 layers=bench.config.num_layers, tokens=math.prod(bench.cond.grid))


def test_diffusers_forward(benchmark, smoke, baseline_cache):
    """The baseline: diffusers bf16 with SDPA (issue 7 measured 3.31 s and 34 GiB on the H100)."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (carry its wheel to the GPU machine)")
    with torch.no_grad():
        bench = DitBench(_settings("bf16", smoke))
        exact = bench.model.setup.dtype == torch.float32
        bench.forward()  # dit8's output on the same inputs, for the comparison
        ref = bench.swap_to_diffusers()  # frees dit8's copy of the weights
        numbers = bench.time_diffusers(ref)
        _fill(benchmark.extra_info, bench, numbers["forward_ms"], numbers["peak_memory"], smoke)
        benchmark.extra_info["rel_diff_dit8"] = numbers["rel_diff"]
        # fp32 (smoke, CPU): the two transcriptions agree to the fp32 timestep sinusoid diffusers makes
        # (tests/test_runtime_bench_dit.py); bf16: the difference is recorded, the fast path's bf16
        # accuracy is tests/test_fast_path.py's to check.
        assert math.isfinite(numbers["rel_diff"]) and (not exact or numbers["rel_diff"] < 1e-4)
        baseline_cache[("dit", "diffusers")] = numbers["forward_ms"]
        inputs = diffusers_inputs(ref, bench.cond)
        benchmark.pedantic(_synced(functools.partial(ref, **inputs), bench.device), rounds=1, iterations=1)
    del ref, bench
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dit_forward(benchmark, scheme, smoke, baseline_cache):
    with torch.no_grad():
        bench = DitBench(_settings(scheme, smoke))
        numbers = bench.time_forward()
        extra = benchmark.extra_info
        _fill(extra, bench, numbers["forward_ms"], numbers["peak_memory"]["forward"], smoke)
        extra.update(scheme=scheme, context_ms=round(numbers["context_ms"], 3),
                     weight_gib=round(sum(b.nbytes for b in bench.model.buffers()) / GIB, 2))
        baseline = baseline_cache.get(("dit", "diffusers"))
        if baseline is not None and not smoke:
            extra.update(baseline_ms=round(baseline, 3), ratio=round(baseline / numbers["forward_ms"], 3))
        benchmark.pedantic(_synced(bench.forward, bench.device), rounds=1, iterations=1)
        bench.release()
    assert bench.output.shape == bench.cond.x.shape and torch.isfinite(bench.output).all()
