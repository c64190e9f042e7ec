"""Segmenting a CT with a trained probe: working grid → sliding-window probe → input grid.

prepare (orient, crop, resample) → BPR coordinates (if the backbone uses them) → sliding-window probe logits on
the working grid (the head runs inside the window, features are never held for the whole volume) → softmax →
class probabilities resampled onto the **exact input grid** one class at a time with a running argmax (memory:
one float volume of the input grid, not one per class) → optional largest-connected-component clean-up per
organ → optional uncertainty map.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.probe.extent import FieldOfView, apply_field_of_view
from DiffusionSegLib.probe.train import TrainedProbe

__all__ = ["SegmentationResult", "SegmentationCancelled", "segment", "segment_with_probes", "write_segmentation",
           "keep_largest_components"]

log = logging.getLogger(__name__)

MIN_ORGAN_ML = 0.5
"""An organ whose voxels add up to less than this (half a millilitre; the smallest BTCV organs, the adrenal
glands, hold 2-6 ml) is a speck, not a finding: it is removed and reported as not found. (1.5 ml was tried:
it removed real small adrenal segments, benchmark mean Dice 0.703 -> 0.686.)"""


class SegmentationCancelled(RuntimeError):
    """``should_stop()`` returned True during segmentation."""


@dataclass
class SegmentationResult:
    """A label map on the input grid with its legend.

    Attributes:
        labels: integer label map (uint8, or uint16 for ids above 255) with exactly the input's size,
            spacing, origin and direction; voxel values are ``organs[i].value``, 0 is background.
        organs: the segments (names, colours, terminology).
        uncertainty: float32 map on the input grid, or None: with several noise draws the fraction of draws
            disagreeing with the ensemble ("disagreement"), else the normalised entropy of the class
            probabilities in [0, 1] ("entropy").
        uncertainty_kind: "disagreement", "entropy" or None.
        seconds: wall time per stage (prepare, slice_bpr, orientation, bpr, features, field_of_view,
            to_input_grid, cleanup, total); ``bpr`` holds the BPR coordinates and the network inputs built from
            them, ``slice_bpr`` the slice BPR's reading that the orientation check and the field of view share,
            ``orientation`` the check's cues.
        working_size: (x, y, z) size of the working grid.
        coordinates: with ``segment(..., coordinates=True)``, the BPR coordinate map the backbone was fed, on the
            input grid (3 components, mm-equivalent, as ``predict_body_coordinates`` gives); else None.
        field_of_view: for a probe that recorded its organs' body coordinates, what the scan covers and which
            organs lie outside it (those are not segmented and not in ``organs``); else None.
        not_found: the probe's organs (in view) with no voxels, or only specks below :data:`MIN_ORGAN_ML`;
            they are not in ``organs`` either, so ``organs`` lists exactly the segments that hold voxels.
        precision: the arithmetic the network ran in (``"float32"`` or ``"bfloat16"``).
        mirrored_axes: with ``orientation="fix"``, the input's index axes (0 i, 1 j, 2 k) its voxels were mirrored
            along to match the anatomy (the result is mirrored back onto the input grid); else empty.
        cohort_fusion: for a scan of the model's training cohort, the network's weight in its fusion with the
            scan's registrations (:mod:`DiffusionSegLib.cohort.fusion`); None where the network alone segmented.
        cohort_registrations: how many registrations that fusion used (0 without it).
    """

    labels: sitk.Image
    organs: list[OrganLabel]
    uncertainty: sitk.Image | None = None
    uncertainty_kind: str | None = None
    seconds: dict = field(default_factory=dict)
    working_size: tuple[int, int, int] = (0, 0, 0)
    coordinates: sitk.Image | None = None
    field_of_view: FieldOfView | None = None
    not_found: list[str] = field(default_factory=list)
    precision: str = "float32"
    mirrored_axes: list[int] = field(default_factory=list)
    cohort_fusion: float | None = None
    cohort_registrations: int = 0


def _count_windows(shape, roi, overlap: float) -> int:
    total = 1
    for size, r in zip(shape, roi, strict=True):
        interval = max(int(r * (1 - overlap)), 1)
        total *= 1 if size <= r else int(math.ceil((size - r) / interval)) + 1
    return total


class _Watched:
    """Wrap a predictor to report progress and honour a cancel hook per window batch."""

    def __init__(self, predictor, total: int, report: Callable[[float, str], None], stop: Callable[[], bool]):
        self.predictor, self.total, self.report, self.stop, self.done = predictor, max(total, 1), report, stop, 0
        self.extractor = predictor.extractor

    def __call__(self, window: torch.Tensor):
        if self.stop():
            raise SegmentationCancelled("segmentation cancelled")
        out = self.predictor(window)
        self.done += window.shape[0]
        self.report(0.1 + 0.7 * min(self.done / self.total, 1.0), f"window {min(self.done, self.total)}/{self.total}")
        return out


def keep_largest_components(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Keep each organ's largest 26-connected component; other voxels of that organ become background.

    Args:
        labels: (z, y, x) integer label map (modified in place and returned).
        values: organ ids to clean.
    """
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        # components within the organ's bounding box: the label image of ITK is 4 bytes per voxel, a few GB for
        # a whole 512 x 512 x 1000 CT, while an organ's box is a small part of it
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in (np.flatnonzero(mask.any(axis=a)) for a in
                                                                      ((1, 2), (0, 2), (0, 1))))  # fmt: skip
        inside = mask[box]
        components = sitk.ConnectedComponent(sitk.GetImageFromArray(inside.astype(np.uint8)), True)
        largest = sitk.GetArrayFromImage(sitk.RelabelComponent(components, sortByObjectSize=True)) == 1
        labels[box][inside & ~largest] = 0
    return labels


def _to_input_image(array: np.ndarray, prepared, default: float) -> sitk.Image:
    from DiffusionSegLib.preprocess import to_input_grid

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(prepared.image)
    return to_input_grid(image, prepared, "linear", default)


def _coordinates_on_input(inputs, prepared) -> sitk.Image:
    from DiffusionSegLib.bpr import UNIT_MM
    from DiffusionSegLib.bpr.inference import coordinates_to_image
    from DiffusionSegLib.preprocess import to_input_grid

    working = inputs.tensor[:, 1 : 1 + inputs.num_coords] * UNIT_MM  # network channels are in UNIT_MM units
    return to_input_grid(coordinates_to_image(working, prepared.image), prepared, "linear", 0.0)


def _body_axis_maps(image: sitk.Image, probes, report, reference_path: bool = False, prepared=None,
                    scores=None) -> dict:  # fmt: skip
    """Per BPR hash, the body-axis coordinate of the input grid for the probes that recorded where their organs
    lie (computed once per BPR); probes whose BPR is not installed get none (and a log line). ``scores``: the
    slice BPR's reading of ``image`` when the orientation check already made it (reused, not recomputed)."""
    from DiffusionSegLib.probe.extent import body_axis_for

    maps: dict = {}
    for probe in probes:
        record = probe.field_of_view
        if not record or record.get("bpr_sha256") in maps:
            continue
        axis = body_axis_for(record)
        if axis is None:
            log.info("field of view not checked: the BPR this probe measured its organs with is not installed")
            continue
        report(0.8, "finding the field of view")
        maps[axis.sha256] = axis.z_map(image) if reference_path else axis.slab_map(image, like=prepared,
                                                                                    scores=scores)  # fmt: skip
    return maps


def _mirror_result(result: SegmentationResult, image: sitk.Image, index_axes) -> SegmentationResult:
    """A result on a mirrored copy of ``image`` put back onto ``image``'s grid as given (voxels mirrored back)."""
    from DiffusionSegLib.preprocess.orientation import mirror_image

    for name in ("labels", "uncertainty", "coordinates"):
        value = getattr(result, name)
        if value is not None:
            back = mirror_image(value, index_axes)
            back.CopyInformation(image)
            setattr(result, name, back)
    result.mirrored_axes = list(index_axes)
    return result


def segment(image: sitk.Image, probe: TrainedProbe, backbone, *, largest_component: bool = False,
            uncertainty: bool = False, num_noise_draws: int | None = None, window_vox=None,
            overlap: float | None = None, device: str | None = None, bpr=None, coordinates: bool = False,
            precision: str = "auto", reference_path: bool = False, progress: bool = False,
            progress_callback: Callable[[float, str], None] | None = None,
            should_stop: Callable[[], bool] | None = None, orientation: str = "trust-header",
            name: str = "CT", cohort=None, cohort_weight: float | None = None) -> SegmentationResult:  # fmt: skip
    """Segment the probe's organs in a CT.

    Args:
        image: CT in HU, any orientation and spacing.
        probe: a trained or loaded probe.
        backbone: the backbone it was trained on (checked by sha256).
        largest_component: keep only each organ's largest connected component.
        uncertainty: also compute an uncertainty map (see :class:`SegmentationResult`).
        num_noise_draws, window_vox, overlap, device: override the probe's inference settings.
        bpr: BPR for a backbone that uses coordinates (module, path or None for the recorded default).
        coordinates: also return the BPR coordinates the backbone was fed, mapped to the input grid (saves
            preparing the volume and running the BPR a second time for a coordinate map).
        precision: arithmetic of the backbone and heads, ``"auto"`` (bfloat16 where it is faster and agrees,
            see :mod:`DiffusionSegLib.precision`), ``"float32"`` or ``"bfloat16"``.
        reference_path: the straightforward way at every step, the slow path the default one reproduces, kept
            for checks: preparation by whole images (``prepare_volume(..., reference_path=True)``), the BPR one
            window at a time with its fitted map resampled back, every class resampled through physical space,
            the body-axis map at full resolution.
        progress: show MONAI's sliding-window progress bar.
        progress_callback: called as ``(fraction, message)``.
        should_stop: polled per window batch; True raises :class:`SegmentationCancelled`.
        orientation: whether the anatomy must agree with the header about which way is head, front and left
            (:mod:`DiffusionSegLib.preprocess.orientation`): ``"check"`` refuses a mirrored scan before the network
            runs, ``"fix"`` segments its voxels mirrored to match the anatomy and mirrors the result back onto the
            input grid as given (``SegmentationResult.mirrored_axes``), ``"trust-header"`` (the library default;
            the command line and Slicer check) reads no cue.
        name: how a refusal (and the cohort fusion's log line) names the scan.
        cohort: the model's cohort file (:func:`~DiffusionSegLib.cohort.fusion.find_cohort`), or None: when the
            scan's working image is one of its cohort scans, the network's class probabilities are fused with the
            scan's registrations on the working grid (``SegmentationResult.cohort_fusion``); other scans get the
            network alone.
        cohort_weight: the network's weight in that fusion (default
            :data:`~DiffusionSegLib.defaults.COHORT_FUSION_WEIGHT`).

    Returns:
        A :class:`SegmentationResult` on the exact input grid.

    Raises:
        UserInputError: the image is not a usable CT, the probe belongs to another backbone, or (``check``) the
            anatomy says an axis is mirrored against the header.

    Example::

        result = segment(read_volume("ct.nii.gz"), load_probe("liver.safetensors", bb), bb, largest_component=True)
        write_segmentation(result, "liver.seg.nrrd")
    """
    return segment_with_probes(image, [probe], backbone, largest_component=largest_component,
                               uncertainty=uncertainty, num_noise_draws=num_noise_draws, window_vox=window_vox,
                               overlap=overlap, device=device, bpr=bpr, coordinates=coordinates, precision=precision,
                               reference_path=reference_path, progress=progress, progress_callback=progress_callback,
                               should_stop=should_stop, orientation=orientation, name=name,
                               cohorts=[cohort], cohort_weight=cohort_weight)[0]  # fmt: skip


def segment_with_probes(image: sitk.Image, probes: Sequence[TrainedProbe], backbone, *,
                        largest_component: bool = False, uncertainty: bool = False,
                        num_noise_draws: int | None = None, window_vox=None, overlap: float | None = None,
                        device: str | None = None, bpr=None, coordinates: bool = False, precision: str = "auto",
                        reference_path: bool = False, progress: bool = False,
                        progress_callback: Callable[[float, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None, orientation: str = "trust-header",
                        name: str = "CT", cohorts: Sequence | None = None,
                        cohort_weight: float | None = None) -> list[SegmentationResult]:  # fmt: skip
    """Segment a CT with several probes of one backbone in one pass: the volume is prepared, and each window
    goes through the backbone, once; every probe head reads the same pyramid (e.g. a linear and a non-linear
    probe, or the probes of an evaluation's folds). Arguments as :func:`segment`; the probes must share their
    feature settings (timestep, noise seed and draws, window, overlap); ``cohorts``: per probe, its model's cohort
    file or None (default: none).

    Returns:
        One :class:`SegmentationResult` per probe, in order (``coordinates`` is set on the first only; the
        shared stages' times are split evenly among the probes).

    Raises:
        UserInputError: no probes, probes with different feature settings, or a probe of another backbone.
    """
    from DiffusionSegLib.features import FeatureExtractor, PyramidPredictor, bpr_coordinates, build_inputs
    from DiffusionSegLib.features import resolve_device
    from DiffusionSegLib.features import sliding_window_apply, window_size
    from DiffusionSegLib.precision import autocast_context, resolve_precision
    from DiffusionSegLib.preprocess import prepare_volume
    from DiffusionSegLib.probe.io import check_backbone

    if not probes:
        raise UserInputError("no probes given; pass at least one trained probe")
    for probe in probes:
        check_backbone(probe.backbone, backbone)
    report = progress_callback or (lambda fraction, message: None)
    overrides = {k: v for k, v in {"num_noise_draws": num_noise_draws, "window_vox": window_vox, "overlap": overlap,
                                   "device": device}.items() if v is not None}  # fmt: skip
    configs = [probe.config.feature_config(**overrides) for probe in probes]
    if any(c != configs[0] for c in configs[1:]):
        raise UserInputError("the probes read different features (timestep, noise seed or draws, window or "
                             "overlap differ); segment with each probe separately")  # fmt: skip
    cfg = configs[0]
    compute = resolve_device(cfg.device)
    precision = resolve_precision(precision, compute)
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    report(0.0, "preparing the volume")
    prepared = prepare_volume(image, backbone.pretrain.preprocess, reference_path=reference_path)
    seconds["prepare"], clock = time.perf_counter() - clock, time.perf_counter()
    scores = None
    if orientation != "trust-header" or any(probe.field_of_view for probe in probes):
        from DiffusionSegLib.preprocess.orientation import orientation_scores

        with torch.no_grad():  # float32, as the field of view's slice BPR
            scores = _orientation_scores(image, prepared, orientation, reference_path, orientation_scores)
    if orientation != "trust-header":
        from DiffusionSegLib.preprocess.orientation import apply_reading, assess_orientation

        if scores is None:
            log.info("%s: orientation not checked: the slice BPR is not installed", name)
        else:
            report(0.0, "checking the orientation")
            with torch.no_grad():
                reading = assess_orientation(scores[1], scores[0])
            fixed, _, index_axes = apply_reading(reading, image, orientation, name)
            seconds["orientation"] = reading.seconds
            if index_axes:
                results = segment_with_probes(fixed, probes, backbone, largest_component=largest_component,
                                              uncertainty=uncertainty, num_noise_draws=num_noise_draws,
                                              window_vox=window_vox, overlap=overlap, device=device, bpr=bpr,
                                              coordinates=coordinates, precision=precision,
                                              reference_path=reference_path, progress=progress,
                                              progress_callback=progress_callback, should_stop=should_stop,
                                              name=name, cohorts=cohorts, cohort_weight=cohort_weight)
                return [_mirror_result(result, image, index_axes) for result in results]
    # the slice BPR's reading (shared by the orientation check and the field of view), without the check's cues
    seconds["slice_bpr"] = time.perf_counter() - clock - seconds.get("orientation", 0.0)
    clock = time.perf_counter()
    coords = None
    if backbone.use_bpr:
        with torch.no_grad(), autocast_context(precision, compute):  # the BPR is a network too
            coords = bpr_coordinates(prepared.image, backbone, bpr, compute, reference_path=reference_path)
    inputs = build_inputs(prepared.image, backbone, cfg, coords=coords, device=compute)
    if coordinates and not inputs.num_coords:
        raise UserInputError(f"backbone '{Path(backbone.path).name}' uses no BPR coordinates: there is no "
                             "coordinate map to return")  # fmt: skip
    seconds["bpr"], clock = time.perf_counter() - clock, time.perf_counter()

    extractor = FeatureExtractor(backbone, cfg, inputs.num_coords).to(compute)
    heads = [probe.head.to(compute).eval() for probe in probes]
    groups = [probe.num_classes for probe in probes]
    disagreement = uncertainty and extractor.num_draws > 1
    predictor = PyramidPredictor(extractor, lambda pyramid: torch.cat([head(pyramid) for head in heads], 1),
                                 disagreement=disagreement, groups=groups)  # fmt: skip
    total = _count_windows(inputs.shape, window_size(backbone, cfg), cfg.overlap)
    watched = _Watched(predictor, total, report, should_stop or (lambda: False))
    with torch.no_grad(), autocast_context(precision, compute):
        output = sliding_window_apply(inputs, watched, backbone, cfg, out_channels=sum(groups), progress=progress)
    coordinate_image = _coordinates_on_input(inputs, prepared) if coordinates else None
    del inputs
    logits, votes = (output if disagreement else (output, None))
    del output
    seconds["features"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with torch.no_grad():  # float32: the slice BPR is small, and resampling HU in bfloat16 loses detail
        body_z = _body_axis_maps(image, probes, report, reference_path, prepared,
                                 scores[1] if scores is not None else None)  # fmt: skip
    seconds["field_of_view"] = time.perf_counter() - clock
    shared = {stage: value / len(probes) for stage, value in seconds.items()}

    votes_of = _cohort_votes(cohorts, probes, backbone, prepared.image, name)
    results = []
    first = 0
    for index, probe in enumerate(probes):
        probabilities = torch.softmax(logits[0, first : first + probe.num_classes].float(), dim=0).numpy()
        first += probe.num_classes
        weight = None
        if votes_of[index] is not None:  # a scan of the model's training cohort: the network and its registrations
            from DiffusionSegLib.cohort.fusion import fuse_with_network
            from DiffusionSegLib.defaults import COHORT_FUSION_WEIGHT

            weight = COHORT_FUSION_WEIGHT if cohort_weight is None else float(cohort_weight)
            probabilities = fuse_with_network(probabilities, votes_of[index], weight)
            log.info("%s was in the model's training cohort: the network fused with its %d registrations (weight "
                     "%g)", name, votes_of[index].atlases, weight)  # fmt: skip
        probe_votes = None if votes is None else votes[0, index].numpy()
        result = _finish(image, prepared, probe, probabilities, probe_votes, uncertainty, largest_component,
                         lambda f, message: report(0.8 + 0.2 * (index + f) / len(probes), message),
                         body_z, reference_path)  # fmt: skip
        result.seconds = shared | result.seconds
        result.seconds["total"] = sum(result.seconds.values())
        result.coordinates = coordinate_image if index == 0 else None
        result.precision = precision
        if weight is not None:
            result.cohort_fusion, result.cohort_registrations = weight, votes_of[index].atlases
        results.append(result)
    log.info("segmented %s voxels (working grid %s) with %d probe(s) in %.1f s (%s)",
             "x".join(map(str, image.GetSize())), "x".join(map(str, prepared.image.GetSize())), len(probes),
             time.perf_counter() - start, precision)  # fmt: skip
    report(1.0, "done")
    return results


def _cohort_votes(cohorts, probes, backbone, working: sitk.Image, name: str) -> list:
    """Per probe, the registrations' vote of this scan from its model's cohort file, or None: no file, a file of
    another backbone or class count (a model trained again), or a scan outside the cohort."""
    if not cohorts or all(c is None for c in cohorts):
        return [None] * len(probes)
    if len(cohorts) != len(probes):
        raise UserInputError(f"{len(cohorts)} cohort files given for {len(probes)} probes; expected one per probe")
    from DiffusionSegLib.cohort.fusion import working_key

    key, votes = working_key(working), []
    for cohort, probe in zip(cohorts, probes, strict=True):
        vote = None
        stale = cohort is not None and (cohort.backbone_sha256, cohort.num_classes) != (backbone.sha256,
                                                                                         probe.num_classes)
        if stale:
            log.warning("'%s' belongs to another training of this model; the network alone segments %s",
                        cohort.path.name, name)  # fmt: skip
        elif cohort is not None:
            vote = cohort.vote(key)
            if vote is not None and vote.shape != tuple(working.GetSize()[::-1]):
                vote = None
            if vote is None:
                log.debug("%s is not among the %d scans of the model's training cohort", name, len(cohort))
        votes.append(vote)
    return votes


def _orientation_scores(image, prepared, orientation, reference_path, orientation_scores):
    """The shipped slice BPR's reading of ``image`` (``(BodyAxis, SliceScores)``) on the working grid's body box,
    or None (not installed; or only the field of view needs it and it takes the reference path)."""
    if reference_path and orientation == "trust-header":
        return None
    axis, scores = orientation_scores(image, like=prepared)
    return None if scores is None else (axis, scores)


def _finish(image: sitk.Image, prepared, probe: TrainedProbe, probabilities: np.ndarray, votes: np.ndarray | None,
            uncertainty: bool, largest_component: bool, report, body_z: dict,
            reference_path: bool = False) -> SegmentationResult:  # fmt: skip
    """Working-grid class probabilities of one probe → its label map (and uncertainty) on the input grid, the
    field of view applied (``body_z``: body-axis maps by BPR hash); ``report`` takes fractions of this step."""
    from DiffusionSegLib.preprocess.inverse import argmax_on_input_grid

    clock = time.perf_counter()
    report(0.0, "resampling to the input grid")
    classes = None if reference_path else argmax_on_input_grid(probabilities, prepared.image, prepared.input_grid)
    if classes is None:  # an oblique input grid (or the reference path): resample through physical space
        classes = running_argmax(probabilities, prepared)
    uncertainty_image, kind = None, None
    if uncertainty:
        if votes is not None:
            working_map, kind = votes, "disagreement"
        else:
            p = np.clip(probabilities, 1e-8, 1.0)
            working_map, kind = -(p * np.log(p)).sum(0) / math.log(p.shape[0]), "entropy"
        uncertainty_image = _to_input_image(working_map, prepared, 0.0)  # float32, on the input grid
    values = [0] + [organ.value for organ in probe.labels]
    dtype = np.uint8 if max(values) < 256 else np.uint16
    label_array = np.asarray(values, dtype=dtype)[classes]
    seconds = {"to_input_grid": time.perf_counter() - clock}
    clock = time.perf_counter()
    view = None
    z = body_z.get(probe.field_of_view.get("bpr_sha256")) if probe.field_of_view else None
    if z is not None:
        view = apply_field_of_view(label_array, z, sitk.GetArrayViewFromImage(image), probe.labels,
                                   probe.field_of_view["organ_z_mm"])  # fmt: skip
        log.info("%s", view.describe())
    if largest_component:
        report(0.5, "keeping the largest component of each organ")
        keep_largest_components(label_array, values[1:])
    counts = remove_specks(label_array, values[1:], float(np.prod(image.GetSpacing())) / 1000.0)
    seconds["cleanup"] = time.perf_counter() - clock
    labels = sitk.GetImageFromArray(label_array)
    labels.CopyInformation(image)
    in_view = [o for o in probe.labels if view is None or o.name not in view.outside]
    organs = [o for o in in_view if counts[o.value]]
    not_found = [o.name for o in in_view if not counts[o.value]]
    return SegmentationResult(labels, organs, uncertainty_image, kind, seconds, tuple(prepared.image.GetSize()),
                              field_of_view=view, not_found=not_found)  # fmt: skip


def running_argmax(probabilities: np.ndarray, prepared) -> np.ndarray:
    """The class index on the input grid of every voxel: each class's probability resampled linearly (class 0
    reads 1, the others 0, outside the working grid), a running argmax over classes (one input-grid float volume
    at a time). The reference :func:`~DiffusionSegLib.preprocess.inverse.argmax_on_input_grid` reproduces."""
    best = classes = None
    for c in range(probabilities.shape[0]):
        resampled = _to_input_image(probabilities[c], prepared, 1.0 if c == 0 else 0.0)
        on_input = sitk.GetArrayViewFromImage(resampled)  # no copy: ``resampled`` stays alive until the del
        if best is None:
            best, classes = on_input.copy(), np.zeros(on_input.shape, np.uint8)
        else:
            better = on_input > best
            best[better] = on_input[better]
            classes[better] = c
        del on_input, resampled
    return classes


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount`` of a label map, a million voxels at a time: bincount makes an int64 copy of its input, 8
    bytes per voxel (a quarter of a second of fresh memory for a 34 M-voxel CT), here one cache-sized slab."""
    flat = labels.reshape(-1)
    step = 1 << 20
    counts = np.zeros(max(minlength, int(flat.max(initial=0)) + 1), dtype=np.int64)
    for start in range(0, flat.size, step):
        part = np.bincount(flat[start : start + step])
        counts[: part.size] += part
    return counts


def remove_specks(labels: np.ndarray, values: list[int], voxel_ml: float) -> np.ndarray:
    """Clear (in place) every organ whose voxels add up to less than :data:`MIN_ORGAN_ML`; returns the voxel
    count per label value after the clean-up."""
    counts = label_counts(labels, max(values, default=0) + 1)
    for value in values:
        if 0 < counts[value] * voxel_ml < MIN_ORGAN_ML:
            labels[labels == value] = 0
            counts[value] = 0
    return counts


def write_segmentation(result: SegmentationResult, path: str | os.PathLike) -> Path:
    """Write the label map: ``.seg.nrrd`` with Slicer segment metadata, or any volume format (NIfTI, NRRD, MHA).

    Raises:
        UserInputError: unknown output format.
    """
    from DiffusionSegLib.data.volume import write_volume
    from DiffusionSegLib.probe.segnrrd import write_seg_nrrd

    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        view = result.field_of_view.describe() if result.field_of_view is not None else None
        return write_seg_nrrd(result.labels, result.organs, path, view)
    if not path.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        raise UserInputError(f"cannot write '{path.name}': expected .nii.gz, .nii, .nrrd, .mha or .seg.nrrd")
    return write_volume(result.labels, path)
