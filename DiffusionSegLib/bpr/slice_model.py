"""The slice design of the Body Part Regressor: a 2D network on whole axial cross-sections.

Each axial slice (with its neighbours at ±3 mm as extra channels, resampled to a 128 × 128 crop of 3.5 mm
pixels: 45 cm, a whole cross-section) gives one **offset**: the anatomical coordinates (x, y, z) of the crop's
centre. Inside a slice the coordinates are exact physical positions plus that offset (1 unit = 1 mm), as in the
patch design; across slices the network places each slice along the body — the slice-score idea of Yan et al.
and of the public BPR (Schuhegger et al.), with physical displacements instead of an ordering loss.

Why slices (measured, see ``Resources/Models/bpr_default.md``): the cross-section pins the cranio-caudal level
(lungs, liver dome, kidneys, pelvis) far better than a 19 cm cube, and a 2D network sees 64 of them per step on
2 CPU cores. After 63 CPU-minutes the network's cranio-caudal slope is 0.95–1.15 mm per mm on 32 scans
(median 1.00), where the 3D patch design stayed at 0.16–0.29 on long scans after 25 minutes. Each slice's
coordinates depend only on that slice and its neighbours, so cropping a scan along z changes nothing in the
dense map (two fields of view of one scan: 0.2 mm apart, was 112 mm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from DiffusionSegLib.preprocess.intensity import check_window

__all__ = ["SliceBPRConfig", "SliceBodyPartRegressor", "slice_centres_mm", "sample_slices", "body_crop_centres_mm",
           "slice_offsets"]

_UNIT_MM = 100.0  # as bpr.model.UNIT_MM (not imported: model.py imports this module)
_XY_GAIN = 0.1
"""The in-plane offset is a linear map of the flattened deepest features (it must see where structures lie in
the crop): scaled down so one Adam step moves it by millimetres, as in the patch design."""


@dataclass
class SliceBPRConfig:
    """Everything that defines a slice-design BPR and its training (saved with the weights)."""

    design: Literal["slice"] = "slice"
    """Marks the design in saved configs (files without it hold the 3D patch design, ``BPRConfig``)."""
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)
    """Working grid (x, y, z) in mm, as :class:`PreprocessConfig`; slices are the working grid's z planes."""
    window_hu: tuple[float, float] = (-125.0, 275.0)
    """HU window scaled to [0, 1]: inside the BTCV clipping window, so clipped scans look the same."""
    slice_size_px: int = 128
    """Crop side in pixels (a multiple of 2^len(channels))."""
    slice_step_mm: float = 3.5
    """Crop pixel size in mm (128 × 3.5 mm = 45 cm: a whole abdominal or chest cross-section)."""
    slab_offsets_mm: tuple[float, ...] = (-3.0, 0.0, 3.0)
    """The slices given as input channels, relative to the slice being placed (mm along z)."""
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    """Widths of the stride-2 residual stages (128 px → 4 px by default)."""
    zoom_range: tuple[float, float] = (0.85, 1.15)
    """Per-axis in-plane zoom of training crops (simulates other spacings and body sizes)."""
    max_shift_mm: float = 75.0
    """Training crop centres move up to this far (per in-plane axis) from the scan's centre."""
    scans_per_step: int = 8
    """Scans per optimisation step."""
    crops_per_scan: int = 8
    """Crops per scan and step (even: every slice drawn is cropped twice, at other centres and zooms)."""
    learning_rate: float = 1e-3
    """Adam learning rate (peak)."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """``cosine``: the rate decays to 0 over ``steps`` (a function of the step, so resuming is exact)."""
    grad_clip_norm: float = 1.0
    """Gradients are clipped to this global norm (0: no clipping)."""
    steps: int = 6000
    """Optimisation steps of a training run."""
    seed: int = 0
    """Seed of model initialisation and of all sampling."""

    def __post_init__(self) -> None:
        if self.design != "slice":
            raise ValueError(f"design {self.design!r} is invalid for SliceBPRConfig; expected 'slice'")
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        if len(self.spacing_mm) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm {self.spacing_mm} is invalid; expected three positive sizes in mm")
        self.window_hu = check_window(self.window_hu)
        self.channels = tuple(int(c) for c in self.channels)
        self.slab_offsets_mm = tuple(float(o) for o in self.slab_offsets_mm)
        if len(self.channels) < 2 or any(c < 8 for c in self.channels):
            raise ValueError(f"channels {self.channels} is invalid; expected at least two widths >= 8")
        divisor = 2 ** len(self.channels)
        if self.slice_size_px < divisor or self.slice_size_px % divisor:
            raise ValueError(f"slice_size_px {self.slice_size_px} is invalid; expected a multiple of {divisor} "
                             "(2^len(channels))")  # fmt: skip
        if not self.slice_step_mm > 0 or not self.slab_offsets_mm:
            raise ValueError(f"slice_step_mm {self.slice_step_mm} / slab_offsets_mm {self.slab_offsets_mm} invalid; "
                             "expected a positive pixel size and at least one slice")  # fmt: skip
        low, high = (float(z) for z in self.zoom_range)
        if not 0 < low <= high:
            raise ValueError(f"zoom_range {tuple(self.zoom_range)} is invalid; expected 0 < low <= high")
        self.zoom_range = (low, high)
        if self.crops_per_scan < 2 or self.crops_per_scan % 2:
            raise ValueError(f"crops_per_scan {self.crops_per_scan} is invalid; expected an even number >= 2")
        for name in ("scans_per_step", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} {getattr(self, name)} is invalid; expected a positive integer")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is unknown; expected 'cosine' or 'constant'")
        if self.learning_rate <= 0 or self.grad_clip_norm < 0 or self.max_shift_mm < 0:
            raise ValueError(f"learning_rate {self.learning_rate}, grad_clip_norm {self.grad_clip_norm} or "
                             f"max_shift_mm {self.max_shift_mm} invalid; expected > 0, >= 0, >= 0")  # fmt: skip

    @property
    def pool_zyx(self) -> tuple[int, int, int]:
        """In-plane average pooling of the working volume before sampling crops (no aliasing at 3.5 mm)."""
        return (1, *(max(1, int(self.slice_step_mm // s)) for s in reversed(self.spacing_mm[:2])))  # type: ignore

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of optimisation step ``step`` (0-based)."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        return self.learning_rate * 0.5 * (1.0 + float(np.cos(np.pi * min(step, self.steps) / self.steps)))

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> SliceBPRConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused with their names."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown slice BPR config keys {unknown}; expected some of "
                             f"{sorted(cls.__dataclass_fields__)}")  # fmt: skip
        return cls(**values)


class _Block2d(nn.Module):
    """Two 3×3 convolutions with GroupNorm and LeakyReLU, a residual connection, stride on the first."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.norm1 = nn.GroupNorm(8, out_channels)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(F.leaky_relu(self.norm1(self.conv1(x)), 0.1)))
        return F.leaky_relu(y + self.skip(x), 0.1)


class SliceBodyPartRegressor(nn.Module):
    """2D CNN: slabs ``(B, S, N, N)`` → anatomical coordinates of each crop's centre ``(B, 3)``, mm-equivalent.

    The crop's pixel positions relative to its centre (in units of 100 mm) are 2 extra input channels. The
    cranio-caudal coordinate comes from globally pooled features (an in-plane shift of the crop cannot change
    it); the in-plane ones from a linear map of the flattened deepest features. About 0.5 M parameters.
    """

    def __init__(self, config: SliceBPRConfig | None = None) -> None:
        super().__init__()
        self.config = config or SliceBPRConfig()
        widths = self.config.channels
        inputs = len(self.config.slab_offsets_mm) + 2
        self.stages = nn.Sequential(_Block2d(inputs, widths[0], 2),
                                    *(_Block2d(widths[i], widths[i + 1], 2) for i in range(len(widths) - 1)))
        self.z_head = nn.Sequential(nn.Linear(widths[-1], 64), nn.LeakyReLU(0.1), nn.Linear(64, 1))
        cells = (self.config.slice_size_px // 2 ** len(widths)) ** 2
        self.xy_reduce = nn.Conv2d(widths[-1], 8, 1)
        self.xy_head = nn.Linear(8 * cells, 2)
        nn.init.zeros_(self.xy_head.weight)
        nn.init.zeros_(self.xy_head.bias)
        n = self.config.slice_size_px
        index = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / _UNIT_MM  # pixels → 100 mm per mm step
        self.register_buffer("pixel_index", torch.stack(torch.meshgrid(index, index, indexing="xy")), persistent=False)

    def forward(self, slabs: torch.Tensor, step_xy_mm: torch.Tensor | None = None) -> torch.Tensor:
        """Anatomical coordinates (x, y, z) of each crop's centre, in mm-equivalent units.

        Args:
            slabs: windowed crops ``(B, S, N, N)`` in [0, 1] (``S`` = len(slab_offsets_mm), rows = y, cols = x).
            step_xy_mm: pixel size ``(B, 2)`` (x, y) of each crop; default ``config.slice_step_mm``.
        """
        return self.offsets(slabs, step_xy_mm) * _UNIT_MM

    def offsets(self, slabs: torch.Tensor, step_xy_mm: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` in units of 100 mm (what training optimises)."""
        n, count = self.config.slice_size_px, len(self.config.slab_offsets_mm)
        if slabs.ndim != 4 or slabs.shape[1:] != (count, n, n):
            raise ValueError(f"input shape {tuple(slabs.shape)} is invalid; expected (B, {count}, {n}, {n})")
        if step_xy_mm is None:
            step_xy_mm = slabs.new_full((slabs.shape[0], 2), self.config.slice_step_mm)
        position = self.pixel_index[None] * step_xy_mm[:, :, None, None].to(slabs.dtype)
        features = self.stages(torch.cat([slabs, position], dim=1))
        z = self.z_head(features.mean(dim=(2, 3)))
        xy = _XY_GAIN * self.xy_head(self.xy_reduce(features).flatten(1))
        return torch.cat([xy, z], dim=1)


def sample_slices(pooled: torch.Tensor, spacing_mm, pool_zyx, centre_mm: torch.Tensor, step_xy_mm: torch.Tensor,
                  cfg: SliceBPRConfig) -> torch.Tensor:  # fmt: skip
    """Crops ``(K, S, N, N)`` of a pooled, windowed working volume.

    Outside the volume in-plane reads as air (0); a slab slice beyond the first or last slice repeats that
    slice, so the edge slices of a scan look like any other (with zeros there, they got offsets ~10 cm off,
    and a scan cut along z changed its new edge slices' coordinates).

    Args:
        pooled: ``(Z, Y, X)`` windowed volume average-pooled by ``pool_zyx`` (see ``TrainingVolume``).
        spacing_mm: the *working* voxel size (x, y, z).
        pool_zyx: its pooling.
        centre_mm: ``(K, 3)`` crop centres (x, y, z) in mm from the first working voxel.
        step_xy_mm: ``(K, 2)`` pixel sizes (x, y).
        cfg: the model config (crop size and slab offsets).
    """
    n, offsets = cfg.slice_size_px, torch.tensor(cfg.slab_offsets_mm, dtype=torch.float32)
    k = centre_mm.shape[0]
    pool = torch.tensor(list(reversed(pool_zyx)), dtype=torch.float32)
    spacing = torch.tensor(spacing_mm, dtype=torch.float32)
    shape_xyz = torch.tensor(list(reversed(pooled.shape)), dtype=torch.float32)
    index = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    x = centre_mm[:, 0, None] + index[None] * step_xy_mm[:, 0, None]  # (K, N)
    y = centre_mm[:, 1, None] + index[None] * step_xy_mm[:, 1, None]
    z = centre_mm[:, 2, None] + offsets[None]  # (K, S)

    def normalised(mm: torch.Tensor, axis: int) -> torch.Tensor:  # pooled voxel k is centred on working k·p + (p−1)/2
        fractional = (mm / spacing[axis] - (pool[axis] - 1) / 2) / pool[axis]
        return 2 * fractional / (shape_xyz[axis] - 1).clamp(min=1) - 1

    s = offsets.numel()
    z_inside = normalised(z, 2).clamp(-1.0, 1.0)  # a neighbour beyond the first / last slice repeats it
    grid = torch.stack([normalised(x, 0)[:, None, None, :].expand(k, s, n, n),
                        normalised(y, 1)[:, None, :, None].expand(k, s, n, n),
                        z_inside[:, :, None, None].expand(k, s, n, n)], dim=-1)  # fmt: skip
    volume = pooled[None, None].expand(k, 1, *pooled.shape)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def slice_centres_mm(hu: torch.Tensor, spacing_mm, body_hu: float = -100.0) -> torch.Tensor:
    """Where to centre each slice's crop: the centre (x, y) of the body's box in that slice, in mm.

    Intrinsic to the anatomy, so a scan cropped or padded in-plane gets the same crops. Slices without body
    voxels take the volume's centre. Returns ``(Z, 2)``.
    """
    body = hu > body_hu  # (Z, Y, X)
    out = torch.empty(hu.shape[0], 2)
    for axis, (dim, spacing) in enumerate(((1, spacing_mm[0]), (2, spacing_mm[1]))):  # x: reduce y; y: reduce x
        present = body.any(dim=dim).float()  # (Z, n)
        count = present.shape[1]
        positions = torch.arange(count, dtype=torch.float32)
        first = torch.where(present > 0, positions, torch.full_like(positions, float(count))).amin(1)
        last = torch.where(present > 0, positions, torch.full_like(positions, -1.0)).amax(1)
        centre = torch.where(last >= 0, (first + last) / 2, torch.full_like(first, (count - 1) / 2))
        out[:, axis] = centre * spacing
    return out


def body_crop_centres_mm(hu: torch.Tensor, spacing_mm) -> torch.Tensor:
    """The crop centre of every slice at inference: the body's box centre in-plane, the slice's z. ``(Z, 3)`` mm."""
    z = torch.arange(hu.shape[0], dtype=torch.float32)[:, None] * spacing_mm[2]
    return torch.cat([slice_centres_mm(hu, spacing_mm), z], dim=1)


@torch.no_grad()
def slice_offsets(model: SliceBodyPartRegressor, volume, centre_mm: torch.Tensor, device="cpu",
                  batch: int = 32) -> torch.Tensor:  # fmt: skip
    """Anatomical coordinates minus physical position of crops at ``centre_mm`` ``(K, 3)`` of a windowed, pooled
    working volume (a ``TrainingVolume``), in eval mode and batches of ``batch``. ``(K, 3)`` on the CPU."""
    cfg = model.config
    was_training = model.training
    model.eval()
    offsets = []
    try:
        for start in range(0, centre_mm.shape[0], batch):
            chunk = centre_mm[start : start + batch]
            step = torch.full((chunk.shape[0], 2), cfg.slice_step_mm)
            crops = sample_slices(volume.pooled, volume.spacing_mm, volume.pool_zyx, chunk, step, cfg)
            offsets.append(model(crops.to(device), step.to(device)).float().cpu() - chunk)
    finally:
        model.train(was_training)
    return torch.cat(offsets)
