"""Dice + cross-entropy that leaves out voxels without a label (pseudo-labels where the atlases disagree)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from DiffusionSegLib.probe.sampling import IGNORE

__all__ = ["MaskedDiceCELoss"]


class MaskedDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)`` over the voxels whose target is not
    :data:`IGNORE`: the mean cross-entropy of those voxels plus one minus the soft Dice of each class (background
    included) pooled over the batch, averaged over classes. With no ignored voxel it equals MONAI's loss."""

    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__()
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, C, ...) and ``target`` (B, 1, ...) class indices."""
        classes = target[:, 0].long()
        valid = classes != IGNORE
        if not bool(valid.any()):
            return logits.sum() * 0.0
        cross_entropy = F.cross_entropy(logits, classes, ignore_index=IGNORE)
        mask = valid.unsqueeze(1).to(logits.dtype)
        probabilities = torch.softmax(logits, dim=1) * mask
        one_hot = F.one_hot(torch.where(valid, classes, 0), logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
        dims = [0, *range(2, logits.ndim)]
        intersection = (probabilities * one_hot).sum(dims)
        total = probabilities.sum(dims) + one_hot.sum(dims)
        dice = 1.0 - (2.0 * intersection + self.smooth) / (total + self.smooth)
        return dice.mean() + cross_entropy
