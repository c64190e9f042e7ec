"""Body Part Regressor: dense 3D anatomical coordinates from CT, trained without labels.

Coordinates are in mm-equivalent units on the axes of the canonical LPS working grid: channel 0 right → left,
1 anterior → posterior, 2 inferior → superior (cranio-caudal). Two designs: the default slice design (a 2D
network places each axial cross-section, :mod:`~DiffusionSegLib.bpr.slice_model`) and the 3D patch design
(:mod:`~DiffusionSegLib.bpr.model`). See :mod:`DiffusionSegLib.bpr.objective`.
"""

from DiffusionSegLib.bpr.inference import (
    coordinate_channels,
    coordinates_to_image,
    predict_body_coordinates,
    predict_working_coordinates,
)
from DiffusionSegLib.bpr.model import (
    COORDINATE_AXES,
    UNIT_MM,
    BodyPartRegressor,
    BPRConfig,
    bpr_config_from_dict,
    default_bpr_path,
    load_bpr,
    save_bpr,
)
from DiffusionSegLib.bpr.slice_model import SliceBodyPartRegressor, SliceBPRConfig
from DiffusionSegLib.bpr.train import BPRFitResult, fit_bpr

__all__ = [
    "BPRConfig",
    "BPRFitResult",
    "BodyPartRegressor",
    "COORDINATE_AXES",
    "SliceBPRConfig",
    "SliceBodyPartRegressor",
    "UNIT_MM",
    "bpr_config_from_dict",
    "coordinate_channels",
    "coordinates_to_image",
    "default_bpr_path",
    "fit_bpr",
    "load_bpr",
    "predict_body_coordinates",
    "predict_working_coordinates",
    "save_bpr",
]
