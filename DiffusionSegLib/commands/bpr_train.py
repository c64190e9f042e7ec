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
from DiffusionSegLib.bpr.train import fit_bpr
from DiffusionSegLib.data.datasets import find_images
from DiffusionSegLib.errors import UserInputError

log = logging.getLogger(__name__)

# files in a folder that are label maps, not CT
_LABEL_NAME = re.compile(r"_(labels?|organs|seg\w*|lesions|vessels\w*|mask\w*)\.(nii|nii\.gz|nrrd|mha|mhd)$", re.I)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = BPRConfig()
    parser.add_argument("images", nargs="+", help="CT files or folders of CT (label maps in folders are skipped)")
    parser.add_argument("-o", "--output-dir", required=True, help="folder for bpr_state.pt, bpr.safetensors, log")
    parser.add_argument("--steps", type=int, default=default.steps, help=f"total steps (default {default.steps})")
    parser.add_argument("--objective", choices=("displacement", "distance"), default=default.objective,
                        help="coordinate differences match displacement vectors or only distances")
    parser.add_argument("--no-relative-position", action="store_true",
                        help="content-only network: no within-patch positions, a free per-voxel output")
    parser.add_argument("--patch-size", type=int, nargs=3, default=default.patch_size_vox, metavar=("D", "H", "W"),
                        help=f"patch in working voxels z y x (default {' '.join(map(str, default.patch_size_vox))})")
    parser.add_argument("--channels", type=int, nargs="+", default=default.channels,
                        help=f"widths per scale (default {' '.join(map(str, default.channels))})")
    parser.add_argument("--batch-pairs", type=int, default=default.batch_pairs, help="crop pairs per step")
    parser.add_argument("--points", type=int, default=default.points_per_crop, help="sampled voxels per crop")
    parser.add_argument("--far-pairs", type=float, default=default.far_pair_fraction,
                        help="share of crop pairs placed anywhere along z (cranio-caudal order over the body)")
    parser.add_argument("--lr", type=float, default=default.learning_rate, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=default.seed, help="seed of initialisation and sampling")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="save every N steps (and at exit)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (after saving) after this long")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--export", default=None, help="also copy the final weights to this .safetensors path")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


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


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = BPRConfig(steps=args.steps, objective=args.objective, patch_size_vox=tuple(args.patch_size),
                        channels=tuple(args.channels), batch_pairs=args.batch_pairs, points_per_crop=args.points,
                        learning_rate=args.lr, seed=args.seed, far_pair_fraction=args.far_pairs,
                        relative_position=not args.no_relative_position,
                        global_offset=not args.no_relative_position,
                        residual_field=args.no_relative_position)  # fmt: skip
    except ValueError as error:
        raise UserInputError(str(error)) from None
    images = collect_images(args.images)
    log.info("training the BPR on %d CT volumes for %d steps -> %s", len(images), cfg.steps, args.output_dir)
    result = fit_bpr(images, cfg, args.output_dir, resume=not args.no_resume, checkpoint_every=args.checkpoint_every,
                     progress=not args.quiet,
                     max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes)  # fmt: skip
    last = result.history[-1] if result.history else {}
    log.info("stopped at step %d/%d after %.0f s%s; weights %s", result.step, cfg.steps, result.seconds,
             f", last loss {last['loss']:.4f} (pair RMSE {last['rmse_mm']:.1f} mm)" if last else "",
             result.weights_path)  # fmt: skip
    if args.export:
        target = Path(args.export)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.weights_path, target)
        log.info("copied weights to %s", target)
    return 0
