"""Labeled volumes on the working grid, and class-balanced patches cut from them (nnU-Net style).

A patch centre is drawn by picking a class uniformly among those present in the volume (background included)
and then a random voxel of that class, so small organs are seen as often as the liver.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.errors import UserInputError

__all__ = ["LabeledVolume", "prepare_labeled_volume", "prepare_unlabeled_volume", "class_index_map",
           "sample_patch_origins", "cut_patch", "IGNORE"]

IGNORE = 255
"""Class index of voxels without a label to learn from (pseudo-labels where the atlases disagree): never a patch
centre, left out of the loss."""


@dataclass
class LabeledVolume:
    """One labeled CT on the working grid, with its network inputs.

    Attributes:
        name: for messages.
        inputs: :class:`~DiffusionSegLib.features.VolumeInputs` of the whole working volume.
        classes: (D, H, W) uint8 class indices (0 background, i + 1 for ``labels[i]``, :data:`IGNORE` where
            unknown).
        working: the working-grid HU image the inputs were built from (for registration), when kept.
        pseudo: the classes were propagated from other scans (not drawn by a person).
    """

    name: str
    inputs: object
    classes: np.ndarray
    working: sitk.Image | None = None
    pseudo: bool = False

    @functools.cached_property
    def present(self) -> set[int]:
        """Class indices with at least one voxel in the volume (:data:`IGNORE` left out)."""
        return {int(c) for c in np.unique(self.classes)} - {IGNORE}


def class_index_map(label_array: np.ndarray, labels: Sequence[OrganLabel]) -> np.ndarray:
    """Map label ids to class indices: ``labels[i].value`` → ``i + 1``, anything else → 0 (background).

    Args:
        label_array: integer label ids (any shape).
        labels: the organs the probe learns, in class order.

    Returns:
        uint8 array of the same shape.
    """
    if len(labels) > 254:
        raise UserInputError(f"{len(labels)} organs requested; at most 254 are supported")
    values = label_array.astype(np.int64, copy=False)
    top = int(max(values.max(initial=0), max(label.value for label in labels)))
    lookup = np.zeros(top + 1, dtype=np.uint8)
    for index, label in enumerate(labels):
        lookup[label.value] = index + 1
    return lookup[np.clip(values, 0, top)]


def prepare_labeled_volume(image: sitk.Image, label: sitk.Image, labels: Sequence[OrganLabel], backbone,
                           feature_cfg, name: str = "case", *, bpr=None, device="cpu") -> LabeledVolume:  # fmt: skip
    """Prepare a CT and its label map on the backbone's working grid and build its network inputs.

    The labels are resampled label by label with linear interpolation (smoother than nearest neighbour, and
    small organs survive), exactly as the working CT voxels are placed.

    Raises:
        UserInputError: the CT is not usable or the label map is not on its grid.
    """
    from DiffusionSegLib.data.volume import check_label_map
    from DiffusionSegLib.features import build_inputs
    from DiffusionSegLib.preprocess import prepare_volume, resample_labels_onto, to_canonical_orientation

    check_label_map(label, image, f"label map of {name}")
    prepared = prepare_volume(image, backbone.pretrain.preprocess)
    working_labels = resample_labels_onto(to_canonical_orientation(label), prepared.image, "linear")
    classes = class_index_map(sitk.GetArrayViewFromImage(working_labels), labels)
    inputs = build_inputs(prepared.image, backbone, feature_cfg, bpr=bpr, device=device)
    return LabeledVolume(name, inputs, classes, prepared.image)


def prepare_unlabeled_volume(image: sitk.Image, backbone, feature_cfg, name: str = "case", *, bpr=None,
                             device="cpu") -> LabeledVolume:  # fmt: skip
    """Prepare a CT without labels on the backbone's working grid: its network inputs and working image; every
    voxel :data:`IGNORE` until pseudo-labels are given.

    Raises:
        UserInputError: the CT is not usable.
    """
    from DiffusionSegLib.features import build_inputs
    from DiffusionSegLib.preprocess import prepare_volume

    prepared = prepare_volume(image, backbone.pretrain.preprocess)
    inputs = build_inputs(prepared.image, backbone, feature_cfg, bpr=bpr, device=device)
    classes = np.full(inputs.tensor.shape[-3:], IGNORE, dtype=np.uint8)
    return LabeledVolume(name, inputs, classes, prepared.image, pseudo=True)


def sample_patch_origins(classes: np.ndarray, patch_size: Sequence[int], count: int,
                         rng: np.random.Generator) -> list[tuple[int, int, int]]:  # fmt: skip
    """Corners of ``count`` class-balanced patches.

    Args:
        classes: (D, H, W) class indices.
        patch_size: (d, h, w).
        count: number of patches.
        rng: random generator.

    Returns:
        Corner indices (z, y, x); a corner may be negative or the patch may overrun the volume where the
        volume is smaller than the patch (:func:`cut_patch` pads).
    """
    present = np.unique(classes)
    present = present[present != IGNORE]
    flat = classes.reshape(-1)
    by_class = {int(c): None for c in present}
    origins = []
    for _ in range(count):
        chosen = int(rng.choice(present))
        if chosen == 0:  # background is most of the volume: rejection sampling keeps memory low
            for _ in range(1000):
                index = int(rng.integers(flat.size))
                if flat[index] == 0:
                    break
        else:
            if by_class[chosen] is None:
                by_class[chosen] = np.flatnonzero(flat == chosen)
            index = int(rng.choice(by_class[chosen]))
        centre = np.unravel_index(index, classes.shape)
        corner = []
        for c, p, n in zip(centre, patch_size, classes.shape, strict=True):
            start = int(c) - p // 2
            corner.append(int(np.clip(start, 0, n - p)) if n >= p else (n - p) // 2)
        origins.append(tuple(corner))
    return origins


def _crop(array: torch.Tensor, origin: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Crop the last three axes at ``origin`` with zero padding outside."""
    spatial = array.shape[-3:]
    out = torch.zeros((*array.shape[:-3], *size), dtype=array.dtype)
    src, dst = [], []
    for o, s, n in zip(origin, size, spatial, strict=True):
        lo, hi = max(o, 0), min(o + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[(..., *dst)] = array[(..., *src)]
    return out


def cut_patch(volume: LabeledVolume, origin: Sequence[int], size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs (1, 1 + K + N, d, h, w) and classes (1, 1, d, h, w) int64 of one patch (zero padded)."""
    window = _crop(volume.inputs.tensor[0], origin, size)[None]
    classes = _crop(torch.from_numpy(volume.classes), origin, size)[None, None].long()
    return window, classes
