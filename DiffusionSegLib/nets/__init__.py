"""Networks: the timestep-conditioned FPN3d / 3D U-Net backbone, its blocks and the probe heads."""

from __future__ import annotations

from DiffusionSegLib.nets.blocks import ACTIVATIONS, NORMS, PointwiseConv3d, ResBlock3d, make_activation, make_norm
from DiffusionSegLib.nets.embedding import TimestepEmbedding, timestep_embedding
from DiffusionSegLib.nets.heads import (
    UPSAMPLE_MODES,
    LinearProbeHead,
    NonLinearProbeHead,
    upsample_and_concat,
    upsample_to,
)
from DiffusionSegLib.nets.unet3d import UNet3d, UNet3dConfig, UNet3dOutput

__all__ = [
    "UNet3d",
    "UNet3dConfig",
    "UNet3dOutput",
    "LinearProbeHead",
    "NonLinearProbeHead",
    "upsample_and_concat",
    "upsample_to",
    "UPSAMPLE_MODES",
    "ResBlock3d",
    "PointwiseConv3d",
    "make_norm",
    "make_activation",
    "NORMS",
    "ACTIVATIONS",
    "TimestepEmbedding",
    "timestep_embedding",
]
