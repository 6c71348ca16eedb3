"""I2VPipeline: image + prompt -> video, with the models loaded once and called many times.

    pipe = dit8.I2VPipeline.from_pretrained("Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v/",
                                            device="cuda")
    video = pipe("cat.png", "a cat walks through the snow", seed=42)
    video.save("cat.mp4")            # H.264, yuv420p, 16 fps;  video.frames: uint8 [F, H, W, 3]

One call, in order (spec/pipeline.md):
  encode   T5 on the prompt (and the negative prompt under CFG), CLIP on the image, the VAE on the
           image followed by grey frames; the DiT's cross-attention keys/values from both, once
  denoise  seeded fp32 noise [16, T, h, w]; the distilled sampler (4 steps, one forward each) or
           UniPC (40 steps, two forwards each under CFG)
  decode   the VAE, one latent frame at a time (optionally in spatial tiles), assembled on the CPU

Calls on one pipeline are serialised by a lock (one generation at a time on its device) and share no
state: every random number comes from generators seeded by the call's `seed`, so a call's result does
not depend on what ran before or beside it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import numbers
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import numpy as np
import torch

from .choices import DETERMINISTIC, DISTILLED, SAMPLERS, UNIPC
from .clip import CLIPVisionEncoder
from .conditioning import (AREA_480P, check_frames, check_grid, check_prompt, check_size, clip_features,
                           image_condition, image_tensor, output_size, resize_image, text_features)
from .devices import peak_memory, reset_peak, resolve_device, synchronize
from .errors import CheckpointError, Dit8Error, InputError, NumericalError, releases_frames
from .loader import load_dit
from .model import EncodedContext, WanDiT
from .model_folder import ModelFiles, find_model_files
from .parallel import SequenceParallel, fingerprint
from .progress import Progress
from .sampler import UPDATE_RULES, DistilledSampler, check_seed, check_shift, evenly_spaced_steps, initial_noise
from .t5 import T5Encoder
from .tokenizer import Tokenizer
from .unipc import DEFAULT_NEGATIVE_PROMPT, MAX_STEPS, UniPCSampler, guided
from .vae import WanVAE
from .video import FPS, FramesShape, video_to_frames, write_mp4, write_png_frames

__all__ = ["Cancelled", "I2VPipeline", "ProgressEvent", "SAMPLERS", "Video"]


class Cancelled(Dit8Error):
    """A generation stopped because its `cancel` event was set (checked between stages and steps)."""


@dataclass(frozen=True, eq=False)  # (eq: compared as objects; a tensor's == is elementwise)
class ProgressEvent:
    """What a progress callback receives: `done` of `total` units of a stage ("encode": the text, the
    image and each latent frame of the VAE encode; "denoise": steps; "decode": latent frames, per
    tile), `seconds` since the stage began; for denoise also the step's timestep and x0 estimate (a copy:
    the callback may keep or change it)."""

    stage: str
    done: int
    total: int
    seconds: float
    timestep: float | None = None
    x0: torch.Tensor | None = None


ProgressCallback = Callable[[ProgressEvent], object]  # what it returns is ignored


@dataclass(eq=False)  # compared (and hashed) as objects: the generated == compared tensors, and raised
class Video(FramesShape):
    """A generated video: `frames` uint8 [F, H, W, 3] RGB on the CPU at `fps`, with how it was made.

    timings: seconds per stage ("text": T5, "image": CLIP, "vae_encode", "context": the DiT's cross-attention
    keys/values, "denoise", "decode", "total");
    step_seconds: seconds of each sampling step; peak_memory: bytes, measured as `peak_memory_source`
    says (CUDA: torch.cuda.max_memory_allocated during the call; CPU: the process's peak RSS so far);
    latents: the final latents [16, T, h, w] fp32 (before the VAE); settings: what the call used.
    """

    frames: torch.Tensor
    fps: int = FPS
    timings: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    peak_memory: int = 0
    peak_memory_source: str = ""
    latents: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # not the frames themselves: a REPL would print millions of numbers
        total = self.timings.get("total")
        return (f"Video({self.num_frames} frames {self.width}x{self.height} at {self.fps} fps"
                + (f", made in {total:.1f} s" if total is not None else "") + ")")

    def numpy(self) -> np.ndarray:
        """The frames as a uint8 numpy array [F, H, W, 3] (sharing memory with `frames`)."""
        return self.frames.numpy()

    def save(self, path: str | Path, *, crf: int = 18) -> Path:
        """Write an H.264 mp4 (yuv420p, `fps`); `crf` as x264's (18: visually lossless). An existing file
        at `path` is replaced, at once (the new one is written beside it and renamed)."""
        return write_mp4(path, self.frames, fps=self.fps, crf=crf)

    def save_frames(self, folder: str | Path, *, prefix: str = "frame_") -> list[Path]:
        """Write every frame as a PNG `folder/{prefix}00000.png`, ...; returns the paths. Files of those
        names already there are replaced."""
        return write_png_frames(folder, self.frames, prefix=prefix)


def check_settings(*, seed: Any = 0, steps: Any = None, guidance: Any = None, shift: Any = None,
                   sampler: Any = None, update: Any = "deterministic") -> None:
    """The checks of a call's settings that need no model (None leaves a setting to its default);
    InputError naming the first bad one. The command line runs them before loading the model."""
    check_seed(seed)
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral)
                              or not 1 <= steps <= MAX_STEPS):
        raise InputError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real)
                                 or not math.isfinite(guidance)):
        raise InputError(f"guidance must be a finite number, got {guidance!r}")
    if shift is not None:
        check_shift(shift)
    if update not in UPDATE_RULES:
        raise InputError(f"update must be one of {UPDATE_RULES}, got {update!r}")
    if sampler == UNIPC:
        _check_update_of(UNIPC, update)


def _check_update_of(sampler: str, update: str) -> None:
    """Refuse a step rule the sampler would ignore: only the distilled sampler takes "renoise"."""
    if sampler != DISTILLED and update != DETERMINISTIC:
        raise InputError(f"update={update!r} is the distilled sampler's step rule; the {sampler} sampler takes "
                         f"only {DETERMINISTIC!r}")


@dataclass
class _Job:
    """One call's validated settings."""

    image: torch.Tensor  # [3, H0, W0] in [-1, 1]
    prompt: str
    negative_prompt: str | None  # None: no CFG
    seed: int
    frames: int
    height: int
    width: int
    sampler: str
    steps: int
    guidance: float
    shift: float
    update: str
    callback: ProgressCallback | None
    cancel: threading.Event | None
    progress: bool
    stream: TextIO | None

    def settings(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                "frames": self.frames, "size": (self.width, self.height), "sampler": self.sampler,
                "steps": self.steps, "guidance": self.guidance, "shift": self.shift, "update": self.update}


def _encoder_dtypes(device: torch.device, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """(T5, CLIP) compute dtypes: fp32 when fp32 is asked for, and by default on a CPU; otherwise the
    reference's bf16 T5 and fp16 CLIP (T5 stays bf16 when fp16 is asked for: its feed-forward
    activations overflow fp16)."""
    if dtype == torch.float32 or (dtype is None and device.type != "cuda"):
        return torch.float32, torch.float32
    return torch.bfloat16, torch.float16


# What the processes of a sequence-parallel group compare before each call.
_CALL_INPUTS = "inputs (image, prompt or settings), or inputs refused"


class I2VPipeline:
    """The Wan2.1 image-to-video pipeline over loaded models. Build it with `from_pretrained`, or from
    models you loaded yourself (`dit` must be an I2V WanDiT; encoder and VAE widths must match it)."""

    def __init__(self, dit: WanDiT, t5: T5Encoder, clip: CLIPVisionEncoder, vae: WanVAE, tokenizer: Tokenizer, *,
                 distilled: bool = True, offload_encoders: bool = False, vae_tile: int | None = None,
                 files: ModelFiles | None = None):
        for name, value in (("distilled", distilled), ("offload_encoders", offload_encoders)):
            # (As from_pretrained checks them: a string is truthy, and distilled="no" picked the distilled
            # sampler for a base model.)
            if not isinstance(value, bool):
                raise InputError(f"{name} must be True or False, got {value!r}")
        for name, value, kind in (("dit", dit, WanDiT), ("t5", t5, T5Encoder), ("clip", clip, CLIPVisionEncoder),
                                  ("vae", vae, WanVAE), ("tokenizer", tokenizer, Tokenizer)):
            # (Otherwise an AttributeError from inside, and a wrong tokenizer only at the first call.)
            if not isinstance(value, kind):
                raise InputError(f"{name} must be a dit8 {kind.__name__}, got {type(value).__name__}")
        _check_compatible(dit, t5, clip, vae, files)
        vae_tile = _check_vae_tile(vae_tile)
        self.dit, self.t5, self.clip, self.vae, self.tokenizer = dit, t5, clip, vae, tokenizer
        self.device = dit.setup.device
        self.distilled = distilled
        self.offload_encoders = offload_encoders
        self.vae_tile = vae_tile
        self.files = files
        self.load_seconds: float | None = None
        self._lock = threading.Lock()
        self._running_thread: int | None = None  # the thread of the call in progress

    # -- loading --------------------------------------------------------------------------------------

    @classmethod
    @releases_frames
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        dit: str | Path | None = None, scheme: str | None = None, distilled: bool | None = None,
                        backend: str = "auto", attention: str = "bf16", offload_encoders: bool = False,
                        vae_tile: int | None = None, progress: bool | None = None,
                        parallel: SequenceParallel | None = None) -> "I2VPipeline":
        """Load a model folder (official Wan2.1-I2V-14B-480P or a LightX2V distilled release; see
        `dit8.model_folder` for the layouts, the DiT order and the distilled/base rule).

        device: where every model computes. dtype: compute dtype of the DiT and T5 (default bf16 on
            CUDA, fp32 on CPU; T5 stays bf16 when fp16 is asked for, since its activations overflow
            fp16); CLIP runs fp16 as the reference (fp32 when dtype is fp32, or left default on a CPU);
            the VAE always fp32, as the reference.
        dit: a DiT file or folder instead of the folder's own; scheme: "bf16", "fp8" or "int8", which of
            the folder's DiT variants to take (InputError with `dit` or a DiT file as `path`). distilled:
            override the folder-kind rule, which sets the call defaults (distilled: sampler "distilled",
            4 steps, guidance 1, shift 5; base: "unipc", 40 steps, guidance 5, shift 3 at 480P).
        backend, attention: as `load_dit`. offload_encoders: keep T5 and CLIP in CPU memory and move
            them onto `device` only while they encode (saves their ~12 GB on the GPU between calls).
        vae_tile: decode the VAE's upsampling path in tiles of this many latent pixels. Peak GPU
            memory of the decode at 480x832, 81 frames, fp32, measured on an H200 (bench/RESULTS.md):
            9.0 GiB whole-frame (the default; 2.6 s), 4.2 GiB with 32 (6.6 s), VAE weights included;
            `dit8.vae.decode_memory` estimates the activations without convolution workspace (6.2 and
            3.4 GiB; 1.9 GiB with 16). The decoded video is assembled in CPU memory.
        progress: progress bar while loading the DiT (default: on a terminal).
        parallel: split each DiT forward over the processes of a torch.distributed group (sequence
            parallelism, `dit8.SequenceParallel`). Every process loads the pipeline and makes the same
            calls; each encodes, samples and decodes alike and gets the whole video.

        Raises CheckpointError naming the file for a missing or unusable piece. A failed load's exception
        holds none of what it loaded (see `__call__`).
        """
        start = time.perf_counter()
        for name, value in (("distilled", distilled), ("offload_encoders", offload_encoders), ("progress", progress)):
            if value is not None and not isinstance(value, bool):
                raise InputError(f"{name} must be True, False or None, got {value!r}")
        _check_vae_tile(vae_tile)
        device = resolve_device(device)
        files = find_model_files(path, dit=dit, scheme=scheme, distilled=distilled)
        t5_dtype, clip_dtype = _encoder_dtypes(device, dtype)
        encoder_device = torch.device("cpu") if offload_encoders else device
        model = load_dit(files.dit, device=device, dtype=dtype, backend=backend,
                         attention=attention, progress=progress, config_json=files.config_json, parallel=parallel)
        if not model.config.is_i2v:
            raise CheckpointError(f"{files.dit}: a text-to-video DiT; the pipeline needs an image-to-video one")
        tokenizer = Tokenizer.from_folder(files.tokenizer, text_len=model.config.text_len)
        t5 = T5Encoder.from_pth(files.t5, device=encoder_device, dtype=t5_dtype)
        clip = CLIPVisionEncoder.from_pth(files.clip, device=encoder_device, dtype=clip_dtype)
        vae = WanVAE.from_pth(files.vae, device=device, dtype=torch.float32)
        pipe = cls(model, t5, clip, vae, tokenizer, distilled=files.distilled, offload_encoders=offload_encoders,
                   vae_tile=vae_tile, files=files)
        synchronize(device)
        pipe.load_seconds = time.perf_counter() - start
        return pipe

    # -- generation -----------------------------------------------------------------------------------

    @releases_frames
    def __call__(self, image: Any, prompt: str, *, seed: int = 0, frames: int = 81,
                 size: tuple[int, int] | list[int] | None = None, area: int | None = None, steps: int | None = None,
                 sampler: str | None = None, guidance: float | None = None, shift: float | None = None,
                 negative_prompt: str | None = None, update: str = "deterministic",
                 callback: ProgressCallback | None = None, cancel: threading.Event | None = None,
                 progress: bool = False, progress_stream: TextIO | None = None) -> Video:
        """Generate a video that starts from `image` and follows `prompt`.

        image: a file path (str or os.PathLike), the bytes of an image file (an upload, say), PIL image,
            numpy [H, W, 3] uint8, or torch tensor (uint8 [H, W, 3] or float [3, H, W] in [-1, 1]).
        prompt: non-empty; at most text_len − 1 = 511 tokens (longer prompts raise InputError rather
            than being cut short silently as in the reference).
        seed: seeds the initial noise (and the re-noising of update="renoise", with seed + 1).
        frames: 4k + 1 (81 = 5 s at 16 fps).
        size: (width, height) as a tuple or list, multiples of 16; default: the image's aspect ratio at `area` pixels
            (default 480·832), by the official formula computed exactly (`dit8.conditioning.output_size`:
            a few aspect ratios, 832x480 among them, come out one patch larger than in the reference).
        sampler: "distilled" or "unipc"; default from the model (see `from_pretrained`). steps, guidance,
            shift default by sampler: distilled 4 / 1.0 / 5.0; unipc 40 / 5.0 / 3.0 (5.0 above 480P area).
        negative_prompt: for CFG (guidance != 1); default Wan's own. "" is an empty negative prompt.
        update: the distilled sampler's step rule, "deterministic" or "renoise" (refused with UniPC, which
            has only the deterministic one).
        callback(ProgressEvent): after each unit of work; it may not call the pipeline itself.
        cancel: a threading.Event; when set, the call raises Cancelled at the next stage boundary: after
            the text or the image encoder, between two latent frames of the image encode, two steps, or
            two parts of the decode.
        progress: draw a bar each for encoding, the denoising steps and decoding on `progress_stream`
            (default stderr; a stream given without progress=True is refused).

        A failed call's exception holds none of the call's tensors: the finished frames of its traceback
        are cleared (their lines stay; their locals are gone, also from a post-mortem debugger).
        """
        parallel = self.dit.setup.parallel
        try:
            job = self._prepare(image, prompt, seed=seed, frames=frames, size=size, area=area, steps=steps,
                                sampler=sampler, guidance=guidance, shift=shift, negative_prompt=negative_prompt,
                                update=update, callback=callback, cancel=cancel, progress=progress,
                                stream=progress_stream)
        except InputError as err:
            if parallel is not None:
                # The other processes compare their inputs with this one's next (_generate): it takes part,
                # as refused, before it raises, or they would wait for it in that exchange (the group's
                # timeout) or pair it with its next call.
                with contextlib.suppress(InputError):
                    parallel.agree(_CALL_INPUTS, fingerprint("refused", str(err)), self.device)
            raise
        self._acquire(job)
        self._running_thread = threading.get_ident()
        try:
            return self._generate(job)
        finally:
            self._running_thread = None
            self._lock.release()

    def _acquire(self, job: _Job) -> None:
        """Wait for the calls before this one; a call cancelled while it waits leaves at once (but for
        sequence parallelism, where it leaves at its first check, with the other processes)."""
        if self._running_thread == threading.get_ident():
            # (Only the thread running a call can find its own id here.) Waiting would never end.
            raise InputError("the pipeline was called from inside its own call (from a callback); "
                             "start the next call after this one returns")
        if job.cancel is None or self.dit.setup.parallel is not None:
            # (Under sequence parallelism a process may not leave alone: the others would wait for it.)
            self._lock.acquire()
            return
        while not self._lock.acquire(timeout=CANCEL_POLL_SECONDS):
            self._check_cancel(job, "while waiting for another call")

    def _check_cancel(self, job: _Job, where: str) -> None:
        """Raise Cancelled if the call's cancel event is set; under sequence parallelism if it is set in
        any process, so that all of them stop at the same point."""
        cancelled = job.cancel is not None and job.cancel.is_set()
        parallel = self.dit.setup.parallel
        if parallel is not None:
            cancelled = parallel.any(cancelled, self.device)
        if cancelled:
            raise Cancelled(f"generation cancelled {where}")

    def _prepare(self, image, prompt, *, seed, frames, size, area, steps, sampler, guidance, shift,
                 negative_prompt, update, callback, cancel, progress, stream) -> _Job:
        """Validate everything before taking the lock, so bad input fails at once."""
        pixels = image_tensor(image)
        check_prompt(self.tokenizer, prompt)
        check_settings(seed=seed, steps=steps, guidance=guidance, shift=shift, sampler=sampler, update=update)
        frames = check_frames(frames, self.vae.config.time_stride)
        if not isinstance(progress, bool):
            raise InputError(f"progress must be True or False, got {progress!r}")
        # (A binary stream has write() too, but fails on the bars' text only when the first stage ends.)
        if stream is not None and (not callable(getattr(stream, "write", None))
                                   or isinstance(stream, (io.RawIOBase, io.BufferedIOBase))):
            raise InputError(f"progress_stream must be a text stream (with write() of str), got "
                             f"{type(stream).__name__}")
        if stream is not None and not progress:  # the stream alone drew nothing, which looked like a hang
            raise InputError("progress_stream is given but progress is False: pass progress=True to draw the "
                             "bars on it")
        multiple = self.vae.config.space_stride * self.dit.config.patch_size[1]
        if size is not None and area is not None:
            raise InputError("give size or area, not both")
        if size is not None:
            width, height = check_size(tuple(size) if isinstance(size, list) else size, multiple)
        else:
            height, width = output_size(tuple(pixels.shape[1:]), AREA_480P if area is None else area,
                                        vae_stride=self.vae.config.space_stride,
                                        patch=self.dit.config.patch_size[1])
        grid = check_grid(frames, height, width, time_stride=self.vae.config.time_stride,
                          vae_stride=self.vae.config.space_stride, patch=self.dit.config.patch_size)
        self.dit.check_tokens(math.prod(grid), f"a {width}x{height} video of {frames} frames")
        sampler = sampler if sampler is not None else (DISTILLED if self.distilled else UNIPC)
        _check_update_of(sampler, update)  # (a model that is not distilled takes unipc by default)
        distilled = sampler == DISTILLED
        steps = (4 if distilled else 40) if steps is None else int(steps)
        guidance = (1.0 if distilled else 5.0) if guidance is None else guidance
        if shift is None:
            shift = 5.0 if distilled or height * width > AREA_480P else 3.0
        if negative_prompt is not None:  # checked even where it goes unused: a mistake all the same
            check_prompt(self.tokenizer, negative_prompt, "negative_prompt", allow_empty=True)
        if guidance != 1:
            negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        else:
            negative_prompt = None  # no CFG: one forward a step
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable, got {type(callback).__name__}")
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise InputError(f"cancel must be a threading.Event (with is_set()), got {type(cancel).__name__}")
        return _Job(pixels, prompt, negative_prompt, int(seed), frames, height, width, sampler, steps, float(guidance),
                    float(shift), update, callback, cancel, progress, stream)

    @contextmanager
    def _encoders_on_device(self) -> Iterator[None]:
        if not self.offload_encoders or self.device.type == "cpu":
            yield
            return
        try:  # (the moves too: T5 moved and CLIP out of memory must not leave T5 on the device)
            # Outside inference mode, so the moved weights stay ordinary tensors usable anywhere.
            with torch.inference_mode(False):
                self.t5.to(self.device)
                self.clip.to(self.device)
            yield
        finally:
            with torch.inference_mode(False):
                self.t5.to("cpu")
                self.clip.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _generate(self, job: _Job) -> Video:
        reset_peak(self.device)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if self.dit.setup.parallel is not None:
            self.dit.setup.parallel.agree(_CALL_INPUTS, fingerprint(job.image, job.settings()), self.device)
        self._check_cancel(job, "before it started")
        with torch.inference_mode():
            cond, uncond, y = self._encode(job, timings)
            self._check_cancel(job, "after encoding")
            latents, step_seconds = self._denoise(job, cond, uncond, y, timings)
            del cond, uncond, y
            self._check_cancel(job, "before decoding")
            pixels = self._decode(job, latents, timings)
        # Made outside inference mode: ordinary tensors, which the caller may change in place (an inference
        # tensor refuses that outside inference mode) or use with autograd.
        frames = torch.from_numpy(pixels)
        final_latents = latents[0].to("cpu", torch.float32, copy=True)
        timings["total"] = time.perf_counter() - start
        peak, source = peak_memory(self.device)
        return Video(frames=frames, fps=FPS, timings=timings, step_seconds=step_seconds, peak_memory=peak,
                     peak_memory_source=source, latents=final_latents, settings=job.settings())

    def _encode(self, job: _Job,
                timings: dict[str, float]) -> tuple[EncodedContext, EncodedContext | None, torch.Tensor]:
        """Text, image and image latent; then the DiT's cross-attention keys/values, once per generation
        (and once more for the negative prompt under CFG). Returns (cond, uncond, image condition y)."""
        device, use_cfg = self.device, job.negative_prompt is not None
        bar, advance = _stage(job, "encode", 2 + self.vae.config.latent_frames(job.frames))
        with bar:  # closed however the stage ends
            with self._encoders_on_device():
                t = time.perf_counter()
                context = text_features(self.tokenizer, self.t5, job.prompt)
                context_null = text_features(self.tokenizer, self.t5, job.negative_prompt) if use_cfg else None
                # The encoders' outputs are checked where they are made: past here a NaN would be refused as
                # the DiT's input (an InputError about an argument the caller never gave) on a CPU, or
                # blamed on the DiT's first step on a GPU.
                _check_finite(context, "the text encoder's features of the prompt")
                if context_null is not None:
                    _check_finite(context_null, "the text encoder's features of the negative prompt")
                synchronize(device)
                timings["text"] = time.perf_counter() - t
                advance(1)
                self._check_cancel(job, "after the text encoder")
                t = time.perf_counter()
                clip_fea = clip_features(self.clip, job.image).float()
                _check_finite(clip_fea, "the image encoder's features")
                synchronize(device)
                timings["image"] = time.perf_counter() - t
                advance(2)
                self._check_cancel(job, "after the image encoder")
            t = time.perf_counter()
            resized = resize_image(job.image, job.height, job.width)

            def encoded(done: int, total: int) -> None:
                advance(2 + done)
                if done < total:
                    self._check_cancel(job, f"while encoding the image latents ({done} of {total} frames done)")

            y = image_condition(self.vae, resized, job.frames, progress=encoded)
            _check_finite(y, "the VAE's latents of the image")
            synchronize(device)
            timings["vae_encode"] = time.perf_counter() - t
            t = time.perf_counter()
            cond = self.dit.encode_context(context.to(device), clip_fea.to(device))
            uncond = self.dit.encode_context(context_null.to(device), clip_fea.to(device)) if use_cfg else None
            synchronize(device)
            timings["context"] = time.perf_counter() - t
        return cond, uncond, y.to(device)

    def _denoise(self, job: _Job, cond: EncodedContext, uncond: EncodedContext | None, y: torch.Tensor,
                 timings: dict[str, float]) -> tuple[torch.Tensor, list[float]]:
        """The sampler's steps from seeded noise: (latents [1, z_dim, T, h, w], seconds of each step)."""
        device = self.device
        t = time.perf_counter()
        noise = initial_noise((1, self.vae.config.z_dim, *y.shape[2:]), job.seed, device)
        model = guided(functools.partial(self.dit, context=cond, y=y),
                       functools.partial(self.dit, context=uncond, y=y) if uncond is not None else None, job.guidance)
        if job.sampler == DISTILLED:
            sampler = DistilledSampler(steps=evenly_spaced_steps(job.steps), shift=job.shift, update=job.update)
            sample = functools.partial(sampler.sample, seed=job.seed + 1)  # the re-noising rule's noise
        else:
            sampler = UniPCSampler(steps=job.steps, shift=job.shift)
            sample = sampler.sample
        timesteps = sampler.timesteps().tolist()
        bar, advance = _stage(job, "denoise", job.steps)
        step_seconds: list[float] = []
        last = time.perf_counter()
        # (Named where a non-finite estimate is reported: a large enough guidance overflows it by itself.)
        guided_at = f", guided at guidance {job.guidance:g}" if uncond is not None and job.guidance != 1 else ""

        def on_step(i: int, n: int, x0: torch.Tensor) -> None:
            nonlocal last
            synchronize(device)
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
            # Checked each step: NaN spreads through every later step and the VAE, which would decode it
            # into a black video minutes later.
            _check_finite(x0, f"step {i + 1} of {n}: the DiT's estimate of the clean latents{guided_at}")
            advance(i + 1, timestep=float(timesteps[i]), x0=x0)
            if i + 1 < n:
                self._check_cancel(job, f"after step {i + 1} of {n}")

        with bar:  # closed however the stage ends
            latents = sample(model, noise, callback=on_step)
            synchronize(device)
            timings["denoise"] = time.perf_counter() - t
        return latents, step_seconds

    def _decode(self, job: _Job, latents: torch.Tensor, timings: dict[str, float]) -> np.ndarray:
        """The VAE decode to uint8 frames [F, H, W, 3] on the CPU."""
        t = time.perf_counter()
        bar, advance = _stage(job, "decode", latents.shape[2])  # the VAE tells the total with tiles

        def decoded(done: int, total: int) -> None:
            bar.total = total
            advance(done)
            if done < total:
                self._check_cancel(job, f"while decoding ({done} of {total} parts done)")

        with bar:  # closed however the stage ends
            video = self.vae.decode(latents, tile=self.vae_tile, output_device="cpu", progress=decoded)
            _check_finite(video, "the VAE's decoded frames")
            frames = video_to_frames(video)
            del video
            synchronize(self.device)
            timings["decode"] = time.perf_counter() - t
        return frames


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        kind = "NaN" if torch.isnan(t).any() else "Inf"
        raise NumericalError(f"{what}: {kind} values from finite inputs (a dtype overflowed, or the weights "
                             f"are damaged); generation stopped")


def _check_vae_tile(vae_tile: object) -> int | None:
    """`vae_tile` as a plain int (numpy's integers too, as the call's settings and `WanVAE.decode` take
    them), or None; InputError for anything else."""
    if vae_tile is None:
        return None
    if isinstance(vae_tile, bool) or not isinstance(vae_tile, numbers.Integral) or vae_tile < 1:
        raise InputError(f"vae_tile must be a positive number of latent pixels or None, got {vae_tile!r}")
    return int(vae_tile)


# How often a call waiting for the pipeline looks at its cancel event.
CANCEL_POLL_SECONDS = 0.05


def _stage(job: _Job, name: str, total: int) -> tuple[Progress, Callable[..., None]]:
    """A stage's progress bar and its `advance(done, *, timestep=None, x0=None)`, which also tells the
    job's callback (a ProgressEvent with the seconds since the stage began)."""
    bar = Progress(total, name, unit="count", stream=job.stream, enabled=job.progress)
    began = time.perf_counter()

    def advance(done: int, *, timestep: float | None = None, x0: torch.Tensor | None = None) -> None:
        bar.advance_to(done)
        if job.callback is not None:
            job.callback(ProgressEvent(name, done, bar.total, time.perf_counter() - began, timestep, x0))
    return bar, advance


def _check_compatible(dit: WanDiT, t5: T5Encoder, clip: CLIPVisionEncoder, vae: WanVAE,
                      files: ModelFiles | None) -> None:
    """The pieces must fit together: widths of the text, image and latent channels."""
    def name(what: str, fallback: str) -> str:
        return str(getattr(files, what)) if files is not None else fallback

    cfg = dit.config
    if not cfg.is_i2v:
        raise CheckpointError(f"{name('dit', 'dit')}: a text-to-video DiT; the pipeline needs an image-to-video one")
    if t5.config.dim != cfg.text_dim:
        raise CheckpointError(f"{name('t5', 't5')}: T5 width {t5.config.dim} does not match the DiT's text_dim "
                              f"{cfg.text_dim}")
    if clip.config.dim != cfg.clip_dim:
        raise CheckpointError(f"{name('clip', 'clip')}: CLIP width {clip.config.dim} does not match the DiT's "
                              f"clip_dim {cfg.clip_dim}")
    if vae.config.z_dim != cfg.out_dim or cfg.in_dim != 2 * cfg.out_dim + vae.config.time_stride:
        raise CheckpointError(f"{name('vae', 'vae')}: VAE with {vae.config.z_dim} latent channels and time stride "
                              f"{vae.config.time_stride} does not fit the DiT (in {cfg.in_dim}, out {cfg.out_dim})")
