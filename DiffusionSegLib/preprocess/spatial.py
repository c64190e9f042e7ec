"""Spatial preprocessing in physical space: orientation, body crop and resampling, each with its inverse.

Every function returns a ``SimpleITK.Image`` whose geometry says where its voxels are, so a prediction made
on any derived grid goes back to the input grid by resampling onto the input's geometry
(:func:`resample_onto`). Reorienting and cropping move no voxel values; only resampling interpolates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.errors import UserInputError

__all__ = [
    "CANONICAL_ORIENTATION",
    "to_canonical_orientation",
    "to_axis_aligned",
    "body_bounding_box",
    "crop_to_box",
    "resample_to_spacing",
    "resample_onto",
    "resample_labels_onto",
    "grid_like",
]

CANONICAL_ORIENTATION = "LPS"
"""ITK's identity direction: array axes (z, y, x) run inferior→superior, anterior→posterior, right→left."""

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
}


def to_canonical_orientation(image: sitk.Image) -> sitk.Image:
    """Permute and flip axes so the direction is the identity (LPS); voxel values are not interpolated."""
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if orientation == CANONICAL_ORIENTATION and np.allclose(image.GetDirection(), np.eye(3).ravel()):
        return image
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def to_axis_aligned(image: sitk.Image, default_value: float = -1024.0) -> sitk.Image:
    """An oblique image (axes rotated off LPS after reorientation, e.g. by a gantry tilt) resampled onto the
    axis-aligned grid that covers it at the same spacing; an aligned image is returned as it is.

    Reorientation only permutes and flips axes, so a tilted grid stays tilted: its "axial" slices would cut the
    body obliquely and every model would see anatomy at an angle it never saw in training. Results go back to
    the input grid through physical space (:func:`resample_onto`), which is the exact inverse up to
    interpolation. Voxels outside the original field of view get ``default_value`` (air).
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if np.allclose(direction, np.eye(3), atol=1e-6):
        return image
    size, spacing = np.asarray(image.GetSize(), float), np.asarray(image.GetSpacing(), float)
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])  # fmt: skip  # voxel edges, in index units
    physical = np.asarray(image.GetOrigin()) + (direction @ (corners * spacing).T).T
    low, high = physical.min(axis=0), physical.max(axis=0)
    grid = sitk.Image([max(1, int(np.ceil((h - l) / s - 1e-6))) for l, h, s in zip(low, high, spacing)],
                      sitk.sitkUInt8)  # fmt: skip
    grid.SetSpacing(tuple(spacing))
    grid.SetOrigin(tuple(low + 0.5 * spacing))
    return resample_onto(image, grid, "linear", default_value)


def body_bounding_box(
    image: sitk.Image, threshold_hu: float = -100.0, margin_mm: float = 10.0
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Index box ``(start_xyz, size_xyz)`` of the body: the largest connected region above ``threshold_hu``.

    The threshold lies above air and above the -125 HU floor of soft-tissue-clipped copies, so the box
    follows skin and muscle and excludes the couch when it is separated from the body by air.
    Falls back to the whole image when nothing is above the threshold.
    """
    shrink = [max(1, int(round(4.0 / s))) for s in image.GetSpacing()]  # ~4 mm grid: fast and sufficient
    small = sitk.BinShrink(image, shrink) if any(f > 1 for f in shrink) else image
    mask = sitk.BinaryThreshold(sitk.Cast(small, sitk.sitkFloat32), lowerThreshold=float(threshold_hu),
                                upperThreshold=1e9, insideValue=1, outsideValue=0)  # fmt: skip
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    size = image.GetSize()
    if 1 not in stats.GetLabels():
        return (0, 0, 0), tuple(size)  # type: ignore[return-value]
    x0, y0, z0, nx, ny, nz = stats.GetBoundingBox(1)
    start_small, stop_small = (x0, y0, z0), (x0 + nx, y0 + ny, z0 + nz)
    start, stop = [], []
    for axis in range(3):
        margin = int(np.ceil(margin_mm / image.GetSpacing()[axis]))
        start.append(max(0, start_small[axis] * shrink[axis] - margin))
        stop.append(min(size[axis], stop_small[axis] * shrink[axis] + margin))
    return tuple(start), tuple(b - a for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def crop_to_box(image: sitk.Image, start: Sequence[int], size: Sequence[int]) -> sitk.Image:
    """Extract an index box; the result keeps its physical position (origin moves with the box)."""
    return sitk.RegionOfInterest(image, [int(s) for s in size], [int(s) for s in start])


def grid_like(
    reference: sitk.Image, spacing_mm: Sequence[float], pixel_type: int = sitk.sitkUInt8
) -> sitk.Image:
    """An empty image covering ``reference``'s physical extent at a new spacing (same origin corner and direction).

    Voxel centres of the new grid start at the reference's first voxel centre and the grid covers the
    reference's extent, rounded up to whole voxels.
    """
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise UserInputError(f"working spacing {tuple(spacing_mm)} mm is invalid; expected three positive sizes")
    size = [
        max(1, int(np.ceil(n * s_in / s_out - 1e-6)))
        for n, s_in, s_out in zip(reference.GetSize(), reference.GetSpacing(), spacing, strict=True)
    ]
    grid = sitk.Image(size, pixel_type)
    grid.SetSpacing(spacing)
    grid.SetDirection(reference.GetDirection())
    # Place the first voxel so that the new grid's outer edge coincides with the reference's outer edge.
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    corner = np.asarray(reference.GetOrigin()) - direction @ (0.5 * np.asarray(reference.GetSpacing()))
    grid.SetOrigin(tuple(corner + direction @ (0.5 * np.asarray(spacing))))
    return grid


def resample_to_spacing(
    image: sitk.Image, spacing_mm: Sequence[float], interpolation: str = "linear", default_value: float = 0.0,
    antialias: bool = True,
) -> sitk.Image:  # fmt: skip
    """Resample to a new voxel size over the same physical extent.

    Args:
        image: scalar 3D image.
        spacing_mm: output spacing ``(x, y, z)`` in mm.
        interpolation: ``"linear"`` (default), ``"bspline"`` or ``"nearest"`` (for label maps).
        default_value: value outside the input.
        antialias: Gaussian-smooth axes that are downsampled by more than 1.5x before sampling (intensity
            images only; ignored for ``"nearest"``).
    """
    target = grid_like(image, spacing_mm)
    source = image
    if antialias and interpolation != "nearest":
        sigmas = [
            0.5 * np.sqrt(max(s_out**2 - s_in**2, 0.0)) if s_out > 1.5 * s_in else 0.0
            for s_in, s_out in zip(image.GetSpacing(), target.GetSpacing(), strict=True)
        ]
        if any(s > 0 for s in sigmas):
            if interpolation == "linear":
                fast = _smoothed_samples(image, target, [max(s, 1e-3) for s in sigmas], default_value)
                if fast is not None:
                    return fast
            pixel_type = image.GetPixelID()
            smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [max(s, 1e-3) for s in sigmas])
            source = smoothed if pixel_type == sitk.sitkFloat32 else sitk.Cast(smoothed, sitk.sitkFloat32)
    return resample_onto(source, target, interpolation, default_value)


_MAX_SMOOTHING_PASSES = 2.0
"""Use :func:`_smoothed_samples` when it filters at most this many whole images' worth of voxels (3 otherwise)."""


def _smoothed_samples(image: sitk.Image, target: sitk.Image, sigmas: Sequence[float],
                      default_value: float) -> sitk.Image | None:  # fmt: skip
    """Gaussian smoothing (ITK's recursive filter, axis by axis) then linear sampling on ``target``, computing the
    smoothed image only where the sampling reads it: x on the whole image, y on the x columns that are read, z
    on the (x, y) lines that are read, then the separable linear interpolation (x, then y, then z, in double, as
    ITK's linear interpolator). A 5x coarser grid reads 2 of every 5 columns, so about half the filtering of the
    whole image is skipped. The axis order differs from ``SmoothingRecursiveGaussian``'s (z, x, y): values agree to
    float rounding (1e-4 HU). None when either grid is not axis-aligned with the other."""
    from DiffusionSegLib.preprocess.inverse import axis_maps

    maps = axis_maps(image, target)  # target index -> continuous index of ``image``
    if maps is None or any(m.working_axis != k for k, m in enumerate(maps)):
        return None
    needed = [np.unique(np.concatenate([m.i0[m.inside], m.i1[m.inside]])) for m in maps]
    if any(n.size == 0 for n in needed):
        return None
    read = [n.size / size for n, size in zip(needed, np.shape(sitk.GetArrayViewFromImage(image)), strict=True)]
    if 1 + read[2] + read[2] * read[1] > _MAX_SMOOTHING_PASSES:  # hardly coarser: filtering everything is as cheap
        return None
    spacing = image.GetSpacing()

    def smooth(array: np.ndarray, axis: int) -> np.ndarray:  # axis: array axis (0 z, 1 y, 2 x)
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(spacing)
        filtered = sitk.RecursiveGaussian(volume, float(sigmas[2 - axis]), False,
                                          sitk.RecursiveGaussianImageFilter.ZeroOrder, 2 - axis)
        return sitk.GetArrayFromImage(filtered)

    array = sitk.GetArrayViewFromImage(image)
    array = smooth(np.ascontiguousarray(array, dtype=np.float32), 2)
    array = smooth(np.ascontiguousarray(np.take(array, needed[2], axis=2)), 1)
    array = smooth(np.ascontiguousarray(np.take(array, needed[1], axis=1)), 0)
    values = np.take(array, needed[0], axis=0).astype(np.float64)
    for axis in (2, 1, 0):  # x, then y, then z, as ITK's linear interpolator blends
        m = maps[axis]
        last = needed[axis].size - 1  # (indices outside the image read anything: they get the default below)
        low = np.take(values, np.minimum(np.searchsorted(needed[axis], m.i0), last), axis=axis)
        high = np.take(values, np.minimum(np.searchsorted(needed[axis], m.i1), last), axis=axis)
        shape = [1, 1, 1]
        shape[axis] = m.weight.size
        values = low + (high - low) * m.weight.reshape(shape)
    inside = maps[0].inside[:, None, None] & maps[1].inside[None, :, None] & maps[2].inside[None, None, :]
    result = sitk.GetImageFromArray(np.where(inside, values, default_value).astype(np.float32))
    result.CopyInformation(target)
    return result if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(result, image.GetPixelID())


def resample_onto(
    image: sitk.Image, reference: sitk.Image, interpolation: str = "linear", default_value: float = 0.0
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (size, spacing, origin, direction) through physical space."""
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation {interpolation!r} is unknown; expected one of {sorted(_INTERPOLATORS)}")
    return sitk.Resample(image, reference, sitk.Transform(), _INTERPOLATORS[interpolation], float(default_value),
                         image.GetPixelID())  # fmt: skip


def resample_labels_onto(labels: sitk.Image, reference: sitk.Image, method: str = "linear") -> sitk.Image:
    """Resample a label map onto ``reference``'s grid.

    Args:
        labels: integer label map.
        reference: image whose grid the result takes.
        method: ``"nearest"``, or ``"linear"`` (default): each label's mask is interpolated linearly and each
            voxel takes the label whose interpolated mask is largest, background where none exceeds 0.5.
            Smoother and closer to the original shapes than nearest neighbour when grids differ a lot.

    Returns:
        A label map of ``labels``' pixel type on ``reference``'s grid.
    """
    if method == "nearest":
        return resample_onto(labels, reference, "nearest", 0)
    if method != "linear":
        raise ValueError(f"label resampling method {method!r} is unknown; expected 'nearest' or 'linear'")
    label_array = sitk.GetArrayViewFromImage(labels)
    values = [int(v) for v in np.unique(label_array) if v != 0]
    shape = reference.GetSize()[::-1]
    best = np.full(shape, 0.5, dtype=np.float32)
    out = np.zeros(shape, dtype=label_array.dtype)
    for value in values:
        mask = sitk.Cast(labels == value, sitk.sitkFloat32)
        resampled = resample_onto(mask, reference, "linear", 0.0)  # keep the image alive while its view is used
        probability = sitk.GetArrayViewFromImage(resampled)
        wins = probability > best
        out[wins] = value
        best[wins] = probability[wins]
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(reference)
    return result
