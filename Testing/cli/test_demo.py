"""The README's main command: the demo on the bundled sample CT."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

from DiffusionSegLib.cli import main
from DiffusionSegLib.data.volume import read_volume, same_grid
from DiffusionSegLib.resources import sample_ct_path


def test_demo_writes_its_outputs_on_the_sample_grid(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "coordinates.nii.gz" in out and "timings" in out
    sample = read_volume(sample_ct_path())
    mask = read_volume(tmp_path / "body_mask.nii.gz")
    coords = read_volume(tmp_path / "coordinates.nii.gz")
    assert same_grid(mask, sample) and same_grid(coords, sample)
    assert coords.GetNumberOfComponentsPerPixel() == 3
    # the cranio-caudal channel grows with physical z (the sample is stored RAS: rows run inferior to superior)
    z_channel = sitk.GetArrayFromImage(coords)[..., 2]
    body = sitk.GetArrayFromImage(mask) > 0
    slice_index = np.nonzero(body)[0]
    physical_z = np.array([sample.TransformIndexToPhysicalPoint((0, 0, int(k)))[2] for k in slice_index])
    assert spearmanr(z_channel[body], physical_z).statistic > 0.98
