"""A probe sees the same features when it is trained and when it segments, and both head types learn.

Training caches the head's input per patch (``cut_patch`` → ``FeatureExtractor``); ``segment`` recomputes it by
sliding windows over the whole working volume. For voxels that one window alone covers, the head's logits on
the training patch must be the logits ``segment`` computes there (same working grid, same noise field, head in
eval mode, logits averaged over the noise draws).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import data_path, dice, liver_rule_dice

import DiffusionSegLib.features as features
from DiffusionSegLib.data.labels import organ_label
from DiffusionSegLib.data.volume import read_volume
from DiffusionSegLib.probe import ProbeConfig, fit_probe, segment
from DiffusionSegLib.probe.sampling import cut_patch, prepare_labeled_volume

BONE = organ_label(1, "bone")
LIVER = organ_label(6, "liver")
PATCH = (16, 32, 32)


@pytest.fixture(scope="module")
def bone_case():
    """A small real CT (23 x 97 x 120 working voxels) with bone defined by HU > 250 as its label map."""
    ct = read_volume(data_path("labeled/totalseg_example_ct_sm_3mm.nii.gz"))
    labels = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(ct) > 250).astype(np.uint8))
    labels.CopyInformation(ct)
    return ct, labels


@pytest.mark.parametrize("head", ["linear", "nonlinear", "context", "context+input"])
def test_training_patch_logits_are_the_logits_segment_computes(head, bone_case, backbone, monkeypatch):
    head, reads_input = head.removesuffix("+input"), head.endswith("+input")
    cfg = ProbeConfig(head=head, reads_input=reads_input, hidden_channels=16, num_noise_draws=2, steps=20, lr=3e-2, patch_size_vox=PATCH,
                      patches_per_volume=4, val_every=10, window_vox=PATCH, overlap=0.0)  # fmt: skip
    probe = fit_probe([bone_case], [BONE], backbone, cfg, progress=False)

    captured = {}
    original = features.sliding_window_apply

    def capture(*args, **kwargs):
        captured["logits"] = original(*args, **kwargs)
        return captured["logits"]

    monkeypatch.setattr(features, "sliding_window_apply", capture)
    segment(bone_case[0], probe, backbone, precision="float32")  # the training logits are float32
    at_inference = captured["logits"][0]

    # the training side, exactly as fit_probe builds its cache (first window corner: one window covers it alone)
    feature_cfg = cfg.feature_config()
    volume = prepare_labeled_volume(*bone_case, [BONE], backbone, feature_cfg)
    assert tuple(at_inference.shape) == (2, *volume.classes.shape)  # the same working grid
    window, _ = cut_patch(volume, (0, 0, 0), PATCH)
    extractor = features.FeatureExtractor(backbone, feature_cfg)
    with torch.no_grad():
        at_training = torch.stack([probe.head(extractor(window, draw)) for draw in range(2)]).mean(0)[0]
    # voxels covered by the first window only (the last window along an axis is shifted back to the border)
    alone = tuple(slice(0, p if n >= 2 * p else n - p) for p, n in zip(PATCH, volume.classes.shape, strict=True))
    assert all(s.stop > 0 for s in alone)
    region = (slice(None), *alone)
    assert torch.allclose(at_training[region], at_inference[region], atol=1e-4), float(
        (at_training[region] - at_inference[region]).abs().max()
    )


def test_nonlinear_probe_segments_the_liver(backbone):
    ct = read_volume(data_path("labeled/ircadb1.01_ct.nii.gz"))
    labels = read_volume(data_path("labeled/ircadb1.01_organs.nii.gz"))
    cfg = ProbeConfig(head="nonlinear", hidden_channels=16, steps=100, lr=3e-2, patch_size_vox=PATCH,
                      patches_per_volume=16, val_every=25)  # fmt: skip
    probe = fit_probe([(ct, labels)], [LIVER], backbone, cfg, progress=False)
    result = segment(ct, probe, backbone, precision="float32")
    predicted = sitk.GetArrayViewFromImage(result.labels) == LIVER.value
    reference = sitk.GetArrayViewFromImage(labels) == LIVER.value
    score, rule = dice(predicted, reference), liver_rule_dice(ct, reference)
    assert score > rule + 0.15, (score, rule)  # measured 0.73 against the HU rule's 0.50
