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
    body_bounding_box,
    crop_to_box,
    resample_labels_onto,
    resample_onto,
    resample_to_spacing,
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


def prepare_volume(image: sitk.Image, config: PreprocessConfig | None = None) -> PreparedVolume:
    """Orient, crop to the body and resample a CT to the working grid.

    Args:
        image: input CT in HU, any orientation and spacing.
        config: preprocessing settings (defaults: :class:`PreprocessConfig`).

    Returns:
        The prepared volume; ``to_input_grid`` maps results back.

    Raises:
        UserInputError: the image is not a usable 3D CT (see :func:`check_ct`).
    """
    config = config or PreprocessConfig()
    if config.check_input_is_ct:
        check_ct(image)
    oriented = to_axis_aligned(to_canonical_orientation(sitk.Cast(image, sitk.sitkFloat32)))
    if config.crop_to_body:
        start, size = body_bounding_box(oriented, config.body_threshold_hu, config.body_margin_mm)
        oriented = crop_to_box(oriented, start, size)
    else:
        start, size = (0, 0, 0), oriented.GetSize()
    working = resample_to_spacing(oriented, config.spacing_mm, "linear", default_value=-1024.0)
    return PreparedVolume(working, empty_like_grid(image), (tuple(start), tuple(size)), config)


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
