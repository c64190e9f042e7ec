"""Segmenting several volumes in one job (the logic on the real MRML scene, slicer-core): one node per volume, the
models loaded once, a refused volume named with its reason while the others go on, one Cancel for the whole job."""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
from helpers import data_path


@pytest.fixture
def logic_on_scene(trained_probe, scene):
    logic, _ = trained_probe
    logic.scene = scene
    return logic


def _mr_volume(scene):
    """A real MR volume node: the input gate refuses it (not CT)."""
    import SimpleITK as sitk

    from DiffusionSegLib.mrml import volume_node_from_image

    return volume_node_from_image(sitk.ReadImage(str(data_path("raw/totalseg_example_mr_sm.nii.gz"))), scene, "MR")


def test_volumes_segmented_in_one_job_with_models_loaded_once(scene, logic_on_scene, fixed_probe, tiny_backbone,
                                                               make_case, monkeypatch):
    import safetensors.torch

    from DiffusionSegLib.mrml import labelmap_from_segmentation_node

    reads: Counter = Counter()
    load_file = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda path, *a, **k: reads.update([os.path.realpath(path)]) or load_file(path, *a, **k))
    logic = logic_on_scene
    _, first, _ = make_case(scene, name="A")
    mr = _mr_volume(scene)
    _, second, _ = make_case(scene, name="B")
    messages = []
    done = logic.segmentVolumes([first, mr, second, first], fixed_probe, tiny_backbone,
                                progressCallback=lambda fraction, message: messages.append(message))  # fmt: skip
    assert [node.GetName() for node in done.segmentations] == ["A segmentation", "B segmentation"]
    for node, volume in zip(done.segmentations, (first, second), strict=True):
        assert logic.referenceVolume(node) is volume
        segmentation = node.GetSegmentation()
        assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["bone"]
        labels, _ = labelmap_from_segmentation_node(node, volume)
        assert labels.GetSize() == volume.GetImageData().GetDimensions()
    assert len(done.failed) == 1 and done.failed[0][0] is mr and "MR" in done.failed[0][1], done.failed
    assert "does not look like CT" in done.failed[0][1]
    assert "MR not segmented" in done.summary() and done.summary().startswith("2 of 3 volumes segmented")
    assert sum("loading the models" in m for m in messages) == 1, messages
    assert any(m.startswith("scan 3/3 (B)") for m in messages), messages
    assert reads[os.path.realpath(fixed_probe)] == 1 and reads[os.path.realpath(tiny_backbone)] == 1, reads
    assert max(reads.values()) == 1, reads


def test_one_cancel_stops_the_whole_job_and_leaves_the_scene_unchanged(scene, logic_on_scene, fixed_probe,
                                                                        tiny_backbone, make_case):
    logic = logic_on_scene
    volumes = [make_case(scene, name=name)[1] for name in ("A", "B", "C")]
    nodes = scene.GetNumberOfNodes()
    task = logic.prepareSegmentVolumes(volumes, fixed_probe, tiny_backbone)
    process = logic.start(task)
    seen, deadline = [], time.monotonic() + 240
    while process.isRunning() and time.monotonic() < deadline and not any(m.startswith("scan 2/3") for m in seen):
        seen += [message for _, message in logic.poll(task)]
        time.sleep(0.02)
    assert any(m.startswith("scan 2/3") for m in seen), (seen, task.output[-10:])  # the first volume is done
    logic.cancel(task)
    assert not process.isRunning() and process.cancelled
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.complete(task, timeout=30)
    assert scene.GetNumberOfNodes() == nodes  # not even the first volume's segmentation
    assert not task.tempDir.exists()


def test_no_volume_is_refused_before_any_work(ds, scene, tmp_path, fixed_probe, tiny_backbone):
    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    with pytest.raises(ValueError, match="no input volume"):
        logic.prepareSegmentVolumes([None], fixed_probe, tiny_backbone)
    with pytest.raises(ValueError, match="no probe"):
        logic.prepareSegmentVolumes([None], None, tiny_backbone)
