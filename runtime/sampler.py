"""The 4-step distilled flow-matching sampler of LightX2V's StepDistill + CfgDistill Wan2.1 models, and
what every flow-matching sampler here shares (the denoiser type, the σ shift, the seeded noise).

Latent path x_σ = (1 − σ)·x0 + σ·ε; the model predicts v = ε − x0, so x0 = x − σ·v. No guidance: one
model call per step.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .choices import DETERMINISTIC, RENOISE, UPDATE_RULES  # noqa: F401 (RENOISE: its import path before choices.py)
from .devices import check_not_meta, resolve_device
from .errors import InputError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""model(x [B, ...], t [B]) -> velocity v, like `functools.partial(model, context=..., y=...)` of a WanDiT."""


# The shifts the schedules take. Past them the official formula (shift_sigmas) degenerates in floating
# point: below, the first timestep rounds past 1000 (and near 1e-17 its denominator to 0); above, UniPC's
# first σ rounds to 1 in fp32, whose log-SNR is infinite. Published models use 3 to 17.
SHIFT_RANGE = (1e-3, 1e3)


def check_shift(shift: float) -> float:
    """`shift` if it is a number in SHIFT_RANGE, else an InputError naming it."""
    low, high = SHIFT_RANGE
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not low <= shift <= high:
        raise InputError(f"shift must be a number in [{low:g}, {high:g}], got {shift!r}")
    return float(shift)


def check_seed(seed: object) -> int:
    """`seed` if it is an integer in [0, 2**63) (numpy's too), else an InputError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def check_noise(noise: object) -> None:
    """InputError unless `noise` is a tensor of finite values. NaN or Inf would run through every step
    into NaN latents (a WanDiT checks its x only in CPU tensors; another model may not at all). Checked
    on any device: once a sampling, not once a step."""
    if not isinstance(noise, torch.Tensor):
        raise InputError(f"noise must be a tensor, got {type(noise).__name__}")
    # The samplers read the batch size from the first dimension (an IndexError for a 0-d tensor) and the
    # values below (a meta tensor has none: a RuntimeError from torch).
    if noise.dim() == 0:
        raise InputError("noise must have a batch dimension first, got a 0-d tensor")
    check_not_meta(noise, "noise")
    if not torch.isfinite(noise).all():
        raise InputError(f"noise contains {'NaN' if torch.isnan(noise).any() else 'Inf'} values")


def callback_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` for a sampler's callback to keep and change as it likes: made outside inference mode,
    so an ordinary tensor even where the sampling runs in it (an inference tensor refuses in-place changes
    once that mode is left)."""
    with torch.inference_mode(False):
        return x.clone()


def evenly_spaced_steps(n: int) -> tuple[int, ...]:
    """n timesteps evenly spaced on the 1000 grid: 4 -> (1000, 750, 500, 250), the distilled schedule."""
    return tuple(round(1000 * (n - i) / n) for i in range(n))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): spends more of the steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class DistilledSampler:
    """steps: timesteps on the 1000-step grid, strictly decreasing integers in (0, 1000] (any sequence,
    kept as a tuple; `evenly_spaced_steps(n)` gives n of them); shift: the sigma shift; update: how a step moves
    from its x0 estimate to the next noise level ("deterministic" x0 + σ_next·v, or "renoise" with
    fresh seeded noise)."""

    steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    update: str = DETERMINISTIC

    def __post_init__(self) -> None:
        if self.update not in UPDATE_RULES:
            raise InputError(f"update must be one of {UPDATE_RULES}, got {self.update!r}")
        if isinstance(self.steps, numbers.Integral):  # a count, as UniPCSampler's steps is
            raise InputError(f"steps are the timesteps, e.g. (1000, 750, 500, 250), not a count; got {self.steps!r} "
                             f"(evenly_spaced_steps({self.steps!r}) gives that many)")
        try:  # integers (numpy's and 0-d tensors too): a step indexes the 1000-step grid, which would take
            # 999.5 for 999 without a word
            steps = [operator.index(s) for s in self.steps if not isinstance(s, bool)]
            whole = not isinstance(self.steps, (str, bytes)) and len(steps) == len(self.steps)
        except TypeError:
            whole = False
        if (not whole or not steps or any(not 0 < s <= 1000 for s in steps)
                or any(a <= b for a, b in zip(steps, steps[1:]))):
            raise InputError(f"steps must be strictly decreasing integers in (0, 1000], got {self.steps!r}")
        object.__setattr__(self, "steps", tuple(steps))  # (frozen) a tuple of ints, whatever sequence was given
        # A float, whatever real number was given: a Fraction passed the check and then failed in sigmas()
        # (Fraction * Tensor is a TypeError), a numpy float stayed one.
        object.__setattr__(self, "shift", check_shift(self.shift))

    def sigmas(self) -> torch.Tensor:
        """σ of each step, float64: [1, 0.9375, 0.8333…, 0.625] for the defaults."""
        grid = shift_sigmas(torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1], self.shift)
        return grid[[1000 - s for s in self.steps]]

    def timesteps(self) -> torch.Tensor:
        """The model's timestep input per step, σ·1000, float64."""
        return self.sigmas() * 1000

    def sample(self, model: Denoiser, noise: torch.Tensor, *, seed: int = 0,
               callback: Callable[[int, int, torch.Tensor], object] | None = None) -> torch.Tensor:
        """Run every step from `noise` (fp32 latents at σ = 1; NaN or Inf: InputError); returns the final x0
        estimate.

        seed: seeds the fresh noise of the "renoise" rule (unused by "deterministic"): an integer in
            [0, 2**64) (the pipeline passes its own seed + 1); InputError otherwise.
        callback(step, num_steps, x0): called after each step with a copy of that step's x0 estimate
            (the last one is the result: a callback that changes what it is given changes nothing).
        """
        check_noise(noise)
        # torch's manual_seed refused a float, a bool or a numpy integer with a RuntimeError or TypeError
        # that named no argument, and wrapped a negative seed around.
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
            raise InputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        sigmas = self.sigmas().tolist()
        # Drawn on the CPU, as initial_noise: a seed gives the same video on any device.
        generator = torch.Generator().manual_seed(int(seed))
        x = noise.float()
        x0 = x
        for i, sigma in enumerate(sigmas):
            t = torch.full((x.shape[0],), sigma * 1000, dtype=torch.float32, device=x.device)
            v = model(x, t).float()
            x0 = x - sigma * v
            if i + 1 < len(sigmas):
                nxt = sigmas[i + 1]
                if self.update == DETERMINISTIC:
                    x = x0 + nxt * v
                else:
                    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                    x = (1 - nxt) * x0 + nxt * eps
            if callback is not None:
                callback(i, len(sigmas), callback_copy(x0))
        return x0


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded fp32 Gaussian latents; the same seed gives the same noise on any machine (drawn on the CPU).
    `seed` as the pipeline takes it (an integer in [0, 2**63)); InputError for a bad shape, seed or device."""
    # Checked here: torch.randn raised a RuntimeError for a negative size, a TypeError naming no argument else.
    if (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence)
            or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in shape)):
        raise InputError(f"shape must be a sequence of sizes (integers >= 0), got {shape!r}")
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(check_seed(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
