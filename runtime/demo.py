"""`dit8 demo`: the whole image-to-video pipeline on a tiny random model folder, no download needed.

Writes a tiny model folder with RANDOM weights (DiT, T5, CLIP, VAE, tokenizer; LightX2V's distilled
layout) to a temporary folder, loads it with `I2VPipeline.from_pretrained`, makes a test-pattern
image, runs T5, CLIP and the VAE encoder, the 4-step distilled sampler and the VAE decoder, and writes a
short mp4. The video is noise: the weights are untrained. It shows that every piece runs end to end.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TextIO

import numpy as np

from .devices import resolve_device
from .pipeline import I2VPipeline, ProgressEvent, Video, check_settings
from .progress import format_bytes
from .testing_pipeline import write_tiny_model_folder
from .video import check_output_paths

DEMO_FRAMES = 9
DEMO_AREA = 48 * 80
DEMO_PROMPT = "a red bird flies over the sea at night"


def pattern_image(height: int = 120, width: int = 200) -> np.ndarray:
    """[H, W, 3] uint8: colour gradients with a white disc (random weights will not show it in the video)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([255 * x / (width - 1), 255 * y / (height - 1), np.full_like(x, 128.0)], axis=-1)
    disc = (y - height / 2) ** 2 + (x - width / 3) ** 2 < (height / 4) ** 2
    image[disc] = 255
    return image.round().astype(np.uint8)


def run_demo(*, seed: int = 0, update: str = "deterministic", device: str = "cpu", output: str | Path = "dit8-demo.mp4",
             frames_dir: str | Path | None = None, stream: TextIO = sys.stdout) -> Video:
    """Run the demo, write the mp4 to `output` (and PNG frames to `frames_dir`), report to `stream`, return
    the Video."""
    resolve_device(device)
    check_settings(seed=seed, update=update)  # before the model is built and the banner printed
    check_output_paths(output, frames_dir)
    print("dit8 demo: RANDOM WEIGHTS (tiny untrained DiT, T5, CLIP and VAE); the video is noise and shows "
          "that the pipeline runs end to end, not a picture.", file=stream)
    with tempfile.TemporaryDirectory(prefix="dit8-demo-") as tmp:
        root = write_tiny_model_folder(Path(tmp) / "tiny-random-i2v", kind="distill_models", seed=seed)
        pipe = I2VPipeline.from_pretrained(root, device=device, progress=False)
    c, t5, clip, vae = pipe.dit.config, pipe.t5.config, pipe.clip.config, pipe.vae.config
    print(f"model: tiny random folder ({pipe.files.kind} layout, {'distilled' if pipe.distilled else 'base'}); "
          f"DiT dim {c.dim}, {c.num_layers} blocks, {c.num_heads} heads; T5 dim {t5.dim}, {t5.num_layers} layers; "
          f"CLIP dim {clip.dim}, {clip.num_layers - 1} blocks used; VAE dim {vae.dim}", file=stream)
    image = pattern_image()
    print(f"input: {image.shape[1]}x{image.shape[0]} test pattern, prompt {DEMO_PROMPT!r}, seed {seed}, "
          f"update {update}, device {device}, compute {pipe.dit.setup.dtype}", file=stream)

    last = 0.0

    def report(event: ProgressEvent) -> None:
        nonlocal last
        if event.stage == "denoise":
            ms = 1e3 * (event.seconds - last)
            print(f"step {event.done}/{event.total}  t = {event.timestep:7.2f}  {ms:7.1f} ms  "
                  f"x0 std {event.x0.std().item():.4f}", file=stream)
            last = event.seconds

    video = pipe(image, DEMO_PROMPT, seed=seed, frames=DEMO_FRAMES, area=DEMO_AREA, update=update, callback=report)
    latents = video.latents
    print(f"latents: {tuple(latents.shape)}  mean {latents.mean().item():+.4f}  std {latents.std().item():.4f}  "
          f"finite {bool(latents.isfinite().all())}", file=stream)
    path = video.save(output)
    print(f"video: {video.num_frames} frames {video.width}x{video.height} at {video.fps} fps -> {path} "
          f"({format_bytes(path.stat().st_size)}; RANDOM WEIGHTS: noise, not a picture)", file=stream)
    if frames_dir is not None:
        pngs = video.save_frames(frames_dir)
        print(f"frames: {len(pngs)} PNGs in {frames_dir}", file=stream)
    t = video.timings
    print(f"times: text {t['text']:.2f} s, image {t['image']:.2f} s, vae encode {t['vae_encode']:.2f} s, "
          f"denoise {t['denoise']:.2f} s, decode {t['decode']:.2f} s, total {t['total']:.2f} s; "
          f"peak memory {format_bytes(video.peak_memory)} ({video.peak_memory_source})", file=stream)
    return video
