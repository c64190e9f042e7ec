"""The label map read off the working grid (``argmax_on_input_grid``) is the one the per-class linear resampling
and running argmax gives (``segment.running_argmax``), on real CT in several orientations."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path

from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume
from DiffusionSegLib.preprocess.inverse import argmax_on_input_grid, axis_maps
from DiffusionSegLib.probe.segment import running_argmax


def _probabilities(prepared, num_classes: int = 6, seed: int = 0) -> np.ndarray:
    """Smooth random class probabilities on the working grid, the HU steering two classes (organ-like borders)."""
    rng = np.random.default_rng(seed)
    shape = tuple(reversed(prepared.image.GetSize()))
    logits = []
    for _ in range(num_classes):
        field = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
        logits.append(3 * sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(field, 2.0)))
    hu = prepared.array
    logits[1] = logits[1] + (hu > 100) * 2.0
    logits[2] = logits[2] + ((hu > -50) & (hu < 80)) * 1.5
    stacked = np.stack(logits)
    e = np.exp(stacked - stacked.max(0))
    return (e / e.sum(0)).astype(np.float32)


@pytest.mark.parametrize("orientation", [None, "RAS", "ASL", "PIR"])
def test_fast_argmax_matches_the_per_class_resampling(orientation):
    ct = sitk.ReadImage(str(data_path("labeled/ircadb1.01_ct.nii.gz")))
    ct = ct if orientation is None else sitk.DICOMOrient(ct, orientation)
    prepared = prepare_volume(ct, PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0)))
    probabilities = _probabilities(prepared)
    fast = argmax_on_input_grid(probabilities, prepared.image, prepared.input_grid)
    reference = running_argmax(probabilities, prepared)
    assert fast.shape == reference.shape == tuple(reversed(ct.GetSize()))
    assert fast.dtype == np.uint8
    assert np.mean(fast == reference) >= 0.99999  # float rounding of near-ties at most
    assert len(np.unique(reference)) >= 3


def test_oblique_grids_are_left_to_physical_resampling():
    ct = sitk.ReadImage(str(data_path("labeled/totalseg_example_ct_sm_3mm.nii.gz")))
    tilted = sitk.Image(ct)
    angle = np.deg2rad(10)
    tilted.SetDirection((1, 0, 0, 0, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle)))
    prepared = prepare_volume(tilted, PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0)))
    assert axis_maps(prepared.image, prepared.input_grid) is None
    assert argmax_on_input_grid(np.ones((2, 1, 1, 1), np.float32), prepared.image, prepared.input_grid) is None
