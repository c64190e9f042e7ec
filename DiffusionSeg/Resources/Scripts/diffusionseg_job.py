"""One DiffusionSeg job on files, for the Slicer module's background process (and its in-process runs).

    PythonSlicer diffusionseg_job.py JOB.json

``JOB.json`` says what to do (``"kind"``: ``segment`` | ``segment-many`` | ``coords`` | ``train-probe`` |
``finetune``) and where the input and
output files are; the Slicer module writes it, runs this script, then turns the output files into MRML nodes.
All the work is done by DiffusionSegLib (``segment``, ``predict_body_coordinates``, ``fit_probe``); this file
only reads and writes files and reports progress on stdout, one line each::

    DIFFUSIONSEG_PROGRESS <fraction in [0, 1]> <message>
    DIFFUSIONSEG_RESULT <json>            (last line, on success)
    DIFFUSIONSEG_ERROR <message>          (a user error: exit status 2)

Torch and MONAI are imported here, never in the Slicer GUI process. ``CUDA_VISIBLE_DEVICES=-1`` forces the CPU.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

PROGRESS_PREFIX = "DIFFUSIONSEG_PROGRESS"
RESULT_PREFIX = "DIFFUSIONSEG_RESULT"
ERROR_PREFIX = "DIFFUSIONSEG_ERROR"
ORIENTATION_PREFIX = "DIFFUSIONSEG_ORIENTATION"
"""Printed (with the mirrored axes) before the error line when the anatomy contradicts the header: the module then
offers to segment with ``"orientation": "fix"``."""

ProgressCallback = Callable[[float, str], None]


def _device(job: dict) -> str:
    device = job.get("device", "cpu")
    return {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu", "auto": "auto"}.get(str(device).lower(), "cpu")


def _read_cases(pairs, labels) -> list:
    """(CT, label map) images of the job's file pairs, through the input gate."""
    from DiffusionSegLib.data.gate import read_ct, read_label_map

    cases = []
    for index, (ct_path, label_path) in enumerate(pairs, start=1):
        ct = read_ct(ct_path, f"training volume {index}")
        cases.append((ct, read_label_map(label_path, ct, labels, f"segmentation of training volume {index}")))
    return cases


def _segment(job: dict, report: ProgressCallback, should_stop: Callable[[], bool]) -> dict:
    from DiffusionSegLib.data.labels import labels_to_json
    from DiffusionSegLib.data.gate import read_ct
    from DiffusionSegLib.data.volume import write_volume
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.cohort.fusion import find_cohort
    from DiffusionSegLib.probe import load_probe, segment

    from DiffusionSegLib.defaults import SEGMENT_OPTIONS

    image = read_ct(job["image"], "the input volume")
    report(0.0, "loading the backbone and the probe")
    backbone = load_backbone(job["backbone"])
    probe = load_probe(job["probe"], backbone)
    options = {**SEGMENT_OPTIONS, **{k: job[k] for k in SEGMENT_OPTIONS if k in job}}  # as `diffusionseg segment`
    result = segment(image, probe, backbone, device=_device(job), precision=job.get("precision", "auto"),
                     progress_callback=report, should_stop=should_stop, orientation=job.get("orientation", "check"),
                     name="the input volume",
                     cohort=find_cohort(job["probe"]) if job.get("cohort_fusion", True) else None, **options)  # fmt: skip
    write_volume(result.labels, job["output_labels"])
    Path(job["output_legend"]).write_text(json.dumps(labels_to_json(result.organs)))
    view = result.field_of_view.describe() if result.field_of_view is not None else None
    return {"labels": job["output_labels"], "legend": job["output_legend"], "seconds": result.seconds,
            "field_of_view": view, "not_found": result.not_found, "cohort_fusion": _fusion_note(result)}  # fmt: skip


def _fusion_note(result) -> str | None:
    """For the status line: how a scan of the model's training cohort was segmented (None: the network alone)."""
    if result.cohort_fusion is None:
        return None
    return (f"in the model's training cohort: the network fused with its {result.cohort_registrations} "
            f"registrations (weight {result.cohort_fusion:g})")


def _segment_many(job: dict, report: ProgressCallback, should_stop: Callable[[], bool]) -> dict:
    """Several volumes in one job (``segment_many``: the models load once); a volume the input gate refuses gets
    its reason in the result and the others go on."""
    from DiffusionSegLib.data.labels import labels_to_json
    from DiffusionSegLib.defaults import SEGMENT_OPTIONS
    from DiffusionSegLib.probe.batch import segment_many

    scans = []
    options = {**SEGMENT_OPTIONS, **{k: job[k] for k in SEGMENT_OPTIONS if k in job}}  # as `diffusionseg segment`
    outcomes = segment_many(job["images"], job["output_labels"], job["probe"], job["backbone"], overwrite=True,
                            device=_device(job), precision=job.get("precision", "auto"), names=job.get("names"),
                            orientation=job.get("orientation", "check"), progress_callback=report,
                            should_stop=should_stop, cohort_fusion=job.get("cohort_fusion", True),
                            **options)  # fmt: skip
    for outcome, legend in zip(outcomes, job["output_legends"], strict=True):
        if outcome.failed:
            scans.append({"failed": outcome.reason})
            continue
        result = outcome.result
        Path(legend).write_text(json.dumps(labels_to_json(result.organs)))
        view = result.field_of_view.describe() if result.field_of_view is not None else None
        scans.append({"labels": str(outcome.output), "legend": legend, "seconds": outcome.seconds,
                      "field_of_view": view, "not_found": result.not_found,
                      "cohort_fusion": _fusion_note(result)})  # fmt: skip
    return {"scans": scans}


def _coords(job: dict, report: ProgressCallback, should_stop: Callable[[], bool]) -> dict:
    from DiffusionSegLib.bpr import load_bpr, predict_body_coordinates
    from DiffusionSegLib.data.gate import read_ct
    from DiffusionSegLib.data.volume import write_volume

    from DiffusionSegLib.preprocess.orientation import check_orientation, mirror_image

    given = read_ct(job["image"], "the input volume")
    report(0.0, "checking the orientation")
    image, _, mirrored = check_orientation(given, job.get("orientation", "check"), "the input volume")
    report(0.05, "loading the Body Part Regressor")
    model, _ = load_bpr(job.get("bpr") or None)
    report(0.1, "computing anatomical coordinates")
    coordinates = predict_body_coordinates(image, model, device=_device(job).replace("auto", "cpu"))
    if mirrored:  # back onto the input grid as given
        coordinates = mirror_image(coordinates, mirrored)
        coordinates.CopyInformation(given)
    write_volume(coordinates, job["output"])
    return {"coordinates": job["output"]}


def _train_probe(job: dict, report: ProgressCallback, should_stop: Callable[[], bool]) -> dict:
    from DiffusionSegLib.data.labels import labels_from_names
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import ProbeConfig, fit_probe, save_probe
    from DiffusionSegLib.probe.config import QUICK_PROBE

    report(0.0, "loading the backbone")
    backbone = load_backbone(job["backbone"])
    labels = labels_from_names({int(value): name for value, name in job["names"].items()})
    cases = _read_cases(job["cases"], labels)
    head = job.get("head", "nonlinear")
    options = dict(QUICK_PROBE) if head == "context" else {"head": head}  # "context": the quick in-app recipe
    options.update(steps=int(job.get("steps", 300)), device=_device(job))
    options.update(job.get("probe_options") or {})
    probe = fit_probe(cases, labels, backbone, ProbeConfig(**options), progress=False, progress_callback=report,
                      should_stop=should_stop)  # fmt: skip
    path = save_probe(job["output"], probe)
    return {"probe": str(path), "organs": [label.name for label in probe.labels], "cancelled": probe.cancelled,
            "best_val_loss": probe.best_val_loss}  # fmt: skip


def _finetune(job: dict, report: ProgressCallback, should_stop: Callable[[], bool]) -> dict:
    """Fine-tune end to end; SIGTERM (the module's Cancel) stops after the current step and keeps the best model."""
    import signal

    from DiffusionSegLib.data.gate import read_ct
    from DiffusionSegLib.data.labels import labels_from_names
    from DiffusionSegLib.finetune import FinetuneConfig, finetune
    from DiffusionSegLib.pretrain.export import load_backbone

    report(0.0, "loading the backbone")
    backbone = load_backbone(job["backbone"])
    labels = labels_from_names({int(value): name for value, name in job["names"].items()})
    cases = _read_cases(job["cases"], labels)
    options = {"budget_minutes": float(job.get("minutes", 15.0)), "device": _device(job)}
    options.update(job.get("finetune_options") or {})
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(requested=True))
    unlabeled = [read_ct(path, f"unlabeled volume {i}") for i, path in enumerate(job.get("unlabeled") or [], 1)]
    result = finetune(cases, labels, backbone, job["output"], FinetuneConfig(**options), progress=False,
                      progress_callback=report, should_stop=lambda: stop["requested"] or should_stop(),
                      run_dir=job.get("run_dir"), case_names=job.get("case_names"), unlabeled=unlabeled,
                      unlabeled_names=job.get("unlabeled_names"))  # fmt: skip
    return {"probe": str(result.probe_path), "backbone": str(result.backbone_path),
            "organs": [label.name for label in result.probe.labels], "cancelled": result.cancelled,
            "steps": result.steps}  # fmt: skip


JOBS = {"segment": _segment, "segment-many": _segment_many, "coords": _coords, "train-probe": _train_probe,
        "finetune": _finetune}


def run_job(job: dict, progress_callback: ProgressCallback | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:  # fmt: skip
    """Run one job (see the module docstring); returns a JSON-serialisable dict naming the files written.

    Raises:
        ValueError: unknown job kind.
        UserInputError: bad input (from DiffusionSegLib).
    """
    kind = job.get("kind")
    if kind not in JOBS:
        raise ValueError(f"job kind {kind!r} is unknown; expected one of {sorted(JOBS)}")
    return JOBS[kind](job, progress_callback or (lambda fraction, message: None), should_stop or (lambda: False))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: {Path(__file__).name} JOB.json", file=sys.stderr)
        return 2
    from DiffusionSegLib.errors import UserInputError

    def report(fraction: float, message: str) -> None:
        print(f"{PROGRESS_PREFIX} {min(max(float(fraction), 0.0), 1.0):.4f} {message}", flush=True)

    try:
        job = json.loads(Path(argv[0]).read_text())
        result = run_job(job, report)
    except UserInputError as error:
        if getattr(error, "axes", None):  # OrientationMismatch: the module offers the fix
            print(f"{ORIENTATION_PREFIX} {json.dumps(error.axes)}", flush=True)
        print(f"{ERROR_PREFIX} {error}", flush=True)
        return 2
    print(f"{RESULT_PREFIX} {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
