"""End-to-end fine-tuning of a (pretrained) backbone with a segmentation head on labeled CT."""

from __future__ import annotations

from DiffusionSegLib.finetune.config import INITS, FinetuneConfig
from DiffusionSegLib.finetune.train import (
    FinetuneCancelled,
    FinetuneResult,
    SegmentationNetwork,
    backbone_output_path,
    finetune,
    finetune_backbone_bundle,
    learning_rate_at,
)

__all__ = [
    "INITS",
    "FinetuneCancelled",
    "FinetuneConfig",
    "FinetuneResult",
    "SegmentationNetwork",
    "backbone_output_path",
    "finetune",
    "finetune_backbone_bundle",
    "learning_rate_at",
]
