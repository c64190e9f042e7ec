"""Segment a CT with a trained probe; the label map is written exactly on the input grid.

``OUT.seg.nrrd`` gives a Slicer segmentation (named, coloured segments with terminology); ``OUT.nii.gz`` (or
``.nrrd``/``.mha``) a plain label map. Without ``--probe`` the shipped 13-organ BTCV model is used
(``finetune_btcv13_default``, fine-tuned end to end); the backbone defaults to the one the model records (its
fine-tuned backbone beside it, or a model file with the recorded hash). Each organ keeps its largest connected
component unless ``--no-largest-component`` is given.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from DiffusionSegLib.preprocess.orientation import add_orientation_argument

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options
    from DiffusionSegLib.defaults import LARGEST_COMPONENT

    parser.add_argument("volume", help="input CT: NIfTI / NRRD / MHA file or a DICOM series folder")
    parser.add_argument("--probe", help="model file from train-probe or finetune (default: the shipped 13-organ BTCV "
                        "model finetune_btcv13_default, fine-tuned end to end)")  # fmt: skip
    options.add_backbone(parser, help="backbone weights (default: the one the model records)")
    options.add_output(parser, help="output label map (.seg.nrrd, .nii.gz, .nrrd, .mha)")
    options.add_largest_component(parser, LARGEST_COMPONENT)
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


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.data.gate import check_output_path, read_ct
    from DiffusionSegLib.data.volume import WRITE_SUFFIXES
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.resources import default_probe_path

    inputs = (args.volume, args.probe or default_probe_path(), args.backbone, args.bpr)
    check_output_path(args.output, WRITE_SUFFIXES, "segmentation", inputs)
    if args.uncertainty:
        check_output_path(args.uncertainty, tuple(s for s in WRITE_SUFFIXES if s != ".seg.nrrd"), "uncertainty map",
                          inputs, {"segmentation": args.output})  # fmt: skip
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserInputError(f"--overlap {args.overlap} is invalid; expected a value in [0, 1)")
    if args.draws is not None and args.draws < 1:
        raise UserInputError(f"--draws {args.draws} is invalid; expected at least 1")
    image = read_ct(args.volume)  # a refused input answers before torch is imported
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment, write_segmentation

    probe_path = args.probe or default_probe_path()
    backbone = load_backbone(args.backbone or find_probe_backbone(probe_path))
    probe = load_probe(probe_path, backbone)
    note = short_scan_note(image, backbone, probe.config.feature_config())
    if note:
        log.warning("%s %s", f"'{args.volume}'", note)
    result = segment(image, probe, backbone, largest_component=args.largest_component,
                     uncertainty=bool(args.uncertainty), num_noise_draws=args.draws, overlap=args.overlap,
                     device=args.device, bpr=args.bpr, precision=args.precision, orientation=args.orientation,
                     name=f"'{Path(args.volume).name}'")  # fmt: skip
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
