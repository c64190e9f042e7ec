"""Preprocessing: HU windowing, orientation, body crop and resampling, with the exact inverse."""

from DiffusionSegLib.preprocess.intensity import check_window, scale_hu
from DiffusionSegLib.preprocess.pipeline import (
    PreparedVolume,
    PreprocessConfig,
    empty_like_grid,
    prepare_volume,
    to_input_grid,
)
from DiffusionSegLib.preprocess.spatial import (
    body_bounding_box,
    crop_to_box,
    resample_labels_onto,
    resample_onto,
    resample_to_spacing,
    to_axis_aligned,
    to_canonical_orientation,
)

__all__ = [
    "PreparedVolume",
    "PreprocessConfig",
    "body_bounding_box",
    "check_window",
    "crop_to_box",
    "empty_like_grid",
    "prepare_volume",
    "resample_labels_onto",
    "resample_onto",
    "resample_to_spacing",
    "scale_hu",
    "to_axis_aligned",
    "to_canonical_orientation",
    "to_input_grid",
]
