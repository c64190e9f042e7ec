"""The backbone: a vox2vec-like FPN3d (3D U-Net) with optional timestep conditioning.

Layout (level ``l`` has ``C_l = min(base_channels * channel_multiplier^l, max_channels)`` channels and spatial
size ``(D, H, W) / 2^l``)::

    x ─ stem 3x3x3 ─ [ResBlock x n]_0 ─ maxpool ─ [ResBlock x n]_1 ─ ... ─ maxpool ─ [ResBlock x n]_{L-1} ─┐
                           │ 1x1 skip                  │ 1x1 skip                                          │
                     [ResBlock x n]_0 ◄─ up+1x1 ─ [ResBlock x n]_1 ◄─ ...              ◄─ up + 1x1 ───────┘
                           │
                   pyramid[0] ─ norm ─ act ─ 3x3x3 conv ─► prediction (out_channels, full resolution)

The decoder outputs (``pyramid[0]`` finest ... ``pyramid[L-1]`` = the bottleneck) are the voxel features of the
downstream probes; concatenated at full resolution they give ``sum(feature_channels)`` dimensions (vox2vec: 1008
for base 16 and 6 scales). Upsampling is nearest-neighbour; the 1x1x1 channel reduction is applied *before*
upsampling (it commutes with nearest upsampling and costs 8x less). Each residual block receives the timestep
embedding when ``time_conditioning`` is on; the restorative / contrastive baselines build the same network with
it off, and then ``t`` is ignored.

Defaults: base 16, 5 scales (16..256 channels, 496-dim voxel feature, 10.9 M parameters), 2 blocks per level,
batch norm, ReLU. vox2vec's 6 scales up to 512 channels (43 M parameters, 1008 dims) needs patch sizes divisible
by 32 and quadruples the optimizer's work for little extra compute; it stays one option away
(``num_scales=6, max_channels=512``). Batch norm, ReLU and 2 blocks were kept after timing the alternatives with
``benchmarks/backbone_throughput.py --candidates`` (``benchmarks/results/backbone_throughput.md``): group norm
and SiLU cost about the same, instance norm is slower, 1 block per level is ~1.8x faster per step; batch norm in
eval mode also keeps a voxel's features independent of the window it is computed in.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from DiffusionSegLib.nets.blocks import ACTIVATIONS, NORMS, PointwiseConv3d, ResBlock3d, make_activation, make_norm
from DiffusionSegLib.nets.embedding import TimestepEmbedding

__all__ = ["UNet3dConfig", "UNet3d", "UNet3dOutput"]


@dataclass
class UNet3dConfig:
    """Everything needed to rebuild a :class:`UNet3d` (saved with its weights)."""

    in_channels: int = 4
    """Input channels: the noisy patch x_t (1) plus the BPR coordinate map (3), or 1 without BPR."""
    out_channels: int = 1
    """Prediction channels at full resolution (1: the noise or the clean patch)."""
    base_channels: int = 16
    """Channels of the finest level."""
    num_scales: int = 5
    """Pyramid levels L; spatial sizes must be divisible by 2^(L - 1). vox2vec uses 6 (channels 16..512)."""
    channel_multiplier: int = 2
    """Channel growth per coarser level."""
    max_channels: int = 256
    """Cap on the channels of coarse levels."""
    num_res_blocks: int = 2
    """Residual blocks per level, in the encoder and again in the decoder (vox2vec: 2)."""
    time_conditioning: bool = True
    """Inject the timestep embedding into every residual block; off for the non-diffusion baselines."""
    norm: str = "batch"
    """Normalisation: batch | group | instance | none."""
    norm_groups: int = 8
    """Groups of group norm (reduced to gcd(norm_groups, channels))."""
    act: str = "relu"
    """Activation: relu | silu | gelu."""
    time_embed_dim: int = 0
    """Size of the timestep embedding; 0 means 4 * base_channels."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "base_channels", "num_scales", "channel_multiplier",
                     "num_res_blocks", "norm_groups"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be a positive integer")
        if self.max_channels < self.base_channels:
            raise ValueError(f"max_channels {self.max_channels} is below base_channels {self.base_channels}")
        if self.time_embed_dim < 0:
            raise ValueError(f"time_embed_dim {self.time_embed_dim} must be >= 0 (0: 4 * base_channels)")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is unknown; expected one of {list(NORMS)}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act {self.act!r} is unknown; expected one of {list(ACTIVATIONS)}")

    @property
    def feature_channels(self) -> list[int]:
        """Channels of each pyramid level, finest first."""
        return [min(self.base_channels * self.channel_multiplier**level, self.max_channels)
                for level in range(self.num_scales)]  # fmt: skip

    @property
    def size_divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this (2^(num_scales - 1))."""
        return 2 ** (self.num_scales - 1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UNet3dOutput:
    """What :meth:`UNet3d.forward` returns.

    Attributes:
        prediction: (B, out_channels, D, H, W) the denoising (or restoration) prediction; None when the forward
            pass was asked for the pyramid only.
        pyramid: decoder features, finest first; level ``l`` has shape (B, C_l, D/2^l, H/2^l, W/2^l).
    """

    prediction: torch.Tensor | None
    pyramid: list[torch.Tensor]


class _Stage(nn.Module):
    """``n`` residual blocks at one level, sharing the conditioning vector."""

    def __init__(self, in_channels: int, out_channels: int, n: int, emb_channels: int | None, cfg: UNet3dConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock3d(in_channels if i == 0 else out_channels, out_channels, norm=cfg.norm, act=cfg.act,
                       norm_groups=cfg.norm_groups, emb_channels=emb_channels)  # fmt: skip
            for i in range(n)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, emb)
        return x


class UNet3d(nn.Module):
    """FPN3d / 3D U-Net backbone returning a full-resolution prediction and the decoder feature pyramid.

    Args:
        config: a :class:`UNet3dConfig`; alternatively pass its fields as keyword arguments
            (``in_channels``, ``out_channels``, ``base_channels``, ``num_scales``, ``channel_multiplier``,
            ``max_channels``, ``num_res_blocks``, ``time_conditioning``, ``norm``, ``norm_groups``, ``act``,
            ``time_embed_dim``).

    Raises:
        ValueError: for an invalid option, or both a config and keyword options.

    Example::

        net = UNet3d(in_channels=4, out_channels=1, base_channels=16, num_scales=5)
        out = net(torch.randn(2, 4, 32, 64, 64), torch.tensor([3, 7]))
        out.prediction.shape, [p.shape[1] for p in out.pyramid]  # (2, 1, 32, 64, 64), [16, 32, 64, 128, 256]
    """

    def __init__(self, config: UNet3dConfig | None = None, **options: object) -> None:
        super().__init__()
        if config is not None and options:
            raise ValueError(f"pass either a UNet3dConfig or keyword options, not both (got {sorted(options)})")
        cfg = config if config is not None else UNet3dConfig(**options)  # type: ignore[arg-type]
        self.config = cfg
        channels = cfg.feature_channels
        self.feature_channels: list[int] = list(channels)
        emb = None
        if cfg.time_conditioning:
            emb = cfg.time_embed_dim or 4 * cfg.base_channels
            self.time_embed: TimestepEmbedding | None = TimestepEmbedding(emb)
        else:
            self.time_embed = None
        n = cfg.num_res_blocks
        self.stem = nn.Conv3d(cfg.in_channels, channels[0], kernel_size=3, padding=1)
        self.encoder = nn.ModuleList(
            _Stage(channels[max(level - 1, 0)], channels[level], n, emb, cfg) for level in range(cfg.num_scales)
        )
        self.pool = nn.MaxPool3d(kernel_size=2)
        # decoder modules for levels 0 .. L-2 (the coarsest level's features are the encoder bottleneck)
        self.lateral = nn.ModuleList(PointwiseConv3d(c, c) for c in channels[:-1])
        self.reduce = nn.ModuleList(
            PointwiseConv3d(channels[level + 1], channels[level]) for level in range(cfg.num_scales - 1)
        )
        self.decoder = nn.ModuleList(_Stage(c, c, n, emb, cfg) for c in channels[:-1])
        self.out = nn.Sequential(
            make_norm(cfg.norm, channels[0], cfg.norm_groups),
            make_activation(cfg.act),
            nn.Conv3d(channels[0], cfg.out_channels, kernel_size=3, padding=1),
        )

    @classmethod
    def from_config(cls, config: UNet3dConfig | dict) -> UNet3d:
        """Build from a :class:`UNet3dConfig` or its ``to_dict()``."""
        return cls(config if isinstance(config, UNet3dConfig) else UNet3dConfig(**config))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, D, H, W) with sizes divisible by 2^(L-1)."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"input must have shape (B, {cfg.in_channels}, D, H, W), got {tuple(x.shape)}")
        divisor = cfg.size_divisor
        spatial = tuple(x.shape[2:])
        if any(s % divisor for s in spatial):
            raise ValueError(
                f"spatial size {spatial} is not divisible by {divisor} = 2^(num_scales - 1) with "
                f"num_scales={cfg.num_scales}; pad or crop the input to multiples of {divisor}"
            )

    def _embed_time(self, t: torch.Tensor | float | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.time_embed is None:
            return None
        if t is None:
            raise ValueError("this backbone is timestep-conditioned (time_conditioning=True); pass t")
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        return self.time_embed(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | None = None, *,
                prediction: bool = True) -> UNet3dOutput:  # fmt: skip
        """Predict from a (noisy) patch and return the feature pyramid.

        Args:
            x: (B, in_channels, D, H, W), each spatial size divisible by 2^(num_scales - 1).
            t: (B,) or scalar timesteps (scheduler indices 0..T-1). Required when ``time_conditioning`` is on,
                ignored when it is off.
            prediction: also compute the prediction head (a full-resolution norm and 3x3x3 conv, about 5 % of a
                forward pass); features and fine-tuning read only the pyramid.

        Returns:
            :class:`UNet3dOutput` with ``prediction`` (B, out_channels, D, H, W) and ``pyramid``, a list of
            ``num_scales`` tensors (B, C_l, D/2^l, H/2^l, W/2^l), finest first.

        Raises:
            ValueError: on a wrong input shape, a spatial size not divisible by 2^(num_scales - 1), or a missing
                ``t`` for a timestep-conditioned backbone.
        """
        self.check_input(x)
        emb = self._embed_time(t, x.shape[0], x.device)
        h = self.stem(x)
        skips: list[torch.Tensor] = []
        for level, stage in enumerate(self.encoder):
            if level > 0:
                h = self.pool(h)
            h = stage(h, emb)
            skips.append(h)
        pyramid = [h]
        for level in range(self.config.num_scales - 2, -1, -1):
            up = nn.functional.interpolate(self.reduce[level](h), scale_factor=2.0, mode="nearest")
            h = self.decoder[level](up + self.lateral[level](skips[level]), emb)
            pyramid.append(h)
        pyramid.reverse()
        return UNet3dOutput(prediction=self.out(pyramid[0]) if prediction else None, pyramid=pyramid)

    @torch.no_grad()
    def folded_for_inference(self, t: int | None = None) -> UNet3d:
        """A copy for inference at timestep ``t``: every residual block's second batch norm and timestep scale and
        shift folded into its first convolution (:meth:`ResBlock3d.fold_`). Same pyramid up to float rounding
        (relative 1e-6), about 15 % faster on a CPU. Eval mode only (batch norm's running statistics); blocks with
        other norms are copied unchanged.

        Raises:
            ValueError: in training mode, or without ``t`` for a timestep-conditioned backbone.
        """
        if self.training:
            raise ValueError("folding uses batch norm's running statistics; call eval() first")
        folded = copy.deepcopy(self)
        emb = None
        if self.time_embed is not None:
            if t is None:
                raise ValueError("this backbone is timestep-conditioned (time_conditioning=True); pass t")
            device = next(self.parameters()).device
            emb = self.time_embed(torch.tensor([int(t)], device=device))
        for block in folded.modules():
            if isinstance(block, ResBlock3d):
                block.fold_(emb)
        return folded.requires_grad_(False)
