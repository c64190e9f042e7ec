"""The forward (noising) process of DDPM and its reverse step, with no network inside.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", arXiv:2006.11239):
``alpha_t = 1 - beta_t``, ``alpha_bar_t = prod_{s <= t} alpha_s``. Timesteps are **0-based indices**
``t = 0 .. T - 1`` (DDPM's ``t = 1 .. T``): ``t = 0`` is the least noisy step, ``t = T - 1`` the noisiest.
Every tensor derived from the schedule is a float32 buffer, so it follows ``.to(device)`` and is stored in the
``state_dict``; the scheduler has no parameters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from DiffusionSegLib.diffusion.schedules import make_betas

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


__all__ = ["PredictionType", "NoiseScheduler", "SchedulerStepOutput"]


class PredictionType(StrEnum):
    """What the denoising network predicts."""

    EPSILON = "epsilon"
    """The noise added to x0 (DDPM, eq. 14)."""
    SAMPLE = "sample"
    """The clean patch x0 itself."""

    @classmethod
    def parse(cls, value: str | PredictionType) -> PredictionType:
        """``PredictionType(value)`` with an error that lists the allowed values."""
        try:
            return cls(value)
        except ValueError:
            known = [p.value for p in cls]
            raise ValueError(f"prediction_type {value!r} is unknown; expected one of {known}") from None


@dataclass
class SchedulerStepOutput:
    """Result of one reverse step.

    Attributes:
        prev_sample: (B, C, D, H, W) x_{t-1}.
        pred_original_sample: (B, C, D, H, W) the model's estimate of x0.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class NoiseScheduler(nn.Module):
    """DDPM noise process for a given beta schedule.

    Args:
        num_timesteps: T, the number of diffusion steps (the paper finds T ~ 10 best). Default 10.
        schedule: name of a beta schedule in ``DiffusionSegLib.diffusion.BETA_SCHEDULES``
            ({"linear", "scaled_linear", "cosine"}). Default "linear".
        schedule_options: extra parameters of the schedule (``beta_start``, ``beta_end``, ``s``). Default none.

    Raises:
        ValueError: for an unknown schedule or T < 1.

    Example::

        scheduler = NoiseScheduler(num_timesteps=10, schedule="cosine")
        t = scheduler.sample_timesteps(x0.shape[0])
        x_t = scheduler.add_noise(x0, torch.randn_like(x0), t)
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def __init__(self, num_timesteps: int = 10, schedule: str = "linear",
                 schedule_options: dict[str, float] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.num_timesteps = int(num_timesteps)
        self.schedule = schedule
        self.schedule_options = dict(schedule_options or {})
        betas = make_betas(schedule, num_timesteps, **self.schedule_options)  # float64 until stored
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            # posterior q(x_{t-1} | x_t, x0), DDPM eq. 6-7
            "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32))

    def __len__(self) -> int:
        return self.num_timesteps

    def to_dict(self) -> dict:
        """Constructor arguments as a JSON-ready dict (saved with trained weights)."""
        return {"num_timesteps": self.num_timesteps, "schedule": self.schedule,
                "schedule_options": dict(self.schedule_options)}  # fmt: skip

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, schedule={self.schedule!r}, options={self.schedule_options}"

    def _at(self, buffer: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``buffer[t]`` shaped (B, 1, 1, 1, 1) (for a 5D ``like``) in ``like``'s dtype and device."""
        t = torch.as_tensor(t, device=buffer.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if t.shape != (like.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({like.shape[0]},), got {tuple(t.shape)}")
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got values in [{low}, {high}]")
        values = buffer[t].to(device=like.device, dtype=like.dtype)
        return values.reshape((like.shape[0],) + (1,) * (like.ndim - 1))

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
        """Uniform random timesteps (DDPM algorithm 1, line 3).

        Args:
            batch_size: B.
            generator: random generator (its device is used for drawing). Default: the global one.
            device: where the result goes. Default: the scheduler's buffers' device.

        Returns:
            (B,) int64 timesteps in [0, T - 1].
        """
        draw_device = generator.device if generator is not None else self.betas.device
        t = torch.randint(0, self.num_timesteps, (int(batch_size),), generator=generator, device=draw_device)
        return t.to(device if device is not None else self.betas.device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Sample q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (DDPM eq. 4).

        Args:
            x0: (B, C, D, H, W) clean patches.
            noise: standard normal noise of the same shape.
            t: (B,) or scalar timesteps in [0, T - 1].

        Returns:
            (B, C, D, H, W) ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``.
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        signal = self._at(self.sqrt_alphas_cumprod, t, x0)
        return signal * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Invert eq. 4 for x0 given the noise: ``(x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)`` (DDPM eq. 15).

        Args:
            x_t: (B, C, D, H, W) noisy patches.
            eps: (B, C, D, H, W) the (predicted) noise.
            t: (B,) or scalar timesteps.

        Returns:
            (B, C, D, H, W) estimate of x0.
        """
        return (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self._at(
            self.sqrt_alphas_cumprod, t, x_t
        )

    def predict_noise(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Invert eq. 4 for the noise given x0: ``(x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)``."""
        return (x_t - self._at(self.sqrt_alphas_cumprod, t, x_t) * x0) / self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor,
             prediction_type: str | PredictionType = PredictionType.EPSILON,
             generator: torch.Generator | None = None) -> SchedulerStepOutput:  # fmt: skip
        """One ancestral sampling step x_t -> x_{t-1} (DDPM algorithm 2), with the posterior variance beta-tilde.

        Args:
            model_output: (B, C, D, H, W) the network's prediction (noise or x0, see ``prediction_type``).
            t: the current timestep index (same for the whole batch).
            x_t: (B, C, D, H, W) current sample.
            prediction_type: {"epsilon", "sample"}. Default "epsilon".
            generator: random generator for the added noise.

        Returns:
            :class:`SchedulerStepOutput` with x_{t-1} and the x0 estimate.
        """
        kind = PredictionType.parse(prediction_type)
        # 1. estimate x0 (eq. 15 for an epsilon prediction)
        x0 = self.predict_x0(x_t, model_output, t) if kind is PredictionType.EPSILON else model_output
        # 2. posterior mean of q(x_{t-1} | x_t, x0) (eq. 7)
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        if int(t) == 0:
            return SchedulerStepOutput(prev_sample=mean, pred_original_sample=x0)
        # 3. add noise with the posterior variance beta-tilde_t (eq. 7)
        noise = torch.randn(x_t.shape, generator=generator, device=generator.device if generator else x_t.device,
                            dtype=x_t.dtype).to(x_t.device)  # fmt: skip
        std = self._at(self.posterior_variance, t, x_t).sqrt()
        return SchedulerStepOutput(prev_sample=mean + std * noise, pred_original_sample=x0)
