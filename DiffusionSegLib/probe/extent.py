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

__all__ = ["FieldOfView", "BodyAxis", "SliceScores", "SlabZ", "organ_z_ranges", "record_field_of_view", "body_axis_for",
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

    def slice_scores(self, image: sitk.Image, like=None) -> SliceScores:
        """The BPR's working grid of ``image`` and the network's offset of each working slice (what
        :meth:`slab_map` and the orientation check both read; computed once). ``like``: a ``PreparedVolume`` of
        the same image (its body box is reused)."""
        from DiffusionSegLib.bpr.inference import _working_tensor, working_slice_offsets
        from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume

        prepared = prepare_volume(image, PreprocessConfig(spacing_mm=self.model.config.spacing_mm), like=like)
        hu = _working_tensor(prepared.image)
        return SliceScores(prepared, hu, working_slice_offsets(hu, self.model), self.sha256)

    def slab_map(self, image: sitk.Image, like=None, scores: SliceScores | None = None) -> SlabZ | np.ndarray:
        """The body-axis coordinate on ``image``'s grid as :meth:`z_map`, held as a :class:`SlabZ` (one value per
        slice) where the map allows it, else the full array. ``like``: a ``PreparedVolume`` of the same image
        (its body box is reused); ``scores``: :meth:`slice_scores` of this image, when already computed."""
        from DiffusionSegLib.bpr.inference import _aggregate, slice_coordinates_from_offsets
        from DiffusionSegLib.preprocess import to_input_grid

        scores = scores if scores is not None and scores.sha256 == self.sha256 else self.slice_scores(image, like)
        prepared, spacing = scores.prepared, self.model.config.spacing_mm
        dense = slice_coordinates_from_offsets(scores.offsets, scores.hu.shape[-3:], spacing)
        working = np.ascontiguousarray(_aggregate(dense, scores.hu, spacing, "monotone")[0, 2].numpy(),
                                       dtype=np.float32)  # fmt: skip
        del dense
        slab = _slab_z(working, prepared)
        if slab is not None:
            return slab
        z = sitk.GetImageFromArray(working)
        z.CopyInformation(prepared.image)
        return sitk.GetArrayFromImage(to_input_grid(z, prepared, "linear", 0.0))


@dataclass
class SliceScores:
    """The slice BPR's reading of one CT: its working grid (``prepared``, ``hu`` as ``(1, 1, D, H, W)``), the
    offset ``(D, 3)`` of each working slice and the BPR's hash."""

    prepared: object
    hu: object
    offsets: object
    sha256: str

    @property
    def slice_z(self) -> np.ndarray:
        """The network's anatomical z (mm) of each working slice, before the monotone fit."""
        position = np.arange(self.offsets.shape[0]) * float(self.prepared.image.GetSpacing()[2])
        return self.offsets[:, 2].double().numpy() + position


@dataclass
class SlabZ:
    """A body-axis map on an input grid that varies along one array axis only (the slice BPR gives one z per
    working slice; a grid that is not oblique keeps it so): ``line[i]`` at index ``i`` along ``axis`` for voxels
    inside the box where ``inside[a]`` holds along every array axis ``a``, 0 elsewhere. 4 bytes per slice instead
    of 4 per voxel."""

    axis: int
    line: np.ndarray
    inside: list[np.ndarray]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(m.size for m in self.inside)  # type: ignore[return-value]

    def box(self, axis: int) -> slice:
        """The index range along ``axis`` inside the box (it is contiguous)."""
        where = np.flatnonzero(self.inside[axis])
        return slice(int(where[0]), int(where[-1]) + 1) if where.size else slice(0, 0)

    def dense(self) -> np.ndarray:
        """The (z, y, x) float32 map it stands for."""
        shape = [1, 1, 1]
        shape[self.axis] = self.line.size
        values = np.where(self.inside[self.axis], self.line, 0).astype(np.float32).reshape(shape)
        mask = np.ones((1, 1, 1), dtype=bool)
        for axis, inside in enumerate(self.inside):
            shape = [1, 1, 1]
            shape[axis] = inside.size
            mask = mask & inside.reshape(shape)
        return np.where(mask, values, np.float32(0))


def _slab_z(working_z: np.ndarray, prepared) -> SlabZ | None:
    """:class:`SlabZ` of a working-grid map that is constant within each working slice, as ``to_input_grid``
    (linear) would put it on the input grid; None when it is not constant per slice or the grid is oblique."""
    from DiffusionSegLib.preprocess.inverse import axis_maps

    per_slice = working_z[:, 0, 0]
    if not np.array_equal(working_z, np.broadcast_to(per_slice[:, None, None], working_z.shape)):
        return None
    maps = axis_maps(prepared.image, prepared.input_grid)
    if maps is None:
        return None
    axis = next(a for a, m in enumerate(maps) if m.working_axis == 0)
    m = maps[axis]
    v0, v1 = per_slice[m.i0].astype(np.float64), per_slice[m.i1].astype(np.float64)
    line = (v0 + (v1 - v0) * m.weight).astype(np.float32)  # as ITK's linear interpolator, in double
    return SlabZ(axis, line, [mp.inside for mp in maps])


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


def shipped_body_axis() -> BodyAxis | None:
    """The shipped slice BPR (loaded and hashed once per process), or None when it is not installed."""
    from DiffusionSegLib.bpr import default_bpr_path

    path = default_bpr_path()
    if not path.is_file():
        return None
    if str(path) not in _AXES:
        _AXES[str(path)] = BodyAxis(path)
    return _AXES[str(path)]


def body_axis_for(record: dict) -> BodyAxis | None:
    """The BPR a probe's field-of-view record was measured with (the shipped one, by hash), or None."""
    axis = shipped_body_axis() if record else None
    return axis if axis is not None and axis.sha256 == record.get("bpr_sha256") else None


def apply_field_of_view(label_array: np.ndarray, z: np.ndarray, hu: np.ndarray, labels,
                        ranges: dict[str, Sequence[float]], margin_mm: float = DEFAULT_MARGIN_MM) -> FieldOfView:  # fmt: skip
    """Remove organs outside the scan and organ voxels outside their ranges (``label_array`` is changed in place).

    Args:
        label_array: (z, y, x) label map with the organs' ids.
        z: body-axis coordinate (mm) on the same grid (an array or a :class:`SlabZ`); ``hu``: the CT's voxels
            (body voxels set the coverage).
        labels: the organs; ``ranges``: their recorded ``[low, high]`` (organs without one are left alone).
        margin_mm: widening of each range.
    """
    if isinstance(z, SlabZ):
        view = _apply_field_of_view_slab(label_array, z, hu, labels, ranges, margin_mm)
        if view is not None:
            return view
        z = z.dense()
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


def _weighted_percentiles(values: np.ndarray, counts: np.ndarray, q) -> list[float]:
    """``np.percentile`` (linear) of the array holding ``counts[i]`` copies of ``values[i]``."""
    order = np.argsort(values, kind="stable")
    values, counts = values[order].astype(np.float64), counts[order]
    ends = np.cumsum(counts)  # sorted position after each run
    total = int(ends[-1])
    out = []
    for p in np.atleast_1d(q):
        h = (total - 1) * float(p) / 100.0
        lo = int(np.floor(h))
        a = values[np.searchsorted(ends, lo, side="right")]
        b = values[np.searchsorted(ends, min(lo + 1, total - 1), side="right")]
        out.append(float(a + (b - a) * (h - lo)))
    return out


def _apply_field_of_view_slab(label_array: np.ndarray, z: SlabZ, hu: np.ndarray, labels, ranges,
                              margin_mm: float) -> FieldOfView | None:  # fmt: skip
    """:func:`apply_field_of_view` with a :class:`SlabZ`, slice by slice along its axis (the same result; None when
    the scan has no body voxel inside the map, which the general path handles)."""
    labels_s, hu_s = np.moveaxis(label_array, z.axis, 0), np.moveaxis(hu, z.axis, 0)
    rows, cols = (z.box(a) for a in range(3) if a != z.axis)
    in_slab = z.inside[z.axis] & (z.line != 0)
    counts = np.zeros(z.line.size, dtype=np.int64)
    for i in np.flatnonzero(in_slab):
        counts[i] = np.count_nonzero(hu_s[i, rows, cols] > _BODY_HU)
    if not counts.any():
        return None
    z_low, z_high = _weighted_percentiles(z.line[counts > 0], counts[counts > 0], [0.5, 99.5])
    view = FieldOfView((z_low, z_high))
    top = int(label_array.max(initial=0))
    widened = {}
    for organ in labels:
        if organ.name not in ranges or organ.value > top:
            if organ.name in ranges:
                low, high = float(ranges[organ.name][0]) - margin_mm, float(ranges[organ.name][1]) + margin_mm
                if high < z_low or low > z_high:
                    view.outside.append(organ.name)
                else:
                    view.removed_voxels[organ.name] = 0
            continue
        low, high = float(ranges[organ.name][0]) - margin_mm, float(ranges[organ.name][1]) + margin_mm
        if high < z_low or low > z_high:
            view.outside.append(organ.name)
            label_array[label_array == organ.value] = 0
            continue
        widened[organ.value] = (organ.name, low, high)
        view.removed_voxels[organ.name] = 0

    def removable(z_value: float) -> np.ndarray:  # compared in float32, as the array comparison does
        lut = np.zeros(top + 1, dtype=bool)
        for value, (_, low, high) in widened.items():
            lut[value] = np.float32(z_value) < np.float32(low) or np.float32(z_value) > np.float32(high)
        return lut

    removed = np.zeros(top + 1, dtype=np.int64)

    def clear(region: np.ndarray, lut: np.ndarray) -> None:
        if region.size and lut.any():
            hit = lut[region]
            if hit.any():
                removed[:] += np.bincount(region[hit], minlength=top + 1)
                region[hit] = 0

    at_zero = removable(0.0)  # outside the map's box the coordinate reads 0
    for i in range(labels_s.shape[0]):
        plane = labels_s[i]
        if not z.inside[z.axis][i]:
            clear(plane, at_zero)
            continue
        clear(plane[rows, cols], removable(float(z.line[i])))
        for strip in (plane[: rows.start], plane[rows.stop :], plane[rows, : cols.start], plane[rows, cols.stop :]):
            clear(strip, at_zero)
    for value, (name, _, _) in widened.items():
        view.removed_voxels[name] = int(removed[value])
    return view
