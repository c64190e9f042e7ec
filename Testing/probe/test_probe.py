"""Few-shot probe: training on one labeled scan, segmenting it back on its exact grid, probe files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from features.tiny_backbone import make_backbone
from helpers import dice, liver_rule_dice

from DiffusionSegLib.data.labels import organ_label
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.probe import (
    ProbeConfig,
    ProbeTrainingCancelled,
    fit_probe,
    load_probe,
    read_seg_nrrd,
    save_probe,
    segment,
    segment_with_probes,
    write_segmentation,
)

LIVER = organ_label(6, "liver")
FAST = {"head": "linear", "lr": 3e-2, "steps": 150, "patch_size_vox": (16, 32, 32), "patches_per_volume": 16,
        "val_every": 25}  # fmt: skip


@pytest.fixture(scope="module")
def probe(case, backbone):
    return fit_probe([case], [LIVER], backbone, ProbeConfig(**FAST), progress=False)


@pytest.fixture(scope="module")
def result(case, probe, backbone):
    return segment(case[0], probe, backbone, uncertainty=True)


def test_probe_segments_the_liver_on_the_input_grid(case, probe, result):
    ct, labels = case
    out = result.labels
    assert out.GetSize() == ct.GetSize() and out.GetSpacing() == ct.GetSpacing()
    assert out.GetOrigin() == ct.GetOrigin() and out.GetDirection() == ct.GetDirection()
    predicted = sitk.GetArrayViewFromImage(out) == LIVER.value
    reference = sitk.GetArrayViewFromImage(labels) == LIVER.value
    score, rule = dice(predicted, reference), liver_rule_dice(ct, reference)
    assert score > rule + 0.03, (score, rule)  # measured 0.56 against the HU rule's 0.50
    assert set(np.unique(sitk.GetArrayViewFromImage(out))) <= {0, LIVER.value}
    assert probe.history and probe.best_step > 0 and np.isfinite(probe.best_val_loss)


def test_uncertainty_map_is_on_the_grid_and_bounded(case, result):
    assert result.uncertainty_kind == "entropy"
    assert result.uncertainty.GetSize() == case[0].GetSize()
    values = sitk.GetArrayViewFromImage(result.uncertainty)
    assert 0.0 <= values.min() and values.max() <= 1.0 + 1e-5 and values.max() > 0.1


def test_segmentation_hardly_depends_on_the_window(case, probe, backbone, result):
    other = segment(case[0], probe, backbone, window_vox=(16, 48, 48))
    a = sitk.GetArrayViewFromImage(result.labels) == LIVER.value
    b = sitk.GetArrayViewFromImage(other.labels) == LIVER.value
    reference = sitk.GetArrayViewFromImage(case[1]) == LIVER.value
    # the window changes only convolution border effects: far less than the (random tiny) model's own error
    assert dice(a, b) > max(0.8, dice(a, reference) + 0.2), (dice(a, b), dice(a, reference))


def test_largest_component_keeps_one_piece(case, probe, backbone, result):
    cleaned = segment(case[0], probe, backbone, largest_component=True)
    mask = sitk.GetArrayFromImage(cleaned.labels) == LIVER.value
    pieces = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    assert pieces.max() == 1
    assert mask.sum() <= (sitk.GetArrayViewFromImage(result.labels) == LIVER.value).sum()


def test_saved_probe_keeps_labels_and_predicts_the_same(tmp_path, case, probe, backbone, result):
    path = save_probe(tmp_path / "liver.safetensors", probe)
    loaded = load_probe(path, backbone)
    assert loaded.labels == probe.labels
    assert loaded.labels[0].name == "liver" and loaded.labels[0].color == LIVER.color
    assert "Liver" in loaded.labels[0].terminology
    assert loaded.config == probe.config and loaded.config.timestep == 0 and loaded.config.noise_seed == 0
    assert loaded.backbone["sha256"] == backbone.sha256 and loaded.backbone["use_bpr"] is False
    again = segment(case[0], loaded, backbone, uncertainty=False)
    assert np.array_equal(sitk.GetArrayViewFromImage(again.labels), sitk.GetArrayViewFromImage(result.labels))


def test_probe_of_another_backbone_is_refused(tmp_path, case, probe):
    path = save_probe(tmp_path / "liver.safetensors", probe)
    other = make_backbone(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(UserInputError, match="backbone"):
        load_probe(path, other)
    with pytest.raises(UserInputError, match="backbone"):
        segment(case[0], probe, other)


def test_seg_nrrd_reads_back_with_names_and_colours(tmp_path, result):
    path = write_segmentation(result, tmp_path / "liver.seg.nrrd")
    image, segments = read_seg_nrrd(path)
    assert [s["name"] for s in segments] == ["liver"]
    assert segments[0]["label_value"] == LIVER.value
    assert np.allclose(segments[0]["color"], LIVER.color, atol=1e-5)
    assert "SCT^10200004^Liver" in segments[0]["terminology"]
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(result.labels))
    assert image.GetOrigin() == result.labels.GetOrigin() and image.GetSpacing() == result.labels.GetSpacing()
    extent = segments[0]["extent"]
    assert extent[0] <= extent[1] and extent[4] <= extent[5]


def test_progress_and_cancel_hooks(case, backbone):
    fractions = []
    calls = {"n": 0}

    def stop_after_some_steps() -> bool:
        calls["n"] += 1
        return calls["n"] > 1 + 4 + 10  # preparing + caching + 10 training steps

    cfg = ProbeConfig(**(FAST | {"patches_per_volume": 4, "steps": 100}))
    probe = fit_probe([case], [LIVER], backbone, cfg, progress=False,
                      progress_callback=lambda f, m: fractions.append(f), should_stop=stop_after_some_steps)  # fmt: skip
    assert probe.cancelled and probe.history and probe.history[-1]["step"] < 100
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] == 1.0
    with pytest.raises(ProbeTrainingCancelled):
        fit_probe([case], [LIVER], backbone, cfg, progress=False, should_stop=lambda: True)


def test_organ_absent_from_every_case_is_refused(case, backbone):
    with pytest.raises(UserInputError, match="gallbladder"):
        fit_probe([case], [LIVER, organ_label(4, "gallbladder")], backbone, ProbeConfig(**FAST), progress=False)


def test_several_noise_draws_give_a_disagreement_map(case, probe, backbone):
    result = segment(case[0], probe, backbone, num_noise_draws=2, uncertainty=True)
    assert result.uncertainty_kind == "disagreement"
    values = sitk.GetArrayViewFromImage(result.uncertainty)
    assert result.uncertainty.GetSize() == case[0].GetSize()
    assert 0.0 <= values.min() and values.max() <= 1.0 + 1e-5 and values.max() > 0.0


def test_one_pass_with_several_probes_equals_one_pass_per_probe(case, probe, backbone):
    nonlinear = fit_probe([case], [LIVER], backbone, ProbeConfig(**(FAST | {"head": "nonlinear", "steps": 30})),
                          progress=False)  # fmt: skip
    together = segment_with_probes(case[0], [probe, nonlinear], backbone, num_noise_draws=2, uncertainty=True)
    for shared, alone in zip(together, [segment(case[0], p, backbone, num_noise_draws=2, uncertainty=True)
                                        for p in (probe, nonlinear)]):  # fmt: skip
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(shared.labels), sitk.GetArrayViewFromImage(alone.labels))
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(shared.uncertainty),
                                   sitk.GetArrayViewFromImage(alone.uncertainty), atol=1e-6)  # fmt: skip
        assert shared.labels.GetSize() == case[0].GetSize()
    a, b = (sitk.GetArrayViewFromImage(r.labels) == LIVER.value for r in together)
    assert a.sum() != b.sum()  # two different heads, not one result twice


def test_probes_reading_different_features_are_not_run_together(case, probe, backbone):
    other = dataclasses.replace(probe, config=dataclasses.replace(probe.config, timestep=1))
    with pytest.raises(UserInputError, match="read different features"):
        segment_with_probes(case[0], [probe, other], backbone)
    with pytest.raises(UserInputError, match="no probes"):
        segment_with_probes(case[0], [], backbone)
