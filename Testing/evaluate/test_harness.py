"""The evaluation harness end to end on real labeled CT with a tiny backbone, and its splits."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
from features.tiny_backbone import make_backbone
from helpers import data_path, liver_rule_dice, read_labeled_case

from DiffusionSegLib.cli import main
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.data.datasets import find_labeled_cases
from DiffusionSegLib.evaluate.harness import EvaluationConfig, make_splits, reuse_key, timestep_curves
from DiffusionSegLib.probe import ProbeConfig


def test_kfold_tests_every_case_once_and_never_trains_on_it():
    ids = [f"case{i}" for i in range(7)]
    splits = make_splits(ids, EvaluationConfig(regime="kfold", folds=3))
    tested = [c for split in splits for c in split["test"]]
    assert sorted(tested) == ids
    assert all(not set(split["train"]) & set(split["test"]) for split in splits)
    assert make_splits(ids, EvaluationConfig(regime="kfold", folds=3)) == splits  # deterministic


def test_fewshot_splits_have_the_asked_sizes():
    ids = [f"case{i}" for i in range(6)]
    splits = make_splits(ids, EvaluationConfig(regime="fewshot", shots=(1, 2), repeats=2))
    assert [len(s["train"]) for s in splits] == [1, 1, 2, 2]
    assert all(len(s["train"]) + len(s["test"]) == 6 for s in splits)
    with pytest.raises(UserInputError, match="needs more than 6"):
        make_splits(ids, EvaluationConfig(regime="fewshot", shots=(6,)))


def _evaluate_ircadb(out, backbone, heads, *extra):
    argv = ["evaluate", "--data", str(data_path("labeled")), "--label-kind", "organs", "--max-cases", "2",
            "--backbone", f"random={backbone.path}", "--folds", "2", "--heads", *heads, "--organs", "liver",
            "-o", str(out), "--probe.steps", "60", "--probe.patch_size_vox", "[16,32,32]",
            "--probe.patches_per_volume", "8", "--probe.hidden_channels", "8", *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return make_backbone(tmp_path_factory.mktemp("bb") / "tiny.safetensors")


@pytest.fixture(scope="module")
def both_heads(tmp_path_factory, tiny_backbone):
    out = tmp_path_factory.mktemp("eval") / "out"
    return out, _evaluate_ircadb(out, tiny_backbone, ["linear", "nonlinear"])


def test_evaluate_command_runs_end_to_end_on_manual_labels(both_heads):
    out, report = both_heads
    assert {c["case"] for c in report["per_case"]} == {"ircadb1.01", "ircadb1.17"}
    linear, nonlinear = report["rows"]
    assert (linear["method"], linear["probe"], linear["regime"]) == ("random", "linear", "2-fold")
    assert nonlinear["probe"] == "nonlinear"
    # trained on the other patient, the non-linear probe beats the best one-line HU rule on each test case
    # (measured 0.519 / 0.519 against 0.496 / 0.493); the linear one on random features finds the liver (0.38)
    for row in report["per_case"]:
        ct, labels = read_labeled_case(row["case"])
        rule = liver_rule_dice(ct, sitk.GetArrayViewFromImage(labels) == 6)
        if row["probe"] == "nonlinear":
            assert row["metrics"]["liver"]["dice"] > rule, (row["case"], row["metrics"]["liver"]["dice"], rule)
    assert linear["dice"]["liver"]["mean"] > 0.3
    assert "liver" in (out / "report.md").read_text()


def test_sharing_features_between_heads_does_not_change_the_results(tmp_path, both_heads, tiny_backbone):
    """Both heads read one cached pyramid per training case and one backbone pass per test case; the linear
    probe's scores must be exactly those of an evaluation that trains and tests the linear head alone."""
    alone = _evaluate_ircadb(tmp_path / "linear", tiny_backbone, ["linear"])["per_case"]
    assert [r for r in both_heads[1]["per_case"] if r["probe"] == "linear"] == alone


def test_reuse_takes_saved_results_of_the_same_backbone_and_settings_only(tmp_path, tiny_backbone, monkeypatch):
    import DiffusionSegLib.probe as probe

    first = _evaluate_ircadb(tmp_path, tiny_backbone, ["linear"], "--reuse")
    assert len(list((tmp_path / "per_backbone").glob("*.json"))) == 1
    splits, organs = first["splits"], list(find_labeled_cases(data_path("labeled"), "organs")[0].labels)
    cfg, probe_cfg = EvaluationConfig(), ProbeConfig()
    assert reuse_key(tiny_backbone, cfg, probe_cfg, organs, splits, "cuda") != reuse_key(
        tiny_backbone, cfg, probe_cfg, organs, splits, "cpu")  # GPU results are not CPU results

    def refuse(*args, **kwargs):
        raise AssertionError("segmented again")

    monkeypatch.setattr(probe, "segment_with_probes", refuse)
    second = _evaluate_ircadb(tmp_path, tiny_backbone, ["linear"], "--reuse")
    assert second["per_case"] == first["per_case"] and second["rows"] == first["rows"]
    assert "reused" in (tmp_path / "report.md").read_text()
    with pytest.raises(AssertionError, match="segmented again"):  # other probe settings: computed afresh
        _evaluate_ircadb(tmp_path, tiny_backbone, ["linear"], "--reuse", "--probe.steps", "30")


def test_timestep_curves_join_only_backbones_that_differ_in_T():
    def row(method, bpr, steps, t):
        return {"method": method, "probe": "linear", "regime": "5-fold", "use_bpr": bpr, "pretrain_steps": steps,
                "num_timesteps": t}  # fmt: skip

    rows = [row("bpr10", True, 1000, 10), row("bpr100", True, 1000, 100), row("plain10", False, 1000, 10),
            row("shipped", True, 2500, 10), row("restorative", False, 1000, None), row("bpr10 again", True, 1000, 10)]
    results = {"rows": rows, "summaries": {f"{r['method']}|linear|5-fold": r["method"] for r in rows}}
    curves = timestep_curves(results)
    assert curves == {("linear", "5-fold", True, 1000): {10: "bpr10", 100: "bpr100"},
                      ("linear", "5-fold", False, 1000): {10: "plain10"},
                      ("linear", "5-fold", True, 2500): {10: "shipped"}}  # fmt: skip
