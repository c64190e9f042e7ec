"""A CT on a tilted grid (axes rotated 25 degrees about left-right, as a gantry tilt gives; the anatomy unchanged
in physical space) is worked on axis-aligned: at the same physical points it gets the coordinates of the
original grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path, dice, tilted

from DiffusionSegLib.data.volume import read_volume
from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume, to_axis_aligned
from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment
from DiffusionSegLib.pretrain.export import load_backbone
from DiffusionSegLib.resources import default_probe_path

SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"


def test_an_oblique_grid_is_worked_on_axis_aligned_and_inverted_exactly():
    ct = read_volume(data_path(SMALL_CT))
    oblique = tilted(ct)
    assert not np.allclose(np.asarray(oblique.GetDirection()).reshape(3, 3), np.eye(3), atol=0.1)
    aligned = to_axis_aligned(oblique)
    assert np.allclose(np.asarray(aligned.GetDirection()).reshape(3, 3), np.eye(3))
    prepared = prepare_volume(oblique, PreprocessConfig(spacing_mm=(3.0, 3.0, 3.0)))
    assert np.allclose(np.asarray(prepared.image.GetDirection()).reshape(3, 3), np.eye(3))
    # a voxel of the aligned image holds what the oblique image holds at the same physical point
    point = oblique.TransformIndexToPhysicalPoint([n // 2 for n in oblique.GetSize()])
    original = ct.GetPixel(ct.TransformPhysicalPointToIndex(point))
    assert aligned.GetPixel(aligned.TransformPhysicalPointToIndex(point)) == pytest.approx(original, abs=60)


def _on_original_grid(result, moved, ct):
    """``(labels, coordinates, inside)``: a segmentation of ``moved`` (``ct`` on another grid) brought back onto
    ``ct``'s grid, and where ``moved``'s grid covers it (away from its border)."""
    footprint = sitk.Image(moved.GetSize(), sitk.sitkUInt8) + 1
    footprint.CopyInformation(moved)
    covered = sitk.Resample(footprint, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    inside = sitk.GetArrayFromImage(sitk.BinaryErode(covered, [3, 3, 3])) > 0
    labels = sitk.GetArrayFromImage(sitk.Resample(result.labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    coords = None
    if result.coordinates is not None:
        coords = sitk.GetArrayFromImage(sitk.Resample(result.coordinates, ct, sitk.Transform(), sitk.sitkLinear, 0.0))
    return labels, coords, inside


def _half_voxel_shifted(ct):
    """``ct`` resampled (cubic B-spline, as ``tilted``) onto its own grid moved by half a voxel along every axis:
    no rotation, only the resampling that any change of grid costs."""
    grid = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(ct)
    grid.SetOrigin(tuple(np.asarray(ct.GetOrigin()) + 0.5 * np.asarray(ct.GetSpacing())))
    return sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkBSpline, -1024.0, ct.GetPixelID())


def test_tilted_ct_gets_the_same_coordinates_at_the_same_points():
    ct = read_volume(data_path(SMALL_CT))
    oblique = tilted(ct)
    probe_path = default_probe_path()
    backbone = load_backbone(find_probe_backbone(probe_path))
    probe = load_probe(probe_path, backbone)
    reference = segment(ct, probe, backbone, largest_component=True, coordinates=True)
    result = segment(oblique, probe, backbone, largest_component=True, coordinates=True)
    assert result.labels.GetSize() == oblique.GetSize() and result.labels.GetDirection() == oblique.GetDirection()

    labels_back, coords_back, inside = _on_original_grid(result, oblique, ct)
    labels_ref = sitk.GetArrayFromImage(reference.labels)
    coords_ref = sitk.GetArrayFromImage(reference.coordinates)
    where = inside & (sitk.GetArrayFromImage(ct) > -300)
    distance = np.linalg.norm(coords_back[where] - coords_ref[where], axis=-1)
    assert float(np.median(distance)) < 5.0, np.percentile(distance, [50, 90])
    # organ labels at matched points (shipped default model, B-spline tilt: measured liver 0.957, spleen 0.956,
    # 0.893 of the labelled voxels agreeing; the bounds leave room for other CPUs' rounding)
    foreground = inside & ((labels_ref > 0) | (labels_back > 0))
    assert float(np.mean(labels_back[foreground] == labels_ref[foreground])) > 0.86
    tilted_dice = {o.name: dice((labels_ref == o.value) & inside, (labels_back == o.value) & inside)
                   for o in probe.labels}  # fmt: skip
    for organ in ("liver", "spleen"):
        assert tilted_dice[organ] > 0.945, (organ, tilted_dice)

    # The rotation costs nothing beyond a change of grid: every organ agrees with the original at least as well
    # as on the same CT moved by half a voxel without rotation (measured with the shipped default: tilted /
    # shifted kidneys 0.905 / 0.863 and 0.928 / 0.902, IVC 0.866 / 0.768, right adrenal 0.663 / 0.419; worked on
    # the tilted grid itself instead of an axis-aligned one: right kidney 0.668, IVC 0.642, right adrenal 0.0).
    shifted = _half_voxel_shifted(ct)
    shifted_back, _, shifted_inside = _on_original_grid(segment(shifted, probe, backbone, largest_component=True),
                                                        shifted, ct)  # fmt: skip
    for organ in probe.labels:
        a = (labels_ref == organ.value) & inside & shifted_inside
        if np.count_nonzero(a) < 50:  # not in the scan (or a few voxels at its border)
            continue
        shifted_dice = dice(a, (shifted_back == organ.value) & inside & shifted_inside)
        assert tilted_dice[organ.name] >= shifted_dice - 0.03, (organ.name, tilted_dice[organ.name], shifted_dice)
