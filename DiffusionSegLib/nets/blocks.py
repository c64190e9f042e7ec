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

__all__ = [
    "NormName",
    "ActName",
    "NORMS",
    "ACTIVATIONS",
    "make_norm",
    "make_activation",
    "PointwiseConv3d",
    "ResBlock3d",
]

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


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 ``Conv3d`` that runs as a matrix product on channels_last_3d inputs.

    Same parameters and ``state_dict`` as ``nn.Conv3d(in_channels, out_channels, kernel_size=1)``. On a
    channels_last_3d input the channels are the innermost axis, so ``F.linear`` on the (B, D, H, W, C) view is
    one GEMM; torch's CPU conv3d kernels are 3-10x slower for this case (see
    ``benchmarks/results/backbone_throughput.md``). Other layouts use the ordinary convolution.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        bias: add a learned bias. Default True.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, H, W), keeping the input's memory format."""
        if x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
            return nn.functional.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)
        return super().forward(x)


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
        def conv(cin: int, cout: int) -> nn.Conv3d:
            if kernel_size == 1:
                return PointwiseConv3d(cin, cout)
            return nn.Conv3d(cin, cout, kernel_size, padding=kernel_size // 2)

        self.norm1 = make_norm(norm, in_channels, norm_groups)
        self.act1 = make_activation(act)
        self.conv1 = conv(in_channels, out_channels)
        self.norm2 = make_norm(norm, out_channels, norm_groups)
        self.act2 = make_activation(act)
        self.conv2 = conv(out_channels, out_channels)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels) if emb_channels else None
        self.shortcut = nn.Identity() if in_channels == out_channels else PointwiseConv3d(in_channels, out_channels)

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

    @torch.no_grad()
    def fold_(self, emb: torch.Tensor | None = None) -> bool:
        """Fold the second norm (batch norm in eval mode) and the timestep scale and shift into ``conv1``, in place,
        for inference at one timestep: both are per-channel affine maps of ``conv1``'s output, so the block
        computes the same function (up to float rounding) with two fewer passes over its activations.

        Args:
            emb: the (1, E) conditioning vector of the timestep; required for a conditioned block.

        Returns:
            True when folded; False (nothing changed) for any other norm, whose statistics depend on the input.
        """
        if not isinstance(self.norm2, nn.BatchNorm3d) or not isinstance(self.conv1, nn.Conv3d):
            return False
        if self.emb_proj is not None and emb is None:
            raise ValueError("this block is timestep-conditioned; pass the emb of the timestep to fold")
        norm = self.norm2
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        shift = norm.bias - norm.running_mean * scale
        if self.emb_proj is not None:
            film_scale, film_shift = self.emb_proj(nn.functional.silu(emb))[0].chunk(2)
            scale, shift = scale * (1 + film_scale), shift * (1 + film_scale) + film_shift
            self.emb_proj = None
        bias = self.conv1.bias if self.conv1.bias is not None else torch.zeros_like(shift)
        self.conv1.weight.mul_(scale.view(-1, *([1] * (self.conv1.weight.ndim - 1))))
        self.conv1.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        self.norm2 = nn.Identity()
        return True
