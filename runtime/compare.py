"""End-to-end quantization error: the DiT output of a quantized checkpoint against that of its
high-precision source, on the same inputs: what quantization costs the model as a whole, where the
converter's per-layer report measures the weights alone.

The inputs are random, of the model's own shapes and seeded: Gaussian latents, text features (all
text_len rows) and, for I2V, CLIP features and the conditioning channels. Each model runs the steps of
the distilled sampler's schedule (four timesteps at shift 5, where the 8-bit path is used), one model at
a time, so peak memory is that of the larger model, not of both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conditioning import check_frames, check_grid, check_size, latent_shape
from .config import WanConfig
from .devices import resolve_device
from .errors import InputError, NumericalError
from .loader import load_dit, open_dit
from .model import WanDiT, check_attention_tokens, check_backend_and_attention
from .random_dit import CLIP_TOKENS
from .sampler import DistilledSampler


@dataclass(frozen=True)
class StepError:
    """The quantized model's output against the reference's at one timestep."""

    timestep: float
    relative_error: float  # ‖quantized − reference‖ / ‖reference‖ (Frobenius, float64)
    cosine: float  # cosine similarity of the two outputs, flattened


@dataclass(frozen=True)
class OutputComparison:
    """`compare_outputs`' result: the error over all timesteps together, and at each."""

    reference: str
    quantized: str
    relative_error: float
    cosine: float
    steps: list[StepError] = field(default_factory=list)
    frames: int = 0
    size: tuple[int, int] = (0, 0)  # width, height in pixels
    tokens: int = 0
    seed: int = 0
    device: str = ""
    dtype: str = ""
    backend: str = "auto"  # as asked for: "auto" chooses per op
    attention: str = "bf16"


@dataclass(frozen=True)
class _Inputs:
    x: torch.Tensor
    context: torch.Tensor
    clip_fea: torch.Tensor | None
    y: torch.Tensor | None


def _random_inputs(config: WanConfig, frames: int, size: tuple[int, int], seed: int,
                   device: torch.device) -> _Inputs:
    """Seeded Gaussian inputs of the model's shapes, drawn on the CPU (the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    width, height = size
    c, T, h, w = latent_shape(frames, height, width, channels=config.out_dim)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device)

    x, context = randn(1, c, T, h, w), randn(1, config.text_len, config.text_dim)
    if not config.is_i2v:
        return _Inputs(x, context, None, None)
    return _Inputs(x, context, randn(1, CLIP_TOKENS, config.clip_dim), randn(1, config.in_dim - c, T, h, w))


def _outputs(model: WanDiT, inputs: _Inputs, timesteps: torch.Tensor) -> list[torch.Tensor]:
    """The model's output at each timestep, fp32 on the CPU."""
    device = model.setup.device
    with torch.no_grad():
        encoded = model.encode_context(inputs.context, inputs.clip_fea)
        return [model(inputs.x, torch.full((1,), float(t), device=device), encoded, y=inputs.y).float().cpu()
                for t in timesteps]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if float(ref.norm()) == 0:  # (two zero outputs agree; a zero reference gives no scale to anything else)
        return 0.0 if float(out.norm()) == 0 else math.inf
    return float((out - ref).norm() / ref.norm())


def _cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    cosine = float(torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0))
    return min(max(cosine, -1.0), 1.0)  # (rounding puts equal outputs a few ulps above 1)


def compare_outputs(reference: str | Path, quantized: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, frames: int = 81, size: tuple[int, int] = (832, 480),
                    seed: int = 0, backend: str = "auto", attention: str = "bf16",
                    progress: bool | None = None) -> OutputComparison:
    """The DiT output of the checkpoint `quantized` against that of `reference` (its high-precision
    source), on the same seeded random inputs for `frames` frames of `size` (width, height) pixels, at
    each timestep of the distilled 4-step schedule.

    Both checkpoints load as `dit8.load_dit` loads them (any layout or format it reads), one after the
    other on `device`, with the compute `dtype` (default: bf16 on CUDA, fp32 on the CPU) and `backend`;
    the reference runs bf16 (unquantized) attention, the quantized model `attention`. Raises InputError
    when the two are not the same model (their dimensions differ) or an argument is out of range,
    CheckpointError for a problem in either file, and NumericalError naming the file when a model's output
    holds NaN or Inf (an fp16 overflow, say).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise InputError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
    frames = check_frames(frames)  # a plain int (numpy's integers are taken): the result's field is one
    width, height = check_size(size)
    device = resolve_device(device)
    check_backend_and_attention(backend, attention, device)  # before the reference's load and forwards
    ref_dit, low_dit = open_dit(reference), open_dit(quantized)
    if ref_dit.config != low_dit.config:
        differ = [f"{name} {a} against {b}" for name, a in ref_dit.config.to_dict().items()
                  if (b := low_dit.config.to_dict()[name]) != a]
        raise InputError(f"{quantized} is not a quantization of {reference}: they differ in "
                         f"{', '.join(differ)}")
    config = ref_dit.config
    grid = check_grid(frames, height, width, patch=config.patch_size)
    for precision in ("bf16", attention):  # the reference's and the quantized model's attention
        check_attention_tokens(config, math.prod(grid), f"a {width}x{height} video of {frames} frames",
                               backend=backend, attention=precision, device=device)
    inputs = _random_inputs(config, frames, (width, height), seed, device)
    timesteps = DistilledSampler().timesteps()

    outputs = []
    for path, precision in ((reference, "bf16"), (quantized, attention)):
        model = load_dit(path, device=device, dtype=dtype, backend=backend, attention=precision, progress=progress)
        compute_dtype = model.setup.dtype
        outputs.append(_outputs(model, inputs, timesteps))
        # No error can be measured against a non-finite output: a NaN reference came out as an infinite
        # error of the quantized model, with nothing to say which of the two had overflowed.
        for t, out in zip(timesteps, outputs[-1]):
            if not torch.isfinite(out).all():
                raise NumericalError(f"{path}: the DiT's output at timestep {float(t):g} holds "
                                     f"{'NaN' if torch.isnan(out).any() else 'Inf'} values with compute dtype "
                                     f"{str(compute_dtype).removeprefix('torch.')} (a dtype overflowed); no "
                                     f"error can be measured")
        del model  # one model at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref, low = outputs
    steps = [StepError(float(t), _relative_error(o, r), _cosine(o, r)) for t, o, r in zip(timesteps, low, ref)]
    all_ref, all_low = torch.stack(ref), torch.stack(low)
    return OutputComparison(
        reference=str(reference), quantized=str(quantized), relative_error=_relative_error(all_low, all_ref),
        cosine=_cosine(all_low, all_ref), steps=steps, frames=frames, size=(width, height),
        tokens=math.prod(inputs.x.shape[2:]) // math.prod(config.patch_size), seed=seed, device=str(device),
        dtype=str(compute_dtype).removeprefix("torch."), backend=backend, attention=attention)
