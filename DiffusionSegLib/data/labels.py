"""Organ label catalogue: standard names, display colours and Slicer terminology codes.

Label maps come with very different spellings ("rightkidney", "kidney_right", "right kidney"). Every
label id is mapped to one standard organ name (BTCV naming where it exists) so that probes, reports and
Slicer segments agree. Colours follow Slicer's GenericAnatomyColors where an organ is listed there; codes
are SNOMED CT (scheme "SCT") as used by Slicer's "3D Slicer General Anatomy list" terminology.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from DiffusionSegLib.errors import UserInputError

__all__ = [
    "OrganLabel",
    "ORGAN_CATALOGUE",
    "BTCV_LABELS",
    "canonical_organ_name",
    "organ_label",
    "labels_from_names",
    "read_legend",
    "labels_to_json",
    "labels_from_json",
]

_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
_CATEGORY = "SCT^123037004^Anatomical Structure"
_MODIFIERS = {"right": "SCT^24028007^Right", "left": "SCT^7771000^Left"}


@dataclass(frozen=True)
class OrganLabel:
    """One class of a label map.

    Attributes:
        value: the integer id of the class in the label map (0 is background and never listed).
        name: standard organ name, e.g. ``"liver"`` or ``"right kidney"``.
        color: display colour as RGB floats in [0, 1].
        terminology: Slicer terminology entry string, or ``None`` where no standard code is known.
    """

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: str | None = None


@dataclass(frozen=True)
class _OrganEntry:
    code: str | None  # SNOMED CT "SCT^value^meaning" of the organ type
    modifier: str | None  # "right" / "left" or None
    rgb255: tuple[int, int, int]
    aliases: tuple[str, ...] = ()


# Standard names (BTCV naming first) with aliases seen in BTCV, 3D-IRCADb and TotalSegmentator legends.
ORGAN_CATALOGUE: dict[str, _OrganEntry] = {
    "spleen": _OrganEntry("SCT^78961009^Spleen", None, (157, 108, 162)),
    "right kidney": _OrganEntry("SCT^64033007^Kidney", "right", (185, 102, 83), ("kidney_right", "rightkidney")),
    "left kidney": _OrganEntry("SCT^64033007^Kidney", "left", (185, 142, 83), ("kidney_left", "leftkidney")),
    "gallbladder": _OrganEntry("SCT^28231008^Gallbladder", None, (139, 150, 98), ("gall_bladder",)),
    "esophagus": _OrganEntry("SCT^32849002^Esophagus", None, (211, 171, 143), ("oesophagus",)),
    "liver": _OrganEntry("SCT^10200004^Liver", None, (221, 130, 101)),
    "stomach": _OrganEntry("SCT^69695003^Stomach", None, (216, 132, 105)),
    "aorta": _OrganEntry("SCT^15825003^Aorta", None, (224, 97, 76)),
    "inferior vena cava": _OrganEntry(
        "SCT^64131007^Inferior vena cava", None, (0, 151, 206), ("ivc",)
    ),
    "portal vein and splenic vein": _OrganEntry(
        "SCT^32764006^Portal vein", None, (0, 112, 165), ("portal_vein_and_splenic_vein",)
    ),
    "portal vein": _OrganEntry("SCT^32764006^Portal vein", None, (0, 112, 165), ("portalvein",)),
    "pancreas": _OrganEntry("SCT^15776009^Pancreas", None, (249, 180, 111)),
    "right adrenal gland": _OrganEntry(
        "SCT^23451007^Adrenal gland", "right", (244, 214, 49), ("adrenal_gland_right", "rightsurrenalgland")
    ),
    "left adrenal gland": _OrganEntry(
        "SCT^23451007^Adrenal gland", "left", (230, 190, 40), ("adrenal_gland_left", "leftsurrenalgland")
    ),
    "right lung": _OrganEntry("SCT^39607008^Lung", "right", (197, 165, 145), ("lung_right", "rightlung")),
    "left lung": _OrganEntry("SCT^39607008^Lung", "left", (177, 145, 165), ("lung_left", "leftlung")),
    "bone": _OrganEntry("SCT^272673000^Bone", None, (241, 214, 145)),
    "heart": _OrganEntry("SCT^80891009^Heart", None, (206, 110, 84)),
    "urinary bladder": _OrganEntry("SCT^89837001^Urinary bladder", None, (222, 154, 132), ("urinary_bladder",)),
    "duodenum": _OrganEntry("SCT^38848004^Duodenum", None, (255, 253, 229)),
    "small bowel": _OrganEntry("SCT^30315005^Small intestine", None, (205, 167, 142), ("small_bowel",)),
    "colon": _OrganEntry("SCT^71854001^Colon", None, (204, 168, 143)),
    "liver tumor": _OrganEntry("SCT^108369006^Neoplasm", None, (144, 238, 144), ("liver tumors/cysts",)),
}

BTCV_NAMES = (
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
)  # fmt: skip


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_ALIASES: dict[str, str] = {}
for _name, _entry in ORGAN_CATALOGUE.items():
    _ALIASES[_normalise(_name)] = _name
    for _alias in _entry.aliases:
        _ALIASES[_normalise(_alias)] = _name


def canonical_organ_name(name: str) -> str:
    """Return the standard name of an organ given any known spelling; unknown names are normalised only.

    Example::

        >>> canonical_organ_name("kidney_right"), canonical_organ_name("rightkidney")
        ('right kidney', 'right kidney')
    """
    key = _normalise(name)
    return _ALIASES.get(key, key)


def _terminology(entry: _OrganEntry) -> str:
    modifier = _MODIFIERS[entry.modifier] if entry.modifier else "^^"
    return f"{_TERMINOLOGY_CONTEXT}~{_CATEGORY}~{entry.code}~{modifier}~{_ANATOMIC_CONTEXT}~^^~^^"


def _fallback_color(name: str) -> tuple[float, float, float]:
    """A stable, saturated colour for an organ outside the catalogue (same name, same colour)."""
    import colorsys
    import zlib

    hue = (zlib.crc32(name.encode()) % 360) / 360.0
    return colorsys.hsv_to_rgb(hue, 0.6, 0.9)


def organ_label(value: int, name: str) -> OrganLabel:
    """Build the :class:`OrganLabel` for a label id and any spelling of its organ name."""
    if int(value) <= 0:
        raise UserInputError(f"label id {value} for '{name}' is not positive; 0 is reserved for background")
    standard = canonical_organ_name(name)
    entry = ORGAN_CATALOGUE.get(standard)
    if entry is None:
        return OrganLabel(int(value), standard, _fallback_color(standard), None)
    color = tuple(c / 255.0 for c in entry.rgb255)
    return OrganLabel(int(value), standard, color, _terminology(entry) if entry.code else None)  # type: ignore[arg-type]


def labels_from_names(names_by_id: dict[int, str]) -> list[OrganLabel]:
    """Turn ``{label id: organ name}`` into sorted :class:`OrganLabel` entries, skipping background."""
    labels = [
        organ_label(int(v), n) for v, n in names_by_id.items() if int(v) != 0 and _normalise(n) != "background"
    ]
    labels.sort(key=lambda label: label.value)
    names = [label.name for label in labels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserInputError(f"several label ids map to the same organ {duplicates}; each organ needs one id")
    return labels


BTCV_LABELS: list[OrganLabel] = labels_from_names({i + 1: n for i, n in enumerate(BTCV_NAMES)})


def read_legend(path: str | Path, section: str | None = None) -> list[OrganLabel]:
    """Read a label legend JSON in any of the layouts found in the shared data.

    Accepted layouts: ``{"labels": {id: name}}`` (BTCV), ``{"organs": {...}, "vessels_bone": {...}}``
    (3D-IRCADb; pick one with ``section``, default ``"organs"``), a flat ``{id: name}`` map
    (TotalSegmentator class map), and MSD ``dataset.json`` (``{"labels": {id: name}}`` or
    ``{"labels": {name: id}}``).

    Raises:
        UserInputError: the file is missing, not JSON, or has no id → name map.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"legend file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UserInputError(f"legend file {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"legend file {path} holds {type(data).__name__}; expected an object of id → name")
    if section is not None:
        mapping = data.get(section)
    elif isinstance(data.get("labels"), dict):
        mapping = data["labels"]
    elif isinstance(data.get("organs"), dict):
        mapping = data["organs"]
    else:
        mapping = data
    if not isinstance(mapping, dict) or not mapping:
        raise UserInputError(f"legend file {path} has no id → name map (section {section!r})")
    pairs: dict[int, str] = {}
    for key, value in mapping.items():
        if str(key).lstrip("-").isdigit() and isinstance(value, str):
            pairs[int(key)] = value
        elif isinstance(value, int | float) and float(value).is_integer():  # MSD {name: id}
            pairs[int(value)] = str(key)
        else:
            raise UserInputError(f"legend file {path}: entry {key!r}: {value!r} is not an id → name pair")
    return labels_from_names(pairs)


def labels_to_json(labels: list[OrganLabel]) -> list[dict]:
    """Serialise labels (for checkpoints and sidecar files)."""
    return [asdict(label) for label in labels]


def labels_from_json(items: list[dict]) -> list[OrganLabel]:
    """Inverse of :func:`labels_to_json`."""
    return [
        OrganLabel(int(i["value"]), str(i["name"]), tuple(float(c) for c in i["color"]), i.get("terminology"))  # type: ignore[arg-type]
        for i in items
    ]
