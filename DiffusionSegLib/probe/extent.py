"""Field-of-view awareness: where each organ lies along the body axis, and what a scan covers.

The body axis coordinate is the z of the shipped slice-design Body Part Regressor (``bpr_default``): its slice
scores are anchored to anatomy (BTCV abdomens map to about -60..510 mm, the shared chest CT to 285..575 mm),
unlike the coordinate channels of the shipped backbone's BPR, which follow each scan (the chest CT there covers
-138..132 mm, the same range as an abdomen), so they cannot tell what a scan is missing.

A probe records, per organ, the range of that z its voxels took in the training volumes (the 0.5th-99.5th
percentile, pooled over volumes) and the hash of the BPR that measured it. At inference:

* an organ whose range, widened by a margin, does not meet the scan's z range is **not in the field of view**:
  it is not segmented and the result says so;
* an organ's voxels outside its widened range become background.

The margin covers what the training volumes did not show: patients differ, and one organ's z varies between
them by a few centimetres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

__all__ = ["FieldOfView", "BodyAxis", "organ_z_ranges", "record_field_of_view", "body_axis_for",
           "apply_field_of_view", "DEFAULT_MARGIN_MM"]

DEFAULT_MARGIN_MM = 30.0
"""How far beyond its training range along the body axis an organ is still looked for."""
_PERCENTILES = (0.5, 99.5)
_BODY_HU = -500.0
"""Voxels above this are body (not air) when measuring what a scan covers."""


@dataclass
class FieldOfView:
    """What a scan covers along the body axis and which organs lie outside it.

    Attributes:
        z_range_mm: (low, high) body-axis coordinate of the scan's body voxels (inferior to superior).
        outside: names of the organs whose range does not meet the scan's (widened by the margin).
        removed_voxels: per organ, voxels predicted outside its widened range (made background).
    """

    z_range_mm: tuple[float, float]
    outside: list[str] = field(default_factory=list)
    removed_voxels: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"scan covers body z {self.z_range_mm[0]:.0f} to {self.z_range_mm[1]:.0f} mm"
        return text + (f"; not in the field of view: {', '.join(self.outside)}" if self.outside else "")


class BodyAxis:
    """The body-axis coordinate of CTs from a BPR (default: the shipped slice BPR), on their own grids."""

    def __init__(self, path=None) -> None:
        from DiffusionSegLib.bpr import default_bpr_path, load_bpr
        from DiffusionSegLib.checkpoint import file_sha256

        self.path = path or default_bpr_path()
        self.model, _ = load_bpr(self.path)
        self.sha256 = file_sha256(self.path)

    def z_map(self, image: sitk.Image) -> np.ndarray:
        """(z, y, x) float32 array of the body-axis coordinate in mm on ``image``'s grid (0 outside the body box).

        Only the z channel is taken to the input grid: the 3-component map would take 12 bytes per input voxel
        twice over (image and array; 6 GB for a 512 x 512 x 1000 CT), the peak of a whole segmentation."""
        from DiffusionSegLib.bpr import predict_working_coordinates
        from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume, to_input_grid

        prepared = prepare_volume(image, PreprocessConfig(spacing_mm=self.model.config.spacing_mm))
        working = predict_working_coordinates(prepared.image, self.model)
        z = sitk.GetImageFromArray(np.ascontiguousarray(working[0, 2].numpy(), dtype=np.float32))
        z.CopyInformation(prepared.image)
        return sitk.GetArrayFromImage(to_input_grid(z, prepared, "linear", 0.0))


def organ_z_ranges(cases: Sequence[tuple[sitk.Image, sitk.Image]], labels, axis: BodyAxis) -> dict[str, list[float]]:
    """Per organ, ``[low, high]`` of the body-axis coordinate its voxels take in labeled CTs (label maps on their
    CTs' grids with the organs' ids)."""
    lows: dict[str, list[float]] = {}
    highs: dict[str, list[float]] = {}
    for image, label in cases:
        z = axis.z_map(image)
        ids = sitk.GetArrayViewFromImage(label)
        for organ in labels:
            values = z[ids == organ.value]
            if values.size >= 2:
                low, high = np.percentile(values, _PERCENTILES)
                lows.setdefault(organ.name, []).append(float(low))
                highs.setdefault(organ.name, []).append(float(high))
    return {name: [round(min(lows[name]), 1), round(max(highs[name]), 1)] for name in lows}


def record_field_of_view(cases: Sequence[tuple[sitk.Image, sitk.Image]], labels) -> dict:
    """What a probe records (``TrainedProbe.field_of_view``), measured with the shipped slice BPR; empty
    when it is not installed."""
    from DiffusionSegLib.bpr import default_bpr_path

    if not default_bpr_path().is_file():
        return {}
    axis = BodyAxis()
    return {"bpr_sha256": axis.sha256, "organ_z_mm": organ_z_ranges(cases, labels, axis)}


_AXES: dict[str, BodyAxis] = {}


def body_axis_for(record: dict) -> BodyAxis | None:
    """The BPR a probe's field-of-view record was measured with (the shipped one, by hash), or None.
    Loaded and hashed once per process."""
    from DiffusionSegLib.bpr import default_bpr_path

    path = default_bpr_path()
    if not record or not path.is_file():
        return None
    if str(path) not in _AXES:
        _AXES[str(path)] = BodyAxis(path)
    axis = _AXES[str(path)]
    return axis if axis.sha256 == record.get("bpr_sha256") else None


def apply_field_of_view(label_array: np.ndarray, z: np.ndarray, hu: np.ndarray, labels,
                        ranges: dict[str, Sequence[float]], margin_mm: float = DEFAULT_MARGIN_MM) -> FieldOfView:  # fmt: skip
    """Remove organs outside the scan and organ voxels outside their ranges (``label_array`` is changed in place).

    Args:
        label_array: (z, y, x) label map with the organs' ids.
        z: body-axis coordinate (mm) on the same grid; ``hu``: the CT's voxels (body voxels set the coverage).
        labels: the organs; ``ranges``: their recorded ``[low, high]`` (organs without one are left alone).
        margin_mm: widening of each range.
    """
    body = (hu > _BODY_HU) & (z != 0)
    inside_z = z[body] if body.any() else z.reshape(-1)
    z_low, z_high = (float(v) for v in np.percentile(inside_z, [0.5, 99.5]))
    view = FieldOfView((z_low, z_high))
    for organ in labels:
        if organ.name not in ranges:
            continue
        low, high = float(ranges[organ.name][0]) - margin_mm, float(ranges[organ.name][1]) + margin_mm
        mask = label_array == organ.value
        if high < z_low or low > z_high:
            view.outside.append(organ.name)
            label_array[mask] = 0
            continue
        outside = mask & ((z < low) | (z > high))
        view.removed_voxels[organ.name] = int(outside.sum())
        label_array[outside] = 0
    return view
