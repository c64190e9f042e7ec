"""``diffusionseg segment`` on many scans: a folder (NIfTI, MHA and a DICOM series folder of real CT, and a truncated
.nii.gz), patterns, kept and replaced outputs, the models loaded once, and the argument errors (exit 2)."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import SimpleITK as sitk
from helpers import data_path

from DiffusionSegLib.cli import main
from DiffusionSegLib.probe import read_seg_nrrd

SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"  # 122 x 101 x 30 at 3 mm: the cheapest real CT


@pytest.fixture
def weight_reads(monkeypatch) -> Counter:
    """Counts the reads of each weights file (every model loader reads its file through safetensors' load_file)."""
    import safetensors.torch

    reads: Counter = Counter()
    load_file = safetensors.torch.load_file

    def counting(path, *args, **kwargs):
        reads[os.path.realpath(path)] += 1
        return load_file(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", counting)
    return reads


def _shipped_model_files() -> list[str]:
    from DiffusionSegLib.probe import find_probe_backbone
    from DiffusionSegLib.resources import default_probe_path

    probe = default_probe_path()
    return [os.path.realpath(probe), os.path.realpath(find_probe_backbone(probe))]


def _lines(caplog, capsys) -> list[str]:
    """Every line the command logged or printed since the last call."""
    captured = capsys.readouterr()
    return [line for text in (caplog.text, captured.err, captured.out) for line in text.splitlines()]


def _cohort(folder: Path) -> Path:
    """Three real CTs in three forms (NIfTI, an MHA crop of a BTCV case, a DICOM series folder) and a .nii.gz cut
    to half its bytes."""
    folder.mkdir()
    shutil.copyfile(data_path(SMALL_CT), folder / "small.nii.gz")
    btcv = sitk.ReadImage(str(data_path("btcv/btcv_0001_ct.nii.gz")))
    sitk.WriteImage(btcv[:, :, 60:100], str(folder / "btcv_crop.mha"), True)
    shutil.copytree(data_path("raw/totalseg_example_ct_dicom"), folder / "series1")
    whole = data_path("raw/totalseg_example_ct.nii.gz").read_bytes()
    (folder / "damaged.nii.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_text("not a scan")
    return folder


def test_folder_segments_each_scan_and_names_the_damaged_one_once(tmp_path, weight_reads, caplog, capsys):
    caplog.set_level(logging.INFO)
    cohort = _cohort(tmp_path / "cohort")
    out = tmp_path / "out"  # created by the command
    status = main(["segment", str(cohort), "-o", str(out), "--device", "cpu"])
    lines = _lines(caplog, capsys)
    assert status == 1, lines
    assert sorted(p.name for p in out.iterdir()) == ["btcv_crop.seg.nrrd", "series1.seg.nrrd", "small.seg.nrrd"]
    for name, source in [("small", cohort / "small.nii.gz"), ("btcv_crop", cohort / "btcv_crop.mha")]:
        labels, segments = read_seg_nrrd(out / f"{name}.seg.nrrd")
        reference = sitk.ReadImage(str(source))
        assert labels.GetSize() == reference.GetSize() and labels.GetOrigin() == pytest.approx(reference.GetOrigin())
        assert "liver" in {s["name"] for s in segments}, (name, segments)
    series, _ = read_seg_nrrd(out / "series1.seg.nrrd")
    assert series.GetSize() == (512, 512, 20)
    damaged = [line for line in lines if "damaged.nii.gz" in line]
    assert len(damaged) == 1 and "truncated" in damaged[0], lines
    assert not any("notes.txt" in line for line in lines)
    probe, backbone = _shipped_model_files()
    assert weight_reads[probe] == 1 and weight_reads[backbone] == 1, weight_reads
    assert max(weight_reads.values()) == 1, weight_reads  # every model file (the BPRs too) read at most once


def test_existing_outputs_kept_unless_overwrite_and_patterns(tmp_path, weight_reads, caplog, capsys):
    caplog.set_level(logging.INFO)
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        shutil.copyfile(data_path(SMALL_CT), scans / f"{name}.nii.gz")
    (scans / "a_labels.txt").write_text("not matched by the pattern")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"an earlier result")
    pattern = str(scans / "*.nii.gz")
    assert main(["segment", pattern, "-o", str(out), "--format", "nii.gz", "--device", "cpu"]) == 0
    lines = _lines(caplog, capsys)
    assert (out / "a.nii.gz").read_bytes() == b"an earlier result"  # kept, and said so
    assert any("a.nii.gz" in line and "kept" in line for line in lines), lines
    written = sitk.ReadImage(str(out / "b.nii.gz"))
    assert written.GetSize() == sitk.ReadImage(str(scans / "b.nii.gz")).GetSize()
    assert sitk.GetArrayViewFromImage(written).max() > 0
    before = (out / "b.nii.gz").read_bytes()

    caplog.clear()
    weight_reads.clear()
    assert main(["segment", str(scans / "b.nii.gz"), "-o", f"{out}{os.sep}", "--format", "nii.gz"]) == 0
    assert (out / "b.nii.gz").read_bytes() == before  # one scan into a folder: kept too, no model loaded
    assert not weight_reads, weight_reads

    assert main(["segment", pattern, "-o", str(out), "--format", "nii.gz", "--overwrite", "--device", "cpu"]) == 0
    assert sitk.ReadImage(str(out / "a.nii.gz")).GetSize() == written.GetSize()  # replaced
    assert (out / "b.nii.gz").read_bytes() == before  # the same scan gives the same labels
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # no temporary file left


@pytest.mark.parametrize("case", ["output is a file", "output names a file", "no scan matches", "output is an input",
                                  "outputs collide", "input missing", "uncertainty with many", "empty folder"])
def test_wrong_arguments_are_one_line_and_exit_2(case, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copyfile(data_path(SMALL_CT), scans / "a.nii.gz")
    shutil.copyfile(data_path(SMALL_CT), scans / "b.nii.gz")
    (tmp_path / "file.seg.nrrd").write_bytes(b"x")
    argv, expected = {
        "output is a file": ([str(scans), "-o", str(tmp_path / "file.seg.nrrd")], "is a file"),
        "output names a file": ([str(scans), "-o", str(tmp_path / "new.seg.nrrd")], "names a file"),
        "no scan matches": ([str(scans / "*.mha"), "-o", str(tmp_path / "out")], "no scan matches"),
        "output is an input": ([str(scans), "-o", str(scans), "--format", "nii.gz"], "it is the input"),
        "outputs collide": ([str(scans / "a.nii.gz"), str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "out")],
                            "would both be written"),
        "input missing": ([str(scans / "a.nii.gz"), str(scans / "nope.nii.gz"), "-o", str(tmp_path / "out")],
                          "not found"),
        "uncertainty with many": ([str(scans), "-o", str(tmp_path / "out"), "--uncertainty", "u.nii.gz"],
                                  "--uncertainty"),
        "empty folder": ([str(scans / "a.nii.gz"), str(tmp_path / "empty"), "-o", str(tmp_path / "out")],
                         "no scans found"),
    }[case]
    if case == "outputs collide":
        shutil.copyfile(scans / "a.nii.gz", tmp_path / "a.nii.gz")
    (tmp_path / "empty").mkdir()
    before = sorted(p.name for p in scans.iterdir())
    assert main(["segment", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert sorted(p.name for p in scans.iterdir()) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_find_scans_reads_folders_dicom_series_and_patterns(tmp_path):
    from DiffusionSegLib.data.scans import find_scans, plan_outputs

    dicom = data_path("raw/totalseg_example_ct_dicom")
    single = find_scans([str(dicom)])  # a DICOM series folder is one scan, written to the file -o names
    assert single.scans == [dicom] and not single.many
    cohort = tmp_path / "cohort"
    shutil.copytree(dicom, cohort / "patient1" / "ct")
    shutil.copyfile(data_path(SMALL_CT), cohort / "x.nii.gz")
    (cohort / "x.seg.nrrd").write_bytes(b"an earlier output, not a scan")
    found = find_scans([str(cohort), str(cohort / "x.nii.gz")])  # the same scan twice is segmented once
    assert found.scans == [cohort / "x.nii.gz", cohort / "patient1" / "ct"] and found.many
    assert [p.name for p in plan_outputs(found, tmp_path / "out", "mha")] == ["x.mha", "patient1_ct.mha"]
    assert find_scans([str(tmp_path / "c*" / "**" / "*.nii.gz")]).scans == [cohort / "x.nii.gz"]
