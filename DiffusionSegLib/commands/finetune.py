"""Fine-tune a backbone and a segmentation head end to end on labeled CT (the accurate path; ``train-probe`` is
the quick one).

Cases and organs are chosen as for ``train-probe`` (``--data`` folder or ``--case CT LABELS`` pairs, ``--organs``).
The model is a probe file (``-o model.safetensors``) with its fine-tuned backbone beside it
(``model.backbone.safetensors``); ``segment --probe model.safetensors`` uses it. Training runs for ``--minutes`` of
wall time (the cosine learning-rate schedule is fitted to that budget) or ``--steps``; with ``--run-dir`` it
snapshots every ``--checkpoint-every`` steps and running the same command again resumes. Ctrl-C or SIGTERM stops
it and writes the best model so far.

``--unlabeled DIR|GLOB|FILE ...`` adds the unlabeled scans of the cohort: the labeled scans are registered to each
(ANTs, started from the BPR coordinates; ``pip install antspyx``), the warped labels where they agree train the
network beside the true ones, and ``--minutes`` then includes that registration (cached in ``--run-dir``).
With ``--pseudo-labels self-training`` nothing is registered: the network trains on the labeled scans for
``--self-training-start`` of the run, then labels the unlabeled scans itself and keeps its confident voxels;
``--pseudo-labels registration+self-training`` does that relabeling after training on registration's labels.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands.train_probe import add_case_arguments
    from DiffusionSegLib.finetune.config import PSEUDO_FUSIONS, PSEUDO_LABELS

    from DiffusionSegLib.commands import options
    from DiffusionSegLib.defaults import PSEUDO_BACKGROUND_MARGIN_MM

    options.add_backbone(parser, help="pretrained backbone (default: the shipped diffusion + BPR backbone, "
                         "backbone_default)")  # fmt: skip
    add_case_arguments(parser)
    options.add_output(parser, help="model file to write (.safetensors; its fine-tuned backbone is written beside it)")
    options.add_run_dir(parser, help="folder for resumable snapshots and registrations; running the same command "
                        "again resumes (default: none)")  # fmt: skip
    parser.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                        help="start from the backbone's weights or a random init of its network (default pretrained)")
    options.add_minutes(parser, default=15.0, help="training budget in minutes (default 15; 0: use --steps)",
                        old=("--max-minutes",))  # fmt: skip
    parser.add_argument("--steps", type=int, default=0, help="training steps (with --minutes 0), or a cap")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="working spacing in mm "
                        "(default 3 3 3)")  # fmt: skip
    options.add_patch(parser, help="training patch in working voxels (default 64 64 64)", old=("--patch-size",))
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0, help="backbone learning rate as a share "
                        "of the head's (default 1)")  # fmt: skip
    parser.add_argument("--ema-decay", type=float, default=0.0, help="moving average of the weights, validated and "
                        "written in their place (e.g. 0.995; default 0: off)")  # fmt: skip
    parser.add_argument("--val-volumes", type=int, default=1, help="cases held out to choose the checkpoint "
                        "(default 1; used with 3 or more cases)")  # fmt: skip
    parser.add_argument("--val-every", type=int, default=100, help="steps between validations (default 100)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between snapshots (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation / sampling seed (default 0)")
    options.add_device(parser)
    options.add_precision(parser)
    options.add_bpr(parser)
    parser.add_argument("--unlabeled", nargs="+", metavar="SCANS", help="unlabeled CTs of the same cohort to learn "
                        "from too: folders, files or glob patterns (see --pseudo-labels)")
    parser.add_argument("--unlabeled-share", type=float, default=0.5, help="share of each batch from the unlabeled "
                        "scans (default 0.5)")  # fmt: skip
    parser.add_argument("--pseudo-labels", choices=PSEUDO_LABELS, default="registration",
                        help="how the unlabeled scans get labels: 'registration' (labeled scans registered to them, "
                        "warped labels kept where all agree; needs antspyx) or 'self-training' (the network, trained "
                        "on the labeled scans for --self-training-start of the run, labels them itself, confident "
                        "voxels only) or 'registration+self-training' (registration's labels until "
                        "--self-training-start, then the network's own confident ones); default registration")  # fmt: skip
    parser.add_argument("--self-training-start", type=float, default=0.5, help="share of the run before self-training "
                        "labels the unlabeled scans (trained until then on the labeled scans alone, or with "
                        "registration's labels too; default 0.5)")  # fmt: skip
    parser.add_argument("--pseudo-confidence", type=float, default=0.9, help="self-training keeps voxels predicted "
                        "with at least this probability (default 0.9)")  # fmt: skip
    parser.add_argument("--pseudo-background-margin", type=float, default=PSEUDO_BACKGROUND_MARGIN_MM, metavar="MM",
                        help="background pseudo-labels count only farther than this from every pseudo-labeled organ "
                        f"and unsure voxel, with --unlabeled (default {PSEUDO_BACKGROUND_MARGIN_MM:g} mm, the measured best; 0: all "
                        "count)")  # fmt: skip
    parser.add_argument("--registration", choices=("SyN", "SyNRA", "Affine"), default="SyN",
                        help="ANTs registration of labeled to unlabeled scans (default SyN)")
    parser.add_argument("--pseudo-fusion", choices=PSEUDO_FUSIONS, default="agreement",
                        help="how the registered labeled scans' labels are fused: 'agreement' (kept where all agree) "
                        "or 'weighted-vote' (each votes by how well its warped image matches the scan there; an "
                        "organ one labeled scan lacks is taken from the other); default agreement")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.commands.interrupt import stop_requests
    from DiffusionSegLib.commands.train_probe import case_inputs, labeled_pairs
    from DiffusionSegLib.data.gate import check_output_path, read_ct
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.preprocess.orientation import check_orientation
    from DiffusionSegLib.finetune import FinetuneConfig, backbone_output_path, finetune
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.resources import default_backbone_path

    options = {"init": args.init, "budget_minutes": args.minutes, "steps": args.steps, "batch_size": args.batch_size,
               "lr": args.lr, "val_volumes": args.val_volumes, "val_every": args.val_every,
               "checkpoint_every": args.checkpoint_every, "seed": args.seed, "device": args.device,
               "precision": args.precision, "backbone_lr_scale": args.backbone_lr_scale,
               "ema_decay": args.ema_decay, "unlabeled_share": args.unlabeled_share,
               "registration": args.registration, "pseudo_fusion": args.pseudo_fusion, "pseudo_labels": args.pseudo_labels,
               "self_training_start": args.self_training_start, "pseudo_confidence": args.pseudo_confidence,
               "pseudo_background_margin_mm": args.pseudo_background_margin}  # fmt: skip
    if args.spacing:
        options["spacing_mm"] = tuple(args.spacing)
    if args.patch:
        options["patch_size_vox"] = tuple(args.patch)
    try:
        cfg = FinetuneConfig(**options)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    unlabeled_paths = []
    if args.unlabeled:
        from DiffusionSegLib.cohort.registration import require_ants
        from DiffusionSegLib.data.datasets import find_unlabeled_scans

        if cfg.pseudo_labels != "self-training":
            require_ants()
        unlabeled_paths = find_unlabeled_scans(args.unlabeled, exclude=[pair[0] for pair in args.case or ()])
    inputs = case_inputs(args, args.backbone or default_backbone_path()) + unlabeled_paths
    check_output_path(args.output, (".safetensors",), "model", inputs)
    check_output_path(backbone_output_path(args.output), (".safetensors",), "fine-tuned backbone", inputs,
                      {"model": args.output})  # fmt: skip
    backbone = load_backbone(args.backbone or default_backbone_path())
    cases, labels, names = labeled_pairs(args)
    unlabeled_paths = [p for p in unlabeled_paths if p.resolve() not in {Path(n).resolve() for n in names}]
    unlabeled = [check_orientation(read_ct(p, f"unlabeled scan '{p.name}'"), args.orientation,
                                   f"unlabeled scan '{p.name}'")[0] for p in unlabeled_paths]  # fmt: skip
    unlabeled_names = [str(p) for p in unlabeled_paths]
    if unlabeled:
        log.info("learning from %d unlabeled scan(s) too", len(unlabeled))
    with stop_requests() as should_stop:  # Ctrl-C / SIGTERM: the loop writes the best model so far and a snapshot
        start = time.perf_counter()
        log.info("fine-tuning (%s init) for %s on %d case(s)", cfg.init, ", ".join(l.name for l in labels), len(cases))
        result = finetune(cases, labels, backbone, args.output, cfg, run_dir=args.run_dir,
                          case_names=names, bpr=args.bpr, should_stop=should_stop, unlabeled=unlabeled,
                          unlabeled_names=unlabeled_names)  # fmt: skip
    log.info("wrote %s and %s: %d of %d steps, kept step %d%s (%.1f min)", result.probe_path, result.backbone_path,
             result.steps, result.planned_steps, result.best_step, ", stopped early" if result.cancelled else "",
             (time.perf_counter() - start) / 60)  # fmt: skip
    return 0
