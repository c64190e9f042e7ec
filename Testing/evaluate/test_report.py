"""Markdown / JSON reports and PNG figures (timestep ablation, overlay preview)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from DiffusionSegLib.data.labels import BTCV_LABELS, OrganLabel
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.evaluate import (
    comparison_table_markdown,
    plot_overlay_preview,
    plot_timestep_ablation,
    row_from_summary,
    summarise,
    write_report,
)

ROWS = [
    {"method": "diffusion+BPR", "probe": "linear", "regime": "2 labeled", "liver": 0.9, "spleen": 0.8,
     "aorta": 0.7, "pancreas": 0.5, "esophagus": 0.4, "left adrenal gland": math.nan, "n_labeled": 2},
    {"method": "scratch", "probe": "non-linear", "regime": "2 labeled",
     "dice": {"liver": {"mean": 0.8, "std": 0.05}, "kidney_left": {"mean": 0.6, "std": 0.1}}},
]  # fmt: skip


def _table_cells(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.strip().splitlines()]


def test_comparison_table_computes_size_groups_from_organ_dice():
    cells = _table_cells(comparison_table_markdown(ROWS))
    assert cells[0] == ["Method", "Probe", "Regime", "Big", "Medium", "Small", "Mean"]
    # big (0.9, 0.8) → 0.850, medium (0.7, 0.5) → 0.600, small (0.4; NaN skipped) → 0.400, mean of 5 → 0.660
    assert cells[2] == ["diffusion+BPR", "linear", "2 labeled", "0.850", "0.600", "0.400", "0.660"]
    assert cells[3] == ["scratch", "non-linear", "2 labeled", "0.700", "–", "–", "0.700"]


def test_comparison_table_per_organ_columns_std_and_percent():
    cells = _table_cells(comparison_table_markdown(ROWS, organs=True, size_groups=False, percent=True))
    assert cells[0][3:] == ["liver", "spleen", "aorta", "pancreas", "esophagus", "L adrenal", "L kidney"]
    assert cells[2][3:] == ["90.0", "80.0", "70.0", "50.0", "40.0", "–", "–"]
    assert cells[3][3] == "80.0 ± 5.0" and cells[3][-1] == "60.0 ± 10.0"
    only_regime_free = comparison_table_markdown([{"method": "a|b", "probe": "p", "liver": 1}], organs=["liver"])
    assert _table_cells(only_regime_free)[0] == ["Method", "Probe", "Big", "Medium", "Small", "Mean", "liver"]
    assert "a\\|b" in only_regime_free


def test_comparison_table_rejects_malformed_rows():
    with pytest.raises(UserInputError, match="row 0 needs a non-empty string 'probe'"):
        comparison_table_markdown([{"method": "x"}])
    with pytest.raises(UserInputError, match="row 0, organ 'liver'"):
        comparison_table_markdown([{"method": "x", "probe": "y", "liver": "high"}])


def test_row_from_summary_carries_mean_and_std():
    case = {"liver": {"dice": 0.9}, "aorta": {"dice": 0.6}}
    other = {"liver": {"dice": 0.7}, "aorta": {"dice": 0.4}}
    row = row_from_summary("diffusion", "linear", "", summarise([case, other]), n_labeled=2)
    assert row["n_cases"] == 2 and row["n_labeled"] == 2
    cells = _table_cells(comparison_table_markdown([row], organs=True))
    assert cells[2] == ["diffusion", "linear", "0.800 ± 0.100", "0.500 ± 0.100", "–", "0.650 ± 0.100",
                        "0.800 ± 0.100", "0.500 ± 0.100"]  # fmt: skip


def test_write_report_writes_json_and_markdown_atomically(tmp_path):
    results = {"title": "BTCV few-shot", "notes": "5-fold, 2 labeled scans", "rows": ROWS,
               "config": {"timesteps": [10], "spacing_mm": np.array([1.0, 1.0, 2.0])}}  # fmt: skip
    paths = write_report(results, tmp_path / "out", name="btcv")
    assert set(paths) == {"json", "markdown"}
    assert paths["json"].name == "btcv.json" and paths["markdown"].name == "btcv.md"
    loaded = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert loaded["rows"][0]["left adrenal gland"] is None
    assert loaded["config"]["spacing_mm"] == [1.0, 1.0, 2.0]
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# BTCV few-shot")
    assert "| diffusion+BPR | linear | 2 labeled | 0.850 | 0.600 | 0.400 | 0.660 |" in markdown
    assert "## Dice per organ" in markdown and "0.800 ± 0.050" in markdown
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["btcv.json", "btcv.md"]  # no temp files left
    with pytest.raises(UserInputError, match="'rows'"):
        write_report({"title": "x"}, tmp_path)


def _is_blank(image: np.ndarray) -> bool:
    return bool(np.all(image[..., :3] > 0.99))


def test_timestep_ablation_png_has_the_requested_size(tmp_path):
    organs = [label.name for label in BTCV_LABELS]
    by_t = {
        t: {name: 0.8 - 0.01 * i - 0.002 * abs(t - 10) for i, name in enumerate(organs)} for t in (1, 5, 10, 50, 100)
    }
    by_t[200] = summarise([{name: {"dice": 0.5} for name in organs}, {name: {"dice": 0.3} for name in organs}])
    by_t[1000] = {"big": 0.8, "medium": 0.6, "small": {"mean": 0.3, "std": 0.1}, "mean": 0.6}
    path = plot_timestep_ablation(by_t, tmp_path / "fig" / "ablation.png", figsize_in=(6, 4), dpi=100)
    image = imread(path)
    assert image.shape[:2] == (400, 600)
    assert not _is_blank(image)
    with pytest.raises(UserInputError, match="positive integer"):
        plot_timestep_ablation({0: by_t[1]}, tmp_path / "bad.png")


def _has_colour(image: np.ndarray, rgb, tolerance: float = 3 / 255) -> bool:
    return bool(np.any(np.all(np.abs(image[..., :3] - np.asarray(rgb)) <= tolerance, axis=-1)))


def test_overlay_preview_shows_the_organ_colour(tmp_path):
    """A 40 HU body with a labelled box: an overlay pixel is 0.5·organ colour + 0.5·grey(40 HU), grey = 128/255."""
    ct = np.full((30, 64, 64), -1000, dtype=np.int16)
    ct[:, 8:56, 8:56] = 40  # mid-grey in the (-160, 240) window
    labels_map = np.zeros(ct.shape, dtype=np.uint8)
    labels_map[10:20, 20:40, 20:44] = 1
    organ = OrganLabel(1, "spleen", (0.2, 0.8, 0.4))
    unused = OrganLabel(2, "liver", (0.9, 0.1, 0.1))
    path = plot_overlay_preview(ct, labels_map, [organ, unused], tmp_path / "preview.png",
                                spacing_mm=(0.8, 0.8, 2.5), alpha=0.5, figsize_in=(8, 4), dpi=100)  # fmt: skip
    image = imread(path)
    assert image.shape[:2] == (400, 800)
    grey = 128 / 255  # gray colormap entry for the window's midpoint
    assert _has_colour(image, [0.5 * c + 0.5 * grey for c in organ.color])  # overlay
    assert _has_colour(image, organ.color)  # legend patch
    assert not _has_colour(image, unused.color)  # only organs in the slices are listed
    with pytest.raises(UserInputError, match="axial_index"):
        plot_overlay_preview(ct, labels_map, [organ], tmp_path / "bad.png", axial_index=30)
    with pytest.raises(UserInputError, match="one shape"):
        plot_overlay_preview(ct, labels_map[:-1], [organ], tmp_path / "bad.png")
