"""Feature extraction: fixed, position-bound noise; window-independent, deterministic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from features.tiny_backbone import make_backbone
from helpers import data_path

from DiffusionSegLib.data.volume import read_volume
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.features import (
    CPU_WINDOWS_PER_PASS,
    FeatureConfig,
    FeatureExtractor,
    auto_sw_batch_size,
    backbone_bpr_path,
    build_inputs,
    extract_features,
    noise_field,
    window_size,
)
from DiffusionSegLib.preprocess import prepare_volume




@pytest.fixture(scope="module")
def prepared(backbone):
    ct = read_volume(data_path("labeled/ircadb1.01_ct.nii.gz"))[:, :, 50:90]  # 40 slices: fast
    return prepare_volume(ct, backbone.pretrain.preprocess)


def test_noise_field_depends_on_seed_only():
    a, b, c = noise_field((4, 5, 6), 3, 2), noise_field((4, 5, 6), 3, 2), noise_field((4, 5, 6), 4, 2)
    assert a.shape == (2, 4, 5, 6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])
    assert abs(float(a.std()) - 1.0) < 0.2


def test_inputs_hold_image_and_noise(backbone, prepared):
    inputs = build_inputs(prepared.image, backbone, FeatureConfig(num_noise_draws=2))
    assert inputs.tensor.shape == (1, 3, *reversed(prepared.image.GetSize()))
    assert inputs.num_coords == 0 and inputs.num_draws == 2
    assert 0.0 <= float(inputs.tensor[0, 0].min()) and float(inputs.tensor[0, 0].max()) <= 1.0


def test_features_are_deterministic_and_independent_of_the_window(backbone, prepared):
    finest = backbone.feature_channels[0]
    t = 9  # the noisiest step of T = 10, so that the noise field matters (t = 0 is nearly noise-free)
    big = FeatureConfig(window_vox=(32, 64, 64), overlap=0.5, timestep=t)
    a = extract_features(prepared, backbone, big)
    again = extract_features(prepared, backbone, big)
    small = extract_features(prepared, backbone, FeatureConfig(window_vox=(16, 48, 48), overlap=0.5, timestep=t))
    other_seed = extract_features(prepared, backbone, FeatureConfig(window_vox=(32, 64, 64), overlap=0.5,
                                                                    noise_seed=1, timestep=t))  # fmt: skip
    assert a.shape == (1, sum(backbone.feature_channels), *reversed(prepared.image.GetSize()))
    assert torch.equal(a, again)
    # the window changes a voxel's feature only through the convolutions' border effects; drawing noise per
    # window (or per call) would change it as much as another seed does
    window_change = float((a - small)[:, :finest].abs().mean())
    seed_change = float((a - other_seed)[:, :finest].abs().mean())
    assert window_change < 0.5 * seed_change, (window_change, seed_change)  # measured 0.31; per-window noise: ~1


def test_timestep_changes_the_features(backbone, prepared):
    cfg = FeatureConfig(window_vox=(32, 64, 64))
    t0 = extract_features(prepared, backbone, cfg)
    t3 = extract_features(prepared, backbone, FeatureConfig(window_vox=(32, 64, 64), timestep=3))
    assert float((t0 - t3).abs().mean()) > 1e-3


def test_non_diffusion_backbone_sees_the_clean_image(tmp_path, prepared):
    backbone = make_backbone(tmp_path / "random.safetensors", method="random")
    inputs = build_inputs(prepared.image, backbone, FeatureConfig(noise_seed=5))
    assert inputs.num_draws == 0 and inputs.tensor.shape[1] == 1
    a = extract_features(prepared, backbone, FeatureConfig(noise_seed=0))
    b = extract_features(prepared, backbone, FeatureConfig(noise_seed=9))
    assert torch.equal(a, b)


def test_window_must_fit_the_backbone(backbone):
    assert window_size(backbone, FeatureConfig()) == (32, 64, 64)
    with pytest.raises(UserInputError, match="multiple of 4"):
        window_size(backbone, FeatureConfig(window_vox=(30, 64, 64)))


def test_timestep_outside_the_schedule_is_refused(backbone):
    with pytest.raises(UserInputError, match="timestep 10"):
        FeatureExtractor(backbone, FeatureConfig(timestep=10))


def test_config_checks():
    for bad in ({"num_noise_draws": 0}, {"overlap": 1.0}, {"timestep": -1}, {"window_vox": (0, 8, 8)}):
        with pytest.raises(ValueError):
            FeatureConfig(**bad)


def test_auto_batch_size_is_bounded(backbone):
    small = auto_sw_batch_size(backbone.feature_channels, 1, (32, 64, 64), torch.device("cpu"))
    huge = auto_sw_batch_size([4096] * 3, 1, (512, 512, 512), torch.device("cpu"))
    assert 1 <= small <= CPU_WINDOWS_PER_PASS and huge == 1


def test_bpr_backbone_gets_coordinates(tmp_path, prepared):
    from DiffusionSegLib import bpr

    model = bpr.BodyPartRegressor(bpr.BPRConfig(spacing_mm=(3.0, 3.0, 4.0), patch_size_vox=(32, 64, 64)))
    weights = bpr.save_bpr(tmp_path / "bpr.safetensors", model)
    backbone = make_backbone(tmp_path / "with_bpr.safetensors", use_bpr=True, bpr_path=weights)
    inputs = build_inputs(prepared.image, backbone, FeatureConfig())
    assert inputs.num_coords == 3 and inputs.tensor.shape[1] == 5
    assert float(inputs.tensor[0, 1:4].std()) > 0  # coordinates vary over the volume
    features = extract_features(prepared, backbone, FeatureConfig())
    assert features.shape[1] == sum(backbone.feature_channels) and np.isfinite(features.numpy()).all()
    other = bpr.save_bpr(tmp_path / "other.safetensors", bpr.BodyPartRegressor(bpr.BPRConfig(seed=1)))
    torch.manual_seed(1)
    with pytest.raises(UserInputError, match="BPR"):
        build_inputs(prepared.image, backbone, FeatureConfig(), bpr=other)


def test_backbone_finds_its_bpr_by_hash_when_the_default_changes(tmp_path, monkeypatch):
    """A backbone recorded with the default BPR (empty path) keeps it after a new default is shipped: the old
    file is found among the shipped models by its hash."""
    from DiffusionSegLib import bpr

    models = tmp_path / "Resources" / "Models"
    models.mkdir(parents=True)
    monkeypatch.setenv("DIFFUSIONSEG_RESOURCES", str(tmp_path / "Resources"))
    torch.manual_seed(0)
    small = {"spacing_mm": (3.0, 3.0, 4.0), "patch_size_vox": (32, 64, 64)}
    original = bpr.save_bpr(bpr.default_bpr_path(), bpr.BodyPartRegressor(bpr.BPRConfig(**small)))
    backbone = make_backbone(tmp_path / "bb.safetensors", use_bpr=True, bpr_path=original)
    backbone.pretrain.bpr_weights = ""  # recorded as "the shipped default", as the shipped backbone is
    assert backbone_bpr_path(backbone) == original
    original.rename(models / "bpr_old.safetensors")  # a new default replaces it; the old one stays shipped
    bpr.save_bpr(bpr.default_bpr_path(), bpr.BodyPartRegressor(bpr.BPRConfig(**small, seed=1)))
    assert backbone_bpr_path(backbone) == models / "bpr_old.safetensors"
    (models / "bpr_old.safetensors").unlink()
    with pytest.raises(UserInputError, match=backbone.bpr_sha256[:12]):
        backbone_bpr_path(backbone)


def test_extractor_runs_the_folded_backbone_and_follows_weight_updates(tmp_path):
    """In eval mode the extractor runs a copy with the norms folded into the convolutions: the same pyramid as the
    backbone itself, rebuilt when a weight changes in place (as a fine-tuning step changes it)."""
    extractor = FeatureExtractor(make_backbone(tmp_path / "backbone.safetensors"), FeatureConfig(timestep=4))
    model = extractor.model.eval()
    window = torch.rand((2, 2, 32, 64, 64), generator=torch.Generator().manual_seed(0))

    def unfolded() -> list[torch.Tensor]:
        x = extractor.network_input(window)
        with torch.no_grad():
            return model(x, torch.full((2,), 4)).pyramid

    first = extractor(window)
    assert extractor.inference_model() is not model
    for a, b in zip(first, unfolded(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.stem.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    second = extractor(window)
    assert float((second[0] - first[0]).abs().max()) > 1e-3
    for a, b in zip(second, unfolded(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model.train()
    assert extractor.inference_model() is model  # training: batch statistics, nothing folded
