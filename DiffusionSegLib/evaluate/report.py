"""Result reports: a comparison table in markdown (for the README and benchmark logs) plus the full JSON.

A *row* is one method × probe (× regime) result, kept generic so that benchmarks, the CLI and the README all
share it::

    {"method": "diffusion+BPR", "probe": "linear", "regime": "2 labeled scans",
     "liver": 0.93, "spleen": 0.88, ...}                  # per-organ Dice, flat under standard organ names
    {"method": ..., "probe": ..., "dice": {"liver": {"mean": 0.93, "std": 0.02}, ...}}   # or nested, with std

Organ values may be a number, ``None``/NaN (not defined) or ``{"mean": m, "std": s}``. The Big / Medium / Small /
Mean columns are computed from the organ values with :func:`~DiffusionSegLib.evaluate.metrics.size_group_means`
unless the row gives them itself under ``"big"``, ``"medium"``, ``"small"``, ``"mean"`` (as
:func:`row_from_summary` does, with the std over cases). Any other key is kept in the JSON and not shown.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from DiffusionSegLib.data.labels import ORGAN_CATALOGUE, canonical_organ_name
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.evaluate.metrics import ORGAN_SIZE_GROUPS, SIZE_GROUPS, size_group_means

__all__ = ["comparison_table_markdown", "row_from_summary", "write_report", "to_json_safe"]

_META_KEYS = ("method", "probe", "regime")
_GROUP_COLUMNS = (*SIZE_GROUPS, "mean")
_SHORT_NAMES = {
    "right kidney": "R kidney",
    "left kidney": "L kidney",
    "inferior vena cava": "IVC",
    "portal vein and splenic vein": "PV/SV",
    "right adrenal gland": "R adrenal",
    "left adrenal gland": "L adrenal",
}

Score = tuple[float, float | None]  # (mean, std or None)


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`DiffusionSegLib.checkpoint.atomic_write`)."""
    from DiffusionSegLib.checkpoint import atomic_write

    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))


def to_json_safe(value: Any) -> Any:
    """Turn a results structure into strict JSON types: NaN/inf → ``None``, numpy → Python, paths → strings."""
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_json_safe(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _score(value: Any, where: str) -> Score:
    if value is None:
        return (math.nan, None)
    if isinstance(value, Mapping):
        if "mean" not in value:
            raise UserInputError(f"{where}: expected a number or {{'mean', 'std'}}; got {value!r}")
        std = value.get("std")
        mean = math.nan if value["mean"] is None else float(value["mean"])
        return (mean, None if std is None else float(std))
    try:
        return (float(value), None)
    except (TypeError, ValueError):
        raise UserInputError(f"{where}: expected a number or {{'mean', 'std'}}; got {value!r}") from None


def _row_organs(row: Mapping[str, Any], index: int) -> dict[str, Score]:
    organs: dict[str, Score] = {}
    nested = row.get("dice")
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise UserInputError(f"row {index}: 'dice' must map organ names to values; got {nested!r}")
        for name, value in nested.items():
            organs[canonical_organ_name(name)] = _score(value, f"row {index}, organ {name!r}")
    for key, value in row.items():
        if key in _META_KEYS or key in _GROUP_COLUMNS or key == "dice":
            continue
        name = canonical_organ_name(key)
        if name in ORGAN_CATALOGUE or name in ORGAN_SIZE_GROUPS:
            organs[name] = _score(value, f"row {index}, organ {key!r}")
    return organs


def _row_groups(row: Mapping[str, Any], organs: Mapping[str, Score], groups: Mapping[str, str], index: int) -> dict:
    computed = size_group_means({n: s[0] for n, s in organs.items()}, groups)
    return {
        column: _score(row[column], f"row {index}, column {column!r}") if column in row else (computed[column], None)
        for column in _GROUP_COLUMNS
    }


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise UserInputError(f"rows must be a list of dicts; got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise UserInputError(f"row {index} must be a dict; got {row!r}")
        for key in ("method", "probe"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise UserInputError(f"row {index} needs a non-empty string {key!r}; got {row.get(key)!r}")


def _format(score: Score, percent: bool, digits: int) -> str:
    mean, std = score
    if math.isnan(mean):
        return "–"
    factor = 100.0 if percent else 1.0
    text = f"{mean * factor:.{digits}f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std * factor:.{digits}f}"
    return text


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def comparison_table_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    organs: bool | Sequence[str] = False,
    size_groups: bool = True,
    groups: Mapping[str, str] | None = None,
    percent: bool = False,
    digits: int | None = None,
) -> str:
    """A markdown table with one line per row (method × probe × regime) and Dice columns.

    Args:
        rows: result rows as described in the module docstring; shown in the given order.
        organs: per-organ columns: ``False`` (default) none, ``True`` every organ met in the rows (first-seen
            order), or an explicit list of organ names.
        size_groups: show the Big / Medium / Small / Mean columns (default ``True``).
        groups: organ → size group; default :data:`~DiffusionSegLib.evaluate.metrics.ORGAN_SIZE_GROUPS`.
        percent: show Dice × 100 (the paper's style) instead of a fraction in [0, 1].
        digits: decimals; default 1 with ``percent`` and 3 without.

    Returns:
        The table as markdown text ending in a newline; "–" marks an undefined value, "m ± s" a value with std.

    Raises:
        UserInputError: a row is not a dict with string ``method`` and ``probe``, or a value is not a number.

    Example::

        >>> print(comparison_table_markdown([{"method": "scratch", "probe": "-", "liver": 0.9, "aorta": 0.7}]))
        | Method | Probe | Big | Medium | Small | Mean |
        ...
    """
    _check_rows(rows)
    groups = ORGAN_SIZE_GROUPS if groups is None else groups
    digits = (1 if percent else 3) if digits is None else int(digits)
    organ_scores = [_row_organs(row, i) for i, row in enumerate(rows)]
    if organs is True:
        organ_columns = list(dict.fromkeys(name for scores in organ_scores for name in scores))
    elif organs is False:
        organ_columns = []
    else:
        organ_columns = [canonical_organ_name(name) for name in organs]
    show_regime = any(row.get("regime") for row in rows)

    header = ["Method", "Probe"] + (["Regime"] if show_regime else [])
    if size_groups:
        header += [g.capitalize() for g in _GROUP_COLUMNS]
    header += [_SHORT_NAMES.get(name, name) for name in organ_columns]
    n_text = 2 + show_regime
    alignment = ["---"] * n_text + ["---:"] * (len(header) - n_text)  # text left, numbers right
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignment) + "|"]
    for index, (row, scores) in enumerate(zip(rows, organ_scores)):
        cells = [_escape(row["method"]), _escape(row["probe"])]
        if show_regime:
            cells.append(_escape(row.get("regime") or ""))
        if size_groups:
            group_scores = _row_groups(row, scores, groups, index)
            cells += [_format(group_scores[g], percent, digits) for g in _GROUP_COLUMNS]
        cells += [_format(scores.get(name, (math.nan, None)), percent, digits) for name in organ_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def row_from_summary(method: str, probe: str, regime: str, summary: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Build a report row from a :func:`~DiffusionSegLib.evaluate.metrics.summarise` result (Dice, mean ± std).

    Args:
        method: pretraining / model name, e.g. ``"diffusion+BPR"``.
        probe: probe name, e.g. ``"linear"`` or ``"non-linear"``.
        regime: label regime, e.g. ``"2 labeled scans"`` (may be empty).
        summary: output of ``summarise``.
        **extra: more keys kept in the row (shown in the JSON only), e.g. ``n_labeled=2``.

    Returns:
        ``{"method", "probe", "regime", "dice": {organ: {"mean", "std"}}, "big", "medium", "small", "mean",
        "n_cases", **extra}``.
    """
    try:
        organs = {name: {k: v["dice"][k] for k in ("mean", "std")} for name, v in summary["organs"].items()}
        row: dict[str, Any] = {"method": method, "probe": probe, "regime": regime, "dice": organs}
        for group, stats in summary["groups"].items():
            row[group] = {k: stats["dice"][k] for k in ("mean", "std")}
        row["mean"] = {k: summary["overall"]["dice"][k] for k in ("mean", "std")}
        row["n_cases"] = summary["n_cases"]
    except (KeyError, TypeError) as error:
        raise UserInputError(f"summary is not a summarise() result (missing {error})") from None
    row.update(extra)
    return row


def write_report(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    name: str = "report",
    organs: bool | Sequence[str] = True,
    percent: bool = False,
) -> dict[str, Path]:
    """Write ``<name>.json`` (everything in ``results``) and ``<name>.md`` (the comparison tables), atomically.

    Args:
        results: ``{"rows": [row, ...], "title": str (optional), "notes": str (optional), ...}``; any other key
            (config, versions, per-case metrics, summaries) goes to the JSON only. NaN is written as ``null``.
        out_dir: folder to write into; created if missing.
        name: file stem (default ``"report"``).
        organs: add a per-organ table: ``True`` (default) all organs met, ``False`` none, or a list of names.
        percent: show Dice × 100 in the markdown.

    Returns:
        ``{"json": Path, "markdown": Path}``.

    Raises:
        UserInputError: ``results`` has no ``rows`` list, or a row is malformed (see
            :func:`comparison_table_markdown`).
    """
    if not isinstance(results, Mapping) or "rows" not in results:
        got = f"keys {list(results)[:10]}" if isinstance(results, Mapping) else type(results).__name__
        raise UserInputError(f"results must be a dict with a 'rows' list of result rows; got {got}")
    rows = results["rows"]
    _check_rows(rows)
    out_dir = Path(out_dir)

    title = str(results.get("title") or "DiffusionSeg evaluation")
    parts = [f"# {title}", ""]
    if results.get("notes"):
        parts += [str(results["notes"]), ""]
    parts += ["## Dice by organ size", "", comparison_table_markdown(rows, percent=percent)]
    if organs is not False and rows:
        per_organ = comparison_table_markdown(rows, organs=organs, size_groups=False, percent=percent)
        parts += ["## Dice per organ", "", per_organ]
    markdown = "\n".join(parts)

    text = json.dumps(to_json_safe(results), indent=2, allow_nan=False) + "\n"
    json_path = _atomic_write_bytes(out_dir / f"{name}.json", text.encode("utf-8"))
    md_path = _atomic_write_bytes(out_dir / f"{name}.md", markdown.encode("utf-8"))
    return {"json": json_path, "markdown": md_path}
