"""UniPC for the base model: the official grid, first order = Euler, agreement with diffusers'
UniPCMultistepScheduler (an independent implementation), second-order convergence on a Gaussian toy
problem whose exact flow is known, and classifier-free guidance."""

import math

import numpy as np
import pytest
import torch

from dit8.errors import InputError
from dit8.pipeline import check_settings
from dit8.unipc import DEFAULT_NEGATIVE_PROMPT, MAX_STEPS, UniPCSampler, guided, unipc_sigmas


def official_grid(steps: int, shift: float):
    """Wan's FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift), transcribed in numpy."""
    sigma_max = float(np.float32(1 - np.linspace(1, 1 / 1000, 1000)[::-1][0]))  # 0.999 stored as fp32
    sigmas = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = (sigmas * 1000).astype(np.int64)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32), timesteps


@pytest.mark.parametrize("steps, shift", [(40, 3.0), (40, 5.0), (4, 1.0), (1, 3.0)])
def test_grid_is_the_official_one(steps, shift):
    sigmas, timesteps = unipc_sigmas(steps, shift)
    want_sigmas, want_timesteps = official_grid(steps, shift)
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0 and timesteps.dtype == torch.int64
    assert sigmas.tolist() == want_sigmas.astype(np.float64).tolist()
    assert timesteps.tolist() == want_timesteps.tolist()
    assert timesteps[0] == 999  # 0.999 shifted stays below 1: log-SNR is finite at the first step


def test_grid_values_40_steps_shift_3():
    sampler = UniPCSampler()
    assert (sampler.steps, sampler.shift, sampler.order) == (40, 3.0, 2)
    t = sampler.timesteps().tolist()
    # by hand: σ = 0.999·39/40 = 0.974025 -> 3σ/(1 + 2σ) = 0.99119 -> 991; σ = 0.999/40 -> 0.07136 -> 71
    assert t[:3] == [999, 991, 982] and t[-1] == 71 and len(t) == 40
    assert sampler.sigmas()[1].item() == pytest.approx(3 * (0.999 * 39 / 40) / (1 + 2 * (0.999 * 39 / 40)), abs=1e-7)


def linear_model(calls=None):
    gen = torch.Generator().manual_seed(3)
    A = 0.3 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)

    def model(x, t):
        if calls is not None:
            calls.append((x.clone(), t.clone()))
        return x @ A + b + 1e-3 * t[:, None].double()

    return model


def euler(model, x, sigmas, timesteps):
    for i in range(len(timesteps)):
        t = torch.full((x.shape[0],), float(timesteps[i]))
        x = x + (sigmas[i + 1] - sigmas[i]) * model(x, t)
    return x


def test_first_order_without_corrector_is_euler():
    sampler = UniPCSampler(steps=7, shift=3.0, order=1, corrector=False)
    x = torch.randn(3, 6, dtype=torch.float64)
    out = sampler.sample(linear_model(), x)
    want = euler(linear_model(), x, sampler.sigmas().tolist(), sampler.timesteps().tolist())
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_first_step_is_euler_and_last_lands_on_the_x0_estimate():
    calls = []
    sampler = UniPCSampler(steps=5)
    x = torch.randn(2, 6, dtype=torch.float64)
    out = sampler.sample(linear_model(calls), x)
    sigmas, timesteps = sampler.sigmas().tolist(), sampler.timesteps().tolist()
    assert len(calls) == 5 and [c[1][0].item() for c in calls] == [float(t) for t in timesteps]
    assert all(c[1].dtype == torch.float32 and c[1].shape == (2,) for c in calls)
    # Step 1 has no history: order 1, no corrector, so the model's second input is the Euler step.
    v0 = linear_model()(x, calls[0][1])
    torch.testing.assert_close(calls[1][0], x + (sigmas[1] - sigmas[0]) * v0, rtol=1e-12, atol=1e-12)
    # The last step goes to sigma = 0 at first order: the x0 estimate at the last point evaluated.
    x_last, t_last = calls[-1]
    torch.testing.assert_close(out, x_last - sigmas[-2] * linear_model()(x_last, t_last), rtol=1e-12, atol=1e-12)


# Order 3 at 4 and 10 steps: the second-to-last step drops to order 2 (lower_order_final) with 3 estimates at hand.
@pytest.mark.parametrize("steps, order", [(3, 2), (10, 2), (40, 2), (4, 3), (10, 3)])
def test_matches_diffusers_unipc(steps, order):
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    sampler = UniPCSampler(steps=steps, shift=3.0, order=order)
    sigmas, timesteps = unipc_sigmas(steps, 3.0)
    gen = torch.Generator().manual_seed(steps)
    A = 0.3 * torch.randn(8, 8, generator=gen)
    model = lambda x, t: torch.tanh(x @ A) + 1e-3 * t[:, None] * x  # noqa: E731  (nonlinear, t-dependent)
    x0 = torch.randn(2, 8, generator=gen)
    ours = sampler.sample(model, x0)

    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, solver_order=order, solver_type="bh2",
                                                  predict_x0=True, lower_order_final=True)
    scheduler.set_timesteps(steps)
    # diffusers spaces its flow grid a little differently; give it Wan's grid, so the update rules compare.
    scheduler.sigmas, scheduler.timesteps = sigmas.float(), timesteps
    scheduler.set_begin_index(0)
    x = x0.clone()
    for t in timesteps:
        x = scheduler.step(model(x, torch.full((2,), float(t))), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def gaussian_toy_error(steps: int, shift: float, **kwargs) -> float:
    """Data x0 ~ N(m, s²) per element: the marginal at σ is N((1−σ)m, r(σ)²), r² = (1−σ)²s² + σ², so the
    exact flow keeps the standardised value z: x(σ) = (1−σ)m + r(σ)·z, with velocity
    v = dx/dσ = −m + (r'/r)(x − (1−σ)m). Start exactly on it at the first σ; compare with m + s·z."""
    m, s = 0.5, 1.0
    sampler = UniPCSampler(steps=steps, shift=shift, **kwargs)
    sigmas = sampler.sigmas().tolist()
    calls = iter(range(steps))

    def r(sigma):
        return math.sqrt((1 - sigma) ** 2 * s ** 2 + sigma ** 2)

    def model(x, t):
        sigma = sigmas[next(calls)]  # the exact σ of this step (t is its truncated integer)
        return -m + ((sigma - (1 - sigma) * s ** 2) / r(sigma) ** 2) * (x - (1 - sigma) * m)

    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)[None]
    out = sampler.sample(model, (1 - sigmas[0]) * m + r(sigmas[0]) * z)
    return (out - (m + s * z)).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_converges_at_second_order(shift):
    errors = [gaussian_toy_error(n, shift) for n in (64, 128, 256)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < 1e-3
    assert all(1.8 < p < 2.4 for p in orders), (errors, orders)
    # Euler (first order, no corrector) on the same problem: order 1 and a much larger error.
    euler_errors = [gaussian_toy_error(n, shift, order=1, corrector=False) for n in (64, 128, 256)]
    assert all(0.9 < math.log2(euler_errors[i] / euler_errors[i + 1]) < 1.1 for i in range(2))
    assert euler_errors[-1] > 20 * errors[-1]


def test_guidance():
    cond = lambda x, t: 2 * x  # noqa: E731
    uncond = lambda x, t: x + 1  # noqa: E731
    x, t = torch.randn(1, 3), torch.zeros(1)
    torch.testing.assert_close(guided(cond, uncond, 5.0)(x, t), (x + 1) + 5 * (2 * x - (x + 1)))
    assert guided(cond, uncond, 1.0) is cond  # no CFG: one forward per step
    assert guided(cond, None, 5.0) is cond
    assert "JPEG" in DEFAULT_NEGATIVE_PROMPT and DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽")


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"order": 4}, {"shift": 0.0}, {"steps": 2.5}, {"steps": True},
                                    {"steps": 1001}, {"steps": 10**12}, {"order": True}, {"order": 2.0},
                                    {"corrector": "no"}])
def test_invalid_settings(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        UniPCSampler(**kwargs)


def test_the_sampler_takes_the_steps_a_pipeline_call_takes():
    timesteps = UniPCSampler(steps=MAX_STEPS).timesteps()
    assert MAX_STEPS == 1000 and timesteps.shape == (1000,) and 0 <= timesteps.min() <= timesteps.max() <= 1000
    with pytest.raises(InputError, match=r"steps must be an integer in \[1, 1000\]"):
        check_settings(steps=MAX_STEPS + 1)


def test_numpy_integers_are_taken_as_ints():
    # As the pipeline's steps and DistilledSampler's timesteps: numpy's integers count too.
    sampler = UniPCSampler(steps=np.int64(3), order=np.int32(2))
    assert sampler == UniPCSampler(steps=3, order=2)
    assert type(sampler.steps) is int and type(sampler.order) is int
    torch.testing.assert_close(sampler.sigmas(), UniPCSampler(steps=3).sigmas())
