"""Sequence parallelism (runtime/parallel.py): the DiT split over P processes, on the CPU with gloo,
gives every process the single-process result."""

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dit8
from dit8 import CapturedForward, InputError, SequenceParallel, WanDiT
from dit8.testing import random_inputs, random_weights, tiny_config, write_checkpoint
from dit8.testing_pipeline import write_tiny_model_folder
from dit8.video import read_png, write_png_frames

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="this torch build has no torch.distributed with gloo"),
              pytest.mark.cpu_only]  # gloo on the CPU, on a GPU machine too


def _in_group(rank: int, world: int, store: str, timeout: float | None, job, *args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=None if timeout is None else datetime.timedelta(seconds=timeout))
    try:
        job(rank, *args)
    finally:
        dist.destroy_process_group()
    # The job's results are on disk. Leave without the interpreter's shutdown: a gloo worker thread
    # may still be releasing the last collective's work, whose tensors it can then no longer hand back
    # to Python, and the process aborts ("terminate called without an active exception") after a
    # correct run. An exception from the job still ends the process the usual way, with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_group(tmp_path, world: int, job, *args, timeout: float | None = None) -> None:
    """Run job(rank, *args) in `world` fresh processes joined in a gloo group; `timeout`: seconds a
    collective may wait for the others (a process that waits for ever fails the test instead)."""
    mp.spawn(_in_group, args=(world, str(tmp_path / "store"), timeout, job, *args), nprocs=world)


def _exchange(rank, out):
    sp = SequenceParallel.from_group()
    B, local, H, D = 2, 3, 4 * sp.world, 5
    # Token t of head h holds 1000·t + h (+ 0.5 in channel 1): where every value lands is checkable.
    tokens = torch.arange(rank * local, (rank + 1) * local)
    x = (1000.0 * tokens[None, :, None, None] + torch.arange(H)[None, None, :, None]).expand(B, local, H, D).clone()
    x[..., 1] += 0.5
    heads = sp.tokens_to_heads(x)
    back = sp.heads_to_tokens(heads)
    torch.save({"heads": heads, "back": back, "x": x}, f"{out}.{rank}")


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_trades_the_token_split_for_a_head_split(tmp_path, world):
    run_group(tmp_path, world, _exchange, str(tmp_path / "out"))
    local, group = 3, 4
    for rank in range(world):
        r = torch.load(tmp_path / f"out.{rank}")
        tokens = torch.arange(world * local)
        own_heads = torch.arange(rank * group, (rank + 1) * group)
        want = 1000.0 * tokens[None, :, None, None] + own_heads[None, None, :, None]
        assert r["heads"].shape == (2, world * local, group, 5)
        torch.testing.assert_close(r["heads"][..., 0], want[..., 0].expand(2, -1, -1), rtol=0, atol=0)
        torch.testing.assert_close(r["heads"][..., 1], want[..., 0].expand(2, -1, -1) + 0.5, rtol=0, atol=0)
        torch.testing.assert_close(r["back"], r["x"], rtol=0, atol=0)


def _forward(rank, ckpt, latent_size, out, kwargs):
    model = dit8.load_dit(ckpt, parallel=SequenceParallel.from_group(), **kwargs)
    torch.save(model(**random_inputs(model.config, latent_size=latent_size)), f"{out}.{rank}")


# (world, width, latent size), heads of 128 channels as Wan's (a checkpoint states no head count):
# 2 processes share 12 tokens; 4 share 9, padded to 12 (the last process holds only padding).
CASES = [(2, 256, (2, 4, 6)), (4, 512, (1, 6, 6))]


@pytest.mark.slow
@pytest.mark.parametrize("world, dim, latent_size", CASES)
def test_sequence_parallel_forward_is_the_single_process_forward(tmp_path, world, dim, latent_size):
    config = tiny_config("i2v", dim=dim, num_heads=dim // 128)
    ckpt = write_checkpoint(random_weights(config), tmp_path / "m.safetensors")
    run_group(tmp_path, world, _forward, str(ckpt), latent_size, str(tmp_path / "out"), {})
    want = dit8.load_dit(ckpt)(**random_inputs(config, latent_size=latent_size))
    for rank in range(world):
        got = torch.load(tmp_path / f"out.{rank}")
        # The same arithmetic on the same rows; only how a matmul blocks its rows differs.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sequence_parallel_through_the_triton_kernels(tmp_path):
    # The kernels read the all-to-all's outputs as strided views with the padding cut off: 9 tokens
    # over 2 processes, padded to 10. In the interpreter, on CPU tensors.
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels in the interpreter (CPU tensors): a machine without a GPU")
    pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")
    # text_len=16 (config.json beside the weights): the interpreter runs one program per text row, and
    # Wan's 512 padded rows took three quarters of the time; 16 still pads the 7 rows given.
    config, latent_size = tiny_config("i2v", text_len=16), (1, 6, 6)
    ckpt = write_checkpoint(random_weights(config), tmp_path / "m.safetensors", config=config)
    run_group(tmp_path, 2, _forward, str(ckpt), latent_size, str(tmp_path / "out"), {"backend": "triton"})
    want = dit8.load_dit(ckpt, backend="triton")(**random_inputs(config, latent_size=latent_size))
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"out.{rank}"), want, rtol=1e-5, atol=1e-5)


def _misuse(rank, folder, out):
    from dit8 import Cancelled, I2VPipeline
    from dit8.random_dit import build_model

    results = {}
    sp = SequenceParallel.from_group()
    # A process outside the group given is told so (before: rank -1 of -1, and a shape error later).
    single = dist.new_group([0])
    if rank == 1:
        try:
            SequenceParallel.from_group(single)
        except InputError as err:
            results["outside"] = str(err)
    model = build_model(tiny_config("i2v"), device="cpu", parallel=sp)
    for name, size in (("shapes", (1, 4, 6) if rank == 0 else (1, 6, 4)), ("timesteps", (1, 4, 6))):
        inputs = random_inputs(model.config, latent_size=size)
        if name == "timesteps":
            inputs["t"] = inputs["t"] + rank
        try:
            model(**inputs)
        except InputError as err:
            results[name] = str(err)
    pipe = I2VPipeline.from_pretrained(folder, parallel=sp)
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    cancel = threading.Event()

    def callback(event):  # only the first process cancels
        if rank == 0 and event.stage == "denoise" and event.done == 1:
            cancel.set()

    try:
        pipe(image, "a cat", frames=1, area=1536, callback=callback, cancel=cancel)
    except Cancelled as err:
        results["cancelled"] = str(err)
    results["after"] = pipe(image, "a cat", frames=1, area=1536).latents
    try:
        pipe(image, "a cat", seed=rank, frames=1, area=1536)
    except InputError as err:
        results["seeds"] = str(err)
    torch.save(results, f"{out}.{rank}")


@pytest.mark.slow
def test_processes_that_disagree_or_cancel_alone_are_stopped_together(tmp_path):
    folder = write_tiny_model_folder(tmp_path / "model", kind="distill_models", vae_dim=4)
    run_group(tmp_path, 2, _misuse, str(folder), str(tmp_path / "out"))
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    assert "outside" not in results[0] and "rank 1) is not a member of the group" in results[1]["outside"]
    for r in results:
        assert "different inputs (latent shapes, timesteps, latents or context), or inputs refused (ranks 1 " \
               "differ from rank 0)" in r["shapes"]
        assert "different inputs (latent shapes, timesteps" in r["timesteps"]
        # Both stop at the same point (before: the others ran on, and later calls mixed up their parts).
        assert r["cancelled"] == "generation cancelled after step 1 of 4"
        assert "different inputs (image, prompt or settings)" in r["seeds"]
    torch.testing.assert_close(results[1]["after"], results[0]["after"], rtol=0, atol=0)


def _refused_in_one(rank, out):
    from dit8.random_dit import build_model

    model = build_model(tiny_config("i2v"), device="cpu", parallel=SequenceParallel.from_group())
    inputs = random_inputs(model.config, batch=1)
    results = {}
    bad = dict(inputs, context=inputs["context"][..., :3]) if rank == 1 else inputs
    try:
        model(**bad)
    except InputError as err:
        results["refused"] = str(err)
    results["after"] = model(**inputs)  # the processes are still in step
    torch.save(results, f"{out}.{rank}")


def test_inputs_refused_in_one_process_stop_every_process(tmp_path):
    run_group(tmp_path, 2, _refused_in_one, str(tmp_path / "out"), timeout=60)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    assert "context has shape (1, 7, 3)" in results[1]["refused"]  # its own reason
    assert "(ranks 1 differ from rank 0)" in results[0]["refused"]
    torch.testing.assert_close(results[1]["after"], results[0]["after"], rtol=0, atol=0)


def _call_refused_in_one(rank, folder, out):
    from dit8 import I2VPipeline

    pipe = I2VPipeline.from_pretrained(folder, parallel=SequenceParallel.from_group())
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    results = {}
    try:
        pipe(image, "a cat", frames=4 if rank == 1 else 1, area=1536)  # 4: no 4k+1
    except InputError as err:
        results["refused"] = str(err)
    results["after"] = pipe(image, "a cat", frames=1, area=1536, steps=1).frames  # still in step
    torch.save(results, f"{out}.{rank}")


def test_a_call_refused_in_one_process_stops_every_process(tmp_path):
    """The pipeline refused a call's inputs before the processes compared them: the others then waited for
    the refusing one (the group's timeout) or paired their call with its next one."""
    folder = write_tiny_model_folder(tmp_path / "model", kind="distill_models", vae_dim=4)
    run_group(tmp_path, 2, _call_refused_in_one, str(folder), str(tmp_path / "out"), timeout=120)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    assert "frames must be 4k+1" in results[1]["refused"]  # its own reason
    assert "different inputs (image, prompt or settings), or inputs refused (ranks 1 differ from rank 0)" in \
        results[0]["refused"]
    assert torch.equal(results[1]["after"], results[0]["after"])


def _different(rank, out):
    from dit8.random_dit import build_model

    sp, config, results = SequenceParallel.from_group(), tiny_config("i2v"), {}
    inputs = random_inputs(config, batch=1)
    # Another checkpoint in one process: other dimensions, or the same ones with other weights.
    for name, cfg, seed in (("layers", tiny_config("i2v", num_layers=2 + rank), 0), ("weights", config, rank)):
        try:
            build_model(cfg, device="cpu", seed=seed, parallel=sp)(**inputs)
        except InputError as err:
            results[name] = str(err)
    model = build_model(config, device="cpu", parallel=sp)
    # Inputs of the same shapes and timesteps, other values in one process.
    for name, change in (("x", lambda i: i.update(x=i["x"] + 0.01 * rank)),
                         ("frames", lambda i: i.update(x=i["x"].flip(2) if rank else i["x"])),
                         ("y", lambda i: i.update(y=i["y"] * (1 + rank))),
                         ("context", lambda i: i.update(context=model.encode_context(i["context"] + rank,
                                                                                     i.pop("clip_fea"))))):
        changed = dict(inputs)
        change(changed)
        try:
            model(**changed)
        except InputError as err:
            results[name] = str(err)
    results["after"] = model(**inputs)
    torch.save(results, f"{out}.{rank}")


@pytest.mark.slow
def test_processes_given_other_models_or_input_values_are_stopped_together(tmp_path):
    run_group(tmp_path, 2, _different, str(tmp_path / "out"), timeout=60)
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    for r in results:
        assert "different models (configuration" in r["layers"]
        assert "different model weights (ranks 1 differ from rank 0)" in r["weights"]
        for name in ("x", "frames", "y", "context"):
            assert "different inputs (latent shapes, timesteps, latents or context)" in r[name], name
    torch.testing.assert_close(results[1]["after"], results[0]["after"], rtol=0, atol=0)


def test_the_bits_fingerprint_tells_any_changed_bit_and_chunks_alike(monkeypatch):
    import dit8.parallel
    from dit8.parallel import bits_fingerprint

    tensors = [torch.randn(37, 5), torch.randn(11).to(torch.bfloat16),
               torch.randint(-128, 127, (64,), dtype=torch.int8),
               torch.randn(9).to(torch.float8_e4m3fn), torch.tensor([True, False])]
    whole = bits_fingerprint(tensors)
    monkeypatch.setattr(dit8.parallel, "_CHUNK", 7)  # summed in pieces: the same integers
    assert bits_fingerprint(tensors) == whole
    nudged = [t.clone() for t in tensors]
    nudged[0].view(torch.int32)[3, 1] ^= 1  # one bit of one float
    assert bits_fingerprint(nudged) != whole
    swapped = [tensors[0].flip(0), *tensors[1:]]  # the same values in another order
    assert bits_fingerprint(swapped) != whole


def test_checksums_tell_other_values_not_another_order_of_additions():
    from dit8.parallel import checksums

    # x.flip(2), frames in another order, keeps Σv⁺, Σv⁻ and Σv² and moves the two index-weighted sums by
    # zero-mean noise of spread ~(2HW/n)·√(HW) against a tolerance of rtol·0.2n: it passes where both
    # moves fall within rtol, a chance that grows as H·W·(batch·channels)³. [2, 16, 3, 8, 8] passed about
    # once in 5,000 draws; one block of frames passes about 6e-9 (1e6 draws, extrapolated as t² from the
    # draws within t·rtol). -x passes about 3e-9 (Σv⁺ ≈ Σv⁻ and the weighted sums alike); the others never.
    x = torch.randn(1, 1, 3, 8, 8)
    same = checksums(torch.device("cpu"), x.transpose(0, 4).contiguous().transpose(0, 4), None)
    torch.testing.assert_close(same, checksums(torch.device("cpu"), x, None), rtol=1e-12, atol=0)
    assert same[5:].eq(0).all()
    for other in (x + 1e-3, x * (1 + 1e-4), x.flip(2), -x):
        assert not torch.isclose(checksums(torch.device("cpu"), other), same[:5], rtol=1e-5, atol=0).all()
    # x whose positive and negative parts sum alike (what made -x pass before, by chance): still told apart.
    balanced = torch.cat([x.flatten().abs(), -x.flatten().abs().flip(0)])
    assert not torch.isclose(checksums(torch.device("cpu"), -balanced), checksums(torch.device("cpu"), balanced),
                             rtol=1e-5, atol=0).all()


def test_a_group_position_must_be_in_the_group():
    for rank, world in ((0, 0), (-1, -1), (2, 2)):
        with pytest.raises(InputError, match="needs 0 <= rank < world"):
            SequenceParallel(None, rank, world)


def test_heads_must_split_evenly_over_the_processes():
    with pytest.raises(InputError, match="head count divisible by 3; the model has 2 heads"):
        WanDiT(tiny_config("i2v"), parallel=SequenceParallel(None, 0, 3))


def test_cuda_graph_capture_is_refused():
    model = WanDiT(tiny_config("i2v"), parallel=SequenceParallel(None, 0, 2))
    inputs = random_inputs(model.config)
    with pytest.raises(InputError, match="sequence-parallel model is not supported"):
        CapturedForward(model, inputs["x"], inputs["t"], None, y=inputs["y"])


def test_shards_cover_the_sequence_with_padding_at_its_end():
    x = torch.arange(1, 10).float()[None, :, None]  # 9 tokens
    parts = [SequenceParallel(None, r, 4).shard(x, 1) for r in range(4)]
    assert [p.flatten().tolist() for p in parts] == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [0, 0, 0]]
    # A rank whose slice starts past the end (5 tokens, 2 a rank: rank 3 would start at 6) is all padding.
    parts = [SequenceParallel(None, r, 4).shard(x[:, :5], 1) for r in range(4)]
    assert [p.flatten().tolist() for p in parts] == [[1, 2], [3, 4], [5, 0], [0, 0]]


def test_a_group_needs_torch_distributed_initialised():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(InputError, match="init_process_group"):
        SequenceParallel.from_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launched(world: int, command: list[str], attempts: int = 3) -> list[str]:
    """`command` in `world` processes told their ranks through the environment, as torchrun starts them;
    asserts they all succeed, returns their stdouts. The port is free when chosen, but another process
    may take it before rank 0's store binds it ("address already in use"); then the launch is repeated on
    another port."""
    for attempt in range(attempts):
        port = _free_port()
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=os.environ | dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                 for r in range(world)]
        first_out, first_err = procs[0].communicate(timeout=600)
        if "address already in use" in first_err.lower() and attempt + 1 < attempts:
            for p in procs[1:]:  # they wait for a store that never came up
                p.kill()
                p.communicate()
            continue
        results = [(first_out, first_err)] + [p.communicate(timeout=600) for p in procs[1:]]
        assert [p.returncode for p in procs] == [0] * world, [err for _, err in results]
        return [out for out, _ in results]
    raise AssertionError("unreachable")


def test_a_launch_whose_port_was_taken_meanwhile_is_repeated(monkeypatch):
    # Rank 0 binds the port as a process group's store does; the first port handed out is held by another.
    bind = ("import os, socket, sys, time\n"
            "if os.environ['RANK'] == '0':\n"
            "    socket.socket().bind(('127.0.0.1', int(os.environ['MASTER_PORT'])))\n"
            "    print(os.environ['MASTER_PORT'])\n"
            "else:\n"
            "    time.sleep(0.2)\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        ports = [taken, _free_port()]
        monkeypatch.setattr(sys.modules[__name__], "_free_port", lambda: ports.pop(0))
        outputs = run_launched(2, [sys.executable, "-c", bind])
    assert not ports and int(outputs[0]) != taken and outputs[1] == ""


@pytest.mark.slow
def test_generate_splits_over_launched_processes(tmp_path):
    folder = write_tiny_model_folder(tmp_path / "model", kind="distill_models", vae_dim=4)
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    (png,) = write_png_frames(tmp_path, image[None])

    def generate(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "dit8", "generate", "--model", str(folder), "--image", str(png), "--prompt",
                "a cat walks", "--out", str(tmp_path / f"{name}.mp4"), "--frames", "5", "--area", "1536",
                "--device", "cpu", "--frames-dir", str(tmp_path / name), *extra]

    outputs = run_launched(2, generate("parallel", "--sequence-parallel"))
    assert "parallel    2 processes" in outputs[0] and outputs[1] == ""
    subprocess.run(generate("single"), check=True, capture_output=True, timeout=600)
    frames = {name: np.stack([read_png(f) for f in sorted((tmp_path / name).glob("*.png"))])
              for name in ("parallel", "single")}
    assert frames["parallel"].shape == frames["single"].shape == (5, 32, 48, 3)
    # Latents equal up to fp32 rounding: a pixel may round to the neighbouring 8-bit level.
    diff = np.abs(frames["parallel"].astype(int) - frames["single"].astype(int))
    assert diff.max() <= 1, diff.max()


@pytest.mark.slow
def test_bench_dit_splits_over_launched_processes(tmp_path):
    command = [sys.executable, "-m", "dit8", "bench", "dit", "--device", "cpu", "--steps", "1", "--repeat", "1",
               "--sequence-parallel", "--json", str(tmp_path / "b.json")]
    outputs = run_launched(2, command)
    assert "parallel    2 processes" in outputs[0] and outputs[1] == ""
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["processes"] == 2 and result["forward_ms"] > 0 and result["loop"]["total_ms"] > 0


def test_bench_dit_sequence_parallel_runs_alone():
    from dit8.bench_dit import BenchSettings, check_bench_settings

    with pytest.raises(InputError, match="--sequence-parallel runs neither --cuda-graph nor --compare"):
        check_bench_settings(BenchSettings(device="cpu", sequence_parallel=True, compare="diffusers"))


def test_generate_sequence_parallel_needs_a_launcher(tmp_path, monkeypatch, capsys):
    from dit8.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["generate", "--model", "m", "--image", "i.png", "--prompt", "p", "--out", str(tmp_path / "o.mp4"),
                 "--device", "cpu", "--sequence-parallel"]) == 1
    assert "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set" in capsys.readouterr().err


@pytest.mark.parametrize("env, message", [
    (dict(RANK="x"), "RANK='x' is not a whole number"),  # no number: the first process's, which reports it
    (dict(WORLD_SIZE="two"), "WORLD_SIZE='two' is not a whole number"),
    (dict(MASTER_PORT="abc"), "MASTER_PORT='abc' is not a whole number"),
    (dict(LOCAL_RANK=" 0"), "LOCAL_RANK=' 0' is not a whole number"),
    (dict(RANK="00", WORLD_SIZE="0"), "RANK=0 must be below WORLD_SIZE=0"),
])
def test_a_bad_launcher_variable_is_named(env, message, tmp_path, monkeypatch, capsys):
    """int() of the variable said only "invalid literal for int() with base 10: 'x'"."""
    from dit8.cli import main

    launch = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    for name, value in (launch | env).items():
        monkeypatch.setenv(name, value)
    assert main(["generate", "--model", "m", "--image", "i.png", "--prompt", "p", "--out", str(tmp_path / "o.mp4"),
                 "--device", "cpu", "--sequence-parallel"]) == 1
    assert capsys.readouterr().err == f"dit8: error: sequence parallelism: {message}" + (
        "\n" if "below" in message else "; start the processes with a launcher such as torchrun, which sets it\n")


def test_a_later_process_reports_only_its_own_errors(tmp_path, monkeypatch, capsys):
    import dit8.devices
    import dit8.parallel
    from dit8.cli import main

    args = ["generate", "--model", "m", "--image", "i.png", "--prompt", "p", "--out", str(tmp_path / "o.mp4"),
            "--device", "cpu", "--sequence-parallel"]
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 1 and capsys.readouterr().err == ""  # every process has it: the first reports

    def group_failed(device):
        raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore of its text")

    monkeypatch.setattr(dit8.parallel, "join_launched_group", group_failed)
    assert main(args) == 1
    assert capsys.readouterr().err == ("dit8: rank 1: error: the process group failed, another process may have "
                                       "stopped ([gloo] Connection closed by peer [127.0.0.1]:1234)\n")
    monkeypatch.setattr(dit8.devices, "resolve_device", group_failed)
    with pytest.raises(RuntimeError, match="Connection closed"):  # without --sequence-parallel: not the group's
        main(args[:-1])


def test_a_later_process_reports_an_input_only_it_refuses(tmp_path, monkeypatch, capsys):
    """Inside the group a refusal may be this process's alone (its image file missing on its node): it
    says so itself; an error of the group's own (processes that disagree) is left to the first."""
    import dit8.parallel
    from dit8.cli import main

    monkeypatch.setattr(dit8.parallel, "join_launched_group",
                        lambda device: (SimpleNamespace(rank=1, world=2), torch.device("cpu")))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # joined, as far as the CLI can tell
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("RANK", "1")
    args = ["generate", "--model", "m", "--image", str(tmp_path / "i.png"), "--prompt", "p", "--out",
            str(tmp_path / "o.mp4"), "--device", "cpu", "--sequence-parallel"]
    assert main(args) == 1
    assert capsys.readouterr().err == f"dit8: rank 1: error: {tmp_path / 'i.png'}: image file not found\n"

    def disagree(path):
        raise dit8.parallel.GroupInputError("sequence parallelism: the processes were given different inputs")

    monkeypatch.setattr("dit8.conditioning.image_tensor", disagree)
    assert main(args) == 1 and capsys.readouterr().err == ""


def test_launched_processes_take_the_gpu_of_their_local_rank(monkeypatch):
    from dit8.parallel import join_launched_group

    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match="give the device as 'cuda', not 'cuda:1'"):
        join_launched_group(torch.device("cuda", 1))
