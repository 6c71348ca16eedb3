"""I2VPipeline end to end on tiny random model folders: determinism, the composition of its parts,
mp4/PNG output, progress, cancellation, threads, defaults for distilled and base models, bad inputs,
and the discovery of every model folder layout."""

import gc
import io
import threading
import traceback
import weakref

import numpy as np
import pytest
import torch

import dit8
from dit8 import CheckpointError, Dit8Error, InputError
from dit8.conditioning import clip_features, image_condition, image_tensor, resize_image, text_features
from dit8.model_folder import CLIP_FILE, T5_FILE, VAE_FILE, find_model_files
from dit8.pipeline import Cancelled, I2VPipeline, ProgressEvent, Video, _encoder_dtypes, check_settings
from dit8.sampler import DistilledSampler, initial_noise
from dit8.testing_encoders import tiny_t5_config, write_tiny_t5
from dit8.testing_pipeline import FOLDER_KINDS, write_tiny_model_folder
from dit8.unipc import DEFAULT_NEGATIVE_PROMPT, UniPCSampler
from dit8.video import read_png, read_video, video_to_frames, write_png_frames

IMAGE = (np.random.default_rng(7).random((40, 60, 3)) * 255).astype(np.uint8)  # aspect 2:3
PROMPT = "a dog runs on the beach"
SMALL = dict(frames=5, area=32 * 48)  # -> 5 frames of 48x32, latents (16, 2, 4, 6)
ONE = dict(frames=1, area=32 * 48)  # one frame: the cheapest VAE work, for tests about other things
VAE_DIM = 4  # the VAE is the slow part on a CPU; its width does not matter here


@pytest.fixture(scope="module")
def distilled_folder(tmp_path_factory):
    return write_tiny_model_folder(tmp_path_factory.mktemp("m") / "distilled", kind="distill_models", seed=1,
                                   vae_dim=VAE_DIM)


@pytest.fixture(scope="module")
def pipe(distilled_folder):
    return I2VPipeline.from_pretrained(distilled_folder)


@pytest.fixture(scope="module")
def base_pipe(tmp_path_factory):
    return I2VPipeline.from_pretrained(write_tiny_model_folder(tmp_path_factory.mktemp("m") / "official", seed=2,
                                                              vae_dim=VAE_DIM))


@pytest.fixture(scope="module")
def video(pipe):
    return pipe(IMAGE, PROMPT, seed=3, **SMALL)


# -- results ---------------------------------------------------------------------------------------------


def test_video_fields(pipe, video):
    assert isinstance(video, Video) and pipe.distilled and pipe.files.kind == "distill_models"
    assert video.frames.shape == (5, 32, 48, 3) and video.frames.dtype == torch.uint8
    assert (video.num_frames, video.height, video.width, video.fps) == (5, 32, 48, 16)
    assert video.latents.shape == (16, 2, 4, 6) and video.latents.isfinite().all()
    assert set(video.timings) == {"text", "image", "vae_encode", "context", "denoise", "decode", "total"}
    assert len(video.step_seconds) == 4 and video.peak_memory > 0 and "RSS" in video.peak_memory_source
    assert video.settings == {"prompt": PROMPT, "negative_prompt": None, "seed": 3, "frames": 5, "size": (48, 32),
                              "sampler": "distilled", "steps": 4, "guidance": 1.0, "shift": 5.0,
                              "update": "deterministic"}
    assert video.frames.float().std() > 1  # not a constant picture
    assert repr(video) == f"Video(5 frames 48x32 at 16 fps, made in {video.timings['total']:.1f} s)"


def test_the_video_holds_ordinary_tensors(pipe):
    # Not inference tensors, which refuse in-place changes outside inference mode (a watermark, say).
    video = pipe(IMAGE, PROMPT, **ONE)
    assert not video.frames.is_inference() and not video.latents.is_inference()
    video.frames[0, :4, :4] = 255
    video.latents.mul_(2)
    assert (video.frames[0, :4, :4] == 255).all()


def test_videos_compare_and_hash_as_objects():
    # The dataclass's own == compared the frames tensors and raised "Boolean value of Tensor ... ambiguous".
    frames = torch.zeros(1, 16, 16, 3, dtype=torch.uint8)
    a, b = Video(frames=frames), Video(frames=frames.clone())
    assert a == a and a != b and len({a, b}) == 2
    e, f = (ProgressEvent("denoise", 1, 4, 0.5, 1000.0, torch.zeros(2)) for _ in range(2))
    assert e == e and e != f


def test_same_seed_same_video_other_seed_other_video(pipe, video):
    assert torch.equal(pipe(IMAGE, PROMPT, seed=3, **SMALL).frames, video.frames)
    assert torch.equal(pipe(IMAGE, PROMPT, seed=np.int64(3), **SMALL).frames, video.frames)  # any integer type
    other = pipe(IMAGE, PROMPT, seed=4, **SMALL)
    assert not torch.equal(other.latents, video.latents)
    assert not torch.equal(other.frames, video.frames)


def _composed_latents(pipe, sampler: DistilledSampler, *, frames: int, seed: int) -> torch.Tensor:
    """The pipeline's latents for IMAGE and PROMPT at 32 x 48, built from its parts: tokenizer + T5
    (trimmed), CLIP on the [-1, 1] image, VAE of the resized image + grey frames with the mask, noise
    from `seed`, the sampler (re-noising from seed + 1) with the k/v encoded once."""
    with torch.inference_mode():
        image = image_tensor(IMAGE)
        context = text_features(pipe.tokenizer, pipe.t5, PROMPT)
        encoded = pipe.dit.encode_context(context, clip_features(pipe.clip, image).float())
        y = image_condition(pipe.vae, resize_image(image, 32, 48), frames)
        noise = initial_noise((1, 16, (frames - 1) // 4 + 1, 4, 6), seed=seed)
        return sampler.sample(lambda x, t: pipe.dit(x, t, encoded, y=y), noise, seed=seed + 1)


def test_pipeline_is_the_composition_of_its_parts(pipe, video):
    """The parts of _composed_latents with the 4-step sampler, then the VAE decoder."""
    latents = _composed_latents(pipe, DistilledSampler(), frames=5, seed=3)
    with torch.inference_mode():
        frames = video_to_frames(pipe.vae.decode(latents))
    assert torch.equal(video.latents, latents[0])
    assert np.array_equal(video.numpy(), frames)


def test_mp4_and_png_frames_read_back(video, tmp_path):
    path = video.save(tmp_path / "out.mp4")
    back = read_video(path)
    assert (back.num_frames, back.height, back.width, back.fps) == (5, 32, 48, 16.0)
    assert (back.codec, back.pix_fmt) == ("h264", "yuv420p")
    assert np.abs(back.frames.astype(int) - video.numpy().astype(int)).mean() < 12  # lossy, but close
    pngs = video.save_frames(tmp_path / "frames")
    assert [p.name for p in pngs] == [f"frame_{i:05d}.png" for i in range(5)]
    assert np.array_equal(read_png(pngs[2]), video.numpy()[2])


def test_image_file_input_equals_the_array(pipe, video, tmp_path):
    (png,) = write_png_frames(tmp_path, IMAGE[None])
    assert torch.equal(pipe(str(png), PROMPT, seed=3, **SMALL).frames, video.frames)


def test_offloaded_encoders_and_tiled_decode_give_the_same_video(distilled_folder, video):
    pipe = I2VPipeline.from_pretrained(distilled_folder, offload_encoders=True, vae_tile=2)
    other = pipe(IMAGE, PROMPT, seed=3, **SMALL)
    assert torch.equal(other.latents, video.latents)
    assert (other.frames.int() - video.frames.int()).abs().max() <= 1  # tiles: same math, other summation order


def test_the_vae_computes_in_fp32_and_the_encoders_in_the_references_dtypes(distilled_folder):
    # The reference: VAE in fp32 whatever the DiT's dtype, T5 in bf16, CLIP in fp16 (fp32 asked for, or
    # the default on a CPU: fp32 throughout).
    pipe = I2VPipeline.from_pretrained(distilled_folder, dtype=torch.bfloat16)
    assert pipe.vae.dtype == torch.float32
    assert (pipe.t5.dtype, pipe.clip.dtype) == (torch.bfloat16, torch.float16)
    assert _encoder_dtypes(torch.device("cuda"), None) == (torch.bfloat16, torch.float16)
    assert _encoder_dtypes(torch.device("cuda"), torch.float16) == (torch.bfloat16, torch.float16)
    for device, dtype in (("cuda", torch.float32), ("cpu", None)):
        assert _encoder_dtypes(torch.device(device), dtype) == (torch.float32, torch.float32)


def test_offloaded_encoders_go_back_when_moving_them_fails(distilled_folder, monkeypatch):
    # CLIP out of memory on its way to the GPU left T5 there, ~11 GB held between calls.
    pipe = I2VPipeline.from_pretrained(distilled_folder, offload_encoders=True)
    moves = []

    def mover(name):
        def to(device):
            moves.append((name, str(device)))
            if name == "clip" and str(device) != "cpu":
                raise torch.OutOfMemoryError("CUDA out of memory")
        return to

    monkeypatch.setattr(pipe.t5, "to", mover("t5"))
    monkeypatch.setattr(pipe.clip, "to", mover("clip"))
    monkeypatch.setattr(pipe, "device", torch.device("cuda"))  # where they would move (nothing real moves)
    with pytest.raises(torch.OutOfMemoryError):
        with pipe._encoders_on_device():
            pass
    assert moves == [("t5", "cuda"), ("clip", "cuda"), ("t5", "cpu"), ("clip", "cpu")]


def test_other_sampler_settings(pipe, video):
    renoise = pipe(IMAGE, PROMPT, seed=3, update="renoise", **ONE)
    assert not torch.equal(renoise.latents, video.latents[:, :1])
    unipc = pipe(IMAGE, PROMPT, seed=3, sampler="unipc", steps=3, guidance=1.0, **ONE)
    assert unipc.settings["sampler"] == "unipc" and unipc.settings["shift"] == 3.0 and len(unipc.step_seconds) == 3
    sized = pipe(IMAGE, PROMPT, seed=3, frames=1, size=(32, 16))
    assert sized.frames.shape == (1, 16, 32, 3)


def count_forwards(pipe, monkeypatch) -> list:
    calls = []
    forward = pipe.dit.forward

    def counting(*args, **kwargs):
        calls.append(args[1].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.dit, "forward", counting)
    return calls


def test_base_model_defaults_to_unipc_with_cfg(base_pipe, monkeypatch):
    assert not base_pipe.distilled and base_pipe.files.kind == "official"
    calls = count_forwards(base_pipe, monkeypatch)
    video = base_pipe(IMAGE, PROMPT, seed=0, steps=3, **ONE)
    s = video.settings
    assert (s["sampler"], s["steps"], s["guidance"], s["shift"]) == ("unipc", 3, 5.0, 3.0)
    assert s["negative_prompt"].startswith("色调艳丽")
    assert len(calls) == 6  # cond and uncond per step
    want = [float(t) for t in UniPCSampler(steps=3, shift=3.0).timesteps()]  # integers: 999, 856, 599
    assert [t.item() for t in calls[::2]] == [t.item() for t in calls[1::2]] == want == [999.0, 856.0, 599.0]
    assert all(t.dtype == torch.float32 for t in calls)
    calls.clear()
    base_pipe(IMAGE, PROMPT, seed=0, steps=3, guidance=1.0, **ONE)
    assert len(calls) == 3  # no CFG: one forward per step
    calls.clear()
    assert base_pipe(IMAGE, PROMPT, seed=0, sampler="distilled", **ONE).settings["shift"] == 5.0
    assert len(calls) == 4


def test_base_model_shift_is_3_at_480p_and_5_above(base_pipe, monkeypatch):
    # Official I2V: shift 3.0 for the 480P area, 5.0 for 720P. Only the settings are looked at.
    monkeypatch.setattr(base_pipe, "_generate", lambda job: job.settings())
    wide = np.zeros((720, 1280, 3), np.uint8)
    assert base_pipe(wide, PROMPT, frames=1)["shift"] == 3.0  # the default area, 480P: 464x832
    assert base_pipe(wide, PROMPT, frames=1, size=(832, 480))["shift"] == 3.0
    s = base_pipe(wide, PROMPT, frames=1, area=1280 * 720)
    assert s["size"] == (1280, 720) and (s["sampler"], s["shift"]) == ("unipc", 5.0)
    assert base_pipe(wide, PROMPT, frames=1, area=1280 * 720, shift=2.0)["shift"] == 2.0


def test_the_documented_defaults_of_each_model_kind(pipe, base_pipe, monkeypatch):
    """README and from_pretrained: a distilled model takes the distilled sampler, 4 steps, guidance 1 (no CFG),
    shift 5; the base model UniPC, 40 steps, guidance 5 with Wan's negative prompt, shift 3 at 480P; both 81
    frames, seed 0, the deterministic update. Only the settings are looked at."""
    for p in (pipe, base_pipe):
        monkeypatch.setattr(p, "_generate", lambda job: job.settings())
    s = pipe(IMAGE, PROMPT)
    assert (s["sampler"], s["steps"], s["guidance"], s["shift"], s["negative_prompt"]) == ("distilled", 4, 1.0, 5.0,
                                                                                           None)
    assert (s["frames"], s["seed"], s["update"]) == (81, 0, "deterministic")
    s = base_pipe(IMAGE, PROMPT)
    assert (s["sampler"], s["steps"], s["guidance"], s["shift"]) == ("unipc", 40, 5.0, 3.0)
    assert s["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and (s["frames"], s["seed"]) == (81, 0)


def test_any_guidance_but_1_is_cfg_with_the_negative_prompt(base_pipe, monkeypatch):
    """CFG runs for guidance != 1, below 1 too; at exactly 1 there is no negative prompt (one forward a step)."""
    monkeypatch.setattr(base_pipe, "_generate", lambda job: job.settings())
    for guidance in (0.5, 0.0, 7.5):
        assert base_pipe(IMAGE, PROMPT, guidance=guidance)["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert base_pipe(IMAGE, PROMPT, guidance=1.0, negative_prompt="blurry")["negative_prompt"] is None


def test_renoise_draws_its_fresh_noise_from_seed_plus_one(pipe):
    """update="renoise": the initial noise from `seed`, the re-noising from seed + 1 (as __call__ documents),
    so that the fresh noise is not the initial draw again."""
    video = pipe(IMAGE, PROMPT, seed=3, update="renoise", **ONE)
    latents = _composed_latents(pipe, DistilledSampler(update="renoise"), frames=1, seed=3)
    assert torch.equal(video.latents, latents[0])


def test_cfg_uses_the_negative_prompt(base_pipe):
    a = base_pipe(IMAGE, PROMPT, seed=0, steps=2, **ONE)
    b = base_pipe(IMAGE, PROMPT, seed=0, steps=2, negative_prompt="blurry", **ONE)
    c = base_pipe(IMAGE, PROMPT, seed=0, steps=2, negative_prompt="", **ONE)
    assert b.settings["negative_prompt"] == "blurry" and c.settings["negative_prompt"] == ""
    assert not torch.equal(a.latents, b.latents) and not torch.equal(b.latents, c.latents)


# -- progress, cancellation, threads ------------------------------------------------------------------------


def test_progress_callback_and_bars(pipe):
    events: list[ProgressEvent] = []
    stream = io.StringIO()
    pipe(IMAGE, PROMPT, seed=0, callback=events.append, progress=True, progress_stream=stream, **SMALL)
    assert [(e.stage, e.done, e.total) for e in events] == [
        ("encode", 1, 4), ("encode", 2, 4), ("encode", 3, 4), ("encode", 4, 4),
        ("denoise", 1, 4), ("denoise", 2, 4), ("denoise", 3, 4), ("denoise", 4, 4),
        ("decode", 1, 2), ("decode", 2, 2)]
    steps = [e for e in events if e.stage == "denoise"]
    assert [e.timestep for e in steps] == pytest.approx([1000, 937.5, 833.333, 625], abs=1e-3)
    assert all(e.x0.shape == (1, 16, 2, 4, 6) for e in steps)
    assert all(e.x0 is None and e.timestep is None for e in events if e.stage != "denoise")
    assert all(b.seconds >= a.seconds for a, b in zip(steps, steps[1:]))
    lines = stream.getvalue().splitlines()  # not a terminal: one line per stage at its end
    assert [line.split()[0] for line in lines] == ["encode", "denoise", "decode"]
    assert "4/4" in lines[1]


@pytest.mark.parametrize("stage, done, message", [("encode", 1, "after the text encoder"),
                                                   ("encode", 2, "after the image encoder"),
                                                   ("encode", 3, r"while encoding the image latents \(1 of 2 frames"),
                                                   ("denoise", 2, "after step 2 of 4"),
                                                   ("decode", 1, r"while decoding \(1 of 2 parts done\)")])
def test_cancel_between_steps_and_parts_of_the_encode_and_decode(pipe, video, stage, done, message):
    cancel = threading.Event()
    seen = []

    def callback(event):
        seen.append((event.stage, event.done))
        if (event.stage, event.done) == (stage, done):
            cancel.set()

    with pytest.raises(Cancelled, match=message):
        pipe(IMAGE, PROMPT, seed=3, callback=callback, cancel=cancel, **SMALL)
    assert seen[-1] == (stage, done)
    assert issubclass(Cancelled, Dit8Error)
    # The lock is released and nothing is left behind: the next call is as before.
    assert torch.equal(pipe(IMAGE, PROMPT, seed=3, **SMALL).frames, video.frames)


@pytest.mark.parametrize("stop", ["callback raises", "cancel"])
def test_a_call_that_stops_early_ends_each_bar_it_began_once(pipe, stop):
    # A bar left open would leave a terminal mid-line (and print nothing at all into a log).
    cancel = threading.Event()

    def callback(event):
        if (event.stage, event.done) == ("denoise", 2):
            if stop == "cancel":
                cancel.set()
            else:
                raise KeyError("the service's own bug")

    stream = io.StringIO()
    with pytest.raises(Cancelled if stop == "cancel" else KeyError):
        pipe(IMAGE, PROMPT, callback=callback, cancel=cancel, progress=True, progress_stream=stream, **SMALL)
    lines = stream.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["encode", "denoise"] and "2/4" in lines[1]
    assert stream.getvalue().endswith("\n")


def test_a_dropped_pipeline_frees_its_models_without_the_cycle_collector(distilled_folder):
    """A service loads and drops pipelines: after calls (one cancelled mid-way, one whose callback raised)
    nothing (callbacks, bars, closures, caches) may hold the models or form a cycle that only the cycle
    collector, whenever it runs, would free: reference counting alone frees them at the `del`."""
    pipe = I2VPipeline.from_pretrained(distilled_folder)
    pipe(IMAGE, PROMPT, progress=True, progress_stream=io.StringIO(), callback=lambda event: None, **ONE)

    def stop(event):
        if event.stage == "denoise":
            raise KeyError("stop")

    with pytest.raises(KeyError):
        pipe(IMAGE, PROMPT, callback=stop, **ONE)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        pipe(IMAGE, PROMPT, cancel=cancel, **ONE)
    refs = [weakref.ref(m) for m in (pipe, pipe.dit, pipe.t5, pipe.clip, pipe.vae, pipe.tokenizer)]
    gc.collect()
    gc.disable()
    try:
        del pipe
        assert [ref() is None for ref in refs] == [True] * len(refs)
    finally:
        gc.enable()


def test_cancel_before_start(pipe):
    cancel = threading.Event()
    cancel.set()
    seen = []
    with pytest.raises(Cancelled, match="before it started"):
        pipe(IMAGE, PROMPT, cancel=cancel, callback=seen.append, **SMALL)
    assert seen == []


def test_a_call_cancelled_while_waiting_for_another_leaves_at_once(pipe):
    cancel, outcome = threading.Event(), []

    def waiting_call():
        try:
            pipe(IMAGE, PROMPT, cancel=cancel, **SMALL)
        except Cancelled as err:
            outcome.append(str(err))

    assert pipe._lock.acquire(timeout=60)  # another call is running
    try:
        thread = threading.Thread(target=waiting_call)
        thread.start()
        cancel.set()
        thread.join(timeout=30)
        assert not thread.is_alive() and outcome == ["generation cancelled while waiting for another call"]
    finally:
        pipe._lock.release()


def test_concurrent_calls_are_serialised_and_give_the_sequential_results(pipe):
    sequential = {seed: pipe(IMAGE, PROMPT, seed=seed, **ONE).frames for seed in (11, 12)}
    results, errors, log = {}, [], []
    start = threading.Barrier(2)

    def run(seed):
        try:
            start.wait()
            results[seed] = pipe(IMAGE, PROMPT, seed=seed, callback=lambda e: log.append(seed), **ONE).frames
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(torch.equal(results[s], sequential[s]) for s in (11, 12))
    first = log[0]
    assert log == [first] * 8 + [23 - first] * 8  # one whole generation, then the other


def test_a_call_from_inside_a_callback_is_refused(pipe, video):
    refused = []

    def callback(event):
        if event.stage == "denoise" and event.done == 1:
            with pytest.raises(InputError, match="called from inside its own call"):
                pipe(IMAGE, PROMPT, **ONE)  # waited on its own lock for good before
            refused.append(event.done)

    assert torch.equal(pipe(IMAGE, PROMPT, seed=3, callback=callback, **SMALL).frames, video.frames)
    assert refused == [1]


def test_numpy_scalars_are_taken_as_numbers(pipe, video):
    same = pipe(IMAGE, PROMPT, seed=np.int64(3), frames=np.int64(5), area=np.int64(32 * 48), steps=np.int32(4),
                guidance=np.float32(1), shift=np.float32(5))
    assert torch.equal(same.frames, video.frames)
    assert type(same.settings["steps"]) is int and type(same.settings["shift"]) is float
    sized = pipe(IMAGE, PROMPT, seed=3, frames=5, size=(np.int64(48), np.int64(32)))
    assert torch.equal(sized.frames, video.frames)


def test_a_callback_that_changes_the_x0_it_sees_does_not_change_the_video(pipe, video):
    def preview(event):
        if event.x0 is not None:
            event.x0.div_(event.x0.abs().max())  # a preview normalised in place

    assert torch.equal(pipe(IMAGE, PROMPT, seed=3, callback=preview, **SMALL).frames, video.frames)


def test_the_x0_a_callback_keeps_is_an_ordinary_tensor(pipe):
    # A preview kept past the call and normalised there raised "Inplace update to inference tensor outside
    # InferenceMode is not allowed".
    kept = []
    pipe(IMAGE, PROMPT, callback=lambda e: kept.append(e.x0) if e.x0 is not None else None, **ONE)
    assert len(kept) == 4 and not any(x0.is_inference() for x0 in kept)
    before = kept[-1].clone()
    kept[-1].div_(2)
    assert torch.equal(kept[-1] * 2, before)


def test_nan_from_the_dit_stops_the_call_at_that_step(pipe, monkeypatch):
    # It went on through the remaining steps and the VAE, and came out as a black video.
    forward, calls = pipe.dit.forward, []

    def poisoned(*args, **kwargs):
        calls.append(len(calls) + 1)
        out = forward(*args, **kwargs)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(pipe.dit, "forward", poisoned)
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: pytest.fail("decoded NaN latents"))
    with pytest.raises(dit8.NumericalError, match="step 2 of 4: the DiT's estimate of the clean latents: NaN"):
        pipe(IMAGE, PROMPT, **ONE)
    assert calls == [1, 2]
    monkeypatch.setattr(pipe.dit, "forward", forward)
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: decode(*a, **k).fill_(float("inf")))
    with pytest.raises(dit8.NumericalError, match="the VAE's decoded frames: Inf values"):
        pipe(IMAGE, PROMPT, **ONE)


def test_a_guidance_that_overflows_the_estimate_is_named_in_the_error(base_pipe):
    # Finite, so accepted; past fp32, g·(v_c − v_u) overflows all the same.
    with pytest.raises(dit8.NumericalError, match="step 1 of 2: the DiT's estimate of the clean latents, guided at "
                                                  "guidance 1e\\+300: (NaN|Inf) values"):
        base_pipe(IMAGE, PROMPT, guidance=1e300, steps=2, **ONE)
    assert base_pipe(IMAGE, PROMPT, steps=2, **ONE).frames.shape[0] == 1  # usable after it


def test_an_overflow_inside_the_vae_decoder_stops_the_call(pipe, monkeypatch):
    # The decoder's output clamp made +Inf a white pixel: a white video, and no error.
    upsample = pipe.vae.decoder.upsample
    monkeypatch.setattr(pipe.vae.decoder, "upsample", lambda *a, **k: upsample(*a, **k) + float("inf"))
    with pytest.raises(dit8.NumericalError, match="^the VAE's decoded frames: Inf values"):
        pipe(IMAGE, PROMPT, **ONE)


@pytest.mark.parametrize("encoder, method, stage", [
    ("t5", "forward", "the text encoder's features of the prompt"),
    ("clip", "encode", "the image encoder's features"),
    ("vae", "encode", "the VAE's latents of the image"),
])
def test_nan_from_an_encoder_stops_the_call_naming_it(pipe, monkeypatch, encoder, method, stage):
    # It reached the DiT, which refused it as bad input ("context contains Inf values", an argument the
    # caller never gave) on a CPU, and on a GPU ran on until the first step blamed the DiT.
    model = getattr(pipe, encoder)
    made = getattr(model, method)
    monkeypatch.setattr(model, method, lambda *a, **k: made(*a, **k) * float("inf"))
    monkeypatch.setattr(pipe.dit, "forward", lambda *a, **k: pytest.fail("the DiT ran on non-finite conditioning"))
    with pytest.raises(dit8.NumericalError, match=f"^{stage}: (NaN|Inf) values"):
        pipe(IMAGE, PROMPT, **ONE)


def test_nan_from_the_text_encoder_on_the_negative_prompt_is_named(pipe, monkeypatch):
    forward, calls = pipe.t5.forward, []

    def second_poisoned(*args, **kwargs):
        calls.append(1)
        out = forward(*args, **kwargs)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(pipe.t5, "forward", second_poisoned)
    with pytest.raises(dit8.NumericalError, match="^the text encoder's features of the negative prompt: NaN"):
        pipe(IMAGE, PROMPT, guidance=3.0, negative_prompt="blurry", **ONE)


def test_a_kept_exception_holds_none_of_the_calls_tensors(pipe, monkeypatch):
    """A service that keeps a failed call's exception (to log it, or to retry after running out of GPU
    memory) keeps no tensor of the call alive through its traceback; the traceback's lines stay."""
    seen = []

    def decode(latents, **kwargs):
        seen.append(weakref.ref(latents))
        raise RuntimeError("out of memory (a stand-in)")

    monkeypatch.setattr(pipe.vae, "decode", decode)
    with pytest.raises(RuntimeError, match="a stand-in") as info:
        pipe(IMAGE, PROMPT, **ONE)
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None
    assert "in _decode" in "".join(traceback.format_exception(info.value))
    monkeypatch.undo()
    assert pipe(IMAGE, PROMPT, **ONE).frames.shape[0] == 1  # the pipeline still works


def test_a_failed_load_keeps_nothing_it_loaded(distilled_folder, monkeypatch):
    """A load that fails after the DiT is in memory (a broken VAE file, say): its exception does not keep
    the DiT alive."""
    loaded, load_dit = [], dit8.pipeline.load_dit

    def recorded(*args, **kwargs):
        model = load_dit(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    class BrokenVAE:
        @staticmethod
        def from_pth(path, **kwargs):
            raise CheckpointError(f"{path}: a stand-in")

    monkeypatch.setattr(dit8.pipeline, "load_dit", recorded)
    monkeypatch.setattr(dit8.pipeline, "WanVAE", BrokenVAE)
    with pytest.raises(CheckpointError, match="a stand-in") as info:
        I2VPipeline.from_pretrained(distilled_folder)
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None
    assert "in from_pretrained" in "".join(traceback.format_exception(info.value))


def test_a_float_image_is_copied_before_the_call_reads_it(pipe, monkeypatch):
    image = torch.from_numpy(IMAGE).permute(2, 0, 1).float().div(127.5).sub(1).contiguous()
    expected = pipe(image, PROMPT, **ONE).frames
    generate = pipe._generate

    def caller_reuses_the_buffer(job):  # between the checks and the work, as another thread may
        image.fill_(7.0)
        return generate(job)

    monkeypatch.setattr(pipe, "_generate", caller_reuses_the_buffer)
    assert torch.equal(pipe(image, PROMPT, **ONE).frames, expected)


# -- bad inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames=8), "4k\\+1"),
    (dict(frames=0), "4k\\+1"),
    (dict(size=(40, 32)), "multiples of 16"),
    (dict(size=(48, 32), area=1000), "not both"),
    (dict(area=0), "area"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt=" ".join(["cat"] * 600)), "600 tokens long; the text encoder takes at most 511"),
    (dict(prompt=42), "prompt must be a string"),
    (dict(image=np.zeros((40, 60, 3), np.float64)), "uint8"),
    (dict(image=object()), "file path, an image file's bytes, a PIL image"),
    (dict(image="no/such/image.png"), "not found"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(steps=0), "steps"),
    (dict(sampler="euler"), "sampler"),
    (dict(guidance=float("nan")), "guidance"),
    (dict(shift=-1.0), "shift"),
    (dict(update="sde"), "update"),
    (dict(sampler="unipc", update="renoise"), "the distilled sampler's step rule; the unipc sampler takes only"),
    (dict(guidance=3.0, negative_prompt=" ".join(["cat"] * 600)), "negative_prompt is 600 tokens"),
    (dict(negative_prompt=" ".join(["cat"] * 600)), "negative_prompt is 600 tokens"),  # unused, still checked
    (dict(negative_prompt=b"blurry"), "negative_prompt must be a string"),
    (dict(prompt="a red \udcff bird"), "prompt is not valid Unicode"),
    (dict(cancel=True), "threading.Event"),
    (dict(callback="print"), "callable"),
    (dict(progress="no"), "progress must be True or False"),  # a string is truthy: it drew the bars
    (dict(progress=True, progress_stream=3), "progress_stream must be a text stream"),
    (dict(progress=True, progress_stream=io.BytesIO()), "progress_stream must be a text stream"),  # not after encoding
    (dict(progress_stream=io.StringIO()), "progress_stream is given but progress is False"),
    (dict(image=torch.zeros(3, 0, 0)), "at least"),
    (dict(frames=4 * 1024 + 1), "1025 patch positions along its frames"),  # refused before the encoders run
    (dict(size=(16_000_000, 16)), "along its width; the model's position encoding covers 1024"),
])
def test_bad_inputs_raise_input_error(pipe, kwargs, message):
    args = {"image": IMAGE, "prompt": PROMPT, **SMALL}
    args.update(kwargs)
    if "size" in kwargs:
        args.pop("area")
        if "area" in kwargs:
            args["area"] = kwargs["area"]
    with pytest.raises(InputError, match=message):
        pipe(args.pop("image"), args.pop("prompt"), **args)


def test_a_video_too_long_for_the_8_bit_attention_is_refused_before_the_encoders_run(distilled_folder, monkeypatch):
    # The tiny model's rows of 2 heads x 128 fit the Triton kernels' 32-bit offsets up to 2^23 tokens;
    # 257 frames of 8192x4096 are 65 x 256 x 512 = 8,519,680 of them. torch SDPA has no 8-bit path to take them.
    pipe = I2VPipeline.from_pretrained(distilled_folder, attention="int8", backend="triton")
    monkeypatch.setattr(pipe.t5, "forward", lambda *a, **kw: pytest.fail("the text encoder ran"))
    with pytest.raises(InputError, match="a 8192x4096 video of 257 frames has 8,519,680 tokens; the model's "
                                         "self-attention \\(int8.* at most 8,388,608: use attention='bf16'"):
        pipe(IMAGE, PROMPT, frames=257, size=(8192, 4096))
    pipe.dit.check_tokens(8_388_608, "the limit")


def test_check_settings_refuses_what_the_call_would_without_a_model():
    """The command line runs check_settings before loading the model: steps in [1, 1000], and UniPC with the
    distilled sampler's update rule, are refused there already."""
    check_settings(steps=1000, sampler="unipc", update="deterministic")
    with pytest.raises(InputError, match=r"steps must be an integer in \[1, 1000\], got 1001"):
        check_settings(steps=1001)
    with pytest.raises(InputError, match="update='renoise' is the distilled sampler's step rule"):
        check_settings(sampler="unipc", update="renoise")


@pytest.mark.parametrize("kwargs", [{"distilled": "yes"}, {"offload_encoders": "no"}, {"progress": 1}])
def test_switches_of_from_pretrained_are_booleans(tmp_path, kwargs):
    # A string is truthy: "no" would have switched offloading on.
    with pytest.raises(InputError, match=f"{next(iter(kwargs))} must be True, False or None"):
        I2VPipeline.from_pretrained(tmp_path, **kwargs)
    if "progress" in kwargs:
        with pytest.raises(InputError, match="progress must be True, False or None"):
            dit8.load_dit(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"path": 3}, "path must be a non-empty file or folder path, got 3"),
    ({"path": ""}, "path must be a non-empty"),  # it read the current folder
    ({"dit": 3}, "dit must be a non-empty file or folder path"),
    ({"parallel": "x"}, "parallel must be a dit8.SequenceParallel, got str"),
])
def test_arguments_of_from_pretrained_are_named(distilled_folder, kwargs, message):
    args = {"path": distilled_folder, **kwargs}
    with pytest.raises(InputError, match=message):
        I2VPipeline.from_pretrained(args.pop("path"), **args)
    if "dit" not in kwargs:
        with pytest.raises(InputError, match=message):
            dit8.load_dit(distilled_folder / "distill_models" if "path" not in kwargs else kwargs["path"],
                          **{k: v for k, v in kwargs.items() if k != "path"})


@pytest.mark.parametrize("tile", [True, 0, 2.0, "2"])
def test_vae_tile_is_a_positive_integer(tmp_path, tile):
    with pytest.raises(InputError, match="vae_tile must be a positive number of latent pixels"):
        I2VPipeline.from_pretrained(tmp_path, vae_tile=tile)  # refused before the folder is read


@pytest.mark.parametrize("kwargs", [{"distilled": "no"}, {"offload_encoders": "no"}, {"distilled": None}])
def test_switches_of_a_pipeline_built_from_loaded_models_are_booleans(base_pipe, kwargs):
    # As from_pretrained's: distilled="no" (a truthy string) gave a base model the distilled sampler.
    p = base_pipe
    with pytest.raises(InputError, match=f"{next(iter(kwargs))} must be True or False, got"):
        I2VPipeline(p.dit, p.t5, p.clip, p.vae, p.tokenizer, **kwargs)
    built = I2VPipeline(p.dit, p.t5, p.clip, p.vae, p.tokenizer, distilled=False, offload_encoders=False)
    assert built.distilled is False and built.offload_encoders is False


@pytest.mark.parametrize("piece", ["dit", "t5", "clip", "vae", "tokenizer"])
def test_a_pipeline_built_from_other_objects_names_the_argument(pipe, piece):
    # An AttributeError from inside before ('str' object has no attribute 'config'); a wrong tokenizer
    # was taken, and failed only at the first call.
    pieces = {name: getattr(pipe, name) for name in ("dit", "t5", "clip", "vae", "tokenizer")}
    pieces[piece] = pieces["vae" if piece == "dit" else "dit"]  # another of the pieces: the wrong kind
    with pytest.raises(InputError, match=f"^{piece} must be a dit8 .*, got "):
        I2VPipeline(**pieces)


def test_vae_tile_takes_numpy_integers(pipe):
    # As the call's settings and WanVAE.decode take them; stored as a plain int.
    tiled = I2VPipeline(pipe.dit, pipe.t5, pipe.clip, pipe.vae, pipe.tokenizer, vae_tile=np.int64(2))
    assert type(tiled.vae_tile) is int and tiled.vae_tile == 2
    whole, other = pipe(IMAGE, PROMPT, seed=3, **ONE), tiled(IMAGE, PROMPT, seed=3, **ONE)
    assert torch.equal(other.latents, whole.latents)
    assert (other.frames.int() - whole.frames.int()).abs().max() <= 1  # tiles: same math, other summation order


def test_incompatible_pieces_raise_checkpoint_error(tmp_path):
    root = write_tiny_model_folder(tmp_path / "m", kind="distill_models", vae_dim=VAE_DIM)
    write_tiny_t5(root / T5_FILE, tiny_t5_config(dim=32, dim_attn=32))
    with pytest.raises(CheckpointError, match=f"{T5_FILE}: T5 width 32 does not match the DiT's text_dim 64"):
        I2VPipeline.from_pretrained(root)


# -- model folders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FOLDER_KINDS))
def test_every_folder_kind_loads_and_runs(tmp_path, kind):
    root = write_tiny_model_folder(tmp_path / kind, kind=kind, encoders_beside_dit=kind == "distill_fp8",
                                   vae_dim=VAE_DIM)
    pipe = I2VPipeline.from_pretrained(root)
    assert pipe.files.kind == (kind if not kind.startswith("single_file") else "single_file")
    assert pipe.distilled == (kind != "official")
    video = pipe(IMAGE, PROMPT, steps=2, **ONE)
    assert video.frames.shape == (1, 32, 48, 3) and video.latents.isfinite().all()


def test_a_dit_missing_its_last_block_file_is_refused(tmp_path):
    # The blocks present say nothing of the ones missing; the folder's config.json does.
    root = write_tiny_model_folder(tmp_path / "m", kind="distill_fp8", vae_dim=VAE_DIM)
    (root / "distill_fp8" / "block_1.safetensors").unlink()
    message = r"m/config.json: num_layers = 2 disagrees with the weights \(1\)"
    with pytest.raises(CheckpointError, match=message):
        I2VPipeline.from_pretrained(root)


def touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


ENCODERS = (T5_FILE, CLIP_FILE, VAE_FILE, "google/umt5-xxl/tokenizer.json")


@pytest.mark.parametrize("files, kind, dit, scheme, distilled", [
    (["diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-00001-of-00007.safetensors"],
     "official", ".", "bf16", False),
    (["distill_models/distill_model.safetensors"], "distill_models", "distill_models/distill_model.safetensors",
     "bf16", True),
    (["distill_fp8/block_0.safetensors", "distill_fp8/non_block.safetensors"], "distill_fp8", "distill_fp8", "fp8",
     True),
    (["distill_int8/block_0.safetensors"], "distill_int8", "distill_int8", "int8", True),
    (["fp8/block_0.safetensors"], "fp8", "fp8", "fp8", True),
    (["int8/block_0.safetensors"], "int8", "int8", "int8", True),
    (["original/distill_model.safetensors"], "original", "original/distill_model.safetensors", "bf16", True),
    (["wan2.1_i2v_480p_lightx2v_4step.safetensors"], "single_file", "wan2.1_i2v_480p_lightx2v_4step.safetensors",
     "bf16", True),
    (["wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step_comfyui.safetensors"], "single_file",
     "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step_comfyui.safetensors", "fp8", True),
    (["wan2.1_i2v_480p_int8_lightx2v_4step.safetensors"], "single_file",
     "wan2.1_i2v_480p_int8_lightx2v_4step.safetensors", "int8", True),
])
def test_folder_discovery(tmp_path, files, kind, dit, scheme, distilled):
    touch(tmp_path, *ENCODERS, *files)
    found = find_model_files(tmp_path)
    assert (found.kind, found.dit, found.scheme, found.distilled) == (kind, (tmp_path / dit).resolve()
                                                                      if dit == "." else tmp_path / dit,
                                                                      scheme, distilled)
    assert (found.t5, found.clip, found.vae, found.tokenizer) == (
        tmp_path / T5_FILE, tmp_path / CLIP_FILE, tmp_path / VAE_FILE, tmp_path / "google/umt5-xxl")


def test_scheme_picks_the_variant_and_float_comes_first(tmp_path):
    touch(tmp_path, *ENCODERS, "distill_models/distill_model.safetensors", "distill_fp8/block_0.safetensors",
          "int8/block_0.safetensors")
    assert find_model_files(tmp_path).kind == "distill_models"
    assert find_model_files(tmp_path, scheme="fp8").dit == tmp_path / "distill_fp8"
    assert find_model_files(tmp_path, scheme="int8").dit == tmp_path / "int8"
    with pytest.raises(InputError, match="unknown scheme 'fp4'"):  # an argument's error, not the folder's
        find_model_files(tmp_path, scheme="fp4")


@pytest.mark.parametrize("name", ["wan2.1_i2v_480p_lightx2v_4step.safetensors",
                                  "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors",
                                  "wan2.1_i2v_480p_int8_lightx2v_4step.safetensors"])
def test_a_distilled_file_dropped_into_the_official_folder_is_preferred(tmp_path, name):
    """Whatever its scheme: the shards beside it are the base model, another model, not a variant of it."""
    touch(tmp_path, *ENCODERS, "diffusion_pytorch_model.safetensors.index.json", name)
    found = find_model_files(tmp_path)
    assert (found.kind, found.dit.name, found.distilled) == ("single_file", name, True)
    base = find_model_files(tmp_path, dit=tmp_path)  # the shards of the folder itself
    assert (base.dit, base.distilled) == (tmp_path, False)


@pytest.mark.parametrize("sub, scheme", [("distill_int8", "int8"), ("distill_fp8", "fp8"), ("int8", "int8"),
                                         ("fp8", "fp8")])
def test_a_quantized_subfolder_with_the_index_lightx2v_writes_is_not_the_base_model(tmp_path, sub, scheme):
    """LightX2V's converter writes diffusion_pytorch_model.safetensors.index.json (the official shards' index
    name) beside its block files: pointed at, the subfolder is still its quantized, distilled DiT."""
    touch(tmp_path, *ENCODERS, f"{sub}/block_0.safetensors", f"{sub}/non_block.safetensors",
          f"{sub}/diffusion_pytorch_model.safetensors.index.json")
    for path in (tmp_path, tmp_path / sub):
        found = find_model_files(path)
        assert (found.kind, found.dit, found.scheme, found.distilled) == (sub, tmp_path / sub, scheme, True), path
        assert find_model_files(path, scheme=scheme).dit == tmp_path / sub
        with pytest.raises(CheckpointError, match="no bf16 DiT found"):
            find_model_files(path, scheme="bf16")


def test_encoders_beside_the_dit_come_first(tmp_path):
    touch(tmp_path, *ENCODERS, "distill_models/distill_model.safetensors", f"distill_models/{T5_FILE}")
    found = find_model_files(tmp_path)
    assert found.t5 == tmp_path / "distill_models" / T5_FILE and found.clip == tmp_path / CLIP_FILE


def test_pointing_at_a_dit_subfolder_or_file(tmp_path):
    touch(tmp_path, *ENCODERS, "distill_fp8/block_0.safetensors", "distill_models/distill_model.safetensors")
    found = find_model_files(tmp_path / "distill_fp8")
    assert (found.dit, found.scheme, found.distilled, found.t5) == (
        tmp_path / "distill_fp8", "fp8", True, tmp_path / T5_FILE)
    found = find_model_files(tmp_path / "distill_models" / "distill_model.safetensors")
    assert found.dit == tmp_path / "distill_models" / "distill_model.safetensors" and found.distilled
    # A scheme the subfolder does not hold is an error, not its float DiT.
    with pytest.raises(CheckpointError, match="no fp8 DiT found"):
        find_model_files(tmp_path / "distill_models", scheme="fp8")
    # The DiT still meets the model folder's config.json.
    assert found.config_json is None
    touch(tmp_path, "config.json")
    for path in (tmp_path, tmp_path / "distill_fp8", tmp_path / "distill_models" / "distill_model.safetensors"):
        assert find_model_files(path).config_json == tmp_path / "config.json"


def test_a_dit_subfolder_missing_a_block_is_refused(tmp_path):
    folder = write_tiny_model_folder(tmp_path / "m", kind="distill_fp8")
    (folder / "distill_fp8" / "block_1.safetensors").unlink()
    for path in (folder, folder / "distill_fp8"):
        with pytest.raises(CheckpointError, match="num_layers = 2 disagrees with the weights"):
            I2VPipeline.from_pretrained(path)


def test_dit_override_and_the_distilled_rule(tmp_path):
    official, lightx2v = tmp_path / "official", tmp_path / "lightx2v"
    touch(official, *ENCODERS, "diffusion_pytorch_model.safetensors.index.json", "mine.safetensors")
    touch(lightx2v, *ENCODERS, "distill_models/distill_model.safetensors", "converted/model_fp8.safetensors")
    assert not find_model_files(official, dit=official / "mine.safetensors").distilled
    assert find_model_files(official, dit="mine.safetensors").dit == official / "mine.safetensors"  # relative
    assert find_model_files(lightx2v, dit="converted/model_fp8.safetensors").distilled  # the folder's kind
    touch(lightx2v, "per_block/model.safetensors.index.json", "per_block/block_0.safetensors")
    assert find_model_files(lightx2v, dit="per_block").distilled  # `convert --per-block`: not official shards
    touch(tmp_path, "my_4step_model.safetensors")
    assert find_model_files(official, dit=tmp_path / "my_4step_model.safetensors").distilled  # name hint
    assert find_model_files(official, distilled=True).distilled
    assert not find_model_files(lightx2v, distilled=False).distilled
    for flag in ("no", "False", 0):  # not taken for its truth value: "no" would mean distilled
        with pytest.raises(InputError, match=f"distilled must be True, False or None, got {flag!r}"):
            find_model_files(official, distilled=flag)
    with pytest.raises(CheckpointError, match="missing.safetensors: DiT file or folder not found"):
        find_model_files(official, dit="missing.safetensors")


def test_the_distilled_rule_however_the_paths_are_spelled(tmp_path, monkeypatch):
    """One answer per DiT file: relative or absolute, through a link to the model folder, or given as the
    path (then its subfolder's name still counts)."""
    official = tmp_path / "official"
    touch(official, *ENCODERS, "diffusion_pytorch_model.safetensors.index.json", "lightx2v/model.safetensors",
          "distill_models/merged.safetensors")
    (tmp_path / "link").symlink_to(official)
    monkeypatch.chdir(tmp_path)
    dit = official / "lightx2v" / "model.safetensors"
    for model, given in [(official, "lightx2v/model.safetensors"), ("official", dit),
                         (official, "official/lightx2v/model.safetensors"), (tmp_path / "link", dit),
                         ("./official", "official/lightx2v/model.safetensors")]:
        assert find_model_files(model, dit=given).distilled, (model, given)
    assert find_model_files(official, dit="distill_models/merged.safetensors").distilled
    assert find_model_files(official / "distill_models" / "merged.safetensors").distilled


def test_a_dit_subfolder_or_file_given_relative_to_the_current_folder(tmp_path, monkeypatch):
    touch(tmp_path, *ENCODERS, "config.json", "distill_fp8/block_0.safetensors",
          "distill_models/distill_model.safetensors")
    monkeypatch.chdir(tmp_path / "distill_fp8")
    found = find_model_files(".")
    assert (found.kind, found.dit, found.t5, found.config_json) == (
        "distill_fp8", tmp_path / "distill_fp8", tmp_path / T5_FILE, tmp_path / "config.json")
    monkeypatch.chdir(tmp_path / "distill_models")
    found = find_model_files("distill_model.safetensors")
    assert (found.dit, found.t5, found.config_json) == (
        tmp_path / "distill_models" / "distill_model.safetensors", tmp_path / T5_FILE, tmp_path / "config.json")


def test_a_broken_link_is_not_passed_over(tmp_path):
    """A Hugging Face cache links each file to a blob; one never fetched is a link to nothing. Read as no
    file, it sent the search on to another variant (or said the T5 was not found): refused, naming it."""
    touch(tmp_path, *[name for name in ENCODERS if name != T5_FILE], "distill_fp8/block_0.safetensors")
    (tmp_path / "distill_models").mkdir()
    blob = tmp_path / "blobs" / "0a1b"
    (tmp_path / "distill_models" / "distill_model.safetensors").symlink_to(blob)
    with pytest.raises(CheckpointError, match=f"distill_model.safetensors: a symbolic link to {blob}, which does "
                                              f"not exist$"):
        find_model_files(tmp_path)
    (tmp_path / "distill_models" / "distill_model.safetensors").unlink()
    (tmp_path / T5_FILE).symlink_to(blob)
    with pytest.raises(CheckpointError, match=f"{T5_FILE}: a symbolic link to {blob}, which does not exist$"):
        find_model_files(tmp_path)


def test_a_dit_file_as_the_model_and_another_dit_are_refused(tmp_path):
    touch(tmp_path, *ENCODERS, "distill_models/distill_model.safetensors", "mine.safetensors")
    with pytest.raises(InputError, match="two DiTs given: the DiT file .*distill_model.safetensors' as the model "
                                         "and dit='mine.safetensors'"):
        find_model_files(tmp_path / "distill_models" / "distill_model.safetensors", dit="mine.safetensors")


def test_a_relative_dit_is_looked_for_in_the_current_folder_first(tmp_path, monkeypatch):
    """find_model_files: relative dit paths are tried against the current directory, then the model folder."""
    official = tmp_path / "official"
    touch(official, *ENCODERS, "diffusion_pytorch_model.safetensors.index.json", "mine.safetensors")
    touch(tmp_path, "mine.safetensors")
    monkeypatch.chdir(tmp_path)
    found = find_model_files(official, dit="mine.safetensors").dit
    assert found.resolve() == (tmp_path / "mine.safetensors").resolve()


def test_a_scheme_beside_a_given_dit_is_refused(tmp_path, capsys):
    """A scheme chooses among a folder's DiTs: with a DiT given there is nothing to choose, and asking for int8
    must not load whatever the file holds (it was ignored)."""
    touch(tmp_path, *ENCODERS, "distill_models/distill_model.safetensors", "mine.safetensors")
    dit_file = tmp_path / "distill_models" / "distill_model.safetensors"
    for path, dit, given in ((tmp_path, "mine.safetensors", "dit='mine.safetensors'"),
                             (dit_file, None, f"the DiT file {str(dit_file)!r}")):
        with pytest.raises(InputError) as err:
            find_model_files(path, dit=dit, scheme="int8")
        assert str(err.value) == (f"scheme 'int8' chooses among a model folder's DiTs; with {given} there is none "
                                  f"to choose (its weights decide its format): leave the scheme out")
        assert find_model_files(path, dit=dit).dit in (tmp_path / "mine.safetensors", dit_file)
    from dit8.cli import main

    (png,) = write_png_frames(tmp_path, np.zeros((1, 32, 32, 3), np.uint8))
    assert main(["generate", "--model", str(dit_file), "--scheme", "int8", "--image", str(png), "--prompt", "p",
                 "--out", str(tmp_path / "o.mp4")]) == 1
    assert "scheme 'int8' chooses among a model folder's DiTs" in capsys.readouterr().err


@pytest.mark.parametrize("missing, message", [
    (T5_FILE, f"{T5_FILE}: T5 text encoder not found"),
    (CLIP_FILE, f"{CLIP_FILE}: CLIP image encoder not found"),
    (VAE_FILE, f"{VAE_FILE}: VAE not found"),
    ("google/umt5-xxl/tokenizer.json", "google/umt5-xxl/tokenizer.json: umT5 tokenizer not found"),
])
def test_missing_pieces_name_the_file_expected(tmp_path, missing, message):
    touch(tmp_path, *[f for f in ENCODERS if f != missing], "distill_models/distill_model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        find_model_files(tmp_path)


def test_quantized_encoders_alone_are_not_enough(tmp_path):
    touch(tmp_path, CLIP_FILE, VAE_FILE, "google/umt5-xxl/tokenizer.json", "distill_fp8/block_0.safetensors",
          "distill_fp8/models_t5_umt5-xxl-enc-fp8.pth")
    with pytest.raises(CheckpointError, match=f"only the quantized models_t5_umt5-xxl-enc-fp8.pth .* {T5_FILE}"):
        find_model_files(tmp_path)


def test_no_dit_lists_what_was_expected(tmp_path):
    touch(tmp_path, *ENCODERS)
    with pytest.raises(CheckpointError, match="no DiT found; expected one of: "
                                              "distill_models/distill_model.safetensors, .*, diffusion_pytorch_model"):
        find_model_files(tmp_path)
    touch(tmp_path, "distill_models/distill_model.safetensors")
    with pytest.raises(CheckpointError, match="no int8 DiT found; expected one of: distill_int8/, int8/"):
        find_model_files(tmp_path, scheme="int8")
    with pytest.raises(CheckpointError, match="no such model folder"):
        find_model_files(tmp_path / "nowhere")
