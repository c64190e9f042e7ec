from __future__ import annotations

import math

import pytest
import torch

from DiffusionSegLib.diffusion import BETA_SCHEDULES, make_betas, register_beta_schedule


@pytest.mark.parametrize("name", ["linear", "ddpm_linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1, 2, 10, 1000])
def test_alphas_cumprod_is_decreasing_and_in_unit_interval(name, num_timesteps):
    betas = make_betas(name, num_timesteps)
    assert betas.shape == (num_timesteps,) and betas.dtype == torch.float64
    assert bool(((betas > 0) & (betas < 1)).all())
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    assert bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all())
    assert bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all())


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ten_steps_reach_almost_pure_noise(name):
    """A T=10 schedule must still end near N(0, I) (DDPM's raw linspace(1e-4, 0.02, 10) ends at 0.9)."""
    for num_timesteps in (10, 1000):
        assert torch.cumprod(1 - make_betas(name, num_timesteps), 0)[-1] < 1e-3


def test_linear_matches_ddpm_at_1000_steps():
    betas = make_betas("linear", 1000)
    ddpm = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert ((betas - ddpm).abs() / ddpm).max() < 0.12  # DDPM's betas taken at step start, ours integrated over it
    end, ddpm_end = torch.cumprod(1 - betas, 0)[-1], torch.cumprod(1 - ddpm, 0)[-1]
    assert abs(math.log(end / ddpm_end)) < 0.1


def test_scaled_linear_matches_stable_diffusion_at_1000_steps():
    reference = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert ((make_betas("scaled_linear", 1000) - reference).abs() / reference).max() < 0.01


def test_cosine_follows_the_improved_ddpm_closed_form():
    num_timesteps, s = 50, 0.008
    alphas_cumprod = torch.cumprod(1 - make_betas("cosine", num_timesteps), 0)
    tau = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(alphas_cumprod[:-1], f[:-1])  # the last beta is clipped at 0.999


def test_options_change_the_schedule():
    assert make_betas("linear", 10, beta_end=0.01)[-1] < make_betas("linear", 10)[-1]


def test_bad_requests_are_refused_with_the_known_names():
    with pytest.raises(ValueError, match=r"'sigmoid' is unknown; known schedules: \['cosine', 'ddpm_linear', 'linear', 'scaled_lin"):
        make_betas("sigmoid", 10)
    with pytest.raises(ValueError, match="num_timesteps 0"):
        make_betas("linear", 0)
    with pytest.raises(ValueError, match="does not accept options"):
        make_betas("cosine", 10, beta_start=0.1)


def test_registering_a_schedule():
    @register_beta_schedule("constant_test")
    def constant(num_timesteps: int, beta: float = 0.1) -> torch.Tensor:
        return torch.full((num_timesteps,), beta, dtype=torch.float64)

    try:
        assert make_betas("constant_test", 4, beta=0.2).tolist() == [0.2] * 4
        with pytest.raises(ValueError, match="already registered"):
            register_beta_schedule("constant_test")(constant)
        with pytest.raises(ValueError, match="invalid betas"):
            make_betas("constant_test", 3, beta=1.5)
    finally:
        BETA_SCHEDULES.pop("constant_test")


def test_ddpm_linear_is_the_textbook_recipe_so_t_sets_the_strongest_noise():
    """The paper's ablation varies T with DDPM's linspace(1e-4, 0.02, T): few steps, mild noise."""
    torch.testing.assert_close(make_betas("ddpm_linear", 10), torch.linspace(1e-4, 0.02, 10, dtype=torch.float64))
    last_level = [float(torch.cumprod(1 - make_betas("ddpm_linear", t), 0)[-1]) for t in (10, 100, 1000)]
    assert last_level[0] > 0.9 and last_level[1] < 0.4 and last_level[2] < 1e-4
