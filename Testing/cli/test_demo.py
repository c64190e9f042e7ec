"""The README's main command: the demo segments the bundled sample CT with the shipped default models."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

from DiffusionSegLib.cli import main
from DiffusionSegLib.data.labels import BTCV_LABELS
from DiffusionSegLib.data.volume import read_volume, same_grid
from DiffusionSegLib.probe import read_seg_nrrd
from DiffusionSegLib.resources import sample_ct_path

LIVER, SPLEEN = 6, 1


def test_demo_segments_the_sample_with_the_shipped_models(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("segmentation.nii.gz", "segmentation.seg.nrrd", "coordinates.nii.gz", "preview.png", "timings"):
        assert name in out
    sample = read_volume(sample_ct_path())
    labels = read_volume(tmp_path / "segmentation.nii.gz")
    coords = read_volume(tmp_path / "coordinates.nii.gz")
    assert same_grid(labels, sample) and same_grid(coords, sample)
    assert coords.GetNumberOfComponentsPerPixel() == 3

    # the Slicer segmentation holds the same voxels, with BTCV names
    seg, segments = read_seg_nrrd(tmp_path / "segmentation.seg.nrrd")
    assert np.array_equal(sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(labels))
    names = {s["name"] for s in segments}
    assert "liver" in names and names <= {o.name for o in BTCV_LABELS}

    # anatomy: a liver of plausible size on the patient's right (LPS x < 0 side of the spleen), above the kidneys
    array = sitk.GetArrayFromImage(labels)
    voxel_ml = float(np.prod(sample.GetSpacing())) / 1000
    assert 600 < np.count_nonzero(array == LIVER) * voxel_ml < 3500

    def centre(value: int) -> np.ndarray:
        index = np.argwhere(array == value).mean(0)[::-1]  # (x, y, z) index
        return np.array(sample.TransformContinuousIndexToPhysicalPoint(index.tolist()))

    assert np.count_nonzero(array == SPLEEN) > 0
    assert centre(LIVER)[0] < centre(SPLEEN)[0]  # LPS: patient's right has the smaller x

    # the cranio-caudal coordinate grows with physical z inside the body
    z_channel = sitk.GetArrayFromImage(coords)[..., 2]
    body = sitk.GetArrayFromImage(sample) > -300
    slice_index = np.nonzero(body)[0]
    physical_z = np.array([sample.TransformIndexToPhysicalPoint((0, 0, int(k)))[2] for k in slice_index])
    assert spearmanr(z_channel[body], physical_z).statistic > 0.98

    png = sitk.ReadImage(str(tmp_path / "preview.png"))
    assert min(png.GetSize()) > 200
