"""Finding labeled cases (CT + label map + legend) and unlabeled CT in folders.

Two layouts are recognised:

* **Paired files**: ``<case>_ct[_suffix].<ext>`` next to ``<case>_<kind>.<ext>`` where ``kind`` is ``labels``,
  ``label``, ``organs``, ``seg`` or starts with ``seg`` (``seg117_pseudo``); the legend is
  ``<case>_legend.json`` or the folder's one ``*legend*.json`` / ``*classmap*.json``. This covers
  ``btcv_0001_ct`` + ``btcv_0001_labels`` + ``btcv_legend.json`` and ``ircadb1.01_ct`` + ``ircadb1.01_organs`` +
  ``ircadb1.01_legend.json``.
* **MSD**: a ``dataset.json`` with ``"training": [{"image": ..., "label": ...}]`` and ``"labels"``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from DiffusionSegLib.data.labels import OrganLabel, read_legend
from DiffusionSegLib.errors import UserInputError

__all__ = ["LabeledCase", "find_labeled_cases", "find_images", "find_unlabeled_scans", "volume_stem", "LABEL_KINDS"]

LABEL_KINDS = ("labels", "label", "organs", "seg")
_VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class LabeledCase:
    """One CT with its label map and the names of its labels."""

    case_id: str
    image: Path
    label: Path
    labels: tuple[OrganLabel, ...]


def volume_stem(path: Path) -> str | None:
    """File name without a volume extension, or ``None`` when it is not a volume file."""
    name = path.name
    for extension in _VOLUME_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return None


def find_images(folder: str | Path, pattern: str = "*") -> list[Path]:
    """All volume files (and DICOM series folders) in ``folder`` matching a glob ``pattern``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"folder not found: {folder}")
    found = []
    for path in sorted(folder.glob(pattern)):
        if path.is_file() and volume_stem(path) is not None and not path.name.startswith("."):
            found.append(path)
        elif path.is_dir() and any(p.is_file() and p.name.startswith(("CT", "IM")) or p.suffix.lower() == ".dcm"
                                   for p in path.iterdir()):  # fmt: skip
            found.append(path)
    return found


def _is_label_file(path: Path) -> bool:
    """A volume named like a label map (``<case>_labels``, ``_organs``, ``_seg...``) rather than a CT."""
    stem = volume_stem(path) or ""
    kind = stem.rsplit("_", 1)[-1] if "_" in stem else ""
    return _label_kind_rank(kind) is not None


def find_unlabeled_scans(specs, exclude=()) -> list[Path]:
    """The CT scans named by ``specs``, each a folder (its volume files and DICOM series), a glob pattern or a
    file; label maps (named ``<case>_labels``, ``_organs``, ``_seg...``) and the paths in ``exclude`` (the labeled
    CTs) are left out; sorted, without repeats.

    Raises:
        UserInputError: a spec names nothing.
    """
    import glob as globbing

    excluded = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = find_images(path)
        elif any(ch in str(spec) for ch in "*?["):
            matches = [Path(p) for p in sorted(globbing.glob(str(spec)))
                       if Path(p).is_dir() or volume_stem(Path(p)) is not None]  # fmt: skip
        elif path.exists():
            matches = [path]
        else:
            raise UserInputError(f"unlabeled scans not found: {spec} (expected a folder, a file or a glob pattern)")
        matches = [m for m in matches if not _is_label_file(m)]
        if not matches:
            raise UserInputError(f"no CT scans found in {spec} (label maps are left out)")
        found += [m for m in matches if m.resolve() not in excluded and m not in found]
    return found


def _label_kind_rank(kind: str) -> int | None:
    for rank, known in enumerate(LABEL_KINDS):
        if kind == known or (known == "seg" and kind.startswith("seg")):
            return rank
    return None


def _folder_legend(folder: Path) -> Path | None:
    """The folder's one legend shared by all cases (not a per-case ``<case>_legend.json``), if any."""
    shared = [
        p for p in sorted(folder.glob("*.json"))
        if re.search(r"legend|classmap", p.name, re.I)
        and not (p.name.endswith("_legend.json") and list(folder.glob(p.name[: -len("_legend.json")] + "_ct*")))
    ]  # fmt: skip
    return shared[0] if len(shared) == 1 else None


def find_labeled_cases(folder: str | Path, label_kind: str | None = None) -> list[LabeledCase]:
    """Discover labeled cases in a folder (paired files or an MSD ``dataset.json``).

    Args:
        folder: the dataset folder.
        label_kind: use label files of this kind only (e.g. ``"organs"`` or ``"vessels_bone"``); default: the
            first of :data:`LABEL_KINDS` present for each case.

    Returns:
        Cases sorted by id; each case's labels are those named by its legend.

    Raises:
        UserInputError: the folder is missing, or a case has a label map but no legend.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"dataset folder not found: {folder}")
    if (folder / "dataset.json").is_file():
        return _find_msd_cases(folder)
    stems = {volume_stem(p): p for p in folder.iterdir() if p.is_file() and volume_stem(p)}
    shared_legend = _folder_legend(folder)
    cases = []
    for stem, image in sorted(stems.items()):
        match = re.fullmatch(r"(?P<case>.+?)_ct(?P<suffix>(_[^_]+)*)", stem)
        if not match:
            continue
        label = _match_label(match["case"], match["suffix"], stems, label_kind)
        if label is None:
            continue
        case_id, label_path = label
        legend = folder / f"{case_id}_legend.json"
        if legend.is_file():
            kind = label_path.name[len(case_id) + 1 :].split(".")[0]
            labels = read_legend(legend, kind if _has_section(legend, kind) else None)
        elif shared_legend is not None:
            labels = read_legend(shared_legend)
        else:
            raise UserInputError(f"case {case_id} in {folder} has a label map but no legend "
                                 f"({case_id}_legend.json or one *legend*.json for the folder)")  # fmt: skip
        cases.append(LabeledCase(case_id, image, label_path, tuple(labels)))
    return cases


def _has_section(legend: Path, section: str) -> bool:
    try:
        return isinstance(json.loads(legend.read_text()).get(section), dict)
    except (json.JSONDecodeError, AttributeError):
        return False


def _match_label(case: str, suffix: str, stems: dict, label_kind: str | None) -> tuple[str, Path] | None:
    """Find ``<case[+suffix tokens]>_<kind>`` for a CT named ``<case>_ct<suffix>``; longest case name first."""
    tokens = [t for t in suffix.split("_") if t]
    for keep in range(len(tokens), -1, -1):
        candidate = "_".join([case, *tokens[:keep]])
        best: tuple[int, str, Path] | None = None
        for stem, path in stems.items():
            if not stem.startswith(candidate + "_"):
                continue
            kind = stem[len(candidate) + 1 :]
            if label_kind is not None:
                rank = 0 if kind == label_kind else None
            else:
                rank = _label_kind_rank(kind)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, stem, path)
        if best is not None:
            return candidate, best[2]
    return None


def _find_msd_cases(folder: Path) -> list[LabeledCase]:
    spec_path = folder / "dataset.json"
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"{spec_path} is not valid JSON ({error})") from None
    if not isinstance(spec.get("training"), list):
        raise UserInputError(f"{spec_path} has no 'training' list of {{'image', 'label'}} entries")
    labels = tuple(read_legend(spec_path, "labels"))
    cases = []
    for entry in spec["training"]:
        image = (folder / entry["image"]).resolve()
        label = (folder / entry["label"]).resolve()
        if not image.exists() or not label.exists():
            raise UserInputError(f"{spec_path}: missing file for entry {entry}")
        stem = volume_stem(image) or image.name
        cases.append(LabeledCase(stem, image, label, labels))
    return sorted(cases, key=lambda c: c.case_id)
