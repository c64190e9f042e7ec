"""The DiffusionSeg logic on the real MRML scene (slicer-core): segment, train a probe, coordinates, output policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import data_path, import_or_missing


@pytest.fixture
def logic_on_scene(trained_probe, scene):
    """The logic that trained the probe, now working on this test's scene."""
    logic, _ = trained_probe
    logic.scene = scene
    return logic


def _segments(node) -> dict[str, object]:
    segmentation = node.GetSegmentation()
    return {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i)
            for i in range(segmentation.GetNumberOfSegments())}  # fmt: skip


def test_probe_trained_from_segmentation_node_is_listed(trained_probe, organs):
    logic, path = trained_probe
    assert path.is_file() and path.parent == logic.probeFolder
    listed = {p["path"]: p for p in logic.listProbes()}
    assert str(path) in listed
    assert sorted(listed[str(path)]["organs"]) == sorted(organs.values())


def test_segment_gives_named_coloured_segments_on_input_geometry(scene, logic_on_scene, fixed_probe, tiny_backbone,
                                                                  make_case):
    import vtk

    from DiffusionSegLib.data.labels import organ_label
    from DiffusionSegLib.mrml import image_from_volume_node

    logic, probe = logic_on_scene, fixed_probe
    ct, volume_node, annotations = make_case(scene, name="patient")
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    fractions = []
    result = logic.segment(volume_node, probe, tiny_backbone, progressCallback=lambda f, m: fractions.append(f))
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 1
    assert result is not annotations and result.GetName() == "patient segmentation"
    assert fractions and fractions[-1] == 1.0
    segments = _segments(result)
    assert list(segments) == ["bone"], f"unexpected segments {sorted(segments)}"
    for name, segment in segments.items():
        expected = organ_label(1, name)
        assert np.allclose(segment.GetColor(), expected.color, atol=1e-6)
        assert expected.terminology and "SCT^" in segment.GetTerminology()
    # the segmentation is referenced to the input volume and its label map lies on the input grid
    role = result.GetReferenceImageGeometryReferenceRole()
    assert result.GetNodeReference(role) is volume_node
    from DiffusionSegLib.mrml import labelmap_from_segmentation_node

    labels, _ = labelmap_from_segmentation_node(result, volume_node)
    reference = image_from_volume_node(volume_node)
    assert labels.GetSize() == ct.GetSize() == reference.GetSize()
    assert np.allclose(labels.GetOrigin(), ct.GetOrigin()) and np.allclose(labels.GetDirection(), ct.GetDirection())
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    assert abs(matrix.GetElement(0, 3) + ct.GetOrigin()[0]) < 1e-4  # RAS = -LPS on x


def test_shipped_default_gives_many_named_coloured_organs_and_is_listed_first(ds, scene, tmp_path, make_case):
    """The default the selector starts on (first shipped entry) segments the real CT into several organs, each
    with its BTCV name, colour and terminology code (a one-organ probe would not show a mix-up of ids)."""
    from pathlib import Path

    import SimpleITK as sitk

    from DiffusionSegLib.data.labels import BTCV_LABELS
    from DiffusionSegLib.mrml import labelmap_from_segmentation_node
    from DiffusionSegLib.resources import default_probe_path, resources_dir

    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    shipped = [p for p in logic.listProbes() if Path(p["path"]).parent == resources_dir() / "Models"]
    assert shipped[0]["path"] == str(default_probe_path())
    _, volume_node, _ = make_case(scene, name="patient")
    result = logic.segment(volume_node, shipped[0]["path"])
    segments = _segments(result)
    by_name = {o.name: o for o in BTCV_LABELS}
    assert {"liver", "spleen", "right kidney", "left kidney", "aorta"} <= set(segments), sorted(segments)
    labels, legend = labelmap_from_segmentation_node(result, volume_node)
    for name, segment in segments.items():
        assert np.allclose(segment.GetColor(), by_name[name].color, atol=1e-6), name
        assert by_name[name].terminology and "SCT^" in segment.GetTerminology()
    assert {name: by_name[name].value for name in segments} == {name: value for value, name in legend.items()}
    present = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels))} - {0}
    assert present == set(legend)  # every segment holds voxels, under its BTCV id
    missing = set(by_name) - set(segments)  # the status line names each organ the scan did not show
    notes = [result.GetAttribute(ds.NOT_FOUND_ATTRIBUTE) or "", result.GetAttribute(ds.FIELD_OF_VIEW_ATTRIBUTE) or ""]
    assert all(name in " ".join(notes) for name in missing), (notes, missing)
    assert not any(f" {name}," in notes[0] + "," for name in segments)  # found organs are not listed as missing


def _content(node, volume_node) -> tuple[list[str], bytes]:
    """A segmentation node's segment names and label-map bytes on the volume's grid."""
    import SimpleITK as sitk

    from DiffusionSegLib.mrml import labelmap_from_segmentation_node

    labels, _ = labelmap_from_segmentation_node(node, volume_node)
    return list(_segments(node)), sitk.GetArrayFromImage(labels).tobytes()


def test_existing_segmentation_is_never_overwritten_unless_chosen(scene, logic_on_scene, fixed_probe, tiny_backbone,
                                                                  make_case, organs):
    logic, probe = logic_on_scene, fixed_probe
    _, volume_node, annotations = make_case(scene, name="patient")
    annotations.SetName("patient segmentation")  # the user's own labels carry the name the result would take
    before = _content(annotations, volume_node)
    assert len(before[0]) == len(organs) and any(before[1])
    first = logic.segment(volume_node, probe, tiny_backbone)
    assert first is not annotations and first.GetName() != "patient segmentation"
    assert _content(annotations, volume_node) == before  # the user's segments untouched, voxel for voxel
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    chosen = logic.segment(volume_node, probe, tiny_backbone, outputSegmentationNode=annotations)
    assert chosen is annotations and _content(annotations, volume_node)[0] == ["bone"]  # replaced, as chosen
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count


def test_cancelled_background_run_leaves_scene_unchanged(scene, logic_on_scene, trained_probe, tiny_backbone,
                                                         make_case):
    logic, (_, probe) = logic_on_scene, trained_probe
    _, volume_node, _ = make_case(scene)
    nodes = scene.GetNumberOfNodes()
    task = logic.prepareSegment(volume_node, probe, tiny_backbone)
    process = logic.start(task)
    logic.cancel(task)
    assert not process.isRunning() and process.cancelled
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.complete(task, timeout=30)
    assert scene.GetNumberOfNodes() == nodes
    assert not task.tempDir.exists()


def test_background_failure_reports_the_user_error(scene, logic_on_scene, trained_probe, tmp_path, make_case):
    logic, (_, probe) = logic_on_scene, trained_probe
    _, volume_node, _ = make_case(scene)
    bogus = tmp_path / "not_a_backbone.safetensors"
    bogus.write_bytes(b"\x00" * 16)
    task = logic.prepareSegment(volume_node, probe, bogus)
    logic.start(task)
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="not_a_backbone"):
        logic.complete(task, timeout=120)
    assert scene.GetNumberOfNodes() == nodes


def test_segment_names_become_classes_union_over_nodes(ds, scene, tmp_path, make_case):
    import SimpleITK as sitk

    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    _, volume_a, segmentation_a = make_case(scene, {5: "liver"}, "A")
    _, volume_b, segmentation_b = make_case(scene, {1: "spleen", 5: "liver"}, "B")
    segmentation_a.GetSegmentation().GetNthSegment(0).SetName("Liver")  # same organ, other spelling
    empty = segmentation_b.GetSegmentation().AddEmptySegment("", "kidney")
    assert empty
    cases, names = logic.trainingLabels([volume_a, volume_b], [segmentation_a, segmentation_b], tmp_path)
    assert sorted(names.values()) == ["liver", "spleen"]  # union, same name = same class, empty left out
    liver = next(v for v, n in names.items() if n == "liver")
    for _, label_path in cases:
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label_path))).tolist())
        assert liver in values and values <= {0, *names}


def test_pairing_uses_the_source_volume_and_refuses_missing_ones(ds, scene, tmp_path, make_case):
    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    _, volume, segmentation = make_case(scene, {5: "liver"})
    assert logic.pairVolumes([segmentation], []) == [volume]
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "orphan")
    assert logic.pairVolumes([orphan], [volume]) == [volume]
    with pytest.raises(ValueError, match="no source volume"):
        logic.pairVolumes([orphan], [])


def test_coordinates_node_on_input_geometry(ds, scene, tmp_path, make_case):
    from DiffusionSegLib.bpr import default_bpr_path
    from DiffusionSegLib.mrml import image_from_volume_node

    assert default_bpr_path().is_file(), "the default BPR is shipped"
    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    ct, volume_node, _ = make_case(scene, {5: "liver"})
    node = logic.showCoordinates(volume_node)
    assert node.IsA("vtkMRMLVectorVolumeNode") and node.GetImageData().GetNumberOfScalarComponents() == 3
    image = image_from_volume_node(node)
    assert image.GetSize() == ct.GetSize()
    assert np.allclose(image.GetOrigin(), ct.GetOrigin()) and np.allclose(image.GetSpacing(), ct.GetSpacing())
    assert np.allclose(image.GetDirection(), ct.GetDirection())


def test_missing_inputs_give_clear_errors(ds, scene, tmp_path):
    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    with pytest.raises(ValueError, match="no probe selected"):
        logic.prepareSegment(None, None)
    with pytest.raises(ValueError, match="one volume per segmentation"):
        logic.trainingLabels([], [], tmp_path)
    with pytest.raises(ValueError, match="not a DiffusionSeg probe"):
        bogus = tmp_path / "x.safetensors"
        bogus.write_bytes(b"junk")
        logic.importProbe(bogus)


def test_background_finetune_stopped_early_keeps_a_model_segment_can_use(ds, scene, tiny_backbone, make_case,
                                                                         tmp_path):
    """The training panel's accurate path: Cancel (requestStop) ends a fine-tune with its best model so far, which
    is listed among the probes and whose fine-tuned backbone is found beside it."""
    import time

    from DiffusionSegLib.finetune import backbone_output_path

    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path / "probes")
    _, volume_node, segmentation_node = make_case(scene)
    options = {"spacing_mm": [6.0, 6.0, 6.0], "patch_size_vox": [16, 32, 32], "checkpoint_every": 1000}
    task = logic.prepareFinetune([volume_node], [segmentation_node], logic.newProbePath("tuned"), minutes=60,
                                 backbonePath=tiny_backbone, finetuneOptions=options)  # fmt: skip
    logic.start(task)
    deadline, seen = time.monotonic() + 240, []
    while time.monotonic() < deadline and not any(m.startswith("fine-tuning step 3/") for m in seen):
        seen += [message for _, message in logic.poll(task)]
        time.sleep(0.2)
    assert any(m.startswith("fine-tuning step 3/") for m in seen), seen[-5:]
    logic.requestStop(task)
    path = logic.complete(task, timeout=120)
    metadata = ds.readWeightsMetadata(path)
    assert metadata["kind"] == "probe" and metadata["extra"]["cancelled"] is True
    record = metadata["config"]["finetune"]  # stopped early: before the budget was planned, or before its end
    assert record["steps"] >= 3 and (record["planned_steps"] == 0 or record["steps"] < record["planned_steps"])
    assert str(path) in [probe["path"] for probe in logic.listProbes()]
    assert logic.resolveBackbone(path) == backbone_output_path(path)
    segmentation = logic.segment(volume_node, path)
    assert segmentation.GetSegmentation().GetNumberOfSegments() >= 1


def test_coordinates_never_replace_the_volume_they_read(ds, scene, tmp_path, make_case):
    """A vector volume is also a scalar volume in MRML, so it can be both the input and the chosen output: the
    logic refuses that before any work, and the input node keeps its voxels."""
    import SimpleITK as sitk

    from DiffusionSegLib.mrml import coordinate_node_from_image, image_from_volume_node

    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    ct, _, _ = make_case(scene, {5: "liver"})
    vectors = coordinate_node_from_image(sitk.Compose([sitk.Cast(ct, sitk.sitkFloat32)] * 3), scene, "vectors")
    before = sitk.GetArrayFromImage(image_from_volume_node(vectors)).tobytes()
    with pytest.raises(ValueError, match="is the input volume"):
        logic.prepareCoordinates(vectors, outputNode=vectors)
    assert sitk.GetArrayFromImage(image_from_volume_node(vectors)).tobytes() == before


def test_finetune_learns_from_the_scenes_unlabeled_volumes_too(ds, scene, tiny_backbone, make_case, tmp_path):
    """The training panel with two labeled volumes and three unlabeled real CT volumes in the scene: the three are
    preselected as the unlabeled cohort, registered to, and recorded in the model; its run folder keeps each
    registration for a resumed run."""
    import_or_missing("ants", "antspyx (registration of the unlabeled volumes) is not installed")
    import SimpleITK as sitk

    from DiffusionSegLib.mrml import volume_node_from_image

    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path / "probes")
    labeled = [make_case(scene, name=name) for name in ("CT a", "CT b")]
    unlabeled = [volume_node_from_image(sitk.ReadImage(str(data_path(path))), scene, name) for path, name in
                 (("btcv/btcv_0002_ct.nii.gz", "cohort 1"), ("btcv/btcv_0003_ct.nii.gz", "cohort 2"),
                  ("labeled/totalseg_example_ct_3mm.nii.gz", "cohort 3"))]  # fmt: skip
    segmentations = [segmentation for _, _, segmentation in labeled]
    candidates = logic.unlabeledCandidates([], segmentations)
    assert [n.GetName() for n in candidates] == ["cohort 1", "cohort 2", "cohort 3"] and candidates == unlabeled
    options = {"spacing_mm": [6.0, 6.0, 6.0], "patch_size_vox": [16, 32, 32], "budget_minutes": 0, "steps": 4}
    volumes = logic.pairVolumes(segmentations, [])
    output = logic.newProbePath("cohort")
    task = logic.prepareFinetune(volumes, segmentations, output, backbonePath=tiny_backbone,
                                 finetuneOptions=options, unlabeledVolumeNodes=candidates)  # fmt: skip
    path = logic.run(task)
    metadata = ds.readWeightsMetadata(path)
    record = metadata["config"]["finetune"]
    assert record["steps"] == 4 and record["cases"] == ["CT a", "CT b", "unlabeled: cohort 1", "unlabeled: cohort 2",
                                                        "unlabeled: cohort 3"]  # fmt: skip
    # the two labeled volumes hold the same CT and annotations: each unlabeled volume has one distinct registration
    assert len(list(Path(output).with_suffix(".run").glob("registrations/*.npz"))) == 3
    # a cohort volume: the network fused with its registrations (a 4-step network may still paint no organ: the
    # labels' change is held in test_cohort_fusion.py; here, that the status line says which answer was used)
    fused = logic.segment(candidates[0], path)
    assert "in the model's training cohort: the network fused with its 2 registrations" in fused.GetAttribute(
        ds.COHORT_FUSION_ATTRIBUTE)  # fmt: skip
    assert not logic.segment(labeled[0][1], path).GetAttribute(ds.COHORT_FUSION_ATTRIBUTE)  # not in the cohort
