"""Put a CT on the working grid (canonical orientation, body crop, working spacing) and write it in HU."""

from __future__ import annotations

import argparse
import logging

from DiffusionSegLib.data.volume import write_volume
from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume, resample_labels_onto, to_canonical_orientation

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = PreprocessConfig()
    parser.add_argument("volume", help="input CT: NIfTI / NRRD / MHA file or a DICOM series folder")
    parser.add_argument("-o", "--output", required=True, help="output file (.nii.gz, .nrrd or .mha)")
    parser.add_argument("--spacing", type=float, nargs=3, default=default.spacing_mm, metavar=("X", "Y", "Z"),
                        help=f"working spacing in mm (default {' '.join(map(str, default.spacing_mm))})")  # fmt: skip
    parser.add_argument("--no-crop", action="store_true", help="keep the whole field of view")
    parser.add_argument("--labels", help="a label map on the CT's grid to put on the working grid too")
    parser.add_argument("--labels-output", help="where to write it (default: OUTPUT with _labels before the suffix)")


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.data.gate import check_output_path, read_ct, read_label_map

    config = PreprocessConfig(spacing_mm=tuple(args.spacing), crop_to_body=not args.no_crop)
    check_output_path(args.output, inputs=(args.volume, args.labels))
    if args.labels:
        check_output_path(args.labels_output or _with_suffix_tag(args.output, "_labels"), what="label map",
                          inputs=(args.volume, args.labels), outputs={"working CT": args.output})  # fmt: skip
    image = read_ct(args.volume)
    labels = read_label_map(args.labels, image) if args.labels else None
    prepared = prepare_volume(image, config)
    path = write_volume(prepared.image, args.output)
    size = " x ".join(map(str, prepared.image.GetSize()))
    log.info("wrote %s: %s voxels at %s mm (HU, canonical LPS orientation, body crop)", path, size,
             " x ".join(f"{s:g}" for s in config.spacing_mm))  # fmt: skip
    if labels is not None:
        working_labels = resample_labels_onto(to_canonical_orientation(labels), prepared.image, "linear")
        target = args.labels_output or _with_suffix_tag(args.output, "_labels")
        log.info("wrote %s: label map on the working grid", write_volume(working_labels, target))
    return 0


def _with_suffix_tag(path: str, tag: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if path.endswith(suffix):
            return path[: -len(suffix)] + tag + suffix
    return path + tag
