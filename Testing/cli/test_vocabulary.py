"""One option vocabulary across the command line: every subcommand's parser is walked, each meaning has one
visible spelling, every command that runs a network takes ``--device`` and ``--precision``, and the spellings of
earlier releases still parse (hidden from ``--help``) to the same setting, with a one-line notice."""

from __future__ import annotations

import argparse

import pytest

from DiffusionSegLib.cli import COMMANDS, build_parser, main
from DiffusionSegLib.commands.options import RENAMED

CANONICAL = {  # dest -> the one visible spelling (every command that has the setting spells it so)
    "bpr": ("--bpr",), "minutes": ("--minutes",), "patch": ("--patch",), "run_dir": ("--run-dir",),
    "no_resume": ("--no-resume",), "output": ("-o", "--output"), "device": ("--device",),
    "precision": ("--precision",), "backbone": ("--backbone",), "largest_component": ("--largest-component",),
}  # fmt: skip
RUNS_A_NETWORK = {"coords", "demo", "evaluate", "finetune", "pretrain", "segment", "train-probe"}
"""Commands whose network runs where --device says (``bpr-train`` trains its regressor on the CPU; ``info`` and
``preprocess`` run none)."""
OLD = {  # command -> (old spelling and its argument(s), the dest it sets, the value it gives)
    "coords": [(["--weights", "w.safetensors"], "bpr", "w.safetensors")],
    "bpr-train": [(["--max-minutes", "5"], "minutes", 5.0), (["--patch-size", "8", "16", "16"], "patch", [8, 16, 16]),
                  (["--output-dir", "runs/b"], "run_dir", "runs/b")],
    "pretrain": [(["--fresh"], "no_resume", True), (["--output-dir", "runs/p"], "run_dir", "runs/p")],
    "demo": [(["--output-dir", "out"], "output", "out")],
    "evaluate": [(["--output-dir", "out"], "output", "out")],
    "finetune": [(["--max-minutes", "3"], "minutes", 3.0), (["--patch-size", "32", "32", "32"], "patch", [32, 32, 32])],
    "train-probe": [(["--patch-size", "16", "32", "32"], "patch", [16, 32, 32])],
    "segment": [(["--all-components"], "largest_component", False)],
}  # fmt: skip
REQUIRED = {  # the least each command needs to parse
    "info": ["ct.nii.gz"], "preprocess": ["ct.nii.gz", "-o", "w.nii.gz"], "pretrain": [], "demo": [],
    "evaluate": ["--data", "d", "--backbone", "a=b", "-o", "out"], "bpr-train": ["ct.nii.gz"],
    "coords": ["ct.nii.gz", "-o", "c.nii.gz"], "train-probe": ["--data", "d", "-o", "p.safetensors"],
    "finetune": ["--data", "d", "-o", "m.safetensors"], "segment": ["ct.nii.gz", "-o", "s.seg.nrrd"],
}  # fmt: skip


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(only=name)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def _visible(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in sub._actions if a.help is not argparse.SUPPRESS and a.option_strings]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_meaning_has_one_visible_spelling(name):
    sub = _subparser(name)
    old = set(RENAMED) | {"--all-components", "--export"}
    for action in _visible(sub):
        assert not old & set(action.option_strings), (name, action.option_strings)  # old spellings are hidden
        if action.dest in CANONICAL and action.const is not False:  # (--no-largest-component: the way off)
            assert tuple(action.option_strings) == CANONICAL[action.dest], (name, action.option_strings)
    help_text = sub.format_help()
    for spelling in old:
        assert f"{spelling} " not in help_text and f"{spelling}\n" not in help_text, (name, spelling)


@pytest.mark.parametrize("name", sorted(RUNS_A_NETWORK))
def test_every_command_that_runs_a_network_takes_device_and_precision(name):
    args = _subparser(name).parse_args([*REQUIRED[name], "--device", "cpu", "--precision", "float32"])
    assert (args.device, args.precision) == ("cpu", "float32")


def test_the_shipped_models_are_the_defaults_and_largest_component_is_on():
    for name in ("train-probe", "finetune"):
        assert _subparser(name).parse_args(REQUIRED[name]).backbone is None  # run(): the shipped backbone
    for name in ("segment", "evaluate"):
        sub = _subparser(name)
        assert sub.parse_args(REQUIRED[name]).largest_component is True
        assert sub.parse_args([*REQUIRED[name], "--no-largest-component"]).largest_component is False
    assert _subparser("finetune").parse_args(REQUIRED["finetune"]).pseudo_background_margin == 12.0


@pytest.mark.parametrize("name", sorted(OLD))
def test_old_spellings_parse_to_the_same_setting_with_a_notice(name, capsys):
    sub = _subparser(name)
    for tokens, dest, value in OLD[name]:
        args = sub.parse_args([*REQUIRED[name], *tokens])
        assert getattr(args, dest) == value, (name, tokens)
        notice = capsys.readouterr().err
        if tokens[0] != "--all-components":  # a synonym, not a renamed option
            assert notice.count("\n") == 1 and tokens[0] in notice and "is now" in notice, notice
            new = next(a for a in _visible(sub) if a.dest == dest)
            assert any(s in notice for s in new.option_strings), notice
            assert getattr(sub.parse_args([*REQUIRED[name], *new.option_strings[-1:], *tokens[1:]]), dest) == value


def test_version_answers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("diffusionseg ") and len(out.split()[1]) >= 3


def test_bpr_train_old_run_folder_spelling_still_means_the_run_folder(capsys):
    from DiffusionSegLib.commands.bpr_train import resolve_run_dir

    for tokens, run_dir, output in ((["-o", "runs/b"], "runs/b", None),
                                    (["-o", "runs/b", "--export", "w.safetensors"], "runs/b", "w.safetensors"),
                                    (["--run-dir", "runs/b", "-o", "w.safetensors"], "runs/b", "w.safetensors")):  # fmt: skip
        args = _subparser("bpr-train").parse_args(["ct.nii.gz", *tokens])
        resolve_run_dir(args)
        assert (args.run_dir, args.output) == (run_dir, output), tokens
    assert "--run-dir" in capsys.readouterr().err
