"""The BPR training objective (APE-style, on pairs of overlapping crops).

For voxels ``i, j`` sampled in the two crops of a pair (both crops pooled together, so within- and
across-crop pairs count), with predicted coordinates ``c`` and physical positions ``p`` (both in units of
100 mm):

* ``displacement``: ``mean ‖(c_i − c_j) − (p_i − p_j)‖²`` — differences match physical displacement vectors.
  Since every volume is in canonical LPS orientation, this pins channel 0 to R→L, 1 to A→P and 2 to I→S and
  makes the cranio-caudal channel monotonic by construction; only a global offset is free.
* ``distance`` (APE): ``mean (‖c_i − c_j‖ − ‖p_i − p_j‖)²`` — lengths only; any rotation or reflection of the
  coordinate frame is an equally good solution.

Both add an invariance term: the same physical point, seen in both crops (at other positions, zooms and
intensity augmentations), gets the same coordinates: ``mean ‖c_A(q) − c_B(q)‖²`` over points ``q`` of the
overlap. Losses are in (100 mm)²; ``rmse_mm`` reports the square root in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from DiffusionSegLib.bpr.model import UNIT_MM
from DiffusionSegLib.bpr.sampling import CropBatch, crop_positions_mm

__all__ = ["bpr_objective", "slice_objective"]


def _coarse_grid(points_mm: torch.Tensor, centre_mm: torch.Tensor, step_mm: torch.Tensor,
                 size_zyx: Sequence[int], stride_zyx: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """``grid_sample`` coordinates (align_corners=True) of physical points ``(M, 3)`` in a crop's coarse output."""
    size_xyz = torch.tensor(list(reversed(list(size_zyx))), dtype=torch.float32)
    stride_xyz = torch.tensor(list(reversed(list(stride_zyx))), dtype=torch.float32)
    index = (points_mm - centre_mm) / step_mm + (size_xyz - 1) / 2
    coarse = (index - (stride_xyz - 1) / 2) / stride_xyz
    count = size_xyz // stride_xyz
    return 2 * coarse / (count - 1).clamp(min=1) - 1


def bpr_objective(coarse: torch.Tensor, batch: CropBatch, size_zyx: Sequence[int], stride_zyx: Sequence[int],
                  generator: torch.Generator, *, objective: str = "displacement", points_per_crop: int = 256,
                  invariance_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Loss of a batch of crop pairs.

    Args:
        coarse: network output ``(2B, 3, d, h, w)`` in units of 100 mm (``BodyPartRegressor.coarse``).
        batch: the crops and their physical placement (pairs are rows ``2i, 2i + 1``).
        size_zyx: crop input size ``(D, H, W)``.
        stride_zyx: input voxels per coarse output voxel.
        generator: source of the voxel sampling (part of the resumable state).
        objective: ``"displacement"`` or ``"distance"``.
        points_per_crop: voxels sampled per crop.
        invariance_weight: weight of the same-point term.

    Returns:
        ``(loss, stats)`` where stats holds ``pair`` and ``invariance`` losses and ``rmse_mm``.
    """
    if objective not in ("displacement", "distance"):
        raise ValueError(f"objective {objective!r} is unknown; expected 'displacement' or 'distance'")
    if coarse.shape[0] % 2 or coarse.shape[0] != batch.images.shape[0]:
        raise ValueError(f"output batch {coarse.shape[0]} does not match {batch.images.shape[0]} crops in pairs")
    positions = crop_positions_mm(batch.centre_mm, batch.step_mm, size_zyx, stride_zyx) / UNIT_MM
    crops, voxels = coarse.shape[0], coarse[0, 0].numel()
    flat_c = coarse.reshape(crops, 3, voxels)
    flat_p = positions.reshape(crops, 3, voxels)
    pair_terms, invariance_terms = [], []
    for a in range(0, crops, 2):
        pick = torch.randint(voxels, (2, points_per_crop), generator=generator)
        c = torch.cat([flat_c[a][:, pick[0]], flat_c[a + 1][:, pick[1]]], dim=1).T  # (2N, 3)
        p = torch.cat([flat_p[a][:, pick[0]], flat_p[a + 1][:, pick[1]]], dim=1).T
        dc, dp = c[:, None] - c[None], p[:, None] - p[None]
        if objective == "displacement":
            pair_terms.append(((dc - dp) ** 2).sum(-1).mean())
        else:
            length_c = torch.sqrt((dc**2).sum(-1) + 1e-8)
            pair_terms.append(((length_c - torch.sqrt((dp**2).sum(-1))) ** 2).mean())
        # same physical points seen by both crops
        low = torch.maximum(flat_p[a].amin(1), flat_p[a + 1].amin(1)) * UNIT_MM
        high = torch.minimum(flat_p[a].amax(1), flat_p[a + 1].amax(1)) * UNIT_MM
        if torch.all(high > low):
            points = low + (high - low) * torch.rand(points_per_crop, 3, generator=generator)
            seen = []
            for crop in (a, a + 1):
                grid = _coarse_grid(points, batch.centre_mm[crop], batch.step_mm[crop], size_zyx, stride_zyx)
                sampled = F.grid_sample(coarse[crop : crop + 1], grid[None, :, None, None], mode="bilinear",
                                        padding_mode="border", align_corners=True)  # fmt: skip
                seen.append(sampled[0, :, :, 0, 0])  # (3, M)
            invariance_terms.append(((seen[0] - seen[1]) ** 2).sum(0).mean())
    pair = torch.stack(pair_terms).mean()
    invariance = torch.stack(invariance_terms).mean() if invariance_terms else coarse.new_zeros(())
    loss = pair + invariance_weight * invariance
    stats = {"loss": float(loss.detach()), "pair": float(pair.detach()), "invariance": float(invariance.detach()),
             "rmse_mm": float(torch.sqrt(pair.detach())) * UNIT_MM}  # fmt: skip
    return loss, stats


def slice_objective(offsets: torch.Tensor, centre_mm: torch.Tensor,
                    crops_per_scan: int) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Loss of a batch of slice crops: within each scan, coordinate differences match physical displacements.

    ``offsets`` (``(S·K, 3)``, units of 100 mm) are the predicted coordinates of the crop centres ``centre_mm``;
    ``offsets − centre`` must be the same for every crop of a scan (the scan's anatomical offset). The loss is
    the mean over all pairs of a scan of ``‖(c_i − c_j) − (p_i − p_j)‖²`` (computed as twice the variance).

    Returns:
        ``(loss, stats)``; stats hold ``loss``, ``rmse_mm`` (pair RMSE) and ``rmse_z_mm`` (its z part).
    """
    k = crops_per_scan
    if offsets.ndim != 2 or offsets.shape[1] != 3 or offsets.shape[0] % k or offsets.shape != centre_mm.shape:
        raise ValueError(f"offsets {tuple(offsets.shape)} / centres {tuple(centre_mm.shape)} invalid; expected "
                         f"(S·{k}, 3) each")  # fmt: skip
    residual = (offsets - centre_mm.to(offsets.dtype) / UNIT_MM).reshape(-1, k, 3)
    spread = (residual - residual.mean(dim=1, keepdim=True)) ** 2 * (2.0 * k / (k - 1))  # pairwise mean = 2·var
    loss = spread.sum(-1).mean()
    z = spread[..., 2].mean().detach()
    stats = {"loss": float(loss.detach()), "rmse_mm": float(torch.sqrt(loss.detach())) * UNIT_MM,
             "rmse_z_mm": float(torch.sqrt(z)) * UNIT_MM}  # fmt: skip
    return loss, stats
