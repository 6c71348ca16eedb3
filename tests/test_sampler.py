"""The 4-step distilled sampler: exact sigmas/timesteps and both update rules."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from dit8 import DistilledSampler, initial_noise
from dit8.errors import InputError
from dit8.sampler import evenly_spaced_steps, shift_sigmas
from dit8.unipc import UniPCSampler


def test_sigmas_and_timesteps_are_exact():
    sampler = DistilledSampler()
    expected = torch.tensor([1.0, 0.9375, 5 / 6, 0.625], dtype=torch.float64)
    assert sampler.sigmas().dtype == torch.float64
    torch.testing.assert_close(sampler.sigmas(), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(sampler.timesteps(), expected * 1000, rtol=0, atol=1e-12)


def test_shift_formula():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(sigma, 5.0), 5 * sigma / (1 + 4 * sigma))
    torch.testing.assert_close(shift_sigmas(sigma, 1.0), sigma)


def oracle(x0_true: torch.Tensor, sigmas: list[float], seen: list):
    """A perfect flow-matching model for data x0_true: v = (x − x0)/σ."""

    def model(x, t):
        sigma = t[0].item() / 1000
        seen.append((x.clone(), t.clone()))
        assert any(abs(sigma - s) < 1e-6 for s in sigmas)
        return (x - x0_true) / sigma

    return model


@pytest.mark.parametrize("update", ["deterministic", "renoise"])
def test_a_perfect_model_recovers_the_data(update):
    sampler = DistilledSampler(update=update)
    x0_true = torch.randn(2, 16, 3, 4, 6)
    seen = []
    out = sampler.sample(oracle(x0_true, sampler.sigmas().tolist(), seen), initial_noise((2, 16, 3, 4, 6), 7))
    torch.testing.assert_close(out, x0_true, rtol=1e-5, atol=1e-5)
    assert [t[0].item() for _, t in seen] == pytest.approx(sampler.timesteps().tolist())
    assert all(t.shape == (2,) for _, t in seen)


@pytest.mark.parametrize("update", ["deterministic", "renoise"])
def test_the_update_rule_of_each_step(update):
    """deterministic: x = x0 + σ_next·v; "renoise", LightX2V's older rule: x = (1 − σ_next)·x0 + σ_next·ε_new,
    ε_new drawn afresh each step from the generator seeded by `seed`. The last step returns x0."""
    sampler = DistilledSampler(update=update)
    sigmas = sampler.sigmas().tolist()
    velocity = torch.randn(1, 4, 2, 2, 2)
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return velocity

    noise = initial_noise(tuple(velocity.shape), 3)
    out = sampler.sample(model, noise, seed=9)
    generator = torch.Generator().manual_seed(9)
    x, drawn = noise, []
    for i, sigma in enumerate(sigmas):
        torch.testing.assert_close(seen[i], x)
        x0 = x - sigma * velocity
        if i + 1 == len(sigmas):
            x = x0
        elif update == "deterministic":
            x = x0 + sigmas[i + 1] * velocity
        else:
            drawn.append(torch.randn(x.shape, generator=generator))
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * drawn[-1]
    torch.testing.assert_close(out, x)
    if update == "renoise":
        assert not torch.equal(drawn[0], drawn[1])  # fresh noise each step


def test_renoise_is_seeded_and_deterministic_ignores_the_seed():
    model = lambda x, t: 0.5 * x  # noqa: E731
    noise = initial_noise((1, 4, 2, 2, 2), 0)
    renoise = DistilledSampler(update="renoise")
    assert torch.equal(renoise.sample(model, noise, seed=1), renoise.sample(model, noise, seed=1))
    assert not torch.equal(renoise.sample(model, noise, seed=1), renoise.sample(model, noise, seed=2))
    det = DistilledSampler()
    assert torch.equal(det.sample(model, noise, seed=1), det.sample(model, noise, seed=2))


def test_callback_sees_every_step():
    calls = []
    DistilledSampler().sample(lambda x, t: x, initial_noise((1, 2, 1, 2, 2), 0),
                              callback=lambda i, n, x0: calls.append((i, n)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]


@pytest.mark.parametrize("sampler", [DistilledSampler(), DistilledSampler(update="renoise"),
                                     UniPCSampler(steps=4)], ids=["deterministic", "renoise", "unipc"])
def test_a_callback_that_changes_its_x0_changes_nothing(sampler):
    # A preview normalised in place, say: the x0 handed out is the sampler's state (and the result).
    def model(x, t):
        return 0.5 * x + t.view(-1, 1, 1, 1, 1) / 1000

    noise = initial_noise((1, 4, 2, 2, 2), 0)
    expected = sampler.sample(model, noise)
    seen = []

    def scribble(i, n, x0):
        x0.zero_()
        seen.append(i)

    assert torch.equal(sampler.sample(model, noise, callback=scribble), expected) and seen == [0, 1, 2, 3]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 40])
def test_evenly_spaced_steps_round_to_the_nearest_timestep(n):
    """n steps (pipeline `steps=n`): 1000·(n − i)/n rounded to the nearest integer, 4 -> the distilled list."""
    steps = evenly_spaced_steps(n)
    assert len(steps) == n and steps[0] == 1000 and all(isinstance(t, int) for t in steps)
    for i, t in enumerate(steps):
        assert abs(t - 1000 * (n - i) / n) <= 0.5
    if n == 4:
        assert steps == (1000, 750, 500, 250)


def test_initial_noise_is_reproducible():
    assert torch.equal(initial_noise((2, 3), 5), initial_noise((2, 3), 5))
    assert not torch.equal(initial_noise((2, 3), 5), initial_noise((2, 3), 6))
    # spec/pipeline.md: fp32 randn from a generator seeded with the seed (drawn as fp32, not cast from another dtype).
    # (16 values or more: torch draws fewer through another path, where fp32 and fp64 draws agree.)
    expected = torch.randn((2, 16), generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert initial_noise((2, 16), 5).dtype == torch.float32 and torch.equal(initial_noise((2, 16), 5), expected)


@pytest.mark.parametrize("kwargs", [{"update": "euler"}, {"steps": (250, 500)}, {"steps": ()}, {"steps": (1001,)},
                                    {"steps": (1000, 1000, 500)}, {"steps": 4}, {"steps": (1000, 999.5)},
                                    {"steps": (1000.0,)}, {"steps": ("a",)}, {"steps": "1000"}, {"steps": None},
                                    {"steps": (1000, 0)}, {"steps": (1000, True)}])
def test_invalid_settings(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        DistilledSampler(**kwargs)


def test_steps_are_kept_as_a_tuple_of_ints():
    expected = DistilledSampler().timesteps()
    for steps in ([1000, 750, 500, 250], range(1000, 0, -250), np.array([1000, 750, 500, 250])):
        sampler = DistilledSampler(steps=steps)
        assert sampler.steps == (1000, 750, 500, 250) and all(type(s) is int for s in sampler.steps)
        assert torch.equal(sampler.timesteps(), expected)


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.5, "3", True, None])
def test_initial_noise_refuses_a_seed_the_pipeline_refuses(seed):
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        initial_noise((2, 3), seed)


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 1.5, "3", True, None, np.float64(3.0)])
def test_sample_refuses_a_seed_that_is_not_an_integer_in_range(seed):
    # torch's manual_seed raised a RuntimeError naming no argument for most of these, and took -1.
    calls = []
    with pytest.raises(InputError, match=r"^seed must be an integer in \[0, 2\*\*64\)"):
        DistilledSampler(update="renoise").sample(lambda x, t: calls.append(1) or x, initial_noise((1, 2), 0),
                                                  seed=seed)
    assert calls == []


def test_sample_takes_numpy_seeds_and_the_pipelines_largest():
    model = lambda x, t: 0.5 * x  # noqa: E731
    noise, sampler = initial_noise((1, 4, 2, 2, 2), 0), DistilledSampler(update="renoise")
    assert torch.equal(sampler.sample(model, noise, seed=np.int64(7)), sampler.sample(model, noise, seed=7))
    assert torch.isfinite(sampler.sample(model, noise, seed=2 ** 63)).all()  # a call's seed 2**63 - 1, plus 1


@pytest.mark.parametrize("shape", [(1, -2), (True, 2), (1, 2.5), "12", None, 5, (1, None)])
def test_initial_noise_refuses_a_bad_shape_naming_it(shape):
    # torch.randn raised a RuntimeError (a negative size) or a TypeError that named no argument.
    with pytest.raises(InputError, match="^shape must be a sequence of sizes"):
        initial_noise(shape, 0)
    assert initial_noise([np.int64(2), 3], 0).shape == initial_noise(torch.Size([2, 3]), 0).shape == (2, 3)


def test_initial_noise_refuses_a_bad_device():
    with pytest.raises(InputError, match="'bogus' is not a device name"):
        initial_noise((2, 3), 0, device="bogus")
    assert torch.equal(initial_noise((2, 3), np.int64(5)), initial_noise((2, 3), 5))


@pytest.mark.parametrize("sampler", [DistilledSampler, UniPCSampler])
@pytest.mark.parametrize("shift", [0, -1.0, float("inf"), float("nan"), "5", True, 1e-4, 1e4])
def test_shift_must_be_a_number_the_schedules_take(sampler, shift):
    with pytest.raises(InputError, match=r"shift must be a number in \[0.001, 1000\]"):
        sampler(shift=shift)


@pytest.mark.parametrize("sampler", [DistilledSampler, UniPCSampler])
@pytest.mark.parametrize("shift", [Fraction(5), np.float32(5.0), 5])
def test_a_real_shift_is_kept_as_a_float(sampler, shift):
    # check_shift takes any real number; a Fraction was stored as given and failed in sigmas().
    got = sampler(shift=shift)
    assert type(got.shift) is float
    assert torch.equal(got.sigmas(), sampler(shift=5.0).sigmas())


@pytest.mark.parametrize("shift", [1e-3, 1e3])
@pytest.mark.parametrize("steps", [1, 4, 40])
def test_the_extreme_shifts_give_finite_schedules_within_the_timesteps(shift, steps):
    """At the range's ends the official formula still gives timesteps in [0, 1000] and finite samples; past
    them it does not (1e-4: a first timestep of 1000.0000000001; 1e5: UniPC's first σ is 1 in fp32)."""
    model = lambda x, t: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1, 1)  # noqa: E731
    noise = initial_noise((1, 4, 2, 3, 3), 0)
    distilled = DistilledSampler(steps=evenly_spaced_steps(steps), shift=shift)
    assert 0 <= distilled.timesteps().min() and distilled.timesteps().max() <= 1000
    for sampler in (distilled, UniPCSampler(steps=steps, shift=shift)):
        assert torch.isfinite(sampler.sample(model, noise)).all()


@pytest.mark.parametrize("sampler", [DistilledSampler(), DistilledSampler(update="renoise"),
                                     UniPCSampler(steps=4)], ids=["deterministic", "renoise", "unipc"])
@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("-inf"), "Inf")])
def test_noise_with_nan_or_inf_is_refused_naming_it(sampler, value, kind):
    # It ran through every step into NaN latents (a model that checks no values, e.g. a WanDiT on a GPU), or
    # a WanDiT on the CPU refused it as its "x".
    calls = []

    def model(x, t):
        calls.append(1)
        return 0.5 * x

    noise = initial_noise((1, 4, 2, 2, 2), 0)
    noise.view(-1)[5] = value
    with pytest.raises(InputError, match=f"^noise contains {kind} values"):
        sampler.sample(model, noise)
    with pytest.raises(InputError, match="^noise must be a tensor, got list"):
        sampler.sample(model, noise.tolist())
    assert calls == []


@pytest.mark.parametrize("sampler", [DistilledSampler(), UniPCSampler(steps=4)], ids=["distilled", "unipc"])
@pytest.mark.parametrize("noise, message", [(torch.tensor(0.5), "noise must have a batch dimension first"),
                                            (torch.zeros(1, 4, 2, 2, 2, device="meta"), "noise is a meta tensor")])
def test_noise_without_a_batch_dimension_or_values_is_refused(sampler, noise, message):
    # An IndexError (the batch size is the first dimension) and a RuntimeError from torch (reading values
    # of a meta tensor), naming no argument.
    with pytest.raises(InputError, match=f"^{message}"):
        sampler.sample(lambda x, t: x, noise)
