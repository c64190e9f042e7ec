"""Fuzz suite: damaged copies of real files through the real command line (``segment``).

From real files of ``../shared/data`` (the small TotalSegmentator CT as ``.nii.gz``, ``.nii``, gzip NRRD and
MHA, one slice of the DICOM series) and a tiny probe and backbone (``.safetensors``), each case writes a damaged
copy: truncated at nine points (inside the header, its middle, one byte before its end, just after it, one data
byte, a quarter and half of the file, most of the data, one byte short), one byte flipped in the header and in
the data, a zeroed block in the data, and for the ``.nii.gz`` a second gzip member cut mid-stream. Each case
states how it must end:

* ``refused``: exit status 2, one line on stderr naming the damaged file, no traceback, the output folder as it
  was (an earlier result at the output path byte for byte intact);
* ``segmented``: the damage leaves a valid file (a flipped or zeroed voxel, a changed weight): exit 0 and a label
  map on the input grid.

Most cases run in this process (``main(argv)``, stderr captured at the file-descriptor level, so a message that
ITK or GDCM print themselves counts); :func:`test_damaged_file_through_a_real_process` runs a few through a
separate ``python -m DiffusionSegLib`` process. docs/robustness.md lists the table.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import SimpleITK as sitk
from features.tiny_backbone import make_backbone
from helpers import REPO, data_path

from DiffusionSegLib.cli import main

SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"
SMALL_LABELS = "labeled/totalseg_example_sm_seg117_pseudo.nii.gz"
DICOM = "raw/totalseg_example_ct_dicom"
EARLIER = b"an earlier result the user kept"


# -- where each format's header ends ------------------------------------------------------------------------------


def _header_length(kind: str, data: bytes) -> int:
    """Bytes before the voxel data (the compressed stream's own header for gzip files)."""
    if kind == "nii.gz":
        return 10  # the gzip member header (ITK stores no file name)
    if kind == "nii":
        return 352  # NIfTI-1: 348 bytes, the 4-byte extension flag, then the voxels
    if kind == "nrrd":
        return data.index(b"\n\n") + 2
    if kind == "mha":
        marker = b"ElementDataFile = LOCAL\n"
        return data.index(marker) + len(marker)
    if kind == "dicom":
        return data.rindex(b"\xe0\x7f\x10\x00")  # the Pixel Data element (7FE0,0010)
    return 8 + int.from_bytes(data[:8], "little")  # safetensors: 8-byte length, JSON header, tensors


# -- damages: (file bytes, header length) -> damaged bytes ----------------------------------------------------------


def _cut(where: Callable[[int, int], int]) -> Callable[[bytes, int], bytes]:
    return lambda data, header: data[: where(len(data), header)]


def _flip(where: Callable[[bytes, int], int], bit: int = 0x10) -> Callable[[bytes, int], bytes]:
    def damage(data: bytes, header: int) -> bytes:
        position = where(data, header)
        return data[:position] + bytes([data[position] ^ bit]) + data[position + 1 :]

    return damage


def _zero_block(data: bytes, header: int) -> bytes:
    start = header + (len(data) - header) // 2
    size = min(4096, (len(data) - header) // 4)
    return data[:start] + bytes(size) + data[start + size :]


def _second_member_cut(data: bytes, header: int) -> bytes:
    """The file as two gzip members (as ``cat a.gz b.gz`` or a parallel compressor writes), the second cut short."""
    raw = gzip.decompress(data)
    half = len(raw) // 2
    second = gzip.compress(raw[half:], mtime=0)
    return gzip.compress(raw[:half], mtime=0) + second[: len(second) // 2]


TRUNCATIONS = {
    "cut inside the header": _cut(lambda n, h: min(5, h // 2)),
    "cut in the middle of the header": _cut(lambda n, h: h // 2),
    "cut one byte before the header ends": _cut(lambda n, h: h - 1),
    "cut just after the header": _cut(lambda n, h: h),
    "cut one data byte after the header": _cut(lambda n, h: h + 1),
    "cut at a quarter of the data": _cut(lambda n, h: h + (n - h) // 4),
    "cut to half the file": _cut(lambda n, h: n // 2),
    "cut at 90 % of the data": _cut(lambda n, h: h + 9 * (n - h) // 10),
    "cut one byte short": _cut(lambda n, h: n - 1),
}
DATA_FLIP = _flip(lambda data, h: h + (len(data) - h) // 2)


@dataclass(frozen=True)
class Case:
    kind: str
    damage: str
    make: Callable[[bytes, int], bytes]
    expected: str  # "refused" or "segmented"


def _header_flip(kind: str, what: str, find: Callable[[bytes], int], expected: str = "refused") -> Case:
    return Case(kind, f"header byte flipped ({what})", _flip(lambda data, h: find(data)), expected)


HEADER_FLIPS = [
    _header_flip("nii.gz", "gzip method byte", lambda data: 2),
    _header_flip("nii.gz", "CRC of the stream", lambda data: len(data) - 6),
    _header_flip("nii", "dim[1], the x size", lambda data: 42),
    _header_flip("nii", "datatype", lambda data: 70),
    _header_flip("nii", "pixdim[1] exponent: x voxel size x 2^32", lambda data: 83),
    _header_flip("nii", "qoffset_x low byte: origin moved by < 0.01 mm", lambda data: 268, "segmented"),
    _header_flip("nrrd", "a digit of 'sizes'", lambda data: data.index(b"sizes: ") + 8),
    _header_flip("nrrd", "the 'encoding' field name", lambda data: data.index(b"encoding")),
    _header_flip("mha", "a digit of 'DimSize'", lambda data: data.index(b"DimSize = ") + 11),
    _header_flip("mha", "'ElementType'", lambda data: data.index(b"MET_SHORT") + 4),
    _header_flip("dicom", "the 'DICM' marker", lambda data: 129),
    _header_flip("dicom", "the transfer syntax UID", lambda data: data.index(b"1.2.840.10008.1.2.4") + 18),
    _header_flip("probe", "the JSON header's first byte", lambda data: 8),
    _header_flip("probe", "a tensor offset digit", lambda data: data.index(b'"data_offsets":[') + 16),
    _header_flip("backbone", "the header length", lambda data: 2),
    _header_flip("backbone", "a tensor shape digit", lambda data: data.index(b'"shape":[') + 9),
]

# what a damage to the data leaves: gzip streams (CRC) and backbones (their hash is in the probe) are refused;
# raw voxels, JPEG 2000 frames of the DICOM slices (no checksum) and probe weights stay a valid file
DATA_OUTCOME = {"nii.gz": "refused", "nii": "segmented", "nrrd": "refused", "mha": "segmented", "dicom": "segmented",
                "probe": "segmented", "backbone": "refused"}  # fmt: skip
KINDS = list(DATA_OUTCOME)

CASES = [Case(kind, damage, make, "refused") for kind in KINDS for damage, make in TRUNCATIONS.items()]
CASES += HEADER_FLIPS
CASES += [Case(kind, "data byte flipped", DATA_FLIP, DATA_OUTCOME[kind]) for kind in KINDS]
CASES += [Case(kind, "4 KiB of data zeroed", _zero_block, DATA_OUTCOME[kind]) for kind in KINDS]
CASES += [Case("nii.gz", "second gzip member cut mid-stream", _second_member_cut, "refused")]


# -- the intact files ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    files: dict[str, Path]  # kind -> intact file (for "dicom": the slice that gets damaged)
    dicom: Path  # the intact series folder
    probe: Path
    backbone: Path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    folder = tmp_path_factory.mktemp("intact")
    backbone = make_backbone(folder / "backbone.safetensors").path
    probe = folder / "probe.safetensors"
    assert main(["train-probe", "--backbone", str(backbone), "--case", str(data_path(SMALL_CT)),
                 str(data_path(SMALL_LABELS)), "--organs", "liver=5", "--head", "linear", "--steps", "1", "--patch",
                 "16", "32", "32", "--patches-per-volume", "4", "--device", "cpu", "-o", str(probe)]) == 0  # fmt: skip
    ct = sitk.ReadImage(str(data_path(SMALL_CT)))
    files = {"nii.gz": folder / "ct.nii.gz", "nii": folder / "ct.nii", "nrrd": folder / "ct.nrrd",
             "mha": folder / "ct.mha", "probe": probe, "backbone": backbone}  # fmt: skip
    shutil.copyfile(data_path(SMALL_CT), files["nii.gz"])
    sitk.WriteImage(ct, str(files["nii"]))
    sitk.WriteImage(ct, str(files["nrrd"]), useCompression=True)
    sitk.WriteImage(ct, str(files["mha"]))
    dicom = folder / "dicom"
    shutil.copytree(data_path(DICOM), dicom)
    files["dicom"] = max(dicom.iterdir())  # an end slice: no gap in the slice positions would show it missing
    return Sources(files, dicom, probe, backbone)


def _damaged_inputs(case: Case, sources: Sources, folder: Path) -> tuple[list[str], Path]:
    """``segment``'s arguments (without ``-o``) on the damaged copy, and the damaged file."""
    intact = sources.files[case.kind]
    data = intact.read_bytes()
    damaged = case.make(data, _header_length(case.kind, data))
    assert damaged != data, f"{case.damage} left {intact.name} unchanged"
    ct, probe, backbone = str(sources.files["nii"]), str(sources.probe), str(sources.backbone)
    if case.kind == "dicom":
        series = folder / "dicom"
        shutil.copytree(sources.dicom, series)
        target = series / intact.name
        ct = str(series)
    else:
        target = folder / f"damaged_{intact.name}"
        if case.kind == "probe":
            probe = str(target)
        elif case.kind == "backbone":
            backbone = str(target)
        else:
            ct = str(target)
    target.write_bytes(damaged)
    return [ct, "--probe", probe, "--backbone", backbone, "--device", "cpu"], target


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _check_outcome(case: Case, status: int, err: str, damaged: Path, out: Path, before: dict[str, bytes]) -> None:
    assert "Traceback" not in err, err
    if case.expected == "refused":
        lines = err.strip().splitlines()
        assert status == 2, f"expected a refusal, got status {status}: {err[-600:]}"
        assert len(lines) == 1, err
        assert damaged.name in lines[0], f"the line does not name {damaged.name}: {lines[0]}"
        assert _folder_bytes(out) == before  # nothing written, nothing left behind, the earlier result intact
    else:
        assert status == 0, f"expected a segmentation, got status {status}: {err[-600:]}"
        written = sitk.ReadImage(str(out / "seg.nii.gz"))
        assert written.GetSize() == ((512, 512, 20) if case.kind == "dicom" else (122, 101, 30))  # the input grid


def _id(case: Case) -> str:
    return f"{case.kind}: {case.damage}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_damaged_file_is_refused_or_segmented(case, sources, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.nii.gz").write_bytes(EARLIER)
    argv, damaged = _damaged_inputs(case, sources, tmp_path)
    before = _folder_bytes(out)
    capfd.readouterr()

    status = main(["segment", *argv, "-o", str(out / "seg.nii.gz")])

    _check_outcome(case, status, capfd.readouterr().err, damaged, out, before)


def test_the_suite_covers_every_format_and_kind_of_damage():
    assert len(CASES) >= 60
    for kind in KINDS:
        damages = {case.damage for case in CASES if case.kind == kind}
        assert len(damages & set(TRUNCATIONS)) >= 8 and "data byte flipped" in damages, kind
        assert any(d.startswith("header byte flipped") for d in damages), kind


THROUGH_A_PROCESS = ["nii.gz: cut to half the file", "dicom: cut at a quarter of the data",
                     "probe: cut one byte short", "nii: data byte flipped"]  # fmt: skip


@pytest.mark.parametrize("name", THROUGH_A_PROCESS)
def test_damaged_file_through_a_real_process(name, sources, tmp_path):
    case = next(c for c in CASES if _id(c) == name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.nii.gz").write_bytes(EARLIER)
    argv, damaged = _damaged_inputs(case, sources, tmp_path)
    before = _folder_bytes(out)

    done = subprocess.run([sys.executable, "-m", "DiffusionSegLib", "segment", *argv, "-o", str(out / "seg.nii.gz")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)  # fmt: skip

    # progress and log lines go to stderr too: a refusal has only its one line, a segmentation no traceback
    _check_outcome(case, done.returncode, done.stderr, damaged, out, before)
