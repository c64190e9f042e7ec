"""Pretrain a backbone on unlabeled CT: diffusion with BPR coordinates (the method) or a baseline.

Settings come from a TOML/JSON config (``--config``) and ``--section.field VALUE`` overrides, e.g.
``--method restorative --training.steps 2000 --data.images ../shared/data/unlabeled``. Runs on one process, or on
many GPUs/nodes under torchrun (``torchrun --nproc_per_node 8 pretrain.py -- --config c.toml``). Running again
with the same output folder resumes from its last snapshot.
"""

from __future__ import annotations

import argparse
import json
import logging

from DiffusionSegLib.config import apply_overrides, load_config_file, parse_override_args
from DiffusionSegLib.pretrain.config import METHODS, PretrainConfig

log = logging.getLogger(__name__)
ACCEPTS_OVERRIDES = True  # unknown --section.field VALUE arguments reach run() as args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options

    parser.add_argument("--config", help="TOML or JSON file with the settings (sections as in PretrainConfig)")
    parser.add_argument("--method", choices=METHODS, help="override the config's method")
    parser.add_argument("--no-bpr", action="store_true", help="train without the BPR coordinate channels")
    options.add_run_dir(parser, help="the run's folder (snapshots, log, backbone.safetensors); overrides the config's "
                        "output_dir; running again with the same folder resumes", old=("--output-dir",))  # fmt: skip
    options.add_no_resume(parser, help="refuse to resume (fails if the run folder holds a snapshot)", old=("--fresh",))
    parser.add_argument("--max-steps-this-run", type=int, help="stop after this many steps (resume later)")
    options.add_device(parser, default=None, help="where the network trains: auto (a CUDA GPU if present), cpu or "
                       "cuda (default: the config's training.device)")  # fmt: skip
    options.add_precision(parser, default=None, help=options.PRECISION_HELP.replace("auto (default: ", "auto (")
                          + "; default: the config's training.precision")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.epilog = "Any other --section.field VALUE pair overrides the config, e.g. --training.steps 500."


def build_config(args: argparse.Namespace) -> PretrainConfig:
    data = load_config_file(args.config) if args.config else {}
    overrides = parse_override_args([t for t in args.overrides if t != "--"])
    if args.method:
        overrides["method"] = args.method
    if args.no_bpr:
        overrides["use_bpr"] = False
    if getattr(args, "run_dir", None):
        overrides["output_dir"] = args.run_dir
    for name in ("precision", "device"):
        if getattr(args, name, None):
            overrides.setdefault("training", {})[name] = getattr(args, name)
    return PretrainConfig.from_dict(apply_overrides(data, overrides))


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.pretrain.trainer import pretrain_backbone

    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    result = pretrain_backbone(cfg, resume=not args.no_resume, max_steps_this_run=args.max_steps_this_run)
    if result.weights is not None:
        log.info("pretraining done at step %d: %s", result.step, result.weights)
    else:
        log.info("stopped at step %d of %d; run the same command again to resume", result.step, cfg.training.steps)
    return 0
