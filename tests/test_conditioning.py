"""The I2V conditioning of spec/pipeline.md: output size from the aspect ratio and area, the mask, the
image latent of the first frame + grey frames, the CLIP hand-off, the trimmed T5 text, image inputs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit8 import InputError
from dit8.clip import CLIPVisionEncoder
from dit8.conditioning import (check_frames, check_grid, check_prompt, check_size, clip_features, decode_image,
                               frame_mask, image_condition, image_tensor, latent_shape, output_size, read_image,
                               resize_image, text_features, vae_input)
from dit8.t5 import T5Encoder
from dit8.testing_encoders import tiny_clip_config, write_tiny_clip, write_tiny_t5, write_tiny_tokenizer
from dit8.testing_vae import random_vae_weights, tiny_vae_config
from dit8.tokenizer import Tokenizer
from dit8.vae import WanVAE
from dit8.video import write_png_frames


@pytest.fixture(scope="module")
def vae():
    return WanVAE.from_state_dict(random_vae_weights(tiny_vae_config(8), seed=5))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    t5 = T5Encoder.from_pth(write_tiny_t5(folder / "t5.pth", seed=2), device="cpu", dtype=torch.float32)
    return Tokenizer.from_folder(write_tiny_tokenizer(folder / "tok")), t5


def image(height=40, width=56, seed=0):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


# -- sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_hw, area, expected", [
    ((480, 832), 480 * 832, (480, 832)),    # the spec's example: latent 60x104
    ((832, 480), 480 * 832, (832, 480)),
    ((768, 1024), 480 * 832, (544, 720)),   # sqrt(399360·0.75) = 547.3 -> 68 -> 68; sqrt(399360/0.75) -> 91 -> 90
    ((1080, 1920), 480 * 832, (464, 832)),  # 474.0 -> 59 -> 58; 842.7 -> 105 -> 104
    ((100, 100), 480 * 832, (624, 624)),    # 631.9 -> 78 -> 78
    ((40, 60), 32 * 48, (32, 48)),
])
def test_output_size_follows_the_aspect_ratio(image_hw, area, expected):
    assert output_size(image_hw, area) == expected
    assert all(s % 16 == 0 for s in expected)


def test_the_default_area_is_480_by_832():
    # README: the size is the image's aspect ratio at 480·832 pixels by default. (1015x1000 is near enough
    # a rounding edge that an area 2% larger gives another height.)
    assert output_size((1015, 1000)) == output_size((1015, 1000), 480 * 832) == (624, 624)


@pytest.mark.parametrize("h0, w0", [(480, 832), (832, 480), (720, 1280), (1000, 1000), (123, 457), (3000, 17)])
def test_output_size_agrees_with_the_float_formula_except_where_floats_fall_short(h0, w0):
    """The reference's float evaluation, transcribed; of these sizes it differs only for 480x832 at
    480*832, where sqrt(399360·480/832) evaluates to 479.99999999999994 (the spec's example says latent
    60, exact)."""
    area = 480 * 832
    lat_h = round(np.sqrt(area * (h0 / w0)) // 8 // 2 * 2)
    lat_w = round(np.sqrt(area / (h0 / w0)) // 8 // 2 * 2)
    if (h0, w0) == (480, 832):
        assert (lat_h, lat_w) == (58, 104) and output_size((h0, w0), area) == (480, 832)
    else:
        assert output_size((h0, w0), area) == (8 * lat_h, 8 * lat_w)


def test_latent_shape_and_frames():
    assert latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert latent_shape(1, 32, 48) == (16, 1, 4, 6)
    for good in (1, 5, 81):
        assert check_frames(good) == good
    for bad in (0, 2, 80, 82, -3, 81.0, True):
        with pytest.raises(InputError, match="4k\\+1"):
            check_frames(bad)


def test_sizes_must_be_multiples_of_16():
    assert check_size((832, 480)) == (832, 480)
    for bad in ((830, 480), (832, 470), (832, 0), (832,), "832x480", (832.0, 480)):
        with pytest.raises(InputError):
            check_size(bad)
    with pytest.raises(InputError, match="aspect ratio"):
        output_size((16, 4000), 64 * 64)


def test_the_patch_grid_stays_within_the_position_table():
    check_grid(4 * 1023 + 1, 16 * 1024, 16 * 1024)  # 1024 latent frames, 1024 x 1024 patches: the limit
    for frames, height, width, axis in ((4 * 1024 + 1, 480, 832, "frames"), (81, 16 * 1025, 832, "height"),
                                        (81, 480, 16 * 1025, "width")):
        with pytest.raises(InputError, match=f"1025 patch positions along its {axis}"):
            check_grid(frames, height, width)


# -- mask and image latent ------------------------------------------------------------------------------


def test_mask_is_ones_for_latent_frame_zero_only():
    mask = frame_mask(81, 60, 104)
    assert mask.shape == (4, 21, 60, 104) and mask.dtype == torch.float32
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()
    assert frame_mask(1, 2, 3).eq(1).all() and frame_mask(1, 2, 3).shape == (4, 1, 2, 3)


def test_vae_input_is_the_image_then_grey():
    img = image_tensor(image())
    video = vae_input(img, 9)
    assert video.shape == (1, 3, 9, 40, 56)
    assert torch.equal(video[0, :, 0], img) and video[:, :, 1:].eq(0).all()  # 0 is mid grey in [-1, 1]


def test_image_condition_is_mask_plus_normalised_latents_of_image_and_grey_frames(vae):
    img = resize_image(image_tensor(image()), 32, 48)
    done = []
    y = image_condition(vae, img, 9, progress=lambda d, t: done.append((d, t)))
    assert y.shape == (1, 20, 3, 4, 6) and y.dtype == torch.float32
    assert done == [(1, 3), (2, 3), (3, 3)]
    torch.testing.assert_close(y[0, :4], frame_mask(9, 4, 6))
    torch.testing.assert_close(y[:, 4:], vae.encode(vae_input(img, 9)))
    # Latent frames 1.. encode grey frames: not zeros (the mean is subtracted after encoding).
    assert y[:, 4:, 1:].abs().mean() > 0.01


def test_resize_is_plain_bicubic_without_clamp():
    img = image_tensor(image())
    out = resize_image(img, 32, 48)
    torch.testing.assert_close(out, F.interpolate(img[None], size=(32, 48), mode="bicubic", align_corners=False)[0])
    sharp = torch.zeros(3, 16, 16)
    sharp[:, :, 8:] = 1
    sharp[:, :, :8] = -1
    assert resize_image(sharp, 16, 32).abs().max() > 1  # bicubic overshoot kept, as the reference


# -- encoders ---------------------------------------------------------------------------------------------


def test_text_features_are_trimmed_to_the_real_length(text):
    tokenizer, t5 = text
    ids, mask, lengths = tokenizer("a cat walks on the beach")
    features = text_features(tokenizer, t5, "a cat walks on the beach")
    assert lengths.item() == 7 and features.shape == (1, 7, 64)  # 6 words + EOS
    full = t5(ids, mask)  # all 512 positions, padding masked: its first rows are the same
    torch.testing.assert_close(features, full[:, :7], rtol=1e-5, atol=1e-5)


def test_prompt_checks(text):
    tokenizer, _ = text
    assert check_prompt(tokenizer, "a cat") == "a cat"
    # A byte a terminal passed on undecoded arrives as a lone surrogate (the tokenizer raised TypeError).
    with pytest.raises(InputError, match=r"prompt is not valid Unicode \(character 6: '\\udcff'\)"):
        check_prompt(tokenizer, "a red \udcff bird")
    with pytest.raises(InputError, match="empty"):
        check_prompt(tokenizer, "  \n ")
    assert check_prompt(tokenizer, "", "negative_prompt", allow_empty=True) == ""
    with pytest.raises(InputError, match="string"):
        check_prompt(tokenizer, None)
    short = Tokenizer(tokenizer.tokenizer, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, text_len=8)
    assert check_prompt(short, "a b c d e f g")  # 7 tokens + EOS fit
    with pytest.raises(InputError, match="8 tokens long; the text encoder takes at most 7"):
        check_prompt(short, "a b c d e f g h")


def test_clip_gets_the_image_at_its_own_size(tmp_path):
    config = tiny_clip_config()
    clip = CLIPVisionEncoder.from_pth(write_tiny_clip(tmp_path / "clip.pth", config), device="cpu",
                                      dtype=torch.float32, num_heads=config.num_heads)
    img = image_tensor(image())
    features = clip_features(clip, img)
    assert features.shape == (1, 257, config.dim)
    torch.testing.assert_close(features, clip(clip.preprocess(img[None])))


# -- image inputs ------------------------------------------------------------------------------------------


def test_image_inputs_agree():
    array = image()
    want = torch.from_numpy(array).permute(2, 0, 1).float() / 255 * 2 - 1
    assert image_tensor(array).shape == (3, 40, 56)
    torch.testing.assert_close(image_tensor(array), want)
    torch.testing.assert_close(image_tensor(torch.from_numpy(array)), want)
    torch.testing.assert_close(image_tensor(want), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_image_tensors_on_a_gpu_come_back_on_the_cpu():
    array = image()
    for x in (torch.from_numpy(array), image_tensor(array)):  # uint8 [H, W, 3] and float [3, H, W]
        got = image_tensor(x.cuda())
        assert got.device.type == "cpu" and torch.equal(got, image_tensor(array))


def test_numpy_images_of_any_strides_are_taken():
    # A view with negative strides, as img[..., ::-1] turns OpenCV's BGR into RGB, is copied, not refused.
    rgb = np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    assert torch.equal(image_tensor(bgr[..., ::-1]), image_tensor(rgb))
    assert torch.equal(image_tensor(rgb[:, ::-2]), image_tensor(np.ascontiguousarray(rgb[:, ::-2])))


def test_pil_images_are_converted_to_rgb():
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (images then come as arrays)")
    array = image()
    torch.testing.assert_close(image_tensor(Image.fromarray(array)), image_tensor(array))
    rgba = np.concatenate([array, np.full(array.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    torch.testing.assert_close(image_tensor(Image.fromarray(rgba, "RGBA")), image_tensor(array))
    grey = Image.fromarray(array[..., 0], "L")
    assert torch.equal(image_tensor(grey)[0], image_tensor(grey)[2])


def test_pil_images_that_cannot_be_read_are_input_errors(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (images then come as arrays)")
    (png,) = write_png_frames(tmp_path, image()[None])
    (tmp_path / "cut.png").write_bytes(png.read_bytes()[:300])
    with Image.open(tmp_path / "cut.png") as cut:  # opening reads the header only
        with pytest.raises(InputError, match=r"the PIL image cannot be read \(image file is truncated"):
            image_tensor(cut)
    closed = Image.open(png)
    closed.close()
    with pytest.raises(InputError, match="the PIL image cannot be read"):
        image_tensor(closed)


def test_image_files_are_read_with_pyav(tmp_path):
    array = image()
    (png,) = write_png_frames(tmp_path, array[None])
    assert np.array_equal(read_image(png), array)
    torch.testing.assert_close(image_tensor(str(png)), image_tensor(array))


def test_any_path_like_names_an_image_file(tmp_path):
    class PathLike:  # a path of another library than pathlib, as open() takes it
        def __init__(self, path):
            self.path = str(path)

        def __fspath__(self):
            return self.path

    array = image()
    (png,) = write_png_frames(tmp_path, array[None])
    torch.testing.assert_close(image_tensor(PathLike(png)), image_tensor(array))
    with pytest.raises(InputError, match="missing.png: image file not found"):
        image_tensor(PathLike(tmp_path / "missing.png"))
    (entry,) = os.scandir(os.fsencode(tmp_path))  # a path as bytes: a path still, not the image's bytes
    torch.testing.assert_close(image_tensor(entry), image_tensor(array))


def test_the_bytes_of_an_image_file_are_an_image(tmp_path):
    array = image()
    (png,) = write_png_frames(tmp_path, array[None])
    data = png.read_bytes()
    assert np.array_equal(decode_image(data), array)
    for form in (data, bytearray(data), memoryview(data)):
        torch.testing.assert_close(image_tensor(form), image_tensor(array))
    with pytest.raises(InputError, match="the image bytes are empty"):
        image_tensor(b"")
    with pytest.raises(InputError, match=r"the image bytes \(30\): cannot read the image"):
        image_tensor(data[:30])  # cut short
    with pytest.raises(InputError, match="the image bytes"):
        image_tensor(b"not an image at all")


@pytest.mark.parametrize("size", [(160, 120), (161, 121), (17, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("form", ["jpeg 4:2:0", "jpeg 4:2:2", "webp"])
def test_jpeg_and_webp_files_read_as_pillow_reads_them(tmp_path, size, form):
    """libjpeg (and libwebp), the reference's decoders. Odd sides too: FFmpeg's scaler had stretched their
    (n + 1) / 2 chroma samples over n pixels: 59 to 69 levels off here at 161 x 121, 28 to 35 at 17 x 33."""
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: no reference JPEG decoder")
    rng = np.random.default_rng(3)
    photo = np.asarray(Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(size)).copy()
    photo[:, size[0] * 9 // 16:] = (200, 30, 40)  # a sharp colour edge: chroma must be interpolated, not repeated
    path = tmp_path / ("photo.webp" if form == "webp" else "photo.jpg")
    options = dict(quality=90) if form == "webp" else dict(quality=90, subsampling=2 if "4:2:0" in form else 1)
    Image.fromarray(photo).save(path, **options)
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
    diff = np.abs(read_image(path).astype(int) - reference)
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())  # (chroma repeated: 75 and 6.2)


def test_damaged_jpeg_files_are_refused_and_bytes_read_as_files(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: no JPEG encoder")
    rng = np.random.default_rng(3)
    photo = np.asarray(Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((160, 120)))
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])  # Pillow: "image file is truncated"
    with pytest.raises(InputError, match="cut.jpg: cannot read the image"):
        read_image(tmp_path / "cut.jpg")
    assert np.array_equal(decode_image(data), read_image(tmp_path / "photo.jpg"))  # as bytes: the same


def test_image_file_names_are_not_taken_for_protocols(tmp_path, monkeypatch):
    array = image()
    (png,) = write_png_frames(tmp_path, array[None], prefix="photo:")
    monkeypatch.chdir(tmp_path)  # a bare relative name: FFmpeg read "photo:" as a protocol
    assert np.array_equal(read_image(png.name), array)


def test_pictures_past_the_pixel_limit_are_refused(tmp_path, monkeypatch):
    import dit8.conditioning

    (png,) = write_png_frames(tmp_path, image()[None])
    monkeypatch.setattr(dit8.conditioning, "MAX_IMAGE_PIXELS", 40 * 56 - 1)
    with pytest.raises(InputError, match=r"cannot read the image \(Invalid argument\): a picture of more than the "
                                         r"2,239 pixels read, or a damaged file"):
        read_image(png)


_BOMB_CHECK = """
import resource, struct, sys, zlib
from dit8 import InputError
from dit8.conditioning import decode_image, read_image

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

side = 15000  # 225 million pixels, past the limit; one row of data: a PNG of 123 bytes
png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(bytes(3 * side + 1))) + chunk(b"IEND", b""))
open(sys.argv[1], "wb").write(png)
read_image(sys.argv[2])  # (FFmpeg's libraries loaded before the baseline)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for read in (lambda: read_image(sys.argv[1]), lambda: decode_image(png)):
    try:
        read()
        raise SystemExit("read")
    except InputError as err:
        print(err)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB, as Linux counts it")
def test_a_picture_past_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path):
    # FFmpeg decodes the first picture when the file is opened, to learn its size: the size was checked after
    # a 123-byte PNG declaring 15000x15000 had taken 650 MB. The decoder's own limit now refuses it first.
    (small,) = write_png_frames(tmp_path, image()[None])
    result = subprocess.run([sys.executable, "-c", _BOMB_CHECK, str(tmp_path / "bomb.png"), str(small)],
                            capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    file_error, bytes_error, grown_mb = result.stdout.splitlines()
    for error, name in ((file_error, str(tmp_path / "bomb.png")), (bytes_error, "the image bytes (123)")):
        assert error.startswith(f"{name}: cannot read the image (") and error.endswith(
            "): a picture of more than the 178,956,970 pixels read, or a damaged file"), error
    assert int(grown_mb) < 100, f"reading it grew the memory by {grown_mb} MB"


@pytest.mark.parametrize("bad, message", [
    (np.zeros((40, 56, 3), np.float32), "uint8"),
    (np.zeros((40, 56), np.uint8), "uint8 RGB"),
    (np.zeros((40, 56, 4), np.uint8), "uint8 RGB"),
    (torch.zeros(40, 56, 3, dtype=torch.int32), "uint8"),
    (torch.zeros(40, 56, 3), "float image tensor"),
    (torch.full((3, 40, 56), 2.0), "in \\[-1, 1\\]"),
    (torch.full((3, 40, 56), float("nan")), "finite"),
    (np.zeros((8, 56, 3), np.uint8), "at least 16"),
    ([[0, 0, 0]], "file path, an image file's bytes, a PIL image"),
    (torch.zeros(40, 56, 3, dtype=torch.uint8, device="meta"), "^the image tensor is a meta tensor"),
    (torch.zeros(3, 40, 56, device="meta"), "^the image tensor is a meta tensor"),
])
def test_bad_images(bad, message):
    with pytest.raises(InputError, match=message):
        image_tensor(bad)


def test_bad_image_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        image_tensor(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match=r"notes\.png: is a text file, not an image \(it begins 'not an image'\); "
                       "give a PNG"):
        image_tensor(text)
    cut = tmp_path / "cut.png"
    cut.write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # binary, FFmpeg's own words
    with pytest.raises(InputError, match=r"cut\.png: cannot read the image \([^\[\]]+\); give a PNG"):
        image_tensor(cut)


def _animation(path: Path, fmt: str, codec: str, pix_fmt: str, options: dict | None = None) -> list[np.ndarray]:
    """Three frames, each its own colours (green 0, 90, 180 over a red ramp), a corner transparent, written
    with PyAV; returns them as RGB."""
    import av

    frames = []
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10, options=options or {})
        stream.width, stream.height, stream.pix_fmt = 40, 24, pix_fmt
        for i in range(3):
            rgba = np.full((24, 40, 4), 255, np.uint8)
            rgba[..., 0], rgba[..., 1], rgba[..., 2] = np.linspace(0, 255, 40).astype(np.uint8), 90 * i, 60
            rgba[:4, :4, 3] = 0
            frames.append(rgba[..., :3])
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgba, format="rgba")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return frames


@pytest.mark.parametrize("form", ["gif", "apng", "webp", "webp alpha", "webp lossless"])
def test_an_animation_gives_its_first_frame(tmp_path, form):
    """As Pillow's Image.open in the reference, for every format; FFmpeg decodes no animated WebP (it was
    refused as 'Invalid data found when processing input')."""
    path = tmp_path / ("a.gif" if form == "gif" else "a.png" if form == "apng" else "a.webp")
    codec, pix_fmt, options = {"gif": ("gif", "rgb8", None), "apng": ("apng", "rgba", None),
                               "webp": ("libwebp_anim", "yuv420p", None),
                               "webp alpha": ("libwebp_anim", "yuva420p", None),
                               "webp lossless": ("libwebp_anim", "bgra", {"lossless": "1"})}[form]
    frames = _animation(path, form.split()[0], codec, pix_fmt, options)
    got = read_image(path).astype(int)
    assert got.shape == frames[0].shape
    opaque = np.s_[4:, 4:]  # (the transparent corner's colours are the encoder's)
    # Frame 0's green, not 90 or 180 (GIF's 256 colours step the red ramp by 36).
    assert np.abs(got[opaque][..., 1] - frames[0][opaque][..., 1]).mean() < 8
    assert np.array_equal(decode_image(path.read_bytes()), got)
    try:
        from PIL import Image
    except ImportError:
        return
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
    diff = np.abs(got - reference)
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def _riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + len(payload).to_bytes(4, "little") + payload + b"\0" * (len(payload) % 2)


def test_an_animated_webp_whose_first_frame_covers_part_of_its_canvas(tmp_path):
    """The frame at its offset on the canvas, black around it (libwebp's canvas starts transparent)."""
    import av

    still = image(12, 16)
    with av.open(str(tmp_path / "still.webp"), "w", format="webp") as container:
        stream = container.add_stream("libwebp", rate=1, options={"lossless": "1"})
        stream.width, stream.height, stream.pix_fmt = 16, 12, "bgra"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(still, format="rgb24")), *stream.encode()]:
            container.mux(packet)
    data = (tmp_path / "still.webp").read_bytes()
    assert data[12:16] == b"VP8L"
    bitstream = data[20:20 + int.from_bytes(data[16:20], "little")]
    u24 = lambda n: n.to_bytes(3, "little")  # noqa: E731
    canvas = _riff_chunk(b"VP8X", b"\x02\0\0\0" + u24(40 - 1) + u24(24 - 1))  # animated, 40x24
    frame = _riff_chunk(b"ANMF", u24(8 // 2) + u24(6 // 2) + u24(16 - 1) + u24(12 - 1) + u24(100) + b"\0"
                        + _riff_chunk(b"VP8L", bitstream))
    body = b"WEBP" + canvas + _riff_chunk(b"ANIM", b"\0" * 6) + frame
    path = tmp_path / "part.webp"
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    expected = np.zeros((24, 40, 3), np.uint8)
    expected[6:18, 8:24] = still
    assert np.array_equal(read_image(path), expected)
    try:
        from PIL import Image
    except ImportError:
        return
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
    path.write_bytes(path.read_bytes()[:-20])  # the frame cut short
    with pytest.raises(InputError, match="part.webp: cannot read the image"):
        read_image(path)


def test_an_animated_webp_frame_whose_size_passes_the_end_is_refused_without_reading_it(tmp_path):
    """A frame chunk's size is 32 bits the file chooses: reading that much allocated it (4 GB here) first."""
    import tracemalloc

    path = tmp_path / "a.webp"
    _animation(path, "webp", "libwebp_anim", "bgra", {"lossless": "1"})
    data = path.read_bytes()
    at = data.index(b"ANMF")
    path.write_bytes(data[:at + 4] + (2**32 - 16).to_bytes(4, "little") + data[at + 8:])
    for decode, source, name in [(read_image, path, "a.webp"), (decode_image, path.read_bytes(), "the image bytes")]:
        tracemalloc.start()
        try:
            with pytest.raises(InputError, match=f"{name}.*: cannot read the image \\(a damaged animated WebP\\)"):
                decode(source)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**26, f"{decode.__name__} took {peak:,} bytes"


def test_an_animated_webp_whose_canvas_chunk_has_another_size_is_damaged(tmp_path):
    """The canvas size is read at VP8X's fixed offsets: a chunk of another size holds other bytes there
    (it was reported as a canvas of millions of pixels)."""
    path = tmp_path / "a.webp"
    _animation(path, "webp", "libwebp_anim", "bgra", {"lossless": "1"})
    data = path.read_bytes()
    assert data[12:20] == b"VP8X" + (10).to_bytes(4, "little")
    path.write_bytes(data[:16] + (6).to_bytes(4, "little") + data[20:])
    with pytest.raises(InputError, match="a.webp: cannot read the image \\(a damaged animated WebP\\)"):
        read_image(path)


@pytest.mark.parametrize("name, content, message", [
    ("drawing.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
     b'<rect width="32" height="32" fill="red"/></svg>', "is an SVG drawing \\(vector graphics\\), which is not read"),
    ("drawing.png", b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "is an SVG drawing"),
    ("page.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "is a PDF document, not an image"),
    ("empty.png", b"", "is empty \\(0 bytes\\)"),
    ("page.jpg", b"<!DOCTYPE html><html><body>Not Found</body></html>", "is an HTML or XML page"),
    ("notes.png", "a caf\u00e9 picture\n".encode(),
     "is a text file, not an image \\(it begins 'a caf\u00e9 picture'\\)"),
])
def test_a_file_that_is_no_picture_says_what_it_is(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"^{path}: {message}"):
        read_image(path)
    if content:
        with pytest.raises(InputError, match=f"^the image bytes \\({len(content):,}\\): {message}"):
            decode_image(content)


@pytest.mark.parametrize("name, content", [
    ("cut.ppm", b"P3\n20 20\n255\n255 0 0\n"),  # ASCII PPM: a header and its values, all text
    ("cut-binary.ppm", b"P6\n20 20\n255\n\xff\x00\x00"),
    ("cut.pgm", b"P2 4 4 255 0 1 2"),
    ("cut.xpm", b'/* XPM */\nstatic char * a_xpm[] = {\n"4 2 2 1",\n" \tc #FF0000",\n'),
    ("cut.xbm", b"#define t_width 8\n#define t_height 2\nstatic unsigned"),
], ids=["ppm", "binary ppm", "pgm", "xpm", "xbm"])
def test_a_damaged_picture_of_a_text_format_is_not_called_a_text_file(tmp_path, name, content):
    """Netpbm, XPM and XBM pictures, which FFmpeg reads, begin as text: a damaged one keeps FFmpeg's reason
    instead of being called a text file, not an image."""
    import av

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"^{path}: cannot read the image \\(") as refused:
        read_image(path)
    assert "text file" not in str(refused.value)
    with pytest.raises(InputError, match="^the image bytes .*: cannot read the image \\("):
        decode_image(content)
    # Each is a format FFmpeg decodes: whole, such a file is a picture.
    assert {"ppm", "pgm", "xpm", "xbm"} <= set(av.codecs_available)


def test_the_smallest_image_is_documented():
    import dit8.conditioning

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"at least {dit8.conditioning.MIN_IMAGE_SIDE} pixels a side" in readme
    assert f"MIN_IMAGE_SIDE ({dit8.conditioning.MIN_IMAGE_SIDE})" in image_tensor.__doc__
    side = dit8.conditioning.MIN_IMAGE_SIDE
    assert image_tensor(torch.zeros(3, side, side)).shape == (3, side, side)
    for shape in ((3, side - 1, 64), (3, 64, side - 1)):
        with pytest.raises(InputError, match=f"both sides must be at least {side} pixels"):
            image_tensor(torch.zeros(shape))


def test_image_errors_name_the_file(tmp_path):
    from dit8.video import write_png_frames

    (small,) = write_png_frames(tmp_path, np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match=f"^{small}: image is 8x8; both sides must be at least"):
        image_tensor(small)
    with pytest.raises(InputError, match=f"^{tmp_path}: is a folder; give an image file"):
        image_tensor(tmp_path)
    with pytest.raises(InputError, match="^the image path is empty"):
        image_tensor("")
    with pytest.raises(InputError, match="^image is 8x8"):  # no file to name
        image_tensor(np.zeros((8, 8, 3), np.uint8))
