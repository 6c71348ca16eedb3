"""Fused memory-bound ops (kernels/fused_spec.py): bandwidth against a device copy measured in the same
run, and the q/k RMSNorm + RoPE against the eager code it replaces. Wan2.1-14B 480P sizes: 32,760
tokens x 5120 channels (13,824 for the FFN hidden), bf16 activations, fp32 residual stream.

    python -m pytest bench/test_bench_fused.py -q --benchmark-json=fused.json

extra_info of each op's row: op and backend (the registry's names, for bench/fastest_backends.py; the
device copy and the eager q/k baselines have neither), ms
(do_bench median), gbps (bytes the op must move / time), copy_gbps (the
device copy of this run) and copy_fraction = gbps / copy_gbps (issue 6 target: >= 0.85), ratio =
eager torch ms / ms; for q/k RMSNorm + RoPE also speedup_vs_official (fp32 RMSNorm + float64 complex
RoPE, the official Wan code's way; target >= 10) and speedup_vs_rms_norm_rope (F.rms_norm + the torch
RoPE reference; target >= 2). Backends: "cuda" (csrc/, skipped where the extension cannot be built),
"triton", and "torch" (the eager reference, the baseline).
Without CUDA: smoke mode (tiny shapes, each function once, Triton in the interpreter, no rates).

DIT8_FUSED_SWEEP=1 (on a CUDA machine) also times the Triton rows kernel of each op at 4, 8, 16 and 32
warps, and for the norms with per-column operands with those loaded ahead of the statistics or after
them (test_rows_sweep; kernels/fused_triton.py `_num_warps`, `PREFETCH_PARAMS`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from dit8.kernels import fused_triton, norm_quant, quantize
from dit8.kernels.buffers import poisoned_outputs
from dit8.kernels.elementwise import residual_add
from dit8.kernels.norms import layer_norm_modulate, rms_norm
from dit8.kernels.qk_norm_rope import qk_norm_rope
from dit8.kernels.rope import rope
from dit8.rope import rope_table

pytest.importorskip("triton", reason="triton is not installed")

FP8 = torch.float8_e4m3fn
EPS = 1e-6
# (tokens, width, ffn width, heads, grid) at full size and in smoke mode.
FULL = dict(M=32760, C=5120, F=13824, H=40, grid=(21, 30, 52))
SMOKE = dict(M=24, C=256, F=384, H=4, grid=(2, 3, 4))


def sizes(smoke: bool) -> dict:
    return SMOKE if smoke else FULL


@dataclass
class Case:
    """One op (its registry name), inputs, the fused call per backend, the eager baseline, the bytes it
    must move, and the kernel backends it has."""

    op: str
    make: Callable[[str, dict], dict]
    run: Callable[[str, dict], object]
    eager: Callable[[dict], object]
    nbytes: Callable[[dict], int]
    kernels: tuple[str, ...] = ("cuda", "triton")


def _gen(device):
    return torch.Generator(device=device).manual_seed(0)


def _ln_inputs(device, s, xdtype=torch.float32):
    g = _gen(device)
    x = (torch.randn(1, s["M"], s["C"], device=device, generator=g) * 4 + 1).to(xdtype)
    return dict(x=x, shift=torch.randn(1, s["C"], device=device, generator=g),
                scale=torch.randn(1, s["C"], device=device, generator=g) * 0.5,
                w=torch.randn(s["C"], device=device, generator=g), b=torch.randn(s["C"], device=device, generator=g))


def _act(device, s, width):
    return dict(x=torch.randn(s["M"], width, device=device, generator=_gen(device)).bfloat16())


CASES = {
    # per-token fp8 quantization of a bf16 activation (a GEMM input): read 2 B, write 1 B + a scale per row
    "quantize_fp8": Case(
        op="quantize_per_token",
        make=lambda d, s: _act(d, s, s["C"]),
        run=lambda be, t: quantize.quantize_per_token(t["x"], FP8, backend=be),
        eager=lambda t: quantize.quantize_per_token(t["x"], FP8, backend="torch"),
        nbytes=lambda t: t["x"].numel() * 3 + t["x"].shape[0] * 4),
    # GELU(tanh) + fp8 quantization of the FFN hidden (13,824 wide)
    "gelu_tanh_quant_fp8": Case(
        op="gelu_tanh_quant",
        make=lambda d, s: _act(d, s, s["F"]),
        run=lambda be, t: quantize.gelu_tanh_quant(t["x"], FP8, backend=be),
        eager=lambda t: quantize.gelu_tanh_quant(t["x"], FP8, backend="torch"),
        nbytes=lambda t: t["x"].numel() * 3 + t["x"].shape[0] * 4),
    # norm1/norm2: LN + modulation of the fp32 residual stream, quantized to fp8 (read 4 B, write 1 B)
    "layer_norm_modulate_quant_fp8": Case(
        op="layer_norm_modulate_quant",
        make=_ln_inputs,
        run=lambda be, t: norm_quant.layer_norm_modulate_quant(t["x"], t["shift"], t["scale"], eps=EPS, dtype=FP8,
                                                               backend=be),
        eager=lambda t: norm_quant.layer_norm_modulate_quant(t["x"], t["shift"], t["scale"], eps=EPS, dtype=FP8,
                                                             backend="torch"),
        nbytes=lambda t: t["x"].numel() * 5 + t["x"].shape[1] * 4),
    # the same with a bf16 output (the unquantized path; read 4 B, write 2 B)
    "layer_norm_modulate_bf16": Case(
        op="layer_norm_modulate",
        make=_ln_inputs,
        run=lambda be, t: layer_norm_modulate(t["x"], t["shift"], t["scale"], eps=EPS, out_dtype=torch.bfloat16,
                                              backend=be),
        eager=lambda t: layer_norm_modulate(t["x"], t["shift"], t["scale"], eps=EPS, out_dtype=torch.bfloat16,
                                            backend="torch"),
        nbytes=lambda t: t["x"].numel() * 6),
    # norm3: affine LN of the residual stream, quantized to fp8
    "layer_norm_quant_fp8": Case(
        op="layer_norm_quant",
        make=_ln_inputs,
        run=lambda be, t: norm_quant.layer_norm_quant(t["x"], t["w"], t["b"], eps=EPS, dtype=FP8, backend=be),
        eager=lambda t: norm_quant.layer_norm_quant(t["x"], t["w"], t["b"], eps=EPS, dtype=FP8, backend="torch"),
        nbytes=lambda t: t["x"].numel() * 5 + t["x"].shape[1] * 4),
    # cross-attention q: full-width RMSNorm, bf16 in and out
    "rms_norm_bf16": Case(
        op="rms_norm",
        make=lambda d, s: dict(x=_act(d, s, s["C"])["x"][None], w=torch.randn(s["C"], device=d)),
        run=lambda be, t: rms_norm(t["x"], t["w"], eps=EPS, backend=be),
        eager=lambda t: rms_norm(t["x"], t["w"], eps=EPS, backend="torch"),
        nbytes=lambda t: t["x"].numel() * 4),
    # the bf16 linears' gated residual add into the fp32 stream (read 4 B + 2 B, write 4 B)
    "residual_add_gated": Case(
        op="residual_add",
        make=lambda d, s: dict(x=_ln_inputs(d, s)["x"], y=_act(d, s, s["C"])["x"][None],
                               gate=torch.randn(1, s["C"], device=d, generator=_gen(d))),
        run=lambda be, t: residual_add(t["x"], t["y"], t["gate"], backend=be),
        eager=lambda t: residual_add(t["x"], t["y"], t["gate"], backend="torch"),
        nbytes=lambda t: t["x"].numel() * 10,
        kernels=("triton",)),
}


def _qk_inputs(device, s):
    g = _gen(device)
    L, C, H = math.prod(s["grid"]), s["C"], s["H"]
    qkv = torch.randn(1, L, 3 * C, device=device, generator=g).bfloat16()  # one fused QKV GEMM output
    cos, sin = rope_table(s["grid"], C // H, device=device)
    return dict(q=qkv[..., :C], k=qkv[..., C:2 * C], wq=torch.randn(C, device=device, generator=g),
                wk=torch.randn(C, device=device, generator=g), cos=cos, sin=sin, H=H,
                freqs=torch.polar(torch.ones_like(cos, dtype=torch.float64),
                                  torch.atan2(sin.double(), cos.double()))[:, None, :])


def qk_official_eager(t):
    """The official Wan code's way: WanRMSNorm (fp32 statistics, type_as, times the weight), then
    rope_apply in complex128, .float(), and the cast to bf16 before attention."""
    def norm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * w

    def rope_apply(x):
        B, L, C = x.shape
        z = torch.view_as_complex(x.to(torch.float64).reshape(B, L, t["H"], -1, 2))
        return torch.view_as_real(z * t["freqs"]).flatten(3).float()

    return (rope_apply(norm(t["q"], t["wq"])).bfloat16(), rope_apply(norm(t["k"], t["wk"])).bfloat16())


def qk_rms_norm_then_rope(t):
    """F.rms_norm (torch's fused kernel) then the torch RoPE reference (fp32 math), bf16 throughout."""
    H, C = t["H"], t["q"].shape[-1]
    out = []
    for x, w in ((t["q"], t["wq"]), (t["k"], t["wk"])):
        normed = F.rms_norm(x, (C,), w.bfloat16(), EPS).unflatten(-1, (H, -1))
        out.append(rope(normed, t["cos"], t["sin"], out_dtype=torch.bfloat16, backend="torch"))
    return out


def qk_fused(backend, t):
    return qk_norm_rope(t["q"], t["k"], t["wq"], t["wk"], t["cos"], t["sin"], heads=t["H"], eps=EPS,
                        out_dtype=torch.bfloat16, backend=backend)


def qk_nbytes(t):
    q = t["q"]
    return 4 * q.numel() * q.element_size() + 2 * t["cos"].numel() * 4  # read q, k; write q, k; the table


# ----------------------------------------------------------------------------------------------------

def _skip_unusable(backend: str, device: str) -> None:
    if backend == "cuda":
        from dit8.kernels import cuda_ext

        if device != "cuda":
            pytest.skip("the cuda backend needs a CUDA device")
        if not cuda_ext.cuda_available(torch.device("cuda")):
            pytest.skip("the CUDA extension cannot be built here: "
                        + (", ".join(cuda_ext.missing_tools()) or "see warning"))


@pytest.fixture(scope="session")
def copy_gbps(device, smoke, gpu_time, baseline_cache) -> float | None:
    """Device-copy bandwidth of this run (read + write of 1 GiB), the yardstick of every row."""
    if smoke:
        return None
    if "copy" not in baseline_cache:
        src = torch.empty(2 ** 29, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        ms = gpu_time(lambda: dst.copy_(src))
        baseline_cache["copy"] = 2 * src.numel() * src.element_size() / ms / 1e6
    return baseline_cache["copy"]


def test_device_copy(record, device, smoke, copy_gbps):
    n = 2 ** 20 if smoke else 2 ** 29
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    record(lambda: dst.copy_(src), nbytes=2 * n * 2, copy_gbps=None if copy_gbps is None else round(copy_gbps, 1))
    assert torch.equal(dst, src)


def _info(nbytes: int, ms: float, copy: float | None) -> dict:
    if copy is None:
        return {}
    gbps = nbytes / ms / 1e6
    return {"copy_gbps": round(copy, 1), "copy_fraction": round(gbps / copy, 3)}


def _check_agrees(out, ref) -> None:
    """The op's output against the eager reference's (tests/test_fused_ops.py checks both against float64).
    8-bit (codes, scales): scales within a few fp32 ulps (the statistics' summation order), codes within one
    step of the code grid and equal almost everywhere (a value near a rounding boundary may land either
    side). 16-bit: within the output's rounding (one bf16 ulp is 2^-8 relative; the norm of the
    difference stays below 2^-7 of the output's)."""
    if isinstance(out, tuple):
        (q, s), (ref_q, ref_s) = out, ref
        assert q.dtype == ref_q.dtype and q.shape == ref_q.shape and s.shape == ref_s.shape
        torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=0)
        codes, ref_codes = q.float(), ref_q.float()
        # One step of the grid at the larger code: 1 for int8; for e4m3 2^(exponent - 3), at least 2^-9.
        step = torch.ones_like(codes) if q.dtype == torch.int8 else \
            torch.exp2(torch.floor(torch.log2(torch.maximum(codes.abs(), ref_codes.abs()).clamp_min(2.0 ** -6))) - 3)
        assert ((codes - ref_codes).abs() <= step).all()
        assert (codes == ref_codes).float().mean() >= 0.99
    else:
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2 ** -7


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_op(name, backend, record, benchmark, device, smoke, gpu_time, baseline_cache, copy_gbps):
    case = CASES[name]
    if backend != "torch" and backend not in case.kernels:
        pytest.skip(f"{case.op} has no {backend} kernel")
    _skip_unusable(backend, device)
    if (name, "inputs") not in baseline_cache:  # built once per op (< 1 GB each at full size)
        baseline_cache[(name, "inputs")] = case.make(device, sizes(smoke))
    t = baseline_cache[(name, "inputs")]
    if (name, "eager") not in baseline_cache:
        baseline_cache[(name, "eager")] = gpu_time(lambda: case.eager(t))
    with poisoned_outputs():  # before timing: a wrong kernel gets no number
        _check_agrees(case.run(backend, t), case.eager(t))
    nbytes = case.nbytes(t)
    ms = record(lambda: case.run(backend, t), nbytes=nbytes, baseline_ms=baseline_cache[(name, "eager")])
    benchmark.extra_info.update(_info(nbytes, ms, copy_gbps), op=case.op, backend=backend)


# The ops of the Triton rows kernel, and whether each has per-column operands (weight, bias, modulation).
ROWS_OPS = {"quantize_fp8": False, "gelu_tanh_quant_fp8": False, "layer_norm_modulate_quant_fp8": True,
            "layer_norm_modulate_bf16": True, "layer_norm_quant_fp8": True, "rms_norm_bf16": True}


@pytest.mark.skipif(os.environ.get("DIT8_FUSED_SWEEP") != "1" or not torch.cuda.is_available(),
                    reason="rows kernel sweep: set DIT8_FUSED_SWEEP=1 on a CUDA machine")
@pytest.mark.parametrize("prefetch", [False, True], ids=["after", "ahead"])
@pytest.mark.parametrize("warps", [4, 8, 16, 32])
@pytest.mark.parametrize("name", list(ROWS_OPS))
def test_rows_sweep(name, warps, prefetch, monkeypatch, record, benchmark, device, baseline_cache, copy_gbps):
    """The Triton rows kernel of op `name` launched with `warps` warps, whatever the width, and its
    per-column operands loaded `prefetch` ahead of the statistics; extra_info `num_warps`,
    `default_warps` (what the kernel picks at this width) and `prefetch`."""
    if prefetch and not ROWS_OPS[name]:
        pytest.skip(f"{name} has no per-column operands to load ahead")
    case = CASES[name]
    if (name, "inputs") not in baseline_cache:
        baseline_cache[(name, "inputs")] = case.make(device, sizes(False))
    t = baseline_cache[(name, "inputs")]
    width = t["x"].shape[-1]
    default = fused_triton._num_warps(sum(fused_triton.row_tiles(width)))
    monkeypatch.setattr(fused_triton, "ROWS_TUNED", {})
    monkeypatch.setattr(fused_triton, "_num_warps", lambda elements: warps)
    monkeypatch.setattr(fused_triton, "PREFETCH_PARAMS", prefetch)
    with poisoned_outputs():
        _check_agrees(case.run("triton", t), case.eager(t))
    nbytes = case.nbytes(t)
    ms = record(lambda: case.run("triton", t), nbytes=nbytes)
    benchmark.extra_info.update(_info(nbytes, ms, copy_gbps), rows_op=case.op, width=width, num_warps=warps,
                                default_warps=default, prefetch=prefetch)


@pytest.mark.parametrize("impl", ["cuda", "triton", "official_eager", "rms_norm_then_rope"])
def test_qk_norm_rope(impl, record, benchmark, device, smoke, gpu_time, baseline_cache, copy_gbps):
    if impl in ("cuda", "triton"):
        _skip_unusable(impl, device)
    if ("qk", "inputs") not in baseline_cache:
        baseline_cache[("qk", "inputs")] = _qk_inputs(device, sizes(smoke))
    t = baseline_cache[("qk", "inputs")]
    for base, fn in (("official", qk_official_eager), ("rms_norm_rope", qk_rms_norm_then_rope)):
        if ("qk", base) not in baseline_cache:
            baseline_cache[("qk", base)] = gpu_time(lambda: fn(t))
    fn = {"official_eager": lambda: qk_official_eager(t), "rms_norm_then_rope": lambda: qk_rms_norm_then_rope(t),
          "cuda": lambda: qk_fused("cuda", t), "triton": lambda: qk_fused("triton", t)}[impl]
    # Before timing, so that a wrong kernel gets no row: all four compute the same thing, so they agree
    # to bf16 rounding (2^-8 relative per element).
    with poisoned_outputs():
        checked = fn()
    for a, b in zip(checked, qk_official_eager(t)):
        assert a.shape == b.shape
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2 ** -7
    nbytes = qk_nbytes(t)
    ms = record(fn, nbytes=nbytes, baseline_ms=baseline_cache[("qk", "official")])
    benchmark.extra_info.update(_info(nbytes, ms, copy_gbps))
    if impl in ("cuda", "triton"):
        benchmark.extra_info.update(op="qk_norm_rope", backend=impl)
    if copy_gbps is not None:
        benchmark.extra_info.update(speedup_vs_official=round(baseline_cache[("qk", "official")] / ms, 2),
                                    speedup_vs_rms_norm_rope=round(baseline_cache[("qk", "rms_norm_rope")] / ms, 2))


def _run_script(tmp_path, script: str, benchmarks: list[dict]) -> str:
    """Run bench/`script` on a results file holding `benchmarks` (for capability 9.0); its stdout."""
    import json
    import subprocess
    import sys

    src = tmp_path / "results.json"
    src.write_text(json.dumps({"benchmarks": benchmarks}))
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    run = subprocess.run([sys.executable, path, str(src), "--capability", "9.0"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_fastest_backends_script(tmp_path):
    def row(case, op, backend, ms):
        return {"name": f"test_fused_op[{case}-{backend}]", "extra_info": {"op": op, "backend": backend, "ms": ms}}

    out = _run_script(tmp_path, "fastest_backends.py", [
        row("rms_norm_bf16", "rms_norm", "cuda", 0.20), row("rms_norm_bf16", "rms_norm", "triton", 0.25),
        row("rms_norm_bf16", "rms_norm", "torch", 2.5),  # the baseline: never an entry
        row("ln_a", "layer_norm_modulate", "cuda", 0.30), row("ln_a", "layer_norm_modulate", "triton", 0.20),
        row("ln_b", "layer_norm_modulate", "cuda", 0.10), row("ln_b", "layer_norm_modulate", "triton", 0.15),
        row("q_a", "quantize_per_token", "triton", 0.1), row("q_b", "quantize_per_token", "triton", 0.1),
        row("q_a", "quantize_per_token", "cuda", 0.01),  # cuda missed q_b: totals would not compare
    ])
    last = out.strip().splitlines()[-1]
    assert last == 'FASTEST[(9, 0)] = {"layer_norm_modulate": "triton", "rms_norm": "cuda"}', out
    assert "quantize_per_token" in out and "(one backend)" in out


def test_rows_choice_script(tmp_path):
    """bench/rows_choice.py: an entry where a configuration beat the default by 2% or more."""
    def row(op, width, warps, ahead, ms, default=8):
        return {"name": f"test_rows_sweep[{op}-{warps}-{'ahead' if ahead else 'after'}]",
                "extra_info": {"rows_op": op, "width": width, "num_warps": warps, "prefetch": ahead, "ms": ms,
                               "default_warps": default}}

    out = _run_script(tmp_path, "rows_choice.py", [
        row("layer_norm_modulate_quant", 5120, 8, False, 0.378), row("layer_norm_modulate_quant", 5120, 4, False, 0.35),
        row("layer_norm_modulate_quant", 5120, 16, True, 0.36),
        row("layer_norm_quant", 5120, 8, False, 0.352), row("layer_norm_quant", 5120, 4, True, 0.349),  # noise
        row("rms_norm", 5120, 8, False, 0.228), row("rms_norm", 5120, 16, False, 0.240),  # the default wins
        {"name": "test_fused_op[rms_norm_bf16-triton]", "extra_info": {"op": "rms_norm", "ms": 0.1}},
    ])
    assert out.strip().splitlines()[-1] == \
        'ROWS_TUNED[(9, 0)] = {("layer_norm_modulate_quant", 5120): (4, False)}', out
    assert "rms_norm (5120): 8w after 0.2280  16w after 0.2400" in out
