"""The default preparation (a view of the input's voxels, the body box found on bins of that view, anti-aliasing
and resampling as one separable linear map) gives the straightforward one's working grid, body box and HU values
(float32 copy, ``DICOMOrient``, ``BinShrink`` box, crop, whole-image ``SmoothingRecursiveGaussian``,
``sitk.Resample``): in any axis order and sign, for integer and float voxels, smoothed, kept or upsampled axes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path

from DiffusionSegLib.data.volume import read_volume
from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume
from DiffusionSegLib.preprocess.spatial import body_bounding_box, body_box_of_array

CONFIGS = [PreprocessConfig(),  # 1.5 mm kept in-plane, 1.6 -> 3 mm smoothed
           PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0)),  # every axis smoothed
           PreprocessConfig(spacing_mm=(1.0, 2.5, 1.2), crop_to_body=False)]  # upsampled x and z, no crop  # fmt: skip


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return read_volume(data_path("labeled/ircadb1.17_ct.nii.gz"))


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PIL"])
@pytest.mark.parametrize("float_voxels", [False, True])
def test_one_pass_preparation_gives_the_reference_working_volume(ct, orientation, float_voxels):
    image = sitk.DICOMOrient(ct, orientation)
    if float_voxels:  # not integers: the body bins are summed in double precision
        image = sitk.Cast(image, sitk.sitkFloat32) + 0.25
    for config in CONFIGS:
        fast = prepare_volume(image, config)
        reference = prepare_volume(image, config, reference_path=True)
        assert fast.crop_box == reference.crop_box
        assert fast.image.GetSize() == reference.image.GetSize()
        np.testing.assert_allclose(fast.image.GetOrigin(), reference.image.GetOrigin(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(fast.image.GetSpacing(), reference.image.GetSpacing(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(fast.image.GetDirection(), reference.image.GetDirection(), rtol=0, atol=1e-9)
        assert fast.image.GetPixelID() == reference.image.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(fast.array, reference.array, rtol=0, atol=0.01)  # HU


def test_body_box_of_a_flipped_view_is_the_box_of_the_reoriented_image(ct):
    """The bins of a flipped, permuted view start where ``BinShrink``'s start on the reoriented image."""
    oriented = sitk.DICOMOrient(ct, "PIL")  # x runs to P (the input's y), y to I (its z reversed), z to L (its x)
    view = sitk.GetArrayViewFromImage(ct).transpose(2, 0, 1)[:, ::-1, :]
    np.testing.assert_array_equal(view, sitk.GetArrayViewFromImage(oriented))
    for threshold, margin in ((-100.0, 10.0), (200.0, 0.0)):
        expected = body_bounding_box(sitk.Cast(oriented, sitk.sitkFloat32), threshold, margin)
        assert body_box_of_array(view, oriented.GetSpacing(), threshold, margin) == expected


def test_a_second_preparation_reuses_the_first_ones_body_box(ct):
    """The field-of-view BPR prepares the CT a second time at its own spacing: with ``like`` the body box is taken
    from the backbone's preparation instead of found again, and the result is the same."""
    first = prepare_volume(ct, PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0)))
    second = PreprocessConfig(spacing_mm=(1.5, 1.5, 3.0))
    alone, reusing = prepare_volume(ct, second), prepare_volume(ct, second, like=first)
    assert reusing.crop_box == alone.crop_box == first.crop_box
    assert reusing.image.GetSize() == alone.image.GetSize() and reusing.image.GetOrigin() == alone.image.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(reusing.image), sitk.GetArrayViewFromImage(alone.image))
    other_crop = PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0), body_margin_mm=30.0)  # not the same box: found anew
    assert prepare_volume(ct, other_crop, like=first).crop_box == prepare_volume(ct, other_crop).crop_box
