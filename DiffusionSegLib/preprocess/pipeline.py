"""The preprocessing pipeline (orient, crop to body, resample) and its exact inverse.

``prepare_volume`` turns an input CT into HU values on the *working grid* (canonical orientation, working
spacing, cropped to the body). It remembers the input grid, so ``to_input_grid`` can put anything computed on
the working grid — labels, probabilities, coordinate maps — back onto the input's exact voxels.
HU windowing is left to each model (``scale_hu`` with the window in its config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.data.volume import check_ct
from DiffusionSegLib.preprocess.spatial import (
    antialias_sigmas,
    body_bounding_box,
    body_box_of_array,
    crop_to_box,
    grid_like,
    resample_labels_onto,
    resample_onto,
    resample_to_spacing,
    separable_samples,
    to_axis_aligned,
    to_canonical_orientation,
)

__all__ = ["PreprocessConfig", "PreparedVolume", "prepare_volume", "to_input_grid", "empty_like_grid"]


@dataclass
class PreprocessConfig:
    """How an input CT becomes the working volume every model sees."""

    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)
    """Working voxel size (x, y, z) in mm: close to the native spacing of typical abdominal CT (and of the
    BTCV copies) and cheap enough for 2-core CPUs."""
    crop_to_body: bool = True
    """Crop to the body's bounding box before resampling (less work, no couch or air border)."""
    body_threshold_hu: float = -100.0
    """Voxels above this belong to the body when finding its box (above clipped-air of BTCV copies)."""
    body_margin_mm: float = 10.0
    """Margin kept around the body box."""
    check_input_is_ct: bool = True
    """Refuse inputs whose intensities do not look like CT in HU."""

    def __post_init__(self) -> None:
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        if len(self.spacing_mm) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing_mm):
            raise ValueError(f"spacing_mm {self.spacing_mm} is invalid; expected three positive sizes in mm")
        if self.body_margin_mm < 0:
            raise ValueError(f"body_margin_mm {self.body_margin_mm} is negative")

    def to_dict(self) -> dict:
        return asdict(self)


def empty_like_grid(image: sitk.Image) -> sitk.Image:
    """A one-byte image with ``image``'s grid: enough to resample onto, without keeping the voxels."""
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return grid


@dataclass
class PreparedVolume:
    """A CT on the working grid, with what is needed to go back to the input grid.

    Attributes:
        image: float32 HU image on the working grid (canonical orientation, axis-aligned, working spacing, body
            crop).
        input_grid: an empty image with the input's size, spacing, origin and direction.
        crop_box: ``(start_xyz, size_xyz)`` of the body box in the canonically oriented input.
        config: the configuration used.
    """

    image: sitk.Image
    input_grid: sitk.Image
    crop_box: tuple[tuple[int, ...], tuple[int, ...]]
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    @property
    def array(self) -> np.ndarray:
        """The working HU voxels as a (z, y, x) float32 array view."""
        return sitk.GetArrayViewFromImage(self.image)


def prepare_volume(image: sitk.Image, config: PreprocessConfig | None = None, *, reference_path: bool = False,
                   like: PreparedVolume | None = None) -> PreparedVolume:  # fmt: skip
    """Orient, crop to the body and resample a CT to the working grid.

    An input whose axes are LPS's up to order and sign (any non-oblique scan) is read once, as it is: the
    reorientation is a view of its voxels, the body box is found on bins of that view, and the anti-aliasing
    and resampling of the body box are one separable linear map (:func:`~.spatial.separable_samples`); no
    full-resolution copy is made. Oblique inputs take the straightforward way.

    Args:
        image: input CT in HU, any orientation and spacing.
        config: preprocessing settings (defaults: :class:`PreprocessConfig`).
        reference_path: the straightforward way, kept for checks: cast to float32, reorient
            (``DICOMOrient``), crop, smooth the body box (``SmoothingRecursiveGaussian``), ``sitk.Resample``;
            the default gives the same grid and crop box and the same values to float rounding (1e-3 HU).
        like: another preparation of the same image (e.g. the backbone's, for a BPR of another spacing): its
            body box is reused when the crop settings agree, and the image is not checked again.

    Returns:
        The prepared volume; ``to_input_grid`` maps results back.

    Raises:
        UserInputError: the image is not a usable 3D CT (see :func:`check_ct`).
    """
    config = config or PreprocessConfig()
    box = None
    if like is not None and (like.config.crop_to_body, like.config.body_threshold_hu, like.config.body_margin_mm) \
            == (config.crop_to_body, config.body_threshold_hu, config.body_margin_mm):  # fmt: skip
        box = like.crop_box
    if config.check_input_is_ct and like is None:
        check_ct(image)
    if not reference_path:
        prepared = _prepare_in_one_pass(image, config, box)
        if prepared is not None:
            return prepared
    oriented = to_axis_aligned(to_canonical_orientation(sitk.Cast(image, sitk.sitkFloat32)))
    if config.crop_to_body:
        start, size = body_bounding_box(oriented, config.body_threshold_hu, config.body_margin_mm)
        oriented = crop_to_box(oriented, start, size)
    else:
        start, size = (0, 0, 0), oriented.GetSize()
    working = resample_to_spacing(oriented, config.spacing_mm, "linear", default_value=-1024.0,
                                  reference_path=reference_path)  # fmt: skip
    return PreparedVolume(working, empty_like_grid(image), (tuple(start), tuple(size)), config)


@dataclass(frozen=True)
class _Grid:
    """A grid's geometry without voxels (the ``sitk.Image`` getters that resampling grids are built from)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def GetSize(self):
        return self.size

    def GetSpacing(self):
        return self.spacing

    def GetOrigin(self):
        return self.origin

    def GetDirection(self):
        return self.direction


def _prepare_in_one_pass(image: sitk.Image, config: PreprocessConfig,
                         box: tuple | None = None) -> PreparedVolume | None:  # fmt: skip
    """:func:`prepare_volume` of a non-oblique input from a view of its voxels (``box``: the body box, when
    known); None for an oblique input."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    signs = np.rint(direction)
    if not np.allclose(direction, signs, atol=1e-6) or not np.array_equal(np.abs(signs).sum(0), np.ones(3)) \
            or not np.array_equal(np.abs(signs).sum(1), np.ones(3)):  # fmt: skip
        return None
    size, spacing = image.GetSize(), image.GetSpacing()
    source = [int(np.flatnonzero(signs[a])[0]) for a in range(3)]  # the input axis each LPS axis runs along
    flipped = [signs[a, source[a]] < 0 for a in range(3)]
    # what DICOMOrient makes of the geometry: LPS axes, the origin at the voxel that becomes index 0
    corner = [size[b] - 1 if flipped[a] else 0 for b in range(3) for a in range(3) if source[a] == b]
    order = np.zeros((3, 3))
    order[source, range(3)] = [-1.0 if f else 1.0 for f in flipped]
    oriented = _Grid(tuple(size[b] for b in source), tuple(spacing[b] for b in source),
                     image.TransformIndexToPhysicalPoint(corner), tuple((direction @ order).ravel()))  # fmt: skip
    view = sitk.GetArrayViewFromImage(image).transpose([2 - source[2 - k] for k in range(3)])
    view = view[tuple(slice(None, None, -1 if flipped[2 - k] else 1) for k in range(3))]
    if config.crop_to_body:
        box = box or body_box_of_array(view, oriented.spacing, config.body_threshold_hu, config.body_margin_mm)
        if box is None:
            return None
        start, box_size = box
    else:
        start, box_size = (0, 0, 0), oriented.size
    view = view[tuple(slice(start[2 - k], start[2 - k] + box_size[2 - k]) for k in range(3))]
    origin = np.asarray(oriented.origin) + np.asarray(oriented.direction).reshape(3, 3) @ \
        (np.asarray(start) * np.asarray(oriented.spacing))  # fmt: skip
    cropped = _Grid(tuple(box_size), oriented.spacing, tuple(origin), oriented.direction)
    target = grid_like(cropped, config.spacing_mm)
    sigmas = antialias_sigmas(cropped.spacing, target.GetSpacing()) or [0.0, 0.0, 0.0]
    values = separable_samples(view, cropped, target, sigmas, -1024.0)
    if values is None:
        return None
    working = sitk.GetImageFromArray(values)
    working.CopyInformation(target)
    return PreparedVolume(working, empty_like_grid(image), (tuple(start), tuple(box_size)), config)


def to_input_grid(
    result: sitk.Image, prepared: PreparedVolume, interpolation: str = "nearest", default_value: float = 0.0
) -> sitk.Image:
    """Put an image computed on the working grid back onto the input grid.

    Args:
        result: image on ``prepared.image``'s grid (labels, probabilities or a vector coordinate map).
        prepared: the output of :func:`prepare_volume` for the same input.
        interpolation: ``"nearest"`` for labels, ``"linear"`` for probabilities and coordinate maps,
            ``"labels"`` for a label map resampled label by label (see ``resample_labels_onto``).
        default_value: value for input voxels outside the working grid (outside the body box).

    Returns:
        An image with exactly the input's size, spacing, origin and direction.
    """
    if interpolation == "labels":
        return resample_labels_onto(result, prepared.input_grid, "linear")
    return resample_onto(result, prepared.input_grid, interpolation, default_value)
