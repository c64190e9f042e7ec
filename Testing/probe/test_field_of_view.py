"""Field-of-view awareness on real CT with the shipped slice BPR: a probe records where its organs lie along the
body axis, and an organ that lies outside a scan is removed and reported."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path

from DiffusionSegLib.data.labels import BTCV_LABELS, organ_label
from DiffusionSegLib.pretrain.export import load_backbone
from DiffusionSegLib.probe import ProbeConfig, fit_probe, load_probe, save_probe
from DiffusionSegLib.resources import default_backbone_path

LIVER, RIGHT_KIDNEY, LEFT_KIDNEY = organ_label(6, "liver"), organ_label(2, "right kidney"), organ_label(3, "left kidney")
ORGANS = [LIVER, RIGHT_KIDNEY, LEFT_KIDNEY]


@pytest.fixture(scope="module")
def shipped_backbone():
    return load_backbone(default_backbone_path())


@pytest.fixture(scope="module")
def probe_file(case, shipped_backbone, tmp_path_factory):
    cfg = ProbeConfig(head="linear", lr=3e-2, steps=30, patch_size_vox=(16, 32, 32), patches_per_volume=6,
                      val_every=10, device="cpu")  # fmt: skip
    probe = fit_probe([case], ORGANS, shipped_backbone, cfg, progress=False)
    return save_probe(tmp_path_factory.mktemp("fov") / "probe.safetensors", probe)


def test_probe_records_where_each_organ_lies_along_the_body_axis(probe_file, shipped_backbone):
    from DiffusionSegLib.bpr import default_bpr_path
    from DiffusionSegLib.checkpoint import file_sha256

    probe = load_probe(probe_file, shipped_backbone)
    assert probe.field_of_view["bpr_sha256"] == file_sha256(default_bpr_path())
    ranges = probe.field_of_view["organ_z_mm"]
    assert set(ranges) == {o.name for o in ORGANS}
    (liver_low, liver_high), (kidney_low, kidney_high) = ranges["liver"], ranges["right kidney"]
    assert liver_low < liver_high and kidney_low < kidney_high
    assert liver_high > kidney_high + 30  # the liver dome lies well above the kidney's upper pole (z: I -> S)


def test_chest_scan_has_no_bladder_in_view_and_keeps_the_liver(tmp_path):
    """Ranges measured on the abdomen / pelvis example (pseudo-labels: a smoke test of the mechanism, not an
    accuracy figure), applied to the shared chest CT: the bladder lies far below the chest and is removed and
    reported; the liver (the chest CT holds its dome) stays."""
    from DiffusionSegLib.probe.extent import BodyAxis, apply_field_of_view, organ_z_ranges

    bladder = organ_label(21, "urinary bladder")
    abdomen = sitk.ReadImage(str(data_path("labeled/totalseg_example_ct_3mm.nii.gz")))
    pseudo = sitk.ReadImage(str(data_path("labeled/totalseg_example_seg117_pseudo_fast.nii.gz")))
    liver = organ_label(5, "liver")
    axis = BodyAxis()
    ranges = organ_z_ranges([(abdomen, pseudo)], [liver, bladder], axis)
    assert ranges["urinary bladder"][1] < ranges["liver"][0]  # the bladder lies below the liver

    chest = sitk.ReadImage(str(data_path("unlabeled/lidc_idri_0314_chest.nii.gz")))
    z = axis.z_map(chest)
    hu = sitk.GetArrayFromImage(chest)
    predicted = np.zeros(hu.shape, np.uint8)  # a poor model's guess: "bladder" and "liver" in the lower chest
    predicted[: hu.shape[0] // 3][hu[: hu.shape[0] // 3] > 0] = 5
    predicted[:5][hu[:5] > 20] = 21
    view = apply_field_of_view(predicted, z, hu, [liver, bladder], ranges)
    assert view.outside == ["urinary bladder"] and not (predicted == 21).any()
    assert (predicted == 5).sum() > 1000
    assert view.z_range_mm[1] > ranges["liver"][1]  # the chest reaches above the liver
    assert "not in the field of view: urinary bladder" in view.describe()


def test_segment_applies_the_recorded_field_of_view_and_writes_it_to_the_seg_nrrd(case, probe_file,
                                                                                  shipped_backbone, tmp_path):  # fmt: skip
    from DiffusionSegLib.probe import read_seg_nrrd, segment, write_segmentation
    from DiffusionSegLib.probe.segnrrd import FIELD_OF_VIEW_KEY

    probe = load_probe(probe_file, shipped_backbone)
    result = segment(case[0], probe, shipped_backbone)
    assert result.field_of_view is not None and result.field_of_view.outside == []  # its own scan: all in view
    assert sorted([o.name for o in result.organs] + result.not_found) == sorted(o.name for o in ORGANS)
    probe.field_of_view["organ_z_mm"]["right kidney"] = [-2000.0, -1900.0]  # an organ far below any scan
    result = segment(case[0], probe, shipped_backbone)
    assert result.field_of_view.outside == ["right kidney"] and "right kidney" not in [o.name for o in result.organs]
    assert not (sitk.GetArrayViewFromImage(result.labels) == RIGHT_KIDNEY.value).any()
    image, segments = read_seg_nrrd(write_segmentation(result, tmp_path / "x.seg.nrrd"))
    assert "right kidney" not in [s["name"] for s in segments]
    assert "not in the field of view: right kidney" in image.GetMetaData(FIELD_OF_VIEW_KEY)


def test_segment_in_bfloat16_checks_the_field_of_view_in_float32(case, probe_file, shipped_backbone):
    """Where ``auto`` picks bfloat16 (AMX CPUs) the networks run under autocast, but the field of view's resampling
    and slice BPR must not: under it a bfloat16 matmul result reached ``.numpy()`` and every segmentation failed."""
    from DiffusionSegLib.probe import segment

    ct = case[0][160:352, 160:352, :]  # a crop (its own geometry) keeps the emulated bfloat16 windows few
    probe = load_probe(probe_file, shipped_backbone)
    low = segment(ct, probe, shipped_backbone, precision="bfloat16", device="cpu")
    high = segment(ct, probe, shipped_backbone, precision="float32", device="cpu")
    assert low.precision == "bfloat16" and high.precision == "float32"
    assert low.field_of_view is not None and low.field_of_view.outside == high.field_of_view.outside
    assert low.field_of_view.z_range_mm == pytest.approx(high.field_of_view.z_range_mm, abs=1e-3)


def test_resampling_stays_float32_inside_a_bfloat16_autocast():
    """The one-pass resampler is numeric preprocessing: a caller's bfloat16 autocast must not round its sums."""
    import torch

    from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume

    ct = sitk.ReadImage(str(data_path("labeled/totalseg_example_ct_3mm.nii.gz")))
    cfg = PreprocessConfig(spacing_mm=(4.0, 4.0, 5.0))
    plain = sitk.GetArrayFromImage(prepare_volume(ct, cfg).image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sitk.GetArrayFromImage(prepare_volume(ct, cfg).image)
    assert autocast.dtype == plain.dtype and np.array_equal(autocast, plain)


def test_the_chest_ct_gets_no_abdominal_organs_above_its_lower_edge(tmp_path, caplog):
    """The shared chest CT through ``diffusionseg segment`` with the shipped default: no pancreas, kidneys and
    adrenals only where the scan shows them, every organ either written or reported, and the liver in the lower
    part of the scan (the old frozen probe painted a 1.36 L "liver" over the heart).

    The scan ends about 20 mm below the diaphragm: its lowest slices show the whole upper abdomen's top (liver,
    spleen, stomach) and the upper poles of both kidneys beside the spine, with the right adrenal behind the
    inferior vena cava (looked at in axial and sagittal slices). So a kidney or adrenal may be painted, but only
    there: within the lowest 30 mm, and far below a whole organ's volume (the smallest BTCV kidney is 10 ml
    whole, a typical one 150 ml)."""
    from DiffusionSegLib.cli import main

    out = tmp_path / "chest.nii.gz"
    caplog.set_level(logging.INFO)
    assert main(["segment", str(data_path("unlabeled/lidc_idri_0314_chest.nii.gz")), "-o", str(out),
                 "--largest-component"]) == 0  # fmt: skip
    said = caplog.messages
    written = next(line for line in said if line.startswith("wrote ")).split(": ", 1)[1].rsplit(" in ", 1)[0]
    reported = " ".join(line for line in said if "not found in this scan" in line or "not in the field of view" in line)
    image = sitk.ReadImage(str(out))
    array = sitk.GetArrayFromImage(image)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # z index runs inferior -> superior
    voxel_ml, slice_mm = float(np.prod(image.GetSpacing())) / 1000.0, image.GetSpacing()[2]
    for organ in ("right kidney", "left kidney", "right adrenal gland", "left adrenal gland", "pancreas"):
        value = next(o.value for o in BTCV_LABELS if o.name == organ)
        slices = np.nonzero((array == value).any(axis=(1, 2)))[0]
        assert (organ in written) != (organ in reported), (organ, written, reported)
        if organ == "pancreas" or not slices.size:
            assert not slices.size and organ not in written, organ
            continue
        assert slices.max() * slice_mm < 30.0, (organ, slices.max())
        assert (array == value).sum() * voxel_ml < (5.0 if "adrenal" in organ else 40.0), organ
    liver = np.nonzero((array == LIVER.value).any(axis=(1, 2)))[0]
    assert liver.size and liver.max() < array.shape[0] // 2, (liver.min(), liver.max(), array.shape[0])


def test_slab_map_gives_the_full_map_and_the_same_clean_up():
    """The body-axis map held as one value per slice (``SlabZ``) is the full input-grid map, and applying the field
    of view with it changes the same voxels (a label map with organs at every height, ranges cutting through)."""
    from DiffusionSegLib.probe.extent import BodyAxis, SlabZ, apply_field_of_view

    ct = sitk.ReadImage(str(data_path("labeled/totalseg_example_ct_3mm.nii.gz")))
    ct = sitk.DICOMOrient(ct, "RAS")  # a flipped input grid
    axis = BodyAxis()
    dense, slab = axis.z_map(ct), axis.slab_map(ct)
    assert isinstance(slab, SlabZ)
    assert np.array_equal(slab.dense(), dense)
    hu = sitk.GetArrayViewFromImage(ct)
    labels = np.zeros(hu.shape, np.uint8)
    labels[hu > 100], labels[(hu > 0) & (hu <= 60)], labels[(hu > 60) & (hu <= 100)] = 6, 2, 3
    inside = dense[dense != 0]
    low, mid, high = np.percentile(inside, [10, 50, 90])
    ranges = {"liver": [mid, high + 500], "right kidney": [low, mid], "left kidney": [high + 400, high + 500]}
    a, b = labels.copy(), labels.copy()
    view_dense = apply_field_of_view(a, dense, hu, ORGANS, ranges)
    view_slab = apply_field_of_view(b, slab, hu, ORGANS, ranges)
    assert np.array_equal(a, b) and not np.array_equal(a, labels)
    assert view_dense.outside == view_slab.outside == ["left kidney"]
    assert view_dense.removed_voxels == view_slab.removed_voxels
    assert view_slab.z_range_mm == pytest.approx(view_dense.z_range_mm, abs=1e-3)
