"""The spatial-context probe head (3x3x3 decoder blocks): it learns on real patches and its file says what it is."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from features.tiny_backbone import make_backbone
from helpers import dice, liver_rule_dice

from DiffusionSegLib.data.labels import organ_label
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.probe import ProbeConfig, fit_probe, load_probe, read_probe_config, save_probe, segment

LIVER = organ_label(6, "liver")
CONTEXT = {"head": "context", "hidden_channels": 16, "steps": 100, "lr": 3e-2, "patch_size_vox": (16, 32, 32),
           "patches_per_volume": 16, "val_every": 20}  # fmt: skip


@pytest.fixture(scope="module")
def probe(case, backbone):
    return fit_probe([case], [LIVER], backbone, ProbeConfig(**CONTEXT), progress=False)


def _kernel_sizes(head) -> list[int]:
    return sorted({m.kernel_size[0] for m in head.modules() if isinstance(m, torch.nn.Conv3d)})


def test_context_head_has_3x3x3_blocks_and_lowers_its_loss_on_real_patches(case, probe, backbone):
    assert 3 in _kernel_sizes(probe.head)  # the per-voxel heads have none
    assert _kernel_sizes(fit_probe([case], [LIVER], backbone, ProbeConfig(**dict(CONTEXT, head="nonlinear", steps=1)),
                                   progress=False).head) == [1]  # fmt: skip
    first, best = probe.history[0], min(h["val_loss"] for h in probe.history)
    assert best < 0.8 * first["val_loss"] and probe.history[-1]["train_loss"] < 0.8 * first["train_loss"], probe.history
    result = segment(case[0], probe, backbone)
    reference = sitk.GetArrayViewFromImage(case[1]) == LIVER.value
    score = dice(sitk.GetArrayViewFromImage(result.labels) == LIVER.value, reference)
    rule = liver_rule_dice(case[0], reference)
    assert score > rule + 0.1, (score, rule)


def test_context_probe_file_records_its_head_and_refuses_another_backbone(tmp_path, case, probe, backbone):
    path = save_probe(tmp_path / "liver.safetensors", probe)
    assert read_probe_config(path)["probe"]["head"] == "context"
    loaded = load_probe(path, backbone)
    assert loaded.config.head == "context" and 3 in _kernel_sizes(loaded.head)
    window = [torch.randn(1, c, 8 // 2**i, 16 // 2**i, 16 // 2**i) for i, c in enumerate(backbone.feature_channels)]
    with torch.no_grad():
        assert torch.equal(loaded.head(window), probe.head.eval()(window))
    other = make_backbone(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(UserInputError, match="backbone"):
        load_probe(path, other)
    assert np.isfinite(probe.best_val_loss)


def test_a_head_that_reads_the_input_gets_the_image_and_coordinates_and_its_file_says_so(tmp_path, case, backbone):
    cfg = ProbeConfig(**dict(CONTEXT, reads_input=True, steps=40))
    probe = fit_probe([case], [LIVER], backbone, cfg, progress=False)
    extra = 1 + (3 if backbone.use_bpr else 0)
    expected = [backbone.feature_channels[0] + extra, *backbone.feature_channels[1:]]
    assert probe.head.head.feature_channels == expected
    path = save_probe(tmp_path / "liver.safetensors", probe)
    assert read_probe_config(path)["probe"]["reads_input"] is True
    loaded = load_probe(path, backbone)
    window = [torch.randn(1, c, 8 // 2**i, 16 // 2**i, 16 // 2**i) for i, c in enumerate(expected)]
    with torch.no_grad():
        assert torch.equal(loaded.head(window), probe.head.eval()(window))
    # the intensity channel is read: changing it changes the logits
    changed = [window[0].clone(), *window[1:]]
    changed[0][:, backbone.feature_channels[0]] += 1.0
    with torch.no_grad():
        assert not torch.allclose(loaded.head(changed), loaded.head(window))


def test_a_plateau_lowers_the_learning_rate_from_the_best_head_before_stopping(case, backbone):
    plateau = dict(CONTEXT, steps=160, val_every=10, patience=1)
    stops = fit_probe([case], [LIVER], backbone, ProbeConfig(**plateau), progress=False)
    drops = fit_probe([case], [LIVER], backbone, ProbeConfig(**plateau, lr_drops=1), progress=False)
    first_plateau = stops.history[-1]["step"]
    assert first_plateau < plateau["steps"], stops.history  # patience 1 stops the constant rate early
    rates = [h["lr"] for h in drops.history]
    at_plateau = [h["step"] for h in drops.history].index(first_plateau)
    assert drops.history[: at_plateau + 1] == stops.history  # the same run up to the plateau ...
    assert rates[: at_plateau + 1] == [CONTEXT["lr"]] * (at_plateau + 1)
    assert len(rates) > at_plateau + 1 and rates[at_plateau + 1] == pytest.approx(CONTEXT["lr"] / 10)  # ... then on
    assert drops.best_val_loss <= stops.best_val_loss
    assert "lr_drops" not in ProbeConfig(**plateau).to_dict()  # records from before the field compare equal
    assert ProbeConfig(**plateau, lr_drops=1).to_dict()["lr_drops"] == 1
