"""vox2vec-style voxel contrastive learning for the contrastive baseline (Goncharov et al., MICCAI 2023).

Two overlapping views of the same region are cut and augmented independently; voxels of the overlap are matched,
their pyramid features are projected by an MLP and an InfoNCE loss pulls a voxel's two embeddings together and
pushes other voxels' apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from DiffusionSegLib.preprocess import scale_hu

__all__ = ["sample_overlapping_views", "gather_pyramid_features", "ProjectionHead", "info_nce", "matched_voxels"]


def sample_overlapping_views(sampler, batch_size: int, max_shift_fraction: float = 0.25):
    """Two patch batches whose patches overlap pairwise (each shifted up to ``max_shift_fraction`` of the size).

    Intensities are augmented independently in each view (random HU window, gamma, noise; optionally the
    sampler's clipping), all from the sampler's generator.

    Returns:
        ``(view_a, view_b, origins_a, origins_b)``: two ``(B, 1, D, H, W)`` tensors in [0, 1] and the
        ``(B, 3)`` corner indices of each patch in its volume.
    """
    rng = sampler.rng
    size = np.asarray(sampler.patch_size)
    max_shift = np.maximum((size * max_shift_fraction).astype(int), 0)
    views: tuple[list, list] = ([], [])
    origins: tuple[list, list] = ([], [])
    for _ in range(batch_size):
        index = int(rng.choice(len(sampler.volumes), p=sampler.volume_weights))
        volume = sampler.volumes[index]
        centre = volume.centres[rng.integers(len(volume.centres))]
        for view, corners in zip(views, origins, strict=True):
            origin = centre - size // 2 + rng.integers(-max_shift, max_shift + 1)
            hu, _ = sampler.sample_at(index, origin)
            view.append(_augment(hu, sampler.window_hu, rng, sampler.clip_probability, sampler.clip_window_hu))
            corners.append(origin)
    return (torch.from_numpy(np.stack(views[0])), torch.from_numpy(np.stack(views[1])),
            np.stack(origins[0]), np.stack(origins[1]))  # fmt: skip


def _augment(hu: np.ndarray, window_hu: Sequence[float], rng: np.random.Generator, clip_probability: float,
             clip_window_hu: Sequence[float]) -> np.ndarray:  # fmt: skip
    if clip_probability and rng.random() < clip_probability:
        hu = np.clip(hu, *clip_window_hu)
    low, high = window_hu
    width = high - low
    jitter = rng.uniform(-0.1, 0.1, size=2) * width
    image = scale_hu(hu, (low + jitter[0], high + jitter[1]))
    image = image ** rng.uniform(0.8, 1.25)
    image = image + rng.normal(0, 0.02, size=image.shape).astype(np.float32)
    return image.astype(np.float32)


def matched_voxels(origins_a: np.ndarray, origins_b: np.ndarray, patch_size: Sequence[int], per_pair: int,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random voxels in each pair's overlap, as ``(N, 4)`` (batch, z, y, x) indices into view a and view b."""
    size = np.asarray(patch_size)
    rows_a, rows_b = [], []
    for batch_index, (a, b) in enumerate(zip(origins_a, origins_b, strict=True)):
        low, high = np.maximum(a, b), np.minimum(a + size, b + size)
        if np.any(high <= low):
            continue
        points = np.stack([rng.integers(lo, hi, per_pair) for lo, hi in zip(low, high, strict=True)], axis=1)
        column = np.full((per_pair, 1), batch_index)
        rows_a.append(np.concatenate([column, points - a], axis=1))
        rows_b.append(np.concatenate([column, points - b], axis=1))
    if not rows_a:
        raise RuntimeError("no overlapping view pairs; lower max_shift_fraction")
    return torch.from_numpy(np.concatenate(rows_a)).long(), torch.from_numpy(np.concatenate(rows_b)).long()


def gather_pyramid_features(pyramid: Sequence[torch.Tensor], voxels: torch.Tensor) -> torch.Tensor:
    """Features of given full-resolution voxels from every pyramid level, concatenated.

    Args:
        pyramid: feature maps, finest first, level ``l`` of shape ``(B, C_l, D / 2^l, H / 2^l, W / 2^l)``.
        voxels: ``(N, 4)`` long tensor of (batch, z, y, x) indices at full resolution.

    Returns:
        ``(N, sum C_l)``: for each level, the feature of the cell containing the voxel (nearest upsampling).
    """
    voxels = voxels.to(pyramid[0].device)
    features = []
    for level, feature_map in enumerate(pyramid):
        scale = 2**level
        b, z, y, x = voxels[:, 0], voxels[:, 1] // scale, voxels[:, 2] // scale, voxels[:, 3] // scale
        features.append(feature_map[b, :, z, y, x])
    return torch.cat(features, dim=1)


class ProjectionHead(nn.Module):
    """vox2vec's projector: MLP from the concatenated voxel feature to an L2-normalised embedding."""

    def __init__(self, in_features: int, hidden: int = 512, out_features: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_features))  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)


def info_nce(embeddings_a: torch.Tensor, embeddings_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: row ``i`` of ``a`` should match row ``i`` of ``b`` among all rows of ``b`` (and back)."""
    logits = embeddings_a @ embeddings_b.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
