"""The dit8 command line: info, generate, demo, and one-line errors without tracebacks."""

import argparse
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from dit8.cli import build_parser, main
from dit8.testing import random_weights, tiny_config, write_checkpoint
from dit8.testing_pipeline import write_tiny_model_folder
from dit8.video import read_video, write_png_frames


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dit8", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config("i2v")
    return write_checkpoint(random_weights(config), tmp_path_factory.mktemp("c") / "m", layout="diffusers",
                            fmt="sharded", config=config)


def test_info_describes_the_checkpoint(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    config = tiny_config("i2v")
    params = sum(v.numel() for v in random_weights(config).values())
    for expected in ("diffusers", "i2v", "dim 256", "heads 2 x 128", f"{params:,}", "float32", "(3 files)"):
        assert expected in out, expected


def test_info_escapes_unprintable_metadata(tmp_path, capsys):
    # A newline in a value printed a forged line; an escape sequence reached the terminal.
    from safetensors.torch import save_file

    config = tiny_config("i2v")
    path = tmp_path / "m.safetensors"
    save_file(random_weights(config), str(path), metadata={"note": "ok\nmeta        forged = 1\x1b[2J", "é": "ü"})
    assert main(["info", str(path)]) == 0
    meta = [line for line in capsys.readouterr().out.splitlines() if line.startswith("meta")]
    assert meta == ["meta        note = ok\\nmeta        forged = 1\\x1b[2J", "meta        é = ü"]


def test_info_json(checkpoint, capsys):
    assert main(["info", str(checkpoint), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "diffusers" and summary["config"]["num_layers"] == 2
    assert sum(summary["tensors_by_dtype"].values()) == len(random_weights(tiny_config("i2v")))


def test_info_counts_parameters_not_scales(tmp_path, capsys):
    from dit8.converters import convert

    config = tiny_config("i2v")
    src = write_checkpoint(random_weights(config), tmp_path / "m.safetensors", config=config)
    packed = convert(src, tmp_path / "q.safetensors", scheme="int8", progress=False).output
    counts = []
    for path in (src, packed):
        assert main(["info", str(path), "--json"]) == 0
        counts.append(json.loads(capsys.readouterr().out)["parameters"])
    assert counts[0] == counts[1] == sum(v.numel() for v in random_weights(config).values())


@pytest.mark.parametrize("make_bad", ["missing", "corrupt"])
def test_errors_are_one_line_without_traceback(tmp_path, make_bad):
    path = tmp_path / "m.safetensors"
    if make_bad == "corrupt":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    result = run_cli("info", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr


def test_usage_error_exits_non_zero():
    result = run_cli("info")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_convert_whose_progress_cannot_be_shown_still_converts(checkpoint, tmp_path, monkeypatch, capsys):
    """stderr's reader gone (`dit8 convert ... 2>&1 | head`): the bar's last line failed, and the
    finished conversion was thrown away as 'cannot write the output (Broken pipe)'."""
    class GonePipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", GonePipe())
    dst = tmp_path / "q.safetensors"
    assert main(["convert", str(checkpoint), str(dst), "--scheme", "int8"]) == 0
    assert dst.is_file() and f"wrote {dst}" in capsys.readouterr().out


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal: progress bars draw on it by default."""

    def isatty(self) -> bool:
        return True


def test_every_command_takes_quiet():
    """A script passes -q to each command alike, also to those that print nothing on stderr anyway."""
    parser = build_parser()
    for argv in (["info", "x"], ["convert", "a", "b"], ["compare", "a", "b"], ["demo"],
                 ["generate", "--model", "m", "--image", "i", "--prompt", "p", "--out", "o.mp4"], ["bench", "dit"]):
        assert parser.parse_args(argv).quiet is False
        assert parser.parse_args([*argv, "-q"]).quiet is True
        assert parser.parse_args([*argv, "--quiet"]).quiet is True


def test_quiet_convert_and_compare_leave_stderr_to_errors(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    dst = tmp_path / "q.safetensors"
    assert main(["convert", str(checkpoint), str(dst), "--scheme", "int8"]) == 0
    assert "converting" in sys.stderr.getvalue()  # the bar, without -q
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(["convert", str(checkpoint), str(dst), "--scheme", "int8", "--force", "-q"]) == 0
    assert sys.stderr.getvalue() == ""
    assert f"wrote {dst}" in capsys.readouterr().out  # the report stays
    compare = ["compare", str(checkpoint), str(dst), "--frames", "1", "--size", "32x32", "--device", "cpu"]
    assert main(compare) == 0
    assert "loading" in sys.stderr.getvalue()  # each model's loading bar, on a terminal
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main([*compare, "--quiet"]) == 0
    assert sys.stderr.getvalue() == ""
    assert "all steps" in capsys.readouterr().out
    # Errors still print.
    assert main(["convert", str(checkpoint), str(dst), "-q"]) == 1
    assert sys.stderr.getvalue().startswith("dit8: error: ")


def test_quiet_bench_prints_no_progress_messages(capsys):
    bench = ["bench", "dit", "--device", "cpu", "--repeat", "1", "--steps", "0"]
    assert main(bench) == 0
    assert "dit8 bench dit: warm-up" in capsys.readouterr().err
    assert main([*bench, "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "forward" in captured.out


@pytest.mark.parametrize("flag", ["--keep", "--lora"])
def test_empty_convert_arguments_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "src.safetensors", "dst.safetensors", flag, ""])
    assert exit_.value.code == 2 and f"argument {flag}: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--image", "i.png", "--prompt", "a cat", "--out", "o.mp4", "--frames-dir", ""],
    ["generate", "--model", "", "--image", "i.png", "--prompt", "a cat", "--out", "o.mp4"],
    ["generate", "--model", "m", "--image", "i.png", "--prompt", "a cat", "--out", " "],
    ["generate", "--model", "m", "--image", "", "--prompt", "a cat", "--out", "o.mp4"],
    ["generate", "--model", "m", "--image", "i.png", "--prompt", "a cat", "--out", "o.mp4", "--dit", ""],
    ["demo", "--frames-dir", ""],
    ["demo", "--out", ""],
    ["bench", "dit", "--json", ""],
])
def test_empty_paths_are_usage_errors_naming_the_flag(argv, capsys, tmp_path, monkeypatch):
    """An empty path is the current folder to pathlib: --frames-dir "" wrote the PNGs there."""
    monkeypatch.chdir(tmp_path)
    flag = argv[[i for i, a in enumerate(argv) if not a.strip()][0] - 1]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and f"argument {flag}: must not be empty" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("size", ["832x", "x480", "832xabc", "abcx480", "832*480", "832x-480", "832"])
@pytest.mark.parametrize("command", [["generate", "--model", "m", "--image", "i.png", "--prompt", "a cat", "--out",
                                      "o.mp4"], ["bench", "dit"]])
def test_a_size_that_is_not_width_x_height_is_a_usage_error(command, size, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--size", size])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --size: size must be WIDTHxHEIGHT, e.g. 832x480, got {size!r}" in err


def test_demo_runs_the_whole_pipeline(capsys, tmp_path):
    out_path = tmp_path / "demo.mp4"
    assert main(["demo", "--out", str(out_path), "--frames-dir", str(tmp_path / "frames")]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert "finite True" in out
    video = read_video(out_path)
    assert (video.num_frames, video.width, video.height, video.fps, video.codec) == (9, 80, 48, 16.0, "h264")
    assert len(list((tmp_path / "frames").glob("*.png"))) == 9


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return write_tiny_model_folder(tmp_path_factory.mktemp("f") / "model", kind="distill_models", vae_dim=4)


def test_generate_writes_the_video_and_a_summary(model_folder, tmp_path, capsys):
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    (png,) = write_png_frames(tmp_path, image[None])
    out_path = tmp_path / "out.mp4"
    assert main(["generate", "--model", str(model_folder), "--image", str(png), "--prompt", "a cat walks",
                 "--out", str(out_path), "--frames", "5", "--area", "1536", "--seed", "3", "--device", "cpu",
                 "--frames-dir", str(tmp_path / "frames")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for expected in ("distill_models, distilled", "dit         distill_models/distill_model.safetensors",
                     "5 frames 48x32 at 16 fps", "distilled, 4 steps, guidance 1, shift 5, seed 3",
                     "vae encode", "s/step", "peak", "5 PNGs"):
        assert expected in out, expected
    # Progress bars (stderr is not a terminal here: one line per stage, loading the DiT too).
    assert [line.split()[0] for line in captured.err.splitlines()] == ["loading", "encode", "denoise", "decode"]
    video = read_video(out_path)
    assert (video.num_frames, video.width, video.height) == (5, 48, 32)


def test_quiet_generate_leaves_stderr_to_errors(model_folder, tmp_path, capsys, monkeypatch):
    """--quiet: no bars, neither on a terminal nor in a log (where each bar writes its last line)."""
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    (png,) = write_png_frames(tmp_path, image[None])
    argv = ["generate", "--model", str(model_folder), "--image", str(png), "--prompt", "a cat walks", "--out",
            str(tmp_path / "out.mp4"), "--frames", "1", "--area", "1536", "--device", "cpu", "-q"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "video       1 frames" in captured.out
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(argv) == 0
    assert sys.stderr.getvalue() == ""


def test_a_log_of_both_streams_has_the_report_in_order(model_folder, tmp_path):
    """`dit8 generate > log 2>&1`: stdout, redirected, was buffered in blocks, so the log had the load's
    summary after the last progress line of stderr (and a killed process lost it)."""
    import os

    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    (png,) = write_png_frames(tmp_path, image[None])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-m", "dit8", "generate", "--model", str(model_folder), "--image",
                           str(png), "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"), "--frames", "1",
                           "--area", "1536", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout
    firsts = [line.split()[0] for line in done.stdout.splitlines()]
    assert firsts.index("loaded") < firsts.index("encode") < firsts.index("denoise") < firsts.index("video"), firsts


def test_generate_options(model_folder, tmp_path, capsys):
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    (png,) = write_png_frames(tmp_path, image[None])
    assert main(["generate", "--model", str(model_folder), "--image", str(png), "--prompt", "a cat",
                 "--out", str(tmp_path / "o.mp4"), "--frames", "1", "--size", "32x16", "--sampler", "unipc",
                 "--steps", "2", "--guidance", "2", "--shift", "4", "--scheme", "bf16", "--attention", "bf16",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "1 frames 32x16" in out and "unipc, 2 steps, guidance 2, shift 4" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "nowhere"], "nowhere: no such model folder"),
    (["--model", "frame_00000.png"], "frame_00000.png: neither a model folder nor a DiT checkpoint"),
    (["--image", "missing.png"], "missing.png: image file not found"),
    (["--size", "33x16"], "multiples of 16"),
    (["--size", "16400x16"], "a 16400x16 video of 81 frames has 1025 patch positions along its width"),
    (["--area", "3840", "--frames", "4097"], "video of 4097 frames has 1025 patch positions along its frames"),
    (["--frames", "4"], "dit8: error: --frames must be 4k+1"),
    # Past the tiny model's 2^23 tokens for the Triton kernels' 32-bit offsets, which torch cannot take in 8 bits.
    (["--attention", "int8", "--backend", "triton", "--frames", "257", "--size", "8192x4096"],
     "a 8192x4096 video of 257 frames has 8,519,680 tokens; the model's self-attention (int8"),
    (["--image", "."], ".: is a folder; give an image file"),
    (["--scheme", "int8"], "no int8 DiT found"),
    (["--prompt", " ".join(["cat"] * 600)], "--prompt is 600 tokens long"),
    (["--negative-prompt", " ".join(["cat"] * 600)], "--negative-prompt is 600 tokens long"),
    # Not distilled: the unipc sampler by default, which has no re-noising rule.
    (["--base", "--update", "renoise"], "--update renoise is the distilled sampler's step rule; the unipc"),
])
def test_generate_errors_are_one_line(model_folder, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    base = {"--model": str(model_folder), "--image": str(write_png_frames(tmp_path, image[None])[0]),
            "--prompt": "a cat", "--out": str(tmp_path / "o.mp4")}
    argv = ["generate", *[x for k, v in base.items() if k not in args for x in (k, v)], *args, "--device", "cpu"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("dit8: error: ") and err.count("\n") == 1 and message in err
    assert "loaded" not in captured.out  # refused before the models load
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "bogus"], "'bogus' is not a device name"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--out", "."], "is a folder"),
    (["--out", "o.avi"], "ending in .mp4"),
    (["--out", "nodir/o.mp4"], "its folder nodir does not exist"),
    (["--frames-dir", "frame_00000.png"], "is not a folder"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--steps", "0"], "dit8: error: --steps must be"),
    (["--shift", "0"], "dit8: error: --shift must be"),
    (["--vae-tile", "0"], "--vae-tile must be a positive number"),
    (["--seed", "-1"], "dit8: error: --seed must be"),
    (["--area", "100"], "raise the area"),
    (["--attention", "int8"], "no torch reference"),
    (["--attention", "int8", "--backend", "torch"], "no 'int8' path; use --backend triton"),
    (["--sampler", "unipc", "--update", "renoise"], "--update renoise is the distilled sampler's step rule"),
])
def test_generate_refuses_bad_arguments_before_loading(tmp_path, capsys, monkeypatch, args, message):
    """The model folder does not exist: each error must come from the argument, checked first."""
    monkeypatch.chdir(tmp_path)
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    png = write_png_frames(tmp_path, image[None])[0]
    argv = ["generate", "--model", "nowhere", "--image", str(png), "--prompt", "a cat", "--out", "o.mp4",
            "--device", "cpu", *args]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit8: error: ") and err.count("\n") == 1 and message in err, err


def test_demo_refuses_an_unusable_output_first(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "nodir" / "x.mp4")]) == 1
    err = capsys.readouterr()
    assert "nodir" in err.err and "does not exist" in err.err and "step" not in err.out


def test_an_output_under_a_file_is_not_said_to_be_missing(tmp_path, capsys):
    """An output path whose folder is a file: it was said not to exist, which the user can see it does."""
    (tmp_path / "notes.txt").write_text("a file")
    under = tmp_path / "notes.txt"
    assert main(["demo", "--out", str(under / "x.mp4")]) == 1
    assert capsys.readouterr().err == f"dit8: error: {under / 'x.mp4'}: its folder {under} is a file, not a folder\n"
    assert main(["bench", "dit", "--device", "cpu", "--json", str(under / "b.json")]) == 1
    assert capsys.readouterr().err == (f"dit8: error: --json {under / 'b.json'}: the folder {under} is a file, "
                                       "not a folder\n")


def test_demo_refuses_a_bad_seed_first(tmp_path, capsys):
    assert main(["demo", "--seed", "-1", "--out", str(tmp_path / "x.mp4")]) == 1
    captured = capsys.readouterr()
    assert captured.err == "dit8: error: --seed must be an integer in [0, 2**63), got -1\n"
    assert captured.out == ""  # nothing built, nothing announced


@pytest.mark.parametrize("flag, value, message", [
    ("--layers", "0", "--layers must be at least 1, got 0"),
    ("--layers", "-1", "--layers must be at least 1, got -1"),
    ("--repeat", "-1", "--repeat must be at least 1, got -1"),
    ("--steps", "-1", "--steps must be at least 0, got -1"),
    ("--steps", "1001", "--steps must be at most 1000, got 1001"),
])
def test_bench_errors_name_the_flag(flag, value, message, capsys):
    assert main(["bench", "dit", "--device", "cpu", flag, value]) == 1
    assert capsys.readouterr().err == f"dit8: error: {message}\n"


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_kernel_backend_that_cannot_run_is_named_before_8bit_attention(command, tmp_path, capsys, monkeypatch):
    """--backend triton without the interpreter on a CPU: the backend is the mistake (as load_dit says),
    not a missing --backend triton, which the user gave."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter Triton needs a GPU
    monkeypatch.chdir(tmp_path)
    if command == "generate":
        image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
        argv = ["generate", "--model", "nowhere", "--image", str(write_png_frames(tmp_path, image[None])[0]),
                "--prompt", "a cat", "--out", "o.mp4"]
    else:
        argv = ["bench", "dit"]
    assert main([*argv, "--device", "cpu", "--attention", "int8", "--backend", "triton"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit8: error: backend 'triton': no op can run its kernels on cpu tensors here"), err
    assert "TRITON_INTERPRET=1" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_bad_dit8_backend_is_refused_before_the_model(command, tmp_path, capsys, monkeypatch):
    """DIT8_BACKEND is read at each op call: a bad one showed at the first forward, after the build or load."""
    monkeypatch.setenv("DIT8_BACKEND", "trition")
    monkeypatch.chdir(tmp_path)
    if command == "generate":
        image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
        argv = ["generate", "--model", "nowhere", "--image", str(write_png_frames(tmp_path, image[None])[0]),
                "--prompt", "a cat", "--out", "o.mp4"]  # a model folder that does not exist: checked after
    else:
        argv = ["bench", "dit", "--frames", "1", "--size", "16x16", "--layers", "1", "--repeat", "1", "--steps", "0"]
    assert main([*argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err == ("dit8: error: DIT8_BACKEND: unknown backend 'trition'; expected 'auto' or one of "
                   "('cuda', 'triton', 'torch')\n"), err


def test_bench_refuses_a_dash_for_json_first(tmp_path, capsys, monkeypatch):
    # "-" names standard output to many tools; bench dit prints its table there and writes --json as a file.
    monkeypatch.chdir(tmp_path)
    tiny = ["--frames", "1", "--size", "16x16", "--layers", "1", "--repeat", "1", "--steps", "0"]
    assert main(["bench", "dit", "--device", "cpu", *tiny, "--json", "-"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == ("dit8: error: --json -: give the JSON file's name (bench dit prints its "
                                             "table on standard output)")
    assert list(tmp_path.iterdir()) == []


def test_each_json_help_says_where_the_json_goes():
    """info's and compare's --json is a switch (JSON on stdout), bench dit's a file name: each help says which."""
    helps = {prog: action for prog, parser in _parsers(build_parser()) for action in parser._actions
             if "--json" in action.option_strings}
    assert set(helps) == {"dit8 info", "dit8 compare", "dit8 bench dit"}
    for prog in ("dit8 info", "dit8 compare"):
        assert helps[prog].nargs == 0 and "on stdout" in helps[prog].help and "bench dit" in helps[prog].help
    bench = helps["dit8 bench dit"]
    assert bench.nargs is None and "file OUT" in bench.help and "stdout" in bench.help
    assert "'-' is refused" in bench.help


def test_bench_refuses_a_folder_for_json_first(tmp_path, capsys):
    tiny = ["--frames", "1", "--size", "16x16", "--layers", "1", "--repeat", "1", "--steps", "0"]
    assert main(["bench", "dit", "--device", "cpu", *tiny, "--json", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == f"dit8: error: --json {tmp_path}: is a folder; give the JSON file's name"
    assert "timing" not in captured.err and list(tmp_path.iterdir()) == []  # refused before the run


@pytest.mark.parametrize("args, gluon, message", [
    (["--frames", "4"], None, "--frames must be 4k+1"),
    (["--layers", "0"], None, "--layers must be at least 1"),
    (["--steps", "1001"], None, "--steps must be at most 1000"),
    (["--size", "16400x16"], None, "a 16400x16 video of 1 frames has 1025 patch positions along its width"),
    ([], "gemm=fast", "DIT8_GLUON: gemm has no configuration 'fast'"),
])
def test_bench_argument_errors_leave_an_earlier_json_as_it_was(args, gluon, message, tmp_path, capsys, monkeypatch):
    """A run's failures are recorded in its JSON file; a mistyped flag is no run, and replaced the numbers
    of an earlier one with its error."""
    if gluon is not None:
        monkeypatch.setenv("DIT8_GLUON", gluon)
    path = tmp_path / "b.json"
    path.write_text('{"forward_ms": 1.0}\n')
    tiny = ["--frames", "1", "--size", "16x16", "--layers", "1", "--repeat", "1", "--steps", "0"]
    assert main(["bench", "dit", "--device", "cpu", *tiny, *args, "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("dit8: error: ") and message in captured.err and "timing" not in captured.err
    assert path.read_text() == '{"forward_ms": 1.0}\n' and list(tmp_path.iterdir()) == [path]


def test_bench_json_refuses_a_pipe_and_writes_through_a_link(tmp_path, capsys):
    """The file is written beside and renamed onto the path: a named pipe or a device (/dev/stdout,
    /dev/null) was replaced by a regular file, the link /dev/stdout itself when run as root."""
    import os
    import stat

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    tiny = ["--frames", "1", "--size", "16x16", "--layers", "1", "--repeat", "1", "--steps", "0"]
    assert main(["bench", "dit", "--device", "cpu", *tiny, "--json", str(fifo)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"dit8: error: --json {fifo}: not a regular file (a device or a pipe); give the JSON "
                            "file's name: it is written as the numbers come and renamed into place\n")
    assert "timing" not in captured.err and stat.S_ISFIFO(os.lstat(fifo).st_mode)  # refused before the run
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("{}")
    link.symlink_to(target)
    assert main(["bench", "dit", "--device", "cpu", *tiny, "--json", str(link)]) == 0
    assert f"json        {link}" in capsys.readouterr().out
    assert link.is_symlink() and json.loads(target.read_text())["forward_ms"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.json", "link.json", "target.json"]


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs Linux's /proc/self/fd")
def test_bench_json_refuses_an_anonymous_pipe_as_a_pipe(capsys):
    """`--json /dev/stdout` with stdout piped (`dit8 bench dit --json /dev/stdout | jq`): the link leads to
    an unnamed pipe, whose resolved path ('/proc/PID/fd/pipe:[N]') names no file; the error said the
    folder /proc/PID/fd could not be written in, not that the path is a pipe."""
    import os

    read, write = os.pipe()
    try:
        given = f"/proc/self/fd/{write}"
        tiny = ["--frames", "1", "--size", "16x16", "--layers", "1", "--repeat", "1", "--steps", "0"]
        assert main(["bench", "dit", "--device", "cpu", *tiny, "--json", given]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"dit8: error: --json {given}: not a regular file (a device or a pipe)"), err
    finally:
        os.close(read)
        os.close(write)


def test_bench_json_that_cannot_be_written_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import errno

    import dit8.cli

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dit8.cli.os, "replace", full)
    tiny = ["--frames", "1", "--size", "16x16", "--layers", "1", "--repeat", "1", "--steps", "0"]
    assert main(["bench", "dit", "--device", "cpu", *tiny, "--json", str(tmp_path / "b.json")]) == 1
    # one line naming the option and its file (it was Python's bare '[Errno 28] No space left on device')
    err = capsys.readouterr().err  # (after the run's progress lines)
    assert err.endswith(f"\ndit8: error: --json {tmp_path / 'b.json'}: cannot write: No space left on device\n")
    assert err.count("error") == 1
    assert list(tmp_path.iterdir()) == []


def test_bench_json_that_cannot_be_written_does_not_hide_why_the_run_stopped(tmp_path, capsys, monkeypatch):
    """The error's own save failing too (the disk full) reported the disk, not the run's error."""
    import errno

    import torch

    import dit8.bench_dit
    import dit8.cli

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    def out_of_memory(settings, log=None, measured=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dit8.cli.os, "replace", full)
    monkeypatch.setattr(dit8.bench_dit, "run_bench", out_of_memory)
    assert main(["bench", "dit", "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit8: error: out of GPU memory (CUDA out of memory.") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_out_of_gpu_memory_is_one_line_with_what_to_try(monkeypatch, capsys):
    import torch

    import dit8.devices

    def out_of_memory(device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore of its text")

    monkeypatch.setattr(dit8.devices, "resolve_device", out_of_memory)
    assert main(["bench", "dit", "--scheme", "bf16", "--device", "cuda"]) == 1
    assert capsys.readouterr().err == ("dit8: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 "
                                       "GiB); try --scheme fp8 or int8 (bf16 weights of I2V-14B take 31 GiB), or "
                                       "fewer --layers\n")


def _parsers(parser: argparse.ArgumentParser):
    """(prog, parser) of `parser` and of each of its subcommands, depth first."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_and_says_its_default():
    undocumented = [f"{prog} {action.option_strings[0] if action.option_strings else action.dest}"
                    for prog, parser in _parsers(build_parser()) for action in parser._actions
                    if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert undocumented == []
    silent = [f"{prog} {action.option_strings[0]}" for prog, parser in _parsers(build_parser())
              for action in parser._actions
              if action.option_strings and action.default not in (None, [], argparse.SUPPRESS)
              and not isinstance(action.default, bool)  # a switch's default is its absence
              and "default" not in (action.help or "")]
    assert silent == []


def test_every_default_is_one_of_the_choices():
    """An option whose default is not among its choices cannot be given its own default: `compare --backend
    auto`, which its help describes and defaults to, was refused as an invalid choice."""
    outside = {f"{prog} {action.option_strings[0]}": (action.default, action.choices)
               for prog, parser in _parsers(build_parser()) for action in parser._actions
               if action.option_strings and action.choices is not None and action.default is not None
               and action.default not in action.choices}
    assert outside == {}
    args = build_parser().parse_args(["compare", "a", "b", "--backend", "auto"])
    assert args.backend == "auto"


def test_the_default_each_help_states_is_the_options_default():
    """`(default 81)`, `(default bf16)`: the value the help (and README) gives is the one the parser uses."""
    stated = {f"{prog} {action.option_strings[0]}": (action.default, action.help)
              for prog, parser in _parsers(build_parser()) for action in parser._actions
              if action.option_strings and action.default not in (None, [], argparse.SUPPRESS)
              and not isinstance(action.default, bool)}
    assert len(stated) >= 10
    wrong = {flag: (default, text) for flag, (default, text) in stated.items()
             if not re.search(rf"\bdefaults? {re.escape(str(default))}(?![\w.])", text)}
    assert wrong == {}


# Help, --version and argument errors: each in a fresh interpreter, which reports the heavy modules loaded.
_NO_TORCH_SCRIPT = """
import contextlib, io, json, sys
from dit8.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(argv)
    except SystemExit as stop:
        codes.append(stop.code)
print(json.dumps({"codes": codes, "loaded": sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "triton",
                                                                                             "numpy"})}))
"""


def test_help_and_argument_errors_do_not_load_torch():
    argvs = [["--help"], ["--version"], ["convert", "--help"], ["generate", "--help"], ["demo", "--help"],
             ["info", "--help"], ["bench", "dit", "--help"], ["convert"], ["generate", "--frames", "x"],
             ["bench", "dit", "--scheme", "fp4"], ["nonsense"]]
    done = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["codes"] == [0] * 7 + [2] * 4  # every one answered by the parser
    assert report["loaded"] == []
    # and so from the command itself, which first imports the package
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dit8", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "convert" in done.stdout
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "dit8.cli" in imported and not imported & {"torch", "triton", "numpy"}


def test_the_cli_module_runs_as_a_script():
    """`python -m dit8.cli` is the command, as `python -m dit8` and `dit8` are (it did nothing at all)."""
    from dit8 import __version__

    done = subprocess.run([sys.executable, "-m", "dit8.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and __version__ in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "dit8.cli", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "required: path" in done.stderr


@pytest.mark.parametrize("cuda", [False, True])
def test_device_default_is_cuda_when_available(cuda, monkeypatch):
    # --device's default is decided when the command runs (the parser does not import torch)
    import torch

    from dit8.cli import bench_settings, build_parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert bench_settings(build_parser().parse_args(["bench", "dit"])).device == ("cuda" if cuda else "cpu")
    assert bench_settings(build_parser().parse_args(["bench", "dit", "--device", "cpu"])).device == "cpu"
