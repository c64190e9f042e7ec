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
  it); veto: the slice BPR was trained on slices the right way up, so a mirrored reading stands only when the
  slice BPR's levels of the slices turned over lie far closer to a straight line along the scan than those of
  the slices as they are (contrast-filled heart and vessels in front of the spine can pull the bone reading
  forward);
* **left-right**: the balance of liver-like soft tissue (40-140 HU) in upper-abdominal slices between the
  patient's right and left of the body's centre (positive: right, where the liver is); veto: in chest slices the
  heart (soft tissue in front of the spine, between the lungs) lying to the left turns a contradicting liver
  reading into "unsure".

A cue at or above its ``sure`` level agrees; at or below its ``alarm`` level it says mirrored; in between (or
vetoed, or with too little anatomy to read) it is unsure. Unsure never refuses; only a confident contradiction
does. Levels were calibrated on every real CT at hand, as given and mirrored (``benchmarks/orientation_check.py``,
``docs/orientation.md``).

When the spine does not agree (reads mirrored or unsure), the slice BPR reads the working volume turned over
too: that reading decides the veto, says mirrored on its own where the spine is unsure (its levels at most half
as scattered turned over), and, when front-back is mirrored, the head-feet and left-right cues use it (the slice
BPR reads upside-down slices poorly); when front-back stays unsure, head-feet is mirrored only if both readings
say so.
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
           "orientation_scores", "slice_levels", "turned_levels"]

log = logging.getLogger(__name__)

ORIENTATION_MODES = ("check", "fix", "trust-header")
"""``check``: refuse a scan whose anatomy contradicts its header; ``fix``: mirror its voxels to match the
anatomy (results go back onto the input grid as given); ``trust-header``: no check."""

AXES = ("left-right", "front-back", "head-feet")
"""The patient axes, in the order of LPS x, y, z."""

# levels (see the module docstring; measured margins in docs/orientation.md)
HEAD_FEET_ALARM, HEAD_FEET_SURE = -0.55, 0.3
FRONT_BACK_ALARM, FRONT_BACK_SURE = -0.08, 0.05
LEFT_RIGHT_ALARM, LEFT_RIGHT_SURE = -0.1, 0.05
TURNED_RESIDUAL_SHARE = 0.9
"""A front-back alarm stands only when the slice BPR's levels of the slices turned over scatter about their straight
line at most this share of the levels of the slices as they are (otherwise: unsure)."""
TURNED_ALONE_SHARE = 0.5
"""Where the spine is unsure, front-back is mirrored when the share above is at most this."""
TURNED_EVERY, TURNED_MIN_SLICES = 3, 16
"""The slices turned over are read every third (a third of the slice BPR's cost; both residuals on those slices),
or more densely where that would leave fewer than 16."""
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
    as_is_residual: float = float("nan")
    turned_residual: float = float("nan")
    seconds: float = 0.0

    @property
    def mirrored(self) -> list[int]:
        return [i for i, axis in enumerate(AXES) if self.cues[axis].verdict == "mirrored"]

    def message(self, name: str) -> str:
        """The one line a refusal says (names every mirrored axis, what was read and what was expected)."""
        parts = []
        for axis in (AXES[i] for i in self.mirrored):
            cue = self.cues[axis]
            reason = cue.note or f"{cue.what} {cue.value:+.2f}, expected > {cue.alarm:g}"
            parts.append(f"{axis} is mirrored against the header ({reason})")
        return (f"{name}: the anatomy says " + " and ".join(parts) + "; fix the header, or pass --orientation fix "
                "to mirror it, or --orientation trust-header")  # fmt: skip

    def describe(self) -> str:
        return "; ".join(f"{axis} {cue.verdict} ({cue.describe()})" for axis, cue in self.cues.items())

    def to_dict(self) -> dict:
        return {"cues": {a: c.to_dict() for a, c in self.cues.items()}, "mirrored": [AXES[i] for i in self.mirrored],
                "heart": None if not np.isfinite(self.heart) else round(float(self.heart), 4),
                "as_is_residual_mm": _rounded(self.as_is_residual), "turned_residual_mm": _rounded(self.turned_residual)}


def add_orientation_argument(parser: argparse.ArgumentParser, what: str = "input CT") -> None:
    """The ``--orientation`` option (one definition for every command that reads CTs)."""
    parser.add_argument("--orientation", choices=ORIENTATION_MODES, default="check",
                        help=f"whether the anatomy must agree with the {what}'s header about which way is head, "
                        "front and left: check (refuse a scan that is mirrored against its header), fix (mirror it "
                        "to match the anatomy; results land on the input grid as given), trust-header (no check) "
                        "(default: check)")  # fmt: skip


def _rounded(value: float) -> float | None:
    return round(float(value), 2) if np.isfinite(value) else None


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
            spine does not agree; NaN for slices not read, see :func:`slice_levels`); None: not read again (and
            no front-back veto).
    """
    import time

    start = time.perf_counter()
    step = max(1, int(round(3.0 / float(spacing_mm[0]))))  # 3 mm in-plane is enough and 4x cheaper
    coarse = hu[:, ::step, ::step]
    pixel = float(spacing_mm[0]) * step
    body = coarse > _BODY_HU
    counts = body.sum(axis=(1, 2))
    slices = np.flatnonzero(counts > 0.3 * counts.max(initial=0)) if counts.any() else np.zeros(0, int)

    ys, xs = np.arange(coarse.shape[1], dtype=float), np.arange(coarse.shape[2], dtype=float)
    centres, spine = {}, []
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
    front_back_value = float(np.median(spine)) if len(spine) >= _MIN_SLICES else float("nan")
    front_back = Cue("front-back", front_back_value, FRONT_BACK_ALARM, FRONT_BACK_SURE, "spine behind body centre")
    positions = slices * float(spacing_mm[2])
    slice_z = np.asarray(slice_z, float)
    head_feet = Cue("head-feet", _correlation(positions, slice_z[slices]), HEAD_FEET_ALARM, HEAD_FEET_SURE,
                    "slice BPR slope")  # fmt: skip
    turned_residual = float("nan")
    as_is_residual = _fit_residual(positions, slice_z[slices])
    if np.isfinite(front_back_value) and front_back_value < FRONT_BACK_SURE and rescore is not None:
        # the slice BPR was trained on slices the right way up: a scan whose slices are upside down reads along z
        # far worse than the same slices turned over; a spine reading of "mirrored" stands only when it does, and
        # where the spine is unsure (a cropped body), a far better reading turned over says mirrored on its own
        turned_z = np.asarray(rescore(np.ascontiguousarray(hu[:, ::-1, :])), float)
        read = np.isfinite(turned_z[slices])  # the slices read turned over; both residuals on these
        as_is_residual = _fit_residual(positions[read], slice_z[slices][read])
        turned_residual = _fit_residual(positions[read], turned_z[slices][read])
        share = turned_residual / as_is_residual if as_is_residual > 0 else float("nan")
        if front_back_value <= FRONT_BACK_ALARM:
            front_back.decide("" if share <= TURNED_RESIDUAL_SHARE else
                              "the slice BPR reads the slices no better turned over")  # fmt: skip
        else:
            front_back.decide()
            if share <= TURNED_ALONE_SHARE:
                front_back.verdict = "mirrored"
                front_back.note = (f"the slice BPR's levels stray {turned_residual:.0f} mm from a straight line with "
                                   f"the slices turned over, {as_is_residual:.0f} mm as they are")  # fmt: skip
        turned = _correlation(positions[read], turned_z[slices][read])
        if front_back.verdict == "mirrored":
            known = np.flatnonzero(np.isfinite(turned_z))
            head_feet.value = turned
            slice_z = np.interp(np.arange(slice_z.size), known, turned_z[known]) if known.size else turned_z
        else:
            # which way is up is unsure: head-feet is mirrored only where both readings say so
            head_feet.value = max(head_feet.value, turned)
    else:
        front_back.decide()
    head_feet.decide()

    liver_r = liver_l = heart_r = heart_l = 0
    liver_slices = heart_slices = 0
    z_of = slice_z  # the slice levels are the anatomy's whichever way the slices run
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
                                 heart=heart, as_is_residual=as_is_residual,
                                 turned_residual=turned_residual)  # fmt: skip
    reading.seconds = time.perf_counter() - start
    return reading


def _fit_residual(positions: np.ndarray, levels: np.ndarray) -> float:
    """The spread (mm) of the slice levels about their straight-line fit along the slice positions."""
    if positions.size < 3:
        return float("nan")
    return float(np.std(levels - np.polyval(np.polyfit(positions, levels, 1), positions)))


def slice_levels(hu: np.ndarray, model, spacing_mm: Sequence[float], every: int = 1) -> np.ndarray:
    """The slice BPR's anatomical z (mm) of every ``every``-th slice of a ``(z, y, x)`` working-grid volume (NaN
    for the others), as the orientation check reads it."""
    import torch

    from DiffusionSegLib.bpr.sampling import TrainingVolume
    from DiffusionSegLib.bpr.slice_model import body_crop_centres_mm, slice_offsets

    cfg = model.config
    tensor = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
    volume = TrainingVolume.from_array(tensor, cfg.spacing_mm, cfg.window_hu, cfg.pool_zyx)
    picked = np.arange(0, hu.shape[0], max(1, int(every)))
    offsets = slice_offsets(model, volume, body_crop_centres_mm(tensor, cfg.spacing_mm)[picked])
    levels = np.full(hu.shape[0], np.nan)
    levels[picked] = offsets[:, 2].double().numpy() + picked * float(spacing_mm[2])
    return levels


def assess_orientation(scores, axis=None) -> OrientationReading:
    """The cues of a CT from its slice BPR reading (:meth:`~DiffusionSegLib.probe.extent.BodyAxis.slice_scores`);
    ``axis``: the ``BodyAxis`` that read it (to read a turned volume again)."""
    hu = scores.hu[0, 0].numpy()
    spacing = scores.prepared.image.GetSpacing()

    def rescore(turned: np.ndarray) -> np.ndarray:
        return turned_levels(turned, axis.model, spacing)

    return read_anatomy(hu, spacing, scores.slice_z, rescore if axis is not None else None)


def turned_levels(turned: np.ndarray, model, spacing_mm: Sequence[float]) -> np.ndarray:
    """The check's second reading: :func:`slice_levels` of the working volume turned over, on every
    :data:`TURNED_EVERY`-th slice (at least :data:`TURNED_MIN_SLICES` slices where the scan has them)."""
    every = max(1, min(TURNED_EVERY, turned.shape[0] // TURNED_MIN_SLICES))
    return slice_levels(turned, model, spacing_mm, every)


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
