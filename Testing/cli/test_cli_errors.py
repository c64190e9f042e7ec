"""Every bad input gets one clear line on stderr and exit status 2, without a traceback."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path

from DiffusionSegLib.cli import main


def _write(array: np.ndarray, path, spacing=None) -> str:
    image = sitk.GetImageFromArray(array, isVector=False)
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return str(path)


def _ct_like(shape=(8, 16, 16)) -> np.ndarray:
    array = np.full(shape, -1000, np.int16)
    array[:, 4:12, 4:12] = 40
    return array


def _nifti_with_pixdim(path, value: float) -> str:
    _write(_ct_like(), path)
    header = bytearray(path.read_bytes())
    header[80:84] = struct.pack("<f", value)  # pixdim[1], the x voxel size
    path.write_bytes(bytes(header))
    return str(path)


def _label_on_other_grid(tmp_path):
    ct = data_path("labeled/ircadb1.01_ct.nii.gz")
    labels = sitk.ReadImage(str(data_path("labeled/ircadb1.01_organs.nii.gz")))
    labels.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    return ["preprocess", str(ct), "-o", str(tmp_path / "out.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz")]


CASES = {
    "2D image": (lambda p: ["preprocess", _write(_ct_like()[0], p / "a.nii.gz"), "-o", str(p / "o.nii.gz")],
                 "is 2D"),
    "4D image": (lambda p: ["preprocess", _write(np.stack([_ct_like()] * 3), p / "a.nii.gz"), "-o", str(p / "o.nii.gz")],
                 "is 4D"),
    "MR volume": (lambda p: ["preprocess", str(data_path("raw/totalseg_example_mr_sm.nii.gz")), "-o", str(p / "o.nii.gz")],
                  "does not look like CT"),
    "NaN voxels": (lambda p: ["preprocess", _write(np.where(_ct_like() > 0, np.nan, -1000.0).astype(np.float32),
                                                   p / "a.mha"), "-o", str(p / "o.nii.gz")], "NaN or infinite"),
    "constant volume": (lambda p: ["preprocess", _write(np.zeros((8, 8, 8), np.int16), p / "a.nii.gz"),
                                   "-o", str(p / "o.nii.gz")], "constant"),
    "empty file": (lambda p: ["info", str((p / "e.nii.gz").touch() or p / "e.nii.gz")], "cannot read"),
    "zero spacing": (lambda p: ["info", _nifti_with_pixdim(p / "z.nii", 0.0)], "expected positive sizes"),
    "negative spacing": (lambda p: ["info", _nifti_with_pixdim(p / "n.nii", -1.5)], "expected positive sizes"),
    "missing file": (lambda p: ["info", str(p / "nope.nii.gz")], "not found"),
    "unknown format": (lambda p: ["info", str((p / "x.txt").write_text("hello") and p / "x.txt")], "unknown format"),
    "label grid differs": (_label_on_other_grid, "grid differs from its CT"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line_and_status_2(case, tmp_path, capsys):
    make_argv, expected = CASES[case]
    argv = make_argv(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_info_reports_geometry_and_ct_check(capsys):
    assert main(["info", str(data_path("raw/totalseg_example_ct_dicom"))]) == 0
    out = capsys.readouterr().out
    assert "512 x 512 x 20" in out and "looks like CT yes" in out


def test_preprocess_writes_the_working_volume(tmp_path):
    out = tmp_path / "work.nrrd"
    assert main(["preprocess", str(data_path("btcv/btcv_0001_ct.nii.gz")), "-o", str(out)]) == 0
    image = sitk.ReadImage(str(out))
    assert np.allclose(image.GetSpacing(), (1.5, 1.5, 3.0))
