"""Whole-volume coordinates: working-grid tensor for pretraining, exact input grid for any spacing/orientation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import data_path, tilted

from DiffusionSegLib.bpr import BodyPartRegressor, BPRConfig, predict_body_coordinates, predict_working_coordinates
from DiffusionSegLib.bpr import save_bpr
from DiffusionSegLib.cli import main
from DiffusionSegLib.data.volume import read_volume, same_grid
from DiffusionSegLib.preprocess import prepare_volume

TINY = BPRConfig(patch_size_vox=(32, 64, 64), channels=(4, 8, 16), decoder_channels=8)
SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"


@pytest.fixture(scope="module")
def tiny_model() -> BodyPartRegressor:
    torch.manual_seed(0)
    model = BodyPartRegressor(TINY)
    with torch.no_grad():  # a non-trivial head, so the output depends on the image
        model.offset.weight.normal_(0, 0.01)
    return model.eval()


def _oblique_anisotropic(image: sitk.Image) -> sitk.Image:
    """The same CT flipped to RAI orientation and resampled to an odd anisotropic spacing."""
    flipped = sitk.DICOMOrient(image, "RAI")
    spacing = (2.2, 1.9, 3.7)
    size = [int(n * s / t) for n, s, t in zip(flipped.GetSize(), flipped.GetSpacing(), spacing)]
    return sitk.Resample(flipped, size, sitk.Transform(), sitk.sitkLinear, flipped.GetOrigin(), spacing,
                         flipped.GetDirection(), -1024.0, sitk.sitkInt16)  # fmt: skip


def test_working_grid_tensor_for_pretraining(tiny_model):
    prepared = prepare_volume(read_volume(data_path(SMALL_CT)))
    coords = predict_working_coordinates(prepared, tiny_model)
    assert coords.shape == (1, 3, *reversed(prepared.image.GetSize())) and coords.dtype == torch.float32
    # the same from a raw HU array
    array = torch.from_numpy(sitk.GetArrayFromImage(prepared.image))
    torch.testing.assert_close(predict_working_coordinates(array, tiny_model), coords)
    # a working image at another spacing: resampled for the BPR, result on the given grid
    coarse = sitk.Resample(prepared.image, [n // 2 for n in prepared.image.GetSize()], sitk.Transform(),
                           sitk.sitkLinear, prepared.image.GetOrigin(),
                           [2 * s for s in prepared.image.GetSpacing()], prepared.image.GetDirection())  # fmt: skip
    assert predict_working_coordinates(coarse, tiny_model).shape == (1, 3, *reversed(coarse.GetSize()))


def test_coordinates_land_exactly_on_any_input_grid(tiny_model):
    image = _oblique_anisotropic(read_volume(data_path(SMALL_CT)))
    coords = predict_body_coordinates(image, tiny_model, tiny_model.config)  # the (model, cfg) idiom
    assert same_grid(coords, image) and coords.GetNumberOfComponentsPerPixel() == 3
    assert coords.GetPixelID() == sitk.sitkVectorFloat32
    array = sitk.GetArrayViewFromImage(coords)
    assert np.isfinite(array).all() and np.abs(array).max() > 0


def test_a_rotated_grid_gets_the_same_coordinates_at_the_same_physical_points(tiny_model):
    """A real rotation (25 degrees about left-right, anatomy unchanged), not an axis flip: sampled back at the
    original grid's points, the rotated CT's coordinates match the original's (a pipeline that took the rotated
    axes for axial ones would be off by centimetres: the coordinates carry physical position)."""
    ct = _oblique_anisotropic(read_volume(data_path(SMALL_CT)))
    rotated = tilted(ct)
    assert abs(np.asarray(rotated.GetDirection()).reshape(3, 3)[1, 2]) > 0.4  # truly oblique axes
    reference = predict_body_coordinates(ct, tiny_model, tiny_model.config)
    result = predict_body_coordinates(rotated, tiny_model, tiny_model.config)
    assert same_grid(result, rotated)
    back = sitk.GetArrayFromImage(sitk.Resample(result, ct, sitk.Transform(), sitk.sitkLinear, np.nan))
    footprint = sitk.Image(rotated.GetSize(), sitk.sitkUInt8) + 1
    footprint.CopyInformation(rotated)
    inside = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.Resample(footprint, ct, sitk.Transform(),
                                                                     sitk.sitkNearestNeighbor, 0), [4, 4, 4])) > 0  # fmt: skip
    inside &= sitk.GetArrayFromImage(ct) > -300  # in the body
    distance = np.linalg.norm(back[inside] - sitk.GetArrayFromImage(reference)[inside], axis=-1)
    spread = np.linalg.norm(sitk.GetArrayFromImage(reference)[inside].std(axis=0))
    assert float(np.median(distance)) < 5.0 and float(np.median(distance)) < 0.05 * spread, (np.median(distance), spread)


def test_coords_command_writes_the_input_grid(tmp_path, tiny_model):
    weights = save_bpr(tmp_path / "tiny.safetensors", tiny_model)
    source = tmp_path / "oblique.nrrd"
    image = _oblique_anisotropic(read_volume(data_path(SMALL_CT)))
    sitk.WriteImage(image, str(source))
    out = tmp_path / "coords.nii.gz"
    assert main(["coords", str(source), "-o", str(out), "--bpr", str(weights)]) == 0
    written = sitk.ReadImage(str(out))
    assert same_grid(written, image) and written.GetNumberOfComponentsPerPixel() == 3
    assert main(["coords", str(source), "-o", str(out), "--weights", str(tmp_path / "none.safetensors")]) == 2


@pytest.mark.parametrize("mode", ["translation", "affine", "dense"])
def test_batched_windows_and_fitted_lines_give_the_reference_coordinates(tiny_model, mode):
    """The default way (windows batched in oneDNN's layout; on a grid coarser than the BPR's, the fitted lines
    evaluated on that grid) gives the straightforward way's coordinates (one window per pass, the fitted map
    resampled back through physical space) to float rounding, on the BPR's grid and on a coarser one."""
    prepared = prepare_volume(read_volume(data_path(SMALL_CT)))
    coarse = sitk.Resample(prepared.image, [n // 2 for n in prepared.image.GetSize()], sitk.Transform(),
                           sitk.sitkLinear, prepared.image.GetOrigin(),
                           [2 * s for s in prepared.image.GetSpacing()], prepared.image.GetDirection())  # fmt: skip
    for working in (prepared.image, coarse):
        fast = predict_working_coordinates(working, tiny_model, mode=mode)
        reference = predict_working_coordinates(working, tiny_model, mode=mode, reference_path=True)
        assert fast.shape == reference.shape == (1, 3, *reversed(working.GetSize()))
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-3)  # mm
    assert tiny_model.stem.conv1.weight.is_contiguous()  # the model is left in its own layout


def test_isotonic_increasing_is_scipys_isotonic_regression():
    from scipy.optimize import isotonic_regression

    from DiffusionSegLib.bpr.inference import isotonic_increasing

    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 120):
        values = np.cumsum(rng.normal(0.5, 3.0, size))  # a noisy rise, with many violations
        weights = rng.uniform(1e-3, 50.0, size)
        expected = isotonic_regression(values, weights=weights).x
        fitted = isotonic_increasing(values, weights)
        np.testing.assert_allclose(fitted, expected, rtol=1e-12, atol=1e-9)
        assert np.all(np.diff(fitted) >= 0)
