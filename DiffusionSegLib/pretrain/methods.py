"""Pretraining objectives sharing one backbone and one trainer: diffusion (± BPR), restorative, contrastive.

Each method is an ``nn.Module`` whose ``forward(batch)`` returns the loss, so the trainer (and DDP) treat all
methods alike; ``draw(sampler, batch_size)`` decides what a batch holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from DiffusionSegLib.diffusion import NoiseScheduler, diffusion_loss
from DiffusionSegLib.pretrain.config import PretrainConfig
from DiffusionSegLib.pretrain.contrastive import (
    ProjectionHead,
    gather_pyramid_features,
    info_nce,
    matched_voxels,
    sample_overlapping_views,
)
from DiffusionSegLib.pretrain.data import PatchSampler
from DiffusionSegLib.pretrain.restorative import corrupt

__all__ = ["PretrainMethod", "build_method", "build_backbone", "backbone_config"]


def build_backbone(cfg: PretrainConfig) -> nn.Module:
    """The backbone network for a pretraining config (input: patch + optional BPR channels)."""
    from DiffusionSegLib.nets import UNet3d

    return UNet3d.from_config(backbone_config(cfg))


def backbone_config(cfg: PretrainConfig):
    """The ``UNet3dConfig`` of a pretraining config: input channels and time conditioning follow the method."""
    from DiffusionSegLib.nets import UNet3dConfig

    return UNet3dConfig(
        in_channels=cfg.in_channels,
        out_channels=1,
        time_conditioning=cfg.time_conditioning,
        **cfg.backbone.to_dict(),
    )


class PretrainMethod(nn.Module):
    """Base: holds the backbone; subclasses define ``draw`` and ``forward`` (the loss)."""

    def __init__(self, backbone: nn.Module, use_bpr: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.use_bpr = use_bpr
        self.generator = torch.Generator()

    def network_input(self, image: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        if not self.use_bpr:
            return image
        if coords is None:
            raise ValueError("this method uses BPR coordinates but the batch has none")
        return torch.cat([image, coords.to(image)], dim=1)

    def draw(self, sampler: PatchSampler, batch_size: int) -> dict[str, torch.Tensor]:
        batch = sampler.sample(batch_size)
        return {"image": batch.image} | ({"coords": batch.coords} if batch.coords is not None else {})


class DiffusionMethod(PretrainMethod):
    """Denoising: noise the patch to a random step t and predict the noise (or the clean patch)."""

    def __init__(self, backbone: nn.Module, use_bpr: bool, scheduler: NoiseScheduler, prediction_type: str) -> None:
        super().__init__(backbone, use_bpr)
        self.scheduler = scheduler
        self.prediction_type = prediction_type

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch["image"] * 2.0 - 1.0  # diffusion works on [-1, 1]
        condition = batch.get("coords") if self.use_bpr else None
        if self.use_bpr and condition is None:
            raise ValueError("diffusion with BPR needs coordinates in the batch")
        result = diffusion_loss(self.backbone, x0, condition, self.scheduler, prediction_type=self.prediction_type,
                                generator=self.generator)  # fmt: skip
        return result.loss if hasattr(result, "loss") else result


class RestorativeMethod(PretrainMethod):
    """Models Genesis: restore the patch from a corrupted copy."""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image = batch["image"]
        corrupted = corrupt(image.cpu(), self.generator).to(image)
        prediction = self.backbone(self.network_input(corrupted, batch.get("coords"))).prediction
        return F.mse_loss(prediction.float(), image.float())


class ContrastiveMethod(PretrainMethod):
    """vox2vec: InfoNCE between the projected pyramid features of matched voxels in two overlapping views."""

    def __init__(self, backbone: nn.Module, use_bpr: bool, feature_channels: int, voxels_per_pair: int = 256,
                 temperature: float = 0.1) -> None:  # fmt: skip
        super().__init__(backbone, use_bpr)
        if use_bpr:
            raise ValueError("the contrastive baseline is trained without BPR coordinates (use_bpr = false)")
        self.head = ProjectionHead(feature_channels)
        self.voxels_per_pair = voxels_per_pair
        self.temperature = temperature

    def draw(self, sampler: PatchSampler, batch_size: int) -> dict[str, torch.Tensor]:
        view_a, view_b, origins_a, origins_b = sample_overlapping_views(sampler, batch_size)
        voxels_a, voxels_b = matched_voxels(origins_a, origins_b, sampler.patch_size, self.voxels_per_pair,
                                            sampler.rng)  # fmt: skip
        return {"view_a": view_a, "view_b": view_b, "voxels_a": voxels_a, "voxels_b": voxels_b}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pyramid_a = self.backbone(batch["view_a"]).pyramid
        pyramid_b = self.backbone(batch["view_b"]).pyramid
        features_a = gather_pyramid_features(pyramid_a, batch["voxels_a"]).float()
        features_b = gather_pyramid_features(pyramid_b, batch["voxels_b"]).float()
        return info_nce(self.head(features_a), self.head(features_b), self.temperature)


def build_method(cfg: PretrainConfig) -> PretrainMethod:
    """The method module of a config, with a freshly initialised backbone."""
    backbone = build_backbone(cfg)
    if cfg.method == "diffusion":
        scheduler = NoiseScheduler(num_timesteps=cfg.diffusion.num_timesteps, schedule=cfg.diffusion.schedule)
        return DiffusionMethod(backbone, cfg.use_bpr, scheduler, cfg.diffusion.prediction_type)
    if cfg.method == "restorative":
        return RestorativeMethod(backbone, cfg.use_bpr)
    if cfg.method == "contrastive":
        return ContrastiveMethod(backbone, cfg.use_bpr, sum(backbone.config.feature_channels))
    if cfg.method == "random":
        return PretrainMethod(backbone, cfg.use_bpr)
    raise ValueError(f"method {cfg.method!r} is unknown")
