"""Encoder and VAE benchmarks: the pipeline's stages around the DiT, at the real Wan2.1 I2V 480P shapes
with random weights (drawn directly on the GPU: no checkpoint, no CPU copy of a model).

    python -m pytest bench/test_bench_pipeline.py -q -p no:cacheprovider --benchmark-json=pipeline.json

Models (as `I2VPipeline.from_pretrained` loads them on a GPU):
- T5: umT5-XXL encoder (24 layers, 4096 wide, 64 heads, ffn 10240, vocab 256384), bf16;
- CLIP: ViT-H/14 vision tower (1280 wide, 16 heads, 32 blocks of which the encoder runs 31), fp16;
- VAE: Wan2.1 VAE (dim 96, z 16), fp32.

Each model is built once per test class and freed after it, so only one model is resident while its
stage is measured. Every measured call goes through the pipeline's own functions, with the inputs
where the pipeline has them, under torch.inference_mode():
- `test_t5[512]`, `test_t5[60]`: `text_features` (tokenize, trim to the real length, encode) of a
  prompt of 511 or 59 words, i.e. 512 or 60 tokens with the EOS. 512 is the longest prompt, and what
  the reference pays on every prompt (it encodes all 512 padded positions); 60 is a typical prompt
  after the pipeline's trim. Tokens come from a small word-level tokenizer (`write_tiny_tokenizer`):
  the tokenizer's cost is negligible and the encoder's cost depends only on the length.
- `test_clip[square]`: `clip_features` of one 224x224 image (on the CPU, as the pipeline holds it);
  `test_clip[frame]`: the same from the 480x832 image, which the encoder first resizes to 224.
- `test_vae_encode`: `image_condition` for 480x832, 81 frames: the image + 80 grey frames, built on
  the CPU and fed to the encoder in chunks (1, 4, 4, ... frames) as the pipeline does; output
  [1, 20, 21, 60, 104] on the GPU.
- `test_vae_decode[whole]`, `test_vae_decode[tile32]`: `WanVAE.decode` of [1, 16, 21, 60, 104]
  latents (on the GPU, where the sampler leaves them) to [1, 3, 81, 480, 832], assembled on the CPU
  (`output_device="cpu"`, as the pipeline does); whole frames, or tiles of 32 latent pixels.

Timing (CUDA): warm-up calls first (T5, CLIP: 3 calls; VAE: one call on a 5-frame clip / 2 latent
frames at the same height and width, which runs every layer at the same shapes as the full clip), then
`rounds` calls (T5, CLIP: 10; VAE: 1, as one 480P/81-frame call takes seconds), each timed with a pair
of CUDA events around the whole call (CPU work included: the GPU's queue is empty at the start).
extra_info of each benchmark: `ms` (median of the rounds), `ms_min`, `rounds`, `peak_gib`
(torch.cuda.max_memory_allocated over the measured calls, reset just before them: weights, inputs
and activations), `resident_gib` (memory_allocated before the calls: the model's weights and the
inputs already on the GPU), `activation_gib` = peak − resident, `peak_reserved_gib`
(max_memory_reserved), `weights_gib`, `dtype`, the shapes; for decode also `estimate_gib`, the
activation estimate of `dit8.vae.decode_memory`.

Without CUDA: smoke mode (bench/conftest.py): tiny configs and sizes, one call each, no warm-up, no
memory figures; proves the suite runs (a few seconds on a CPU).
"""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from dit8.clip import CLIPVisionConfig
from dit8.conditioning import clip_features, image_condition, text_features
from dit8.t5 import T5Config
from dit8.testing_encoders import TINY_WORDS, build_random_clip, build_random_t5, tiny_clip_config, \
    tiny_t5_config, write_tiny_tokenizer
from dit8.testing_vae import build_random_vae, tiny_vae_config
from dit8.tokenizer import Tokenizer
from dit8.vae import VAEConfig, decode_memory

GIB = 2 ** 30

# Real sizes: 480x832, 81 frames -> latents 21 x 60 x 104; decode tile of 32 latent pixels.
FULL = dict(t5=T5Config(), clip=CLIPVisionConfig(), vae=VAEConfig(), frames=81, size=(480, 832),
            warmup_frames=5, tile=32, prompt_tokens=(512, 60), images=((224, 224), (480, 832)))
# Smoke: tiny widths; the VAE tile (2 latent pixels) is below the latent size so tiling runs.
SMOKE = dict(t5=tiny_t5_config(), clip=tiny_clip_config(), vae=tiny_vae_config(dim=4), frames=5,
             size=(32, 48), warmup_frames=5, tile=2, prompt_tokens=(512, 60), images=((224, 224), (48, 64)))

# T5 and CLIP: warm-up calls and measured rounds on CUDA. VAE: rounds of the 480P/81-frame call
# (DIT8_BENCH_VAE_ROUNDS overrides; each decode round takes seconds).
ROUNDS = dict(warmup=3, rounds=10)
VAE_ROUNDS = int(os.environ.get("DIT8_BENCH_VAE_ROUNDS", "1"))


def sizes(smoke: bool) -> dict:
    return SMOKE if smoke else FULL


def dtypes(device: str) -> dict[str, torch.dtype]:
    """The pipeline's dtypes: bf16 T5, fp16 CLIP and fp32 VAE on a GPU; fp32 everywhere on a CPU."""
    if device == "cuda":
        return dict(t5=torch.bfloat16, clip=torch.float16, vae=torch.float32)
    return dict(t5=torch.float32, clip=torch.float32, vae=torch.float32)


def model_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def release() -> None:
    """Free what earlier test classes left behind (before a model is built), so that the next peaks
    count only the current stage."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(benchmark, fn, *, warmup_fn=None, warmup: int, rounds: int, smoke: bool, model=None, **info):
    """Run `warmup_fn` (default `fn`) `warmup` times, then time `rounds` calls of `fn` with CUDA events
    under pytest-benchmark (one call per round), recording ms and peak memory in benchmark.extra_info.
    Smoke mode: one call, wall time, no memory figures. Returns the last timed call's output for the
    caller's checks; each output is dropped before the next call, so the peak is one call's."""
    extra = benchmark.extra_info
    with torch.inference_mode():
        for _ in range(0 if smoke else warmup):
            (warmup_fn or fn)()
    last: list = []
    if smoke:
        times = []

        def timed():
            last.clear()
            start = time.perf_counter()
            with torch.inference_mode():
                last.append(fn())
            times.append((time.perf_counter() - start) * 1e3)

        benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
        extra.update(device="cpu (smoke: tiny shapes)", ms=round(times[0], 4), **info)
        return last[0]

    gc.collect()  # not empty_cache: the measured calls find the allocator warm, as in a pipeline
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []

    def timed():
        last.clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.inference_mode():
            last.append(fn())
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    peak = torch.cuda.max_memory_allocated()
    extra.update(device=torch.cuda.get_device_name(), ms=round(statistics.median(times), 3),
                 ms_min=round(min(times), 3), rounds=len(times), warmup=warmup,
                 peak_gib=round(peak / GIB, 3), resident_gib=round(resident / GIB, 3),
                 activation_gib=round((peak - resident) / GIB, 3),
                 peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3))
    if model is not None:
        extra["weights_gib"] = round(model_bytes(model) / GIB, 3)
    extra.update(info)
    return last[0]


def prompt_of(tokens: int) -> str:
    """A prompt of `tokens` - 1 words of the tiny tokenizer's vocabulary: `tokens` tokens with the EOS."""
    return " ".join(TINY_WORDS[i % len(TINY_WORDS)] for i in range(tokens - 1))


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[3, H, W] in [-1, 1] on the CPU, where the pipeline holds the input image."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# Each model lives for one test class (the fixtures are class-scoped), so one model at a time is resident.


@pytest.fixture(scope="class")
def t5(device, smoke):
    release()
    yield build_random_t5(sizes(smoke)["t5"], device=device, dtype=dtypes(device)["t5"])
    release()


@pytest.fixture(scope="class")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_folder(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")), text_len=512)


@pytest.fixture(scope="class")
def clip(device, smoke):
    release()
    yield build_random_clip(sizes(smoke)["clip"], device=device, dtype=dtypes(device)["clip"])
    release()


@pytest.fixture(scope="class")
def vae(device, smoke):
    release()
    yield build_random_vae(sizes(smoke)["vae"], device=device, dtype=dtypes(device)["vae"])
    release()


class TestT5:
    @pytest.mark.parametrize("tokens", FULL["prompt_tokens"])
    def test_t5(self, tokens, t5, tokenizer, benchmark, smoke):
        prompt = prompt_of(tokens)
        cfg = t5.config
        out = measure(benchmark, lambda: text_features(tokenizer, t5, prompt), smoke=smoke, model=t5, **ROUNDS,
                      tokens=tokens, dtype=str(t5.dtype), layers=cfg.num_layers, dim=cfg.dim)
        assert out.shape == (1, tokens, cfg.dim) and torch.isfinite(out).all()


class TestCLIP:
    # CLIP's own input size, and the video's frame size (which CLIP's preprocessing resizes)
    @pytest.mark.parametrize("index", [0, 1], ids=["square", "frame"])
    def test_clip(self, index, clip, benchmark, smoke):
        height, width = sizes(smoke)["images"][index]
        image = random_image(height, width)
        cfg = clip.config
        out = measure(benchmark, lambda: clip_features(clip, image), smoke=smoke, model=clip, **ROUNDS,
                      image=[height, width], dtype=str(clip.dtype), blocks_run=len(clip.transformer), dim=cfg.dim)
        assert out.shape == (1, cfg.num_tokens, cfg.dim) and torch.isfinite(out).all()


class TestVAE:
    def test_vae_encode(self, vae, benchmark, smoke):
        s = sizes(smoke)
        height, width = s["size"]
        image = random_image(height, width)
        cfg = vae.config
        out = measure(benchmark, lambda: image_condition(vae, image, s["frames"]),
                      warmup_fn=lambda: image_condition(vae, image, s["warmup_frames"]),
                      warmup=1, rounds=VAE_ROUNDS, smoke=smoke, model=vae, frames=s["frames"],
                      size=[height, width], warmup_frames=s["warmup_frames"], input_device="cpu",
                      dtype=str(vae.dtype))
        ss = cfg.space_stride
        assert out.shape == (1, 4 + cfg.z_dim, cfg.latent_frames(s["frames"]), height // ss, width // ss)
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tile32"])
    def test_vae_decode(self, tiled, vae, benchmark, smoke, device):
        s = sizes(smoke)
        cfg = vae.config
        height, width = s["size"]
        h, w = height // cfg.space_stride, width // cfg.space_stride
        t = cfg.latent_frames(s["frames"])
        tile = s["tile"] if tiled else None
        gen = torch.Generator(device=device).manual_seed(1)
        latents = torch.randn(1, cfg.z_dim, t, h, w, generator=gen, device=device)
        short = latents[:, :, :cfg.latent_frames(s["warmup_frames"])]

        def decode(z):
            return vae.decode(z, tile=tile, output_device="cpu")

        estimate = decode_memory(cfg, (t, h, w), dtype=vae.dtype, tile=tile)["total"]
        out = measure(benchmark, lambda: decode(latents), warmup_fn=lambda: decode(short), warmup=1,
                      rounds=VAE_ROUNDS, smoke=smoke, model=vae, latents=list(latents.shape),
                      tile=tile, output_device="cpu", estimate_gib=round(estimate / GIB, 3),
                      dtype=str(vae.dtype))
        assert out.shape == (1, 3, s["frames"], height, width) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, value", [("DIT8_BENCH_VAE_ROUNDS", "two"), ("DIT8_BENCH_VAE_ROUNDS", "0"),
                                         ("DIT8_BENCH_DIT_LAYERS", "-8"), ("DIT8_SWEEP_ONLY", "acc2|(")])
def test_a_bad_count_setting_is_refused_by_name(name, value):
    """Not a benchmark: a count that is no whole number (or too small), or a DIT8_SWEEP_ONLY that is no
    regular expression, stops the run with its name."""
    env = dict(os.environ, **{name: value})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", __file__],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert f"{name}={value!r}: " in run.stderr, run.stdout + run.stderr
