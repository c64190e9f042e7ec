"""The README is a working product page: every ``diffusionseg`` command line in it parses with the real
command-line parser (no abbreviated options), the files it names exist in the repository or are written by an
earlier command of the README, its relative links and #anchors resolve, and it stays at most 200 lines.

Names whose first part is in capitals (``CT.nii.gz``, ``SCANS/``, ``MODEL.safetensors``) stand for the reader's own
files, as the README says, and are not looked up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from DiffusionSegLib.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200

# what the command line is called in the README, longest first; what follows is the argument list
COMMAND_PREFIXES = (".venv/bin/python -m DiffusionSegLib", "python -m DiffusionSegLib", ".venv/bin/diffusionseg",
                    "diffusionseg")  # fmt: skip
# options whose value is a file or folder the command writes (a later line may read it)
OUTPUT_OPTIONS = frozenset({"-o", "--output", "--output-dir", "--run-dir", "--uncertainty"})
PATH_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".json", ".safetensors", ".pt",
                 ".toml", ".png", ".md", ".py", ".sh", ".txt")  # fmt: skip
# top-level folders of the repository: an inline code span starting with one of them names a repository file
REPO_FOLDERS = tuple(f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------------
# Markdown reading


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of a fenced or indented code block, continuation lines (``\\``) joined."""
    lines = text.splitlines()
    found: list[tuple[int, str]] = []
    fenced = False
    previous_blank = True
    in_indented = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and (previous_blank or in_indented) and not fenced
        in_indented = indented or (in_indented and not line.strip())
        previous_blank = not line.strip()
        if not (fenced or indented):
            continue
        content = line.strip()
        if pending is not None:
            number, content = pending[0], pending[1] + " " + content
            pending = None
        if content.endswith("\\"):
            pending = (number, content[:-1].rstrip())
            continue
        if content:
            found.append((number, content))
    return found


def inline_code(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span outside code blocks."""
    spans = []
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            continue
        spans += [(number, m.group(1)) for m in re.finditer(r"`([^`]+)`", line)]
    return spans


def command_lines(text: str) -> list[tuple[int, list[str]]]:
    """(line number, arguments) of every ``diffusionseg …`` command in code blocks and inline code spans."""
    commands = []
    for number, content in [*code_lines(text), *inline_code(text)]:
        content = content.removeprefix("$ ")
        for prefix in COMMAND_PREFIXES:
            if content.startswith(prefix + " "):  # the bare name (`diffusionseg`) is not a command line
                if content[len(prefix) :].split()[0].endswith(":"):  # a message it prints, e.g. "... segment: error"
                    break
                commands.append((number, shlex.split(content[len(prefix) :], comments=True)))
                break
    return sorted(commands)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip())
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


# ---------------------------------------------------------------------------------------------------------------
# Checks (each returns its problems as lines, empty when all is well)


def _is_placeholder(token: str) -> bool:
    first = token.split("/")[0].split(".")[0]
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", first))


def _looks_like_path(token: str) -> bool:
    return ("/" in token or token.lower().endswith(PATH_SUFFIXES)) and not re.fullmatch(r"[\d.eE+-]+", token)


def _sub_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def parse_command(args: list[str]) -> tuple[argparse.ArgumentParser | None, argparse.Namespace | None, str]:
    """Parse a command's arguments as ``diffusionseg`` does, with abbreviated options refused.

    Returns (the subcommand's parser, the parsed arguments, an error message); the parser and arguments are None
    for ``--help`` / ``--version``, the message is empty when the line parses."""
    command = next((t for t in args if not t.startswith("-")), "")
    parser = build_parser(only=command)  # as cli.main builds it: that subcommand's arguments only
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.allow_abbrev = False
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            namespace, extra = parser.parse_known_args(args)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help, --version
            return None, None, ""
        return None, None, stderr.getvalue().strip().splitlines()[-1]
    if extra and not getattr(namespace, "_accepts_overrides", False):
        return None, None, f"unrecognized arguments: {' '.join(extra)}"
    return _sub_parser(parser, namespace.command), namespace, ""


def check_commands(text: str, root: Path = ROOT) -> list[str]:
    """Every command line parses, and every file it reads exists or is written by an earlier command line."""
    problems: list[str] = []
    written: set[str] = set()

    def exists(path: str) -> bool:
        norm = path.rstrip("/")
        if _is_placeholder(norm) or (root / norm).exists() or any(ch in norm for ch in "*?["):
            return True
        return norm in written or any(norm.startswith(w + "/") for w in written)

    for number, args in command_lines(text):
        line = f"line {number}: diffusionseg {shlex.join(args)}"
        sub, namespace, error = parse_command(args)
        if error:
            problems.append(f"{line}: {error}")
            continue
        if sub is None:
            continue
        outputs: list[str] = []
        for action in sub._actions:
            value = getattr(namespace, action.dest, None) if action.dest != argparse.SUPPRESS else None
            values = value if isinstance(value, list | tuple) else [value]
            flat = [str(v) for item in values for v in (item if isinstance(item, list | tuple) else [item])]
            given = [v for v in flat if v in args and _looks_like_path(v)]
            if OUTPUT_OPTIONS & set(action.option_strings):
                outputs += given
                continue
            problems += [f"{line}: '{v}' is neither in the repository nor written by an earlier line"
                         for v in given if not exists(v)]  # fmt: skip
        written.update(o.rstrip("/") for o in outputs)
    return problems


def check_links(text: str, base: Path, root: Path = ROOT) -> list[str]:
    """Relative links (and images) point at files that exist; #anchors at headings of their file."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (base / path).resolve() if path else None
            if file is not None and not file.exists():
                problems.append(f"line {number}: link target {path} does not exist")
                continue
            if anchor:
                heading_text = file.read_text() if file is not None else text
                if file is not None and file.suffix != ".md":
                    problems.append(f"line {number}: anchor #{anchor} in {path}, which is not markdown")
                elif anchor not in heading_anchors(heading_text):
                    problems.append(f"line {number}: no heading for #{anchor} in {path or 'this file'}")
    return problems


def check_inline_paths(text: str, root: Path = ROOT) -> list[str]:
    """Inline code naming a repository path (``Resources/…``, ``docs/…``) names one that exists."""
    problems = []
    for number, span in inline_code(text):
        path = span.split()[0] if span.split() else ""
        if path.startswith(REPO_FOLDERS) and not any(ch in path for ch in "*?[…<") and not (root / path).exists():
            problems.append(f"line {number}: `{span}` names a path that does not exist")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# The README

README_TEXT = README.read_text()


def test_readme_is_at_most_200_lines():
    assert len(README_TEXT.splitlines()) <= MAX_README_LINES


def test_readme_keeps_the_two_fresh_clone_commands():
    code = {content for _, content in code_lines(README_TEXT)}
    assert {"bash scripts/run_demo.sh", "bash scripts/run_tests.sh"} <= code
    for content in code:
        if content.startswith("bash "):
            assert (ROOT / content.split()[1]).is_file(), content


def test_readme_has_command_lines():
    assert len(README_COMMANDS) >= 5


README_COMMANDS = command_lines(README_TEXT)


@pytest.mark.parametrize("number,args", README_COMMANDS, ids=[f"line{n}" for n, _ in README_COMMANDS])
def test_readme_command_line_parses(number, args):
    _, _, error = parse_command(args)
    assert not error, f"README line {number}: diffusionseg {shlex.join(args)}: {error}"


def test_readme_command_lines_name_real_files():
    assert check_commands(README_TEXT) == []


def test_readme_links_and_anchors_resolve():
    assert check_links(README_TEXT, README.parent) == []


def test_readme_inline_paths_exist():
    assert check_inline_paths(README_TEXT) == []


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_links_resolve(doc):
    assert check_links(doc.read_text(), doc.parent) == []


def _doc_commands() -> list[tuple[str, int, list[str]]]:
    found = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        in_blocks = {number for number, _ in code_lines(text)}
        found += [(doc.name, number, args) for number, args in command_lines(text) if number in in_blocks]
    return found


DOC_COMMANDS = _doc_commands()


@pytest.mark.parametrize("doc,number,args", DOC_COMMANDS, ids=[f"{d}:{n}" for d, n, _ in DOC_COMMANDS])
def test_docs_command_lines_parse(doc, number, args):
    """The docs' code blocks (not their prose) hold whole command lines: each parses."""
    _, _, error = parse_command(args)
    assert not error, f"docs/{doc} line {number}: diffusionseg {shlex.join(args)}: {error}"


def test_example_legend_is_the_btcv_legend():
    from DiffusionSegLib.data.labels import BTCV_LABELS, read_legend

    assert read_legend(ROOT / "examples" / "legend.json") == BTCV_LABELS


# ---------------------------------------------------------------------------------------------------------------
# The checker itself

SAMPLE_CT = "Resources/SampleData/totalseg_example_ct.nii.gz"


def test_checker_accepts_a_good_line_and_follows_outputs():
    text = (f"    diffusionseg segment {SAMPLE_CT} -o sample.nii.gz\n\n"
            "Then `diffusionseg info sample.nii.gz`.\n")  # fmt: skip
    assert [args[0] for _, args in command_lines(text)] == ["segment", "info"]
    assert check_commands(text) == []


@pytest.mark.parametrize(
    "line,expected",
    [
        (f"diffusionseg segment {SAMPLE_CT} -o out.nii.gz --no-such-option", "unrecognized arguments"),
        # an abbreviation (of --probe), which argparse would accept by default
        (f"diffusionseg segment {SAMPLE_CT} --prob Resources/Models/probe_btcv13_frozen.safetensors -o out.nii.gz",
         "unrecognized arguments: --prob"),
        (f"diffusionseg segment {SAMPLE_CT}", "required"),  # -o missing
        ("diffusionseg no-such-command x", "invalid choice"),
        ("diffusionseg segment missing_ct.nii.gz -o out.nii.gz", "'missing_ct.nii.gz' is neither"),
        (f"diffusionseg segment {SAMPLE_CT} --probe later.safetensors -o out.nii.gz", "'later.safetensors'"),
    ],
)
def test_checker_rejects_a_broken_line(line, expected):
    problems = check_commands(f"Text.\n\n    {line}\n")
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_rejects_broken_links_and_anchors():
    text = "# Title\n\n## Segment a folder\n\n[ok](#segment-a-folder) [bad](#no-such) [gone](docs/none.md)\n"
    problems = check_links(text, ROOT)
    assert len(problems) == 2 and "#no-such" in problems[0] and "docs/none.md" in problems[1], problems
    assert check_links("[x](README.md#segment-your-own-ct) [y](README.md#nope)\n", ROOT) == [
        "line 1: no heading for #nope in README.md"
    ]
