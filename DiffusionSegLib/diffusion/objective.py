"""The diffusion training loss: noise a clean patch, add the anatomical condition, regress the target.

DDPM's simplified objective (Ho et al. 2020, eq. 14; algorithm 1)::

    t ~ U{0..T-1},  eps ~ N(0, I),  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps      (eq. 4)
    L = || target - f([x_t, c], t) ||^2,  target = eps ("epsilon") or x0 ("sample")

where ``c`` is the condition concatenated along channels (the 3-channel BPR coordinate map of the patch, or
nothing when BPR is switched off). The network only predicts; the scheduler only noises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from DiffusionSegLib.diffusion.scheduler import NoiseScheduler, PredictionType

__all__ = ["DiffusionLossOutput", "diffusion_loss", "model_input"]


@dataclass
class DiffusionLossOutput:
    """The loss and what it was computed from (for logging and tests).

    Attributes:
        loss: scalar float32 mean squared error.
        timesteps: (B,) the drawn timesteps.
        noise: (B, C, D, H, W) the drawn noise.
        x_t: (B, C, D, H, W) the noised patches.
        prediction: (B, C, D, H, W) the network's output.
        target: (B, C, D, H, W) what it was regressed on.
    """

    loss: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor


def model_input(x_t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """The network input ``[x_t, condition]`` concatenated along channels.

    Args:
        x_t: (B, C, D, H, W) noisy patches.
        condition: (B, K, D, H, W) condition channels (e.g. K = 3 BPR coordinates), or ``None``.

    Returns:
        (B, C + K, D, H, W), or ``x_t`` itself without a condition.

    Raises:
        ValueError: when the condition's batch or spatial size differs from ``x_t``'s.
    """
    if condition is None:
        return x_t
    if condition.ndim != x_t.ndim or condition.shape[0] != x_t.shape[0] or condition.shape[2:] != x_t.shape[2:]:
        raise ValueError(
            f"condition shape {tuple(condition.shape)} does not fit x_t shape {tuple(x_t.shape)}; "
            "expected (B, K, D, H, W) with the same B, D, H, W"
        )
    return torch.cat([x_t, condition.to(dtype=x_t.dtype)], dim=1)


def _prediction_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "prediction"):
        return output.prediction
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"the model returned {type(output).__name__}; expected a tensor, a tuple or an object "
                     "with a .prediction tensor")  # fmt: skip


def diffusion_loss(
    model: nn.Module | Callable[[torch.Tensor, torch.Tensor], Any],
    x0: torch.Tensor,
    condition: torch.Tensor | None,
    scheduler: NoiseScheduler,
    prediction_type: str | PredictionType = PredictionType.EPSILON,
    generator: torch.Generator | None = None,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> DiffusionLossOutput:
    """DDPM training loss (eq. 14) for a batch of clean patches.

    Args:
        model: called as ``model(x_in, t)`` with ``x_in`` (B, C + K, D, H, W) and ``t`` (B,); returns the
            prediction (B, C, D, H, W) as a tensor, the first item of a tuple, or a ``.prediction`` attribute
            (:class:`~DiffusionSegLib.nets.UNet3dOutput`).
        x0: (B, C, D, H, W) clean patches (C = 1 for CT scaled to [0, 1]).
        condition: (B, K, D, H, W) channels concatenated to x_t (the BPR coordinate map), or ``None``.
        scheduler: the noise process.
        prediction_type: {"epsilon", "sample"}: regress the noise or x0. Default "epsilon".
        generator: random generator for timesteps and noise (its device is where they are drawn).
        timesteps: (B,) fixed timesteps instead of random ones.
        noise: fixed noise instead of a fresh draw (same shape as ``x0``).

    Returns:
        :class:`DiffusionLossOutput`; ``.loss`` is the float32 mean squared error over all voxels.

    Raises:
        ValueError: for an unknown prediction type, a non-5D ``x0``, or mismatching condition / noise /
            prediction shapes.
    """
    kind = PredictionType.parse(prediction_type)
    if x0.ndim != 5:
        raise ValueError(f"x0 must have shape (B, C, D, H, W), got {tuple(x0.shape)}")
    batch = x0.shape[0]
    # 1. draw t ~ U{0..T-1} and eps ~ N(0, I) (algorithm 1, lines 3-4)
    if timesteps is None:
        timesteps = scheduler.sample_timesteps(batch, generator=generator, device=x0.device)
    if noise is None:
        draw_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(x0.device)
    # 2. x_t ~ q(x_t | x0) (eq. 4), then the network input [x_t, condition]
    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction = _prediction_tensor(model(model_input(x_t, condition), timesteps))
    # 3. regress the target (eq. 14), in float32 even under autocast
    target = noise if kind is PredictionType.EPSILON else x0
    if prediction.shape != target.shape:
        raise ValueError(f"model prediction shape {tuple(prediction.shape)} differs from target {tuple(target.shape)}")
    loss = nn.functional.mse_loss(prediction.float(), target.float())
    return DiffusionLossOutput(loss=loss, timesteps=timesteps, noise=noise, x_t=x_t, prediction=prediction,
                               target=target)  # fmt: skip
