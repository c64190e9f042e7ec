"""Nothing is lost by a slip of the output path, and nothing is silently wrong from a partial copy: the real command
line refuses (exit 2, one line) an output path that is one of the command's inputs, however it is spelled, and a
CT whose ``.nii.gz`` holds half its bytes; every input's sha256 is the same after as before."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from features.tiny_backbone import make_backbone
from helpers import data_path

from DiffusionSegLib.cli import main

SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"
SMALL_LABELS = "labeled/totalseg_example_sm_seg117_pseudo.nii.gz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A folder (the current one) with a writable copy of a CT, its label map and a tiny backbone."""
    shutil.copyfile(data_path(SMALL_CT), tmp_path / "ct.nii.gz")
    shutil.copyfile(data_path(SMALL_LABELS), tmp_path / "labels.nii.gz")
    make_backbone(tmp_path / "backbone.safetensors")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(argv: list[str], protected: list[Path], capsys, expected: str) -> None:
    before = {path: _sha256(path) for path in protected}
    listing = sorted(p.name for p in Path.cwd().iterdir())

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert {path: _sha256(path) for path in protected} == before  # every input byte for byte as it was
    assert sorted(p.name for p in Path.cwd().iterdir()) == listing  # nothing written


SPELLINGS = {
    "the same name": lambda folder: "ct.nii.gz",
    "./name": lambda folder: "./ct.nii.gz",
    "through ..": lambda folder: "sub/../ct.nii.gz",
    "absolute path": lambda folder: str(folder / "ct.nii.gz"),
    "symbolic link": lambda folder: (os.symlink("ct.nii.gz", "link.nii.gz"), "link.nii.gz")[1],
    "symbolic link to the folder": lambda folder: (os.symlink(".", "here"), "here/ct.nii.gz")[1],
    "hard link": lambda folder: (os.link("ct.nii.gz", "hard.nii.gz"), "hard.nii.gz")[1],
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_segment_refuses_to_write_over_its_ct_however_spelled(spelling, work, capsys):
    output = SPELLINGS[spelling](work)
    _refused(["segment", "ct.nii.gz", "-o", output], [work / "ct.nii.gz"], capsys, "it is the input")


def test_case_is_seen_through_on_a_case_insensitive_disk(work, capsys):
    if not Path("CT.NII.GZ").exists():
        pytest.skip("this disk is case-sensitive: CT.nii.gz would be another file")
    _refused(["segment", "ct.nii.gz", "-o", "CT.nii.gz"], [work / "ct.nii.gz"], capsys, "it is the input")


COMMANDS = {
    "coords over its CT": (["coords", "ct.nii.gz", "-o", "ct.nii.gz"], "it is the input"),
    "preprocess over its CT": (["preprocess", "ct.nii.gz", "-o", "sub/../ct.nii.gz"], "it is the input"),
    "preprocess labels over its label map": (["preprocess", "ct.nii.gz", "-o", "w.nii.gz", "--labels", "labels.nii.gz",
                                              "--labels-output", "labels.nii.gz"], "it is the input"),
    "segment uncertainty over its segmentation": (["segment", "ct.nii.gz", "-o", "s.nii.gz", "--uncertainty",
                                                   "./s.nii.gz"], "the segmentation goes to that same file"),
    "train-probe over its backbone": (["train-probe", "--backbone", "backbone.safetensors", "--case", "ct.nii.gz",
                                       "labels.nii.gz", "--organs", "liver=5", "-o", "./backbone.safetensors"],
                                      "it is the input"),
    "finetune's backbone beside the model over its backbone": (
        ["finetune", "--backbone", "m.backbone.safetensors", "--case", "ct.nii.gz", "labels.nii.gz", "--organs",
         "liver=5", "-o", "m.safetensors"], "it is the input"),
    "demo over its input": (["demo", "--input", "sub/segmentation.nii.gz", "-o", "sub"], "it is the input"),
    "bpr-train export over a training CT": (["bpr-train", "ct.nii.gz", "--run-dir", "runs", "-o", "ct.nii.gz"],
                                            "it is the input"),
}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_command_writes_over_one_of_its_inputs(command, work, capsys):
    argv, expected = COMMANDS[command]
    if "m.backbone.safetensors" in argv:
        shutil.copyfile(work / "backbone.safetensors", work / "m.backbone.safetensors")
    if "sub/segmentation.nii.gz" in argv:
        shutil.copyfile(work / "ct.nii.gz", work / "sub" / "segmentation.nii.gz")
    protected = sorted(p for p in work.rglob("*") if p.is_file())
    _refused(argv, protected, capsys, expected)


def test_half_truncated_nii_gz_is_refused_and_kept(work, capsys):
    """The issue's case: a CT whose ``.nii.gz`` was cut to half its bytes used to be segmented (exit 0)."""
    data = (work / "ct.nii.gz").read_bytes()
    (work / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    _refused(["segment", "trunc.nii.gz", "-o", "seg.nii.gz"], [work / "trunc.nii.gz"], capsys,
             "'trunc.nii.gz' is damaged: its gzip stream ends early (the file is truncated)")  # fmt: skip
