"""Diffusion: named beta schedules, the DDPM noise process (no network inside) and the training loss."""

from __future__ import annotations

from DiffusionSegLib.diffusion.objective import DiffusionLossOutput, diffusion_loss, model_input
from DiffusionSegLib.diffusion.scheduler import NoiseScheduler, PredictionType, SchedulerStepOutput
from DiffusionSegLib.diffusion.schedules import BETA_SCHEDULES, betas_from_alpha_bar, make_betas, register_beta_schedule

__all__ = [
    "BETA_SCHEDULES",
    "register_beta_schedule",
    "make_betas",
    "betas_from_alpha_bar",
    "NoiseScheduler",
    "PredictionType",
    "SchedulerStepOutput",
    "diffusion_loss",
    "DiffusionLossOutput",
    "model_input",
]
