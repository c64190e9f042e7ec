from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.diffusion import NoiseScheduler, PredictionType, make_betas


def _x0_and_noise(shape=(3, 1, 4, 6, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=generator), torch.randn(shape, generator=generator)


def test_schedule_tensors_are_float32_buffers_and_no_parameters():
    scheduler = NoiseScheduler(num_timesteps=10, schedule="cosine")
    assert list(scheduler.parameters()) == []
    buffers = dict(scheduler.named_buffers())
    assert {"betas", "alphas_cumprod", "sqrt_alphas_cumprod", "posterior_variance"} <= set(buffers)
    assert all(b.dtype == torch.float32 and b.shape == (10,) for b in buffers.values())
    assert "alphas_cumprod" in scheduler.state_dict()
    assert len(scheduler) == 10
    expected = torch.cumprod(1 - make_betas("cosine", 10), 0).float()
    torch.testing.assert_close(scheduler.alphas_cumprod, expected)
    assert scheduler.to(torch.float64).alphas_cumprod.dtype == torch.float64  # follows .to like any buffer


@pytest.mark.parametrize("num_timesteps", [1, 10, 1000])
def test_add_noise_matches_the_closed_form_of_ddpm_eq_4(num_timesteps):
    scheduler = NoiseScheduler(num_timesteps=num_timesteps, schedule="linear")
    x0, noise = _x0_and_noise()
    t = torch.tensor([0, num_timesteps // 2, num_timesteps - 1])
    alpha_bar = torch.cumprod(1 - make_betas("linear", num_timesteps), 0)[t].view(-1, 1, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0.double() + (1 - alpha_bar).sqrt() * noise.double()
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), expected.float())
    # a scalar t applies to the whole batch
    torch.testing.assert_close(scheduler.add_noise(x0, noise, 0)[0], scheduler.add_noise(x0, noise, t)[0])


def test_noise_level_grows_with_t():
    scheduler = NoiseScheduler(num_timesteps=10)
    x0, noise = _x0_and_noise((1, 1, 8, 8, 8))
    errors = [(scheduler.add_noise(x0, noise, t) - x0).square().mean().item() for t in range(10)]
    assert errors == sorted(errors) and errors[-1] > 10 * errors[0]


def test_predict_x0_and_predict_noise_invert_add_noise():
    scheduler = NoiseScheduler(num_timesteps=10, schedule="scaled_linear")
    x0, noise = _x0_and_noise()
    t = torch.tensor([0, 4, 9])
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(scheduler.predict_x0(x_t, noise, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scheduler.predict_noise(x_t, x0, t), noise, atol=1e-4, rtol=1e-4)


def test_sample_timesteps_is_uniform_over_the_range_and_reproducible():
    scheduler = NoiseScheduler(num_timesteps=10)
    t = scheduler.sample_timesteps(2000, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and t.shape == (2000,)
    counts = torch.bincount(t, minlength=10)
    assert counts.numel() == 10 and counts.min() > 150
    again = scheduler.sample_timesteps(2000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again)


def test_step_at_t0_with_the_true_noise_recovers_x0():
    scheduler = NoiseScheduler(num_timesteps=10)
    x0, noise = _x0_and_noise()
    x_t = scheduler.add_noise(x0, noise, 0)
    out = scheduler.step(noise, 0, x_t)
    torch.testing.assert_close(out.prev_sample, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scheduler.step(x0, 0, x_t, prediction_type="sample").prev_sample, x0)


def test_step_follows_the_posterior_of_ddpm_eq_7():
    scheduler = NoiseScheduler(num_timesteps=10)
    x0, noise = _x0_and_noise((2, 1, 16, 16, 16))
    t = 5
    x_t = scheduler.add_noise(x0, noise, t)
    prev = scheduler.step(noise, t, x_t, generator=torch.Generator().manual_seed(3)).prev_sample
    ab, ab_prev = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[t - 1].double()
    beta = scheduler.betas[t].double()
    mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x_t) / (1 - ab)
    std = ((1 - ab_prev) / (1 - ab) * beta).sqrt()
    residual = (prev - mean) / std
    assert abs(residual.mean().item()) < 0.05 and abs(residual.std().item() - 1) < 0.05


def test_bad_timesteps_and_shapes_are_refused():
    scheduler = NoiseScheduler(num_timesteps=10)
    x0, noise = _x0_and_noise()
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 9\], got values in \[0, 10\]"):
        scheduler.add_noise(x0, noise, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(3,\)"):
        scheduler.add_noise(x0, noise, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="noise shape"):
        scheduler.add_noise(x0, noise[:1], 1)
    with pytest.raises(ValueError, match="known schedules"):
        NoiseScheduler(schedule="quadratic")


def test_config_round_trip_and_prediction_types():
    scheduler = NoiseScheduler(num_timesteps=7, schedule="linear", schedule_options={"beta_end": 0.01})
    clone = NoiseScheduler(**scheduler.to_dict())
    torch.testing.assert_close(clone.betas, scheduler.betas)
    assert PredictionType.parse("sample") is PredictionType.SAMPLE and PredictionType.EPSILON == "epsilon"
    with pytest.raises(ValueError, match=r"expected one of \['epsilon', 'sample'\]"):
        PredictionType.parse("v_prediction")
