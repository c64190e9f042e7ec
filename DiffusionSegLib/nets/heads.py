"""Probe heads on a frozen feature pyramid (vox2vec's FPNLinearHead / FPNNonLinearHead, re-written).

Both heads take the pyramid as a list of tensors, finest first (level ``l``: (B, C_l, D/2^l, H/2^l, W/2^l)),
and return logits (B, num_classes, D, H, W) at the finest level's resolution.

* :class:`LinearProbeHead`: a 1x1x1 conv per level, each upsampled to the finest level and summed. Because
  convolution by 1x1x1 and upsampling are both linear and per-voxel / per-channel, this equals one linear map
  on the concatenated full-resolution feature ``upsample_and_concat(pyramid)``.
* :class:`NonLinearProbeHead`: a light top-down FPN decoder of residual blocks, 1x1x1 (per voxel) or, with
  ``kernel_size=3``, 3x3x3 on every level but the finest (spatial context: a voxel's class also depends on its
  neighbourhood's features, as in vox2vec's FPN decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from DiffusionSegLib.nets.blocks import PointwiseConv3d, ResBlock3d, make_activation, make_norm

__all__ = ["UPSAMPLE_MODES", "upsample_to", "upsample_and_concat", "LinearProbeHead", "NonLinearProbeHead"]

UPSAMPLE_MODES = ("nearest", "trilinear")


def upsample_to(x: torch.Tensor, size: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resize (B, C, d, h, w) to (B, C, *size); a no-op when the size already matches.

    Args:
        x: (B, C, d, h, w) feature map.
        size: target (D, H, W).
        mode: {"nearest", "trilinear"} (trilinear uses ``align_corners=False``). Default "trilinear".

    Returns:
        (B, C, D, H, W).
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode {mode!r} is unknown; expected one of {list(UPSAMPLE_MODES)}")
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "nearest":
        return nn.functional.interpolate(x, size=size, mode="nearest")
    return nn.functional.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _check_pyramid(pyramid: Sequence[torch.Tensor], feature_channels: Sequence[int] | None = None) -> None:
    if len(pyramid) == 0:
        raise ValueError("the feature pyramid is empty")
    if any(p.ndim != 5 for p in pyramid):
        raise ValueError(f"pyramid levels must be (B, C, D, H, W); got shapes {[tuple(p.shape) for p in pyramid]}")
    if feature_channels is not None and [p.shape[1] for p in pyramid] != list(feature_channels):
        raise ValueError(
            f"pyramid channels {[p.shape[1] for p in pyramid]} do not match the head's {list(feature_channels)}"
        )


def upsample_and_concat(
    pyramid: Sequence[torch.Tensor], mode: str = "trilinear", size: Sequence[int] | None = None
) -> torch.Tensor:
    """The voxel feature: every pyramid level upsampled to one grid and concatenated along channels.

    Args:
        pyramid: levels finest first, (B, C_l, D/2^l, H/2^l, W/2^l).
        mode: {"nearest", "trilinear"}. Default "trilinear".
        size: target (D, H, W); default the finest level's size.

    Returns:
        (B, sum(C_l), D, H, W).
    """
    _check_pyramid(pyramid)
    size = tuple(pyramid[0].shape[2:]) if size is None else tuple(size)
    return torch.cat([upsample_to(level, size, mode) for level in pyramid], dim=1)


class LinearProbeHead(nn.Module):
    """Linear probe: ``sum_l upsample(conv1x1_l(pyramid[l]))``, a linear map on the concatenated feature.

    Args:
        feature_channels: channels per pyramid level, finest first (``UNet3d.feature_channels``).
        num_classes: output channels (organs; background included or not, as the loss wants).
        upsample: {"nearest", "trilinear"}. Default "trilinear".
    """

    def __init__(self, feature_channels: Sequence[int], num_classes: int, upsample: str = "trilinear") -> None:
        super().__init__()
        if num_classes < 1 or not feature_channels or min(feature_channels) < 1:
            raise ValueError(f"invalid head: feature_channels={list(feature_channels)}, num_classes={num_classes}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample {upsample!r} is unknown; expected one of {list(UPSAMPLE_MODES)}")
        self.feature_channels = [int(c) for c in feature_channels]
        self.upsample = upsample
        # one bias for the whole map (on the finest level): the sum of per-level biases would be redundant
        self.convs = nn.ModuleList(
            PointwiseConv3d(c, num_classes, bias=(level == 0)) for level, c in enumerate(feature_channels)
        )

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits from a pyramid.

        Args:
            pyramid: levels finest first, (B, C_l, D/2^l, H/2^l, W/2^l).

        Returns:
            (B, num_classes, D, H, W) logits at the finest level's resolution.
        """
        _check_pyramid(pyramid, self.feature_channels)
        size = tuple(pyramid[0].shape[2:])
        logits = self.convs[0](pyramid[0])
        for conv, level in zip(self.convs[1:], pyramid[1:], strict=True):
            logits = logits + upsample_to(conv(level), size, self.upsample)
        return logits


class NonLinearProbeHead(nn.Module):
    """Non-linear probe: a top-down FPN decoder of residual blocks.

    Each level is projected to ``hidden`` channels by a 1x1x1 conv; from the coarsest level down, the running map
    is upsampled, added to the next level's projection and passed through ``num_blocks`` residual blocks;
    a final ``norm -> act -> 1x1x1 conv`` gives the logits. The blocks are 1x1x1 by default; ``kernel_size=3``
    makes them 3x3x3 on every level but the finest, which stays 1x1x1 (at full resolution a 3x3x3 block would
    cost about 8x all coarser levels together; the half-resolution level already gives each voxel a 6-voxel
    neighbourhood, more at coarser levels).

    Args:
        feature_channels: channels per pyramid level, finest first.
        num_classes: output channels.
        hidden: channels of the decoder. Default 64.
        num_blocks: residual blocks per level. Default 1.
        kernel_size: 1 (per-voxel head) or an odd size for the blocks of the coarser levels. Default 1.
        norm: {"batch", "group", "instance", "none"}. Default "batch".
        act: {"relu", "silu", "gelu"}. Default "relu".
        upsample: {"nearest", "trilinear"}. Default "trilinear".
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        num_classes: int,
        hidden: int = 64,
        *,
        num_blocks: int = 1,
        kernel_size: int = 1,
        norm: str = "batch",
        act: str = "relu",
        upsample: str = "trilinear",
    ) -> None:
        super().__init__()
        if num_classes < 1 or hidden < 1 or num_blocks < 0 or not feature_channels or min(feature_channels) < 1:
            raise ValueError(
                f"invalid head: feature_channels={list(feature_channels)}, num_classes={num_classes}, "
                f"hidden={hidden}, num_blocks={num_blocks}"
            )
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample {upsample!r} is unknown; expected one of {list(UPSAMPLE_MODES)}")
        self.feature_channels = [int(c) for c in feature_channels]
        self.upsample = upsample
        self.project = nn.ModuleList(PointwiseConv3d(c, hidden) for c in feature_channels)
        self.kernel_size = int(kernel_size)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *(
                    ResBlock3d(hidden, hidden, kernel_size=1 if level == 0 else self.kernel_size, norm=norm, act=act)
                    for _ in range(num_blocks)
                )
            )
            for level in range(len(feature_channels))
        )
        self.out = nn.Sequential(make_norm(norm, hidden), make_activation(act), PointwiseConv3d(hidden, num_classes))

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits from a pyramid.

        Args:
            pyramid: levels finest first, (B, C_l, D/2^l, H/2^l, W/2^l).

        Returns:
            (B, num_classes, D, H, W) logits at the finest level's resolution.
        """
        _check_pyramid(pyramid, self.feature_channels)
        h = self.blocks[-1](self.project[-1](pyramid[-1]))
        for level in range(len(pyramid) - 2, -1, -1):
            h = upsample_to(h, pyramid[level].shape[2:], self.upsample) + self.project[level](pyramid[level])
            h = self.blocks[level](h)
        return self.out(h)
