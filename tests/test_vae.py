"""The Wan VAE: official key names and shapes, loading errors, parity with diffusers' AutoencoderKLWan on
the same random weights (fp32, relative error <= 1e-4), causality, and tiled/chunked decode equal to
whole-frame decode."""

import math

import numpy as np
import pytest
import torch

from dit8 import CheckpointError, InputError
from dit8.testing_vae import random_vae_weights, tiny_vae_config, write_random_vae
from dit8.vae import LATENT_MEAN, LATENT_STD, VAEConfig, WanVAE, config_from_shapes, decode_memory, decoder_halo

CONFIG = tiny_vae_config(dim=8)
TOLERANCE = 1e-4
MEAN = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
STD = torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def weights():
    return random_vae_weights(CONFIG, seed=0)


@pytest.fixture(scope="module")
def vae(weights):
    return WanVAE.from_state_dict(weights)


@pytest.fixture(scope="module")
def reference(weights):
    """diffusers' AutoencoderKLWan with the same weights, converted by diffusers' own key mapping for the
    official file: a strict load also proves our names are the official ones."""
    try:
        import diffusers
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    except ImportError as err:  # absent, or a version without the Wan VAE
        pytest.skip(f"diffusers (test-only dependency) is not usable: {err}")
    model = diffusers.AutoencoderKLWan(base_dim=CONFIG.dim, z_dim=CONFIG.z_dim, dim_mult=list(CONFIG.dim_mult),
                                       num_res_blocks=CONFIG.num_res_blocks,
                                       temperal_downsample=list(CONFIG.temperal_downsample))
    model.load_state_dict(convert_wan_vae_to_diffusers(dict(weights)), strict=True)
    return model.eval().requires_grad_(False)


def random_video(batch: int, frames: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_latents(batch: int, frames: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, frames, height, width, generator=torch.Generator().manual_seed(seed))


# -- names, shapes, dimensions ----------------------------------------------------------------------


def test_real_layout_has_the_official_names_and_shapes():
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in WanVAE(VAEConfig()).state_dict().items()}
    assert len(shapes) == 194
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 126_892_531
    # shapes of the official Wan2.1_VAE.pth
    assert shapes["encoder.conv1.weight"] == (96, 3, 3, 3, 3)
    assert shapes["encoder.downsamples.2.resample.1.weight"] == (96, 96, 3, 3)
    assert shapes["encoder.downsamples.3.residual.2.weight"] == (192, 96, 3, 3, 3)
    assert shapes["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert shapes["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["encoder.middle.1.to_qkv.weight"] == (1152, 384, 1, 1)
    assert shapes["encoder.head.2.weight"] == (32, 384, 3, 3, 3)
    assert shapes["conv1.weight"] == (32, 32, 1, 1, 1)
    assert shapes["conv2.weight"] == (16, 16, 1, 1, 1)
    assert shapes["decoder.conv1.weight"] == (384, 16, 3, 3, 3)
    assert shapes["decoder.upsamples.3.resample.1.weight"] == (192, 384, 3, 3)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.upsamples.12.residual.6.weight"] == (96, 96, 3, 3, 3)
    assert shapes["decoder.head.0.gamma"] == (96, 1, 1, 1)
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)
    assert config_from_shapes(shapes, source="meta") == VAEConfig()
    assert decoder_halo(VAEConfig()) == 13


def test_dimensions_read_from_the_file(tmp_path):
    config = VAEConfig(dim=4, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, False))
    vae = WanVAE.from_pth(write_random_vae(tmp_path / "vae.pth", config), device="cpu")
    assert vae.config == config and vae.dtype == torch.float32
    latents = vae.encode(random_video(1, 5, 8, 8))
    assert latents.shape == (1, 16, 3, 2, 2)  # time stride 2, space stride 4
    assert vae.decode(latents).shape == (1, 3, 5, 8, 8)


def test_loads_the_written_file_in_another_dtype(tmp_path, weights):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(weights, path)
    vae = WanVAE.from_pth(path, device="cpu", dtype=torch.bfloat16)
    assert vae.config == CONFIG and vae.dtype == torch.bfloat16
    assert torch.equal(vae.decoder.head[2].weight, weights["decoder.head.2.weight"].bfloat16())


def test_the_loaded_weights_are_the_models_own(tmp_path, weights):
    """A VAE loaded on the CPU in the file's dtype holds copies, not the memory-mapped file: one rewritten
    in place (a re-download) must not change the loaded model, nor truncated crash it; nor may changes
    to a state dict passed in reach the model."""
    path, newer = tmp_path / "Wan2.1_VAE.pth", tmp_path / "newer" / "Wan2.1_VAE.pth"  # (the name is in the zip)
    newer.parent.mkdir()
    torch.save({key: value.clone() for key, value in weights.items()}, path)
    torch.save({key: value + 1 for key, value in weights.items()}, newer)
    vae = WanVAE.from_pth(path, device="cpu")
    before = {key: value.clone() for key, value in vae.state_dict().items()}
    other = newer.read_bytes()
    assert len(other) == path.stat().st_size  # the same layout: every tensor at the same offset
    with path.open("r+b") as f:  # in place, as `cp` onto it does (not a rename)
        f.write(other)
    assert all(torch.equal(value, before[key]) for key, value in vae.state_dict().items())

    given = {key: value.clone() for key, value in weights.items()}
    from_dict = WanVAE.from_state_dict(given)
    for value in given.values():
        value.add_(1)
    assert all(torch.equal(value, weights[key]) for key, value in from_dict.state_dict().items())


# -- loading errors ---------------------------------------------------------------------------------


def load_error(tmp_path, weights) -> tuple[str, str]:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(weights, path)
    with pytest.raises(CheckpointError) as info:
        WanVAE.from_pth(path, device="cpu")
    return str(info.value), str(path)


def test_missing_tensor(tmp_path, weights):
    broken = dict(weights)
    del broken["decoder.upsamples.7.time_conv.bias"]
    msg, path = load_error(tmp_path, broken)
    assert path in msg and "missing" in msg and "'decoder.upsamples.7.time_conv.bias'" in msg


def test_missing_encoder_time_conv_is_named(tmp_path, weights):
    broken = dict(weights)
    del broken["encoder.downsamples.5.time_conv.weight"]
    msg, path = load_error(tmp_path, broken)
    assert path in msg and "'encoder.downsamples.5.time_conv.weight'" in msg


def test_quantized_tensor_refused(tmp_path, weights):
    broken = dict(weights)
    broken["decoder.head.2.weight"] = weights["decoder.head.2.weight"].to(torch.int8)
    msg, path = load_error(tmp_path, broken)
    assert msg.startswith(f"{path}: tensor 'decoder.head.2.weight' has dtype torch.int8")


def test_a_folder_is_not_a_vae_file(tmp_path):
    with pytest.raises(CheckpointError, match="a folder; give the VAE file itself"):
        WanVAE.from_pth(tmp_path, device="cpu")


def test_unexpected_tensor(tmp_path, weights):
    msg, path = load_error(tmp_path, {**weights, "decoder.head.3.weight": torch.zeros(3)})
    assert path in msg and "unexpected" in msg and "'decoder.head.3.weight'" in msg


@pytest.mark.parametrize("key", ["encoder.downsamples.5", "encoder.downsamples.\u00b2.residual.0.weight",
                                 f"encoder.downsamples.{'9' * 5000}.resample.1.weight"])
def test_an_encoder_key_of_no_plain_level_number_is_unexpected(tmp_path, weights, key):
    # (Before, reading the levels off the names raised ValueError: no name after the number, a digit int()
    # refuses, a number past int()'s limit.)
    msg, path = load_error(tmp_path, {**weights, key: torch.zeros(3)})
    assert msg.startswith(f"{path}: unexpected tensor {key!r}"), msg


def test_misshaped_tensor(tmp_path, weights):
    broken = dict(weights)
    broken["decoder.middle.1.proj.weight"] = torch.zeros(32, 32, 1, 1, 1)
    msg, path = load_error(tmp_path, broken)
    assert path in msg and "'decoder.middle.1.proj.weight'" in msg and "(32, 32, 1, 1)" in msg


def test_not_a_vae(tmp_path):
    msg, path = load_error(tmp_path, {"blocks.0.weight": torch.zeros(2)})
    assert path in msg and "'encoder.conv1.weight'" in msg


def test_absent_file_or_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        WanVAE.from_pth(tmp_path / "nope.pth", device="cpu")
    with pytest.raises(CheckpointError, match="folder"):
        WanVAE.from_pth(tmp_path, device="cpu")


# -- parity with diffusers --------------------------------------------------------------------------


def test_latent_statistics_are_wans(reference):
    # The parity tests normalise with our own constants; diffusers' Wan VAE config holds them independently.
    assert list(LATENT_MEAN) == reference.config.latents_mean and len(LATENT_MEAN) == 16
    assert list(LATENT_STD) == reference.config.latents_std and len(LATENT_STD) == 16
    assert VAEConfig().latent_mean == LATENT_MEAN and VAEConfig().latent_std == LATENT_STD


def test_encode_matches_diffusers(vae, reference):
    video = random_video(2, 9, 32, 24)
    ours = vae.encode(video)
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mean
    assert ours.shape == (2, 16, 3, 4, 3)
    assert rel_err(ours, (mu - MEAN) / STD) <= TOLERANCE


def test_decode_matches_diffusers(vae, reference):
    latents = random_latents(2, 3, 4, 3)
    ours = vae.decode(latents)
    with torch.no_grad():
        theirs = reference.decode(latents * STD + MEAN).sample
    assert ours.shape == (2, 3, 9, 32, 24)
    assert (theirs.abs() < 1).float().mean() > 0.9  # the comparison is not just of clamped values
    assert rel_err(ours, theirs) <= TOLERANCE


def test_first_frame_alone_matches_diffusers(vae, reference):
    video = random_video(1, 1, 16, 16, seed=5)
    latents = vae.encode(video)
    assert latents.shape == (1, 16, 1, 2, 2)
    decoded = vae.decode(latents)
    assert decoded.shape == (1, 3, 1, 16, 16)
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mean
        theirs = reference.decode(mu).sample
    assert rel_err(latents, (mu - MEAN) / STD) <= TOLERANCE
    assert rel_err(decoded, theirs) <= TOLERANCE


# -- causality and chunking -------------------------------------------------------------------------


def test_encode_is_causal(vae):
    video = random_video(1, 9, 16, 16)
    later_changed = video.clone()
    later_changed[:, :, 5:] = -video[:, :, 5:]
    a, b = vae.encode(video), vae.encode(later_changed)
    assert torch.allclose(a[:, :, :2], b[:, :, :2], rtol=0, atol=1e-5)
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-2
    first = vae.encode(video[:, :, :1])  # the first frame alone, as I2V encodes it
    assert torch.allclose(first, a[:, :, :1], rtol=0, atol=1e-5)


def test_decode_is_causal(vae):
    latents = random_latents(1, 3, 2, 2)
    full = vae.decode(latents)
    assert torch.allclose(vae.decode(latents[:, :, :2]), full[:, :, :5], rtol=0, atol=1e-5)


def test_chunked_decode_equals_one_frame_at_a_time(vae):
    latents = random_latents(1, 4, 3, 4)
    full = vae.decode(latents)
    for per_chunk in (2, 3):
        assert torch.allclose(vae.decode(latents, frames_per_chunk=per_chunk), full, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def small_vae():
    return WanVAE.from_state_dict(random_vae_weights(tiny_vae_config(dim=4), seed=3))


def test_tiled_decode_equals_whole_frame_decode(small_vae):
    latents = random_latents(1, 2, 6, 40)
    full = small_vae.decode(latents)
    calls = []
    tiled = small_vae.decode(latents, tile=10, progress=lambda done, total: calls.append((done, total)))
    assert tiled.shape == full.shape == (1, 3, 5, 48, 320)
    assert calls == [(i, 8) for i in range(1, 9)]  # 4 tiles x 2 latent frames
    assert torch.allclose(tiled, full, rtol=0, atol=1e-5)


def test_tiles_need_the_halo(small_vae, monkeypatch):
    """The tiled test above is sensitive: with too little context the seams show."""
    latents = random_latents(1, 1, 4, 40)
    full = small_vae.decode(latents)
    monkeypatch.setattr("dit8.vae.decoder_halo", lambda config: 3)
    assert (small_vae.decode(latents, tile=10) - full).abs().max() > 1e-3


def test_decode_options_keep_results(vae):
    latents = random_latents(1, 2, 3, 3)
    full = vae.decode(latents)
    both = vae.decode(latents, tile=1, frames_per_chunk=2, output_device="cpu")
    assert torch.allclose(both, full, rtol=0, atol=1e-5)


def test_encode_progress(vae):
    calls = []
    vae.encode(random_video(1, 9, 8, 8), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_bf16_decode_is_close_to_fp32(weights):
    latents = random_latents(1, 2, 2, 2)
    fp32 = WanVAE.from_state_dict(weights).decode(latents)
    bf16 = WanVAE.from_state_dict(weights, dtype=torch.bfloat16).decode(latents)
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 0.1


# -- memory estimate --------------------------------------------------------------------------------


def test_memory_estimate_counts_the_caches_exactly(vae):
    """decode_memory's cache term is what the upsampling path really keeps between latent frames."""
    h, w = 3, 5
    stem = torch.randn(1, CONFIG.dim * CONFIG.dim_mult[-1], 3, h, w)
    cache = {}
    with torch.inference_mode():
        for i in range(3):
            vae.decoder.upsample(stem[:, :, i:i + 1], cache)
    kept = sum(t.numel() * t.element_size() for t in cache.values() if t is not None)
    assert kept == decode_memory(CONFIG, (3, h, w))["cache"]


def test_memory_bound_for_480p_81_frames():
    gib = 2 ** 30
    full = decode_memory(VAEConfig(), (21, 60, 104))
    assert 5.5 * gib < full["total"] < 6.5 * gib  # the figure stated in decode_memory's docstring
    assert decode_memory(VAEConfig(), (21, 60, 104), tile=32)["total"] < 0.6 * full["total"]
    assert decode_memory(VAEConfig(), (21, 60, 104), dtype=torch.bfloat16)["total"] == full["total"] // 2


# -- input checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, words", [((1, 3, 6, 16, 16), "4k+1"), ((1, 3, 5, 12, 16), "multiples of 8"),
                                          ((1, 4, 5, 16, 16), "[batch, 3"), ((3, 5, 16, 16), "[batch, 3")])
def test_encode_rejects_bad_video(vae, shape, words):
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("+", r"\+")):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latents(vae):
    with pytest.raises(InputError, match="16"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(InputError, match="tile"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2), tile=0)
    with pytest.raises(InputError, match="latents must be floating point, got torch.int64"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2, dtype=torch.int64))


def test_encode_rejects_integer_pixels(vae):
    with pytest.raises(InputError, match=r"video must be floating point in \[-1, 1\], got torch.uint8"):
        vae.encode(torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("option, value", [("tile", 2.5), ("tile", True), ("tile", "4"),
                                           ("frames_per_chunk", 1.5), ("frames_per_chunk", None)])
def test_decode_rejects_options_of_another_type(vae, option, value):
    with pytest.raises(InputError, match=f"^{option} must be"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2), **{option: value})


def test_decode_takes_numpy_integers_as_options(vae):
    latents = random_latents(1, 2, 2, 3)
    assert torch.equal(vae.decode(latents, tile=np.int64(1), frames_per_chunk=np.int32(2)),
                       vae.decode(latents, tile=1, frames_per_chunk=2))


def test_decode_keeps_an_overflow_visible(small_vae, monkeypatch):
    # The output clamp made +-Inf from the decoder +-1: a white or black pixel, finite, so that no check of
    # the decoded frames (the pipeline's NumericalError) could see the overflow. NaN stays NaN.
    latents = random_latents(1, 2, 2, 2)
    healthy = small_vae.decode(latents)
    upsample = small_vae.decoder.upsample

    def overflowing(x, cache):
        out = upsample(x, cache)
        out[:, 0, :, 0, 0] = float("inf")
        out[:, 1, :, 0, 0] = float("-inf")
        out[:, 2, :, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(small_vae.decoder, "upsample", overflowing)
    for tile in (None, 1):
        video = small_vae.decode(latents, tile=tile)
        corner = video[0, :, :, 0, 0]
        assert (corner[0] == math.inf).all() and (corner[1] == -math.inf).all() and corner[2].isnan().all()
        finite = video.isfinite()
        assert torch.equal(video[finite], healthy[finite]) and video[finite].abs().max() <= 1
        if tile is None:  # (a tile's corner inside its halo is cut away: the other tiles keep theirs)
            assert finite.sum() == video.numel() - 3 * video.shape[2]
