"""The evaluation harness end to end on real labeled CT with a tiny backbone, and its splits."""

from __future__ import annotations

import json

import pytest
from features.tiny_backbone import make_backbone
from helpers import data_path

from DiffusionSegLib.cli import main
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.evaluate.harness import EvaluationConfig, make_splits


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


def test_evaluate_command_runs_end_to_end_on_manual_labels(tmp_path):
    backbone = make_backbone(tmp_path / "tiny.safetensors")
    argv = ["evaluate", "--data", str(data_path("labeled")), "--label-kind", "organs", "--max-cases", "2",
            "--backbone", f"random={backbone.path}", "--folds", "2", "--heads", "linear", "--organs", "liver",
            "-o", str(tmp_path / "out"), "--probe.steps", "60", "--probe.patch_size_vox", "[16,32,32]",
            "--probe.patches_per_volume", "8"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {c["case"] for c in report["per_case"]} == {"ircadb1.01", "ircadb1.17"}
    (row,) = report["rows"]
    assert row["method"] == "random" and row["probe"] == "linear" and row["regime"] == "2-fold"
    # a liver probe trained on the other patient beats predicting nothing (measured about 0.35)
    assert row["dice"]["liver"]["mean"] > 0.15
    assert "liver" in (tmp_path / "out" / "report.md").read_text()
