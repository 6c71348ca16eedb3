"""UniPC multistep sampler for the undistilled (base) Wan2.1 models, and classifier-free guidance.

Flow matching as in spec/pipeline.md: x_σ = (1 − σ)·x0 + σ·ε, the model predicts v = ε − x0, so its
x0 estimate is x − σ·v. UniPC (Zhao et al. 2023) as the official Wan code configures it
(`FlowUniPCMultistepScheduler`): order 2, predict-x0, the B(h) = e^h − 1 variant ("bh2", which the
predict-x0 form evaluates at −h: e^−h − 1), the UniC corrector on every step after the first, and the
last step first order, straight to σ = 0.

Grid: σ = linspace(0.999, 0, steps + 1)[:-1], shifted (σ' = s·σ / (1 + (s − 1)·σ)), then 0 appended;
the model is fed the truncated integer timesteps int(σ'·1000). 0.999 rather than 1 keeps log-SNR
λ = log((1 − σ)/σ) finite at the first step.

One step, from σ_s to σ_t with h = λ_t − λ_s and m_i the x0 estimates so far (newest last):

    predictor (order p):  x_t = (σ_t/σ_s)·x − α_t·(e^−h − 1)·m_s − α_t·B(h)·Σ_k ρ_k·D_k
    corrector (order p):  the same from the previous point, with the new estimate m_t as one more
                          difference (the model is not called again for it)

with α = 1 − σ, D_k = (m_{s−k} − m_s)/r_k, r_k = (λ_{s−k} − λ_s)/h and ρ from a small linear system
(ρ = 1/2 for order 2). Order 1 without corrector is the Euler step x + (σ_t − σ_s)·v.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import InputError
from .sampler import Denoiser, callback_copy, check_noise, check_shift, shift_sigmas

__all__ = ["DEFAULT_NEGATIVE_PROMPT", "UniPCSampler", "guided", "unipc_sigmas"]

# Wan2.1's default negative prompt (wan/configs/shared_config.py, `sample_neg_prompt`), used for CFG.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的"
    "肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

SIGMA_MAX = float(torch.tensor(0.999, dtype=torch.float32))  # the official value is this fp32 number


def unipc_sigmas(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ [steps + 1] float64 ending in 0, timesteps [steps] int64) of the official UniPC grid.

    The σ values are rounded to fp32 as the official scheduler stores them; the timesteps are
    int(σ'·1000) of the unrounded float64 σ', truncated as the official `.to(torch.int64)` does."""
    grid = torch.linspace(SIGMA_MAX, 0, steps + 1, dtype=torch.float64)[:-1]
    shifted = shift_sigmas(grid, shift)
    timesteps = (shifted * 1000).to(torch.int64)
    sigmas = torch.cat([shifted, shifted.new_zeros(1)]).float().double()
    return sigmas, timesteps


def _log_snr(sigma: float) -> float:
    return math.log(1 - sigma) - math.log(sigma)


def _coefficients(h: float, rks: list[float], order: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """R (order x order), b (order), e^−h − 1 and B(h) = e^−h − 1 of UniPC-bh2 in predict-x0 form."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)  # bh2; bh1 would be hh
    rk = torch.tensor(rks + [1.0], dtype=torch.float64)
    R = torch.stack([rk ** i for i in range(order)])
    b = []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return R, torch.tensor(b, dtype=torch.float64), h_phi_1, b_h


def _combine(weights: list[float], tensors: list[torch.Tensor]) -> torch.Tensor | float:
    out: torch.Tensor | float = 0.0
    for w, t in zip(weights, tensors):
        out = out + w * t
    return out


# A call's most steps, the pipeline's limit too. The model's timesteps are integers in [0, 1000]: past a
# few hundred steps the grid repeats them (1,000 steps at shift 3 hold 732 distinct ones), and an
# unbounded count such as 10**12 ended in a raw allocation error.
MAX_STEPS = 1000


@dataclass(frozen=True)
class UniPCSampler:
    """steps: number of model evaluations; shift: the sigma shift (3.0 for 480P I2V, 5.0 for 720P);
    order: predictor order (2 as Wan; 1 to 3); corrector: apply UniC after every step but the first."""

    steps: int = 40
    shift: float = 3.0
    order: int = 2
    corrector: bool = True

    def __post_init__(self) -> None:
        # Integers as the pipeline and DistilledSampler take them (numpy's too); a bool is no count, and
        # True in (1, 2, 3) would pass for order 1.
        if (isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral)
                or not 1 <= self.steps <= MAX_STEPS):
            raise InputError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        if isinstance(self.order, bool) or not isinstance(self.order, numbers.Integral) or self.order not in (1, 2, 3):
            raise InputError(f"order must be 1, 2 or 3, got {self.order!r}")
        if not isinstance(self.corrector, bool):  # a string such as "no" would read as True
            raise InputError(f"corrector must be True or False, got {self.corrector!r}")
        # (frozen) plain ints and a float, whatever integer or real number was given (a Fraction shift
        # failed in sigmas())
        object.__setattr__(self, "shift", check_shift(self.shift))
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "order", int(self.order))

    def sigmas(self) -> torch.Tensor:
        """σ of each step plus the final 0: [steps + 1] float64."""
        return unipc_sigmas(self.steps, self.shift)[0]

    def timesteps(self) -> torch.Tensor:
        """The model's (integer) timestep input per step: [steps] int64."""
        return unipc_sigmas(self.steps, self.shift)[1]

    def sample(self, model: Denoiser, noise: torch.Tensor, *,
               callback: Callable[[int, int, torch.Tensor], object] | None = None) -> torch.Tensor:
        """Integrate from `noise` (latents at the first σ, ≈ 1; NaN or Inf: InputError) to σ = 0 and return
        the result, in fp32 (fp64 when `noise` is fp64).

        model(x, t) -> v with t [B] float timesteps; callback(step, num_steps, x0) after each step with
        a copy of that step's x0 estimate (the model's, at the point it was evaluated; the later steps
        use it, so the callback gets its own to change as it likes).
        """
        check_noise(noise)
        sigmas_t, timesteps_t = unipc_sigmas(self.steps, self.shift)
        sigmas, timesteps = sigmas_t.tolist(), timesteps_t.tolist()
        lambdas = [_log_snr(s) if 0 < s < 1 else math.inf for s in sigmas]
        dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32  # fp32, or fp64 for tests
        x = noise.to(dtype)
        history: list[torch.Tensor] = []  # x0 estimates of previous steps, newest last
        last_x: torch.Tensor | None = None  # the point the previous step started from
        last_order = 0
        for i in range(self.steps):
            t = torch.full((x.shape[0],), float(timesteps[i]), dtype=torch.float32, device=x.device)
            m = x - sigmas[i] * model(x, t).to(dtype)
            if self.corrector and last_x is not None:
                x = self._correct(x_prev=last_x, m_new=m, history=history, lambdas=lambdas, sigmas=sigmas,
                                  i=i, order=last_order)
            history = (history + [m])[-self.order:]
            # Lower order at the start (too little history) and on the final steps (σ → 0).
            order = min(self.order, self.steps - i, len(history))
            last_x, last_order = x, order
            x = self._predict(x, history, lambdas, sigmas, i, order)
            if callback is not None:
                callback(i, self.steps, callback_copy(m))
        return x

    @staticmethod
    def _predict(x: torch.Tensor, history: list[torch.Tensor], lambdas: list[float], sigmas: list[float],
                 i: int, order: int) -> torch.Tensor:
        """UniP: from σ_i to σ_{i+1} using the last `order` x0 estimates."""
        m0 = history[-1]
        sigma_s, sigma_t = sigmas[i], sigmas[i + 1]
        if sigma_t == 0:
            return m0  # to σ = 0 the first-order step lands on the x0 estimate (e^−h − 1 = −1, α = 1)
        h = lambdas[i + 1] - lambdas[i]
        rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, order)]
        R, b, h_phi_1, b_h = _coefficients(h, rks, order)
        alpha_t = 1 - sigma_t
        x_t = (sigma_t / sigma_s) * x - (alpha_t * h_phi_1) * m0
        if order > 1:
            diffs = [(history[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            x_t = x_t - (alpha_t * b_h) * _combine(rhos, diffs)
        return x_t

    @staticmethod
    def _correct(*, x_prev: torch.Tensor, m_new: torch.Tensor, history: list[torch.Tensor],
                 lambdas: list[float], sigmas: list[float], i: int, order: int) -> torch.Tensor:
        """UniC: redo the step σ_{i−1} -> σ_i from x_prev, adding the estimate m_new made at σ_i."""
        m0 = history[-1]
        sigma_s, sigma_t = sigmas[i - 1], sigmas[i]
        h = lambdas[i] - lambdas[i - 1]
        rks = [(lambdas[i - 1 - k] - lambdas[i - 1]) / h for k in range(1, order)]
        R, b, h_phi_1, b_h = _coefficients(h, rks, order)
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        diffs = [(history[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
        alpha_t = 1 - sigma_t
        x_t = (sigma_t / sigma_s) * x_prev - (alpha_t * h_phi_1) * m0
        return x_t - (alpha_t * b_h) * (_combine(rhos[:-1], diffs) + rhos[-1] * (m_new - m0))


def guided(cond: Denoiser, uncond: Denoiser | None, guidance: float) -> Denoiser:
    """Classifier-free guidance: v = v_u + g·(v_c − v_u). With g = 1 (or no unconditional model) only
    the conditional model runs: one forward per step, as the CFG-distilled models need."""
    if uncond is None or guidance == 1:
        return cond

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c = cond(x, t).float()
        v_u = uncond(x, t).float()
        return v_u + guidance * (v_c - v_u)

    return model
