"""Spatial preprocessing in physical space: orientation, body crop and resampling, each with its inverse.

Every function returns a ``SimpleITK.Image`` whose geometry says where its voxels are, so a prediction made
on any derived grid goes back to the input grid by resampling onto the input's geometry
(:func:`resample_onto`). Reorienting and cropping move no voxel values; only resampling interpolates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.errors import UserInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CANONICAL_ORIENTATION",
    "to_canonical_orientation",
    "to_axis_aligned",
    "body_bounding_box",
    "body_box_of_array",
    "crop_to_box",
    "resample_to_spacing",
    "antialias_sigmas",
    "separable_samples",
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
    shrink = _body_shrink(image.GetSpacing())
    small = sitk.BinShrink(image, shrink) if any(f > 1 for f in shrink) else image
    mask = sitk.BinaryThreshold(sitk.Cast(small, sitk.sitkFloat32), lowerThreshold=float(threshold_hu),
                                upperThreshold=1e9, insideValue=1, outsideValue=0)  # fmt: skip
    return _box_of_mask(mask, shrink, image.GetSize(), image.GetSpacing(), margin_mm)


def _body_shrink(spacing: Sequence[float]) -> list[int]:
    return [max(1, int(round(4.0 / s))) for s in spacing]  # ~4 mm grid: fast and sufficient


def _box_of_mask(mask: sitk.Image, shrink: Sequence[int], size: Sequence[int], spacing: Sequence[float],
                 margin_mm: float) -> tuple[tuple[int, int, int], tuple[int, int, int]]:  # fmt: skip
    """The box of the largest component of the shrunk body ``mask``, in the full image's indices, with margin."""
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    if 1 not in stats.GetLabels():
        return (0, 0, 0), tuple(size)  # type: ignore[return-value]
    x0, y0, z0, nx, ny, nz = stats.GetBoundingBox(1)
    start_small, stop_small = (x0, y0, z0), (x0 + nx, y0 + ny, z0 + nz)
    start, stop = [], []
    for axis in range(3):
        margin = int(np.ceil(margin_mm / spacing[axis]))
        start.append(max(0, start_small[axis] * shrink[axis] - margin))
        stop.append(min(size[axis], stop_small[axis] * shrink[axis] + margin))
    return tuple(start), tuple(b - a for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def body_box_of_array(array: np.ndarray, spacing: Sequence[float], threshold_hu: float = -100.0,
                      margin_mm: float = 10.0) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:  # fmt: skip
    """:func:`body_bounding_box` of a (z, y, x) array view (any dtype, any strides: a flipped or permuted view of
    the input's voxels, never copied whole) with voxel size ``spacing`` (x, y, z). The bins of ``BinShrink`` are
    summed in double precision by ``torch`` (as ITK accumulates them), slab by slab, and a bin is body where its sum
    reaches ``threshold_hu`` times its voxel count, which is where its mean does: the same box. None when the
    image is smaller than one bin along an axis (ITK's rule there differs)."""
    import torch
    import torch.nn.functional as F

    shrink = _body_shrink(spacing)
    size = tuple(reversed(array.shape))
    if any(f > n for f, n in zip(shrink, size, strict=True)):
        return None
    kernel = tuple(reversed(shrink))  # (z, y, x)
    bins = [n // f for n, f in zip(array.shape, kernel, strict=True)]
    count = int(np.prod(kernel))
    # integer voxels: float32 sums are exact below 2**24 (int16 bins of up to 512 voxels), else double as ITK
    exact = array.dtype.kind in "iub" and count * max(-int(np.iinfo(array.dtype).min), int(np.iinfo(array.dtype).max)) \
        < 2**24  # fmt: skip
    dtype = np.float32 if exact else np.float64
    step = kernel[0] * max(1, _SLAB_VOXELS // (kernel[0] * array.shape[1] * array.shape[2]))
    sums = torch.empty(bins, dtype=torch.float32 if exact else torch.float64)
    for z0 in range(0, bins[0] * kernel[0], step):
        slab = torch.from_numpy(np.array(array[z0 : min(z0 + step, bins[0] * kernel[0])], dtype))
        sums[z0 // kernel[0] : z0 // kernel[0] + slab.shape[0] // kernel[0]] = \
            F.avg_pool3d(slab[None, None], kernel, divisor_override=1)[0, 0]  # fmt: skip
    mask = sitk.GetImageFromArray((sums.double() >= float(np.float32(threshold_hu)) * count).numpy().astype(np.uint8))
    return _box_of_mask(mask, shrink, size, spacing, margin_mm)


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
    antialias: bool = True, reference_path: bool = False,
) -> sitk.Image:  # fmt: skip
    """Resample to a new voxel size over the same physical extent.

    Args:
        image: scalar 3D image.
        spacing_mm: output spacing ``(x, y, z)`` in mm.
        interpolation: ``"linear"`` (default), ``"bspline"`` or ``"nearest"`` (for label maps).
        default_value: value outside the input.
        antialias: Gaussian-smooth axes that are downsampled by more than 1.5x before sampling (intensity
            images only; ignored for ``"nearest"``).
        reference_path: smooth the whole image (``SmoothingRecursiveGaussian``), then ``sitk.Resample``: the
            straightforward way, kept for checks; by default linear sampling of an axis-aligned image computes
            both steps at once (:func:`separable_samples`; the same values to float rounding).
    """
    target = grid_like(image, spacing_mm)
    source = image
    sigmas = antialias_sigmas(image.GetSpacing(), target.GetSpacing())
    if antialias and interpolation != "nearest" and sigmas is not None:
        if interpolation == "linear" and not reference_path:
            fast = _smoothed_samples(image, target, sigmas, default_value)
            if fast is not None:
                return fast
        pixel_type = image.GetPixelID()
        smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigmas)
        source = smoothed if pixel_type == sitk.sitkFloat32 else sitk.Cast(smoothed, sitk.sitkFloat32)
    return resample_onto(source, target, interpolation, default_value)


def antialias_sigmas(spacing_in: Sequence[float], spacing_out: Sequence[float]) -> list[float] | None:
    """Gaussian sigmas (mm, per axis x, y, z) that anti-alias a resampling from ``spacing_in`` to ``spacing_out``:
    ``sqrt(out² - in²) / 2`` on axes downsampled by more than 1.5x, 1e-3 mm on the others; None when no axis is."""
    sigmas = [0.5 * np.sqrt(max(s_out**2 - s_in**2, 0.0)) if s_out > 1.5 * s_in else 0.0
              for s_in, s_out in zip(spacing_in, spacing_out, strict=True)]  # fmt: skip
    return [max(s, 1e-3) for s in sigmas] if any(s > 0 for s in sigmas) else None


_SLAB_VOXELS = 1 << 22
"""Input voxels converted to float at once (slabs of slices): the temporaries stay a few tens of MB."""


def _smoothed_samples(image: sitk.Image, target: sitk.Image, sigmas: Sequence[float],
                      default_value: float) -> sitk.Image | None:  # fmt: skip
    """Gaussian smoothing (ITK's recursive filter along each axis) then linear sampling on ``target``, as one
    separable linear map (:func:`separable_samples`) of ``image``'s voxels. None when either grid is not
    axis-aligned with the other."""
    values = separable_samples(sitk.GetArrayViewFromImage(image), image, target, sigmas, default_value)
    if values is None:
        return None
    result = sitk.GetImageFromArray(values)
    result.CopyInformation(target)
    return result if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(result, image.GetPixelID())


def separable_samples(array: np.ndarray, grid, target: sitk.Image, sigmas: Sequence[float],
                      default_value: float) -> np.ndarray | None:  # fmt: skip
    """What ITK's recursive Gaussian smoothing (``sigmas`` in mm per axis x, y, z; 0: none) followed by linear
    sampling on ``target`` gives, computed as three matrix products.

    Both steps are linear along each axis, so along array axis k they are one matrix ``M_k`` (target samples x
    voxels): ITK's filter applied to unit impulses (the exact response of its recursive filter, borders
    included), then the two-voxel blend of linear interpolation (:func:`~DiffusionSegLib.preprocess.inverse.axis_maps`).
    The result is ``M_z · M_y · M_x`` applied to the voxels: float32 matrix products, x first, slab by slab, so
    ``array`` (any dtype, any strides: a flipped, permuted or cropped view) is read once and never copied whole.
    Values agree with filtering the whole image then ``sitk.Resample`` to float rounding (1e-3 HU).

    Args:
        array: (z, y, x) voxels on ``grid``.
        grid: an image (or anything with ``GetSize``, ``GetSpacing``, ``GetOrigin``, ``GetDirection``) whose
            direction is the identity, giving ``array``'s geometry.
        target: the grid to sample (axis-aligned with ``grid``).
        sigmas: Gaussian sigma per axis (x, y, z) in mm; 0 for none.
        default_value: value of target voxels outside ``grid``.

    Returns:
        A (z, y, x) float32 array on ``target``, or None when the grids are not axis-aligned with each other or
        an axis to smooth has fewer than 4 voxels (ITK's recursive filter needs 4).
    """
    import torch

    from DiffusionSegLib.preprocess.inverse import axis_maps

    maps = axis_maps(grid, target)  # target index -> continuous index of ``grid``
    if maps is None or any(m.working_axis != k for k, m in enumerate(maps)):
        return None
    matrices = []
    for k, m in enumerate(maps):
        n, axis = array.shape[k], 2 - k
        blend = np.zeros((m.i0.size, n))  # linear interpolation: two voxels per target sample
        rows = np.arange(m.i0.size)
        np.add.at(blend, (rows, m.i0), 1.0 - m.weight)
        np.add.at(blend, (rows, m.i1), m.weight)
        if sigmas[axis] > 0:
            if n < 4:
                return None
            blend = blend @ _gaussian_matrix(n, grid.GetSpacing()[axis], float(sigmas[axis]))
        matrices.append(torch.from_numpy(blend.astype(np.float32)))
    mz, my, mx = matrices
    nz, ny, nx = array.shape
    rows_yx = torch.empty((nz, my.shape[0], mx.shape[0]), dtype=torch.float32)
    step = max(1, _SLAB_VOXELS // (ny * nx))
    bands_x, bands_y = _bands(mx), _bands(my)
    with torch.autocast("cpu", enabled=False):  # float32 whatever the caller's autocast (bfloat16 sums blur HU)
        for z0 in range(0, nz, step):
            slab = torch.from_numpy(np.array(array[z0 : z0 + step], dtype=np.float32))  # (a writable copy)
            along_x = torch.empty((slab.shape[0], ny, mx.shape[0]), dtype=torch.float32)
            for rows, cols in bands_x:  # x: (.., ny, nx) -> (.., ny, tx)
                torch.matmul(slab[..., cols], mx[rows, cols].T, out=along_x[..., rows])
            for rows, cols in bands_y:  # y: (.., ny, tx) -> (.., ty, tx)
                torch.matmul(my[rows, cols], along_x[:, cols], out=rows_yx[z0 : z0 + step, rows])
        values = torch.matmul(mz, rows_yx.reshape(nz, -1)).reshape(mz.shape[0], my.shape[0], mx.shape[0]).numpy()
    inside = maps[0].inside[:, None, None] & maps[1].inside[None, :, None] & maps[2].inside[None, None, :]
    return np.where(inside, values, np.float32(default_value))


def _bands(matrix: torch.Tensor, rows_per_band: int = 16) -> list[tuple[slice, slice]]:
    """Blocks of ``rows_per_band`` rows of a resampling matrix with the range of columns their weights span: a
    target sample reads a few voxels around its position, so multiplying block by block skips the zeros (a 0.7 mm
    axis sampled at 1.5 mm: 1/20 of the dense product). Weights below 1e-7 of a row's largest are zero for this
    purpose (the recursive Gaussian's tails); the products agree with the dense one to float rounding."""
    weights = matrix.abs()
    significant = weights > 1e-7 * weights.amax(1, keepdim=True)
    bands = []
    for start in range(0, matrix.shape[0], rows_per_band):
        block = significant[start : start + rows_per_band].any(0).nonzero()
        first, last = (int(block[0]), int(block[-1]) + 1) if block.numel() else (0, 1)
        bands.append((slice(start, start + rows_per_band), slice(first, last)))
    return bands


def _gaussian_matrix(n: int, spacing_mm: float, sigma_mm: float) -> np.ndarray:
    """(n, n) matrix of ITK's ``RecursiveGaussian`` (zero order, not normalised across scale) along n voxels of
    ``spacing_mm``: column j is its response to a unit impulse at voxel j (in double precision)."""
    impulses = sitk.GetImageFromArray(np.eye(n))  # row j (along x) holds the impulse at j
    impulses.SetSpacing((float(spacing_mm), 1.0))
    response = sitk.RecursiveGaussian(impulses, sigma_mm, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, 0)
    return sitk.GetArrayFromImage(response).T


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
