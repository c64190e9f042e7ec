"""Crop pairs: a pooled crop is exactly the pooled working-grid patch at the stated physical position."""

from __future__ import annotations

import SimpleITK as sitk
import torch
from helpers import data_path

from DiffusionSegLib.bpr import BPRConfig
from DiffusionSegLib.bpr.sampling import TrainingVolume, _sample_crop, crop_positions_mm, sample_crop_pairs
from DiffusionSegLib.data.volume import read_volume
from DiffusionSegLib.preprocess import prepare_volume, scale_hu


def test_pooled_crop_matches_the_working_grid_patch():
    cfg = BPRConfig(patch_size_vox=(16, 32, 32), channels=(4, 8, 16))
    prepared = prepare_volume(read_volume(data_path("labeled/totalseg_example_ct_sm_3mm.nii.gz")))
    volume = TrainingVolume.from_image(prepared.image, cfg.window_hu, cfg.pool_zyx)
    start_zyx, (d, h, w) = (6, 20, 36), cfg.patch_size_vox  # starts on whole pooling blocks
    spacing = torch.tensor(cfg.spacing_mm)
    centre = torch.tensor([start_zyx[2] + (w - 1) / 2, start_zyx[1] + (h - 1) / 2, start_zyx[0] + (d - 1) / 2])
    centre = centre * spacing
    crop = _sample_crop(volume, centre, spacing, cfg.patch_size_vox)
    working = scale_hu(torch.from_numpy(sitk.GetArrayFromImage(prepared.image)), cfg.window_hu)
    patch = working[6 : 6 + d, 20 : 20 + h, 36 : 36 + w][None, None]
    expected = torch.nn.functional.avg_pool3d(patch, cfg.pool_zyx)[0]
    torch.testing.assert_close(crop, expected, atol=1e-5, rtol=0)


def test_crop_positions_are_block_centres_in_lps_order():
    positions = crop_positions_mm(torch.zeros(1, 3), torch.tensor([[1.5, 1.5, 3.0]]), (4, 8, 8), (2, 4, 4))
    assert positions.shape == (1, 3, 2, 2, 2)
    # x grows along W, y along H, z along D; a block of 4 voxels is centred 1.5 voxels after its start
    assert float(positions[0, 0, 0, 0, 1] - positions[0, 0, 0, 0, 0]) == 4 * 1.5
    assert float(positions[0, 2, 1, 0, 0] - positions[0, 2, 0, 0, 0]) == 2 * 3.0
    assert float(positions[0, 0, 0, 0, 0]) == (1.5 - 3.5) * 1.5


def test_pairs_overlap_and_are_reproducible():
    cfg = BPRConfig(patch_size_vox=(16, 32, 32), channels=(4, 8, 16))
    prepared = prepare_volume(read_volume(data_path("labeled/totalseg_example_ct_sm_3mm.nii.gz")))
    volumes = [TrainingVolume.from_image(prepared.image, cfg.window_hu, cfg.pool_zyx)]
    first = sample_crop_pairs(volumes, 3, cfg.patch_size_vox, torch.Generator().manual_seed(5))
    again = sample_crop_pairs(volumes, 3, cfg.patch_size_vox, torch.Generator().manual_seed(5))
    assert first.images.shape == (6, 1, 8, 8, 8) and torch.equal(first.images, again.images)
    extent = torch.tensor([32, 32, 16]) * first.step_mm[0::2]
    assert torch.all((first.centre_mm[1::2] - first.centre_mm[0::2]).abs() <= 0.5 * extent + 1e-4)
    assert 0 <= float(first.images.min()) and float(first.images.max()) <= 1


def test_far_pairs_reach_across_the_scan_along_z_only():
    cfg = BPRConfig(patch_size_vox=(16, 32, 32), channels=(4, 8, 16))
    prepared = prepare_volume(read_volume(data_path("labeled/totalseg_example_ct_sm_3mm.nii.gz")))
    volumes = [TrainingVolume.from_image(prepared.image, cfg.window_hu, cfg.pool_zyx)]
    near = sample_crop_pairs(volumes, 32, cfg.patch_size_vox, torch.Generator().manual_seed(1))
    far = sample_crop_pairs(volumes, 32, cfg.patch_size_vox, torch.Generator().manual_seed(1), far_pair_fraction=1.0)
    extent = torch.tensor([32, 32, 16]) * far.step_mm[0::2]
    shift = (far.centre_mm[1::2] - far.centre_mm[0::2]).abs()
    assert torch.all(shift[:, :2] <= 0.5 * extent[:, :2] + 1e-4)  # in-plane: overlapping as before
    assert torch.any(shift[:, 2] > 0.5 * extent[:, 2])  # along z: anywhere in the scan
    assert torch.all(far.centre_mm[1::2, 2] <= volumes[0].extent_mm[2] + 1e-4)
    near_shift = (near.centre_mm[1::2] - near.centre_mm[0::2]).abs()
    near_extent = torch.tensor([32, 32, 16]) * near.step_mm[0::2]
    assert torch.all(near_shift[:, 2] <= 0.5 * near_extent[:, 2] + 1e-4)
