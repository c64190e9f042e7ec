"""Compare pretraining methods and probes on labeled CT: k-fold (the paper's setting) or few-shot.

Each ``--backbone NAME=PATH`` is a pretrained backbone (e.g. ``diffusion+BPR=runs/a/backbone.safetensors``);
for the timestep ablation pass one diffusion backbone per number of timesteps T. For every backbone, probe head
and split, a probe is trained on the split's labeled cases and segments its test cases; Dice and HD95 are
measured against the manual labels on each case's own grid. Writes ``report.json``, ``report.md`` and PNG
plots to the output folder. Probe settings are overridden with ``--probe.FIELD VALUE`` (e.g. ``--probe.steps
200``). Report only manual labels (BTCV, 3D-IRCADb); pseudo-labels are for smoke tests.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)
ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options
    from DiffusionSegLib.defaults import LARGEST_COMPONENT

    parser.add_argument("--data", required=True, help="dataset folder with labeled cases (e.g. ../shared/data/btcv)")
    parser.add_argument("--label-kind", help="label files of this kind (e.g. organs)")
    parser.add_argument("--backbone", action="append", required=True, metavar="NAME=PATH",
                        help="a backbone to evaluate (repeat); NAME labels its rows")  # fmt: skip
    parser.add_argument("--regime", choices=("kfold", "fewshot"), default="kfold",
                        help="k-fold cross-validation (default) or few-shot training sets")
    parser.add_argument("--folds", type=int, default=5, help="folds of the k-fold regime (default 5)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5], help="few-shot training-set sizes")
    parser.add_argument("--repeats", type=int, default=1, help="few-shot draws per size")
    parser.add_argument("--heads", nargs="+", choices=("linear", "nonlinear", "context"), default=["linear", "nonlinear"])
    parser.add_argument("--organs", help="comma-separated organ names to learn and score (default: all in the legend)")
    parser.add_argument("--max-cases", type=int, default=0, help="use only the first N cases (0: all)")
    parser.add_argument("--max-test-cases", type=int, default=0, help="test cases per split (0: all)")
    options.add_largest_component(parser, LARGEST_COMPONENT)
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and draws (default 0)")
    parser.add_argument("--reuse", action="store_true",
                        help="save each backbone's results in OUTPUT/per_backbone and reuse those of an earlier run "
                             "with the same weights, cases and settings (resume, or add a backbone)")
    options.add_output(parser, help="folder for report.json, report.md and plots", old=("--output-dir",))
    options.add_device(parser, default=None, help="where the networks run: auto (default: a CUDA GPU if present), "
                       "cpu or cuda (same as --probe.device)")  # fmt: skip
    options.add_precision(parser, default=None, help=options.PRECISION_HELP + " (same as --probe.precision)")
    parser.epilog = "Probe settings: --probe.steps N, --probe.patch_size_vox '[32,64,64]', --probe.timestep t, ..."


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.config import config_from_dict, parse_override_args
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.labels import canonical_organ_name
    from DiffusionSegLib.errors import UserInputError
    from DiffusionSegLib.evaluate.harness import EvaluationConfig, evaluate, write_evaluation
    from DiffusionSegLib.pretrain import load_backbone
    from DiffusionSegLib.probe import ProbeConfig

    overrides = parse_override_args(args.overrides)
    unknown = sorted(set(overrides) - {"probe"})
    if unknown:
        raise UserInputError(f"unknown override section(s) {unknown}; only --probe.FIELD VALUE is accepted")
    for name in ("precision", "device"):
        if getattr(args, name):
            overrides.setdefault("probe", {})[name] = getattr(args, name)
    probe_config = config_from_dict(ProbeConfig, overrides.get("probe", {}), "probe")
    cases = find_labeled_cases(args.data, args.label_kind)
    if args.max_cases:
        cases = cases[: args.max_cases]
    organs = list(cases[0].labels) if cases else []
    if args.organs:
        wanted = [canonical_organ_name(n) for n in args.organs.split(",") if n.strip()]
        missing = sorted(set(wanted) - {o.name for o in organs})
        if missing:
            raise UserInputError(f"--organs {missing} not in the legend of {args.data}; known: {[o.name for o in organs]}")
        organs = [o for o in organs if o.name in wanted]
    backbones = {}
    for entry in args.backbone:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise UserInputError(f"--backbone {entry!r}: expected NAME=PATH")
        backbones[name] = load_backbone(path)
    cfg = EvaluationConfig(regime=args.regime, folds=args.folds, shots=tuple(args.shots), repeats=args.repeats,
                           max_test_cases=args.max_test_cases, heads=tuple(args.heads), seed=args.seed,
                           largest_component=args.largest_component)  # fmt: skip
    reuse_dir = Path(args.output) / "per_backbone" if args.reuse else None
    results = evaluate(cases, backbones, cfg, probe_config, organs=organs, progress=log.info, reuse_dir=reuse_dir)
    results["command"] = "diffusionseg evaluate " + " ".join(getattr(args, "argv", []) or [])
    paths = write_evaluation(results, args.output)
    for row in results["rows"]:
        log.info("%-24s %-10s %-14s mean Dice %.3f", row["method"], row["probe"], row["regime"], row["mean"]["mean"])
    for kind, path in paths.items():
        log.info("wrote %s: %s", kind, path)
    return 0
