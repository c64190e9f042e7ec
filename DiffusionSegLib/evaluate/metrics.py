"""Per-organ segmentation metrics (Dice, HD95 in mm) and their summary by organ size group.

A thin layer over :mod:`monai.metrics`: each organ is cut out of the two label maps as a binary mask,
cropped to the bounding box of its union (plus one voxel) so that whole CT volumes never need a one-hot copy,
and scored with :func:`monai.metrics.compute_dice` and :func:`monai.metrics.compute_hausdorff_distance`
(``percentile=95``, ``spacing=`` in mm).

Conventions:
    * Label maps are integer arrays in SimpleITK's array order ``(z, y, x)`` (``sitk.GetArrayFromImage``).
    * ``spacing_mm`` is taken in SimpleITK's order ``(x, y, z)`` (``image.GetSpacing()``) and reversed here.
    * Empty cases (an organ missing from the reference, the prediction, or both):

      ========================  ===========================  ======  ======
      in reference              in prediction                dice    hd95_mm
      ========================  ===========================  ======  ======
      yes                       yes                          score   score
      yes                       no (missed organ)            0.0     NaN
      no                        yes (false-positive organ)   0.0     NaN
      no                        no                           NaN     NaN
      ========================  ===========================  ======  ======

      NaN means "not defined" and is left out of every mean by :func:`summarise`. An HD95 against an empty mask
      would be infinite and poison any average; the failure is already counted by the Dice of 0 and by the
      ``present_in_*`` flags, so HD95 is NaN there.
    * HD95 follows MONAI: the symmetric variant, i.e. the larger of the two directed 95th percentiles of the
      surface distances (surface = mask minus its erosion), measured between voxel centres.
    * MONAI computes in float32, so values carry about seven significant digits.

Size groups (:data:`ORGAN_SIZE_GROUPS`) follow the paper's Big / Medium / Small split of the 13 BTCV organs.
The paper does not list its members, so the rule is ours, taken from the mean organ volume over the 20 BTCV
label maps of the shared data: big ≥ 100 mL (liver 1715, stomach 443, spleen 362, left / right kidney 149 / 145),
medium 20–100 mL (aorta 96, inferior vena cava 83, pancreas 76, portal and splenic vein 35, gallbladder 31),
small < 20 mL (esophagus 15, left / right adrenal gland 5.1 / 4.2). The gaps at both thresholds are wide
(145 → 96 mL and 31 → 15 mL), so the grouping does not hinge on the exact cut.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from DiffusionSegLib.data.labels import OrganLabel, canonical_organ_name
from DiffusionSegLib.errors import UserInputError

__all__ = [
    "SIZE_GROUPS",
    "ORGAN_SIZE_GROUPS",
    "METRIC_KEYS",
    "organ_metrics",
    "size_group_means",
    "summarise",
]

SIZE_GROUPS: tuple[str, ...] = ("big", "medium", "small")
"""The size groups in display order (the paper's Big / Medium / Small)."""

ORGAN_SIZE_GROUPS: dict[str, str] = {
    "liver": "big",
    "stomach": "big",
    "spleen": "big",
    "left kidney": "big",
    "right kidney": "big",
    "aorta": "medium",
    "inferior vena cava": "medium",
    "pancreas": "medium",
    "portal vein and splenic vein": "medium",
    "gallbladder": "medium",
    "esophagus": "small",
    "left adrenal gland": "small",
    "right adrenal gland": "small",
}
"""BTCV organ (standard name) → size group; see the module docstring for the rule."""

METRIC_KEYS: tuple[str, ...] = ("dice", "hd95_mm")
"""The numeric metrics of :func:`organ_metrics`, summarised by :func:`summarise`."""

_HD_PERCENTILE = 95.0


def _check_label_map(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise UserInputError(f"{what} must be a 3D label map (z, y, x); got shape {array.shape}")
    if array.size == 0:
        raise UserInputError(f"{what} is empty (shape {array.shape})")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    is_float = np.issubdtype(array.dtype, np.floating)
    if is_float and np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)):
        return array.astype(np.int64)
    raise UserInputError(f"{what} must hold integer label ids; got dtype {array.dtype} with non-integer values")


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing_mm)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise UserInputError(f"spacing_mm must be three positive numbers (x, y, z) in mm; got {tuple(spacing_mm)}")
    return values  # type: ignore[return-value]


def _bounding_boxes(label_map: np.ndarray, values: Sequence[int]) -> dict[int, tuple[slice, ...]]:
    """Bounding box of every listed label value present in ``label_map`` (one pass with ``find_objects``)."""
    from scipy import ndimage

    top = max(values)
    clipped = np.where((label_map > 0) & (label_map <= top), label_map, 0) if label_map.min() < 0 else label_map
    objects = ndimage.find_objects(clipped, max_label=top)
    return {v: objects[v - 1] for v in values if objects[v - 1] is not None}


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    boxes = [box for box in (a, b) if box is not None]
    return tuple(
        slice(max(0, min(box[d].start for box in boxes) - 1), min(shape[d], max(box[d].stop for box in boxes) + 1))
        for d in range(len(shape))
    )


def organ_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    labels: Sequence[OrganLabel],
    spacing_mm: Sequence[float],
) -> dict[str, dict[str, Any]]:
    """Dice and HD95 (mm) of every organ of ``labels`` between a predicted and a reference label map.

    Args:
        prediction: predicted label map, integer array of shape ``(z, y, x)`` (SimpleITK array order).
        reference: reference (ground-truth) label map, same shape and grid as ``prediction``.
        labels: the organs to score; ``label.value`` is the id in both maps, ``label.name`` the result key.
        spacing_mm: voxel spacing in SimpleITK order ``(x, y, z)``, as returned by ``image.GetSpacing()``;
            reversed internally to match the array axes.

    Returns:
        ``{organ name: {"dice": float, "hd95_mm": float, "present_in_reference": bool,
        "present_in_prediction": bool}}`` in the order of ``labels``. Empty cases follow the table of the
        module docstring: missed or false-positive organ → dice 0 and hd95 NaN; absent from both → both NaN.

    Raises:
        UserInputError: the maps are not 3D integer arrays of one shape, the spacing is not three positive
            numbers, ``labels`` is empty, or two labels share a value or a name.

    Example::

        >>> from DiffusionSegLib.data.labels import BTCV_LABELS
        >>> scores = organ_metrics(pred, ref, BTCV_LABELS, image.GetSpacing())
        >>> scores["liver"]["dice"], scores["liver"]["hd95_mm"]
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance
    import torch

    prediction = _check_label_map(prediction, "prediction")
    reference = _check_label_map(reference, "reference")
    if prediction.shape != reference.shape:
        raise UserInputError(
            f"prediction shape {prediction.shape} differs from reference shape {reference.shape} (z, y, x); "
            "resample the prediction onto the reference grid first"
        )
    spacing_xyz = _check_spacing(spacing_mm)
    spacing_zyx = spacing_xyz[::-1]
    labels = list(labels)
    if not labels:
        raise UserInputError("labels is empty: give at least one OrganLabel to score")
    values = [int(label.value) for label in labels]
    names = [label.name for label in labels]
    if min(values) <= 0 or len(set(values)) != len(values) or len(set(names)) != len(names):
        raise UserInputError(f"labels need distinct positive values and distinct names; got {list(zip(values, names))}")

    pred_boxes = _bounding_boxes(prediction, values)
    ref_boxes = _bounding_boxes(reference, values)
    results: dict[str, dict[str, Any]] = {}
    for label in labels:
        value = int(label.value)
        in_pred, in_ref = value in pred_boxes, value in ref_boxes
        entry: dict[str, Any] = {
            "dice": math.nan,
            "hd95_mm": math.nan,
            "present_in_reference": in_ref,
            "present_in_prediction": in_pred,
        }
        if in_pred != in_ref:
            entry["dice"] = 0.0
        elif in_pred and in_ref:
            box = _union_box(pred_boxes.get(value), ref_boxes.get(value), prediction.shape)
            # (B=1, C=1, z, y, x) binary masks of the union's bounding box
            y_pred = torch.from_numpy(prediction[box] == value)[None, None]
            y_ref = torch.from_numpy(reference[box] == value)[None, None]
            dice = compute_dice(y_pred.float(), y_ref.float(), include_background=True, ignore_empty=False)
            with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                hd95 = compute_hausdorff_distance(
                    y_pred, y_ref, include_background=True, percentile=_HD_PERCENTILE, spacing=list(spacing_zyx)
                )
            entry["dice"] = float(dice.reshape(-1)[0])
            entry["hd95_mm"] = float(hd95.reshape(-1)[0])
        results[label.name] = entry
    return results


def _nan_mean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    finite = np.asarray([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=np.float64)
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def size_group_means(
    organ_values: Mapping[str, float | None],
    groups: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Mean of one number per organ over each size group and over all organs (NaN-aware).

    Args:
        organ_values: ``{organ name (any spelling): value}``, e.g. one case's Dice per organ. NaN or ``None``
            values are skipped.
        groups: organ → group map; default :data:`ORGAN_SIZE_GROUPS`. Organs outside it count in ``"mean"`` only.

    Returns:
        ``{"big": float, "medium": float, "small": float, "mean": float}`` (plus any other group named in
        ``groups``); NaN where a group has no finite value.
    """
    groups = ORGAN_SIZE_GROUPS if groups is None else groups
    group_names = list(dict.fromkeys([*SIZE_GROUPS, *groups.values()]))
    by_group: dict[str, list[float]] = {g: [] for g in group_names}
    everything: list[float] = []
    for organ, value in organ_values.items():
        if value is None:
            continue
        value = float(value)
        everything.append(value)
        group = groups.get(canonical_organ_name(organ))
        if group is not None:
            by_group[group].append(value)
    out = {g: _nan_mean(v) for g, v in by_group.items()}
    out["mean"] = _nan_mean(everything)
    return out


def summarise(
    per_case: Sequence[Mapping[str, Any]],
    groups: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Mean ± std over cases of every metric, per organ, per size group and overall (NaN-aware).

    A group (or overall) score is first computed per case, as the mean over that case's organs with a defined
    value (:func:`size_group_means`), then summarised over the cases. With no organ missing this equals the mean of
    the per-organ means. Standard deviations are population (``ddof=0``) over cases; ``n`` counts the cases
    that had a defined value, so organs absent from both maps simply lower ``n``.

    Args:
        per_case: one :func:`organ_metrics` result per case; an item may also be ``{"organs": <that result>, ...}``.
        groups: organ → size group; default :data:`ORGAN_SIZE_GROUPS`.

    Returns:
        ``{"n_cases": int,
        "organs": {organ: {metric: {"mean", "std", "n"}, "n_missed": int, "n_false_positive": int}},
        "groups": {group: {metric: {"mean", "std", "n"}}},
        "overall": {metric: {"mean", "std", "n"}}}`` for each metric of :data:`METRIC_KEYS`;
        organs in the order first met.

    Raises:
        UserInputError: ``per_case`` is empty or an item is not an organ → metrics mapping.
    """
    groups = ORGAN_SIZE_GROUPS if groups is None else groups
    if not per_case:
        raise UserInputError("summarise needs at least one case; got an empty list")
    cases: list[Mapping[str, Any]] = []
    for index, item in enumerate(per_case):
        organs = item.get("organs", item) if isinstance(item, Mapping) else None
        if not isinstance(organs, Mapping) or not all(isinstance(v, Mapping) for v in organs.values()):
            raise UserInputError(
                f"case {index} is not an organ → metrics mapping (organ_metrics output): {item!r:.200}"
            )
        cases.append(organs)

    organ_names = list(dict.fromkeys(name for case in cases for name in case))
    organs_out: dict[str, Any] = {}
    for name in organ_names:
        entries = [case[name] for case in cases if name in case]
        organs_out[name] = {key: _stats([e.get(key, math.nan) for e in entries]) for key in METRIC_KEYS}
        organs_out[name]["n_missed"] = sum(
            bool(e.get("present_in_reference")) and not e.get("present_in_prediction", True) for e in entries
        )
        organs_out[name]["n_false_positive"] = sum(
            bool(e.get("present_in_prediction")) and not e.get("present_in_reference", True) for e in entries
        )

    per_case_groups = {
        key: [size_group_means({n: e.get(key, math.nan) for n, e in case.items()}, groups) for case in cases]
        for key in METRIC_KEYS
    }
    group_names = [g for g in per_case_groups[METRIC_KEYS[0]][0] if g != "mean"]
    return {
        "n_cases": len(cases),
        "organs": organs_out,
        "groups": {
            g: {key: _stats([c[g] for c in per_case_groups[key]]) for key in METRIC_KEYS} for g in group_names
        },
        "overall": {key: _stats([c["mean"] for c in per_case_groups[key]]) for key in METRIC_KEYS},
    }
