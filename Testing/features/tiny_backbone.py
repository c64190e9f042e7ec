"""Tiny random-init backbones for feature and probe tests (no training needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from DiffusionSegLib.preprocess import PreprocessConfig
from DiffusionSegLib.pretrain.config import BackboneConfig, PretrainConfig, PretrainDataConfig
from DiffusionSegLib.pretrain.export import BackboneBundle, export_backbone, load_backbone
from DiffusionSegLib.pretrain.methods import build_backbone


def make_backbone(path: Path, *, seed: int = 0, method: str = "diffusion", use_bpr: bool = False,
                  bpr_path: Path | None = None, base: int = 8, scales: int = 3) -> BackboneBundle:  # fmt: skip
    """Export and load a random-init backbone working at 3 x 3 x 4 mm (fast on 2 CPU cores)."""
    torch.manual_seed(seed)
    cfg = PretrainConfig(method=method, use_bpr=use_bpr, bpr_weights=str(bpr_path or ""),
                         preprocess=PreprocessConfig(spacing_mm=(3.0, 3.0, 4.0)),
                         backbone=BackboneConfig(base_channels=base, num_scales=scales, max_channels=64),
                         data=PretrainDataConfig(patch_size_vox=(32, 64, 64)))  # fmt: skip
    export_backbone(path, cfg, build_backbone(cfg), steps=0, bpr_path=bpr_path, val_loss=None)
    return load_backbone(path)
