"""Pairs of overlapping, differently augmented crops for BPR training, with the physical position of each voxel.

Every volume is on the working grid in canonical LPS orientation: array axes ``(z, y, x)`` grow towards
superior, posterior and the patient's left. A crop is a patch of ``patch_size_vox`` working voxels around a
centre, with its own per-axis zoom (its voxel step is ``spacing · zoom``), so the second crop of a pair overlaps
the first but sees it at another position and resolution. The network average-pools its input first, so crops
are sampled (trilinearly) straight from a pooled copy of each volume. Physical positions are in mm from the
volume's first voxel, ordered ``(x, y, z)`` like the model's output channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import SimpleITK as sitk
import torch
from torch.nn import functional as F

from DiffusionSegLib.preprocess.intensity import scale_hu

__all__ = ["TrainingVolume", "CropBatch", "SliceBatch", "sample_crop_pairs", "sample_slice_crops", "crop_positions_mm"]


@dataclass
class TrainingVolume:
    """One CT on the working grid, windowed to [0, 1] and average-pooled by the BPR's ``pool_zyx``.

    The network pools its input first, so crops are sampled straight from this pooled copy: 32× less memory
    and sampling work than full-resolution crops.
    """

    pooled: torch.Tensor
    """Windowed, pooled volume ``(z, y, x)`` float32; pooled voxel ``k`` is the centre of working voxels
    ``k·pool … k·pool + pool − 1`` (the volume is padded with the window's floor to whole blocks)."""
    spacing_mm: tuple[float, float, float]
    """Voxel size (x, y, z) of the *working* grid in mm."""
    pool_zyx: tuple[int, int, int]
    name: str = ""

    @classmethod
    def from_image(cls, image: sitk.Image, window_hu: Sequence[float], pool_zyx: Sequence[int],
                   name: str = "") -> TrainingVolume:  # fmt: skip
        """Window and pool a working-grid HU image."""
        hu = torch.from_numpy(sitk.GetArrayFromImage(image))
        return cls.from_array(hu, image.GetSpacing(), window_hu, pool_zyx, name)

    @classmethod
    def from_array(cls, hu: torch.Tensor, spacing_mm: Sequence[float], window_hu: Sequence[float],
                   pool_zyx: Sequence[int], name: str = "") -> TrainingVolume:  # fmt: skip
        """Window and pool a working-grid HU array ``(z, y, x)`` with voxel size ``spacing_mm`` (x, y, z)."""
        windowed = scale_hu(hu.float(), window_hu)
        pool = tuple(int(p) for p in pool_zyx)
        pad = [(-n) % p for n, p in zip(windowed.shape, pool)]
        windowed = F.pad(windowed[None, None], (0, pad[2], 0, pad[1], 0, pad[0]), value=0.0)
        pooled = F.avg_pool3d(windowed, pool)[0, 0].contiguous()
        return cls(pooled, tuple(float(s) for s in spacing_mm), pool, name)  # type: ignore[arg-type]

    @property
    def extent_mm(self) -> torch.Tensor:
        """Physical extent (x, y, z) covered by the pooled voxel centres' span, in mm (first working voxel = 0)."""
        shape = torch.tensor(list(reversed(self.pooled.shape)), dtype=torch.float32)
        pool = torch.tensor(list(reversed(self.pool_zyx)), dtype=torch.float32)
        return shape * pool * torch.tensor(self.spacing_mm)


@dataclass
class CropBatch:
    """``2·B`` crops: rows ``2i`` and ``2i + 1`` are the two views of pair ``i``.

    Attributes:
        images: windowed, augmented, pooled crops ``(2B, 1, D/p, H/p, W/p)`` in [0, 1].
        centre_mm: physical centre of each crop ``(2B, 3)``, order (x, y, z), in mm from the volume's first voxel.
        step_mm: voxel step of each crop ``(2B, 3)``, order (x, y, z), in mm (spacing × zoom).
    """

    images: torch.Tensor
    centre_mm: torch.Tensor
    step_mm: torch.Tensor


def crop_positions_mm(centre_mm: torch.Tensor, step_mm: torch.Tensor, size_zyx: Sequence[int],
                      stride_zyx: Sequence[int] = (1, 1, 1)) -> torch.Tensor:  # fmt: skip
    """Physical position of each output voxel of crops.

    Args:
        centre_mm: ``(N, 3)`` crop centres (x, y, z).
        step_mm: ``(N, 3)`` input voxel steps (x, y, z).
        size_zyx: the crop's input size ``(D, H, W)``.
        stride_zyx: input voxels per output voxel (a coarse output voxel sits at the centre of its block).

    Returns:
        ``(N, 3, d, h, w)`` positions (x, y, z) in mm, with ``d = D / stride_z`` etc.
    """
    axes = []
    for size, stride in zip(reversed(list(size_zyx)), reversed(list(stride_zyx))):  # x, y, z
        count = size // stride
        index = torch.arange(count, dtype=torch.float32) * stride + (stride - 1) / 2.0
        axes.append(index - (size - 1) / 2.0)
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    offsets = torch.stack([xx, yy, zz])  # (3, d, h, w) in input voxels
    return centre_mm[:, :, None, None, None] + offsets[None] * step_mm[:, :, None, None, None]


def _sample_crop(volume: TrainingVolume, centre_mm: torch.Tensor, step_mm: torch.Tensor,
                 size_zyx: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """Pooled crop ``(1, D/p, H/p, W/p)`` of a crop of working size ``size_zyx``; outside reads as air (0)."""
    pool = volume.pool_zyx
    positions = crop_positions_mm(centre_mm[None], step_mm[None], size_zyx, pool)[0]  # (3, d, h, w) x, y, z
    spacing = torch.tensor(volume.spacing_mm, dtype=torch.float32)[:, None, None, None]
    pool_xyz = torch.tensor(list(reversed(pool)), dtype=torch.float32)[:, None, None, None]
    index = (positions / spacing - (pool_xyz - 1) / 2) / pool_xyz  # fractional pooled index (x, y, z)
    shape_xyz = torch.tensor(list(reversed(volume.pooled.shape)), dtype=torch.float32)[:, None, None, None]
    grid = (2.0 * index / (shape_xyz - 1).clamp(min=1) - 1.0).permute(1, 2, 3, 0)[None]
    return F.grid_sample(volume.pooled[None, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0]  # fmt: skip


def _augment_intensity(crop: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random contrast, brightness and noise (values stay in [0, 1])."""
    u = torch.rand(3, generator=generator)
    contrast, brightness, noise = 0.9 + 0.2 * u[0], 0.05 * (2 * u[1] - 1), 0.03 * u[2]
    crop = crop * contrast + brightness + noise * torch.randn(crop.shape, generator=generator)
    return crop.clamp(0.0, 1.0)


def sample_crop_pairs(volumes: Sequence[TrainingVolume], batch_pairs: int, size_zyx: Sequence[int],
                      generator: torch.Generator, *,
                      zoom_range: Sequence[float] = (0.85, 1.15), max_shift_fraction: float = 0.5,
                      far_pair_fraction: float = 0.0, augment: bool = True) -> CropBatch:  # fmt: skip
    """Draw ``batch_pairs`` pairs of overlapping crops, each pair from one randomly chosen volume.

    Args:
        volumes: the training volumes (working grid).
        batch_pairs: number of pairs ``B``.
        size_zyx: crop size ``(D, H, W)`` in voxels.
        generator: the only source of randomness (its state makes a run resumable exactly).
        zoom_range: per-axis zoom of each crop (voxel step = spacing × zoom).
        max_shift_fraction: the second centre moves by up to this fraction of the first crop's extent per axis.
        far_pair_fraction: probability that a pair's second crop is instead centred anywhere along z in the
            scan (in-plane shift as above): such pairs need not overlap and teach the cranio-caudal order over
            the whole body, as the slice-ordering loss of Yan et al. does.
        augment: apply intensity augmentation.

    Returns:
        A :class:`CropBatch` of ``2B`` pooled crops (feed them to ``BodyPartRegressor.coarse_pooled``).
    """
    if not volumes:
        raise ValueError("no training volumes; expected at least one CT")
    size_xyz = torch.tensor(list(reversed(list(size_zyx))), dtype=torch.float32)
    images, centres, steps = [], [], []
    for _ in range(batch_pairs):
        volume = volumes[int(torch.randint(len(volumes), (1,), generator=generator))]
        spacing = torch.tensor(volume.spacing_mm, dtype=torch.float32)
        extent = volume.extent_mm
        zoom = zoom_range[0] + (zoom_range[1] - zoom_range[0]) * torch.rand(2, 3, generator=generator)
        step_a, step_b = spacing * zoom[0], spacing * zoom[1]
        centre_a = torch.rand(3, generator=generator) * extent
        shift = (2 * torch.rand(3, generator=generator) - 1) * max_shift_fraction * size_xyz * step_a
        centre_b = centre_a + shift
        if far_pair_fraction > 0 and float(torch.rand(1, generator=generator)) < far_pair_fraction:
            centre_b[2] = torch.rand(1, generator=generator)[0] * extent[2]
        for centre, step in ((centre_a, step_a), (centre_b, step_b)):
            crop = _sample_crop(volume, centre, step, size_zyx)
            images.append(_augment_intensity(crop, generator) if augment else crop)
            centres.append(centre)
            steps.append(step)
    return CropBatch(torch.stack(images), torch.stack(centres), torch.stack(steps))


@dataclass
class SliceBatch:
    """``S·K`` slice crops, ``K`` consecutive rows per scan (pairs of rows share a slice).

    Attributes:
        images: windowed, augmented crops ``(S·K, C, N, N)`` in [0, 1] (C slab slices).
        centre_mm: physical centre (x, y, z) of each crop ``(S·K, 3)``, mm from the scan's first working voxel.
        step_xy_mm: pixel size (x, y) of each crop ``(S·K, 2)``.
        crops_per_scan: ``K``.
    """

    images: torch.Tensor
    centre_mm: torch.Tensor
    step_xy_mm: torch.Tensor
    crops_per_scan: int


def sample_slice_crops(volumes: Sequence[TrainingVolume], cfg, generator: torch.Generator,
                       augment: bool = True) -> SliceBatch:  # fmt: skip
    """Crops of axial slices for the slice design (``cfg``: a ``SliceBPRConfig``).

    Per scan (drawn at random), ``K/2`` levels anywhere along z, each cropped twice around centres up to
    ``cfg.max_shift_mm`` from the scan's centre with independent per-axis zooms: the z pairs teach the
    cranio-caudal order over the whole body, the same-level pairs the in-plane geometry.
    """
    from DiffusionSegLib.bpr.slice_model import sample_slices

    if not volumes:
        raise ValueError("no training volumes; expected at least one CT")
    k = cfg.crops_per_scan
    images, centres, steps = [], [], []
    for _ in range(cfg.scans_per_step):
        volume = volumes[int(torch.randint(len(volumes), (1,), generator=generator))]
        extent = volume.extent_mm
        z = (torch.rand(k // 2, generator=generator) * extent[2]).repeat_interleave(2)
        reach = torch.clamp(extent[:2] / 2, max=cfg.max_shift_mm)
        xy = extent[:2] / 2 + (2 * torch.rand(k, 2, generator=generator) - 1) * reach
        low, high = cfg.zoom_range
        step = cfg.slice_step_mm * (low + (high - low) * torch.rand(k, 2, generator=generator))
        centre = torch.cat([xy, z[:, None]], dim=1)
        crops = sample_slices(volume.pooled, volume.spacing_mm, volume.pool_zyx, centre, step, cfg)
        if augment:
            crops = torch.stack([_augment_intensity(crop, generator) for crop in crops])
        images.append(crops)
        centres.append(centre)
        steps.append(step)
    return SliceBatch(torch.cat(images), torch.cat(centres), torch.cat(steps), k)
