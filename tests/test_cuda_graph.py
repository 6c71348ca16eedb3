"""CapturedForward: a CUDA-graph replay of the DiT forward gives what the eager forward gives."""

import pytest
import torch

from dit8 import CapturedForward, InputError
from dit8.model import POSITION_TABLES_KEPT
from dit8.random_dit import build_model
from dit8.testing import random_inputs, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")


def test_a_cpu_model_is_refused():
    config = tiny_config("i2v")
    model = build_model(config, device="cpu")
    inputs = random_inputs(config)
    context = model.encode_context(inputs["context"], inputs["clip_fea"])
    with pytest.raises(InputError, match="needs a model on a CUDA device"):
        CapturedForward(model, inputs["x"], inputs["t"], context, inputs["y"])


def test_a_compiled_model_passes_the_type_check():
    """torch.compile(model) wraps the WanDiT (an OptimizedModule that forwards its attributes): it is
    captured as the model is, so it is held to the same checks, not refused as another type."""
    config = tiny_config("i2v")
    model = build_model(config, device="cpu")
    inputs = random_inputs(config)
    context = model.encode_context(inputs["context"], inputs["clip_fea"])
    compiled = torch.compile(model)  # (compiles at its first call only: none here)
    with pytest.raises(InputError, match="needs a model on a CUDA device"):
        CapturedForward(compiled, inputs["x"], inputs["t"], context, inputs["y"])
    with pytest.raises(InputError, match="^model must be a WanDiT, got OptimizedModule$"):
        CapturedForward(torch.compile(model.blocks), inputs["x"], inputs["t"], context, inputs["y"])


def test_a_context_not_encoded_is_refused():
    config = tiny_config("i2v")
    model = build_model(config, device="cpu")
    inputs = random_inputs(config)
    with pytest.raises(InputError, match="context must be the EncodedContext of model.encode_context"):
        CapturedForward(model, inputs["x"], inputs["t"], inputs["context"], inputs["y"])


def test_arguments_of_another_type_are_refused_by_name():
    """Checked before the device is: a CPU machine runs them. (None as the model raised an AttributeError.)"""
    config = tiny_config("i2v")
    model = build_model(config, device="cpu")
    inputs = random_inputs(config)
    context = model.encode_context(inputs["context"], inputs["clip_fea"])
    x, t, y = inputs["x"], inputs["t"], inputs["y"]
    for args, kwargs, message in [((None, x, t, context, y), {}, "model must be a WanDiT, got NoneType"),
                                  ((model.blocks, x, t, context, y), {}, "model must be a WanDiT, got ModuleList"),
                                  ((model, None, t, context, y), {}, "x must be a tensor, got NoneType"),
                                  ((model, x, [0.5], context, y), {}, "t must be a tensor, got list"),
                                  ((model, x, t, context, y.numpy()), {}, "y must be a tensor, got ndarray"),
                                  ((model, x, t, context, y), {"warmup": "2"}, "warmup must be an integer, got '2'"),
                                  ((model, x, t, context, y), {"warmup": True}, "warmup must be an integer, got True")]:
        with pytest.raises(InputError, match=f"^{message}$"):
            CapturedForward(*args, **kwargs)
    # A replay's inputs are checked before the GPU is touched too: a captured forward's static inputs
    # stand in for a capture here.
    captured = object.__new__(CapturedForward)
    captured.x, captured.t = x, t
    for args, message in [((None, t), "x must be a tensor, got NoneType"), ((x, 0.5), "t must be a tensor, got float"),
                          ((x[:1], t), "x has shape .*; the graph was captured for")]:
        with pytest.raises(InputError, match=message):
            captured(*args)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("scheme", ["bf16", "fp8"])
def test_replays_match_the_eager_forward(kernels, scheme):
    config = tiny_config("i2v")
    inputs = {k: v.cuda() for k, v in random_inputs(config).items()}
    # kernels="triton": every op that has a Triton kernel runs it (the float linears stay torch).
    with torch.no_grad():
        model = build_model(config, scheme=scheme, device="cuda", backend=kernels)
        context = model.encode_context(inputs["context"], inputs["clip_fea"])
        captured = CapturedForward(model, inputs["x"], inputs["t"], context, inputs["y"])
        outputs = []
        for step in range(3):  # new latents and timesteps each step, as a sampler gives them
            x = torch.randn_like(inputs["x"])
            t = torch.full_like(inputs["t"], 1000.0 - 250 * step)
            replayed = captured(x, t)
            eager = model(x, t, context, y=inputs["y"])
            # Same kernels on the same inputs: only a different cuBLAS algorithm choice could differ.
            torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())
            outputs.append(replayed)
        # Each call returns its own tensor: earlier steps' outputs are not overwritten.
        assert not torch.equal(outputs[0], outputs[1])
        # Other grids of as many tokens push the captured grid's RoPE tables out of the model's cache
        # (their tables would take the freed memory); the graph keeps reading its own.
        grid = model.patch_grid(inputs["x"])
        tokens = grid[0] * grid[1] * grid[2]
        others = [(a, b, tokens // (a * b)) for a in range(1, tokens + 1) for b in range(1, tokens + 1)
                  if tokens % (a * b) == 0 and (a, b, tokens // (a * b)) != grid]
        assert len(others) > POSITION_TABLES_KEPT
        for other in others[:POSITION_TABLES_KEPT + 1]:
            model.positions(other)
        x = torch.randn_like(inputs["x"])
        eager = model(x, inputs["t"], context, y=inputs["y"])
        torch.testing.assert_close(captured(x, inputs["t"]), eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())
        with pytest.raises(InputError, match="captured for"):
            captured(inputs["x"][:1], inputs["t"][:1])
