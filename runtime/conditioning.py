"""Image-to-video conditioning exactly as the official Wan2.1 I2V code builds it (spec/pipeline.md,
"Conditioning"), as small functions the pipeline strings together:

    image (PIL, numpy, tensor or file) -> [3, H0, W0] in [-1, 1]                      `image_tensor`
    output size: the image's aspect ratio at a pixel area (or an explicit size)        `output_size`
    mask [4, T, h, w]: latent frame 0 known (ones), the rest to generate (zeros)       `frame_mask`
    image latent: the image bicubic-resized, then 4k ZERO frames (mid grey), VAE-encoded and
        normalised; with the mask: y [1, 20, T, h, w]                                   `image_condition`
    CLIP features of the [-1, 1] image at its own size (the encoder resizes to 224)    `clip_features`
    T5 features of the prompt, trimmed to its real length (EOS included)              `text_features`

The DiT pads the text to 512 rows with zeros itself. Initial noise is `dit8.initial_noise`.
"""

from __future__ import annotations

import errno
import io
import math
import numbers
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .devices import check_not_meta
from .errors import InputError
from .rope import MAX_POSITIONS
from .tokenizer import Tokenizer, clean_prompt

if TYPE_CHECKING:  # for the annotations only: conditioning needs none of them at import
    from .clip import CLIPVisionEncoder
    from .t5 import T5Encoder
    from .vae import WanVAE

__all__ = ["AREA_480P", "check_frames", "check_grid", "check_prompt", "check_size", "clip_features", "decode_image",
           "frame_mask", "image_condition", "image_tensor", "latent_shape", "output_size", "read_image",
           "resize_image", "text_features", "vae_input"]

AREA_480P = 480 * 832  # the official "832*480" / "480*832" max area
MIN_IMAGE_SIDE = 16


# -- the input image ---------------------------------------------------------------------------------

# Pillow's default limit (Image.MAX_IMAGE_PIXELS): a small file may hold a picture that takes gigabytes.
MAX_IMAGE_PIXELS = 178_956_970


def read_image(path: str | Path) -> np.ndarray:
    """An image file (PNG, JPEG, WebP, BMP, ... whatever FFmpeg decodes) as [H, W, 3] uint8 RGB.

    Decoded through PyAV (FFmpeg), a dependency already, rather than Pillow. Alpha is dropped, as
    Pillow's `convert("RGB")` in the reference does; EXIF orientation is not applied (nor is it there).
    Subsampled chroma (JPEG's and WebP's 4:2:0, 4:2:2) is interpolated, as libjpeg does, before the
    conversion to RGB: within a few levels of Pillow's, whatever the sides' parity. A damaged file is
    refused, as Pillow refuses it, and so is a picture of more than MAX_IMAGE_PIXELS (Pillow's own limit
    against decompression bombs).

    An animation (GIF, APNG, animated WebP) gives its first frame, as Pillow's `Image.open` does; an
    animated WebP's first frame is placed on its canvas, black around it where it covers part of it.
    A file that is no picture FFmpeg decodes (an SVG drawing, a PDF, an empty or a text file, whatever its
    name) is refused with what it is.
    """
    from .video import ffmpeg_path

    if str(path) == "":
        raise InputError("the image path is empty")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give an image file")
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    return _decode_image(ffmpeg_path(path), str(path), lambda: path.open("rb"))


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The bytes of an image file (as a service receives an upload) as [H, W, 3] uint8 RGB, decoded as
    `read_image` decodes the file."""
    if not len(data):
        raise InputError("the image bytes are empty")
    data = bytes(data)
    return _decode_image(io.BytesIO(data), f"the image bytes ({len(data):,})", lambda: io.BytesIO(data))


# 8-bit pictures whose chroma has half the width (and for 4:2:0 half the height): JPEG's and lossy
# WebP's usual layouts.
_HALF_WIDTH_CHROMA = ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p")


def _upsample_chroma(plane: np.ndarray, rows: int) -> np.ndarray:
    """A chroma plane at twice its width (and, with `rows` = 2, twice its height), as libjpeg's "fancy"
    upsampling computes it: each output sample weighs the nearer input 3/4 and the farther 1/4 along
    each doubled axis, edges repeated, with libjpeg's integer rounding."""
    c = plane.astype(np.int32)

    def neighbours(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        first, last = np.take(a, [0], axis), np.take(a, [-1], axis)
        before = np.concatenate([first, np.delete(a, -1, axis)], axis)
        after = np.concatenate([np.delete(a, 0, axis), last], axis)
        return before, after

    if rows == 2:  # column sums of 3·nearer + farther rows, 16 times the value once across is done
        above, below = neighbours(c, 0)
        sums = np.empty((2 * c.shape[0], c.shape[1]), np.int32)
        sums[0::2], sums[1::2] = 3 * c + above, 3 * c + below
        shift, bias = 4, (8, 7)
    else:
        sums, shift, bias = c, 2, (1, 2)
    left, right = neighbours(sums, 1)
    out = np.empty((sums.shape[0], 2 * sums.shape[1]), np.int32)
    out[:, 0::2] = (3 * sums + left + bias[0]) >> shift
    out[:, 1::2] = (3 * sums + right + bias[1]) >> shift
    return out.astype(np.uint8)


def _full_chroma(frame: Any) -> Any:
    """A 4:2:0 or 4:2:2 frame as 4:4:4, its chroma doubled exactly and cut to the picture. FFmpeg's scaler
    stretched an odd side's (n + 1) / 2 chroma samples over n pixels, which shifted the colours against
    the brightness across the picture: up to 131 levels off libjpeg on an 833-pixel-wide photo."""
    import av

    height, width = frame.height, frame.width
    luma, *chroma = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes)
    rows = 2 if frame.format.name.endswith("420p") else 1
    full = [_upsample_chroma(c, rows)[:height, :width] for c in chroma]
    out = av.VideoFrame.from_ndarray(np.stack([luma, *full]),
                                     format="yuvj444p" if frame.format.name.startswith("yuvj") else "yuv444p")
    out.color_range, out.colorspace = frame.color_range, frame.colorspace
    return out


def _decode_image(source: str | io.BytesIO, name: str, raw: Callable[[], BinaryIO]) -> np.ndarray:
    """The first picture of `source` (an FFmpeg path or the file's bytes), or of an animated WebP, which
    FFmpeg does not decode; `name` for the errors, `raw` opens the file's bytes to tell what else it is."""
    try:
        return _decode_picture(source, name)
    except InputError as refused:
        try:
            with raw() as f:
                first = _first_webp_frame(f, name)
                f.seek(0)
                what = _describe_non_image(f.read(_SNIFF_BYTES))
        except OSError:  # the file cannot be read again to say more
            raise refused from None
        if first is not None:
            return first
        if what is not None:
            raise InputError(f"{name}: {what}") from None
        raise


_SNIFF_BYTES = 1024


def _describe_non_image(head: bytes) -> str | None:
    """What a file FFmpeg decodes no picture from is, where its first bytes tell: empty, a PDF, an SVG
    drawing (FFmpeg finds it but has no decoder for it), a web page or other text. None when they do not."""
    if not head:
        return "is empty (0 bytes); give a PNG, JPEG or WebP file"
    if head.startswith(b"%PDF-"):
        return "is a PDF document, not an image; export the page as a PNG or JPEG file"
    if re.match(rb"P[1-7FfHh]\s", head) or head.startswith((b"/* XPM */", b"#define ")):
        return None  # Netpbm (PPM, PGM, PAM, PFM), XPM and XBM pictures begin as text: FFmpeg's reason stands
    for cut in range(4):  # the bytes read may end inside a character of up to 4 bytes
        try:
            text = head[:len(head) - cut].decode("utf-8").removeprefix("\ufeff")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if "<svg" in text.lower():
        return "is an SVG drawing (vector graphics), which is not read; render it to a PNG file first"
    if not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    if text.lstrip().startswith("<"):
        return ("is an HTML or XML page (what a server sends back for a failed download), not an image; "
                "download the image again")
    return f"is a text file, not an image (it begins {text.strip()[:40]!r}); give a PNG, JPEG or WebP file"


def _webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(fourcc, payload) of each whole RIFF chunk of `data` (a chunk cut short ends the list)."""
    chunks, at = [], 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at + 4:at + 8], "little")
        if at + 8 + size > len(data):
            break
        chunks.append((data[at:at + 4], data[at + 8:at + 8 + size]))
        at += 8 + size + (size & 1)  # payloads are padded to an even length
    return chunks


def _chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + len(payload).to_bytes(4, "little") + payload + b"\0" * (len(payload) & 1)


def _first_webp_frame(f: BinaryIO, name: str) -> np.ndarray | None:
    """An animated WebP's first frame on its canvas as [H, W, 3] uint8 RGB, as Pillow's (libwebp's)
    animation decoder gives it, alpha dropped; None for a file that is no animated WebP. The frame's
    bitstream is decoded as a still WebP: FFmpeg reads no animation chunks."""
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WEBP":
        return None
    vp8x = f.read(18)  # an animation's first chunk: VP8X, 10 bytes, with the animation flag
    if len(vp8x) < 18 or vp8x[:4] != b"VP8X" or not vp8x[8] & 0x02:
        return None
    damaged = InputError(f"{name}: cannot read the image (a damaged animated WebP); give a PNG, JPEG or WebP file")
    if int.from_bytes(vp8x[4:8], "little") != 10:  # else the canvas size below is read from other bytes
        raise damaged
    canvas_w, canvas_h = 1 + int.from_bytes(vp8x[12:15], "little"), 1 + int.from_bytes(vp8x[15:18], "little")
    if canvas_w * canvas_h > MAX_IMAGE_PIXELS:
        raise InputError(f"{name}: an animated WebP of {canvas_w}x{canvas_h} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS:,} read; scale it down first")
    end = f.seek(0, io.SEEK_END)
    f.seek(12 + 18)
    while True:  # to the first frame (ANIM, ICCP, EXIF chunks before it)
        header = f.read(8)
        if len(header) < 8:
            raise InputError(f"{name}: an animated WebP without a frame (or cut short); give a still image")
        size = int.from_bytes(header[4:], "little")
        if header[:4] == b"ANMF":
            if size > end - f.tell():  # cut short, or a size that lies: read(size) would allocate all of it first
                raise damaged
            frame = f.read(size)
            break
        f.seek(size + (size & 1), io.SEEK_CUR)
    if len(frame) < 16:
        raise damaged
    x, y = (2 * int.from_bytes(frame[i:i + 3], "little") for i in (0, 3))
    width, height = (1 + int.from_bytes(frame[i:i + 3], "little") for i in (6, 9))
    parts = dict(_webp_chunks(frame[16:]))
    if b"VP8L" in parts:  # lossless, alpha inside
        still = _chunk(b"VP8L", parts[b"VP8L"])
    elif b"VP8 " in parts and b"ALPH" in parts:  # lossy with an alpha plane: a still's extended layout
        flags = b"\x10\0\0\0"  # alpha
        size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        still = _chunk(b"VP8X", flags + size) + _chunk(b"ALPH", parts[b"ALPH"]) + _chunk(b"VP8 ", parts[b"VP8 "])
    elif b"VP8 " in parts:
        still = _chunk(b"VP8 ", parts[b"VP8 "])
    else:
        raise damaged
    picture = _decode_picture(io.BytesIO(b"RIFF" + (4 + len(still)).to_bytes(4, "little") + b"WEBP" + still), name)
    if picture.shape[:2] != (height, width) or x + width > canvas_w or y + height > canvas_h:
        raise damaged
    if (x, y, width, height) == (0, 0, canvas_w, canvas_h):
        return picture
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)  # libwebp's canvas starts transparent: black in RGB
    canvas[y:y + height, x:x + width] = picture
    return canvas


def _decode_picture(source: str | io.BytesIO, name: str) -> np.ndarray:
    """The first picture FFmpeg decodes from `source`; `name` for the errors."""
    import av

    # Opening a file decodes its first picture to learn its size: the decoder's own limit (FFmpeg's
    # max_pixels) refuses a larger one before allocating it, where a check of the size afterwards came after
    # the memory was taken (a 123-byte PNG declaring 15000x15000 took 650 MB and seconds).
    limit = {"max_pixels": str(MAX_IMAGE_PIXELS)}
    sized = True
    try:
        with av.open(source, options=limit) as container:
            if not container.streams.video:
                raise InputError(f"{name}: not an image (no picture in it)")
            stream = container.streams.video[0]
            if stream.width * stream.height > MAX_IMAGE_PIXELS:
                raise InputError(f"{name}: a picture of {stream.width}x{stream.height} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS:,} read; scale it down first")
            sized = stream.width * stream.height > 0  # (0 where the decoder refused the picture's size)
            stream.codec_context.options = {"err_detect": "explode", **limit}  # a truncated file is an error
            for frame in container.decode(stream):
                fmt = frame.format.name
                if fmt in _HALF_WIDTH_CHROMA:
                    frame = _full_chroma(frame)
                elif fmt.startswith("yuv") and "444" not in fmt:
                    frame = frame.reformat(format="yuvj444p" if fmt.startswith("yuvj") else "yuv444p",
                                           interpolation="BILINEAR")
                return frame.to_ndarray(format="rgb24")
    except InputError:
        raise
    except Exception as err:  # PyAV raises its own error types for undecodable files
        why = getattr(err, "strerror", None) or str(err)  # without PyAV's "[Errno 1094995529]"
        if not sized and getattr(err, "errno", None) == errno.EINVAL:  # how PyAV reports max_pixels' refusal
            raise InputError(f"{name}: cannot read the image ({why}): a picture of more than the "
                             f"{MAX_IMAGE_PIXELS:,} pixels read, or a damaged file") from None
        raise InputError(f"{name}: cannot read the image ({why}); give a PNG, JPEG or WebP file") from None
    raise InputError(f"{name}: not an image (no picture in it)")


def image_tensor(image: Any) -> torch.Tensor:
    """The input image as [3, H, W] fp32 in [-1, 1] (CPU), as `TF.to_tensor(img).sub_(0.5).div_(0.5)`.

    Accepts: a file path (str, Path or another os.PathLike); the bytes of an image file (bytes,
    bytearray or memoryview); a PIL image (any mode, converted to RGB); a numpy array or torch tensor
    [H, W, 3] uint8; a float torch tensor [3, H, W] in [-1, 1]. Both sides must be at least
    MIN_IMAGE_SIDE (16) pixels.
    """
    if isinstance(image, os.PathLike):  # pathlib's or another library's path, as open() takes them
        image = os.fsdecode(image)  # (a bytes path too: os.DirEntry of scandir(b"."), say)
    where = f"{image}: " if isinstance(image, str) else ""
    if isinstance(image, str):
        image = read_image(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = decode_image(image)
    elif hasattr(image, "convert") and hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        try:  # Pillow reads an opened file's pixels only now: a damaged or closed file fails here
            image = np.array(image.convert("RGB"))
        except (OSError, ValueError) as err:
            raise InputError(f"the PIL image cannot be read ({err}); give an undamaged image") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"a numpy image must be [height, width, 3] uint8 RGB, got shape {image.shape} "
                             f"{image.dtype}")
        image = torch.from_numpy(np.array(image, order="C"))  # a copy: the caller keeps theirs
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image must be a file path, an image file's bytes, a PIL image, numpy array or torch "
                         f"tensor, got {type(image).__name__}")
    check_not_meta(image, "the image tensor")
    if image.dtype == torch.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"a uint8 image tensor must be [height, width, 3] RGB, got {tuple(image.shape)}")
        x = image.detach().to("cpu").permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)  # on the CPU, as floats
    elif image.is_floating_point():
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"a float image tensor must be [3, height, width] in [-1, 1], got "
                             f"{tuple(image.shape)}")
        # A copy: the call reads it after its checks, and the caller may reuse theirs meanwhile.
        x = image.detach().to("cpu", torch.float32, copy=True)
        if x.numel() and (not torch.isfinite(x).all() or x.min() < -1 or x.max() > 1):
            raise InputError("a float image tensor must hold finite values in [-1, 1]")
    else:
        raise InputError(f"image tensor must be uint8 [H, W, 3] or float [3, H, W], got {image.dtype}")
    height, width = x.shape[1:]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InputError(f"{where}image is {width}x{height}; both sides must be at least {MIN_IMAGE_SIDE} pixels")
    return x.contiguous()


# -- sizes and frames ----------------------------------------------------------------------------------


def check_frames(frames: int, time_stride: int = 4) -> int:
    """Frame counts are 4k + 1 (1, 5, ..., 81): the VAE maps the first frame alone, then 4 per latent."""
    if (isinstance(frames, bool) or not isinstance(frames, numbers.Integral) or frames < 1
            or (frames - 1) % time_stride):
        raise InputError(f"frames must be {time_stride}k+1 (1, {time_stride + 1}, ..., {20 * time_stride + 1}), "
                         f"got {frames!r}")
    return int(frames)


def check_size(size: Any, multiple: int = 16) -> tuple[int, int]:
    """An explicit output size (width, height): positive multiples of `multiple` (16: VAE stride 8 ×
    patch 2)."""
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)):
        raise InputError(f"size must be (width, height) in pixels, got {size!r}")
    width, height = int(size[0]), int(size[1])
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise InputError(f"size {width}x{height}: width and height must be positive multiples of {multiple}")
    return width, height


def check_grid(frames: int, height: int, width: int, *, time_stride: int = 4, vae_stride: int = 8,
               patch: tuple[int, int, int] = (1, 2, 2)) -> tuple[int, int, int]:
    """The patch grid (frames, rows, columns) of a video, checked to stay within the RoPE table's
    MAX_POSITIONS along each axis (at most 4093 frames, 16384 pixels a side): larger requests are refused
    before any work instead of failing in the allocator after the encoders ran."""
    latent = latent_shape(frames, height, width, time_stride=time_stride, vae_stride=vae_stride)[1:]
    grid = [n // p for n, p in zip(latent, patch)]
    for axis, n in zip(("frames", "height", "width"), grid):
        if n > MAX_POSITIONS:
            raise InputError(f"a {width}x{height} video of {frames} frames has {n} patch positions along its {axis}; "
                             f"the model's position encoding covers {MAX_POSITIONS}")
    return grid[0], grid[1], grid[2]


def output_size(image_hw: tuple[int, int], area: int = AREA_480P, *, vae_stride: int = 8,
                patch: int = 2) -> tuple[int, int]:
    """(height, width) in pixels of the video for an image of `image_hw` at a pixel `area`:

        lat_h = round(sqrt(area·h0/w0) // 8 // 2 · 2),  lat_w = round(sqrt(area·w0/h0) // 8 // 2 · 2)

    and pixels = 8 · latent. 480×832 at area 480·832 gives 480×832 (latent 60×104), as the pipeline's
    specification states. Computed in exact integer arithmetic (floor(sqrt(q)/8) = isqrt(floor(q/64))):
    the reference evaluates it in floats, where 399360·(480/832) = 230399.99999999997, whose square root
    falls just under 480, so that exact case comes out one patch smaller there (lat_h 58, 464 pixels).
    A few other aspect ratios round so too (13:30, 104:15, 13:120, 735:104, ...); elsewhere the two
    agree."""
    if isinstance(area, bool) or not isinstance(area, numbers.Integral) or area < 1:
        raise InputError(f"area must be a positive number of pixels, got {area!r}")
    area = int(area)
    h0, w0 = image_hw
    lat_h = math.isqrt(area * h0 // (vae_stride ** 2 * w0)) // patch * patch
    lat_w = math.isqrt(area * w0 // (vae_stride ** 2 * h0)) // patch * patch
    if lat_h < patch or lat_w < patch:
        raise InputError(f"an image of {w0}x{h0} at an area of {area} pixels gives a {lat_w * vae_stride}x"
                         f"{lat_h * vae_stride} video; raise the area or use a less extreme aspect ratio")
    return lat_h * vae_stride, lat_w * vae_stride


def latent_shape(frames: int, height: int, width: int, *, channels: int = 16, time_stride: int = 4,
                 vae_stride: int = 8) -> tuple[int, int, int, int]:
    """(C, T, h, w) of the latents of a video: T = (frames − 1)//4 + 1, h = H/8, w = W/8."""
    return channels, (frames - 1) // time_stride + 1, height // vae_stride, width // vae_stride


# -- mask and image latent -------------------------------------------------------------------------------


def frame_mask(frames: int, lat_h: int, lat_w: int, *, time_stride: int = 4) -> torch.Tensor:
    """[time_stride, T, lat_h, lat_w] fp32: ones for latent frame 0, zeros after.

    Built as the reference does: a per-pixel-frame mask (first frame 1, others 0) whose first frame is
    repeated 4 times, so the frames fold by 4 into latent frames, the fold landing in the channels."""
    mask = torch.ones(1, frames, lat_h, lat_w)
    mask[:, 1:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(time_stride, dim=1), mask[:, 1:]], dim=1)
    mask = mask.view(1, mask.shape[1] // time_stride, time_stride, lat_h, lat_w)
    return mask.transpose(1, 2)[0].contiguous()


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, H0, W0] -> [3, height, width]: bicubic, no antialias, no clamp (the reference's F.interpolate)."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False)[0]


def vae_input(image: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, 3, frames, h, w]: the (resized) image as frame 0, then zeros, which is mid grey in [-1, 1]."""
    video = image.new_zeros(1, 3, frames, *image.shape[1:])
    video[0, :, 0] = image
    return video


def image_condition(vae: WanVAE, image: torch.Tensor, frames: int,
                    progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """y = cat[mask(4), normalised VAE latents of the image + grey frames (16)]: [1, 20, T, h, w] fp32.

    `image` is already resized to the output size ([3, H, W] in [-1, 1])."""
    latents = vae.encode(vae_input(image, frames), progress=progress)
    stride = vae.config.time_stride
    mask = frame_mask(frames, *latents.shape[3:], time_stride=stride).to(latents.device)
    return torch.cat([mask[None], latents], dim=1)


# -- encoders ----------------------------------------------------------------------------------------------


def clip_features(clip: CLIPVisionEncoder, image: torch.Tensor) -> torch.Tensor:
    """CLIP features [1, 257, 1280] of the [-1, 1] image at its own size (the encoder resizes to 224
    bicubic without crop, maps to [0, 1] and normalises with CLIP's mean and std)."""
    return clip.encode(image[None])


def check_prompt(tokenizer: Tokenizer, prompt: Any, name: str = "prompt", *, allow_empty: bool = False) -> str:
    """A prompt must be a string, not empty after cleaning (unless allowed), and fit the text encoder's
    text_len − 1 tokens plus EOS. Longer prompts are refused rather than cut short silently (the
    reference truncates); shorten them."""
    if not isinstance(prompt, str):
        raise InputError(f"{name} must be a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: bytes a terminal passed on undecoded
        raise InputError(f"{name} is not valid Unicode (character {err.start}: {prompt[err.start]!r}); "
                         f"give text in UTF-8") from None
    if not allow_empty and not clean_prompt(prompt):
        raise InputError(f"{name} is empty")
    n, limit = tokenizer.count_tokens(prompt), tokenizer.text_len - 1
    if n > limit:
        raise InputError(f"{name} is {n} tokens long; the text encoder takes at most {limit} (plus the end "
                         f"token): shorten it")
    return prompt


def text_features(tokenizer: Tokenizer, t5: T5Encoder, prompt: str) -> torch.Tensor:
    """T5 features [1, L, dim] of a prompt, L = its real length with EOS (the reference's trim).

    The encoder masks padding as keys, so running on the first L tokens gives the same rows as running
    on all text_len and cutting afterwards; the DiT zero-pads back to text_len."""
    ids, mask, lengths = tokenizer(prompt)
    length = int(lengths.max())
    return t5(ids[:, :length], mask[:, :length])
