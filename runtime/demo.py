"""`dit8 demo`: the whole DiT path on a tiny random I2V model, no download needed.

Writes a random checkpoint to a temporary folder, loads it back through `load_dit`, runs the 4-step
distilled sampler on random conditioning and prints per-step times and output statistics.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import torch

from .loader import load_dit
from .sampler import DistilledSampler, initial_noise
from .testing import random_inputs, random_weights, tiny_config, write_checkpoint


def run_demo(*, seed: int = 0, update: str = "deterministic", device: str = "cpu",
             out: TextIO = sys.stdout) -> torch.Tensor:
    """Run the demo and return the final latents [1, 16, T, H, W]."""
    config = tiny_config("i2v")
    sampler = DistilledSampler(update=update)
    print("dit8 demo: RANDOM WEIGHTS (a tiny untrained I2V model); the numbers show the path works, "
          "not a video.", file=out)
    with tempfile.TemporaryDirectory(prefix="dit8-demo-") as tmp:
        path = write_checkpoint(random_weights(config, seed=seed), Path(tmp) / "dit.safetensors",
                                dtype=torch.bfloat16, config=config)
        print(f"checkpoint: {path.stat().st_size / 2**20:.1f} MiB bf16, dim {config.dim}, "
              f"{config.num_layers} blocks, {config.num_heads} heads", file=out)
        model = load_dit(path, device=device, progress=False)
    cond = random_inputs(config, batch=1, latent_size=(3, 8, 12), seed=seed + 1)
    noise = initial_noise(tuple(cond["x"].shape), seed=seed, device=device)
    print(f"latents: {tuple(noise.shape)}, sampler: steps {list(sampler.steps)}, shift {sampler.shift}, "
          f"update {update}, device {device}, compute {model.setup.dtype}", file=out)

    with torch.inference_mode():
        context = model.encode_context(cond["context"].to(device), cond["clip_fea"].to(device))
        y = cond["y"].to(device)
        timesteps = sampler.timesteps().tolist()
        last = time.perf_counter()

        def report(step: int, num_steps: int, x0: torch.Tensor) -> None:
            nonlocal last
            now = time.perf_counter()
            print(f"step {step + 1}/{num_steps}  t = {timesteps[step]:7.2f}  {1e3 * (now - last):7.1f} ms  "
                  f"x0 std {x0.std().item():.4f}", file=out)
            last = now

        latents = sampler.sample(lambda x, t: model(x, t, context, y=y), noise, seed=seed, callback=report)
    print(f"output: mean {latents.mean().item():+.4f}  std {latents.std().item():.4f}  "
          f"min {latents.min().item():+.4f}  max {latents.max().item():+.4f}  "
          f"finite {bool(torch.isfinite(latents).all())}", file=out)
    return latents
