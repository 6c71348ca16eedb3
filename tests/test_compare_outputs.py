"""`dit8.compare_outputs` and `dit8 compare`: the end-to-end quantization error of a converted checkpoint
against its source, on tiny random models (torch backend, CPU)."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

import dit8
from dit8.cli import main
from dit8.config import tiny_config
from dit8.converters.convert import convert
from dit8.sampler import DistilledSampler
from dit8.testing import random_weights, write_checkpoint

SMALL = dict(frames=5, size=(64, 48), backend="torch", progress=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A bf16 I2V source, its fp8, int8 and bf16 conversions, and a T2V model."""
    folder = tmp_path_factory.mktemp("compare")
    paths = {"source": folder / "source.safetensors", "t2v": folder / "t2v.safetensors"}
    write_checkpoint(random_weights(tiny_config("i2v"), seed=1, dtype=torch.bfloat16), paths["source"])
    write_checkpoint(random_weights(tiny_config("t2v"), seed=2, dtype=torch.bfloat16), paths["t2v"])
    for scheme in ("fp8", "int8", "bf16"):
        paths[scheme] = folder / f"{scheme}.safetensors"
        convert(paths["source"], paths[scheme], scheme=scheme, progress=False)
    return paths


def test_a_lossless_conversion_has_no_error(checkpoints):
    # The bf16 conversion of a bf16 source holds the same values; fp32 compute on the CPU sees no difference.
    result = dit8.compare_outputs(checkpoints["source"], checkpoints["bf16"], **SMALL)
    assert result.relative_error == 0 and result.cosine == 1
    assert all(step.relative_error == 0 and step.cosine == 1 for step in result.steps)


def test_the_8bit_errors_are_those_of_the_two_models_outputs(checkpoints):
    """Each step's numbers are the two loaded models' outputs compared at the distilled schedule's
    timesteps, on the seeded inputs; the overall error pools the steps."""
    result = dit8.compare_outputs(checkpoints["source"], checkpoints["fp8"], seed=5, **SMALL)
    timesteps = DistilledSampler().timesteps().tolist()
    assert [step.timestep for step in result.steps] == timesteps

    from dit8.compare import _random_inputs
    reference = dit8.load_dit(checkpoints["source"], backend="torch")
    inputs = _random_inputs(reference.config, 5, (64, 48), 5, torch.device("cpu"))
    quantized = dit8.load_dit(checkpoints["fp8"], backend="torch")
    for step, t in zip(result.steps, timesteps):
        with torch.no_grad():
            ref, out = (model(inputs.x, torch.tensor([t]), inputs.context, inputs.clip_fea, inputs.y).double()
                        for model in (reference, quantized))
        assert step.relative_error == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-9)
        cosine = float((out * ref).sum() / (out.norm() * ref.norm()))
        assert step.cosine == pytest.approx(cosine, rel=1e-12)
    assert result.tokens == math.prod(inputs.x.shape[2:]) // 4  # 2 x 2 patches

    # Pooled over the steps (the outputs' norms differ little between steps, so between their extremes).
    errors = [step.relative_error for step in result.steps]
    assert min(errors) <= result.relative_error <= max(errors)


def test_int8_weights_err_less_than_fp8(checkpoints):
    # Per-channel int8 keeps 7 bits of each weight, e4m3 3 of mantissa: several times less output error.
    fp8 = dit8.compare_outputs(checkpoints["source"], checkpoints["fp8"], **SMALL)
    int8 = dit8.compare_outputs(checkpoints["source"], checkpoints["int8"], **SMALL)
    assert 0 < int8.relative_error < fp8.relative_error / 2
    assert fp8.cosine < int8.cosine < 1


def test_the_inputs_follow_the_seed(checkpoints):
    a = dit8.compare_outputs(checkpoints["source"], checkpoints["fp8"], seed=3, **SMALL)
    b = dit8.compare_outputs(checkpoints["source"], checkpoints["fp8"], seed=3, **SMALL)
    c = dit8.compare_outputs(checkpoints["source"], checkpoints["fp8"], seed=4, **SMALL)
    assert a == b and a.relative_error != c.relative_error


def test_numpy_integers_give_the_plain_ints_the_result_declares(checkpoints):
    # frames is taken as any integer (check_frames), but the unconverted numpy value went into the result,
    # whose fields are declared int: json.dumps(dataclasses.asdict(result)), as `dit8 compare --json`
    # writes it, then failed.
    numpy = dit8.compare_outputs(checkpoints["source"], checkpoints["bf16"],
                                 **{**SMALL, "frames": np.int64(5), "size": (np.int64(64), np.int64(48))})
    assert type(numpy.frames) is int and all(type(s) is int for s in numpy.size)
    assert numpy == dit8.compare_outputs(checkpoints["source"], checkpoints["bf16"], **SMALL)
    assert json.loads(json.dumps(dataclasses.asdict(numpy)))["frames"] == 5


def test_two_different_models_are_refused_by_their_dimensions(checkpoints):
    with pytest.raises(dit8.InputError, match=r"t2v\.safetensors is not a quantization of .*source\.safetensors"
                                              r".*in_dim 36 against 16"):
        dit8.compare_outputs(checkpoints["source"], checkpoints["t2v"], **SMALL)


@pytest.mark.parametrize("change, message", [
    (dict(frames=4), "frames must be 4k"), (dict(size=(60, 48)), "multiples of 16"),
    (dict(seed=-1), "seed must be"), (dict(seed=1.5), "seed must be"), (dict(backend="fast"), "backend"),
    (dict(attention="int4"), "attention must be one of"),
    (dict(seed=2**63), "seed must be"), (dict(seed=True), "seed must be"),
    (dict(size=(16400, 48)), "1025 patch positions along its width; the model's position encoding covers 1024"),
    # Past the tiny model's 2^23 tokens for the Triton attention kernels' 32-bit offsets.
    (dict(backend="triton", attention="int8", frames=257, size=(8192, 4096)),
     "a 8192x4096 video of 257 frames has 8,519,680 tokens; the model's self-attention \\(bf16"),
])
def test_bad_arguments_are_refused_before_any_load(checkpoints, monkeypatch, change, message):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("dit8.compare.load_dit", no_load)
    with pytest.raises(dit8.Dit8Error, match=message):  # (InputError; a backend's BackendError)
        dit8.compare_outputs(checkpoints["source"], checkpoints["fp8"], **{**SMALL, **change})


def test_the_reference_runs_bf16_attention_and_the_quantized_model_the_one_asked_for(checkpoints, monkeypatch):
    loaded = []

    def load_dit(path, *, attention, **kwargs):  # records the precision; runs both on the torch reference
        loaded.append((path, attention))
        return dit8.load_dit(path, **{**kwargs, "backend": "torch", "attention": "bf16"})

    monkeypatch.setattr("dit8.compare.load_dit", load_dit)
    # (8-bit attention needs the Triton backend, here in the interpreter only: the check is left out.)
    monkeypatch.setattr("dit8.compare.check_backend_and_attention", lambda backend, attention, device: None)
    result = dit8.compare_outputs(checkpoints["source"], checkpoints["fp8"], **SMALL, attention="int8")
    assert loaded == [(checkpoints["source"], "bf16"), (checkpoints["fp8"], "int8")]
    assert result.attention == "int8"


def test_the_inputs_are_gaussian_and_an_all_zero_reference_has_infinite_error():
    from dit8.compare import _random_inputs, _relative_error

    inputs = _random_inputs(tiny_config("i2v"), 9, (64, 48), 0, torch.device("cpu"))
    for name in ("x", "context", "clip_fea", "y"):
        t = getattr(inputs, name)
        assert abs(float(t.mean())) < 0.1 and abs(float(t.std()) - 1) < 0.1, name
    assert _random_inputs(tiny_config("t2v"), 9, (64, 48), 0, torch.device("cpu")).y is None
    assert _relative_error(torch.ones(3), torch.zeros(3)) == math.inf


def test_the_command_prints_each_step_and_the_whole(checkpoints, capsys):
    args = ["compare", str(checkpoints["source"]), str(checkpoints["int8"]), "--frames", "5", "--size", "64x48",
            "--device", "cpu", "--backend", "torch"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("inputs      random, seed 0: 5 frames of 64x48 (24 tokens), on cpu in float32")
    assert [line.split()[2] for line in lines[1:5]] == [f"{t:.1f}" for t in DistilledSampler().timesteps().tolist()]
    assert lines[5].startswith("all steps   relative error ")

    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = dit8.compare_outputs(checkpoints["source"], checkpoints["int8"], **SMALL)
    assert result["relative_error"] == expected.relative_error and result["cosine"] == expected.cosine
    assert len(result["steps"]) == 4 and result["size"] == [64, 48] and result["backend"] == "torch"


def test_the_command_names_a_missing_file(checkpoints, tmp_path, capsys):
    assert main(["compare", str(checkpoints["source"]), str(tmp_path / "missing.safetensors"), "--frames", "5",
                 "--size", "64x48", "--device", "cpu"]) != 0
    assert "missing.safetensors" in capsys.readouterr().err


def test_a_model_whose_output_overflows_is_named(tmp_path):
    # A reference that overflowed the compute dtype gave an infinite relative error (and a NaN cosine), as if
    # the quantized model were the one that failed.
    config = tiny_config("i2v")
    weights = random_weights(config, seed=3)
    weights["blocks.0.ffn.2.bias"] = weights["blocks.0.ffn.2.bias"] + 6e4  # past fp16's 65504 with the product
    weights["blocks.0.ffn.2.weight"] = weights["blocks.0.ffn.2.weight"] * 1e4
    source = write_checkpoint(weights, tmp_path / "source.safetensors")
    quantized = tmp_path / "int8.safetensors"
    convert(source, quantized, scheme="int8", progress=False)
    fine = dit8.compare_outputs(source, quantized, **SMALL)
    assert math.isfinite(fine.relative_error) and fine.relative_error < 0.1  # healthy in fp32
    message = (rf"^{re.escape(str(source))}: the DiT's output at timestep 1000 holds (NaN|Inf) values "
               r"with compute dtype float16")
    with pytest.raises(dit8.NumericalError, match=message):
        dit8.compare_outputs(source, quantized, dtype=torch.float16, **SMALL)


def test_relative_errors_of_zero_outputs():
    from dit8.compare import _relative_error

    zero, one = torch.zeros(3), torch.ones(3)
    assert _relative_error(zero, zero) == 0 and _relative_error(one, zero) == math.inf
    assert _relative_error(zero, one) == 1
