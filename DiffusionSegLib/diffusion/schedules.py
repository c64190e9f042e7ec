"""Named beta schedules, well-defined for any number of timesteps T (including the paper's T = 10).

A schedule is given by the continuous signal level ``alpha_bar(tau)`` on ``tau in [0, 1]`` and discretised as
``alpha_bar_t = alpha_bar((t + 1) / T)`` for ``t = 0 .. T - 1`` and ``beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}``
(``alpha_bar_{-1} = 1``). This keeps a schedule's shape and end point when T changes: the naive DDPM recipe
``linspace(1e-4, 0.02, T)`` barely adds noise for T = 10 (alpha_bar_T ~ 0.9), and rescaling it by 1000 / T
(lucidrains) gives betas above 1.

* ``linear``: DDPM's linear betas (Ho et al. 2020, section 4) as the continuous rate
  ``beta(tau) = 1000 * (beta_start + tau * (beta_end - beta_start))`` (the VP-SDE of Song et al. 2021, eq. 11
  with beta_min = 0.1, beta_max = 20) integrated exactly over each step; for T = 1000 the betas are DDPM's taken
  at mid-step (1.1e-4 .. 0.0198 instead of 1e-4 .. 0.02), and alpha_bar at the last step is 4.3e-5 for every T
  (DDPM: 4.0e-5).
* ``ddpm_linear``: DDPM's discrete recipe as written, ``betas = linspace(beta_start, beta_end, T)`` (Ho et al.
  2020, section 4). T then sets how much noise the process reaches (alpha_bar_T ~ 0.90 for T = 10, 4e-5 for
  T = 1000), which is what the paper's timestep ablation varies: few steps mean mild noise.
* ``scaled_linear``: Stable Diffusion's ``linspace(sqrt(beta_start), sqrt(beta_end), T)^2`` with 0.00085 / 0.012,
  made continuous the same way (a gentler schedule; alpha_bar_T ~ 5e-3).
* ``cosine``: Nichol & Dhariwal 2021, eq. 17, ``alpha_bar(tau) = f(tau) / f(0)``,
  ``f(tau) = cos^2(pi/2 * (tau + s) / (1 + s))``, s = 0.008, betas clipped at ``max_beta`` (eq. 17's 0.999).

New schedules are added with :func:`register_beta_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["BETA_SCHEDULES", "register_beta_schedule", "make_betas", "betas_from_alpha_bar"]

BetaSchedule = Callable[..., torch.Tensor]
BETA_SCHEDULES: dict[str, BetaSchedule] = {}
"""Registry: schedule name -> function ``(num_timesteps, **options) -> betas (T,) float64``."""


def register_beta_schedule(name: str) -> Callable[[BetaSchedule], BetaSchedule]:
    """Decorator adding a schedule function ``(num_timesteps: int, **options) -> (T,) betas`` to the registry."""

    def add(function: BetaSchedule) -> BetaSchedule:
        if name in BETA_SCHEDULES:
            raise ValueError(f"beta schedule {name!r} is already registered")
        BETA_SCHEDULES[name] = function
        return function

    return add


def betas_from_alpha_bar(alpha_bar: Callable[[torch.Tensor], torch.Tensor], num_timesteps: int,
                         max_beta: float = 0.999) -> torch.Tensor:  # fmt: skip
    """Discretise a continuous signal level ``alpha_bar(tau)``, tau in [0, 1], into T betas.

    Args:
        alpha_bar: decreasing function of tau with ``alpha_bar(0) = 1`` (float64 tensors in and out).
        num_timesteps: T.
        max_beta: upper clip of each beta (avoids a singular last step). Default 0.999.

    Returns:
        (T,) float64 betas ``1 - alpha_bar((t + 1) / T) / alpha_bar(t / T)``.
    """
    tau = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    levels = alpha_bar(tau)
    betas = 1.0 - levels[1:] / levels[:-1]
    return betas.clamp(min=0.0, max=max_beta)


@register_beta_schedule("linear")
def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, integrated exactly per step (see the module docstring)."""
    rate_start, rate_end = 1000.0 * beta_start, 1000.0 * beta_end

    def alpha_bar(tau: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(rate_start * tau + 0.5 * (rate_end - rate_start) * tau**2))

    return betas_from_alpha_bar(alpha_bar, num_timesteps)


@register_beta_schedule("ddpm_linear")
def ddpm_linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's discrete linear betas, unscaled: the noise reached grows with T (see the module docstring)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


@register_beta_schedule("scaled_linear")
def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule (linear in sqrt(beta)), integrated exactly per step."""
    a, b = math.sqrt(1000.0 * beta_start), math.sqrt(1000.0 * beta_end)

    def alpha_bar(tau: torch.Tensor) -> torch.Tensor:
        # integral of (a + tau (b - a))^2 from 0 to tau
        return torch.exp(-((a + tau * (b - a)) ** 3 - a**3) / (3.0 * (b - a))) if b != a else torch.exp(-a * a * tau)

    return betas_from_alpha_bar(alpha_bar, num_timesteps)


@register_beta_schedule("cosine")
def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17)."""

    def alpha_bar(tau: torch.Tensor) -> torch.Tensor:
        f = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
        return f / f[0]

    return betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta=max_beta)


def make_betas(name: str, num_timesteps: int, **options: float) -> torch.Tensor:
    """Betas of a registered schedule.

    Args:
        name: a key of :data:`BETA_SCHEDULES` ("linear", "scaled_linear", "cosine", ...).
        num_timesteps: T >= 1.
        **options: schedule parameters (``beta_start``/``beta_end`` for the linear ones, ``s`` for cosine).

    Returns:
        (T,) float64 betas in [0, 1).

    Raises:
        ValueError: for an unknown name, T < 1, an unknown option or betas outside [0, 1).
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"beta schedule {name!r} is unknown; known schedules: {sorted(BETA_SCHEDULES)}")
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"num_timesteps {num_timesteps} must be a positive integer")
    try:
        betas = BETA_SCHEDULES[name](int(num_timesteps), **options)
    except TypeError as error:
        raise ValueError(f"beta schedule {name!r} does not accept options {sorted(options)}: {error}") from None
    if betas.shape != (num_timesteps,) or not bool(((betas >= 0) & (betas < 1)).all()):
        raise ValueError(f"beta schedule {name!r} with {options} gave invalid betas {betas.tolist()}")
    return betas
