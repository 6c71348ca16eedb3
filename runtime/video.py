"""Video output: frames to an H.264 mp4 (yuv420p, 16 fps, what players and browsers expect) and to
numbered PNG files, and reading both back (used by the tests).

Everything goes through PyAV (`av`): its wheels carry their own FFmpeg with libx264, so no system
ffmpeg is needed. PNGs are made by FFmpeg's png encoder through the same library (lossless 8-bit RGB),
so one media dependency covers both outputs and Pillow is not needed.

Frames are [F, H, W, 3] RGB, either uint8 or float in [-1, 1] (the VAE's range, mapped by
round((x + 1) · 127.5)); `video_to_frames` turns the VAE's [3, F, H, W] output into that layout.
yuv420p stores colour at half resolution, so H.264 needs even width and height: odd sizes are refused
unless `pad_odd=True`, which repeats the last row/column (Wan sizes are multiples of 16, so the
pipeline never hits this). Sides above MAX_SIDE (16384, libx264's limit) are refused.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from .devices import check_not_meta
from .errors import InputError

__all__ = ["FPS", "VideoFile", "check_output_paths", "read_png", "read_video", "to_uint8_frames",
           "video_to_frames", "write_mp4", "write_png_frames"]

FPS = 16  # Wan2.1's frame rate
H264_ENCODERS = ("libx264", "libopenh264")
MAX_SIDE = 16384  # libx264 refuses wider or taller pictures (and the pipeline makes none larger)


def ffmpeg_path(path: str | Path) -> str:
    """`path` as FFmpeg should open it: as a file, whatever its name (FFmpeg would read "x:1.mp4" as the
    protocol "x")."""
    return "file:" + os.fspath(path)


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """[F, H, W, 3] uint8, or float in [-1, 1] (clamped), as a numpy uint8 array of the same shape."""
    if isinstance(frames, torch.Tensor):
        check_not_meta(frames, "frames")
        t = frames.detach()
        if t.is_floating_point():
            _check_finite(bool(torch.isfinite(t).all()))
            t = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames = t.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InputError(f"frames must be [frames, height, width, 3] RGB, got shape {frames.shape}")
    if np.issubdtype(frames.dtype, np.floating):
        _check_finite(bool(np.isfinite(frames).all()))
        frames = np.round((np.clip(frames, -1, 1) + 1) * 127.5).astype(np.uint8)
    elif frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 or float in [-1, 1], got {frames.dtype}")
    return np.ascontiguousarray(frames)


def _check_finite(finite: bool) -> None:
    # NaN has no colour: cast to uint8 it becomes black (or whatever the platform's cast makes of it).
    if not finite:
        raise InputError("frames hold NaN or Inf values; float frames must be finite, in [-1, 1]")


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """The VAE's output for one video, [3, F, H, W] or [1, 3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    if video.ndim == 5 and video.shape[0] == 1:
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise InputError(f"expected a video [3, frames, height, width] (or with a batch of 1), "
                         f"got shape {tuple(video.shape)}")
    return to_uint8_frames(video.permute(1, 2, 3, 0))


def _even(frames: np.ndarray, pad_odd: bool) -> np.ndarray:
    h, w = frames.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return frames
    if not pad_odd:
        raise InputError(f"H.264 in yuv420p needs an even width and height, the frames are {w}x{h}; crop "
                         f"them, or pass pad_odd=True to repeat the last row/column")
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _h264_encoder() -> str:
    for name in H264_ENCODERS:
        if name in av.codecs_available:
            return name
    raise RuntimeError(f"this PyAV build has no H.264 encoder ({' or '.join(H264_ENCODERS)})")


def _as_path(path: object, what: str) -> Path:
    """`path` (a str or os.PathLike) as a Path; InputError naming `what` for another type or an empty
    path, which pathlib reads as the current folder (the PNG frames would land there)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"the {what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if not os.fspath(path):
        raise InputError(f"the {what} is empty")
    if "\x00" in str(Path(path)):  # (the OS call raised "embedded null byte", naming no argument)
        raise InputError(f"the {what} {str(path)!r} holds a null byte, which no file name can")
    return Path(path)


def _check_file_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the video file's name")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise InputError(f"{path}: its folder {path.parent} {what}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: its folder {path.parent} is not writable")
    probe = _partial(path)  # permissions are not the whole story (read-only mounts, /proc, quotas)
    try:
        probe.open("xb").close()
    except OSError as err:
        raise InputError(f"{path}: cannot write in {path.parent}: {err.strerror or err}") from None
    _remove(probe)


_NAME_MAX = 255  # bytes of a file name (Linux, macOS)


def _partial(path: Path) -> Path:
    """Where a file is written before it is renamed into place: a name of its own for each write, so two
    writers of one path (threads of a service, two processes) never write into, or remove, each other's."""
    # The start of the name only: a name the file system takes may not take ~30 more bytes.
    return path.with_name(f".{path.name[:32]}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")


def _remove(partial: Path) -> None:
    """Removes a partial file if it is there; a failure to (the folder gone) must not hide why the write
    stopped."""
    with contextlib.suppress(OSError):
        partial.unlink()


def _check_folder_path(folder: Path, *, keep: bool = False) -> None:
    """InputError where the PNG frames cannot be written into `folder`. keep: leave the folders made for
    the try when it succeeds (the frames are written next)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder (the PNG frames go into a folder)")
    # Tried, not predicted: a file on the way, a read-only mount or /proc only show when writing. The
    # folders made for the try are removed again, so a refused or failed run leaves none behind.
    made = [d for d in (folder, *folder.parents) if not d.exists()]
    written = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A name of its own for each try: two writers into one folder (threads of a service saving
        # their videos' frames) would otherwise take or remove each other's probe.
        probe = folder / f".dit8-probe-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        probe.open("xb").close()
        probe.unlink()
        written = True
    except OSError as err:
        raise InputError(f"{folder}: cannot write the PNG frames there: {err.strerror or err}") from None
    finally:
        # (Kept where the frames follow: removed, an empty folder that another writer (a thread of a
        # service saving into the same new folder) had just found there vanished from under it.)
        for d in made if not (keep and written) else ():  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()


def check_output_paths(mp4: str | Path | None = None, frames_dir: str | Path | None = None) -> None:
    """InputError, naming the path, where the video `mp4` (a name ending in .mp4) or the PNG folder
    `frames_dir` cannot be written, known before any frame exists: lets a command refuse before
    minutes of generation."""
    if mp4 is not None:
        _check_file_path(_as_path(mp4, "video path"))
        if Path(mp4).suffix.lower() != ".mp4":
            raise InputError(f"{mp4}: the output is an H.264 .mp4 file; give a name ending in .mp4")
    if frames_dir is not None:
        _check_folder_path(_as_path(frames_dir, "frames folder"))


# Names an mp4 file may have (the container's own, and the names players accept it under).
MP4_SUFFIXES = (".mp4", ".m4v", ".mov")


def write_mp4(path: str | Path, frames: torch.Tensor | np.ndarray, *, fps: int = FPS, crf: int = 18,
              pad_odd: bool = False) -> Path:
    """Write frames as an H.264 mp4, yuv420p, constant `fps`, quality `crf` (x264's scale: 0 lossless,
    18 visually lossless, 23 its default). The file appears complete or not at all (it is written
    beside and renamed), and its index is at the front so it plays while downloading."""
    path = _as_path(path, "video path")
    _check_file_path(path)
    if path.suffix.lower() not in MP4_SUFFIXES:
        raise InputError(f"{path}: an H.264 mp4 goes in a file named {' or '.join(MP4_SUFFIXES)}")
    for name, value, low, high in (("fps", fps, 1, 1000), ("crf", crf, 0, 51)):
        # numbers.Integral: numpy's integers too, as the pipeline takes them
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
            raise InputError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    fps, crf = int(fps), int(crf)
    frames = _even(to_uint8_frames(frames), pad_odd)
    _, height, width, _ = frames.shape
    if max(height, width) > MAX_SIDE:  # otherwise the encoder fails to open with FFmpeg's "Generic error"
        raise InputError(f"{path}: frames of {width}x{height}; H.264 takes at most {MAX_SIDE} pixels a side")
    partial = _partial(path)
    try:
        with av.open(ffmpeg_path(partial), mode="w", format="mp4", container_options={"movflags": "+faststart"}) as out:
            stream = out.add_stream(_h264_encoder(), rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.time_base = Fraction(1, fps)
            stream.options = {"crf": str(crf)}
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))  # flush the encoder's delayed frames
        os.replace(partial, path)
    except OSError as err:  # the disk filled, or the folder went away, while writing
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        _remove(partial)
    return path


def write_png_frames(folder: str | Path, frames: torch.Tensor | np.ndarray, *,
                     prefix: str = "frame_") -> list[Path]:
    """Write each frame as `folder/{prefix}{index}.png` (index zero-padded to at least 5 digits, from 0),
    8-bit RGB; returns the paths in order."""
    folder = _as_path(folder, "frames folder")
    if not isinstance(prefix, str):
        raise InputError(f"prefix must be a str, got {type(prefix).__name__}")
    if "\x00" in prefix:  # (the OS call raised "embedded null byte", naming no argument)
        raise InputError(f"prefix {prefix!r}: holds a null byte, which no file name can")
    if Path(prefix).name != prefix or prefix in (".", ".."):
        raise InputError(f"prefix {prefix!r}: must be the start of a file name, without folders")
    frames = to_uint8_frames(frames)
    digits = max(5, len(str(len(frames) - 1)))
    if len(os.fsencode(f"{prefix}{0:0{digits}d}.png")) > _NAME_MAX:
        raise InputError(f"prefix {prefix!r}: the frames' file names would be longer than {_NAME_MAX} bytes")
    _check_folder_path(folder, keep=True)
    paths = []
    for i, rgb in enumerate(frames):
        codec = av.CodecContext.create("png", "w")
        codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        packets = codec.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")) + codec.encode(None)
        path = folder / f"{prefix}{i:0{digits}d}.png"
        partial = _partial(path)
        try:
            partial.write_bytes(b"".join(bytes(p) for p in packets))
            os.replace(partial, path)  # a frame is there whole or not at all
        except OSError as err:  # the disk filled, or the folder went away, while writing
            raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
        finally:
            _remove(partial)
        paths.append(path)
    return paths


class FramesShape:
    """`num_frames`, `height` and `width` of a `frames` array or tensor laid out [F, H, W, 3]."""

    frames: np.ndarray | torch.Tensor

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]


@dataclass(frozen=True, eq=False)  # compared as objects: the generated == compared numpy arrays, and raised
class VideoFile(FramesShape):
    """A video read back: frames [F, H, W, 3] uint8 RGB and what the file says about itself."""

    frames: np.ndarray
    fps: float
    codec: str
    pix_fmt: str


def read_video(path: str | Path) -> VideoFile:
    """Decode every frame of the first video stream of `path` to RGB."""
    try:
        with av.open(ffmpeg_path(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path}: no video stream in it")
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            fps = float(stream.average_rate) if stream.average_rate else float("nan")
            codec, pix_fmt = stream.codec_context.name, stream.codec_context.pix_fmt
    except InputError:
        raise
    except Exception as err:  # PyAV's own error types, for a missing or undecodable file
        raise InputError(f"{path}: cannot read the video ({getattr(err, 'strerror', None) or err})") from None
    if not frames:
        raise InputError(f"{path}: no video frames")
    return VideoFile(np.stack(frames), fps, codec, pix_fmt)


def read_png(path: str | Path) -> np.ndarray:
    """One PNG as [H, W, 3] uint8 RGB."""
    return read_video(path).frames[0]
