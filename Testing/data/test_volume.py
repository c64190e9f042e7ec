from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path

from DiffusionSegLib.data.volume import check_ct, check_label_map, ct_likeness, read_volume, same_grid, write_volume
from DiffusionSegLib.errors import UserInputError


def _oblique_image() -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 400, (7, 9, 11)).astype(np.int16))
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1]])
    image.SetDirection(rotation.ravel().tolist())
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((-12.5, 40.25, 801.0))
    return image


def test_dicom_series_and_its_nifti_conversion_have_the_same_geometry(tmp_path):
    dicom = read_volume(data_path("raw/totalseg_example_ct_dicom"))
    assert dicom.GetSize() == (512, 512, 20)
    nifti = read_volume(write_volume(dicom, tmp_path / "series.nii.gz"))
    assert same_grid(dicom, nifti, tolerance=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(dicom), sitk.GetArrayViewFromImage(nifti))
    # The shared NIfTI made from the same series (resampled in-plane to 1.5 mm) covers the same place.
    shared = read_volume(data_path("labeled/totalseg_dicom_ct.nii.gz"))
    np.testing.assert_allclose(shared.GetOrigin(), dicom.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(shared.GetDirection(), dicom.GetDirection(), atol=1e-6)
    extent = np.multiply(dicom.GetSize(), dicom.GetSpacing())
    np.testing.assert_allclose(np.multiply(shared.GetSize(), shared.GetSpacing()), extent, atol=1.0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_read_keeps_geometry_and_voxels(tmp_path, suffix):
    image = _oblique_image()
    back = read_volume(write_volume(image, tmp_path / f"vol{suffix}"))
    assert same_grid(image, back, tolerance=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(back))


def test_write_is_atomic_and_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    write_volume(_oblique_image(), target)
    before = target.read_bytes()

    def write_half_then_fail(image, path, *args, **kwargs):  # a full disk or a crash in the middle of the write
        Path(path).write_bytes(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_volume(_oblique_image(), target)
    assert target.read_bytes() == before  # a plain WriteImage onto the target would have left half a file
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_real_ct_passes_and_mr_is_refused():
    check_ct(read_volume(data_path("raw/totalseg_example_ct.nii.gz")))
    check_ct(read_volume(data_path("btcv/btcv_0001_ct.nii.gz")))  # clipped to [-125, 275] HU: still CT
    mr = read_volume(data_path("raw/totalseg_example_mr_sm.nii.gz"))
    assert not ct_likeness(mr).is_ct
    with pytest.raises(UserInputError, match="does not look like CT"):
        check_ct(mr)


def test_neighbour_correlation_is_pearsons():
    """The CT check's neighbour correlation (sums over views, no copies) is ``np.corrcoef`` of the voxel pairs."""
    from DiffusionSegLib.data.volume import _neighbour_correlation

    ct = sitk.GetArrayFromImage(read_volume(data_path("labeled/ircadb1.01_ct.nii.gz")))[::4, ::4].astype(np.float32)
    noise = np.random.default_rng(0).normal(0.0, 300.0, (6, 20, 40)).astype(np.float32)
    for rows in (ct, noise):
        expected = np.corrcoef(rows[..., :-1].ravel(), rows[..., 1:].ravel())[0, 1]
        assert abs(_neighbour_correlation(rows) - expected) < 1e-9
    assert _neighbour_correlation(np.full((2, 3, 4), 7.0, np.float32)) == 1.0


def test_label_map_on_another_grid_is_refused():
    ct = read_volume(data_path("labeled/ircadb1.01_ct.nii.gz"))
    labels = read_volume(data_path("labeled/ircadb1.01_organs.nii.gz"))
    check_label_map(labels, ct)
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(o + 3.0 for o in labels.GetOrigin()))
    with pytest.raises(UserInputError, match="grid differs from its CT"):
        check_label_map(shifted, ct)


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "a.nrrd", "a.nhdr", "a.mha", "a.mhd"])
@pytest.mark.parametrize("compress", [False, True])
def test_every_format_reads_back_exactly_and_refuses_its_data_cut_short(name, compress, tmp_path):
    """The damaged-file checks pass every intact layout ITK writes (attached or detached data, raw or
    compressed) with the same voxels and geometry, and refuse the same file with its data cut short."""
    image = _oblique_image()
    path = tmp_path / name
    sitk.WriteImage(image, str(path), useCompression=compress)
    read = read_volume(path)
    assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(image))
    assert same_grid(read, image) and read.GetPixelID() == image.GetPixelID()
    data = max((p for p in tmp_path.iterdir()), key=lambda p: p.stat().st_size)  # the file holding the voxels
    data.write_bytes(data.read_bytes()[:-7])
    with pytest.raises(UserInputError, match="is damaged"):
        read_volume(path)
