"""The Body Part Regressor network (3D patch design) and its config; loading and saving of either design.

The default design since 2026-11-30 is the slice design (:mod:`DiffusionSegLib.bpr.slice_model`); this module's
3D patch design stays loadable and trainable (``bpr-train --design patch``).

The BPR maps a CT patch on the working grid to a dense 3-channel map of *anatomical coordinates* in
**mm-equivalent** units: channel 0 runs right → left (x), channel 1 anterior → posterior (y), channel 2
inferior → superior (z, cranio-caudal), the axes of the canonical LPS working grid. Differences of coordinates
are physical displacements in mm; the origin is anatomical (learned), not the scanner's.

The patch design (chosen from measurements in the first sessions, see ``Resources/Models/bpr_patch_v1.md``):
the patch is average-pooled to ~6 mm, each voxel's position relative to the patch centre is given as 3 extra
input channels and added to the output, and a light 3D CNN encoder (6 → 48 mm, GroupNorm, replicate padding) regresses one offset per
patch: where the patch centre lies in the body. A patch's coordinates are therefore exactly affine in its
voxels (monotonic, 1 unit = 1 mm); only the offset is learned. Options: soft landmarks and a free per-voxel
residual field (decoder back to 12 mm), and a content-only network.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from DiffusionSegLib.bpr.sampling import crop_positions_mm
from DiffusionSegLib.bpr.slice_model import SliceBodyPartRegressor, SliceBPRConfig
from DiffusionSegLib.preprocess.intensity import check_window

__all__ = ["BPRConfig", "BodyPartRegressor", "COORDINATE_AXES", "UNIT_MM", "default_bpr_path", "load_bpr", "save_bpr",
           "bpr_config_from_dict", "build_bpr", "AnyBPRConfig", "AnyBPR"]

COORDINATE_AXES = ("x: right to left", "y: anterior to posterior", "z: inferior to superior")
"""Meaning of the three output channels (canonical LPS working grid)."""
_OFFSET_CHANNELS = 8
_OFFSET_GAIN = 0.1
"""The patch offset is a linear map of thousands of features: scaled down, so that one Adam step moves it by
millimetres rather than decimetres (measured: unscaled, training oscillates at the untrained loss)."""
UNIT_MM = 100.0
"""The network predicts in units of 100 mm; :meth:`BodyPartRegressor.forward` returns mm-equivalent values."""


@dataclass
class BPRConfig:
    """Everything that defines a Body Part Regressor model and its training (saved with the weights)."""

    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)
    """Input voxel size (x, y, z) in mm: the working grid of :class:`PreprocessConfig`."""
    window_hu: tuple[float, float] = (-125.0, 275.0)
    """HU window scaled to [0, 1]. Inside the BTCV clipping window, so clipped and full-range scans look
    identical to the model (invariance by construction)."""
    patch_size_vox: tuple[int, int, int] = (64, 128, 128)
    """Training and sliding-window patch ``(D, H, W)`` in working-grid voxels (z, y, x): 19 cm cubes."""
    channels: tuple[int, ...] = (16, 32, 48, 64)
    """Encoder widths at 6, 12, 24, 48 mm (one entry per scale; the first is the stem after pooling)."""
    decoder_channels: int = 32
    """Width of the decoder, which returns from the deepest scale to the second one (12 mm by default)."""
    pool_zyx: tuple[int, int, int] = (2, 4, 4)
    """Average-pooling of the input before the stem (to ~6 mm isotropic on the default grid): position in the
    body needs context, not detail."""
    relative_position: bool = True
    """Give the network each voxel's position relative to the patch centre (mm / 100, as 3 input channels at the
    pooled resolution) and add it to the output, so the network only learns the anatomical position of the
    patch (a residual on top of exact within-patch geometry)."""
    landmarks: int = 0
    """Soft landmarks (0: none). Each is a spatial-softmax heatmap over the patch with a learned anatomical
    position; the patch's offset is the visibility-weighted mean of ``landmark position − heatmap centroid``,
    so the coordinates of a patch are exactly affine in its voxels and equivariant to shifting the patch.
    Needs ``relative_position``."""
    global_offset: bool = True
    """Regress one offset per patch from the flattened deepest features (a linear map: it sees where in the
    patch each structure is), added to every voxel; needs ``relative_position``."""
    residual_field: bool = False
    """Add a free per-voxel correction (a zero-initialised 1×1×1 head) to the landmark coordinates. Off by
    default: measured, it learns to shrink the map (trading within-patch geometry for agreement across
    patches) instead of learning where the patch is."""
    objective: Literal["displacement", "distance"] = "displacement"
    """``displacement``: coordinate differences match physical displacement vectors (pins each channel to a
    body axis); ``distance``: only their lengths match (APE; rotation/reflection ambiguity)."""
    invariance_weight: float = 1.0
    """Weight of the term asking the same physical point to get the same coordinates in both crops."""
    points_per_crop: int = 256
    """Voxels sampled per crop for the pairwise objective."""
    max_shift_fraction: float = 0.5
    """Second crop's centre moves by up to this fraction of the patch size along each axis (overlap kept)."""
    far_pair_fraction: float = 0.0
    """Share of pairs whose second crop lies anywhere along z in the scan instead (overlap not needed): they
    teach the cranio-caudal order across the whole body; overlapping pairs alone only teach local shifts."""
    zoom_range: tuple[float, float] = (0.85, 1.15)
    """Per-axis resampling factors of each crop (simulates other spacings)."""
    batch_pairs: int = 4
    """Crop pairs per optimisation step."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    grad_clip_norm: float = 1.0
    """Gradients are clipped to this global norm (0: no clipping); without it a run diverged at step 600."""
    steps: int = 4000
    """Optimisation steps of a training run."""
    seed: int = 0
    """Seed of model initialisation and of all sampling (resumed exactly)."""

    def __post_init__(self) -> None:
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        if len(self.spacing_mm) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm {self.spacing_mm} is invalid; expected three positive sizes in mm")
        self.window_hu = check_window(self.window_hu)
        self.patch_size_vox = tuple(int(p) for p in self.patch_size_vox)  # type: ignore[assignment]
        self.pool_zyx = tuple(int(p) for p in self.pool_zyx)  # type: ignore[assignment]
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.pool_zyx) != 3 or any(p < 1 for p in self.pool_zyx):
            raise ValueError(f"pool_zyx {self.pool_zyx} is invalid; expected three positive factors")
        if len(self.channels) < 2 or any(c < 1 for c in self.channels) or self.decoder_channels < 1:
            raise ValueError(f"channels {self.channels} / decoder_channels {self.decoder_channels} invalid; "
                             "expected at least two positive encoder widths and a positive decoder width")
        multiple = [p * 2 ** (len(self.channels) - 1) for p in self.pool_zyx]
        if len(self.patch_size_vox) != 3 or any(s < m or s % m for s, m in zip(self.patch_size_vox, multiple)):
            raise ValueError(f"patch_size_vox {self.patch_size_vox} is invalid; expected (D, H, W) multiples of "
                             f"{tuple(multiple)} (pooling x 2^(scales-1))")  # fmt: skip
        if self.global_offset and not self.relative_position:
            raise ValueError("global_offset needs relative_position (the offset is added to within-patch positions)")
        if not (self.landmarks or self.residual_field or self.global_offset):
            raise ValueError("landmarks 0 with residual_field False leaves nothing to learn; enable one of them")
        if self.landmarks < 0 or (self.landmarks and not self.relative_position):
            raise ValueError(f"landmarks {self.landmarks} is invalid; expected >= 0, and 0 without relative_position")
        if self.objective not in ("displacement", "distance"):
            raise ValueError(f"objective {self.objective!r} is unknown; expected 'displacement' or 'distance'")
        low, high = (float(z) for z in self.zoom_range)
        if not 0 < low <= high:
            raise ValueError(f"zoom_range {tuple(self.zoom_range)} is invalid; expected 0 < low <= high")
        self.zoom_range = (low, high)
        if not 0 <= self.max_shift_fraction < 1:
            raise ValueError(f"max_shift_fraction {self.max_shift_fraction} is invalid; expected [0, 1)")
        if not 0 <= self.far_pair_fraction <= 1:
            raise ValueError(f"far_pair_fraction {self.far_pair_fraction} is invalid; expected [0, 1]")
        for name in ("points_per_crop", "batch_pairs", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} {getattr(self, name)} is invalid; expected a positive integer")
        if self.grad_clip_norm < 0:
            raise ValueError(f"grad_clip_norm {self.grad_clip_norm} is invalid; expected >= 0 (0: no clipping)")
        if self.learning_rate <= 0 or self.invariance_weight < 0:
            raise ValueError(f"learning_rate {self.learning_rate} / invariance_weight {self.invariance_weight} "
                             "invalid; expected a positive rate and a non-negative weight")  # fmt: skip

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of optimisation step ``step``: constant for the patch design."""
        return self.learning_rate

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> BPRConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused with their names."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BPR config keys {unknown}; expected some of {sorted(known)}")
        return cls(**values)


class _Block(nn.Module):
    """Two 3×3×3 convolutions with GroupNorm and LeakyReLU, and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        conv = {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"}
        self.conv1 = nn.Conv3d(in_channels, out_channels, stride=stride, **conv)
        self.conv2 = nn.Conv3d(out_channels, out_channels, **conv)
        self.norm1 = nn.GroupNorm(min(8, out_channels), out_channels)
        self.norm2 = nn.GroupNorm(min(8, out_channels), out_channels)
        self.skip = (nn.Identity() if in_channels == out_channels and stride == 1
                     else nn.Conv3d(in_channels, out_channels, 1, stride=stride))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(F.leaky_relu(self.norm1(self.conv1(x)), 0.1)))
        return F.leaky_relu(y + self.skip(x), 0.1)


class BodyPartRegressor(nn.Module):
    """Light 3D CNN: windowed CT patch ``(B, 1, D, H, W)`` → coordinates ``(B, 3, D, H, W)`` in mm-equivalent.

    About 0.3 M parameters and 1 GFLOP (forward) per default patch of 64×128×128 working voxels.

    Args:
        config: the model's :class:`BPRConfig` (kept as ``self.config``).
    """

    def __init__(self, config: BPRConfig | None = None) -> None:
        super().__init__()
        self.config = config or BPRConfig()
        widths = self.config.channels
        self.stem = _Block(4 if self.config.relative_position else 1, widths[0])
        self.down = nn.ModuleList(_Block(widths[i], widths[i + 1], stride=2) for i in range(len(widths) - 1))
        width = self.config.decoder_channels
        self.uses_decoder = bool(self.config.residual_field or self.config.landmarks)
        if self.uses_decoder:  # per-voxel outputs (residual field, landmark heatmaps) need the decoder
            self.bottleneck = nn.Conv3d(widths[-1], width, 1)
            self.lateral = nn.ModuleList(nn.Conv3d(widths[i], width, 1) for i in range(1, len(widths) - 1))
            self.decode = nn.ModuleList(_Block(width, width) for _ in range(1, len(widths) - 1))
        if self.config.residual_field:
            self.head = nn.Conv3d(width, 3, 1)
            if self.config.relative_position:  # start from exact within-patch geometry
                nn.init.zeros_(self.head.weight)
                nn.init.zeros_(self.head.bias)
        if self.config.global_offset:
            cells = int(np.prod([s // (p * 2 ** (len(widths) - 1)) for s, p in
                                 zip(self.config.patch_size_vox, self.config.pool_zyx)]))  # fmt: skip
            self.offset_reduce = nn.Conv3d(widths[-1], _OFFSET_CHANNELS, 1)
            self.offset = nn.Linear(cells * _OFFSET_CHANNELS, 3)
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)
        if self.config.landmarks:
            self.heatmaps = nn.Conv3d(width, self.config.landmarks, 1)
            self.landmark_position = nn.Parameter(torch.zeros(self.config.landmarks, 3))  # units of 100 mm

    def forward(self, x: torch.Tensor, output_size: tuple[int, int, int] | None = None,
                step_mm: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Coordinates in mm-equivalent units.

        Args:
            x: windowed CT ``(B, 1, D, H, W)`` in [0, 1] (see :meth:`coarse`).
            output_size: spatial size of the output (default: the input's).
            step_mm: voxel step ``(B, 3)`` (x, y, z) of each patch in mm; default: ``config.spacing_mm``.

        Returns:
            ``(B, 3, D, H, W)`` float tensor (channels x R→L, y A→P, z I→S).
        """
        coarse = self.coarse(x, step_mm)
        size = output_size or tuple(x.shape[-3:])
        return F.interpolate(coarse, size=size, mode="trilinear", align_corners=False) * UNIT_MM

    def coarse(self, x: torch.Tensor, step_mm: torch.Tensor | None = None) -> torch.Tensor:
        """Coordinates in units of 100 mm at the network's output resolution (input / (pool · 2)).

        Each output voxel covers a block of input voxels; its value is the coordinate of the block's centre.
        ``step_mm`` as in :meth:`forward`.
        """
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"input shape {tuple(x.shape)} is invalid; expected (B, 1, D, H, W)")
        multiple = [p * 2 ** (len(self.config.channels) - 1) for p in self.config.pool_zyx]
        if any(s % m for s, m in zip(x.shape[-3:], multiple)):
            raise ValueError(f"input size {tuple(x.shape[-3:])} is invalid; expected multiples of {tuple(multiple)}")
        if any(p > 1 for p in self.config.pool_zyx):
            x = F.avg_pool3d(x, self.config.pool_zyx)
        return self.coarse_pooled(x, step_mm)

    def coarse_pooled(self, x: torch.Tensor, step_mm: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`coarse` for an input already average-pooled by ``config.pool_zyx`` (training samples crops so).

        Args:
            x: pooled windowed CT ``(B, 1, d, h, w)``.
            step_mm: the *working* voxel step ``(B, 3)`` (x, y, z) of each patch; default ``config.spacing_mm``.
        """
        pool = self.config.pool_zyx
        size = tuple(n * p for n, p in zip(x.shape[-3:], pool))
        if self.config.relative_position:
            if step_mm is None:
                step_mm = torch.tensor(self.config.spacing_mm, dtype=x.dtype).expand(x.shape[0], 3)
            centre = torch.zeros_like(step_mm)
            position = crop_positions_mm(centre, step_mm, size, pool) / UNIT_MM
            x = torch.cat([x, position.to(x.dtype)], dim=1)
        features = [self.stem(x)]
        for block in self.down:
            features.append(block(features[-1]))
        coarse_size = tuple(n // s for n, s in zip(size, self.output_stride_zyx))
        out = x.new_zeros((x.shape[0], 3, *coarse_size))
        if self.uses_decoder:
            y = self.bottleneck(features[-1])
            for level, (lateral, block) in enumerate(zip(reversed(self.lateral), reversed(self.decode))):
                skip = features[-2 - level]
                y = F.interpolate(y, size=skip.shape[-3:], mode="trilinear", align_corners=False) + lateral(skip)
                y = block(y)
            if self.config.residual_field:
                out = out + self.head(y)
        if self.config.relative_position:
            position = crop_positions_mm(centre, step_mm, size, self.output_stride_zyx).to(x.dtype) / UNIT_MM
            out = out + position
        if self.config.landmarks:
            out = out + self._landmark_offset(y, position)[:, :, None, None, None]
        if self.config.global_offset:
            deepest = self.offset_reduce(features[-1])
            if deepest.shape[1] * deepest[0, 0].numel() != self.offset.in_features:
                raise ValueError(f"input size {size} is invalid for global_offset; expected the patch size "
                                 f"{self.config.patch_size_vox}")  # fmt: skip
            out = out + _OFFSET_GAIN * self.offset(deepest.flatten(1))[:, :, None, None, None]
        return out

    def _landmark_offset(self, features: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``Σ_k π_k (b_k − E_k)``: E_k heatmap centroid in the patch, b_k the landmark's learned position,
        π_k a softmax over landmarks of each heatmap's strength (log-sum-exp of its logits)."""
        logits = self.heatmaps(features).flatten(2)  # (B, K, n)
        weights = torch.softmax(logits, dim=2)
        centroid = torch.einsum("bkn,bcn->bkc", weights, position.flatten(2))  # (B, K, 3)
        visibility = torch.softmax(torch.logsumexp(logits, dim=2), dim=1)  # (B, K)
        return torch.einsum("bk,bkc->bc", visibility, self.landmark_position[None] - centroid)

    @property
    def output_stride_zyx(self) -> tuple[int, int, int]:
        """Input voxels per coarse output voxel along (z, y, x)."""
        return tuple(p * 2 for p in self.config.pool_zyx)  # type: ignore[return-value]


AnyBPRConfig = BPRConfig | SliceBPRConfig
AnyBPR = BodyPartRegressor | SliceBodyPartRegressor


def bpr_config_from_dict(values: dict) -> AnyBPRConfig:
    """The config of either design from a saved dict (``design: "slice"``; without it, the 3D patch design)."""
    if values.get("design") == "slice":
        return SliceBPRConfig.from_dict(values)
    return BPRConfig.from_dict({k: v for k, v in values.items() if k != "design" or v != "patch"})


def build_bpr(cfg: AnyBPRConfig) -> AnyBPR:
    """A freshly initialised network of the config's design."""
    return SliceBodyPartRegressor(cfg) if isinstance(cfg, SliceBPRConfig) else BodyPartRegressor(cfg)


def default_bpr_path() -> Path:
    """The shipped default BPR weights (``Resources/Models/bpr_default.safetensors``)."""
    from DiffusionSegLib.resources import resources_dir

    return resources_dir() / "Models" / "bpr_default.safetensors"


def load_bpr(path: str | os.PathLike | None = None) -> tuple[AnyBPR, AnyBPRConfig]:
    """Rebuild a BPR (either design) from a weights file alone (in eval mode, on the CPU).

    Args:
        path: a ``.safetensors`` file written by :func:`save_bpr` / ``fit_bpr``; default: :func:`default_bpr_path`.

    Raises:
        UserInputError: the file is missing, damaged or holds another kind of model.
    """
    from DiffusionSegLib.checkpoint import load_weights
    from DiffusionSegLib.errors import UserInputError

    path = Path(path) if path is not None else default_bpr_path()
    state_dict, config, _ = load_weights(path, kind="bpr")
    try:
        cfg = bpr_config_from_dict(config)
        model = build_bpr(cfg)
        model.load_state_dict(state_dict)
    except (ValueError, RuntimeError) as error:
        raise UserInputError(f"'{path}' does not hold a usable BPR: {str(error).splitlines()[0]}") from None
    return model.eval(), cfg


def save_bpr(path: str | os.PathLike, model: AnyBPR, extra: dict | None = None) -> Path:
    """Write a BPR's weights with its config (safetensors, atomic)."""
    from DiffusionSegLib.checkpoint import save_weights

    return save_weights(path, model.state_dict(), kind="bpr", config=model.config.to_dict(), extra=extra)
