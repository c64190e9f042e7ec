"""The bad-input suite: each kind of bad or surprising input, through the real command line (segment, coords,
train-probe, info), gets one line on stderr, exit status 2, and leaves the output folder byte-for-byte as it
was (an earlier result at the output path survives). docs/robustness.md lists these rows."""

from __future__ import annotations

import locale
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from features.tiny_backbone import make_backbone
from helpers import data_path

from DiffusionSegLib.cli import main
from DiffusionSegLib.resources import default_backbone_path, default_probe_path

SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"


def _ct() -> sitk.Image:
    return sitk.ReadImage(str(data_path(SMALL_CT)))


def _save(image: sitk.Image, path: Path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def _with_voxel(value: float):
    def make(folder: Path) -> str:
        image = sitk.Cast(_ct(), sitk.sitkFloat32)
        array = sitk.GetArrayFromImage(image)
        array[10, 50, 60] = value
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        return _save(out, folder / "ct.nii.gz")

    return make


def _slab(slices: int):
    def make(folder: Path) -> str:
        return _save(_ct()[:, :, 10 : 10 + slices], folder / "slab.nii.gz")

    return make


def _noise(folder: Path) -> str:
    noise = np.random.default_rng(0).normal(0.0, 300.0, (40, 64, 64)).astype(np.float32)
    return _save(sitk.GetImageFromArray(noise), folder / "noise.nii.gz")


def _unsigned_ct_numbers(folder: Path) -> str:
    image = _ct()
    raw = sitk.Cast(sitk.Clamp(image, lowerBound=-1024) + 1024, sitk.sitkUInt16)  # stored values, no rescale
    return _save(raw, folder / "raw.nrrd")


def _array(shape, value=None):
    def make(folder: Path) -> str:
        array = np.full(shape, -1000, np.int16) if value is None else np.full(shape, value, np.int16)
        if value is None:
            array[..., 4:12, 4:12] = 40
        return _save(sitk.GetImageFromArray(array, isVector=False), folder / "a.nii.gz")

    return make


def _zero_spacing(folder: Path) -> str:
    import struct

    path = Path(_array((8, 16, 16))(folder)).with_suffix("")  # uncompressed .nii
    sitk.WriteImage(sitk.ReadImage(str(folder / "a.nii.gz")), str(path))
    header = bytearray(path.read_bytes())
    header[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    path.write_bytes(bytes(header))
    return str(path)


def _huge_spacing(folder: Path) -> str:
    image = _ct()
    image.SetSpacing((1.5 * 2**32, 1.5, 3.0))
    return _save(image, folder / "huge.nrrd")


def _dicom_two_series(folder: Path) -> str:
    series = folder / "dicom"
    shutil.copytree(data_path("raw/totalseg_example_ct_dicom"), series)
    slab = sitk.Cast(_ct()[:, :, :3], sitk.sitkInt16)
    saved_locale = locale.setlocale(locale.LC_ALL)  # ITK's DICOM writer leaves the C locale set: restore it
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.99.1"
    for i in range(slab.GetDepth()):
        piece = slab[:, :, i]
        origin = slab.TransformIndexToPhysicalPoint((0, 0, i))
        for key, value in {"0008|0060": "CT", "0020|000e": uid, "0020|000d": f"{uid}.0", "0020|0013": str(i + 1),
                           "0008|0018": f"{uid}.{i + 2}", "0020|0032": "\\".join(map(str, origin)),
                           "0020|0037": "1\\0\\0\\0\\1\\0"}.items():  # fmt: skip
            piece.SetMetaData(key, value)
        writer.SetFileName(str(series / f"other{i}.dcm"))
        writer.Execute(piece)
    locale.setlocale(locale.LC_ALL, saved_locale)
    return str(series)


def _dicom_missing_slice(folder: Path) -> str:
    series = folder / "dicom"
    shutil.copytree(data_path("raw/totalseg_example_ct_dicom"), series)
    sorted(series.iterdir())[9].unlink()
    return str(series)


def _truncated_probe(folder: Path) -> str:
    data = default_probe_path().read_bytes()
    (folder / "probe.safetensors").write_bytes(data[: len(data) // 2])
    return str(folder / "probe.safetensors")


def _labels(kind: str):
    """An IRCADb CT with its organ map made bad in one way; returns the train-probe arguments."""

    def make(folder: Path) -> list[str]:
        ct = data_path("labeled/ircadb1.01_ct.nii.gz")
        labels = sitk.ReadImage(str(data_path("labeled/ircadb1.01_organs.nii.gz")))
        if kind == "grid":
            labels.SetSpacing((2.0, 2.0, 2.0))
        elif kind == "fractional":
            labels = sitk.Cast(labels, sitk.sitkFloat32) * 0.5
        elif kind == "foreign":
            array = sitk.GetArrayFromImage(labels)
            array[array == 6] = 77
            foreign = sitk.GetImageFromArray(array)
            foreign.CopyInformation(labels)
            labels = foreign
        path = _save(labels, folder / "labels.nii.gz")
        return ["--case", str(ct), path, "--labels-legend", str(data_path("labeled/ircadb1.01_legend.json"))]

    return make


def _segment(make_input, output: str = "seg.nii.gz", extra=()):
    return lambda folder, out: ["segment", make_input(folder), "-o", str(out / output), *extra]


def _coords(make_input, output: str = "coords.nii.gz"):
    return lambda folder, out: ["coords", make_input(folder), "-o", str(out / output)]


def _train_probe(make_cases):
    return lambda folder, out: ["train-probe", "--backbone", str(default_backbone_path()), *make_cases(folder),
                                "-o", str(out / "probe.safetensors"), "--organs", "liver", "--steps", "2"]  # fmt: skip


def _real_ct(folder: Path) -> str:
    return str(data_path(SMALL_CT))


# row: (command line builder (input folder, output folder) -> argv, what the one line says)
SUITE = {
    "NaN voxel in a float NIfTI (ITK reads it as 0)": (_segment(_with_voxel(np.nan)), "1 NaN or infinite voxels"),
    "+inf voxel in a float NIfTI": (_coords(_with_voxel(np.inf)), "1 NaN or infinite voxels"),
    "Gaussian noise with CT-like values": (_segment(_noise), "this looks like noise"),
    "MR volume": (_segment(lambda f: str(data_path("raw/totalseg_example_mr_sm.nii.gz"))), "does not look like CT"),
    "unsigned CT numbers without HU rescale": (_segment(_unsigned_ct_numbers), "without rescale to HU"),
    "2D image": (_segment(_array((16, 16))), "is 2D"),
    "4D image": (_coords(_array((3, 8, 16, 16))), "is 4D"),
    "constant volume": (_segment(_array((8, 8, 8), 0)), "constant"),
    "CT of 3 slices (9 mm)": (_segment(_slab(3)), "covers only 9 mm along its z axis (3 voxels of 3 mm)"),
    "voxel size beyond any scanner (the x size x 2^32)": (_coords(_huge_spacing), "expected at most 3000 mm"),
    "empty file": (_segment(lambda f: str((f / "e.nii.gz").touch() or f / "e.nii.gz")), "cannot read"),
    "zero voxel size in the NIfTI header": (_coords(_zero_spacing), "expected positive sizes"),
    "input file missing": (_segment(lambda f: str(f / "nope.nii.gz")), "not found"),
    "unknown input format": (_segment(lambda f: str((f / "x.txt").write_text("hi") and f / "x.txt")), "unknown format"),
    "DICOM folder with two series": (_segment(_dicom_two_series), "holds 2 DICOM series"),
    "DICOM series with a missing slice": (_segment(_dicom_missing_slice), "a slice is missing"),
    "truncated probe file": (lambda f, o: ["segment", _real_ct(f), "--probe", _truncated_probe(f), "-o",
                                           str(o / "seg.nii.gz")], "the file is truncated"),  # fmt: skip
    "foreign weights file as the probe (a BPR)": (lambda f, o: ["segment", _real_ct(f), "--probe",
                                                                str(Path(default_probe_path()).parent / "bpr_default.safetensors"),
                                                                "-o", str(o / "seg.nii.gz")], "holds a bpr model"),  # fmt: skip
    "probe of another backbone": (lambda f, o: ["segment", _real_ct(f), "--backbone",
                                                str(make_backbone(f / "other.safetensors").path), "-o",
                                                str(o / "seg.nii.gz")], "was trained on backbone"),  # fmt: skip
    "output folder missing": (lambda f, o: ["segment", _real_ct(f), "-o", str(o / "no" / "seg.nii.gz")],
                              "does not exist"),  # fmt: skip
    "output with an unknown suffix": (_segment(_real_ct, "seg.png"), "expected a name ending in"),
    "output path is a folder": (lambda f, o: ["coords", _real_ct(f), "-o", str((o / "x.nii.gz").mkdir() or o / "x.nii.gz")],
                                "it is a folder"),  # fmt: skip
    "label map on another grid": (_train_probe(_labels("grid")), "grid differs from its CT"),
    "label map with fractional ids": (_train_probe(_labels("fractional")), "fractional values"),
    "label map with ids its legend does not name": (_train_probe(_labels("foreign")), "legend does not name"),
}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("row", list(SUITE))
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(row, tmp_path, capsys):
    make_argv, expected = SUITE[row]
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    for name in ("seg.nii.gz", "coords.nii.gz", "probe.safetensors"):  # an earlier result at each output path
        (out / name).write_bytes(f"earlier {name}".encode())
    argv = make_argv(inputs, out)
    before = _snapshot(out)

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _snapshot(out) == before  # nothing written, nothing left behind, the earlier files untouched


def test_scan_shorter_than_one_window_gets_a_warning_saying_the_window(tmp_path):
    from DiffusionSegLib.commands.segment import short_scan_note
    from DiffusionSegLib.probe import ProbeConfig

    backbone = make_backbone(tmp_path / "backbone.safetensors")  # 32-slice windows at 4 mm: 128 mm
    features = ProbeConfig().feature_config()
    note = short_scan_note(_ct()[:, :, :12], backbone, features)  # 36 mm
    assert note is not None and "covers 36 mm" in note and "(32 slices of 4 mm = 128 mm)" in note
    assert short_scan_note(sitk.Tile([_ct()] * 2, (1, 1, 2)), backbone, features) is None  # 180 mm
