"""BPRConfig checks and round trip; the network's shapes, axes and units."""

from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.bpr import BodyPartRegressor, BPRConfig, load_bpr, save_bpr
from DiffusionSegLib.errors import UserInputError

TINY = {"patch_size_vox": (16, 32, 32), "channels": (4, 8, 16), "decoder_channels": 8, "points_per_crop": 32,
        "batch_pairs": 1}


def test_config_round_trip_and_checks():
    cfg = BPRConfig(**TINY, steps=7)
    assert BPRConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"\(15, 32, 32\)"):
        BPRConfig(patch_size_vox=(15, 32, 32), channels=(4, 8, 16))
    with pytest.raises(ValueError, match=r"\(275, -125\)"):
        BPRConfig(window_hu=(275, -125))
    with pytest.raises(ValueError, match="'order'"):
        BPRConfig(objective="order")
    with pytest.raises(ValueError, match="bogus"):
        BPRConfig.from_dict({"bogus": 1})


def test_forward_shape_and_exact_patch_geometry_at_initialisation():
    """With relative positions and a zero head, coordinate differences are physical displacements in mm."""
    cfg = BPRConfig(**TINY)
    model = BodyPartRegressor(cfg).eval()
    x = torch.rand(2, 1, *cfg.patch_size_vox)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, *cfg.patch_size_vox)
    # interior voxels (trilinear upsampling from the coarse grid is exact for an affine field away from borders)
    a, b = out[0, :, 4, 8, 8], out[0, :, 12, 20, 24]
    expected = torch.tensor([(24 - 8) * cfg.spacing_mm[0], (20 - 8) * cfg.spacing_mm[1], (12 - 4) * cfg.spacing_mm[2]])
    torch.testing.assert_close(b - a, expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match=r"\(16, 30, 32\)"):
        model(torch.rand(1, 1, 16, 30, 32))


def test_weights_carry_their_config(tmp_path):
    cfg = BPRConfig(**TINY, relative_position=False, global_offset=False, residual_field=True, objective="distance")
    model = BodyPartRegressor(cfg)
    path = save_bpr(tmp_path / "bpr.safetensors", model, extra={"step": 3})
    loaded, loaded_cfg = load_bpr(path)
    assert loaded_cfg == cfg and not loaded.training
    x = torch.rand(1, 1, *cfg.patch_size_vox)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    with pytest.raises(UserInputError, match="not found"):
        load_bpr(tmp_path / "missing.safetensors")
