"""Segment a CT with a trained probe; the label map is written exactly on the input grid.

``OUT.seg.nrrd`` gives a Slicer segmentation (named, coloured segments with terminology); ``OUT.nii.gz`` (or
``.nrrd``/``.mha``) a plain label map. Without ``--probe`` the shipped 13-organ BTCV model is used
(``finetune_btcv13_default``, fine-tuned end to end); the backbone defaults to the one the model records (its
fine-tuned backbone beside it, or a model file with the recorded hash). Each organ keeps its largest connected
component unless ``--no-largest-component`` is given. A scan of the model's training cohort (an unlabeled scan of
``finetune --unlabeled``) is segmented by the network fused with its registrations, kept beside the model in
``<model>.cohort.npz``; ``--no-cohort-fusion`` uses the network alone.

Several scans, a folder of scans or a pattern segment in one run (the models load once): ``-o`` is then a folder
(created) that receives ``<scan name>.seg.nrrd`` per scan (``--format`` for label maps). A scan that is damaged or
refused gets one line and the others go on; existing outputs are kept unless ``--overwrite``. Exit status: 0 all
segmented (or kept), 1 some failed, 2 the arguments are wrong (nothing is done).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from DiffusionSegLib.preprocess.orientation import add_orientation_argument

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options
    from DiffusionSegLib.data.scans import OUTPUT_FORMATS
    from DiffusionSegLib.defaults import LARGEST_COMPONENT

    parser.add_argument("volumes", nargs="+", metavar="volume",
                        help="input CT: NIfTI / NRRD / MHA file or a DICOM series folder; several, a folder of CTs "
                        "(its NIfTI / NRRD / MHA files and the DICOM series folders below it) or a quoted pattern "
                        "('cohort/*.nii.gz') segment each in one run")  # fmt: skip
    parser.add_argument("--probe", help="model file from train-probe or finetune (default: the shipped 13-organ BTCV "
                        "model finetune_btcv13_default, fine-tuned end to end)")  # fmt: skip
    options.add_backbone(parser, help="backbone weights (default: the one the model records)")
    options.add_output(parser, help="output label map (.seg.nrrd, .nii.gz, .nrrd, .mha); with several scans, a "
                       "folder of scans or a pattern: a folder (created), one <scan name>.seg.nrrd per scan")  # fmt: skip
    parser.add_argument("--format", choices=tuple(OUTPUT_FORMATS),
                        help="output format when -o is a folder (default: seg.nrrd, a Slicer segmentation; the "
                        "others write label maps)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="when -o is a folder: replace existing outputs (default: keep them, skip their scans)")
    options.add_largest_component(parser, LARGEST_COMPONENT)
    parser.add_argument("--no-cohort-fusion", dest="cohort_fusion", action="store_false",
                        help="for a scan of the model's training cohort (finetune --unlabeled), use the network alone "
                        "(default: the network fused with the scan's registrations, which the model keeps in "
                        "<model>.cohort.npz)")  # fmt: skip
    parser.add_argument("--uncertainty", help="also write an uncertainty map here (disagreement across noise draws "
                        "with --draws > 1, else the normalised entropy)")  # fmt: skip
    parser.add_argument("--draws", type=int, help="noise draws to average (default: the probe's)")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (default: the probe's)")
    options.add_device(parser, default=None, help="where the networks run: auto, cpu or cuda (default: the "
                       "model's setting, auto: a CUDA GPU if present)")  # fmt: skip
    options.add_bpr(parser)
    options.add_precision(parser)
    add_orientation_argument(parser)


def short_scan_note(image, backbone, feature_config) -> str | None:
    """A line saying that the scan is shorter from head to feet than one window of the network (see
    :func:`DiffusionSegLib.probe.batch.short_scan_note`), or None when it is not."""
    from DiffusionSegLib.probe.batch import short_scan_note as note

    return note(image, backbone, feature_config)


def _check_settings(args: argparse.Namespace) -> None:
    from DiffusionSegLib.errors import UserInputError

    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserInputError(f"--overlap {args.overlap} is invalid; expected a value in [0, 1)")
    if args.draws is not None and args.draws < 1:
        raise UserInputError(f"--draws {args.draws} is invalid; expected at least 1")


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.data.scans import find_scans
    from DiffusionSegLib.data.volume import WRITE_SUFFIXES

    found = find_scans(args.volumes)
    output = str(args.output)
    to_folder = output.endswith(("/", os.sep)) or (Path(output).is_dir()
                                                   and not output.lower().endswith(WRITE_SUFFIXES))  # fmt: skip
    if found.many or to_folder:
        return _run_many(args, found)
    return _run_one(args, str(args.volumes[0]))


def _run_one(args: argparse.Namespace, volume: str) -> int:
    """One scan into the file ``-o`` names."""
    from DiffusionSegLib.data.gate import check_output_path, read_ct
    from DiffusionSegLib.data.scans import OUTPUT_FORMATS
    from DiffusionSegLib.data.volume import WRITE_SUFFIXES
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.resources import default_probe_path

    inputs = (volume, args.probe or default_probe_path(), args.backbone, args.bpr)
    check_output_path(args.output, WRITE_SUFFIXES, "segmentation", inputs)
    if args.uncertainty:
        check_output_path(args.uncertainty, tuple(s for s in WRITE_SUFFIXES if s != ".seg.nrrd"), "uncertainty map",
                          inputs, {"segmentation": args.output})  # fmt: skip
    _check_settings(args)
    if args.format and not str(args.output).lower().endswith(OUTPUT_FORMATS[args.format]):
        raise UserInputError(f"--format {args.format} does not match the output '{args.output}'; name the output "
                             f"with {OUTPUT_FORMATS[args.format]}, or leave --format out")  # fmt: skip
    image = read_ct(volume)  # a refused input answers before torch is imported
    from DiffusionSegLib.cohort.fusion import find_cohort
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment, write_segmentation

    probe_path = args.probe or default_probe_path()
    backbone = load_backbone(args.backbone or find_probe_backbone(probe_path))
    probe = load_probe(probe_path, backbone)
    note = short_scan_note(image, backbone, probe.config.feature_config())
    if note:
        log.warning("%s %s", f"'{volume}'", note)
    result = segment(image, probe, backbone, largest_component=args.largest_component,
                     uncertainty=bool(args.uncertainty), num_noise_draws=args.draws, overlap=args.overlap,
                     device=args.device, bpr=args.bpr, precision=args.precision, orientation=args.orientation,
                     name=f"'{Path(volume).name}'",
                     cohort=find_cohort(probe_path) if args.cohort_fusion else None)  # fmt: skip
    path = write_segmentation(result, args.output)
    log.info("wrote %s: %s in %.1f s", path, ", ".join(o.name for o in result.organs), result.seconds["total"])
    if result.field_of_view is not None:
        log.info("%s", result.field_of_view.describe())
    if result.not_found:
        log.info("not found in this scan: %s", ", ".join(result.not_found))
    if args.uncertainty:
        from DiffusionSegLib.data.volume import write_volume

        log.info("wrote %s (%s)", write_volume(result.uncertainty, args.uncertainty), result.uncertainty_kind)
    return 0


def _run_many(args: argparse.Namespace, found) -> int:
    """Each scan of ``found`` into the folder ``-o`` names; 1 when some failed."""
    from contextlib import nullcontext

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from DiffusionSegLib.data.gate import check_output_path, refuse_writing_over
    from DiffusionSegLib.data.scans import check_output_folder, plan_outputs
    from DiffusionSegLib.data.volume import WRITE_SUFFIXES
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.resources import default_probe_path

    count = len(found.scans)
    if args.uncertainty:
        raise UserInputError(f"--uncertainty names one file: it applies to one scan, not {count}; segment the scans "
                             "whose uncertainty you want one at a time")  # fmt: skip
    _check_settings(args)
    for scan in found.scans:
        if not scan.exists():
            raise UserInputError(f"input not found: {scan}")
    outputs = plan_outputs(found, args.output, args.format or "seg.nrrd")
    inputs = [*found.scans, args.probe or default_probe_path(), args.backbone, args.bpr]
    for output in outputs:
        refuse_writing_over(output, inputs, "segmentation")
    check_output_folder(args.output, count)
    for output in outputs:
        if args.overwrite or not output.exists():  # a kept output is not written
            check_output_path(output, WRITE_SUFFIXES, "segmentation", inputs)
    from DiffusionSegLib.probe.batch import segment_many

    start = time.perf_counter()
    status = {"written": 0, "kept": 0, "failed": 0}
    bar = tqdm(total=count, unit="scan", desc="segment", disable=None)  # no bar where stderr is not a terminal
    with logging_redirect_tqdm() if not bar.disable else nullcontext():
        for outcome in segment_many(found.scans, outputs, args.probe, args.backbone, overwrite=args.overwrite,
                                    largest_component=args.largest_component, num_noise_draws=args.draws,
                                    overlap=args.overlap, device=args.device, bpr=args.bpr,
                                    precision=args.precision, orientation=args.orientation,
                                    cohort_fusion=args.cohort_fusion):  # fmt: skip
            status[outcome.status] += 1
            _report(outcome)
            bar.set_postfix_str(f"{outcome.scan.name} {outcome.seconds:.1f} s", refresh=False)
            bar.update(1)
    bar.close()
    log.info("%d of %d scans segmented in %.1f s (%d kept, %d failed)", status["written"], count,
             time.perf_counter() - start, status["kept"], status["failed"])  # fmt: skip
    return 1 if status["failed"] else 0


def _report(outcome) -> None:
    """The lines of one scan of a batch (a failure is one line naming the scan and why)."""
    if outcome.note:
        log.warning("%s %s", f"'{outcome.scan}'", outcome.note)
    if outcome.status == "kept":
        log.info("%s: kept the existing %s (--overwrite replaces it)", outcome.scan, outcome.output)
    elif outcome.status == "failed":
        log.error("%s: not segmented: %s", outcome.scan, outcome.reason)
    else:
        result = outcome.result
        log.info("wrote %s: %s in %.1f s", outcome.output, ", ".join(o.name for o in result.organs), outcome.seconds)
        if result.not_found:
            log.info("  not found in this scan: %s", ", ".join(result.not_found))
