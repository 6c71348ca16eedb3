"""Video output: H.264 mp4 (yuv420p, 16 fps) and PNG frames written through PyAV and read back."""

import errno
import os
import threading

import numpy as np
import pytest
import torch

from dit8 import InputError
from dit8.testing_vae import random_vae_weights, tiny_vae_config
from dit8.vae import WanVAE
from dit8.video import (FPS, check_output_paths, read_png, read_video, to_uint8_frames, video_to_frames, write_mp4,
                        write_png_frames)


def smooth_frames(frames: int = 17, height: int = 48, width: int = 64) -> np.ndarray:
    """Gradients that move from frame to frame: compress well, so decoded values stay close."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        out[i, ..., 0] = 255 * x
        out[i, ..., 1] = 255 * y
        out[i, ..., 2] = 255 * i / max(frames - 1, 1)
    return out


def test_mp4_round_trip(tmp_path):
    frames = smooth_frames()
    path = write_mp4(tmp_path / "out.mp4", frames)
    video = read_video(path)
    assert (video.num_frames, video.height, video.width) == (17, 48, 64)
    assert video.fps == FPS == 16
    assert (video.codec, video.pix_fmt) == ("h264", "yuv420p")
    assert np.abs(video.frames.astype(int) - frames).mean() < 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no partial file left beside it


def test_mp4_from_float_frames_in_minus_one_to_one(tmp_path):
    frames = torch.from_numpy(smooth_frames(5, 32, 32)).float() / 127.5 - 1
    video = read_video(write_mp4(tmp_path / "f.mp4", frames, fps=8))
    assert (video.num_frames, video.height, video.width, video.fps) == (5, 32, 32, 8)


def test_writers_of_one_path_keep_to_their_own_partial_files(tmp_path):
    # One shared partial name let two writers of one path (threads of a service) write into the same
    # file, and the first to finish removed the other's.
    other = [tmp_path / ".out.mp4.partial", tmp_path / ".out.mp4.99-0123456789ab.partial"]
    for p in other:
        p.write_bytes(b"another writer's")
    assert read_video(write_mp4(tmp_path / "out.mp4", smooth_frames(2, 16, 16))).num_frames == 2
    assert all(p.read_bytes() == b"another writer's" for p in other)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.mp4", *(p.name for p in other)])

    results = {}

    def write(name):
        results[name] = read_video(write_mp4(tmp_path / "same.mp4", smooth_frames(3, 16, 16)))

    threads = [threading.Thread(target=write, args=(name,)) for name in ("a", "bb", "ccc")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and read_video(tmp_path / "same.mp4").num_frames == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".same")]


def test_float_mapping():
    frames = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 5, 1).expand(1, 1, 5, 3)
    assert to_uint8_frames(frames)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert to_uint8_frames(frames.numpy())[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_float_frames_are_refused(tmp_path, bad):
    # A NaN cast to uint8 came out black (numpy warned, torch said nothing).
    frames = torch.zeros(2, 8, 8, 3)
    frames[1, 3, 5, 2] = bad
    for given in (frames, frames.numpy()):
        with pytest.raises(InputError, match="frames hold NaN or Inf values"):
            to_uint8_frames(given)
        with pytest.raises(InputError, match="NaN or Inf"):
            write_mp4(tmp_path / "x.mp4", given)
    assert not list(tmp_path.iterdir())


def test_odd_sizes_are_refused_or_padded(tmp_path):
    frames = smooth_frames(3, 33, 48)
    with pytest.raises(InputError, match="even width and height.*48x33"):
        write_mp4(tmp_path / "odd.mp4", frames)
    assert not list(tmp_path.iterdir())
    video = read_video(write_mp4(tmp_path / "odd.mp4", frames, pad_odd=True))
    assert (video.num_frames, video.height, video.width) == (3, 34, 48)
    # The added row and column repeat the last ones (not black): a white edge stays white.
    edged = np.zeros((1, 33, 47, 3), np.uint8)
    edged[:, -1], edged[:, :, -1] = 255, 255
    padded = read_video(write_mp4(tmp_path / "edge.mp4", edged, pad_odd=True)).frames[0].astype(int)
    assert padded.shape == (34, 48, 3) and padded[33].min() > 200 and padded[:, 47].min() > 200


def test_sides_past_the_encoders_limit_are_refused(tmp_path):
    from dit8.video import MAX_SIDE

    video = read_video(write_mp4(tmp_path / "wide.mp4", np.zeros((1, 2, MAX_SIDE, 3), np.uint8)))
    assert (video.height, video.width) == (2, MAX_SIDE)
    for shape in ((1, 2, MAX_SIDE + 2, 3), (1, MAX_SIDE + 2, 2, 3)):
        with pytest.raises(InputError, match=f"frames of {shape[2]}x{shape[1]}; H.264 takes at most {MAX_SIDE}"):
            write_mp4(tmp_path / "big.mp4", np.zeros(shape, np.uint8))
    assert not (tmp_path / "big.mp4").exists()


def test_a_failure_after_the_frames_were_written_leaves_no_partial_file(tmp_path, monkeypatch):
    import os

    real = os.replace

    def rename_fails(src, dst, *args, **kwargs):
        if str(dst).endswith("x.mp4"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(InputError, match=r"x\.mp4: cannot write: Invalid cross-device link"):
        write_mp4(tmp_path / "x.mp4", smooth_frames(5, 16, 16))
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial


def test_the_index_is_at_the_front_and_the_default_quality_is_crf_18(tmp_path):
    # README: the mp4 is written at CRF 18; write_mp4: its index (moov) precedes the frames (mdat), so it
    # plays while downloading. x264 records its settings in the stream.
    data = write_mp4(tmp_path / "x.mp4", smooth_frames(3, 16, 16)).read_bytes()
    assert -1 < data.find(b"moov") < data.find(b"mdat")
    if b"x264" in data:
        assert b" crf=18.0 " in data
        assert b" crf=10.0 " in write_mp4(tmp_path / "y.mp4", smooth_frames(3, 16, 16), crf=10).read_bytes()


def test_an_upper_case_mp4_name_is_taken(tmp_path):
    check_output_paths(tmp_path / "OUT.MP4")
    assert read_video(write_mp4(tmp_path / "OUT.MP4", smooth_frames(1, 16, 16))).num_frames == 1


@pytest.mark.parametrize("frames, words", [(np.zeros((4, 8, 8), np.uint8), "frames, height, width, 3"),
                                           (np.zeros((2, 8, 8, 4), np.uint8), "frames, height, width, 3"),
                                           (np.zeros((2, 8, 8, 3), np.int32), "uint8 or float"),
                                           (np.zeros((0, 8, 8, 3), np.uint8), "frames, height, width, 3"),
                                           (np.zeros((2, 0, 8, 3), np.uint8), "frames, height, width, 3")])
def test_bad_frames(tmp_path, frames, words):
    with pytest.raises(InputError, match=words):
        write_mp4(tmp_path / "x.mp4", frames)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_meta_tensor_frames_are_refused_by_name(tmp_path, dtype):
    frames = torch.zeros(2, 16, 16, 3, dtype=dtype, device="meta")
    for write in (lambda: write_mp4(tmp_path / "x.mp4", frames), lambda: write_png_frames(tmp_path / "f", frames)):
        with pytest.raises(InputError, match="^frames is a meta tensor, which holds no values"):
            write()
    assert list(tmp_path.iterdir()) == []


def test_png_frames(tmp_path):
    frames = smooth_frames(3, 20, 30)
    paths = write_png_frames(tmp_path / "frames", frames)
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [p.name for p in paths]
    for path, frame in zip(paths, frames):
        assert np.array_equal(read_png(path), frame)  # lossless


def test_writers_into_one_frames_folder_keep_to_their_own_probes(tmp_path):
    # The folder's write probe had one name per process: a second thread of a service saving frames
    # into the same folder found it taken ("File exists"), or the first removed it from under it.
    other = tmp_path / f".dit8-probe-{os.getpid()}"  # another writer's probe, in flight
    other.write_bytes(b"")
    (path,) = write_png_frames(tmp_path, smooth_frames(1, 16, 16), prefix="a_")
    assert path.name == "a_00000.png" and other.exists()
    other.unlink()

    errors = []

    def write(name):
        for i in range(20):
            try:
                write_png_frames(tmp_path, smooth_frames(1, 16, 16), prefix=f"{name}{i}_")
            except InputError as err:
                errors.append(str(err))

    threads = [threading.Thread(target=write, args=(name,)) for name in "bcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a_00000.png", *(f"{name}{i}_00000.png" for name in "bcd" for i in range(20))])


def test_writers_into_one_new_frames_folder_do_not_remove_it_from_under_each_other(tmp_path, monkeypatch):
    # The check removed the new folder it had made for its probe, and the write made it again: another
    # writer that found the folder in that gap failed ("No such file or directory", or "File exists"
    # from its own mkdir).
    from pathlib import Path

    removed, rmdir = [], Path.rmdir

    def recorded(self):
        removed.append(self)
        rmdir(self)

    monkeypatch.setattr(Path, "rmdir", recorded)
    (path,) = write_png_frames(tmp_path / "new" / "frames", smooth_frames(1, 16, 16))
    assert removed == [] and path.is_file()
    monkeypatch.undo()

    errors = []
    for n in range(30):
        start = threading.Barrier(3)

        def write(name, n=n, start=start):
            start.wait()
            try:
                write_png_frames(tmp_path / str(n) / "frames", smooth_frames(1, 16, 16), prefix=name)
            except InputError as err:
                errors.append(str(err))

        threads = [threading.Thread(target=write, args=(name,)) for name in "abc"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert all(len(list((tmp_path / str(n) / "frames").iterdir())) == 3 for n in range(30))


def test_a_frame_that_cannot_be_written_names_its_file_and_leaves_nothing(tmp_path, monkeypatch):
    from pathlib import Path

    real = Path.write_bytes

    def disk_full_at_the_second(self, data):
        if "00001" in self.name:
            real(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_at_the_second)
    with pytest.raises(InputError, match=r"frame_00001\.png: cannot write: No space left on device"):
        write_png_frames(tmp_path, smooth_frames(3, 20, 30))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_00000.png"]  # whole, and nothing partial


def test_long_names_the_file_system_takes_are_written(tmp_path):
    """A 230-byte name is legal: its partial file, written first, must be too (it had ~30 bytes more)."""
    path = tmp_path / ("v" * 226 + ".mp4")
    check_output_paths(path)
    assert read_video(write_mp4(path, smooth_frames(1, 16, 16))).num_frames == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    (frame,) = write_png_frames(tmp_path / "frames", smooth_frames(1, 16, 16), prefix="p" * 240)
    assert frame.name == "p" * 240 + "00000.png"
    with pytest.raises(InputError, match="the frames' file names would be longer than 255 bytes"):
        write_png_frames(tmp_path / "more", smooth_frames(1, 16, 16), prefix="p" * 247)  # 256 bytes
    assert not (tmp_path / "more").exists()  # refused before the folder was made


def test_file_names_are_not_taken_for_protocols(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bare relative names: FFmpeg read "run-1:30" as a protocol
    frames = smooth_frames(3)
    assert read_video(write_mp4("run-1:30.mp4", frames)).frames.shape == frames.shape


def test_unreadable_videos_are_input_errors(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    for path, message in [(tmp_path / "missing.mp4", "cannot read the video"),
                          (tmp_path / "notes.mp4", "cannot read the video")]:
        with pytest.raises(InputError, match=f"{path.name}: {message}"):
            read_video(path)


def test_decoded_video_to_mp4(tmp_path):
    """The VAE's output layout [1, 3, F, H, W] in [-1, 1] goes to a file with 4k+1 frames."""
    vae = WanVAE.from_state_dict(random_vae_weights(tiny_vae_config(dim=4), seed=1))
    decoded = vae.decode(torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(0)))
    frames = video_to_frames(decoded)
    assert frames.shape == (9, 16, 32, 3) and frames.dtype == np.uint8
    video = read_video(write_mp4(tmp_path / "decoded.mp4", frames))
    assert (video.num_frames, video.height, video.width, video.fps) == (9, 16, 32, 16)
    with pytest.raises(InputError, match="3, frames, height, width"):
        video_to_frames(decoded[0, :2])
    with pytest.raises(InputError, match="3, frames, height, width"):  # one video, not its first of two
        video_to_frames(torch.cat([decoded, decoded]))


def test_output_paths_are_refused_before_any_frame(tmp_path, monkeypatch):
    check_output_paths(tmp_path / "ok.mp4", tmp_path / "frames")  # neither exists yet: fine
    (tmp_path / "taken.png").write_bytes(b"")
    for mp4, frames_dir, message in [(tmp_path, None, "is a folder"), (tmp_path / "x.avi", None, "ending in .mp4"),
                                     (tmp_path / "no" / "x.mp4", None, "does not exist"),
                                     (None, tmp_path / "taken.png", "is not a folder")]:
        with pytest.raises(InputError, match=message):
            check_output_paths(mp4, frames_dir)
    with pytest.raises(InputError, match="does not exist"):
        write_mp4(tmp_path / "no" / "x.mp4", smooth_frames(1))
    with monkeypatch.context() as patched:  # (root may write anywhere: the permission is simulated)
        patched.setattr("dit8.video.os.access", lambda path, mode: False)
        with pytest.raises(InputError, match="is not writable"):
            check_output_paths(tmp_path / "ok.mp4")
    with monkeypatch.context() as patched:  # permitted, yet the file system refuses (a read-only mount)
        def refuse(self, mode="r", *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        patched.setattr("dit8.video.Path.open", refuse)
        with pytest.raises(InputError, match=r"ok\.mp4: cannot write in .*: Read-only file system"):
            check_output_paths(tmp_path / "ok.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]
    assert read_video(write_mp4(tmp_path / "x.m4v", smooth_frames(1))).num_frames == 1  # mp4 inside
    with pytest.raises(InputError, match=r"x\.avi: an H\.264 mp4 goes in a file named \.mp4"):
        write_mp4(tmp_path / "x.avi", smooth_frames(1))


@pytest.mark.parametrize("setting", [dict(crf=-1), dict(crf=52), dict(crf=None), dict(crf=18.0), dict(fps=0),
                                     dict(fps=True)])
def test_bad_encoder_settings(tmp_path, setting):
    name = next(iter(setting))
    with pytest.raises(InputError, match=f"{name} must be an integer from"):
        write_mp4(tmp_path / "x.mp4", smooth_frames(1), **setting)
    assert list(tmp_path.iterdir()) == []


def test_video_files_compare_as_objects(tmp_path):
    path = write_mp4(tmp_path / "x.mp4", smooth_frames(2))
    a, b = read_video(path), read_video(path)
    assert a == a and a != b and len({a, b}) == 2


def test_numpy_integers_are_taken_as_settings(tmp_path):
    video = read_video(write_mp4(tmp_path / "x.mp4", smooth_frames(2), fps=np.int64(8), crf=np.int32(18)))
    assert (video.num_frames, video.fps) == (2, 8)


def test_frame_folders_that_cannot_be_written(tmp_path):
    (tmp_path / "taken.png").write_bytes(b"")
    for folder in (tmp_path / "taken.png" / "frames", tmp_path / "taken.png" / "a" / "b"):
        with pytest.raises(InputError, match=f"{folder}: cannot write the PNG frames there: Not a directory"):
            check_output_paths(frames_dir=folder)
    check_output_paths(frames_dir=tmp_path / "new" / "frames")  # made to try, and removed again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]
    for prefix in ("a/b", "..", "/abs"):
        with pytest.raises(InputError, match="start of a file name"):
            write_png_frames(tmp_path / "frames", smooth_frames(1), prefix=prefix)


def test_empty_or_untyped_output_paths_are_refused(tmp_path, monkeypatch):
    """An empty path is the current folder to pathlib: save_frames("") wrote the PNGs there."""
    monkeypatch.chdir(tmp_path)
    frames = smooth_frames(1)
    for call, message in [(lambda: write_png_frames("", frames), "the frames folder is empty"),
                          (lambda: check_output_paths(frames_dir=""), "the frames folder is empty"),
                          (lambda: write_mp4("", frames), "the video path is empty"),
                          (lambda: check_output_paths(""), "the video path is empty"),
                          (lambda: write_mp4(3, frames), "the video path must be a path .*, got int"),
                          (lambda: write_png_frames(None, frames), "the frames folder must be a path .*, got NoneType"),
                          (lambda: write_png_frames("f", frames, prefix=3), "prefix must be a str, got int"),
                          # Null bytes: the OS calls raised "embedded null byte", naming no argument.
                          (lambda: write_png_frames("f", frames, prefix="\x00"), "prefix '\\\\x00': holds a null byte"),
                          (lambda: write_png_frames("f", frames, prefix="a\x00b"), "prefix 'a\\\\x00b': holds a null"),
                          (lambda: write_png_frames("f\x00g", frames), "the frames folder 'f\\\\x00g' holds a null"),
                          (lambda: check_output_paths(frames_dir="f\x00"), "the frames folder .* holds a null byte"),
                          (lambda: write_mp4("x\x00.mp4", frames), "the video path 'x\\\\x00.mp4' holds a null byte"),
                          (lambda: check_output_paths("x\x00.mp4"), "the video path .* holds a null byte")]:
        with pytest.raises(InputError, match=message):
            call()
    assert list(tmp_path.iterdir()) == []
