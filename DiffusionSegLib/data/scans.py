"""The scans of a batch: files, folders of scans, DICOM series folders and glob patterns, and where each one's
segmentation goes. No torch here: a batch whose arguments are wrong is refused at once, before any model loads.

* a file is one scan (NIfTI, NRRD, MHA/MHD; a ``.seg.nrrd`` is a segmentation, never a scan);
* a folder holding DICOM files (the ``DICM`` marker) is one scan, its series, as for a single ``segment``;
* any other folder stands for the scans in it: its NIfTI / NRRD / MHA files and the DICOM series folders below
  it (sorted by name);
* a pattern (``*``, ``?``, ``[``) that is not an existing path stands for what it matches, files and folders as
  above (``**`` matches across folders).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from DiffusionSegLib.data.volume import READ_SUFFIXES, WRITE_SUFFIXES
from DiffusionSegLib.errors import UserInputError

__all__ = ["SCAN_SUFFIXES", "OUTPUT_FORMATS", "FoundScans", "check_output_folder", "find_scans", "is_dicom_folder",
           "plan_outputs", "scan_stem"]  # fmt: skip

SCAN_SUFFIXES = tuple(s for s in READ_SUFFIXES if s != ".seg.nrrd")
"""The file names a folder's scans end in (a ``.seg.nrrd`` in the folder is a segmentation, not a scan)."""

OUTPUT_FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha"}
"""``--format`` name -> the suffix of each output (``seg.nrrd``: a Slicer segmentation; the others: label maps)."""


@dataclass
class FoundScans:
    """The scans the inputs stand for.

    Attributes:
        scans: each scan once, in the order given (a folder's and a pattern's scans sorted by name).
        stems: per scan, the name its output takes (a file's name without its suffix, a DICOM folder's name;
            under a given folder, the path below it joined by ``_``).
        many: a folder of scans or a pattern was given, or more than one scan: the output is a folder.
    """

    scans: list[Path]
    stems: list[str]
    many: bool


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_scan_file(path: Path) -> bool:
    name = path.name.lower()
    return (path.is_file() and not name.startswith(".") and name.endswith(SCAN_SUFFIXES)
            and not name.endswith(".seg.nrrd"))  # fmt: skip


def is_dicom_folder(folder: str | os.PathLike) -> bool:
    """Whether a folder holds a DICOM file directly (``DICM`` after the 128-byte preamble): it is one series."""
    folder = Path(folder)
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_file() and not entry.name.startswith("."):
            try:
                with open(entry, "rb") as handle:
                    if handle.read(132)[128:] == b"DICM":
                        return True
            except OSError:
                continue
    return False


def scan_stem(path: str | os.PathLike) -> str:
    """A scan's name without its suffix (``ct.nii.gz`` -> ``ct``; a DICOM folder keeps its name)."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        return name
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _folder_scans(folder: Path) -> list[tuple[Path, str]]:
    """The scans a folder of scans stands for, with their stems: its scan files, then the DICOM series folders
    anywhere below it (named by their path below ``folder``)."""
    files = [(p, scan_stem(p)) for p in sorted(folder.iterdir()) if _is_scan_file(p)]
    series = []
    for root, dirs, _ in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:
            sub = Path(root) / name
            if is_dicom_folder(sub):
                series.append((sub, "_".join(sub.relative_to(folder).parts)))
    return files + series


def _expand(path: Path) -> tuple[list[tuple[Path, str]], bool]:
    """One existing input: ``([(scan, stem)], stands for a folder of scans)``."""
    if path.is_dir() and not is_dicom_folder(path):
        found = _folder_scans(path)
        if found:
            return found, True
    return [(path, scan_stem(path))], False


def find_scans(inputs: Sequence[str | os.PathLike]) -> FoundScans:
    """The scans of ``segment``'s inputs (see the module docstring).

    A single path that does not exist, or a single folder with no scans in it, is kept as given, so that reading
    it says what is wrong exactly as for one scan.

    Raises:
        UserInputError: no inputs, a pattern that matches no scan, a folder of several inputs with no scans in
            it, or one of several inputs that does not exist.
    """
    if not inputs:
        raise UserInputError("no input given; expected CT files, folders of CTs or patterns")
    found: list[tuple[Path, str]] = []
    many = len(inputs) > 1
    for item in inputs:
        text = str(item)
        path = Path(text)
        if not path.exists() and _has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            scans = [entry for m in matches if _is_scan_file(m) or m.is_dir() for entry in _expand(m)[0]]
            if not scans:
                raise UserInputError(f"no scan matches '{text}'; expected NIfTI, NRRD or MHA files or DICOM folders "
                                     f"({', '.join(SCAN_SUFFIXES)})")  # fmt: skip
            found += scans
            many = True
            continue
        if len(inputs) > 1 and not path.exists():
            raise UserInputError(f"input not found: {path}")
        scans, folder = _expand(path)
        if folder:
            many = True
        elif len(inputs) > 1 and path.is_dir() and not is_dicom_folder(path):
            raise UserInputError(f"no scans found in folder {path}; expected NIfTI, NRRD or MHA files or DICOM "
                                 "series folders in it")  # fmt: skip
        found += scans
    unique: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for scan, stem in found:
        key = os.path.normcase(os.path.realpath(scan))
        if key not in seen:
            seen.add(key)
            unique.append((scan, stem))
    return FoundScans([s for s, _ in unique], [t for _, t in unique], many or len(unique) > 1)


def plan_outputs(found: FoundScans, output_dir: str | os.PathLike, output_format: str = "seg.nrrd") -> list[Path]:
    """Each scan's output in ``output_dir``: its stem + the format's suffix.

    Raises:
        UserInputError: an unknown format, or two scans whose outputs would share a name.
    """
    if output_format not in OUTPUT_FORMATS:
        raise UserInputError(f"output format {output_format!r} is unknown; expected one of "
                             f"{', '.join(OUTPUT_FORMATS)}")  # fmt: skip
    outputs = [Path(output_dir) / f"{stem}{OUTPUT_FORMATS[output_format]}" for stem in found.stems]
    first: dict[str, Path] = {}
    for scan, output in zip(found.scans, outputs, strict=True):
        key = os.path.normcase(output.name)
        if key in first:
            raise UserInputError(f"'{first[key]}' and '{scan}' would both be written to '{output}'; rename one, or "
                                 "segment them in separate runs")  # fmt: skip
        first[key] = scan
    return outputs


def check_output_folder(path: str | os.PathLike, count: int) -> Path:
    """Refuse an output folder that is an existing file or names one (a known output suffix) for ``count``
    scans; create it (and its parents) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output '{path}' is a file; with {count} scans -o names a folder (created if needed) "
                             "that receives one segmentation per scan")  # fmt: skip
    if not path.exists() and path.name.lower().endswith(WRITE_SUFFIXES):
        raise UserInputError(f"output '{path}' names a file; with {count} scans -o names a folder (created if "
                             "needed) that receives one segmentation per scan")  # fmt: skip
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserInputError(f"cannot create output folder '{path}': {error.strerror or error}") from None
    return path

