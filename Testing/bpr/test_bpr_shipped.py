"""The shipped BPRs: the default (slice design) loads from its file alone, orders a held-out scan from feet to
head and gives the same voxel the same coordinates in two fields of view; the shipped backbone keeps the BPR it
was pretrained with (the 3D patch design, found by its hash)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from helpers import data_path
from scipy.stats import spearmanr

from DiffusionSegLib.bpr import (
    BodyPartRegressor,
    SliceBodyPartRegressor,
    SliceBPRConfig,
    bpr_config_from_dict,
    default_bpr_path,
    load_bpr,
    predict_working_coordinates,
)
from DiffusionSegLib.bpr.inference import default_mode
from DiffusionSegLib.checkpoint import file_sha256, load_weights
from DiffusionSegLib.data.volume import read_volume
from DiffusionSegLib.features import backbone_bpr_path
from DiffusionSegLib.preprocess import prepare_volume
from DiffusionSegLib.pretrain.export import load_backbone
from DiffusionSegLib.resources import default_backbone_path


def test_shipped_weights_load_with_their_config():
    path = default_bpr_path()
    assert path.is_file() and path.stat().st_size < 5_000_000
    model, cfg = load_bpr()
    _, config, metadata = load_weights(path, kind="bpr")
    # the file's config is the model's (fields added since take their defaults)
    assert bpr_config_from_dict(config) == cfg and isinstance(cfg, SliceBPRConfig) and metadata["extra"]["step"] > 0
    assert isinstance(model, SliceBodyPartRegressor) and not model.training
    assert not any("ircadb" in name for name in metadata["extra"]["training_volumes"])  # CC BY-NC-ND: held out


def _spearman_z(coords: np.ndarray, body: np.ndarray, z_mm: np.ndarray) -> float:
    z_of_voxel = np.broadcast_to(z_mm[:, None, None], body.shape)
    pick = np.random.default_rng(0).choice(np.flatnonzero(body), 20000, replace=False)
    return float(spearmanr(coords[2].ravel()[pick], z_of_voxel.ravel()[pick])[0])


def _held_out(case: str):
    """A 3D-IRCADb scan (never used for training) on the working grid, its body mask and slice positions."""
    prepared = prepare_volume(read_volume(data_path(f"labeled/{case}_ct.nii.gz")))
    body = sitk.GetArrayViewFromImage(prepared.image) > -100
    z_mm = prepared.image.GetOrigin()[2] + prepared.image.GetSpacing()[2] * np.arange(body.shape[0])
    return prepared, body, z_mm


def test_cranio_caudal_channel_is_monotonic_in_z_on_a_held_out_scan():
    model, _ = load_bpr()
    prepared, body, z_mm = _held_out("ircadb1.17")
    # the network's own per-slice estimates: learned, not guaranteed by construction (measured 0.995)
    dense = predict_working_coordinates(prepared, model, mode="dense")[0].numpy()
    assert _spearman_z(dense, body, z_mm) > 0.98
    # the default output (isotonic over slices): monotonic, with a cranio-caudal scale near 1 mm per mm
    coords = predict_working_coordinates(prepared, model)[0].numpy()
    assert _spearman_z(coords, body, z_mm) > 0.99  # measured 0.999
    slices = coords[2][:, body.any(0)].mean(1)
    assert 0.7 < (slices[-1] - slices[0]) / (z_mm[-1] - z_mm[0]) < 1.4  # measured 1.03


def test_same_voxel_gets_the_same_coordinates_in_two_fields_of_view():
    """The upper and the lower two thirds of a held-out scan, each on its own (goal ≤ 5 mm; measured 0.6 mm)."""
    model, _ = load_bpr()
    prepared, body, _ = _held_out("ircadb1.01")
    hu = sitk.GetArrayFromImage(prepared.image)
    low, high = hu.shape[0] // 3, hu.shape[0] - hu.shape[0] // 3
    upper = predict_working_coordinates(hu[low:], model)[0].numpy()[:, : high - low]
    lower = predict_working_coordinates(hu[:high], model)[0].numpy()[:, low:]
    difference = np.linalg.norm(upper - lower, axis=0)[body[low:high]]
    assert float(difference.mean()) <= 5.0, float(difference.mean())


def test_the_shipped_backbone_keeps_the_bpr_it_was_pretrained_with():
    backbone = load_backbone(default_backbone_path())
    path = backbone_bpr_path(backbone)
    assert path.name == "bpr_patch_v1.safetensors" and file_sha256(path) == backbone.bpr_sha256
    model, _ = load_bpr(path)
    assert isinstance(model, BodyPartRegressor) and default_mode(model) == "translation"  # as in its pretraining
