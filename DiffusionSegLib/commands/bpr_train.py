"""Train a Body Part Regressor (dense anatomical coordinates) on unlabeled CT, without labels.

Checkpoints every N steps and at exit; run the same command again to resume exactly where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from pathlib import Path

from DiffusionSegLib.bpr.model import BPRConfig
from DiffusionSegLib.bpr.slice_model import SliceBPRConfig
from DiffusionSegLib.bpr.train import fit_bpr
from DiffusionSegLib.data.datasets import find_images
from DiffusionSegLib.errors import UserInputError

log = logging.getLogger(__name__)

# files in a folder that are label maps, not CT
_LABEL_NAME = re.compile(r"_(labels?|organs|seg\w*|lesions|vessels\w*|mask\w*)\.(nii|nii\.gz|nrrd|mha|mhd)$", re.I)


_PATCH_ONLY = {"objective": "--objective", "no_relative_position": "--no-relative-position",
               "patch": "--patch", "batch_pairs": "--batch-pairs", "points": "--points",
               "far_pairs": "--far-pairs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options

    slice_default, patch_default = SliceBPRConfig(), BPRConfig()
    parser.add_argument("images", nargs="+", help="CT files or folders of CT (label maps in folders are skipped)")
    options.add_run_dir(parser, help="the run's folder: bpr_state.pt (resumed when run again), bpr.safetensors, log "
                        "(required)", old=("--output-dir",))  # fmt: skip
    options.add_output(parser, required=False, help="also copy the final weights to this .safetensors file")
    parser.add_argument("--export", help=argparse.SUPPRESS)  # the old -o's partner: see resolve_run_dir
    parser.add_argument("--design", choices=("slice", "patch"), default="slice",
                        help="slice (default): a 2D network places each axial cross-section; patch: the 3D patch "
                             "network of the first releases")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"total steps (default {slice_default.steps} slice, {patch_default.steps} patch)")
    parser.add_argument("--channels", type=int, nargs="+", default=None,
                        help=f"widths per scale (default {' '.join(map(str, slice_default.channels))} slice, "
                             f"{' '.join(map(str, patch_default.channels))} patch)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and sampling")
    parser.add_argument("--scans-per-step", type=int, default=slice_default.scans_per_step,
                        help="slice design: scans per step (8 crops each)")
    patch = parser.add_argument_group("patch design only")
    patch.add_argument("--objective", choices=("displacement", "distance"), default=None,
                       help="coordinate differences match displacement vectors (default) or only distances")
    patch.add_argument("--no-relative-position", action="store_true", default=None,
                       help="content-only network: no within-patch positions, a free per-voxel output")
    options.add_patch(patch, help="training patch in working voxels z y x (default "
                      f"{' '.join(map(str, patch_default.patch_size_vox))})", parser_for_old=parser,
                      old=("--patch-size",))  # fmt: skip
    patch.add_argument("--batch-pairs", type=int, default=None, help="crop pairs per step")
    patch.add_argument("--points", type=int, default=None, help="sampled voxels per crop")
    patch.add_argument("--far-pairs", type=float, default=None,
                       help="share of crop pairs placed anywhere along z (cranio-caudal order over the body)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="save every N steps (and at exit)")
    options.add_minutes(parser, help="stop (after saving) after this many minutes (default: run all steps)",
                        old=("--max-minutes",))  # fmt: skip
    options.add_no_resume(parser, help="start afresh even if the run folder holds a checkpoint", old=("--fresh",))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_arguments(args: argparse.Namespace) -> BPRConfig | SliceBPRConfig:
    """The training config of the chosen design; options of the other design are refused by name."""
    common = {"seed": args.seed}
    for name, field in (("steps", "steps"), ("lr", "learning_rate")):
        if getattr(args, name) is not None:
            common[field] = getattr(args, name)
    if args.channels is not None:
        common["channels"] = tuple(args.channels)
    try:
        if args.design == "slice":
            given = [flag for name, flag in _PATCH_ONLY.items() if getattr(args, name) is not None]
            if given:
                raise UserInputError(f"{', '.join(given)} only apply to --design patch; drop them or add "
                                     "--design patch")  # fmt: skip
            return SliceBPRConfig(scans_per_step=args.scans_per_step, **common)
        patch = {"objective": args.objective, "batch_pairs": args.batch_pairs, "points_per_crop": args.points,
                 "far_pair_fraction": args.far_pairs,
                 "patch_size_vox": None if args.patch is None else tuple(args.patch)}  # fmt: skip
        if args.no_relative_position:
            patch.update(relative_position=False, global_offset=False, residual_field=True)
        return BPRConfig(**common, **{k: v for k, v in patch.items() if v is not None})
    except ValueError as error:
        raise UserInputError(str(error)) from None


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded to their volumes, leaving out label maps."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and not any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
            paths.extend(p for p in find_images(path) if not _LABEL_NAME.search(p.name))
        elif path.exists():
            paths.append(path)
        else:
            raise UserInputError(f"training input not found: {path}")
    if not paths:
        raise UserInputError(f"no CT volumes found in {', '.join(inputs)}")
    return paths


def resolve_run_dir(args: argparse.Namespace) -> None:
    """Earlier releases named the run folder ``-o`` and the exported weights ``--export``: ``-o FOLDER`` without
    ``--run-dir`` (with ``--export``, or not a .safetensors file) still means the run folder, with a notice."""
    from DiffusionSegLib.commands.options import renamed_notice

    old_output = args.run_dir is None and args.output is not None
    if old_output and (args.export is not None or not str(args.output).endswith(".safetensors")):
        renamed_notice("-o FOLDER", "--run-dir FOLDER (-o now names the exported .safetensors file)")
        args.run_dir, args.output = args.output, None
    if args.export is not None:
        renamed_notice("--export", "-o/--output")
        args.output = args.export
    if args.run_dir is None:
        raise UserInputError("--run-dir is required: the folder of the run (checkpoint, weights, log)")


def run(args: argparse.Namespace) -> int:
    import torch

    resolve_run_dir(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_arguments(args)
    images = collect_images(args.images)
    if args.output:
        from DiffusionSegLib.data.gate import refuse_writing_over

        refuse_writing_over(args.output, images, "exported weights")
    log.info("training the %s BPR on %d CT volumes for %d steps -> %s", args.design, len(images), cfg.steps,
             args.run_dir)
    result = fit_bpr(images, cfg, args.run_dir, resume=not args.no_resume, checkpoint_every=args.checkpoint_every,
                     progress=not args.quiet,
                     max_seconds=None if args.minutes is None else 60.0 * args.minutes)  # fmt: skip
    last = result.history[-1] if result.history else {}
    log.info("stopped at step %d/%d after %.0f s%s; weights %s", result.step, cfg.steps, result.seconds,
             f", last loss {last['loss']:.4f} (pair RMSE {last['rmse_mm']:.1f} mm)" if last else "",
             result.weights_path)  # fmt: skip
    if args.output:
        target = Path(args.output)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.weights_path, target)
        log.info("copied weights to %s", target)
    return 0
