from __future__ import annotations

import json

import pytest
from helpers import data_path

from DiffusionSegLib.data.datasets import find_labeled_cases
from DiffusionSegLib.data.labels import BTCV_LABELS, canonical_organ_name, labels_from_json, labels_to_json, read_legend
from DiffusionSegLib.errors import UserInputError


def test_btcv_folder_gives_20_cases_with_the_13_btcv_organs():
    cases = find_labeled_cases(data_path("btcv"))
    assert len(cases) == 20
    assert cases[0].case_id == "btcv_0001" and cases[0].label.name == "btcv_0001_labels.nii.gz"
    assert [label.name for label in cases[0].labels] == [label.name for label in BTCV_LABELS]


def test_labeled_folder_pairs_each_ct_with_its_own_labels_and_legend():
    cases = {case.case_id: case for case in find_labeled_cases(data_path("labeled"))}
    assert cases["ircadb1.01"].label.name == "ircadb1.01_organs.nii.gz"
    ircadb = {label.value: label.name for label in cases["ircadb1.01"].labels}
    assert ircadb[2] == "right kidney" and ircadb[6] == "liver" and ircadb[14] == "left lung"
    assert cases["totalseg_example"].image.name == "totalseg_example_ct_3mm.nii.gz"
    assert cases["totalseg_example"].label.name == "totalseg_example_seg117_pseudo_fast.nii.gz"
    assert cases["totalseg_example_sm"].label.name == "totalseg_example_sm_seg117_pseudo.nii.gz"
    totalseg = {label.value: label.name for label in cases["totalseg_example"].labels}
    assert totalseg[5] == "liver" and totalseg[2] == "right kidney"
    vessels = find_labeled_cases(data_path("labeled"), label_kind="vessels_bone")
    assert {c.case_id for c in vessels} == {"ircadb1.01", "ircadb1.17"}
    assert "bone" in [label.name for label in vessels[0].labels]


def test_msd_dataset_json(tmp_path):
    source = data_path("btcv")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "case1.nii.gz").symlink_to(source / "btcv_0001_ct.nii.gz")
    (tmp_path / "labelsTr" / "case1.nii.gz").symlink_to(source / "btcv_0001_labels.nii.gz")
    spec = {"labels": {"background": 0, "liver": 6, "spleen": 1},
            "training": [{"image": "./imagesTr/case1.nii.gz", "label": "./labelsTr/case1.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    (case,) = find_labeled_cases(tmp_path)
    assert [(label.value, label.name) for label in case.labels] == [(1, "spleen"), (6, "liver")]


def test_names_colours_and_codes():
    assert canonical_organ_name("kidney_left") == canonical_organ_name("leftkidney") == "left kidney"
    liver = next(label for label in BTCV_LABELS if label.name == "liver")
    assert "SCT^10200004^Liver" in liver.terminology
    right_kidney = next(label for label in BTCV_LABELS if label.name == "right kidney")
    assert "SCT^64033007^Kidney~SCT^24028007^Right" in right_kidney.terminology
    assert len({label.color for label in BTCV_LABELS}) == 13
    assert labels_from_json(json.loads(json.dumps(labels_to_json(BTCV_LABELS)))) == BTCV_LABELS


def test_bad_legends_are_refused(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        read_legend(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"1": "liver", "2": "hepar", "3": "Liver"}))
    with pytest.raises(UserInputError, match="same organ"):
        read_legend(tmp_path / "b.json")
    with pytest.raises(UserInputError, match="not found"):
        read_legend(tmp_path / "missing.json")
