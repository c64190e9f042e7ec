"""The bridge between MRML nodes (3D Slicer) and the library's ``SimpleITK.Image`` volumes.

This is the only Slicer-aware module of the library. ``slicer`` and ``vtk`` are imported inside the functions,
so ``DiffusionSegLib`` imports without Slicer; the functions run inside Slicer and with the ``slicer-core``
wheel (the real MRML scene without Qt). Every function that creates a node takes the scene explicitly
(``slicer.mrmlScene`` in the application).

Geometry is kept exactly. MRML describes a volume in RAS with an IJK→RAS matrix; ITK describes it in LPS with
origin, spacing and direction. The conversion negates the first two rows of the origin and direction, which is
exact in floating point, and both store the voxels in the same (k, j, i) = (z, y, x) memory order, so no
array is transposed. Parent transforms of nodes are not applied (as in Slicer's ``sitkUtils``): an image
describes the node's local grid. Label values survive a segmentation node (tag :data:`LABEL_VALUE_TAG`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.data.labels import OrganLabel, organ_label
from DiffusionSegLib.errors import UserInputError

__all__ = [
    "LABEL_VALUE_TAG",
    "coordinate_node_from_image",
    "image_from_volume_node",
    "labelmap_from_segmentation_node",
    "register_segmentation_converters",
    "resolve_output_node",
    "save_segmentation_node",
    "segmentation_node_from_labelmap",
    "volume_node_from_image",
]

log = logging.getLogger(__name__)

LABEL_VALUE_TAG = "DiffusionSeg.LabelValue"
"""Segment tag holding the integer label value a segment had in the label map it was made from."""

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse: RAS = _LPS_FROM_RAS @ LPS too


def _node_label(node: Any) -> str:
    return f"'{node.GetName()}' ({node.GetClassName()})"


def _require_node(node: Any, class_name: str, role: str) -> None:
    if node is None:
        raise UserInputError(f"no {role} was given; select a {class_name} node")
    if not hasattr(node, "IsA") or not node.IsA(class_name):
        kind = node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__
        raise UserInputError(f"the {role} is a {kind}; expected a {class_name}")


def _require_3d(image: Any, role: str) -> None:
    if not isinstance(image, sitk.Image):
        raise UserInputError(f"the {role} is a {type(image).__name__}; expected a SimpleITK.Image")
    if image.GetDimension() != 3:
        raise UserInputError(f"the {role} is {image.GetDimension()}D with size {image.GetSize()}; expected a 3D image")


def _ras_geometry(image: sitk.Image) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Spacing, RAS origin and RAS direction (3, 3), columns = axis directions, of an LPS image."""
    direction = _LPS_FROM_RAS @ np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = _LPS_FROM_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return tuple(image.GetSpacing()), tuple(float(v) for v in origin), direction


def _direction_matrix(direction: np.ndarray) -> Any:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r, c in np.ndindex(3, 3):
        matrix.SetElement(r, c, float(direction[r, c]))
    return matrix


def _image_on_node_grid(array: np.ndarray, volume_node: Any) -> sitk.Image:
    """An image of ``array`` (K, J, I[, C]) with the LPS geometry of the voxels stored in ``volume_node``."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(matrix)
    direction_ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    spacing = tuple(float(v) for v in volume_node.GetSpacing())
    origin_ras = np.asarray(volume_node.GetOrigin(), dtype=np.float64)
    first = np.asarray(volume_node.GetImageData().GetExtent()[::2], dtype=np.float64)
    if first.any():  # the stored voxels start at a non-zero IJK index
        origin_ras = origin_ras + direction_ras @ (first * np.asarray(spacing))
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(float(v) for v in _LPS_FROM_RAS @ origin_ras))
    image.SetDirection(tuple(float(v) for v in (_LPS_FROM_RAS @ direction_ras).ravel()))
    return image


def _vtk_image_from_array(array: np.ndarray) -> Any:
    """A vtkImageData owning a copy of ``array`` of shape (K, J, I) or (K, J, I, C)."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    flat = array.reshape(-1, array.shape[3]) if array.ndim == 4 else array.ravel()
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    return image


def _array_from_vtk_image(image: Any) -> np.ndarray:
    """A view (K, J, I) or (K, J, I, C) on the scalars of a vtkImageData."""
    from vtk.util import numpy_support

    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise UserInputError("the volume holds no voxels (no scalar image data)")
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    return numpy_support.vtk_to_numpy(scalars).reshape(shape + ((components,) if components > 1 else ()))


def _smallest_label_dtype(max_value: int) -> type[np.integer]:
    if max_value <= np.iinfo(np.uint8).max:
        return np.uint8
    return np.uint16 if max_value <= np.iinfo(np.uint16).max else np.int32


def image_from_volume_node(volume_node: Any) -> sitk.Image:
    """Copy a scalar, label map or vector volume node into a ``SimpleITK.Image`` on the same grid.

    Args:
        volume_node: a ``vtkMRMLVolumeNode`` with image data (scalar, label map or vector volume).

    Returns:
        An image with the node's voxels (its pixel type; a vector image for multi-component volumes) and the
        exact geometry converted to LPS. The voxels are copied. A parent transform of the node is not applied.

    Raises:
        UserInputError: no node, not a volume node, or a node without voxels.
    """
    _require_node(volume_node, "vtkMRMLVolumeNode", "input volume")
    image = _image_on_node_grid(_array_from_vtk_image(volume_node.GetImageData()), volume_node)
    if volume_node.GetParentTransformNode() is not None:
        log.warning("volume %s is under a transform; its local (untransformed) grid is used", _node_label(volume_node))
    return image


def volume_node_from_image(image: sitk.Image, scene: Any, name: str, node: Any = None) -> Any:
    """Put an image into a scalar volume node (one component) or a vector volume node (several components).

    Args:
        image: a 3D ``SimpleITK.Image`` (any real pixel type).
        scene: the ``vtkMRMLScene`` (``slicer.mrmlScene`` in Slicer).
        name: base name of a new node; made unique in the scene (see :func:`resolve_output_node`).
        node: an existing node to overwrite in place (``vtkMRMLScalarVolumeNode`` — label map nodes included —
            for one component, ``vtkMRMLVectorVolumeNode`` for several), or ``None`` for a new node.

    Returns:
        The node, with a copy of the voxels, the exact geometry (RAS) and a display node.

    Raises:
        UserInputError: the image is not 3D or the given node has the wrong class.

    Example::

        ct_node = volume_node_from_image(read_volume("ct.nii.gz"), slicer.mrmlScene, "CT")
    """
    _require_3d(image, "image")
    components = image.GetNumberOfComponentsPerPixel()
    node_class = "vtkMRMLVectorVolumeNode" if components > 1 else "vtkMRMLScalarVolumeNode"
    if components == 1 and node is not None and node.IsA("vtkMRMLVectorVolumeNode"):  # a subclass of scalar
        raise UserInputError(f"the output {_node_label(node)} is a vector volume; a scalar image needs a {node_class}")
    node = resolve_output_node(scene, node_class, name, node)
    vtk_image = _vtk_image_from_array(sitk.GetArrayViewFromImage(image))
    was_modifying = node.StartModify()
    node.SetAndObserveImageData(vtk_image)
    spacing, origin, direction = _ras_geometry(image)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirectionMatrix(_direction_matrix(direction))
    node.EndModify(was_modifying)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def coordinate_node_from_image(coords_image: sitk.Image, scene: Any, name: str, node: Any = None) -> Any:
    """Put a 3-component coordinate map (x R→L, y A→P, z I→S) into a vector volume node with a colour display.

    Slicer shows a 3-component vector volume as RGB after applying the display node's window/level to every
    component, so the window/level is set to span the map's value range over all components: red, green and
    blue then read as the x, y and z coordinate.

    Args:
        coords_image: a 3D image with 3 components per voxel (e.g. ``sitkVectorFloat32`` from
            ``predict_body_coordinates``), on the CT grid.
        scene: the ``vtkMRMLScene``.
        name: base name of a new node (made unique).
        node: an existing ``vtkMRMLVectorVolumeNode`` to overwrite, or ``None`` for a new node.

    Returns:
        The ``vtkMRMLVectorVolumeNode`` on the exact input geometry.

    Raises:
        UserInputError: the image is not 3D, has not 3 components or has NaN/inf, or the node has the wrong class.
    """
    _require_3d(coords_image, "coordinate map")
    if coords_image.GetNumberOfComponentsPerPixel() != 3:
        raise UserInputError(
            f"the coordinate map has {coords_image.GetNumberOfComponentsPerPixel()} components per voxel; expected 3"
        )
    values = sitk.GetArrayViewFromImage(coords_image)
    low, high = float(np.min(values)), float(np.max(values))  # no masked copy: maps of whole CTs are large
    if not (np.isfinite(low) and np.isfinite(high)):
        raise UserInputError(f"the coordinate map holds non-finite values (range {low} .. {high})")
    node = volume_node_from_image(coords_image, scene, name, node)
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(low, high if high > low else low + 1.0)
    return node


def segmentation_node_from_labelmap(
    label_image: sitk.Image,
    labels: list[OrganLabel],
    scene: Any,
    name: str,
    reference_volume_node: Any = None,
    node: Any = None,
) -> Any:
    """Turn a label map into a segmentation node with one named, coloured, coded segment per label present.

    Segments share one labelmap layer on the label map's own grid (no resampling), in increasing label order.
    Each gets the label's name, colour and terminology entry (where the label has one; Slicer's default
    "Tissue" entry otherwise), its label value as the layer value and in the tag :data:`LABEL_VALUE_TAG`, and its
    name (made unique) as segment ID. Labels listed but absent from the image get no segment (empty organs are
    skipped); values present but not listed get a segment "label <value>" with a generated colour.

    Args:
        label_image: a 3D integer label map (0 = background, positive values = labels).
        labels: names, colours and codes of the label values (e.g. ``BTCV_LABELS`` or ``labels_from_names``).
        scene: the ``vtkMRMLScene``.
        name: base name of a new node (made unique).
        reference_volume_node: the volume the label map was computed on: sets the segmentation's reference
            geometry (the grid the Segment Editor works on) and its parent transform. ``None``: the label map's
            own grid is the reference geometry.
        node: an existing ``vtkMRMLSegmentationNode`` to overwrite (its segments are replaced), or ``None``.

    Returns:
        The ``vtkMRMLSegmentationNode``.

    Raises:
        UserInputError: the image is not a 3D integer label map, holds negative values, ``labels`` repeats a value,
            or a node has the wrong class.
    """
    import slicer

    register_segmentation_converters()
    _require_3d(label_image, "label map")
    array = sitk.GetArrayViewFromImage(label_image)
    if label_image.GetNumberOfComponentsPerPixel() != 1 or not np.issubdtype(array.dtype, np.integer):
        raise UserInputError(
            f"the label map has pixel type {label_image.GetPixelIDTypeAsString()}; expected one integer component"
        )
    if reference_volume_node is not None:
        _require_node(reference_volume_node, "vtkMRMLVolumeNode", "reference volume")
    by_value: dict[int, OrganLabel] = {}
    for label in labels:
        if label.value in by_value:
            raise UserInputError(
                f"label value {label.value} is listed twice ({by_value[label.value].name!r}, {label.name!r})"
            )
        by_value[label.value] = label
    present = [int(v) for v in np.unique(array) if v != 0]
    if present and present[0] < 0:
        raise UserInputError(f"the label map holds negative values (min {present[0]}); labels must be >= 0")
    if unlisted := [v for v in present if v not in by_value]:
        log.warning("label values %s have no name in the legend; their segments are named 'label <value>'", unlisted)
    spacing, origin, direction = _ras_geometry(label_image)
    layer = slicer.vtkOrientedImageData()  # one labelmap layer shared by all segments
    layer.ShallowCopy(_vtk_image_from_array(array.astype(_smallest_label_dtype(present[-1] if present else 0))))
    layer.SetSpacing(*spacing)
    layer.SetOrigin(*origin)
    layer.SetDirectionMatrix(_direction_matrix(direction))

    node = resolve_output_node(scene, "vtkMRMLSegmentationNode", name, node)
    segmentation = node.GetSegmentation()
    was_modifying = node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        if reference_volume_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
            node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        else:
            segmentation.SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                slicer.vtkSegmentationConverter.SerializeImageGeometry(layer),
            )
        labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        for value in present:
            label = by_value.get(value) or organ_label(value, f"label {value}")
            segment = slicer.vtkSegment()
            segment.SetName(label.name)
            segment.SetNameAutoGenerated(False)
            segment.SetColor(*label.color)
            segment.SetColorAutoGenerated(False)
            if label.terminology:  # = SetTerminology() where Slicer has it
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), label.terminology)
            segment.SetTag(LABEL_VALUE_TAG, str(value))
            segment.SetLabelValue(value)
            segment.AddRepresentation(labelmap_name, layer)
            segmentation.AddSegment(segment, segmentation.GenerateUniqueSegmentID(label.name))
    finally:
        node.EndModify(was_modifying)
    return node


def _segment_label_values(segmentation: Any, segment_ids: list[str]) -> list[int]:
    """The :data:`LABEL_VALUE_TAG` values when every segment has a distinct positive one, else 1..N."""
    import vtk

    tags = [vtk.reference("") for _ in segment_ids]
    found = [segmentation.GetSegment(i).GetTag(LABEL_VALUE_TAG, tag) for i, tag in zip(segment_ids, tags, strict=True)]
    values = [int(str(tag)) if ok and str(tag).isdigit() else 0 for ok, tag in zip(found, tags, strict=True)]
    return values if 0 not in values and len(set(values)) == len(values) else list(range(1, len(segment_ids) + 1))


def labelmap_from_segmentation_node(
    segmentation_node: Any, reference_volume_node: Any
) -> tuple[sitk.Image, dict[int, str]]:
    """Export all segments into one label map on the exact grid of a reference volume.

    This is how Segment Editor annotations become training labels. Segments made by
    :func:`segmentation_node_from_labelmap` keep their label values (tag :data:`LABEL_VALUE_TAG`); otherwise
    (any segment without the tag, or repeated values) the segments get values 1..N in segment order. Where
    segments overlap, the later segment in the list wins. Segments on another grid, or under a different parent
    transform, are resampled (nearest neighbour) by Slicer's segmentation logic.

    Args:
        segmentation_node: the ``vtkMRMLSegmentationNode`` (binary labelmap segments, or closed surfaces).
        reference_volume_node: the volume whose grid (size, spacing, origin, direction) the label map takes.

    Returns:
        ``(label_image, names)``: the label map (``sitkUInt8``, or ``sitkUInt16`` / ``sitkInt32`` for large
        values) with the reference volume's geometry, and ``{label value: segment name}`` for every segment,
        empty segments included.

    Raises:
        UserInputError: a node is missing or of the wrong class, the reference volume has no voxels, or the
            segmentation has no segments or none convertible to a binary labelmap.

    Example::

        labels, names = labelmap_from_segmentation_node(segmentation_node, ct_node)
        organ_labels = labels_from_names(names)  # standard names, colours and codes
    """
    import slicer
    import vtk

    register_segmentation_converters()
    _require_node(segmentation_node, "vtkMRMLSegmentationNode", "segmentation")
    _require_node(reference_volume_node, "vtkMRMLVolumeNode", "reference volume")
    if reference_volume_node.GetImageData() is None:
        raise UserInputError(f"reference volume {_node_label(reference_volume_node)} holds no voxels")
    segmentation = segmentation_node.GetSegmentation()
    segment_ids = list(segmentation.GetSegmentIDs())
    if not segment_ids:
        raise UserInputError(f"segmentation '{segmentation_node.GetName()}' has no segments; draw at least one")
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(labelmap_name) and not segmentation.CreateRepresentation(labelmap_name):
        raise UserInputError(
            f"segments of '{segmentation_node.GetName()}' cannot be converted to a binary labelmap "
            f"(source representation '{segmentation.GetSourceRepresentationName()}')"
        )
    values = _segment_label_values(segmentation, segment_ids)

    ids = vtk.vtkStringArray()
    label_values = vtk.vtkIntArray()
    for segment_id, value in zip(segment_ids, values, strict=True):
        ids.InsertNextValue(segment_id)
        label_values.InsertNextValue(value)
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, reference_volume_node, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        merged, label_values,
    )  # fmt: skip
    reference_extent = tuple(reference_volume_node.GetImageData().GetExtent())
    if merged.GetPointData().GetScalars() is None or tuple(merged.GetExtent()) != reference_extent:
        raise RuntimeError(
            f"segment export gave extent {tuple(merged.GetExtent())}; expected the reference extent {reference_extent}"
        )
    array = _array_from_vtk_image(merged).astype(_smallest_label_dtype(max(values)))
    image = _image_on_node_grid(array, reference_volume_node)
    names = {v: segmentation.GetSegment(i).GetName() for i, v in zip(segment_ids, values, strict=True)}
    return image, names


def resolve_output_node(scene: Any, node_class: str, base_name: str, chosen_node: Any = None) -> Any:
    """The node an operation writes to: the user's choice (overwritten), otherwise always a new node.

    A new node gets a name unique in the scene (``base_name``, else ``base_name_1`` …): a node of the same name
    is never reused silently.

    Args:
        scene: the ``vtkMRMLScene``.
        node_class: MRML class of the output, e.g. ``"vtkMRMLSegmentationNode"``.
        base_name: name of a new node before it is made unique.
        chosen_node: the output node the user chose (a ``node_class`` or subclass, in ``scene``), or ``None``.

    Returns:
        ``chosen_node`` or a new node of ``node_class`` added to ``scene``.

    Raises:
        UserInputError: the chosen node has the wrong class or is not in the scene.
        ValueError: ``node_class`` is not an MRML node class known to the scene.
    """
    if chosen_node is not None:
        _require_node(chosen_node, node_class, "output node")
        if chosen_node.GetScene() is not scene:
            raise UserInputError(f"output node {_node_label(chosen_node)} is not in this scene")
        return chosen_node
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(base_name))
    if node is None:
        raise ValueError(f"node_class {node_class!r} is not an MRML node class registered in the scene")
    return node


def register_segmentation_converters() -> None:
    """Register Slicer's binary labelmap ↔ closed surface conversion rules, once.

    Slicer registers them at start-up, ``slicer-core`` does not. A segmentation copies the rules when it is created,
    so with ``slicer-core`` call this before making segmentation nodes; without them a segment cannot be copied
    between segmentations, nor a surface turned into a labelmap. This module calls it itself; a repeat does nothing.
    """
    import slicer

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule_class in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                       slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):  # fmt: skip
        if rule_class.__name__ not in registered:
            factory.RegisterConverterRule(rule_class())


def save_segmentation_node(segmentation_node: Any, path: str | Path) -> Path:
    """Write a segmentation node to a ``.seg.nrrd`` file (segment names, colours, tags and terminology included).

    The node's own storage node (where Slicer saves the scene) is left as it is.

    Args:
        segmentation_node: the ``vtkMRMLSegmentationNode``.
        path: output file; must end with ``.seg.nrrd`` (or ``.nrrd``). Missing folders are created.

    Returns:
        The path written.

    Raises:
        UserInputError: wrong node class or file extension.
        OSError: the file could not be written.
    """
    _require_node(segmentation_node, "vtkMRMLSegmentationNode", "segmentation")
    path = Path(path)
    if not path.name.endswith(".nrrd"):
        raise UserInputError(f"segmentation file {path} must end with .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = segmentation_node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node):
        raise OSError(f"could not write segmentation '{segmentation_node.GetName()}' to {path}")
    return path
