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
def test_8bit_attention_model(tmp_path, triton_first, attention, monkeypatch):
    """The model with 8-bit self-attention errs against the float64 reference forward by at most 2x the
    same model whose self-attention is the 8-bit algorithm emulated in float64 (same recipe, same
    blocks: tests/test_attention_triton.py `emulate_8bit`)."""
    from dit8.kernels import attention_8bit_triton as impl8
    from dit8.kernels import attention_triton as impl
    from test_attention_triton import emulate_8bit

    config = tiny_config("i2v", num_layers=1, text_len=16)
    weights, inputs = random_weights(config, seed=35), random_inputs(config, batch=2, seed=36)
    path = write_checkpoint(weights, tmp_path / "m.safetensors", config=config)
    ref = reference_forward(weights, **inputs, num_heads=config.num_heads, text_len=config.text_len)
    model = dit8.load_dit(path, dtype=torch.float32, attention=attention)
    err = rel_err(model(**inputs), ref)

    qk, pv = impl8.RECIPES[attention]
    cfg = impl.pick_config(impl8.config_path(pv), config.head_dim)

    def emulated(q, k, v, *, precision, backend):
        assert precision == attention  # (the cross-attention has its own op)
        return emulate_8bit(q, k, v, qk, pv, cfg.block_m, cfg.block_n).to(q.dtype)

    monkeypatch.setattr(dit8.kernels, "attention", emulated)
    emu_err = rel_err(model(**inputs), ref)
    assert 0 < err <= 2 * emu_err, (err, emu_err)
