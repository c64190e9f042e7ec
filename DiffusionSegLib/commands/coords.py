"""Write a CT's dense anatomical coordinates from a Body Part Regressor, exactly on the input grid.

The output is a 3-component float32 vector volume in mm-equivalent units: component 0 runs right → left,
1 anterior → posterior, 2 inferior → superior (cranio-caudal). Outside the body box the value is 0.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from DiffusionSegLib.preprocess.orientation import add_orientation_argument

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options

    parser.add_argument("volume", help="input CT: NIfTI / NRRD / MHA file or a DICOM series folder")
    options.add_output(parser, help="output vector volume (.nii.gz, .nrrd or .mha)")
    options.add_bpr(parser, help="Body Part Regressor weights (default: the shipped bpr_default)", old=("--weights",))
    parser.add_argument("--mode", choices=("monotone", "translation", "affine", "dense"), default=None,
                        help="monotone (default for the slice design): one anatomical offset per slice, "
                             "non-decreasing along z; translation (default for the patch design): physical "
                             "position + one offset per scan; affine: per-axis line through the network's map; "
                             "dense: the network's map itself")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1), patch design (default 0.25)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    options.add_device(parser)
    options.add_precision(parser)
    add_orientation_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from DiffusionSegLib.bpr.inference import predict_body_coordinates
    from DiffusionSegLib.bpr.model import load_bpr
    from DiffusionSegLib.data.gate import check_output_path, read_ct
    from DiffusionSegLib.data.volume import write_volume
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.preprocess.orientation import check_orientation, mirror_image

    if not 0 <= args.overlap < 1:
        raise UserInputError(f"--overlap {args.overlap} is invalid; expected a value in [0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_output_path(args.output, what="coordinate map", inputs=(args.volume, args.bpr))
    given = read_ct(args.volume)
    image, _, mirrored = check_orientation(given, args.orientation, f"'{Path(args.volume).name}'")
    model, _ = load_bpr(args.bpr)
    from DiffusionSegLib.features import resolve_device
    from DiffusionSegLib.precision import autocast_context

    device = resolve_device(args.device)
    start = time.perf_counter()
    with autocast_context(args.precision, device):
        coordinates = predict_body_coordinates(image, model, mode=args.mode, overlap=args.overlap, device=device)
    if mirrored:  # computed on the voxels mirrored to match the anatomy: back onto the input grid as given
        coordinates = mirror_image(coordinates, mirrored)
        coordinates.CopyInformation(given)
    seconds = time.perf_counter() - start
    path = write_volume(coordinates, args.output)
    log.info("wrote %s: 3-component anatomical coordinates (mm-equivalent; x R->L, y A->P, z I->S) on the input "
             "grid %s in %.1f s", path, " x ".join(map(str, image.GetSize())), seconds)  # fmt: skip
    return 0
