"""Figure of what the shared chest CT shows at its lower edge, with the shipped default's labels.

The field-of-view test (``Testing/probe/test_field_of_view.py``) allows kidneys and adrenals only in the lowest
slices of ``unlabeled/lidc_idri_0314_chest``; this figure shows why they may be there at all: axial slices 0, 4
and 9 (1.5 mm apart, bottom up) and a sagittal cut through the left kidney's upper pole.

    .venv/bin/python benchmarks/chest_ct_lower_edge.py  # -> benchmarks/results/field_of_view/chest_ct_lower_edge.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from DiffusionSegLib.cli import main
from DiffusionSegLib.data.labels import BTCV_LABELS

CHEST = REPO.parent / "shared" / "data" / "unlabeled" / "lidc_idri_0314_chest.nii.gz"
OUT = REPO / "benchmarks" / "results" / "field_of_view" / "chest_ct_lower_edge.png"


def run() -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        labels_path = Path(tmp) / "chest.nii.gz"
        if main(["segment", str(CHEST), "-o", str(labels_path), "--largest-component"]) != 0:
            raise SystemExit("segment failed")
        labels = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(labels_path)), "LPS"))
    ct = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(CHEST)), "LPS"))  # (I->S, P, L) rows
    names = {o.value: o.name for o in BTCV_LABELS}
    crop = (slice(120, 220), slice(80, 220))
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    for column, k in enumerate((0, 4, 9)):
        for row in (0, 1):
            axes[row, column].imshow(np.clip(ct[k][crop], -150, 250), cmap="gray")
            if row:
                shown = np.ma.masked_where(labels[k][crop] == 0, labels[k][crop])
                axes[row, column].imshow(shown, cmap="tab20", alpha=0.45, vmin=0, vmax=13)
            axes[row, column].set_title(f"axial slice {k} ({1.5 * k:.1f} mm above the lower edge)")
    axes[0, 3].imshow(np.clip(ct[:45, 130:230, 175], -150, 250), cmap="gray", origin="lower")
    axes[0, 3].set_title("sagittal through the left kidney's upper pole")
    found = sorted(names[v] for v in np.unique(labels[:20]) if v)
    axes[1, 3].axis("off")
    axes[1, 3].text(0, 0.5, "labels in the lowest 20 slices:\n" + "\n".join(found), fontsize=11)
    fig.suptitle("lidc_idri_0314_chest (LIDC-IDRI, CC BY 3.0): lowest slices, without and with the default's labels")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=60, bbox_inches="tight")
    return OUT


if __name__ == "__main__":
    print(run())
