"""The slice design: config, crop geometry, objective, training on real CT, resume, whole-volume coordinates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import data_path

from DiffusionSegLib.bpr import (
    SliceBodyPartRegressor,
    SliceBPRConfig,
    bpr_config_from_dict,
    fit_bpr,
    load_bpr,
    predict_body_coordinates,
    predict_working_coordinates,
    save_bpr,
)
from DiffusionSegLib.bpr.objective import slice_objective
from DiffusionSegLib.bpr.sampling import TrainingVolume, sample_slice_crops
from DiffusionSegLib.bpr.slice_model import sample_slices, slice_centres_mm
from DiffusionSegLib.bpr.train import LOG_NAME, STATE_NAME, WEIGHTS_NAME, load_training_volumes
from DiffusionSegLib.checkpoint import load_training_state
from DiffusionSegLib.cli import main
from DiffusionSegLib.data.volume import read_volume, same_grid
from DiffusionSegLib.preprocess import prepare_volume

TINY = {"slice_size_px": 64, "channels": (8, 16, 32), "scans_per_step": 2, "crops_per_scan": 4}
SMALL_CT = "labeled/totalseg_example_ct_sm_3mm.nii.gz"
CT = "labeled/totalseg_example_ct_3mm.nii.gz"


def test_config_round_trip_and_refusals():
    cfg = SliceBPRConfig(**TINY, steps=7)
    assert bpr_config_from_dict(cfg.to_dict()) == cfg and cfg.pool_zyx == (1, 2, 2)
    assert bpr_config_from_dict({"steps": 3}).__class__.__name__ == "BPRConfig"  # no design: the 3D patch design
    assert cfg.learning_rate_at(0) == cfg.learning_rate and cfg.learning_rate_at(7) == 0.0
    assert SliceBPRConfig(lr_schedule="constant", steps=7).learning_rate_at(5) == 1e-3
    for bad in ({"slice_size_px": 100}, {"crops_per_scan": 3}, {"lr_schedule": "step"}, {"channels": (8,)}):
        with pytest.raises(ValueError):
            SliceBPRConfig(**bad)
    with pytest.raises(ValueError, match="bogus"):
        SliceBPRConfig.from_dict({"design": "slice", "bogus": 1})


def _marker_volume(spacing=(1.5, 1.5, 3.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """HU volume (z, y, x) of air with one bright 6 × 6 mm block in slice 10, and the block's centre in mm."""
    hu = torch.full((20, 80, 100), -1000.0)
    hu[10, 40:44, 60:64] = 200.0
    centre = torch.tensor([61.5 * spacing[0], 41.5 * spacing[1], 10 * spacing[2]])
    return hu, centre


def test_crops_are_centred_where_asked_and_slab_channels_are_neighbouring_slices():
    cfg = SliceBPRConfig(**TINY, slab_offsets_mm=(-3.0, 0.0, 3.0))
    hu, centre = _marker_volume()
    volume = TrainingVolume.from_array(hu, (1.5, 1.5, 3.0), cfg.window_hu, cfg.pool_zyx)
    crops = sample_slices(volume.pooled, volume.spacing_mm, volume.pool_zyx, centre[None], torch.tensor([[3.0, 3.0]]),
                          cfg)  # fmt: skip
    assert crops.shape == (1, 3, 64, 64)
    middle = crops[0, 1]
    peak = np.unravel_index(int(middle.argmax()), middle.shape)
    assert abs(peak[0] - 31.5) <= 1 and abs(peak[1] - 31.5) <= 1 and float(middle.max()) == pytest.approx(0.8125)  # 200 HU windowed
    assert float(crops[0, 0].max()) == 0.0 and float(crops[0, 2].max()) == 0.0  # the block is in one slice only
    # the same block seen 30 mm to the right of a crop's centre lies 10 pixels (3 mm each) left of it in x
    shifted = sample_slices(volume.pooled, volume.spacing_mm, volume.pool_zyx, (centre + torch.tensor([30.0, 0, 0]))[None],
                            torch.tensor([[3.0, 3.0]]), cfg)[0, 1]  # fmt: skip
    peak = np.unravel_index(int(shifted.argmax()), shifted.shape)
    assert abs(peak[1] - 21.5) <= 1 and abs(peak[0] - 31.5) <= 1


def test_a_neighbour_beyond_the_scan_repeats_the_edge_slice():
    cfg = SliceBPRConfig(**TINY, slab_offsets_mm=(-3.0, 0.0, 3.0))
    hu = torch.full((6, 40, 40), -1000.0)
    hu[0, 18:22, 18:22] = hu[-1, 18:22, 18:22] = 200.0  # a block in the first and the last slice only
    volume = TrainingVolume.from_array(hu, (1.5, 1.5, 3.0), cfg.window_hu, cfg.pool_zyx)
    centre = torch.tensor([[30.0, 30.0, 0.0], [30.0, 30.0, 15.0]])  # the first and the last slice
    crops = sample_slices(volume.pooled, volume.spacing_mm, volume.pool_zyx, centre, torch.full((2, 2), 3.0), cfg)
    below_first, first, above_first = (float(c.max()) for c in crops[0])
    below_last, last, above_last = (float(c.max()) for c in crops[1])
    assert below_first == first > 0 and above_first < 1e-6  # below the scan: the first slice again
    assert above_last == last > 0 and below_last < 1e-6


def test_slice_centres_follow_the_body_in_each_slice():
    hu, _ = _marker_volume()
    centres = slice_centres_mm(hu, (1.5, 1.5, 3.0))
    torch.testing.assert_close(centres[10], torch.tensor([61.5 * 1.5, 41.5 * 1.5]))
    torch.testing.assert_close(centres[0], torch.tensor([99 / 2 * 1.5, 79 / 2 * 1.5]))  # no body: volume centre


def test_objective_is_the_mean_pairwise_displacement_error():
    centre = torch.rand(8, 3) * 300
    offsets = centre / 100 + torch.tensor([0.3, -0.2, 1.0])  # one anatomical offset per scan: perfect
    loss, _ = slice_objective(offsets, centre, 4)
    assert float(loss) < 1e-10
    noisy = offsets + torch.randn(8, 3) * 0.1
    loss, stats = slice_objective(noisy, centre, 4)
    expected = []
    for scan in range(2):
        r = (noisy - centre / 100)[4 * scan : 4 * scan + 4]
        expected += [float(((r[i] - r[j]) ** 2).sum()) for i in range(4) for j in range(4) if i != j]
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5) and stats["rmse_mm"] > 0


def _mean_objective(model, volumes, cfg, batches: int = 8) -> float:
    generator = torch.Generator().manual_seed(123)  # the same crops before and after training
    with torch.no_grad():
        losses = []
        for _ in range(batches):
            batch = sample_slice_crops(volumes, cfg, generator, augment=False)
            losses.append(float(slice_objective(model.offsets(batch.images, batch.step_xy_mm), batch.centre_mm,
                                                batch.crops_per_scan)[0]))  # fmt: skip
    return float(np.mean(losses))


def test_training_on_real_ct_lowers_the_objective(tmp_path):
    cfg = SliceBPRConfig(**TINY, steps=120, learning_rate=3e-3)
    volumes = load_training_volumes([data_path(CT)], cfg, progress=False)
    torch.manual_seed(cfg.seed)
    before = _mean_objective(SliceBodyPartRegressor(cfg), volumes, cfg)
    result = fit_bpr(volumes, cfg, tmp_path, progress=False, checkpoint_every=60)
    after = _mean_objective(result.model, volumes, cfg)
    print(f"slice objective before {before:.4f}, after {after:.4f}")
    assert result.step == 120 and after < 0.5 * before, (before, after)


def test_resume_continues_exactly_with_the_learning_rate_schedule(tmp_path):
    volumes = load_training_volumes([data_path(SMALL_CT)], SliceBPRConfig(**TINY), progress=False)
    straight = fit_bpr(volumes, SliceBPRConfig(**TINY, steps=4), tmp_path / "a", progress=False, checkpoint_every=2)
    fit_bpr(volumes, SliceBPRConfig(**TINY, steps=4), tmp_path / "b", progress=False, checkpoint_every=2,
            max_seconds=0.0)  # stops (and saves) after its first step  # fmt: skip
    assert load_training_state(tmp_path / "b" / STATE_NAME)["step"] == 1
    resumed = fit_bpr(volumes, SliceBPRConfig(**TINY, steps=4), tmp_path / "b", progress=False, checkpoint_every=2)
    assert [h["step"] for h in resumed.history] == [2, 3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[1:]]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [json.loads(line)["step"] for line in (tmp_path / "b" / LOG_NAME).read_text().splitlines()] == [1, 2, 3, 4]
    with pytest.raises(Exception, match="config differs"):  # a patch-design run cannot continue this one
        from DiffusionSegLib.bpr import BPRConfig

        fit_bpr(volumes, BPRConfig(patch_size_vox=(16, 32, 32), channels=(4, 8, 16), steps=5), tmp_path / "b",
                progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_slice_model() -> SliceBodyPartRegressor:
    torch.manual_seed(0)
    model = SliceBodyPartRegressor(SliceBPRConfig(**TINY))
    with torch.no_grad():  # a non-trivial in-plane head, so every output depends on the image
        model.xy_head.weight.normal_(0, 0.01)
    return model.eval()


def test_coordinates_on_the_exact_input_grid_and_z_crops_change_nothing(tmp_path, tiny_slice_model):
    image = sitk.DICOMOrient(read_volume(data_path(SMALL_CT)), "RAI")
    coords = predict_body_coordinates(image, tiny_slice_model)
    assert same_grid(coords, image) and coords.GetNumberOfComponentsPerPixel() == 3
    assert np.isfinite(sitk.GetArrayViewFromImage(coords)).all()
    # dense: a voxel's coordinates depend on its slice (and the neighbours of the slab) only, so a scan cut
    # along z keeps them exactly, except in the cut slice, whose lower neighbour is now a copy of itself
    working = prepare_volume(read_volume(data_path(SMALL_CT))).image
    hu = torch.from_numpy(sitk.GetArrayFromImage(working)).float()
    full = predict_working_coordinates(hu, tiny_slice_model, mode="dense")
    part = predict_working_coordinates(hu[5:], tiny_slice_model, mode="dense")
    torch.testing.assert_close(part[:, :, 1:], full[:, :, 6:], atol=1e-3, rtol=0)
    assert float((part[:, 2, 0] - full[:, 2, 5]).abs().max()) > 1e-3  # the test can see a difference
    # monotone (the slice design's default): per slice one offset, the cranio-caudal channel non-decreasing
    monotone = predict_working_coordinates(hu, tiny_slice_model)
    torch.testing.assert_close(monotone, predict_working_coordinates(hu, tiny_slice_model, mode="monotone"))
    assert bool((monotone[0, 2, 1:] >= monotone[0, 2, :-1] - 1e-4).all())
    x, y, z = monotone[0]
    torch.testing.assert_close(x.diff(dim=2), torch.full_like(x.diff(dim=2), 1.5))  # 1 unit per mm along x
    torch.testing.assert_close(y.diff(dim=1), torch.full_like(y.diff(dim=1), 1.5))
    assert float(x.diff(dim=1).abs().max()) < 1e-4 and float(z.diff(dim=2).abs().max()) < 1e-4  # one offset a slice
    # the weights file rebuilds the same model through the coords command
    weights = save_bpr(tmp_path / "slice.safetensors", tiny_slice_model)
    loaded, cfg = load_bpr(weights)
    assert isinstance(loaded, SliceBodyPartRegressor) and cfg == tiny_slice_model.config
    out = tmp_path / "coords.nii.gz"
    assert main(["coords", str(data_path(SMALL_CT)), "-o", str(out), "--bpr", str(weights)]) == 0
    assert same_grid(sitk.ReadImage(str(out)), read_volume(data_path(SMALL_CT)))


def test_bpr_train_command_trains_the_slice_design_by_default(tmp_path):
    ct, out = str(data_path(SMALL_CT)), tmp_path / "run"
    tiny = ["--channels", "8", "16", "32", "--scans-per-step", "1", "--quiet"]
    assert main(["bpr-train", ct, "--run-dir", str(out), "--steps", "2", *tiny]) == 0
    assert load_training_state(out / STATE_NAME)["config"]["design"] == "slice"
    assert isinstance(load_bpr(out / WEIGHTS_NAME)[0], SliceBodyPartRegressor)
    assert main(["bpr-train", ct, "--run-dir", str(out), "--steps", "2", "--patch", "16", "32", "32", *tiny]) == 2
