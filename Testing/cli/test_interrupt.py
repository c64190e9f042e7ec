"""Ctrl-C or SIGTERM never leaves a partial output file: ``segment`` and ``coords`` stopped while their output is
being written leave the folder as it was (an earlier result survives byte for byte); ``train-probe`` and
``finetune`` stopped mid-training write the best model so far (marked stopped early) and keep their snapshot.

Each command runs in its own process (the real command line) with a hook that sends the process SIGTERM at a
chosen moment: right after the output's bytes reach disk under their temporary name, or after the Nth optimiser
step. Python's default SIGTERM action would kill the process there and leave the temporary file behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import data_path

from DiffusionSegLib.checkpoint import read_weights_header

SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"
DRIVER = """
import os, signal, sys
import SimpleITK as sitk
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from DiffusionSegLib.cli import main

moment, argv = sys.argv[1], sys.argv[2:]
def terminate():
    os.kill(os.getpid(), signal.SIGTERM)
if moment == "write":  # the bytes are on disk under the temporary name; the rename has not happened yet
    write_image = sitk.WriteImage
    def write_then_terminate(*args, **kwargs):
        write_image(*args, **kwargs)
        terminate()
    sitk.WriteImage = write_then_terminate
else:  # after the Nth optimiser step
    steps = [0]
    def after_step(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == int(moment):
            terminate()
    register_optimizer_step_post_hook(after_step)
sys.exit(main(argv))
"""


def _run(tmp_path: Path, moment: str, argv: list[str]) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run([sys.executable, str(driver), moment, *argv], capture_output=True, text=True, timeout=600,
                          check=False)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}  # hidden temporary files included


@pytest.mark.parametrize("command", ["segment", "coords"])
def test_sigterm_while_writing_leaves_the_earlier_result_untouched(command, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "result.nii.gz"
    earlier.write_bytes(b"an earlier result the user kept")
    before = _folder_bytes(out)

    done = _run(tmp_path, "write", [command, str(data_path(SMALL_CT)), "-o", str(earlier)])

    assert done.returncode == 130, done.stderr
    assert f"diffusionseg {command}: interrupted" in done.stderr
    assert _folder_bytes(out) == before  # no temporary file left, the earlier result unchanged


def test_sigterm_while_a_batch_writes_leaves_no_partial_file(tmp_path):
    """``segment FOLDER -o OUT/ --overwrite`` stopped while writing its first scan's output: the earlier output
    survives byte for byte, nothing else is in the folder."""
    import shutil

    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    out.mkdir()
    for name in ("a", "b"):
        shutil.copyfile(data_path(SMALL_CT), scans / f"{name}.nii.gz")
    (out / "a.seg.nrrd").write_bytes(b"an earlier result the user kept")
    before = _folder_bytes(out)

    done = _run(tmp_path, "write", ["segment", str(scans), "-o", str(out), "--overwrite"])

    assert done.returncode == 130, done.stderr
    assert _folder_bytes(out) == before


def _ircadb_case() -> list[str]:
    return ["--case", str(data_path("labeled/ircadb1.01_ct.nii.gz")), str(data_path("labeled/ircadb1.01_organs.nii.gz")),
            "--labels-legend", str(data_path("labeled/ircadb1.01_legend.json")), "--organs", "liver"]  # fmt: skip


def test_sigterm_during_probe_training_writes_the_best_head_so_far(backbone, tmp_path):
    output = tmp_path / "probe.safetensors"

    done = _run(tmp_path, "3", ["train-probe", "--backbone", str(backbone.path), *_ircadb_case(), "--steps", "200",
                                "--patches-per-volume", "4", "-o", str(output)])  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "stopped early" in done.stderr
    assert read_weights_header(output, "probe")[1]["extra"]["cancelled"] is True


def test_sigterm_during_finetuning_writes_the_model_and_keeps_the_snapshot(backbone, tmp_path):
    output, run_dir = tmp_path / "model.safetensors", tmp_path / "run"

    done = _run(tmp_path, "3", ["finetune", "--backbone", str(backbone.path), *_ircadb_case(), "--minutes", "0",
                                "--steps", "200", "--patch", "32", "32", "32", "--batch-size", "1",
                                "--run-dir", str(run_dir), "-o", str(output)])  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "stopped early" in done.stderr
    assert output.is_file() and output.with_name("model.backbone.safetensors").is_file()
    assert (run_dir / "last.pt").is_file()
    assert read_weights_header(output, "probe")[1]["extra"]["cancelled"] is True
