"""Options shared by the subcommands, defined once so that one meaning has one spelling everywhere.

The vocabulary: ``-o/--output`` (what a command writes: a file, or the folder of several outputs), ``--run-dir``
(a training run's folder of snapshots, resumed when run again), ``--no-resume``, ``--minutes`` (a time budget),
``--patch D H W`` (a training patch in working voxels), ``--backbone``, ``--bpr`` (Body Part Regressor weights),
``--device`` and ``--precision`` (on every command that runs a network). Spellings of earlier releases still
parse, hidden from ``--help``, and print a one-line notice naming the new one (:func:`add_renamed`).
"""

from __future__ import annotations

import argparse
import sys

from DiffusionSegLib.defaults import DEVICES, PRECISIONS

__all__ = ["RENAMED", "add_device", "add_precision", "add_bpr", "add_backbone", "add_output", "add_run_dir",
           "add_no_resume", "add_minutes", "add_patch", "add_largest_component", "add_renamed", "renamed_notice"]

RENAMED = {"--weights": ("--bpr",), "--max-minutes": ("--minutes",), "--patch-size": ("--patch",),
           "--fresh": ("--no-resume",), "--output-dir": ("--run-dir", "--output"), "--export": ("--output",)}
"""Old spellings -> their canonical ones: ``--output-dir`` is ``--run-dir`` where it named a training run's folder
(``pretrain``, ``bpr-train``) and ``-o/--output`` where it named a folder of outputs (``demo``, ``evaluate``)."""

PRECISION_HELP = ("network arithmetic: auto (default: bfloat16 on a CUDA GPU with bfloat16, and on a CPU with "
                  "bfloat16 units where a short cached calibration finds it faster and agreeing; else float32), "
                  "float32 or bfloat16")  # fmt: skip


def renamed_notice(old: str, new: str) -> None:
    """The one line a renamed option prints (on stderr, so piped output stays clean)."""
    print(f"diffusionseg: note: {old} is now {new} (the old spelling still works)", file=sys.stderr)


class _Renamed(argparse.Action):
    """An old spelling: stores like the canonical option, after a notice."""

    def __init__(self, option_strings, dest, new: str, store_const=False, **kwargs) -> None:
        self.new, self.store_const = new, store_const
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        renamed_notice(option_string, self.new)
        setattr(namespace, self.dest, self.const if self.store_const else values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Let ``old`` set what ``new`` (already added to ``parser``) sets, hidden from ``--help``."""
    action = next(a for a in parser._actions if new in a.option_strings)
    flag = isinstance(action, (argparse._StoreConstAction, argparse._StoreTrueAction, argparse._StoreFalseAction))
    kwargs = {"nargs": 0, "const": action.const} if flag else {"nargs": action.nargs, "type": action.type,
                                                               "metavar": action.metavar, "choices": action.choices}  # fmt: skip
    parser.add_argument(old, dest=action.dest, action=_Renamed, new=new, store_const=flag, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)  # fmt: skip


def add_device(parser, default: str | None = "auto", help: str = "where the networks run: auto (default: a CUDA "
               "GPU if present), cpu or cuda") -> None:  # fmt: skip
    parser.add_argument("--device", choices=DEVICES, default=default, help=help)


def add_precision(parser, default: str | None = "auto", help: str = PRECISION_HELP) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=default, help=help)


def add_bpr(parser, help: str = "Body Part Regressor weights for a backbone with coordinates (default: the one the "
            "backbone records, the shipped bpr_default)", old: tuple[str, ...] = ()) -> None:  # fmt: skip
    parser.add_argument("--bpr", help=help)
    for name in old:
        add_renamed(parser, name, "--bpr")


def add_backbone(parser, help: str = "backbone weights (default: the shipped diffusion + BPR backbone, "
                 "backbone_default)", **kwargs) -> None:  # fmt: skip
    parser.add_argument("--backbone", help=help, **kwargs)


def add_output(parser, help: str, required: bool = True, default: str | None = None, old: tuple[str, ...] = ()) -> None:
    parser.add_argument("-o", "--output", required=required, default=default, help=help)
    for name in old:
        add_renamed(parser, name, "--output")


def add_run_dir(parser, help: str, required: bool = False, old: tuple[str, ...] = ()) -> None:
    parser.add_argument("--run-dir", required=required, help=help)
    for name in old:
        add_renamed(parser, name, "--run-dir")


def add_no_resume(parser, help: str, old: tuple[str, ...] = ()) -> None:
    parser.add_argument("--no-resume", action="store_true", help=help)
    for name in old:
        add_renamed(parser, name, "--no-resume")


def add_minutes(parser, help: str, default: float | None = None, old: tuple[str, ...] = ()) -> None:
    parser.add_argument("--minutes", type=float, default=default, help=help)
    for name in old:
        add_renamed(parser, name, "--minutes")


def add_patch(parser, help: str, parser_for_old=None, old: tuple[str, ...] = (), **kwargs) -> None:
    """``--patch D H W``; ``parser`` may be an argument group (old spellings then go on ``parser_for_old``)."""
    parser.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"), help=help, **kwargs)
    for name in old:
        add_renamed(parser_for_old or parser, name, "--patch")


def add_largest_component(parser, default: bool) -> None:
    """``--largest-component`` / ``--no-largest-component`` (also ``--all-components``), default ``default``."""
    state = "on" if default else "off"
    parser.add_argument("--largest-component", dest="largest_component", action="store_true", default=default,
                        help=f"keep only each organ's largest connected component (default {state})")  # fmt: skip
    parser.add_argument("--no-largest-component", dest="largest_component", action="store_false",
                        help="keep every connected component of each organ")
    parser.add_argument("--all-components", dest="largest_component", action="store_false", help=argparse.SUPPRESS)
