"""Backbone pretraining on unlabeled CT: diffusion with BPR coordinates, and the baselines in the same trainer."""

from DiffusionSegLib.pretrain.config import (
    METHODS,
    BackboneConfig,
    DiffusionConfig,
    OptimConfig,
    PretrainConfig,
    PretrainDataConfig,
    TrainingConfig,
)
from DiffusionSegLib.pretrain.export import BackboneBundle, export_backbone, load_backbone

__all__ = [
    "METHODS",
    "BackboneBundle",
    "BackboneConfig",
    "DiffusionConfig",
    "OptimConfig",
    "PretrainConfig",
    "PretrainDataConfig",
    "TrainingConfig",
    "export_backbone",
    "load_backbone",
    "pretrain_backbone",
]


def pretrain_backbone(*args, **kwargs):
    """See :func:`DiffusionSegLib.pretrain.trainer.pretrain_backbone` (imported lazily: it pulls in the BPR)."""
    from DiffusionSegLib.pretrain.trainer import pretrain_backbone as run

    return run(*args, **kwargs)
