"""Building blocks of the backbone and the probe heads: norm / activation factories and a residual block.

The residual block is the pre-activation block of vox2vec's FPN3d (``norm -> act -> conv`` twice, identity or
1x1x1 shortcut), optionally conditioned on a timestep vector by a per-channel scale and shift applied after the
second norm (the "adaptive group norm" of Dhariwal & Nichol 2021, section 3, with any norm).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

__all__ = ["NormName", "ActName", "NORMS", "ACTIVATIONS", "make_norm", "make_activation", "ResBlock3d"]

NormName = Literal["batch", "group", "instance", "none"]
ActName = Literal["relu", "silu", "gelu"]
NORMS: tuple[str, ...] = get_args(NormName)
ACTIVATIONS: tuple[str, ...] = get_args(ActName)


def make_norm(norm: str, channels: int, groups: int = 8) -> nn.Module:
    """A 3D normalisation layer by name.

    Args:
        norm: {"batch", "group", "instance", "none"}. ``"group"`` uses ``gcd(groups, channels)`` groups so that
            any channel count works.
        channels: number of channels C of the (B, C, D, H, W) input.
        groups: preferred number of groups for ``"group"``. Default 8.

    Returns:
        The layer (``nn.Identity`` for ``"none"``).

    Raises:
        ValueError: for an unknown name.
    """
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(int(groups), channels), channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm {norm!r} is unknown; expected one of {list(NORMS)}")


def make_activation(act: str) -> nn.Module:
    """An activation layer by name: {"relu", "silu", "gelu"}.

    Raises:
        ValueError: for an unknown name.
    """
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "silu":
        return nn.SiLU(inplace=True)
    if act == "gelu":
        return nn.GELU()
    raise ValueError(f"activation {act!r} is unknown; expected one of {list(ACTIVATIONS)}")


class ResBlock3d(nn.Module):
    """Pre-activation residual block ``x + conv(act(mod(norm(conv(act(norm(x)))))))``.

    Args:
        in_channels: input channels.
        out_channels: output channels; a 1x1x1 conv maps the shortcut when they differ from ``in_channels``.
        kernel_size: 3 for the backbone, 1 for the probe heads. Default 3.
        norm: {"batch", "group", "instance", "none"}. Default "batch".
        act: {"relu", "silu", "gelu"}. Default "relu".
        norm_groups: groups of ``"group"`` norm. Default 8.
        emb_channels: size of the conditioning vector; ``None`` (default) builds an unconditioned block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        norm: str = "batch",
        act: str = "relu",
        norm_groups: int = 8,
        emb_channels: int | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size {kernel_size} must be odd")
        padding = kernel_size // 2
        self.norm1 = make_norm(norm, in_channels, norm_groups)
        self.act1 = make_activation(act)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = make_norm(norm, out_channels, norm_groups)
        self.act2 = make_activation(act)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=padding)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels) if emb_channels else None
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, kernel_size=1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, C_in, D, H, W).
            emb: (B, E) conditioning vector; required when the block was built with ``emb_channels``,
                ignored otherwise.

        Returns:
            (B, C_out, D, H, W).
        """
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.norm2(h)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this block is timestep-conditioned; pass emb (B, E)")
            scale, shift = self.emb_proj(nn.functional.silu(emb)).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, h, 1 + scale)
        h = self.conv2(self.act2(h))
        return h + self.shortcut(x)
