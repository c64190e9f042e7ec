"""The anatomy checks the header's orientation: which way is head, front and left.

A CT whose voxels were mirrored along one axis while its header stayed the same (a conversion that dropped or
mixed up the affine) looks like any other CT to the gate, and the network segments it into garbage. The anatomy
says which way the body lies; each cue reads the working grid (canonical LPS per the header, the slice BPR's
1.5 x 1.5 x 3 mm grid sampled at 3 mm in-plane) and gives a signed value, positive where it agrees with the
header:

* **head-feet**: the correlation of the slice BPR's per-slice anatomical z (the network's level of each slice,
  before the monotone fit) with the slice position; -1 for a scan whose slices run feet-ward where the header
  says head-ward;
* **front-back**: where dense bone (> 200 HU) near the body's left-right centre (the spine) lies against the
  body's centre, in half the body's front-back extent (median over slices; positive: behind, as anatomy has
  it); veto: a mirrored reading is not trusted when most of the body's air (bowel gas, lungs) lies in front of
  the spine, as in a supine scan the right way up;
* **left-right**: the balance of liver-like soft tissue (40-140 HU) in upper-abdominal slices between the
  patient's right and left of the body's centre (positive: right, where the liver is); veto: in chest slices the
  heart (soft tissue in front of the spine, between the lungs) lying to the left turns a contradicting liver
  reading into "unsure".

A cue at or above its ``sure`` level agrees; at or below its ``alarm`` level it says mirrored; in between (or
vetoed, or with too little anatomy to read) it is unsure. Unsure never refuses; only a confident contradiction
does. Levels were calibrated on every real CT at hand, as given and mirrored (``benchmarks/orientation_check.py``,
``docs/orientation.md``).

A front-back mirror turns every slice upside down, which the slice BPR reads poorly: when the front-back cue says
mirrored, the head-feet and left-right cues are read again on the working volume turned the right way up.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.errors import UserInputError

__all__ = ["ORIENTATION_MODES", "AXES", "Cue", "OrientationMismatch", "OrientationReading", "add_orientation_argument", "read_anatomy",
           "assess_orientation", "check_orientation", "mirror_image", "mirror_axes_of", "mirrored_index_axes",
           "orientation_scores"]

log = logging.getLogger(__name__)

ORIENTATION_MODES = ("check", "fix", "trust-header")
"""``check``: refuse a scan whose anatomy contradicts its header; ``fix``: mirror its voxels to match the
anatomy (results go back onto the input grid as given); ``trust-header``: no check."""

AXES = ("left-right", "front-back", "head-feet")
"""The patient axes, in the order of LPS x, y, z."""

# levels (see the module docstring; measured margins in docs/orientation.md)
HEAD_FEET_ALARM, HEAD_FEET_SURE = -0.5, 0.3
FRONT_BACK_ALARM, FRONT_BACK_SURE = -0.08, 0.05
LEFT_RIGHT_ALARM, LEFT_RIGHT_SURE = -0.1, 0.05
AIR_BEHIND_VETO = 0.5
"""A front-back alarm is vetoed (unsure) when less than this share of the body's air lies behind the spine."""
HEART_SURE = 0.1
"""A heart reading at or above this (its soft tissue that much more on the left) vetoes a left-right alarm."""

_BODY_HU = -120.0  # above: body (BTCV's copies read -125 for air, lung and fat below it)
_BONE_HU = 200.0
_SPINE_BAND_MM = 24.0
_LIVER_HU = (40.0, 140.0)
_LIVER_Z_MM = (250.0, 420.0)
"""Slice-BPR levels of upper-abdominal slices (the shipped probe's liver spans 168-455 mm, its kidneys 125-330)."""
_HEART_Z_MM = (470.0, 560.0)
_HEART_HU = (0.0, 140.0)
_AIR_HU = -400.0
_MIN_SLICES = 5


@dataclass
class Cue:
    """One axis' reading: ``value`` (positive agrees with the header), the levels, and the verdict
    (``"agrees"``, ``"unsure"`` or ``"mirrored"``)."""

    axis: str
    value: float
    alarm: float
    sure: float
    what: str
    verdict: str = "unsure"
    note: str = ""

    def decide(self, veto: str = "") -> Cue:
        if not np.isfinite(self.value):
            self.verdict, self.note = "unsure", self.note or "too little anatomy to read"
        elif self.value <= self.alarm:
            self.verdict, self.note = ("unsure", veto) if veto else ("mirrored", self.note)
        elif self.value >= self.sure:
            self.verdict = "agrees"
        else:
            self.verdict = "unsure"
        return self

    def describe(self) -> str:
        return f"{self.what} {self.value:+.2f}"

    def to_dict(self) -> dict:
        return {"axis": self.axis, "value": round(float(self.value), 4) if np.isfinite(self.value) else None,
                "alarm": self.alarm, "sure": self.sure, "verdict": self.verdict, "note": self.note}


@dataclass
class OrientationReading:
    """The cues of one scan; ``mirrored``: the LPS axes (0 x left-right, 1 y front-back, 2 z head-feet) the
    anatomy says are mirrored against the header."""

    cues: dict[str, Cue]
    heart: float = float("nan")
    air_behind: float = float("nan")
    seconds: float = 0.0

    @property
    def mirrored(self) -> list[int]:
        return [i for i, axis in enumerate(AXES) if self.cues[axis].verdict == "mirrored"]

    def message(self, name: str) -> str:
        """The one line a refusal says (names every mirrored axis, what was read and what was expected)."""
        parts = []
        for axis in (AXES[i] for i in self.mirrored):
            cue = self.cues[axis]
            parts.append(f"{axis} is mirrored against the header ({cue.what} {cue.value:+.2f}, expected > "
                         f"{cue.alarm:g})")  # fmt: skip
        return (f"{name}: the anatomy says " + " and ".join(parts) + "; fix the header, or pass --orientation fix "
                "to mirror it, or --orientation trust-header")  # fmt: skip

    def describe(self) -> str:
        return "; ".join(f"{axis} {cue.verdict} ({cue.describe()})" for axis, cue in self.cues.items())

    def to_dict(self) -> dict:
        return {"cues": {a: c.to_dict() for a, c in self.cues.items()}, "mirrored": [AXES[i] for i in self.mirrored],
                "heart": None if not np.isfinite(self.heart) else round(float(self.heart), 4),
                "air_behind": None if not np.isfinite(self.air_behind) else round(float(self.air_behind), 4)}


def add_orientation_argument(parser: argparse.ArgumentParser, what: str = "input CT") -> None:
    """The ``--orientation`` option (one definition for every command that reads CTs)."""
    parser.add_argument("--orientation", choices=ORIENTATION_MODES, default="check",
                        help=f"whether the anatomy must agree with the {what}'s header about which way is head, "
                        "front and left: check (refuse a scan that is mirrored against its header), fix (mirror it "
                        "to match the anatomy; results land on the input grid as given), trust-header (no check) "
                        "(default: check)")  # fmt: skip


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def read_anatomy(hu: np.ndarray, spacing_mm: Sequence[float], slice_z: np.ndarray,
                 rescore: Callable[[np.ndarray], np.ndarray] | None = None) -> OrientationReading:  # fmt: skip
    """The cues of a working-grid CT.

    Args:
        hu: ``(z, y, x)`` HU on a canonical (LPS per the header) working grid.
        spacing_mm: its voxel size (x, y, z).
        slice_z: the slice BPR's anatomical z of each slice (mm).
        rescore: the slice BPR's z of each slice of another ``(z, y, x)`` volume on this grid (read again when the
            front-back cue says mirrored); None: not read again.
    """
    import time

    start = time.perf_counter()
    step = max(1, int(round(3.0 / float(spacing_mm[0]))))  # 3 mm in-plane is enough and 4x cheaper
    coarse = hu[:, ::step, ::step]
    pixel = float(spacing_mm[0]) * step
    body = coarse > _BODY_HU
    counts = body.sum(axis=(1, 2))
    slices = np.flatnonzero(counts > 0.3 * counts.max(initial=0)) if counts.any() else np.zeros(0, int)

    head_feet = Cue("head-feet", _correlation(slices.astype(float), np.asarray(slice_z, float)[slices]),
                    HEAD_FEET_ALARM, HEAD_FEET_SURE, "slice BPR slope")  # fmt: skip
    ys, xs = np.arange(coarse.shape[1], dtype=float), np.arange(coarse.shape[2], dtype=float)
    centres, spine, air_behind, air_front = {}, [], 0, 0
    band = _SPINE_BAND_MM / pixel
    for k in slices:
        mask = body[k]
        n = float(counts[k])
        cy, cx = float(mask.sum(1) @ ys) / n, float(mask.sum(0) @ xs) / n
        rows = np.flatnonzero(mask.any(1))
        half = max((rows[-1] - rows[0] + 1) / 2.0, 1.0)
        centres[k] = (cx, cy, rows[0], rows[-1])
        lo, hi = max(0, int(cx - band)), int(cx + band) + 1
        bone = np.flatnonzero((coarse[k][:, lo:hi] > _BONE_HU).any(1) & mask[:, lo:hi].any(1))
        if bone.size >= 2:
            strip = coarse[k][:, lo:hi] > _BONE_HU
            weights = strip.sum(1)
            sy = float(np.median(np.repeat(ys, weights)))
            spine.append((sy - cy) / half)
            # air inside the body's rows and columns (lungs, bowel gas), on either side of the spine
            rows_in = slice(rows[0], rows[-1] + 1)
            air = (coarse[k][rows_in] < _AIR_HU) & _inside_columns(mask[rows_in])
            per_row = air.sum(1)
            cut = int(round(sy)) - rows[0]
            air_behind += int(per_row[cut:].sum())
            air_front += int(per_row[:cut].sum())
    front_back_value = float(np.median(spine)) if len(spine) >= _MIN_SLICES else float("nan")
    total_air = air_behind + air_front
    behind = air_behind / total_air if total_air > 0.01 * counts.sum() else float("nan")
    # a supine scan the right way up has most of its air (bowel gas, the lungs' front) in front of the spine; a
    # mirrored one behind it: a spine reading of "mirrored" with the air in front is not trusted
    veto = "most of the body's air lies in front of the spine" if np.isfinite(behind) and behind < AIR_BEHIND_VETO \
        else ""  # fmt: skip
    front_back = Cue("front-back", front_back_value, FRONT_BACK_ALARM, FRONT_BACK_SURE,
                     "spine behind body centre").decide(veto)  # fmt: skip

    if front_back.verdict == "mirrored" and rescore is not None:
        turned = hu[:, ::-1, :]  # the slice BPR reads upside-down slices poorly: read them the right way up
        slice_z = np.asarray(rescore(np.ascontiguousarray(turned)), float)
        head_feet.value = _correlation(slices.astype(float), slice_z[slices])
    head_feet.decide()

    liver_r = liver_l = heart_r = heart_l = 0
    liver_slices = heart_slices = 0
    z_of = np.asarray(slice_z, float)
    if head_feet.verdict == "mirrored":
        pass  # the slice levels are the anatomy's whichever way the slices run
    for k, (cx, cy, top, bottom) in centres.items():
        plane = coarse[k]
        split = int(round(cx))
        if _LIVER_Z_MM[0] <= z_of[k] <= _LIVER_Z_MM[1]:
            soft = (plane >= _LIVER_HU[0]) & (plane <= _LIVER_HU[1])
            liver_r += int(soft[:, :split].sum())  # LPS: x runs from the patient's right to left
            liver_l += int(soft[:, split:].sum())
            liver_slices += 1
        elif _HEART_Z_MM[0] <= z_of[k] <= _HEART_Z_MM[1]:
            # in front of the body's centre (the heart), away from the body wall
            front = plane[top + (bottom - top) // 8 : int(cy)] if front_back.verdict != "mirrored" else \
                plane[int(cy) : bottom - (bottom - top) // 8]  # fmt: skip
            soft = (front >= _HEART_HU[0]) & (front <= _HEART_HU[1])
            width = max(1, int((bottom - top) // 2))
            heart_r += int(soft[:, max(0, split - width) : split].sum())
            heart_l += int(soft[:, split : split + width].sum())
            heart_slices += 1
    liver = (liver_r - liver_l) / (liver_r + liver_l) if liver_slices >= _MIN_SLICES and liver_r + liver_l else \
        float("nan")  # fmt: skip
    heart = (heart_l - heart_r) / (heart_r + heart_l) if heart_slices >= _MIN_SLICES and heart_r + heart_l else \
        float("nan")  # fmt: skip
    veto = "the heart lies on the left" if np.isfinite(heart) and heart >= HEART_SURE else ""
    left_right = Cue("left-right", liver, LEFT_RIGHT_ALARM, LEFT_RIGHT_SURE, "liver on the right").decide(veto)
    reading = OrientationReading({"left-right": left_right, "front-back": front_back, "head-feet": head_feet},
                                 heart=heart, air_behind=behind)  # fmt: skip
    reading.seconds = time.perf_counter() - start
    return reading


def _inside_columns(mask: np.ndarray) -> np.ndarray:
    """Per row, the columns between the body's first and last voxel in that row."""
    any_row = mask.any(1)
    first = np.where(any_row, mask.argmax(1), mask.shape[1])
    last = np.where(any_row, mask.shape[1] - 1 - mask[:, ::-1].argmax(1), -1)
    columns = np.arange(mask.shape[1])
    return (columns[None] >= first[:, None]) & (columns[None] <= last[:, None])


def assess_orientation(scores, axis=None) -> OrientationReading:
    """The cues of a CT from its slice BPR reading (:meth:`~DiffusionSegLib.probe.extent.BodyAxis.slice_scores`);
    ``axis``: the ``BodyAxis`` that read it (to read a turned volume again)."""
    import torch

    hu = scores.hu[0, 0].numpy()
    spacing = scores.prepared.image.GetSpacing()

    def rescore(turned: np.ndarray) -> np.ndarray:
        from DiffusionSegLib.bpr.inference import working_slice_offsets

        offsets = working_slice_offsets(torch.from_numpy(turned)[None, None], axis.model)
        return offsets[:, 2].double().numpy() + np.arange(turned.shape[0]) * float(spacing[2])

    return read_anatomy(hu, spacing, scores.slice_z, rescore if axis is not None else None)


def mirrored_index_axes(image: sitk.Image, lps_axes: Sequence[int]) -> list[int]:
    """The image's index axes (0 i, 1 j, 2 k) that run along the given LPS axes (the one most aligned with each)."""
    direction = np.abs(np.asarray(image.GetDirection(), float).reshape(3, 3))
    return sorted({int(np.argmax(direction[a])) for a in lps_axes})


def mirror_image(image: sitk.Image, index_axes: Sequence[int]) -> sitk.Image:
    """The image with its voxels mirrored along the given index axes and the same header."""
    if not index_axes:
        return image
    array = sitk.GetArrayViewFromImage(image)
    flipped = np.flip(array, axis=tuple(2 - a for a in index_axes))
    out = sitk.GetImageFromArray(np.ascontiguousarray(flipped), isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out


def mirror_axes_of(reading: OrientationReading) -> str:
    return " and ".join(AXES[i] for i in reading.mirrored)


class OrientationMismatch(UserInputError):
    """The anatomy says the scan is mirrored against its header (``axes``: the patient axes, e.g. ``["head-feet"]``);
    a front end may offer ``orientation="fix"``."""

    def __init__(self, message: str, axes: Sequence[str]) -> None:
        super().__init__(message)
        self.axes = list(axes)


def orientation_scores(image: sitk.Image, like=None):
    """The shipped slice BPR's reading of ``image`` (``(BodyAxis, SliceScores)``), or ``(None, None)`` when it
    is not installed."""
    from DiffusionSegLib.probe.extent import shipped_body_axis

    axis = shipped_body_axis()
    if axis is None:
        return None, None
    return axis, axis.slice_scores(image, like)


def check_orientation(image: sitk.Image, mode: str = "check", name: str = "CT",
                      labels: sitk.Image | None = None) -> tuple[sitk.Image, sitk.Image | None, list[int]]:  # fmt: skip
    """Check a CT's header orientation against its anatomy, for commands that read CTs without segmenting them.

    Args:
        image: the CT (already through the gate).
        mode: one of :data:`ORIENTATION_MODES`.
        name: how messages name the scan.
        labels: its label map (mirrored with it under ``fix``).

    Returns:
        ``(image, labels, index_axes)``: with ``fix`` and a mirrored anatomy, the image (and labels) with their
        voxels mirrored along ``index_axes`` and the same header; else the inputs and ``[]``.

    Raises:
        UserInputError: ``check`` and the anatomy says an axis is mirrored against the header.
    """
    if mode not in ORIENTATION_MODES:
        raise UserInputError(f"orientation mode {mode!r} is unknown; expected one of {', '.join(ORIENTATION_MODES)}")
    if mode == "trust-header":
        return image, labels, []
    axis, scores = orientation_scores(image)
    if scores is None:
        log.info("%s: orientation not checked: the slice BPR is not installed", name)
        return image, labels, []
    reading = assess_orientation(scores, axis)
    return apply_reading(reading, image, mode, name, labels)


def apply_reading(reading: OrientationReading, image: sitk.Image, mode: str, name: str,
                  labels: sitk.Image | None = None) -> tuple[sitk.Image, sitk.Image | None, list[int]]:  # fmt: skip
    """Act on a reading: nothing when no axis is mirrored; ``check``: refuse; ``fix``: mirror (and log)."""
    log.debug("%s orientation: %s", name, reading.describe())
    if not reading.mirrored:
        return image, labels, []
    if mode == "check":
        raise OrientationMismatch(reading.message(name), [AXES[i] for i in reading.mirrored])
    index_axes = mirrored_index_axes(image, reading.mirrored)
    log.warning("%s: the anatomy says %s is mirrored against the header (%s); its voxels were mirrored along "
                "index axes %s to match it", name, mirror_axes_of(reading),
                ", ".join(reading.cues[AXES[i]].describe() for i in reading.mirrored),
                ", ".join("ijk"[a] for a in index_axes))  # fmt: skip
    return mirror_image(image, index_axes), (mirror_image(labels, index_axes) if labels is not None else None), \
        index_axes  # fmt: skip
