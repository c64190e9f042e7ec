"""The train-probe and segment commands, end to end on a real scan with a tiny backbone."""

from __future__ import annotations

import SimpleITK as sitk
from features.tiny_backbone import make_backbone
from helpers import data_path

from DiffusionSegLib.cli import main
from DiffusionSegLib.probe import read_probe_config, read_seg_nrrd


def ircadb_case() -> tuple[str, str, str]:
    """The 3D-IRCADb 1.01 CT, its organ masks and their legend (paths)."""
    return tuple(str(data_path(f"labeled/ircadb1.01_{name}")) for name in ("ct.nii.gz", "organs.nii.gz", "legend.json"))


def test_train_probe_then_segment(tmp_path, capsys):
    backbone = make_backbone(tmp_path / "backbone.safetensors")
    ct, organs, legend = ircadb_case()
    probe = tmp_path / "probe.safetensors"
    status = main(["train-probe", "--backbone", str(backbone.path), "--case", ct, organs, "--labels-legend", legend,
                   "--organs", "liver,spleen", "--head", "linear", "--steps", "10", "--patch", "16", "32", "32",
                   "--patches-per-volume", "4", "--timestep", "2", "--noise-seed", "7", "-o", str(probe)])  # fmt: skip
    assert status == 0
    config = read_probe_config(probe)
    assert [item["name"] for item in config["labels"]] == ["liver", "spleen"]
    assert config["probe"]["timestep"] == 2 and config["probe"]["noise_seed"] == 7
    assert config["backbone"]["sha256"] == backbone.sha256

    out = tmp_path / "seg.seg.nrrd"
    uncertainty = tmp_path / "u.nii.gz"
    status = main(["segment", ct, "--probe", str(probe), "-o", str(out), "--uncertainty", str(uncertainty),
                   "--largest-component", "--device", "cpu"])  # fmt: skip
    assert status == 0
    image, segments = read_seg_nrrd(out)
    reference = sitk.ReadImage(ct)
    assert image.GetSize() == reference.GetSize() and image.GetOrigin() == reference.GetOrigin()
    assert [s["name"] for s in segments] == ["liver", "spleen"]
    assert [s["label_value"] for s in segments] == [6, 1]
    assert sitk.ReadImage(str(uncertainty)).GetSize() == reference.GetSize()

    other = make_backbone(tmp_path / "other.safetensors", seed=3)
    status = main(["segment", ct, "--probe", str(probe), "--backbone", str(other.path), "-o", str(tmp_path / "x.nii.gz")])
    assert status == 2
    assert "backbone" in capsys.readouterr().err


def test_unknown_organ_is_one_line_error(tmp_path, capsys):
    backbone = make_backbone(tmp_path / "backbone.safetensors")
    ct = str(data_path("labeled/ircadb1.01_ct.nii.gz"))
    organs = str(data_path("labeled/ircadb1.01_organs.nii.gz"))
    status = main(["train-probe", "--backbone", str(backbone.path), "--case", ct, organs, "--organs", "liver",
                   "-o", str(tmp_path / "p.safetensors")])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert "liver" in err and len(err.strip().splitlines()) == 1


def test_quick_recipe_trains_the_context_head_reading_the_input_and_options_override_it(tmp_path):
    backbone = make_backbone(tmp_path / "backbone.safetensors")
    ct, organs, legend = ircadb_case()
    probe = tmp_path / "quick.safetensors"
    status = main(["train-probe", "--quick", "--steps", "10", "--backbone", str(backbone.path), "--case", ct, organs,
                   "--labels-legend", legend, "--organs", "liver", "--patch", "16", "32", "32",
                   "--patches-per-volume", "4", "-o", str(probe)])  # fmt: skip
    assert status == 0
    recorded = read_probe_config(probe)["probe"]
    assert (recorded["head"], recorded["reads_input"], recorded["hidden_channels"]) == ("context", True, 32)
    assert (recorded["patience"], recorded["steps"]) == (8, 10)  # the recipe's early stopping, the given steps
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", ct, "--probe", str(probe), "-o", str(out), "--device", "cpu"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(ct).GetSize()


def test_one_patch_per_volume_trains(tmp_path):
    """``--patches-per-volume 1`` with one case: the held-out share of one patch used to take the only patch,
    leaving nothing to train on (torch.cat of an empty list); the patch now trains and validates."""
    backbone = make_backbone(tmp_path / "backbone.safetensors")
    ct, organs, legend = ircadb_case()
    probe = tmp_path / "probe.safetensors"
    status = main(["train-probe", "--backbone", str(backbone.path), "--case", ct, organs, "--labels-legend", legend,
                   "--organs", "liver", "--head", "linear", "--steps", "2", "--patch", "16", "32", "32",
                   "--patches-per-volume", "1", "-o", str(probe)])  # fmt: skip
    assert status == 0 and probe.is_file()
    assert read_probe_config(probe)["probe"]["patches_per_volume"] == 1
