"""The paths that run on a CUDA GPU give the CPU's results (run where a GPU is present; skipped elsewhere, CI
included: it has none). ``benchmarks/gpu_check.sh`` runs this file on the GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import data_path

from DiffusionSegLib.data.volume import read_volume

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_segment_on_cuda_gives_the_cpu_labels():
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.resources import default_probe_path

    image = read_volume(data_path("labeled/totalseg_example_ct_3mm.nii.gz"))
    backbone = load_backbone(find_probe_backbone(default_probe_path()))
    probe = load_probe(default_probe_path(), backbone)
    on = {d: sitk.GetArrayFromImage(segment(image, probe, backbone, device=d, precision="float32").labels)
          for d in ("cpu", "cuda")}  # fmt: skip
    organs = [v for v in np.unique(on["cpu"]) if v]
    assert len(organs) >= 8
    for value in organs:
        a, b = on["cpu"] == value, on["cuda"] == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99, value


def test_finetune_steps_on_cuda(tmp_path):
    from DiffusionSegLib.data.labels import organ_label
    from DiffusionSegLib.finetune import FinetuneConfig, finetune
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.resources import default_backbone_path

    case = (read_volume(data_path("btcv/btcv_0001_ct.nii.gz")), read_volume(data_path("btcv/btcv_0001_labels.nii.gz")))
    cfg = FinetuneConfig(steps=5, budget_minutes=0, spacing_mm=(6.0, 6.0, 6.0), patch_size_vox=(32, 32, 32),
                         device="cuda", precision="auto", val_every=5)  # fmt: skip
    result = finetune([case], [organ_label(6, "liver")], load_backbone(default_backbone_path()),
                      tmp_path / "model.safetensors", cfg, progress=False)  # fmt: skip
    assert result.steps == 5 and (tmp_path / "model.safetensors").is_file()
    assert result.history and all(np.isfinite(h["train_loss"]) for h in result.history if "train_loss" in h)
