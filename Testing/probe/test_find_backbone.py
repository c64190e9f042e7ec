"""Which backbone a probe file runs on: the recorded path, else the shipped default with the same hash."""

from __future__ import annotations

import shutil

import pytest
from features.tiny_backbone import make_backbone

from DiffusionSegLib.data.labels import organ_label
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.probe import ProbeConfig, TrainedProbe, backbone_record, build_head, find_probe_backbone, save_probe
from DiffusionSegLib.resources import DEFAULT_BACKBONE_NAME


def _probe_file(backbone, path):
    head = build_head("linear", backbone.feature_channels, 2)
    return save_probe(path, TrainedProbe(head, ProbeConfig(), [organ_label(6, "liver")], backbone_record(backbone)))


def test_recorded_path_then_shipped_default_then_a_clear_error(tmp_path, monkeypatch):
    backbone = make_backbone(tmp_path / "train" / "backbone.safetensors")
    probe = _probe_file(backbone, tmp_path / "probe.safetensors")
    resources = tmp_path / "Resources"
    (resources / "Models").mkdir(parents=True)
    monkeypatch.setenv("DIFFUSIONSEG_RESOURCES", str(resources))
    assert find_probe_backbone(probe) == backbone.path  # where it was trained

    shipped = resources / "Models" / DEFAULT_BACKBONE_NAME
    shutil.move(backbone.path, shipped)  # as installed: the training folder is gone, the weights are shipped
    assert find_probe_backbone(probe) == shipped

    make_backbone(shipped, seed=1)  # another default backbone: the hash no longer matches
    with pytest.raises(UserInputError, match="--backbone"):
        find_probe_backbone(probe)
