"""The ``diffusionseg`` command: a thin dispatcher over ``DiffusionSegLib.commands``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``; this file only
parses arguments, sets up logging and turns a :class:`UserInputError` into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from DiffusionSegLib.commands.interrupt import terminate_as_interrupt
from DiffusionSegLib.errors import USER_ERROR_EXIT_CODE, UserInputError

__all__ = ["main", "build_parser", "COMMANDS"]

# subcommand name -> (module in DiffusionSegLib.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "show a CT's geometry and statistics, or a model file's kind, organs, training data, settings"),
    "preprocess": ("preprocess", "put a CT on the working grid (orient, crop to body, resample) and write it"),
    "pretrain": ("pretrain", "pretrain a backbone on unlabeled CT (diffusion + BPR, or a baseline)"),
    "evaluate": ("evaluate", "compare pretraining methods and probes on labeled CT (k-fold or few-shot)"),
    "demo": ("demo", "run the main job on the bundled sample CT with the shipped defaults"),
    "bpr-train": ("bpr_train", "train a Body Part Regressor (anatomical coordinates) on unlabeled CT"),
    "coords": ("coords", "write a CT's dense anatomical coordinates (3-component volume on the input grid)"),
    "train-probe": ("train_probe", "train a few-shot organ probe on a frozen backbone from a few labeled CTs"),
    "finetune": ("finetune", "fine-tune a backbone and segmentation head end to end on labeled CT (accurate)"),
    "segment": ("segment", "segment organs in a CT with a trained probe (label map or Slicer .seg.nrrd)"),
}


class _Version(argparse.Action):
    """``--version``: the library version and git commit (computed only when asked for)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from DiffusionSegLib.checkpoint import git_commit, library_version

        commit = git_commit()
        print(f"diffusionseg {library_version()}" + (f" (commit {commit[:12]})" if commit != "unknown" else ""))
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; with ``only``, the arguments of that subcommand alone are loaded (the other
    subcommands' modules, and the torch they import, are not: ``diffusionseg --help`` answers at once)."""
    parser = argparse.ArgumentParser(
        prog="diffusionseg",
        description="Anatomically guided diffusion pretraining and few-shot organ segmentation for CT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, help=summary, description=summary)
            continue
        module = importlib.import_module(f"DiffusionSegLib.commands.{module_name}")
        sub = subparsers.add_parser(name, help=summary, description=(module.__doc__ or summary).strip())
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run, _accepts_overrides=getattr(module, "ACCEPTS_OVERRIDES", False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or arguments)."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    command = next((t for t in tokens if not t.startswith("-")), "")  # the subcommand (only -v comes before it)
    parser = build_parser(only=command)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        with terminate_as_interrupt():  # SIGTERM ends like Ctrl-C: no partial output file is left behind
            return int(args._run(args) or 0)
    except UserInputError as error:
        print(f"diffusionseg {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except BrokenPipeError:  # output piped into a program that stopped reading (e.g. `| head`)
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"diffusionseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
