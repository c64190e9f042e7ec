"""Pretraining on real CT with tiny configs: loss falls, exact resume, DDP on 2 CPU processes, baselines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, data_path

from DiffusionSegLib.pretrain import PretrainConfig, load_backbone, pretrain_backbone
from DiffusionSegLib.pretrain.methods import build_backbone


def _config(out_dir: Path, **overrides) -> PretrainConfig:
    images = [str(data_path("labeled/totalseg_example_ct_sm_3mm.nii.gz")), str(data_path("labeled/totalseg_dicom_ct.nii.gz"))]
    data = {
        "method": "diffusion", "use_bpr": False, "output_dir": str(out_dir),
        "data": {"images": images, "patch_size_vox": [16, 32, 32], "val_patches": 2},
        "backbone": {"base_channels": 4, "num_scales": 3, "num_res_blocks": 1},
        "optim": {"lr": 2e-3, "warmup_steps": 0, "lr_schedule": "constant"},
        "training": {"steps": 6, "batch_size": 2, "log_every": 1, "val_every": 3, "checkpoint_every": 3,
                     "progress": False},
    }  # fmt: skip
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return PretrainConfig.from_dict(data)


def _log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_validation_loss_falls_on_real_ct(tmp_path):
    # Full-range noise ("linear"): the loss has room to fall within a few steps of a tiny network.
    cfg = _config(tmp_path, training__steps=24, training__val_every=4, data__val_patches=4,
                  diffusion={"schedule": "linear"})
    result = pretrain_backbone(cfg)
    val = [r["val_loss"] for r in _log(tmp_path) if "val_loss" in r]
    assert len(val) == 6
    assert val[-1] < 0.9 * val[0], val
    bundle = load_backbone(result.weights)
    assert bundle.pretrain.method == "diffusion" and not bundle.use_bpr
    assert bundle.feature_channels == [4, 8, 16]


def test_interrupted_run_resumes_with_the_same_losses(tmp_path):
    reference = pretrain_backbone(_config(tmp_path / "a")).losses
    first = pretrain_backbone(_config(tmp_path / "b", training__export_at=[2, 5]), max_steps_this_run=3)
    assert first.weights is None and first.step == 3
    second = pretrain_backbone(_config(tmp_path / "b", training__export_at=[2, 5]))
    assert second.step == 6 and second.weights is not None
    assert first.losses + second.losses == pytest.approx(reference, rel=1e-6, abs=1e-7)
    # The intermediate exports are the backbone as it was at those steps (one before, one after the resume).
    final = load_backbone(second.weights).model.state_dict()
    for step in (2, 5):
        exported = load_backbone(tmp_path / "b" / f"backbone_step{step:05d}.safetensors").model.state_dict()
        assert exported.keys() == final.keys()
        assert any(not torch.equal(exported[k], final[k]) for k in final)
    assert [r["step"] for r in _log(tmp_path / "b") if "loss" in r] == list(range(1, 7))
    with pytest.raises(ValueError, match="exists"):
        pretrain_backbone(_config(tmp_path / "b"), resume=False)  # an existing run is never overwritten


def test_bpr_switch_changes_the_input_channels_and_nothing_else(tmp_path):
    with_bpr = build_backbone(_config(tmp_path, use_bpr=True)).state_dict()
    without = build_backbone(_config(tmp_path, use_bpr=False)).state_dict()
    assert with_bpr.keys() == without.keys()
    differing = [k for k in with_bpr if with_bpr[k].shape != without[k].shape]
    assert differing == ["stem.weight"]
    assert with_bpr["stem.weight"].shape[1] == 4 and without["stem.weight"].shape[1] == 1


@pytest.mark.parametrize("method", ["restorative", "contrastive", "random"])
def test_each_baseline_trains_and_exports(tmp_path, method):
    result = pretrain_backbone(_config(tmp_path, method=method, training__steps=3))
    bundle = load_backbone(result.weights)
    assert bundle.pretrain.method == method
    assert not bundle.model.config.time_conditioning
    if method != "random":
        assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_completes_and_ranks_agree(tmp_path):
    cfg = _config(tmp_path, training__steps=3)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(REPO / "pretrain.py"), "--", "--config", str(config_file)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _log(tmp_path)[-1]
    assert final["done"] and final["world_size"] == 2 and final["ranks_agree"] is True
    assert (tmp_path / "backbone.safetensors").is_file()


def test_pretrain_script_reports_bad_config_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "--", "--training.steps", "-x"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "expected a number" in done.stderr and "Traceback" not in done.stderr


def test_diffusion_with_bpr_feeds_the_frozen_coordinates(tmp_path):
    """A (random, tiny) BPR's coordinate map is concatenated to the noised patch; its hash is recorded."""
    from DiffusionSegLib.bpr import BodyPartRegressor, BPRConfig, save_bpr
    from DiffusionSegLib.checkpoint import file_sha256

    torch.manual_seed(0)
    bpr_path = save_bpr(tmp_path / "bpr.safetensors",
                        BodyPartRegressor(BPRConfig(channels=(4, 8), decoder_channels=4, patch_size_vox=(16, 32, 32))))  # fmt: skip
    before = file_sha256(bpr_path)
    cfg = _config(tmp_path / "run", use_bpr=True, bpr_weights=str(bpr_path), training__steps=2)
    result = pretrain_backbone(cfg)
    bundle = load_backbone(result.weights)
    assert bundle.use_bpr and bundle.model.config.in_channels == 4
    assert bundle.bpr_sha256 == before == file_sha256(bpr_path)  # recorded, and the BPR itself untouched
