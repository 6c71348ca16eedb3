"""The whole DiT on the Triton backend (every op that has one) against the float64 reference.

DIT8_BACKEND=triton makes Triton the first choice of every op that has it; on CPU tensors this
runs the kernels in the Triton interpreter (tests/conftest.py), so the model is kept tiny and fp32
(the interpreter's bf16 arithmetic is broken).
"""

import pytest
import torch

import dit8
from dit8.kernels.triton_support import triton_runs_on
from dit8.testing import random_inputs, random_weights, tiny_config, write_checkpoint
from reference_wan import reference_forward

pytestmark = pytest.mark.skipif(not triton_runs_on(torch.device("cpu")),
                                reason="needs triton and TRITON_INTERPRET=1 to run Triton on CPU tensors")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def triton_first(monkeypatch):
    monkeypatch.setenv("DIT8_BACKEND", "triton")


def test_float_model(tmp_path, triton_first):
    config = tiny_config("i2v", num_layers=1, text_len=16)  # short text keeps the interpreter quick
    weights, inputs = random_weights(config, seed=31), random_inputs(config, batch=2, seed=32)
    model = dit8.load_dit(write_checkpoint(weights, tmp_path / "m.safetensors", config=config), dtype=torch.float32)
    ref = reference_forward(weights, **inputs, num_heads=config.num_heads, text_len=config.text_len)
    assert rel_err(model(**inputs), ref) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_model(tmp_path, triton_first, scheme):
    from safetensors.torch import load_file

    from dit8.converters import convert

    config = tiny_config("i2v", num_layers=1, text_len=16)  # short text keeps the interpreter quick
    weights, inputs = random_weights(config, seed=33), random_inputs(config, batch=2, seed=34)
    src = write_checkpoint(weights, tmp_path / "src.safetensors", config=config)
    out = convert(src, tmp_path / "q.safetensors", scheme=scheme, report=False, progress=False).output
    ref = reference_forward(weights, **inputs, num_heads=config.num_heads, text_len=config.text_len)
    emulated = reference_forward(load_file(str(out)), **inputs, num_heads=config.num_heads, text_len=config.text_len)
    err = rel_err(dit8.load_dit(out, dtype=torch.float32)(**inputs), ref)
    assert 0 < err <= 2 * rel_err(emulated, ref)


def test_model_backend_triton_runs_the_kernels_it_can(tmp_path, monkeypatch):
    """backend="triton" on the model (not DIT8_BACKEND): every op with a Triton kernel runs it, the
    float linears (torch reference only) run as "auto" does."""
    monkeypatch.delenv("DIT8_BACKEND", raising=False)
    config = tiny_config("i2v", num_layers=1, text_len=16)
    weights, inputs = random_weights(config, seed=37), random_inputs(config, batch=2, seed=38)
    model = dit8.load_dit(write_checkpoint(weights, tmp_path / "m.safetensors", config=config),
                          dtype=torch.float32, backend="triton")
    ref = reference_forward(weights, **inputs, num_heads=config.num_heads, text_len=config.text_len)
    assert rel_err(model(**inputs), ref) < 1e-5
    assert model.setup.backend_of("qk_norm_rope") == "triton" and model.setup.backend_of("linear") == "auto"


@pytest.mark.parametrize("attention", ["int8", "fp8"])
def test_8bit_attention_model(tmp_path, triton_first, attention):
    """The model with 8-bit self-attention errs by no more than that attention's own bound (int8 2%,
    fp8 4% on Gaussian inputs, bench/RESULTS.md), which the residual stream only dilutes."""
    config = tiny_config("i2v", num_layers=1, text_len=16)
    weights, inputs = random_weights(config, seed=35), random_inputs(config, batch=2, seed=36)
    path = write_checkpoint(weights, tmp_path / "m.safetensors", config=config)
    ref = reference_forward(weights, **inputs, num_heads=config.num_heads, text_len=config.text_len)
    err = rel_err(dit8.load_dit(path, dtype=torch.float32, attention=attention)(**inputs), ref)
    assert 0 < err <= {"int8": 0.02, "fp8": 0.04}[attention], err
