"""The input gate: every command and Slicer job reads its CTs, label maps and output paths through these
functions before any work, so a bad input is refused in one line (what was wrong, what was expected) and
nothing is written.

* :func:`read_ct`: readable, 3D, scalar, positive spacing, finite (NIfTI NaNs included, which ITK hides),
  not constant, CT-like intensities with spatial structure (see :func:`~DiffusionSegLib.data.volume.check_ct`);
* :func:`read_label_map`: on its CT's grid, integer ids, only ids its legend names;
* :func:`check_output_path`: a known suffix in a folder that exists and can be written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.data.volume import WRITE_SUFFIXES, check_ct, check_label_map, read_volume
from DiffusionSegLib.errors import UserInputError

__all__ = ["read_ct", "read_label_map", "check_label_ids", "check_output_path"]


def read_ct(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read a CT and refuse it unless the pipeline can use it (see the module docstring)."""
    image = read_volume(path)
    check_ct(image, name or f"'{Path(path).name}'")
    return image


def check_label_ids(labels: sitk.Image, legend: Sequence[OrganLabel], name: str = "label map") -> None:
    """Refuse label ids that the legend does not name (0 is background)."""
    ids = np.unique(sitk.GetArrayViewFromImage(labels))
    known = {0} | {int(organ.value) for organ in legend}
    foreign = [int(i) if float(i).is_integer() else float(i) for i in ids if i not in known]
    if foreign:
        shown = ", ".join(str(i) for i in foreign[:8]) + (", ..." if len(foreign) > 8 else "")
        raise UserInputError(f"{name} holds ids {shown} that its legend does not name; expected 0 (background) "
                             f"and the legend's ids {sorted(known - {0})}")  # fmt: skip


def read_label_map(path: str | os.PathLike, ct: sitk.Image, legend: Sequence[OrganLabel] | None = None,
                   name: str | None = None) -> sitk.Image:  # fmt: skip
    """Read a label map and refuse it unless it is an integer map on ``ct``'s grid with the legend's ids."""
    name = name or f"label map '{Path(path).name}'"
    labels = read_volume(path)
    check_label_map(labels, ct, name)
    if legend is not None:
        check_label_ids(labels, legend, name)
    return labels


def check_output_path(path: str | os.PathLike, suffixes: Sequence[str] = WRITE_SUFFIXES,
                      what: str = "output") -> Path:  # fmt: skip
    """Refuse an output path before any work: unknown suffix, missing or unwritable folder, or a folder."""
    path = Path(path)
    if not path.name.lower().endswith(tuple(suffixes)):
        raise UserInputError(f"cannot write {what} '{path}': expected a name ending in {', '.join(suffixes)}")
    if path.is_dir():
        raise UserInputError(f"cannot write {what} '{path}': it is a folder; expected a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserInputError(f"cannot write {what} '{path}': folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserInputError(f"cannot write {what} '{path}': permission denied")
    return path
