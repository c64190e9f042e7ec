"""Figures: the timestep ablation (the paper's Figure 2) and an axial + coronal overlay preview of a segmentation.

Drawn with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure``, no pyplot, no display, no
global state) and saved atomically as PNG. matplotlib is imported inside the functions so that importing the
library stays cheap.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.evaluate.metrics import SIZE_GROUPS, size_group_means
from DiffusionSegLib.evaluate.report import _atomic_write_bytes

__all__ = ["plot_timestep_ablation", "plot_overlay_preview", "SOFT_TISSUE_WINDOW_HU"]

SOFT_TISSUE_WINDOW_HU: tuple[float, float] = (-160.0, 240.0)
"""Display window (low, high) in HU: level 40, width 400, the usual abdominal soft-tissue window."""

_CURVES = (  # (key, legend label, colour, marker)
    ("big", "Big organs", "#1f77b4", "o"),
    ("medium", "Medium organs", "#ff7f0e", "s"),
    ("small", "Small organs", "#2ca02c", "^"),
    ("mean", "Average", "#000000", "D"),
)
_CURVE_KEYS = tuple(curve[0] for curve in _CURVES)


def _save_png(figure: Any, path: str | os.PathLike, dpi: float) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return _atomic_write_bytes(Path(path), buffer.getvalue())


def _curve_values(entry: Mapping[str, Any], steps: int) -> dict[str, tuple[float, float]]:
    """(mean, std) per curve from a summarise() result, a row-like dict of group values, or per-organ values."""

    def as_pair(value: Any) -> tuple[float, float]:
        if isinstance(value, Mapping):
            value = value.get("dice", value)
        if isinstance(value, Mapping):
            std = value.get("std")
            return (float(value["mean"]), math.nan if std is None else float(std))
        return (math.nan if value is None else float(value), math.nan)

    try:
        if "groups" in entry and "overall" in entry:  # summarise() output
            values = {g: as_pair(entry["groups"].get(g, math.nan)) for g in SIZE_GROUPS}
            values["mean"] = as_pair(entry["overall"])
            return values
        if any(key in entry for key in (*SIZE_GROUPS, "mean")):  # {"big": .., "medium": .., "small": .., "mean": ..}
            return {key: as_pair(entry.get(key)) for key in _CURVE_KEYS}
        organs = {name: as_pair(value)[0] for name, value in entry.items()}  # {organ: dice}
        return {key: (value, math.nan) for key, value in size_group_means(organs).items() if key in _CURVE_KEYS}
    except (KeyError, TypeError, ValueError) as error:
        raise UserInputError(
            f"results for T={steps} must be a summarise() result, {{'big', 'medium', 'small', 'mean'}} or "
            f"{{organ: dice}}; could not read it ({error!r})"
        ) from None


def plot_timestep_ablation(
    results_by_T: Mapping[int, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = "Dice vs number of diffusion timesteps",
    log_x: bool | None = None,
    show_std: bool = True,
    figsize_in: tuple[float, float] = (6.0, 4.0),
    dpi: float = 100.0,
) -> Path:
    """Plot Dice against the number of diffusion timesteps, one curve per organ size group plus the average.

    The style of the paper's Figure 2: x = number of timesteps, y = Dice, markers on every measured T, curves for
    Big / Medium / Small organs and their average.

    Args:
        results_by_T: ``{T: result}`` where a result is a :func:`~DiffusionSegLib.evaluate.metrics.summarise`
            output (mean ± std over cases; std drawn as a light band), a dict with ``"big"``, ``"medium"``,
            ``"small"``, ``"mean"`` values, or a per-organ ``{organ: dice}`` dict (grouped here).
        path: PNG file to write (folders are created).
        title: figure title; ``None`` for none.
        log_x: logarithmic x axis; default (``None``) when the largest T is at least 20 times the smallest.
        show_std: draw ± std bands where the results carry a std.
        figsize_in: figure size in inches; the PNG is ``figsize_in * dpi`` pixels.
        dpi: resolution of the PNG.

    Returns:
        The path written.

    Raises:
        UserInputError: ``results_by_T`` is empty, a T is not a positive integer, or a result cannot be read.
    """
    from matplotlib.figure import Figure

    if not results_by_T:
        raise UserInputError("results_by_T is empty: give at least one {number of timesteps: results} entry")
    steps: list[int] = []
    for key in results_by_T:
        try:
            value = float(key)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(key, bool) or not value.is_integer() or value <= 0:
            raise UserInputError(f"number of timesteps must be a positive integer; got {key!r}")
        steps.append(int(value))
    order = sorted(range(len(steps)), key=steps.__getitem__)
    entries = list(results_by_T.values())
    x = np.asarray([steps[i] for i in order], dtype=float)
    curves = [_curve_values(entries[i], steps[i]) for i in order]
    if log_x is None:
        log_x = len(x) > 1 and x[-1] / x[0] >= 20

    figure = Figure(figsize=figsize_in, dpi=dpi)
    axes = figure.add_subplot()
    for key, label, colour, marker in _CURVES:
        mean = np.asarray([c[key][0] for c in curves])
        std = np.asarray([c[key][1] for c in curves])
        style = {"linestyle": "--", "linewidth": 1.5} if key == "mean" else {"linestyle": "-", "linewidth": 2}
        axes.plot(x, mean, marker=marker, color=colour, label=label, markersize=6, **style)
        if show_std and np.isfinite(std).any():
            axes.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    if log_x:
        axes.set_xscale("log")
    axes.set_xticks(x)
    axes.set_xticklabels([str(int(v)) for v in x])
    axes.minorticks_off()
    axes.set_xlabel("Number of diffusion timesteps")
    axes.set_ylabel("Dice")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", frameon=False)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return _save_png(figure, path, dpi)


def _busiest_index(seg: np.ndarray, values: Sequence[int], axis: int) -> int:
    """Index along ``axis`` of the slice that shows the most organs (each with at least 1 % of its largest
    cross-section there), ties broken by labelled voxels; the middle when nothing is labelled. The slice with
    the most voxels alone is usually all liver."""
    others = tuple(a for a in range(seg.ndim) if a != axis)
    areas = np.stack([(seg == v).sum(axis=others) for v in values]) if values else np.zeros((0, seg.shape[axis]))
    if not areas.any():
        return seg.shape[axis] // 2
    shown = (areas >= np.maximum(1, 0.01 * areas.max(axis=1, keepdims=True))) & (areas > 0)
    return int(np.lexsort((areas.sum(axis=0), shown.sum(axis=0)))[-1])


def _check_index(index: int | None, size: int, what: str, default: int) -> int:
    if index is None:
        return default
    if isinstance(index, bool) or not float(index).is_integer() or not 0 <= int(index) < size:
        raise UserInputError(f"{what} must be an integer in [0, {size - 1}]; got {index!r}")
    return int(index)


def _overlay_rgba(slice_labels: np.ndarray, labels: Sequence[OrganLabel], alpha: float) -> np.ndarray:
    rgba = np.zeros((*slice_labels.shape, 4), dtype=np.float32)
    for label in labels:
        rgba[slice_labels == label.value] = (*label.color, alpha)
    return rgba


def plot_overlay_preview(
    ct_array: np.ndarray,
    label_array: np.ndarray,
    labels: Sequence[OrganLabel],
    path: str | os.PathLike,
    axial_index: int | None = None,
    coronal_index: int | None = None,
    *,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    window_hu: tuple[float, float] = SOFT_TISSUE_WINDOW_HU,
    alpha: float = 0.5,
    title: str | None = None,
    figsize_in: tuple[float, float] = (10.0, 5.5),
    dpi: float = 100.0,
) -> Path:
    """Save a PNG with an axial and a coronal CT slice, organs overlaid in their colours, and a legend.

    Arrays are in SimpleITK array order ``(z, y, x)`` and assumed in the library's canonical LPS orientation
    (identity direction): the axial view shows anterior up and the patient's right on the image's left
    (radiological convention), the coronal view shows superior up. Pixel aspect follows the spacing, so
    anisotropic voxels are drawn to physical scale.

    Args:
        ct_array: CT in HU, shape ``(z, y, x)``.
        label_array: integer label map of the same shape; ids not in ``labels`` are not drawn.
        labels: organs to draw (``value`` → ``color``, ``name`` in the legend).
        path: PNG file to write (folders are created).
        axial_index: z index of the axial slice; default the slice showing the most organs.
        coronal_index: y index of the coronal slice; default the slice showing the most organs.
        spacing_mm: voxel spacing in SimpleITK order ``(x, y, z)``; default 1 mm isotropic.
        window_hu: (low, high) grey-scale window in HU; default the soft-tissue window (-160, 240).
        alpha: opacity of the organ colours over the CT, in (0, 1].
        title: figure title; ``None`` for none.
        figsize_in: figure size in inches; the PNG is ``figsize_in * dpi`` pixels.
        dpi: resolution of the PNG.

    Returns:
        The path written. The legend lists the organs visible in either slice.

    Raises:
        UserInputError: the arrays are not 3D of one shape, an index is out of range, or the spacing, window or
            alpha is invalid.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ct = np.asarray(ct_array)
    seg = np.asarray(label_array)
    if ct.ndim != 3 or seg.shape != ct.shape:
        raise UserInputError(
            f"ct_array and label_array must be 3D (z, y, x) of one shape; got {ct.shape} and {seg.shape}"
        )
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserInputError(f"spacing_mm must be three positive numbers (x, y, z) in mm; got {tuple(spacing_mm)}")
    low, high = (float(v) for v in window_hu)
    if not low < high:
        raise UserInputError(f"window_hu must be (low, high) with low < high; got {tuple(window_hu)}")
    if not 0 < alpha <= 1:
        raise UserInputError(f"alpha must be in (0, 1]; got {alpha}")
    sx, sy, sz = spacing

    values = [label.value for label in labels]
    z = _check_index(axial_index, ct.shape[0], "axial_index", _busiest_index(seg, values, 0))
    y = _check_index(coronal_index, ct.shape[1], "coronal_index", _busiest_index(seg, values, 1))

    views = [  # (title, CT slice, label slice, pixel aspect height/width, image origin)
        (f"Axial (z = {z})", ct[z], seg[z], sy / sx, "upper"),
        (f"Coronal (y = {y})", ct[:, y, :], seg[:, y, :], sz / sx, "lower"),
    ]
    figure = Figure(figsize=figsize_in, dpi=dpi)
    grid = figure.add_gridspec(1, 2, left=0.03, right=0.97, top=0.9 if title else 0.95, bottom=0.2, wspace=0.08)
    for column, (name, ct_slice, label_slice, aspect, origin) in enumerate(views):
        axes = figure.add_subplot(grid[0, column])
        axes.imshow(ct_slice, cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin, interpolation="nearest")
        axes.imshow(_overlay_rgba(label_slice, labels, alpha), aspect=aspect, origin=origin, interpolation="nearest")
        axes.set_title(name, fontsize=10)
        axes.set_axis_off()

    shown = np.union1d(np.unique(views[0][2]), np.unique(views[1][2]))
    handles = [
        Patch(facecolor=label.color, edgecolor="none", label=label.name) for label in labels if label.value in shown
    ]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), frameon=False, fontsize=9)
    else:
        figure.text(0.5, 0.08, "no organ in these slices", ha="center", fontsize=9)
    if title:
        figure.suptitle(title)
    return _save_png(figure, path, dpi)
