"""Evaluation: per-organ Dice / HD95 (thin over ``monai.metrics``), size-group summaries, reports and figures.

Typical use::

    scores = [organ_metrics(pred, ref, BTCV_LABELS, spacing_mm) for pred, ref, spacing_mm in cases]
    summary = summarise(scores)
    write_report({"rows": [row_from_summary("diffusion+BPR", "linear", "2 labeled", summary)]}, "out/")
"""

from __future__ import annotations

from DiffusionSegLib.evaluate.metrics import (
    METRIC_KEYS,
    ORGAN_SIZE_GROUPS,
    SIZE_GROUPS,
    organ_metrics,
    size_group_means,
    summarise,
)
from DiffusionSegLib.evaluate.plots import SOFT_TISSUE_WINDOW_HU, plot_overlay_preview, plot_timestep_ablation
from DiffusionSegLib.evaluate.report import comparison_table_markdown, row_from_summary, to_json_safe, write_report

__all__ = [
    "METRIC_KEYS",
    "ORGAN_SIZE_GROUPS",
    "SIZE_GROUPS",
    "SOFT_TISSUE_WINDOW_HU",
    "comparison_table_markdown",
    "organ_metrics",
    "plot_overlay_preview",
    "plot_timestep_ablation",
    "row_from_summary",
    "size_group_means",
    "summarise",
    "to_json_safe",
    "write_report",
]
