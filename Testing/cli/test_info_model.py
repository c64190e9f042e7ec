"""``diffusionseg info MODEL.safetensors`` says what a shipped model file is: its kind, organs, training scans
and settings, from the file's metadata alone."""

from __future__ import annotations

import json

import pytest

from DiffusionSegLib.cli import main
from DiffusionSegLib.data.labels import BTCV_LABELS
from DiffusionSegLib.resources import resources_dir

MODELS = resources_dir() / "Models"


def _info(capsys, name: str) -> tuple[dict, str]:
    path = str(MODELS / f"{name}.safetensors")
    assert main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["info", path]) == 0
    return info, capsys.readouterr().out


def test_info_describes_the_shipped_fine_tuned_model_and_probe(capsys):
    btcv = [o.name for o in BTCV_LABELS]
    info, text = _info(capsys, "finetune_btcv13_default")
    assert info["kind"] == "fine-tuned" and info["organs"] == btcv
    assert len(info["training_scans"]) == 20 and all(s.startswith("btcv_") for s in info["training_scans"])
    assert info["settings"]["init"] == "pretrained" and info["settings"]["spacing_mm"] == [3.0, 3.0, 3.0]
    assert info["settings"]["pseudo_background_margin_mm"] == 0.0 and not info["unlabeled_scans"]
    assert info["backbone"]["file"] == "finetune_btcv13_default.backbone.safetensors"
    assert "fine-tuned model" in text and "13: spleen, right kidney" in text and "20 scan(s): btcv_0001" in text
    info, text = _info(capsys, "probe_btcv13_frozen")
    assert info["kind"] == "probe" and info["organs"] == btcv and info["settings"]["head"] == "nonlinear"
    assert info["training_scans"] is None and "not recorded" in text


def test_info_describes_the_shipped_backbones_and_bpr(capsys):
    info, text = _info(capsys, "backbone_default")
    assert info["kind"] == "backbone" and info["settings"]["method"] == "diffusion" and info["settings"]["use_bpr"]
    assert info["settings"]["num_timesteps"] == 10 and "pretrained backbone" in text and not info["organs"]
    info, text = _info(capsys, "finetune_btcv13_default.backbone")
    assert info["kind"] == "backbone" and "fine-tuned backbone" in text and len(info["training_scans"]) == 20
    info, text = _info(capsys, "bpr_default")
    assert info["kind"] == "bpr" and info["settings"]["design"] == "slice" and len(info["training_scans"]) == 33
    assert "Body Part Regressor" in text


def test_info_refuses_a_safetensors_file_that_is_no_diffusionseg_model(tmp_path, capsys):
    pytest.importorskip("safetensors")
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert main(["info", str(path)]) == 2
    assert "not a DiffusionSeg weights file" in capsys.readouterr().err
