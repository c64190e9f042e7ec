"""The final answer for a scan of the model's training cohort: ``finetune --unlabeled`` keeps the registrations'
vote of each cohort scan beside the model, and ``segment`` fuses it with the network for those scans only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path
from finetune.test_cohort import TINY, ants, btcv  # noqa: F401  (the ants fixture)

from DiffusionSegLib.cohort.fusion import (
    cohort_path,
    find_cohort,
    fuse_with_network,
    registration_vote,
    working_key,
    write_cohort,
)
from DiffusionSegLib.cohort.registration import Propagation


def test_the_vote_keeps_winner_share_and_runner_up_and_fuses_with_the_network_by_weight(tmp_path):
    # two atlases on a 1 x 1 x 5 grid: agree on 1 | disagree 1 / 2 | agree on 0 | class 3 only one atlas has | 2
    a = np.array([[[1, 1, 0, 3, 2]]], dtype=np.uint8)
    b = np.array([[[1, 2, 0, 0, 2]]], dtype=np.uint8)
    image = np.zeros(a.shape, np.float32)  # both images match the target alike: equal weights
    vote = registration_vote([Propagation(a, image, 1.0), Propagation(b, image, 1.0)], image, spacing_mm=(1, 1, 1))
    assert vote.atlases == 2 and vote.shape == (1, 1, 5)
    assert vote.winner[0, 0, :3].tolist() == [1, 1, 0] and vote.share[0, 0, :3].tolist() == [255, 128, 255]
    assert vote.runner_up[0, 0, 1] == 2 and vote.runner_up[0, 0, 0] == 1  # no second class: the winner itself
    assert vote.winner[0, 0, 3] == 3 and vote.share[0, 0, 3] == 255  # the atlas without class 3 abstained there

    network = np.full((4, 1, 1, 5), 0.25, np.float32)
    alone = fuse_with_network(network.copy(), vote, 1.0)
    assert np.array_equal(alone, network)
    registrations = fuse_with_network(network.copy(), vote, 0.0)
    assert np.allclose(registrations[:, 0, 0, 1], [0, 128 / 255, 127 / 255, 0])
    assert np.allclose(registrations.sum(0), 1.0)
    half = fuse_with_network(network.copy(), vote, 0.5)
    assert np.allclose(half, 0.5 * network + 0.5 * registrations)
    nobody = type(vote)(vote.winner, np.zeros_like(vote.share), vote.runner_up, 2)  # every atlas abstained
    assert np.array_equal(fuse_with_network(network.copy(), nobody, 0.5), network)

    # the file: keyed by the working image's voxels and grid; small; read lazily
    working = sitk.GetImageFromArray(np.arange(5, dtype=np.float32).reshape(1, 1, 5))
    moved = sitk.Image(working)
    moved.SetOrigin((1.0, 0.0, 0.0))
    assert working_key(working) != working_key(moved)
    path = write_cohort(cohort_path(tmp_path / "model.safetensors"), [(working_key(working), "scan", vote)], "abc",
                        4, {"seed": 0})  # fmt: skip
    assert path.name == "model.cohort.npz"
    cohort = find_cohort(tmp_path / "model.safetensors")
    assert len(cohort) == 1 and working_key(working) in cohort and cohort.vote(working_key(moved)) is None
    stored = cohort.vote(working_key(working))
    assert all(np.array_equal(getattr(stored, f), getattr(vote, f)) for f in ("winner", "share", "runner_up"))
    assert cohort.backbone_sha256 == "abc" and cohort.num_classes == 4 and stored.atlases == 2
    assert find_cohort(tmp_path / "other.safetensors") is None


def test_segment_fuses_a_cohort_scan_with_its_registrations_and_leaves_other_scans_to_the_network(
        ants, backbone, tmp_path, caplog):  # noqa: F811  # fmt: skip
    """A tiny ``finetune --unlabeled`` on one labeled and one unlabeled scan writes the cohort file; ``segment`` of
    the unlabeled scan fuses its registration (the log line and the result say so; the labels differ from the
    network's alone, ``--no-cohort-fusion``), and of a scan outside the cohort gives the network's labels."""
    from DiffusionSegLib.cli import main
    from DiffusionSegLib.defaults import COHORT_FUSION_WEIGHT, SEGMENT_OPTIONS
    from DiffusionSegLib.preprocess import prepare_volume
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment

    legend = str(data_path("btcv/btcv_legend.json"))
    cohort_scan, outside = tmp_path / "btcv_0002_ct.nii.gz", str(data_path("btcv/btcv_0003_ct.nii.gz"))
    cohort_scan.write_bytes(data_path("btcv/btcv_0002_ct.nii.gz").read_bytes())
    model = tmp_path / "model.safetensors"
    assert main(["finetune", "--backbone", str(backbone.path), "--case", str(data_path("btcv/btcv_0001_ct.nii.gz")),
                 str(data_path("btcv/btcv_0001_labels.nii.gz")), "--labels-legend", legend, "--organs",
                 "liver,spleen", "--minutes", "0", "--steps", "3", "--spacing", *map(str, TINY["spacing_mm"]),
                 "--patch", "32", "32", "32", "--device", "cpu", "--unlabeled", str(cohort_scan), "-o",
                 str(model)]) == 0  # fmt: skip
    cohort = find_cohort(model)
    assert cohort is not None and len(cohort) == 1 and cohort.path.stat().st_size < 1_000_000
    trained = load_backbone(find_probe_backbone(model))
    # the working image segment prepares for the fine-tuned model is the one finetune registered on
    assert working_key(prepare_volume(btcv("0002", labels=False), trained.pretrain.preprocess).image) in cohort
    assert cohort.backbone_sha256 == trained.sha256

    def labels(path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    caplog.set_level(logging.INFO)
    common = ["segment", "--probe", str(model), "--device", "cpu", "--orientation", "trust-header"]
    assert main([*common, str(cohort_scan), "-o", str(tmp_path / "fused.nii.gz")]) == 0
    said = " ".join(caplog.messages)
    assert ("'btcv_0002_ct.nii.gz' was in the model's training cohort: the network fused with its 1 registrations "
            f"(weight {COHORT_FUSION_WEIGHT:g})") in said  # fmt: skip
    caplog.clear()
    assert main([*common, "--no-cohort-fusion", str(cohort_scan), "-o", str(tmp_path / "network.nii.gz")]) == 0
    assert "training cohort" not in " ".join(caplog.messages)
    fused, network = labels(tmp_path / "fused.nii.gz"), labels(tmp_path / "network.nii.gz")
    assert fused.shape == network.shape and (fused != network).mean() > 0.001, (fused != network).mean()

    # the library: the result says which was used; a scan outside the cohort gets the network alone
    probe = load_probe(model, trained)
    inside = segment(btcv("0002", labels=False), probe, trained, cohort=cohort, **SEGMENT_OPTIONS)
    assert inside.cohort_fusion == COHORT_FUSION_WEIGHT and inside.cohort_registrations == 1
    assert np.array_equal(sitk.GetArrayViewFromImage(inside.labels), fused)  # the CLI's labels
    caplog.clear()
    assert main([*common, outside, "-o", str(tmp_path / "outside.nii.gz")]) == 0
    assert main([*common, "--no-cohort-fusion", outside, "-o", str(tmp_path / "outside_network.nii.gz")]) == 0
    assert "training cohort" not in " ".join(caplog.messages)
    assert np.array_equal(labels(tmp_path / "outside.nii.gz"), labels(tmp_path / "outside_network.nii.gz"))
    other = segment(btcv("0003", labels=False), probe, trained, cohort=cohort, **SEGMENT_OPTIONS)
    assert other.cohort_fusion is None and other.cohort_registrations == 0
    assert np.array_equal(sitk.GetArrayViewFromImage(other.labels), labels(tmp_path / "outside.nii.gz"))

    # many scans in one run: the same answers, the cohort scan's fusion said
    caplog.clear()
    assert main([*common, str(cohort_scan), outside, "-o", str(tmp_path / "many") + "/", "--format", "nii.gz"]) == 0
    assert sum("was in the model's training cohort" in m for m in caplog.messages) == 1
    written = {p.name.split("_ct")[0]: labels(p) for p in (tmp_path / "many").iterdir()}
    assert np.array_equal(written["btcv_0002"], fused)
    assert np.array_equal(written["btcv_0003"], labels(tmp_path / "outside.nii.gz"))
