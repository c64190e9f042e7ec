"""End-to-end fine-tuning on real labeled CT with a tiny backbone: it learns, Cancel keeps the best model, resume
continues from the saved step, and the written model segments through the ordinary ``segment`` path."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
import torch
from helpers import data_path, dice

from DiffusionSegLib.cli import main
from DiffusionSegLib.data.labels import organ_label
from DiffusionSegLib.data.volume import read_volume
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.finetune import FinetuneConfig, backbone_output_path, finetune, learning_rate_at
from DiffusionSegLib.probe import find_probe_backbone, load_probe, read_probe_config, segment
from DiffusionSegLib.pretrain.export import load_backbone

LIVER, SPLEEN = organ_label(6, "liver"), organ_label(1, "spleen")
TINY = {"spacing_mm": (6.0, 6.0, 6.0), "patch_size_vox": (32, 32, 32), "budget_minutes": 0, "lr": 3e-3,
        "warmup_steps": 5, "val_every": 10, "checkpoint_every": 5, "device": "cpu", "precision": "float32"}  # fmt: skip


class StepCounter:
    """A progress callback counting the training steps reported (the Cancel button's view of a run)."""

    def __init__(self) -> None:
        self.done = 0

    def __call__(self, fraction: float, message: str) -> None:
        if message.startswith("fine-tuning step"):
            self.done += 1


def liver_dice(model, case) -> float:
    backbone = load_backbone(find_probe_backbone(model))
    result = segment(case[0], load_probe(model, backbone), backbone)
    assert result.labels.GetSize() == case[0].GetSize() and result.labels.GetOrigin() == case[0].GetOrigin()
    reference = sitk.GetArrayViewFromImage(case[1]) == LIVER.value
    return dice(sitk.GetArrayViewFromImage(result.labels) == LIVER.value, reference)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_finetuning_learns_the_liver_far_beyond_the_untrained_network_and_a_threshold(case, backbone, tmp_path,
                                                                                      precision):  # fmt: skip
    from DiffusionSegLib.precision import cpu_bf16_units

    if precision == "bfloat16" and cpu_bf16_units() is None:
        # without AMX or AVX512-BF16 every bfloat16 convolution is emulated (the 80 steps ran over 25 minutes on an
        # AVX2-only EPYC) and precision "auto" never picks bfloat16 there
        pytest.skip("this CPU has no bfloat16 units (AMX, AVX512-BF16): bfloat16 training is not used on it")
    untrained = finetune([case], [LIVER, SPLEEN], backbone, tmp_path / "untrained.safetensors",
                         FinetuneConfig(**TINY, steps=1, seed=0), progress=False)  # fmt: skip
    trained = finetune([case], [LIVER, SPLEEN], backbone, tmp_path / "trained.safetensors",
                       FinetuneConfig(**dict(TINY, precision=precision), steps=80, seed=0), progress=False)  # fmt: skip
    assert trained.steps == trained.planned_steps == 80 and trained.best_step == 80  # one case: the last model
    before, after = liver_dice(untrained.probe_path, case), liver_dice(trained.probe_path, case)
    hu = sitk.GetArrayViewFromImage(case[0])
    reference = sitk.GetArrayViewFromImage(case[1]) == LIVER.value
    threshold = dice((hu > 30) & (hu < 200), reference)  # the one-line rule a probe must beat
    # measured over seeds 0-2: float32 0.86 / 0.87 / 0.74, bfloat16 0.79 / 0.81 / 0.80; untrained 0.40, rule 0.50
    assert after > max(0.75, before + 0.35, threshold + 0.2), (before, after, threshold)
    config = read_probe_config(trained.probe_path)
    assert config["finetune"]["finetuned_from"] == backbone.sha256 and config["finetune"]["steps"] == 80
    assert backbone_output_path(trained.probe_path) == trained.backbone_path
    assert tuple(trained.backbone.pretrain.preprocess.spacing_mm) == (6.0, 6.0, 6.0)


def test_cancel_keeps_the_best_model_of_the_held_out_volume(backbone, tmp_path):
    cases = [(read_volume(data_path(f"btcv/btcv_{c}_ct.nii.gz")), read_volume(data_path(f"btcv/btcv_{c}_labels.nii.gz")))
             for c in ("0001", "0002", "0003")]  # fmt: skip
    steps = StepCounter()
    cfg = FinetuneConfig(**dict(TINY, val_every=5), steps=200)
    result = finetune(cases, [LIVER], backbone, tmp_path / "m.safetensors", cfg, run_dir=tmp_path / "run",
                      progress=False, progress_callback=steps, should_stop=lambda: steps.done >= 25)  # fmt: skip
    assert result.cancelled and result.steps == 25 < result.planned_steps == 200
    scores = {h["step"]: h["val_dice"] for h in result.history}
    assert sorted(scores) == [5, 10, 15, 20, 25]
    assert result.best_step == max(scores, key=scores.get)
    assert (tmp_path / "run" / "last.pt").is_file() and result.probe_path.is_file()
    # the written model is the best one: validating it again gives the best score, not the last
    from DiffusionSegLib.finetune.train import SegmentationNetwork, _validate
    from DiffusionSegLib.features import FeatureConfig
    from DiffusionSegLib.probe.sampling import prepare_labeled_volume

    saved = result.backbone
    saved.model.requires_grad_(False)
    network = SegmentationNetwork(saved, load_probe(result.probe_path, saved).head, 0)
    held_out = prepare_labeled_volume(*cases[-1], [LIVER], saved, FeatureConfig(), "held out")
    assert _validate(network, [held_out], cfg, torch.device("cpu"), 2) == pytest.approx(scores[result.best_step],
                                                                                        abs=1e-6)  # fmt: skip


def test_resume_continues_from_the_saved_step_and_equals_an_uninterrupted_run(case, backbone, tmp_path):
    cfg = FinetuneConfig(**TINY, steps=12)
    whole = finetune([case], [LIVER], backbone, tmp_path / "whole.safetensors", cfg, run_dir=tmp_path / "a",
                     progress=False)  # fmt: skip
    steps = StepCounter()
    first = finetune([case], [LIVER], backbone, tmp_path / "part.safetensors", cfg, run_dir=tmp_path / "b",
                     progress=False, progress_callback=steps, should_stop=lambda: steps.done >= 6)  # fmt: skip
    assert first.cancelled and first.steps == 6
    resumed = finetune([case], [LIVER], backbone, tmp_path / "part.safetensors", cfg, run_dir=tmp_path / "b",
                       progress=False)  # fmt: skip
    assert not resumed.cancelled and resumed.steps == 12
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history] == [10, 12]
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in whole.history])
    for name, value in whole.backbone.model.state_dict().items():
        torch.testing.assert_close(resumed.backbone.model.state_dict()[name], value, msg=name)
    with pytest.raises(UserInputError, match="other settings"):
        finetune([case], [LIVER], backbone, tmp_path / "x.safetensors", FinetuneConfig(**TINY, steps=13),
                 run_dir=tmp_path / "b", progress=False)  # fmt: skip


def test_schedule_warms_up_then_decays_to_zero_at_the_planned_step_or_the_end_of_the_budget():
    cfg = FinetuneConfig(lr=1e-3, warmup_steps=10, budget_minutes=0, steps=100)
    rates = [learning_rate_at(s, 100, cfg) for s in range(0, 101)]
    assert rates[0] == 0 and rates[10] == pytest.approx(1e-3) and rates[100] == pytest.approx(0, abs=1e-12)
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11])) and all(a >= b for a, b in zip(rates[10:], rates[11:]))
    # with a budget the cosine follows the share of the budget spent, whatever the step count
    budget = FinetuneConfig(lr=1e-3, warmup_steps=10, budget_minutes=5)
    assert learning_rate_at(500, 0, budget, 0.5) == pytest.approx(0.5e-3)
    assert learning_rate_at(3, 0, budget, 0.0) == pytest.approx(0.3e-3)  # still warming up
    assert learning_rate_at(9000, 0, budget, 1.0) == pytest.approx(0, abs=1e-12)


def test_finetune_command_writes_a_model_that_segment_uses(case, backbone, tmp_path):
    ct, organs = str(data_path("labeled/ircadb1.01_ct.nii.gz")), str(data_path("labeled/ircadb1.01_organs.nii.gz"))
    legend = str(data_path("labeled/ircadb1.01_legend.json"))
    model = tmp_path / "liver.safetensors"
    status = main(["finetune", "--backbone", str(backbone.path), "--case", ct, organs, "--labels-legend", legend,
                   "--organs", "liver", "--minutes", "0", "--steps", "3", "--spacing", "6", "6", "6", "--patch", "32",
                   "32", "32", "--device", "cpu", "-o", str(model)])  # fmt: skip
    assert status == 0 and model.is_file() and backbone_output_path(model).is_file()
    out = tmp_path / "liver.seg.nrrd"
    assert main(["segment", ct, "--probe", str(model), "-o", str(out)]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == case[0].GetSize()
    bad = main(["finetune", "--backbone", str(backbone.path), "--case", ct, organs, "--labels-legend", legend,
                "--organs", "liver", "--patch", "30", "32", "32", "-o", str(tmp_path / "bad.safetensors")])  # fmt: skip
    assert bad == 2 and not (tmp_path / "bad.safetensors").exists()


def _weights(result) -> dict:
    return {k: v.clone() for k, v in result.backbone.model.state_dict().items()}


def test_two_cases_fine_tune_without_nan_in_the_progress_bar(backbone, tmp_path, capfd, caplog):
    """With fewer than 3 cases none is held out: the bar shows the loss only (it showed val=nan) and a line says
    why there is no validation."""
    case = [str(data_path("labeled/totalseg_example_ct_sm_3mm.nii.gz")),
            str(data_path("labeled/totalseg_example_sm_seg117_pseudo.nii.gz"))]  # fmt: skip
    caplog.set_level("INFO")
    status = main(["finetune", "--backbone", str(backbone.path), "--case", *case, "--case", *case, "--organs",
                   "liver=5", "--minutes", "0", "--steps", "2", "--val-every", "1", "--spacing", "6", "6", "6",
                   "--patch", "32", "32", "32", "--device", "cpu", "-o", str(tmp_path / "m.safetensors")])  # fmt: skip
    err = capfd.readouterr().err
    assert status == 0 and "loss=" in err, err
    assert "nan" not in err.lower(), err
    assert "none is held out for validation" in caplog.text


def test_weight_average_is_what_gets_written_and_resumes_exactly(case, backbone, tmp_path):
    """The model written with ``ema_decay`` is the moving average of the raw weights of each step (read from a run
    without it, stopped after every step), with the warm-up decay min(d, (1 + n) / (10 + n))."""
    raw_cfg = FinetuneConfig(**TINY, steps=3)
    raw = []
    for _ in range(3):  # each run resumes the snapshot, trains one step and writes the raw weights
        counter = StepCounter()
        part = finetune([case], [LIVER], backbone, tmp_path / "raw.safetensors", raw_cfg, run_dir=tmp_path / "raw",
                        progress=False, progress_callback=counter,
                        should_stop=lambda counter=counter: counter.done >= 1)  # fmt: skip
        raw.append(_weights(part))
    assert part.steps == 3
    decay = 0.9
    expected = raw[0]
    for n, current in enumerate(raw[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        expected = {k: v * d + current[k] * (1 - d) if v.is_floating_point() else current[k]  # counters: copied
                    for k, v in expected.items()}
    cfg = FinetuneConfig(**TINY, steps=3, ema_decay=decay)
    averaged = finetune([case], [LIVER], backbone, tmp_path / "ema.safetensors", cfg, progress=False)
    written = _weights(averaged)
    for name, value in expected.items():
        torch.testing.assert_close(written[name], value, msg=name)
    assert any(not torch.allclose(written[k], raw[-1][k]) for k in written)  # not the last raw weights
    # stopped after 2 steps and resumed: the average continues from its snapshot
    steps = StepCounter()
    finetune([case], [LIVER], backbone, tmp_path / "ema2.safetensors", cfg, run_dir=tmp_path / "ema", progress=False,
             progress_callback=steps, should_stop=lambda: steps.done >= 2)  # fmt: skip
    resumed = finetune([case], [LIVER], backbone, tmp_path / "ema2.safetensors", cfg, run_dir=tmp_path / "ema",
                       progress=False)  # fmt: skip
    for name, value in written.items():
        torch.testing.assert_close(_weights(resumed)[name], value, msg=name)


def test_backbone_learning_rate_scale_holds_the_backbone_while_the_head_learns(case, backbone, tmp_path):
    start = {k: v.detach().clone() for k, v in backbone.model.named_parameters()}
    untrained = finetune([case], [LIVER], backbone, tmp_path / "untrained.safetensors",
                         FinetuneConfig(**dict(TINY, lr=1e-12), steps=1), progress=False)  # fmt: skip
    initial_head = load_probe(untrained.probe_path, untrained.backbone).head.state_dict()

    def moved(result) -> tuple[float, float]:
        body = max(float((v - start[k]).abs().max()) for k, v in result.backbone.model.named_parameters())
        head = load_probe(result.probe_path, result.backbone).head.state_dict()
        return body, max(float((v - initial_head[k]).abs().max()) for k, v in head.items())

    held = finetune([case], [LIVER], backbone, tmp_path / "held.safetensors",
                    FinetuneConfig(**TINY, steps=5, backbone_lr_scale=1e-6), progress=False)  # fmt: skip
    free = finetune([case], [LIVER], backbone, tmp_path / "free.safetensors", FinetuneConfig(**TINY, steps=5),
                    progress=False)  # fmt: skip
    (held_body, held_head), (free_body, free_head) = moved(held), moved(free)
    assert held_body < 1e-6 and free_body > 1e-3, (held_body, free_body)  # AdamW moves ~lr per step: 3e-9 vs 3e-3
    assert held_head > 1e-3 and free_head > 1e-3, (held_head, free_head)
    assert held.history[-1]["lr"] == free.history[-1]["lr"]  # the head's rate is reported, unscaled


def test_new_settings_at_their_defaults_leave_recorded_run_keys_unchanged():
    recorded = FinetuneConfig().to_dict()
    assert "ema_decay" not in recorded and "backbone_lr_scale" not in recorded
    changed = FinetuneConfig(ema_decay=0.995, backbone_lr_scale=0.1).to_dict()
    assert changed["ema_decay"] == 0.995 and changed["backbone_lr_scale"] == 0.1
    assert FinetuneConfig.from_dict(changed) == FinetuneConfig(ema_decay=0.995, backbone_lr_scale=0.1)
    # the 12 mm margin default: written while it is not 0; a record without it means 0 (recorded before it);
    # without unlabeled scans a run records none (it does nothing there)
    assert FinetuneConfig().pseudo_background_margin_mm == 12.0 == recorded["pseudo_background_margin_mm"]
    assert FinetuneConfig.from_dict(recorded) == FinetuneConfig()
    labeled_only = FinetuneConfig().as_trained(unlabeled=False)
    assert "pseudo_background_margin_mm" not in labeled_only.to_dict()
    assert FinetuneConfig.from_dict(labeled_only.to_dict()) == labeled_only == FinetuneConfig(pseudo_background_margin_mm=0)
    assert FinetuneConfig().as_trained(unlabeled=True) == FinetuneConfig()
    with pytest.raises(ValueError, match="ema_decay"):
        FinetuneConfig(ema_decay=1.0)
