"""DiffusionSegLib.mrml against the real MRML scene of ``slicer-core`` (no fake ``slicer`` module).

Real CT and label maps come from ``../shared/data`` (override with DIFFUSIONSEG_DATA); synthetic images with
oblique, flipped directions and anisotropic spacing cover the geometry edge cases.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import REPO, data_path, import_or_missing

from DiffusionSegLib.data.labels import BTCV_LABELS, OrganLabel, read_legend
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.mrml import (
    LABEL_VALUE_TAG,
    coordinate_node_from_image,
    image_from_volume_node,
    labelmap_from_segmentation_node,
    register_segmentation_converters,
    resolve_output_node,
    save_segmentation_node,
    segmentation_node_from_labelmap,
    volume_node_from_image,
)

slicer = import_or_missing("slicer", "slicer-core is not installed (pip install slicer-core)")

CT = "labeled/totalseg_example_ct_3mm.nii.gz"
SEG = "labeled/totalseg_example_seg117_pseudo_fast.nii.gz"
CLASSMAP = "labeled/totalseg_v2_total_classmap.json"

# A rotation about an oblique axis followed by a flip of the third axis (determinant -1).
_ROTATION = np.array([[0.36, 0.48, -0.80], [-0.80, 0.60, 0.0], [0.48, 0.64, 0.60]])
OBLIQUE_FLIPPED = tuple((_ROTATION @ np.diag([1.0, 1.0, -1.0])).ravel())
ANISOTROPIC = (0.71, 0.93, 2.5)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return sitk.ReadImage(str(data_path(CT)))


@pytest.fixture(scope="module")
def seg117() -> sitk.Image:
    return sitk.ReadImage(str(data_path(SEG)))


def synthetic(array: np.ndarray, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.SetSpacing(ANISOTROPIC)
    image.SetOrigin((-12.25, 40.5, -301.125))
    image.SetDirection(OBLIQUE_FLIPPED)
    return image


def assert_same_image(actual: sitk.Image, expected: sitk.Image) -> None:
    """Same voxels, pixel type and geometry, exactly (no tolerance)."""
    assert actual.GetSize() == expected.GetSize()
    assert actual.GetSpacing() == expected.GetSpacing()
    assert actual.GetOrigin() == expected.GetOrigin()
    assert actual.GetDirection() == expected.GetDirection()
    assert actual.GetPixelID() == expected.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(actual), sitk.GetArrayViewFromImage(expected))


def test_library_imports_without_slicer():
    code = "import sys, DiffusionSegLib.mrml; sys.exit('slicer' in sys.modules or 'vtk' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# --- volumes ---------------------------------------------------------------------------------------------------


def test_real_ct_round_trip_is_exact(scene, ct):
    node = volume_node_from_image(ct, scene, "CT")
    assert node.GetClassName() == "vtkMRMLScalarVolumeNode" and node.GetName() == "CT"
    assert node.GetDisplayNode() is not None
    ras = np.array(ct.GetOrigin()) * [-1, -1, 1]
    assert node.GetOrigin() == tuple(ras)
    assert_same_image(image_from_volume_node(node), ct)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.int32])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 4, 2)])
def test_oblique_flipped_anisotropic_round_trip(scene, dtype, shape):
    array = (np.arange(np.prod(shape)).reshape(shape) * 3 - 20).astype(dtype)
    image = synthetic(array)
    node = volume_node_from_image(image, scene, "synthetic")
    assert node.GetImageData().GetDimensions() == image.GetSize()  # (i, j, k) = (x, y, z)
    assert_same_image(image_from_volume_node(node), image)


def test_node_physical_points_match_itk(scene):
    """An IJK index maps to the same point in MRML (RAS) and ITK (LPS): no transposed or flipped axis."""
    import vtk

    image = synthetic(np.zeros((4, 5, 6), np.int16))
    node = volume_node_from_image(image, scene, "synthetic")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    for index in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (5, 4, 3)]:
        ras = matrix.MultiplyPoint((*index, 1.0))[:3]
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(ras, np.array(lps) * [-1, -1, 1], atol=1e-9)


def test_vector_image_round_trip(scene):
    array = np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype(np.float32)
    image = synthetic(array, is_vector=True)
    node = volume_node_from_image(image, scene, "vectors")
    assert node.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert_same_image(image_from_volume_node(node), image)


def test_update_in_place(scene, ct):
    node = volume_node_from_image(ct, scene, "CT")
    small = synthetic(np.ones((2, 3, 4), np.int16))
    assert volume_node_from_image(small, scene, "ignored", node=node) is node
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    assert_same_image(image_from_volume_node(node), small)


def test_wrong_output_class_and_dimension_are_user_errors(scene):
    vector_node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "v")
    with pytest.raises(UserInputError, match="vtkMRMLScalarVolumeNode"):
        volume_node_from_image(synthetic(np.zeros((2, 2, 2), np.int16)), scene, "x", node=vector_node)
    with pytest.raises(UserInputError, match="2D"):
        volume_node_from_image(sitk.Image(4, 4, sitk.sitkInt16), scene, "x")
    with pytest.raises(UserInputError, match="no input volume"):
        image_from_volume_node(None)
    with pytest.raises(UserInputError, match="no voxels"):
        image_from_volume_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


def test_image_data_with_nonzero_extent(scene):
    """Voxels stored from IJK (2, 3, 1) on: the image's origin is the physical point of that index."""
    import vtk

    image = synthetic(np.zeros((4, 5, 6), np.int16))
    node = volume_node_from_image(image, scene, "cropped")
    clip = vtk.vtkImageClip()
    clip.SetInputData(node.GetImageData())
    clip.SetOutputWholeExtent(2, 5, 3, 4, 1, 3)
    clip.ClipDataOn()
    clip.Update()
    node.SetAndObserveImageData(clip.GetOutput())
    cropped = image_from_volume_node(node)
    assert cropped.GetSize() == (4, 2, 3)
    np.testing.assert_allclose(cropped.GetOrigin(), image.TransformIndexToPhysicalPoint((2, 3, 1)), atol=1e-9)
    assert cropped.GetDirection() == image.GetDirection()


# --- coordinate maps ---------------------------------------------------------------------------------------------


def test_coordinate_node(scene, ct):
    rng = np.random.default_rng(1)
    coords = sitk.GetImageFromArray(rng.uniform(-200, 350, size=(*ct.GetSize()[::-1], 3)).astype(np.float32), True)
    coords.CopyInformation(ct)
    node = coordinate_node_from_image(coords, scene, "CT coordinates")
    assert node.GetClassName() == "vtkMRMLVectorVolumeNode"
    assert node.GetImageData().GetNumberOfScalarComponents() == 3
    back = image_from_volume_node(node)
    assert_same_image(back, coords)
    display = node.GetDisplayNode()
    values = sitk.GetArrayViewFromImage(coords)
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(values.min()) and display.GetWindowLevelMax() == pytest.approx(
        values.max()
    )


def test_coordinate_node_needs_three_components(scene):
    with pytest.raises(UserInputError, match="2 components"):
        coordinate_node_from_image(synthetic(np.zeros((2, 2, 2, 2), np.float32), True), scene, "c")
    with pytest.raises(UserInputError, match="non-finite"):
        coordinate_node_from_image(synthetic(np.full((2, 2, 2, 3), np.nan, np.float32), True), scene, "c")
    assert scene.GetNumberOfNodesByClass("vtkMRMLVectorVolumeNode") == 0  # nothing left behind


# --- segmentations -----------------------------------------------------------------------------------------------


def test_real_segmentation_round_trip(scene, ct, seg117):
    labels = read_legend(data_path(CLASSMAP))
    ct_node = volume_node_from_image(ct, scene, "CT")
    node = segmentation_node_from_labelmap(seg117, labels, scene, "TotalSegmentator", reference_volume_node=ct_node)
    segmentation = node.GetSegmentation()
    present = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(seg117)) if v]
    assert segmentation.GetNumberOfSegments() == len(present) == 61
    assert segmentation.GetNumberOfLayers() == 1  # one shared labelmap, not 61 copies
    by_value = {label.value: label for label in labels}
    for segment_id, value in zip(segmentation.GetSegmentIDs(), present, strict=True):
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == by_value[value].name
        assert segment.GetColor() == pytest.approx(by_value[value].color)
        assert segment.GetLabelValue() == value
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    assert liver.GetTerminology() == by_value[5].terminology
    reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert reference is ct_node

    labelmap, names = labelmap_from_segmentation_node(node, ct_node)
    assert_same_image(labelmap, seg117)
    assert names == {v: by_value[v].name for v in present}


def test_sparse_values_on_oblique_grid_without_reference(scene):
    array = np.zeros((5, 6, 7), np.int32)
    array[1:3, 2:5, 1:4] = 3
    array[3:, :2, 4:] = 7
    array[0, 0, 0] = 300
    labelmap = synthetic(array)
    labels = [OrganLabel(3, "liver", (1.0, 0.0, 0.0)), OrganLabel(7, "spleen", (0.0, 1.0, 0.0)),
              OrganLabel(300, "tumour", (0.0, 0.0, 1.0)), OrganLabel(9, "absent organ", (1.0, 1.0, 0.0))]  # fmt: skip
    node = segmentation_node_from_labelmap(labelmap, labels, scene, "sparse")
    names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)]
    assert names == ["liver", "spleen", "tumour"]  # the absent label gets no (empty) segment
    reference = volume_node_from_image(synthetic(np.zeros((5, 6, 7), np.int16)), scene, "grid")
    exported, value_names = labelmap_from_segmentation_node(node, reference)
    assert exported.GetPixelID() == sitk.sitkUInt16
    assert_same_image(exported, sitk.Cast(labelmap, sitk.sitkUInt16))
    assert value_names == {3: "liver", 7: "spleen", 300: "tumour"}


def test_unlisted_values_get_generic_segments(scene):
    array = np.zeros((2, 3, 4), np.uint8)
    array[0, 0, :2] = 1
    array[1, 2, 3] = 42
    node = segmentation_node_from_labelmap(synthetic(array), BTCV_LABELS, scene, "partial legend")
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["spleen", "label 42"]


def test_user_segments_get_values_in_order_and_later_wins(scene):
    """Segments drawn in Slicer have no label tag: values 1..N in segment order; overlaps go to the later one."""
    grid = synthetic(np.zeros((4, 4, 4), np.int16))
    reference = volume_node_from_image(grid, scene, "grid")
    first, second = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    first[:, :2] = 1
    second[:, 1:3] = 1  # overlaps `first` on row 1
    node = segmentation_node_from_labelmap(synthetic(first), [OrganLabel(1, "A", (1, 0, 0))], scene, "d", reference)
    other = segmentation_node_from_labelmap(synthetic(second), [OrganLabel(1, "B", (0, 1, 0))], scene, "o", reference)
    segmentation = node.GetSegmentation()
    assert segmentation.CopySegmentFromSegmentation(other.GetSegmentation(), "B")
    assert segmentation.GetNumberOfLayers() == 2  # two overlapping layers, as the Segment Editor makes them
    for i in range(segmentation.GetNumberOfSegments()):
        segmentation.GetNthSegment(i).RemoveTag(LABEL_VALUE_TAG)
    labelmap, names = labelmap_from_segmentation_node(node, reference)
    expected = np.where(second == 1, 2, first)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labelmap), expected)
    assert names == {1: "A", 2: "B"}
    segmentation.SetSegmentIndex("B", 0)  # now B is first: A wins the overlap
    labelmap, names = labelmap_from_segmentation_node(node, reference)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labelmap), np.where(first == 1, 2, second))
    assert names == {1: "B", 2: "A"}


def test_closed_surface_segment_is_exported(scene):
    """A segment whose source is a surface (an imported model) is rasterised onto the reference grid."""
    import vtk

    grid = sitk.Image(20, 20, 20, sitk.sitkInt16)
    grid.SetSpacing((2.0, 2.0, 2.0))
    reference = volume_node_from_image(grid, scene, "grid")  # RAS -> LPS: voxels span R/A in [-38, 0], S in [0, 38]
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(-20.0, -20.0, 20.0)
    sphere.SetRadius(10.0)
    sphere.SetThetaResolution(32)
    sphere.SetPhiResolution(32)
    sphere.Update()
    register_segmentation_converters()  # before the node exists: a segmentation copies the rules when created
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "model")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    )
    node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", (1.0, 0.5, 0.0))
    labelmap, names = labelmap_from_segmentation_node(node, reference)
    assert names == {1: "ball"}
    voxels = sitk.GetArrayViewFromImage(labelmap)
    assert voxels[10, 10, 10] == 1 and voxels[0, 0, 0] == 0
    sphere_voxels = 4 / 3 * np.pi * 10.0**3 / 2.0**3
    assert abs(int(voxels.sum()) - sphere_voxels) < 0.15 * sphere_voxels


def test_overwrite_segmentation_node_in_place(scene, seg117):
    node = segmentation_node_from_labelmap(seg117, read_legend(data_path(CLASSMAP)), scene, "seg")
    small = np.zeros((2, 2, 2), np.uint8)
    small[0] = 6
    assert segmentation_node_from_labelmap(synthetic(small), BTCV_LABELS, scene, "x", node=node) is node
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    assert node.GetSegmentation().GetNthSegment(0).GetName() == "liver"


def test_segmentation_user_errors(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    reference = volume_node_from_image(synthetic(np.zeros((2, 2, 2), np.int16)), scene, "grid")
    with pytest.raises(UserInputError, match="no segments"):
        labelmap_from_segmentation_node(empty, reference)
    with pytest.raises(UserInputError, match="expected a vtkMRMLVolumeNode"):
        labelmap_from_segmentation_node(empty, empty)
    with pytest.raises(UserInputError, match="integer"):
        segmentation_node_from_labelmap(synthetic(np.zeros((2, 2, 2), np.float32)), BTCV_LABELS, scene, "f")
    with pytest.raises(UserInputError, match="negative"):
        segmentation_node_from_labelmap(synthetic(-np.ones((2, 2, 2), np.int16)), BTCV_LABELS, scene, "n")
    with pytest.raises(UserInputError, match="listed twice"):
        segmentation_node_from_labelmap(synthetic(np.ones((2, 2, 2), np.uint8)), BTCV_LABELS * 2, scene, "d")


def test_save_segmentation_node(tmp_path, scene, ct, seg117):
    labels = read_legend(data_path(CLASSMAP))
    ct_node = volume_node_from_image(ct, scene, "CT")
    node = segmentation_node_from_labelmap(seg117, labels, scene, "seg", reference_volume_node=ct_node)
    path = save_segmentation_node(node, tmp_path / "out" / "seg.seg.nrrd")
    assert path.is_file() and node.GetStorageNode() is None  # the node's own storage settings are untouched

    other_scene = slicer.vtkMRMLScene()
    loaded = other_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage = loaded.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    segmentation = loaded.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 61
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    assert liver.GetTerminology() == next(label.terminology for label in labels if label.name == "liver")
    ct_copy = volume_node_from_image(ct, other_scene, "CT")
    labelmap, _ = labelmap_from_segmentation_node(loaded, ct_copy)
    assert_same_image(labelmap, seg117)
    with pytest.raises(UserInputError, match=r"\.seg\.nrrd"):
        save_segmentation_node(node, tmp_path / "seg.nii.gz")


# --- output nodes ------------------------------------------------------------------------------------------------


def test_resolve_output_node_never_reuses_a_same_named_node(scene):
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "DiffusionSeg")
    new = resolve_output_node(scene, "vtkMRMLSegmentationNode", "DiffusionSeg")
    assert new is not existing and new.GetName() != "DiffusionSeg"
    newer = resolve_output_node(scene, "vtkMRMLSegmentationNode", "DiffusionSeg")
    assert len({existing.GetName(), new.GetName(), newer.GetName()}) == 3
    assert resolve_output_node(scene, "vtkMRMLSegmentationNode", "DiffusionSeg", existing) is existing
    assert resolve_output_node(scene, "vtkMRMLSegmentationNode", "Fresh").GetName() == "Fresh"


def test_resolve_output_node_checks_the_chosen_node(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    with pytest.raises(UserInputError, match="vtkMRMLSegmentationNode"):
        resolve_output_node(scene, "vtkMRMLSegmentationNode", "s", volume)
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "l")  # a subclass is accepted
    assert resolve_output_node(scene, "vtkMRMLScalarVolumeNode", "s", label_node) is label_node
    with pytest.raises(UserInputError, match="not in this scene"):
        resolve_output_node(slicer.vtkMRMLScene(), "vtkMRMLScalarVolumeNode", "s", volume)
    with pytest.raises(ValueError, match="vtkNoSuchNode"):
        resolve_output_node(scene, "vtkNoSuchNode", "s")
