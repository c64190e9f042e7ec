"""The Slicer logic checks a volume's orientation against its anatomy: a mirrored volume is refused with the axis
named, before any node is made (the widget then offers the fix)."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
from helpers import data_path


def test_mirrored_volume_is_refused_by_the_segment_job(ds, scene, tmp_path):
    from DiffusionSegLib.mrml import volume_node_from_image
    from DiffusionSegLib.preprocess.orientation import OrientationMismatch, mirror_image, mirrored_index_axes
    from DiffusionSegLib.resources import default_probe_path

    ct = sitk.ReadImage(str(data_path("labeled/totalseg_example_ct_3mm.nii.gz")))
    node = volume_node_from_image(mirror_image(ct, mirrored_index_axes(ct, [2])), scene, "mirrored")
    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path)
    before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(OrientationMismatch, match="head-feet is mirrored") as error:
        logic.segment(node, default_probe_path())
    assert error.value.axes == ["head-feet"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    task = logic.prepareSegment(node, default_probe_path(), orientation="fix")
    assert task.job["orientation"] == "fix"
    logic.cancel(task)
