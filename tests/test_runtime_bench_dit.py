"""`dit8 bench dit` (runtime/bench_dit.py) on CPU tiny settings: the CLI table and JSON, the on-device
random weights (finite outputs; 8-bit weights within a quantization step of the float draw), the
kernel classification, and parity with diffusers' WanTransformer3DModel on the same weights (fp32)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dit8.bench_dit import (BenchSettings, DitBench, check_bench_settings, check_weights_fit, format_table,
                             forward_flops, run_bench, weight_bytes)
from dit8.diffusers_reference import diffusers_inputs, to_diffusers
from dit8.profiling import PARTS, classify, profile_parts, time_ms
from dit8.random_dit import build_model, float_weight, quantized_layers, random_conditioning
from dit8.cli import TINY_FRAMES, TINY_SIZE, bench_settings, build_parser, main
from dit8.config import I2V_14B, tiny_config
from dit8.errors import InputError
from dit8.layers import QuantLinear
from dit8.layouts import block_linears

TINY = ["--device", "cpu", "--layers", "1", "--size", "64x64", "--frames", "5"]
CONFIG = tiny_config("i2v", num_layers=2)


def _settings(**overrides) -> BenchSettings:
    base = dict(device="cpu", layers=1, size=(64, 64), frames=5, repeat=1)
    return BenchSettings(**{**base, **overrides})


# -- the command line ----------------------------------------------------------------------------------


def test_cli_prints_the_table(capsys):
    assert main(["bench", "dit", *TINY]) == 0
    out = capsys.readouterr().out
    for expected in ("tiny (1 layer)", "grid 2x4x4 = 32 tokens", "text 512x64", "clip 257x32", "forward ",
                     "loop        4 steps", "gemm", "attention", "memory_bound", "idle", "peak "):
        assert expected in out, expected


def test_cli_json_holds_every_number(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "dit", *TINY, "--scheme", "fp8", "--steps", "2", "--json", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    r = json.loads(path.read_text())
    assert r["settings"]["scheme"] == "fp8" and r["settings"]["size"] == [64, 64]
    assert r["config"]["num_layers"] == 1 and r["tokens"] == 32 and r["grid"] == [2, 4, 4]
    assert r["latent"] == [16, 2, 8, 8] and r["text"] == [512, 64] and r["clip"] == [257, 32]
    assert r["forward_ms"] > 0 and r["context_ms"] > 0 and len(r["forward_samples_ms"]) == 3
    assert r["loop"]["steps"] == [1000, 500] and r["loop"]["per_step_ms"] == pytest.approx(r["loop"]["total_ms"] / 2)
    assert set(r["parts_ms"]) == {*PARTS, "idle"} and r["parts_ms"]["gemm"] > 0 and r["parts_ms"]["attention"] > 0
    assert r["top_kernels"] and all(k["part"] in PARTS for k in r["top_kernels"])
    assert r["peak_memory"]["forward"] > 0 and r["weight_bytes"] > 0
    assert r["flops"]["gemm"] > 0 and "diffusers" not in r and r["gluon"] == {}


def test_gluon_kernels_routed_in_are_recorded_and_checked_first(tmp_path, monkeypatch, capsys):
    """The Gluon kernels routed in (DIT8_GLUON, kernels/candidates.py) are part of what a result says it
    measured (on the CPU DIT8_GLUON routes nothing, and nothing is adopted)."""
    monkeypatch.setenv("DIT8_GLUON", "gemm_int8 gemm=ws")
    path = tmp_path / "bench.json"
    assert main(["bench", "dit", *TINY, "--steps", "0", "--json", str(path)]) == 0
    assert "Gluon kernels routed in (kernels/candidates.py): gemm_int8=default, gemm=ws" in capsys.readouterr().out
    assert json.loads(path.read_text())["gluon"] == {"gemm_int8": "default", "gemm": "ws"}
    monkeypatch.setenv("DIT8_GLUON", "gemm=fast")
    assert main(["bench", "dit", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit8: error: DIT8_GLUON: gemm has no configuration 'fast'") and err.count("\n") == 1


def test_cli_json_keeps_the_numbers_of_a_run_stopped_part_way(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"

    def stopped(self):
        raise KeyboardInterrupt  # a time limit's SIGINT, during the loop

    monkeypatch.setattr("dit8.bench_dit.DitBench.time_loop", stopped)
    assert main(["bench", "dit", *TINY, "--json", str(path)]) == 130
    r = json.loads(path.read_text())
    assert r["partial"] is True and r["forward_ms"] > 0 and "loop" not in r

    def out_of_memory(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(more lines)")

    monkeypatch.setattr("dit8.bench_dit.DitBench.time_loop", out_of_memory)
    with pytest.raises(RuntimeError):
        main(["bench", "dit", *TINY, "--json", str(path)])
    r = json.loads(path.read_text())
    assert r["partial"] is True and r["forward_ms"] > 0
    assert r["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"

    def no_memory_at_all(self, settings, log=None):
        raise RuntimeError("CUDA out of memory (building the model)")

    monkeypatch.setattr("dit8.bench_dit.DitBench.__init__", no_memory_at_all)
    with pytest.raises(RuntimeError):
        main(["bench", "dit", *TINY, "--json", str(path)])
    assert json.loads(path.read_text()) == {"partial": True,
                                            "error": "RuntimeError: CUDA out of memory (building the model)"}
    monkeypatch.undo()
    assert main(["bench", "dit", *TINY, "--steps", "0", "--json", str(path)]) == 0
    assert "partial" not in json.loads(path.read_text()) and "error" not in json.loads(path.read_text())


def test_cli_json_folder_is_checked_first(tmp_path, capsys):
    assert main(["bench", "dit", *TINY, "--json", str(tmp_path / "nope" / "b.json")]) == 1
    assert "nope" in capsys.readouterr().err


def test_compare_without_diffusers_says_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    assert main(["bench", "dit", *TINY, "--steps", "0", "--compare", "diffusers"]) == 0
    out = capsys.readouterr().out
    assert "diffusers   skipped: diffusers is not importable" in out and "loop" not in out


def test_input_defaults_follow_the_config():
    # The real 480P, 81-frame input for I2V-14B; a small one for the tiny model, the CPU default.
    def settings(*args):
        return bench_settings(build_parser().parse_args(["bench", "dit", *args]))

    tiny = settings("--device", "cpu")
    assert tiny.config_name() == "tiny" and (tiny.frames, tiny.size) == (TINY_FRAMES, TINY_SIZE)
    full = settings("--device", "cpu", "--config", "i2v-14b")
    assert (full.frames, full.size) == (81, (832, 480))
    chosen = settings("--device", "cpu", "--frames", "5", "--size", "64x32")
    assert (chosen.frames, chosen.size) == (5, (64, 32))


@pytest.mark.parametrize("args, message", [
    (["--frames", "6"], "--frames must be 4k+1"),
    (["--size", "60x64"], "multiples of 16"),
    (["--layers", "0"], "layers must be at least 1"),
    (["--attention", "int8", "--backend", "torch"], "no 'int8' path; use --backend triton"),
    (["--cuda-graph"], "--cuda-graph needs --device cuda"),
    (["--device", "foo"], "'foo' is not a device name"),
    (["--repeat", "0"], "repeat must be at least 1"),
    (["--steps", "-1"], "steps must be at least 0"),
    (["--steps", "1001"], "steps must be at most 1000"),
])
def test_bad_settings_are_one_line_errors(args, message, capsys):
    assert main(["bench", "dit", "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit8: error: ") and message in err and err.count("\n") == 1


def test_settings_refused_through_the_api():
    with pytest.raises(InputError, match="config must be one of \\('i2v-14b', 'tiny'\\), got 'i2v-1b'"):
        check_bench_settings(_settings(config="i2v-1b"))
    with pytest.raises(InputError, match="compare must be 'diffusers', got 'torch'"):
        check_bench_settings(_settings(compare="torch"))


def test_sequence_parallel_with_a_cuda_graph_is_refused_on_cuda(monkeypatch):
    # (On a CPU --cuda-graph is refused before: the device is made to look like a GPU.)
    monkeypatch.setattr("dit8.bench_dit.resolve_device", lambda device: torch.device("cuda", 0))
    with pytest.raises(InputError, match="--sequence-parallel runs neither --cuda-graph nor --compare"):
        check_bench_settings(_settings(sequence_parallel=True, cuda_graph=True))


def test_the_default_config_is_i2v_14b_on_cuda_and_tiny_elsewhere():
    assert BenchSettings(device="cuda").config_name() == BenchSettings(device="cuda:1").config_name() == "i2v-14b"
    assert BenchSettings(device="cpu").config_name() == "tiny"
    assert BenchSettings(device="cuda").model_config() == I2V_14B


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_cuda_device_without_cuda_is_an_error(capsys):
    assert main(["bench", "dit", "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


# -- weights built on the device -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["bf16", "fp8", "int8"])
def test_device_init_gives_finite_outputs(scheme):
    model = build_model(CONFIG, scheme=scheme, device="cpu")
    for name, buffer in model.named_buffers():  # every buffer written: none left as torch.empty garbage
        assert torch.isfinite(buffer.float()).all(), name
    cond = random_conditioning(CONFIG, 5, (64, 48), device="cpu")
    with torch.no_grad():
        out = model(cond.x, cond.t, cond.context, cond.clip_fea, y=cond.y)
    assert out.shape == cond.x.shape and torch.isfinite(out).all()
    assert 0.1 < out.std() < 10  # weights scaled so activations stay O(1)


@pytest.mark.parametrize("scheme", ["bf16", "fp8", "int8"])
def test_weight_memory_floor_and_the_check_before_building(scheme):
    """weight_bytes is a floor of what the built model holds (its fp32 tables and buffers come on top), and a
    GPU with less free memory than it is refused before anything is built."""
    model = build_model(CONFIG, scheme=scheme, device="cpu", dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    floor = weight_bytes(CONFIG, scheme)
    assert floor <= held, (floor, held)
    check_weights_fit(CONFIG, scheme, floor)
    with pytest.raises(InputError, match=f"the {scheme} weights of this 2-block model take at least .* use --scheme"):
        check_weights_fit(CONFIG, scheme, floor - 1)
    assert weight_bytes(I2V_14B, "fp8") < weight_bytes(I2V_14B, "bf16") / 1.9  # 15.5 GiB against 30.5


def test_weight_bytes_counts_what_quantizing_saves():
    """The floor leaves out the built model's fp32 tables, which are the same in every scheme: what an 8-bit
    scheme saves on the floor is what it saves on the built model (a byte an element plus an fp32 scale a
    row against bf16)."""
    def held(scheme):
        model = build_model(CONFIG, scheme=scheme, device="cpu", dtype=torch.bfloat16)
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

    for scheme in ("fp8", "int8"):
        assert weight_bytes(CONFIG, "bf16") - weight_bytes(CONFIG, scheme) == held("bf16") - held(scheme)


def test_a_huge_layer_count_is_refused_without_listing_every_block(monkeypatch):
    """`--layers 99999999999999` never ended: the memory floor listed the shapes of every block (time and
    memory per block) before it could refuse them. The blocks are alike, so one is counted."""
    from dit8 import bench_dit

    real = bench_dit.expected_shapes

    def shapes(config):
        if config.num_layers > 1000:
            pytest.fail(f"listed the shapes of all {config.num_layers} blocks")
        return real(config)

    monkeypatch.setattr(bench_dit, "expected_shapes", shapes)
    monkeypatch.setattr(bench_dit, "available_host_memory", lambda: 2 ** 40)
    huge = 10 ** 14
    with pytest.raises(InputError, match=f"weights of this {huge}-block model take at least"):
        check_bench_settings(_settings(layers=huge))
    for scheme in ("bf16", "fp8"):  # a block more is the same bytes more, at any count
        per_block = weight_bytes(CONFIG, scheme) - weight_bytes(tiny_config(num_layers=1), scheme)
        expected = weight_bytes(CONFIG, scheme) + (huge - 2) * per_block
        assert weight_bytes(tiny_config(num_layers=huge), scheme) == expected


def test_a_cpu_without_the_memory_for_the_weights_is_refused_before_building(monkeypatch, capsys):
    """On a CPU the check takes the memory the system has available: I2V-14B (57 GB of weights) on a small
    machine ends in an InputError at once rather than in the OOM killer."""
    from dit8 import bench_dit

    available = weight_bytes(I2V_14B, "fp8") - 1
    monkeypatch.setattr(bench_dit, "available_host_memory", lambda: available)
    with pytest.raises(InputError, match="take at least .* and this machine has .* free"):
        bench_dit.check_bench_settings(_settings(config="i2v-14b", layers=None, scheme="fp8"))
    bench_dit.check_bench_settings(_settings(layers=None))  # the tiny model fits
    assert main(["bench", "dit", "--device", "cpu", "--config", "i2v-14b", "--scheme", "fp8"]) == 1
    assert "this machine has" in capsys.readouterr().err
    monkeypatch.setattr(bench_dit, "available_host_memory", lambda: None)  # the system does not say: no check
    bench_dit.check_bench_settings(_settings(config="i2v-14b", layers=None, scheme="fp8"))


def test_available_host_memory_is_the_systems():
    from dit8.devices import available_host_memory

    available = available_host_memory()
    if not Path("/proc/meminfo").exists():
        assert available is None
    else:
        assert 0 < available < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_available_host_memory_reads_memavailable_in_kib(monkeypatch, tmp_path):
    import dit8.devices

    meminfo = tmp_path / "meminfo"
    real_open = open
    monkeypatch.setattr(dit8.devices, "open", lambda path, *a, **k: real_open(meminfo, *a, **k), raising=False)
    meminfo.write_text("MemTotal:       8000 kB\nMemFree:         100 kB\nMemAvailable:    3000 kB\n")
    assert dit8.devices.available_host_memory() == 3000 * 1024  # free memory the kernel can reclaim counts
    for unreadable in ("MemTotal:       8000 kB\n", "MemAvailable: lots kB\n", "MemAvailable:\n"):
        meminfo.write_text(unreadable)
        assert dit8.devices.available_host_memory() is None


def test_cpu_peak_memory_is_in_bytes():
    from dit8.devices import peak_memory

    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, every page written
    peak, source = peak_memory(torch.device("cpu"))
    assert source == "process peak RSS" and peak >= block.numel()


def _quant_step(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of the 8-bit grid at each weight (in weight units)."""
    if dtype == torch.int8:
        return scale.expand_as(w)
    y = (w / scale).abs().clamp_min(2.0 ** -6)  # e4m3: 3 mantissa bits; subnormals below 2^-6
    return torch.exp2(torch.floor(torch.log2(y)) - 3) * scale


@pytest.mark.parametrize("scheme, dtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_quantized_init_is_within_half_a_step_of_the_float_weights(scheme, dtype):
    float_model = build_model(CONFIG, scheme="bf16", device="cpu", seed=3)  # fp32 on CPU: the exact draws
    model = build_model(CONFIG, scheme=scheme, device="cpu", seed=3)
    layers = quantized_layers(CONFIG, scheme)
    assert len(layers) == 2 * 12
    for module in layers:
        layer = model.get_submodule(module)
        assert isinstance(layer, QuantLinear) and layer.weight.dtype == dtype
        scale = layer.weight_scale
        assert scale.shape == (layer.weight.shape[0], 1) and (scale > 0).all()
        w = float_model.get_buffer(module + ".weight")
        error = (float_weight(model, module + ".weight") - w).abs()
        # Half a step, plus the fp32 rounding of q·scale in the dequantization (a few ulps of w).
        assert (error <= 0.5 * _quant_step(w, scale, dtype) + 2.0 ** -21 * w.abs()).all(), module
        assert error.max() > 0  # really quantized
        # Per output channel: the largest weight of each row maps to the top of the 8-bit range.
        qmax = 127 if dtype == torch.int8 else 448
        torch.testing.assert_close(scale[:, 0], w.abs().amax(dim=1) / qmax)
    # Everything outside the block linears is the same float draw.
    torch.testing.assert_close(model.get_buffer("blocks.1.modulation"), float_model.get_buffer("blocks.1.modulation"))


# -- per-part classification ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, part", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "gemm"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_NTN", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "gemm"),
    ("_scaled_mm_kernel", "gemm"),
    ("_scaled_mm_persistent_kernel", "gemm"),
    ("aten::addmm", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
    ("_attention_8bit_kernel", "attention"),
    ("_quantize_blocks_kernel", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("_rows_kernel", "memory_bound"),
    ("void rows_kernel<__nv_bfloat16, 1, 2>(RowArgs)", "memory_bound"),
    ("_qk_norm_rope_kernel", "memory_bound"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "memory_bound"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>", "memory_bound"),
    ("Memcpy DtoD (Device -> Device)", "memory_bound"),
    ("aten::native_layer_norm", "memory_bound"),
    ("some_unknown_kernel", "other"),
])
def test_classify(name, part):
    assert classify(name) == part


def test_cpu_profile_parts_ops_calls_and_order():
    a = torch.randn(64, 64)
    long_name = "step_" + "x" * 300

    def fn():
        with torch.profiler.record_function("attention_scope"):
            torch.mm(a, a)  # a matmul inside an attention op counts as attention (a math-path SDPA's)
            with torch.profiler.record_function("inner_scope"):
                torch.bmm(a[None], a[None])  # also when further down
        for _ in range(3):
            torch.addmm(a, a, a)
        with torch.profiler.record_function(long_name):
            pass

    prof = profile_parts(fn, torch.device("cpu"), top=50)
    ops = {k["name"]: k for k in prof.top}
    assert ops["aten::mm"]["part"] == ops["aten::bmm"]["part"] == "attention" and ops["aten::addmm"]["part"] == "gemm"
    assert ops["aten::addmm"]["calls"] == 3 and ops["aten::mm"]["calls"] == 1
    assert long_name[:200] in ops  # names are cut to 200 characters
    assert [k["ms"] for k in prof.top] == sorted((k["ms"] for k in prof.top), reverse=True)  # heaviest first
    assert prof.total == pytest.approx(sum(prof.parts.values())) and prof.parts["gemm"] > 0
    # `top` cuts the list of ops, heaviest first, not the parts' totals (ops' order varies from run to run).
    cut = profile_parts(fn, torch.device("cpu"), top=2)
    assert len(cut.top) == 2 and cut.top[0]["ms"] >= cut.top[1]["ms"]
    assert cut.parts["attention"] > 0 and cut.parts["gemm"] > 0 and cut.total == pytest.approx(sum(cut.parts.values()))


def test_cpu_times_are_in_milliseconds():
    import time

    times = time_ms(lambda: time.sleep(0.02), torch.device("cpu"), repeat=2)
    assert len(times) == 2 and all(20 <= t < 2000 for t in times)


# -- diffusers ----------------------------------------------------------------------------------------------


def test_diffusers_matches_dit8_on_the_same_weights():
    pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    model = build_model(CONFIG, device="cpu", seed=5)
    ref = to_diffusers(model)
    assert ref.proj_out.weight.dtype == torch.float32
    cond = random_conditioning(CONFIG, 9, (64, 96), device="cpu", seed=6)  # 3x12x8 latent: h != w
    with torch.no_grad():
        for t in (1000.0, 500.0, 3.0):
            cond.t = torch.tensor([t])
            ours = model(cond.x, cond.t, cond.context, cond.clip_fea, y=cond.y)
            theirs = ref(**diffusers_inputs(ref, cond))[0]
            assert theirs.shape == ours.shape
            # diffusers makes the timestep sinusoid in fp32 (the official code: float64): ~1e-5
            assert float((ours - theirs).norm() / theirs.norm()) < 1e-4


def test_diffusers_gets_the_dequantized_weights():
    pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    model = build_model(CONFIG, scheme="int8", device="cpu")
    ref = to_diffusers(model)
    torch.testing.assert_close(ref.get_parameter("blocks.0.ffn.net.0.proj.weight"),
                               float_weight(model, "blocks.0.ffn.0.weight"), rtol=0, atol=0)


def test_run_bench_compares_with_diffusers():
    pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    r = run_bench(_settings(steps=0, profile=False, compare="diffusers"))
    d = r["diffusers"]
    assert d["forward_ms"] > 0 and d["ratio"] == pytest.approx(d["forward_ms"] / r["forward_ms"])
    assert d["ratio_with_context"] == pytest.approx(d["forward_ms"] / (r["forward_ms"] + r["context_ms"]))
    assert d["dtype"] == "float32" and d["rel_diff"] < 1e-4




# -- FLOPs, the profile and the table ----------------------------------------------------------------------


def test_forward_flops_are_those_of_the_block_gemms_and_attention():
    config = I2V_14B
    tokens, text, image = 21 * 30 * 52, 512, 257  # 480P, 81 frames
    # Per token and block, 2 FLOPs a weight of each linear the tokens go through; the cross-attention keys
    # and values project the context (once per generation), not the tokens.
    context = {"cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img"}
    per_token = sum(2 * rows * cols for name, (rows, cols) in block_linears(config).items() if name not in context)
    flops = forward_flops(config, tokens, text, image)
    assert flops["gemm"] == tokens * per_token * config.num_layers
    # q·kᵀ and p·v: 2 FLOPs a multiply-add over C for each (query, key) pair; keys: tokens, text and image.
    assert flops["attention"] == 2 * 2 * config.dim * tokens * (tokens + text + image) * config.num_layers
    # The budget the module docstring and bench/RESULTS.md state: ~784 (783) and ~900 TFLOP.
    assert round(flops["gemm"] / 1e12) in (783, 784) and round(flops["attention"] / 1e12) == 900


def test_a_run_reports_the_flops_of_its_inputs_and_a_table_of_shares():
    r = run_bench(_settings(steps=0))
    assert r["flops"] == forward_flops(tiny_config("i2v", num_layers=1), r["tokens"], r["text"][0], r["clip"][0])
    table = format_table(r)
    start = table.index("part             ms   share  rate") + 1
    shares = [float(line.split()[2].rstrip("%")) for line in table[start:start + len(r["parts_ms"])]]
    assert sum(shares) == pytest.approx(100, abs=0.3)  # of the parts and idle together


def test_idle_time_is_never_negative():
    # On a CPU the profiler's overhead can make the ops add up to more than the timed forward.
    with torch.no_grad():
        bench = DitBench(_settings())
        parts = bench.profile(forward_ms=0.0)["parts_ms"]
    assert parts["idle"] == 0.0 and sum(parts.values()) > 0
