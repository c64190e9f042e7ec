"""Segmenting many scans with one probe: the models load once, each scan passes the input gate, and a refused or
damaged scan is reported and left out while the others go on.

The work per scan is what ``diffusionseg segment`` does for one: read the CT through the gate, segment it, write the
segmentation atomically (an interrupted run leaves no partial file). An existing output is kept unless
``overwrite``. The CLI (``segment DIR -o OUT/``) and the Slicer module's multi-volume Segment both run
:func:`segment_many`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.probe.segment import SegmentationCancelled, SegmentationResult, segment, write_segmentation

__all__ = ["ScanOutcome", "load_segmentation_models", "segment_many"]

log = logging.getLogger(__name__)


@dataclass
class ScanOutcome:
    """What became of one scan of a batch.

    Attributes:
        scan: the input (a file or a DICOM folder).
        output: where its segmentation goes.
        status: ``"written"``, ``"kept"`` (the output existed and ``overwrite`` was off) or ``"failed"``.
        seconds: wall time spent on this scan (reading, segmenting, writing).
        result: the segmentation of a written scan (the caller may drop it; nothing else holds it), else None.
        reason: for a failed scan, why, in one line.
        note: for a scan shorter than one window of the network, the warning :func:`short_scan_note` gives.
    """

    scan: Path
    output: Path
    status: str
    seconds: float = 0.0
    result: SegmentationResult | None = None
    reason: str = ""
    note: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def load_segmentation_models(probe=None, backbone=None, bpr=None):
    """``(probe, backbone, bpr)`` loaded once for many scans.

    Args:
        probe: a loaded probe, a probe file, or None for the shipped 13-organ model.
        backbone: a loaded backbone, its file, or None for the one the probe recorded.
        bpr: for a backbone with coordinates, a loaded BPR or its file (None: the recorded one); a backbone
            without coordinates gets None.

    Raises:
        UserInputError: a model file is missing or damaged, or the probe belongs to another backbone.
    """
    from DiffusionSegLib.features.extractor import _bpr_model
    from DiffusionSegLib.pretrain.export import BackboneBundle, load_backbone
    from DiffusionSegLib.probe.io import check_backbone, find_probe_backbone, load_probe
    from DiffusionSegLib.resources import default_probe_path

    if probe is None or isinstance(probe, (str, os.PathLike)):
        probe_path = probe or default_probe_path()
        if not isinstance(backbone, BackboneBundle):
            backbone = load_backbone(backbone or find_probe_backbone(probe_path))
        probe = load_probe(probe_path, backbone)
    elif not isinstance(backbone, BackboneBundle):
        raise UserInputError("a loaded probe needs its loaded backbone")
    check_backbone(probe.backbone, backbone)
    return probe, backbone, (_bpr_model(backbone, bpr) if backbone.use_bpr else None)


def short_scan_note(image, backbone, feature_config) -> str | None:
    """A line saying that the scan is shorter from head to feet than one window of the network after resampling
    to its working grid (organs reaching past its ends may be cut or missed), or None when it is not."""
    import itertools

    from DiffusionSegLib.features import window_size

    corners = [image.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in corner])
               for corner in itertools.product(*((0, s) for s in image.GetSize()))]  # fmt: skip
    length = max(p[2] for p in corners) - min(p[2] for p in corners)
    slices, spacing = window_size(backbone, feature_config)[0], backbone.pretrain.preprocess.spacing_mm[2]
    if length >= slices * spacing:
        return None
    return (f"covers {length:.0f} mm from head to feet, less than one window of the model ({slices} slices of "
            f"{spacing:g} mm = {slices * spacing:g} mm): organs that reach past its ends may be cut or missed")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if isinstance(error, UserInputError) and text else f"{type(error).__name__}: {' '.join(text)}"


def _model_cohort(probe):
    """The cohort file of a probe given as a file (or None: the shipped model), else None."""
    from DiffusionSegLib.cohort.fusion import find_cohort
    from DiffusionSegLib.resources import default_probe_path

    if probe is None or isinstance(probe, (str, os.PathLike)):
        return find_cohort(probe or default_probe_path())
    return None


def segment_many(scans: Sequence[str | os.PathLike], outputs: Sequence[str | os.PathLike], probe=None,
                 backbone=None, *, overwrite: bool = False, largest_component: bool = False,
                 num_noise_draws: int | None = None, overlap: float | None = None, device: str | None = None,
                 bpr=None, precision: str = "auto", orientation: str = "check", cohort_fusion: bool = True,
                 names: Sequence[str] | None = None,
                 progress_callback: Callable[[float, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[ScanOutcome]:  # fmt: skip
    """Segment each scan into its output, yielding a :class:`ScanOutcome` per scan, in order.

    The models are loaded once, when the first scan needs them (a batch whose outputs all exist loads none).
    A scan the input gate refuses (damaged, not CT, too small...) or whose segmentation fails is yielded as
    ``"failed"`` with its reason, and the next scan goes on.

    Args:
        scans: CT files or DICOM folders (see :func:`DiffusionSegLib.data.scans.find_scans` for folders and
            patterns).
        outputs: one path per scan (``.seg.nrrd`` or a label-map format; see
            :func:`DiffusionSegLib.data.scans.plan_outputs`). Checked by the caller (``check_output_path``).
        probe, backbone, bpr: as :func:`load_segmentation_models` (loaded objects are used as they are).
        overwrite: replace existing outputs (else they are kept and the scan is not segmented).
        largest_component, num_noise_draws, overlap, device, precision, orientation: as
            :func:`~DiffusionSegLib.probe.segment` (a scan whose anatomy contradicts its header is a failed scan
            under ``"check"``).
        cohort_fusion: a scan of the model's training cohort gets the network fused with its registrations (the
            cohort file beside a probe given as a file; see :mod:`DiffusionSegLib.cohort.fusion`).
        names: per scan, how messages name it (default: its file name), e.g. a Slicer volume's name.
        progress_callback: ``(fraction of the whole batch, message)``.
        should_stop: polled per window batch; True raises :class:`SegmentationCancelled` (the outputs written
            so far stay).

    Raises:
        UserInputError: a model cannot be loaded, or scans and outputs differ in number.
        SegmentationCancelled: ``should_stop()`` returned True.

    Example::

        found = find_scans(["cohort/"])
        for outcome in segment_many(found.scans, plan_outputs(found, "segmentations")):
            print(outcome.scan, outcome.status, outcome.reason)
    """
    from DiffusionSegLib.data.gate import read_ct

    scans, outputs = [Path(s) for s in scans], [Path(o) for o in outputs]
    if len(scans) != len(outputs) or (names is not None and len(names) != len(scans)):
        raise UserInputError(f"{len(scans)} scans, {len(outputs)} outputs and {len(names or scans)} names given; "
                             "expected one output and one name per scan")  # fmt: skip
    report = progress_callback or (lambda fraction, message: None)
    models = None
    for index, (scan, output) in enumerate(zip(scans, outputs, strict=True)):
        if output.exists() and not overwrite:
            yield ScanOutcome(scan, output, "kept")
            continue
        start = time.perf_counter()
        name = names[index] if names is not None else scan.name
        prefix = f"scan {index + 1}/{len(scans)} ({name})"
        report(index / len(scans), f"{prefix}: reading")
        try:
            image = read_ct(scan, f"'{name}'")
        except UserInputError as error:
            yield ScanOutcome(scan, output, "failed", time.perf_counter() - start, reason=_one_line(error))
            continue
        if models is None:
            report(index / len(scans), f"{prefix}: loading the models")
            models = load_segmentation_models(probe, backbone, bpr)
            cohort = _model_cohort(probe) if cohort_fusion else None
        loaded_probe, loaded_backbone, loaded_bpr = models
        note = short_scan_note(image, loaded_backbone, loaded_probe.config.feature_config())
        try:
            result = segment(image, loaded_probe, loaded_backbone, largest_component=largest_component,
                             num_noise_draws=num_noise_draws, overlap=overlap, device=device, bpr=loaded_bpr,
                             precision=precision, should_stop=should_stop, orientation=orientation,
                             name=f"'{name}'", cohort=cohort,
                             progress_callback=lambda f, m, i=index, p=prefix: report((i + f) / len(scans),
                                                                                      f"{p}: {m}"))  # fmt: skip
            del image
            write_segmentation(result, output)
        except SegmentationCancelled:
            raise
        except Exception as error:  # one scan's failure (memory, a broken file...) does not end the batch
            log.debug("segmenting %s failed", scan, exc_info=True)
            yield ScanOutcome(scan, output, "failed", time.perf_counter() - start, reason=_one_line(error),
                              note=note)  # fmt: skip
            continue
        yield ScanOutcome(scan, output, "written", time.perf_counter() - start, result, note=note)
    report(1.0, "done")
