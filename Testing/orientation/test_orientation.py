"""A header that lies about orientation is caught: the anatomy tells which way is head, front and left.

Real CTs mirrored along an axis with their header unchanged (what a conversion that drops the affine gives) are
refused by ``segment`` (exit 2, the axis named, nothing written); ``--orientation fix`` segments them as well as
the correct scan; a sheared direction matrix is refused; no real scan, nor a true rotation of one, alarms.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DATA, data_path, dice, tilted

from DiffusionSegLib.cli import main
from DiffusionSegLib.preprocess.orientation import (AXES, FRONT_BACK_ALARM, FRONT_BACK_SURE, OrientationMismatch,
                                                    assess_orientation, check_orientation, mirror_image,
                                                    mirrored_index_axes, orientation_scores)

SCANS = {"demo": "labeled/totalseg_example_ct_3mm.nii.gz", "btcv": "btcv/btcv_0001_ct.nii.gz"}
MIRRORS = {"x": (0,), "y": (1,), "z": (2,), "y+z": (1, 2)}


def _mirrored(image: sitk.Image, lps) -> sitk.Image:
    return mirror_image(image, mirrored_index_axes(image, lps))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per scan: the CT and the shipped default model's segmentation of it as given (one per scan)."""
    cache = {}

    def get(scan: str):
        if scan not in cache:
            image = sitk.ReadImage(str(data_path(SCANS[scan])))
            out = tmp_path_factory.mktemp(f"ref_{scan}") / "labels.nii.gz"
            assert main(["segment", str(data_path(SCANS[scan])), "-o", str(out)]) == 0
            cache[scan] = (image, sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
        return cache[scan]

    return get


def _organ_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice over all organ voxels with the same id (the organs' voxels pooled)."""
    same = np.count_nonzero((a == b) & (a > 0))
    return 2 * same / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.mark.parametrize("scan", sorted(SCANS))
@pytest.mark.parametrize("mirror", sorted(MIRRORS))
def test_mirrored_scan_is_refused_naming_the_axis(scan, mirror, tmp_path, capsys):
    image = sitk.ReadImage(str(data_path(SCANS[scan])))
    path = tmp_path / "input" / "scan.nii.gz"
    path.parent.mkdir()
    sitk.WriteImage(_mirrored(image, MIRRORS[mirror]), str(path))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["segment", str(path), "-o", str(out / "labels.seg.nrrd")]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    for axis in MIRRORS[mirror]:
        assert f"{AXES[axis]} is mirrored" in message, message
    assert "'scan.nii.gz'" in message and "--orientation fix" in message
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("scan", sorted(SCANS))
@pytest.mark.parametrize("mirror", sorted(MIRRORS))
def test_fix_segments_a_mirrored_scan_like_the_correct_one(scan, mirror, reference, tmp_path):
    image, expected = reference(scan)
    mirrored = _mirrored(image, MIRRORS[mirror])
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(mirrored, str(path))
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(path), "-o", str(out), "--orientation", "fix"]) == 0
    labels = sitk.ReadImage(str(out))
    # on the input grid as given
    assert labels.GetSize() == mirrored.GetSize()
    assert np.allclose(labels.GetSpacing(), mirrored.GetSpacing()) and np.allclose(labels.GetOrigin(), mirrored.GetOrigin())
    assert np.allclose(labels.GetDirection(), mirrored.GetDirection())
    # the labels follow the voxels: mirrored back, they are the correct scan's
    back = sitk.GetArrayFromImage(_mirrored(labels, MIRRORS[mirror]))
    assert _organ_dice(back, expected) >= 0.95


def _sheared_nifti(image: sitk.Image, path, compress: bool) -> None:
    """A NIfTI whose sform is sheared (ITK would read its qform instead and say nothing)."""
    plain = path.with_name("plain.nii")
    sitk.WriteImage(image, str(plain))
    data = bytearray(plain.read_bytes())
    rows = np.array(struct.unpack("<12f", data[280:328])).reshape(3, 4)
    rows[0, 1] += 0.3 * np.linalg.norm(rows[:, 1])
    data[280:328] = struct.pack("<12f", *rows.ravel())
    path.write_bytes(gzip.compress(bytes(data)) if compress else bytes(data))
    plain.unlink()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_sheared_direction_is_refused(suffix, tmp_path, capsys):
    image = sitk.ReadImage(str(data_path(SCANS["demo"])))
    path = tmp_path / f"sheared{suffix}"
    if suffix.startswith(".nii"):
        _sheared_nifti(image, path, suffix == ".nii.gz")
    else:
        direction = np.asarray(image.GetDirection()).reshape(3, 3).copy()
        direction[:, 1] = direction[:, 1] + 0.3 * direction[:, 0]
        image.SetDirection(direction.ravel().tolist())
        sitk.WriteImage(image, str(path))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["segment", str(path), "-o", str(out / "labels.nii.gz")]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a rotation" in message and f"'sheared{suffix}'" in message, message
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("degrees", [5.0, 13.0])
def test_true_rotations_pass(degrees):
    image = sitk.ReadImage(str(data_path(SCANS["demo"])))
    rotated = tilted(image, degrees)
    assert check_orientation(rotated, "check", "rotated")[2] == []


def _real_cts():
    if not DATA.exists():
        return []
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from orientation_check import real_cts

    return real_cts(DATA)


@pytest.mark.slow
def test_no_real_ct_alarms():
    """Every real CT at hand as given (BTCV, 3D-IRCADb, TCIA chest and abdomen, DICOM, the demo CT)."""
    from DiffusionSegLib.data.gate import read_ct

    scans = _real_cts()
    if not scans:
        data_path("btcv")  # skips (or fails where the data is required)
    alarms = []
    for path in scans:
        image, _, mirrored = check_orientation(read_ct(path), "fix", path.name)
        if mirrored:
            alarms.append(path.name)
    assert alarms == []


def test_contrast_in_front_of_the_spine_does_not_alarm():
    """A contrast chest CT the right way up whose spine reads mirrored (the filled heart and vessels in front of it
    pull the bone reading forward): the slice BPR reads its slices far better as they are, so front-back is unsure."""
    image = sitk.ReadImage(str(data_path("unlabeled/cmb_crc_msb01068_ct_chest.nii.gz")))
    reading = assess_orientation(*reversed(orientation_scores(image)))
    cue = reading.cues["front-back"]
    assert cue.value <= FRONT_BACK_ALARM and cue.verdict == "unsure" and "no better turned over" in cue.note
    assert reading.turned_residual > 2 * reading.as_is_residual
    assert reading.mirrored == []


def test_front_back_mirror_of_a_cropped_scan_is_caught_by_the_slice_bpr(capsys):
    """A BTCV crop cuts the body, so its spine reads unsure either way up; mirrored front-back, the slice BPR reads
    its slices far better turned over, which alone says mirrored (and names no other axis)."""
    image = sitk.ReadImage(str(data_path("btcv/btcv_0002_ct.nii.gz")))
    assert FRONT_BACK_ALARM < assess_orientation(*reversed(orientation_scores(image))).cues["front-back"].value < \
        FRONT_BACK_SURE  # fmt: skip
    with pytest.raises(OrientationMismatch) as caught:
        check_orientation(_mirrored(image, (1,)), "check", "case")
    assert caught.value.axes == ["front-back"]
    assert "turned over" in str(caught.value) and "--orientation fix" in str(caught.value)


def test_fix_mirrors_the_label_map_with_the_ct():
    """``--orientation fix`` for training inputs: the label map is mirrored with the CT (organ stays on it)."""
    ct = sitk.ReadImage(str(data_path("btcv/btcv_0001_ct.nii.gz")))
    labels = sitk.ReadImage(str(data_path("btcv/btcv_0001_labels.nii.gz")))
    fixed_ct, fixed_labels, axes = check_orientation(_mirrored(ct, (2,)), "fix", "case", _mirrored(labels, (2,)))
    assert axes == mirrored_index_axes(ct, (2,))
    assert np.array_equal(sitk.GetArrayViewFromImage(fixed_ct), sitk.GetArrayViewFromImage(ct))
    assert dice(sitk.GetArrayViewFromImage(fixed_labels) == 6, sitk.GetArrayViewFromImage(labels) == 6) == 1.0
