from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.nets import UNet3d, UNet3dConfig, UNet3dOutput



CASES = [
    # options, input spatial size
    ({"in_channels": 4, "out_channels": 1, "base_channels": 4, "num_scales": 3, "num_res_blocks": 1}, (8, 16, 12)),
    ({"in_channels": 1, "out_channels": 2, "base_channels": 6, "num_scales": 4, "max_channels": 16,
      "num_res_blocks": 2, "norm": "group", "act": "silu"}, (8, 16, 24)),  # fmt: skip
    ({"in_channels": 2, "out_channels": 3, "base_channels": 5, "num_scales": 2, "channel_multiplier": 3,
      "norm": "instance", "time_conditioning": False}, (2, 6, 4)),  # fmt: skip
    ({"in_channels": 1, "out_channels": 1, "base_channels": 4, "num_scales": 1, "norm": "none"}, (3, 5, 7)),
]


def _input(channels: int, spatial: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, *spatial, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("options", "spatial"), CASES)
def test_prediction_and_pyramid_shapes(options, spatial):
    net = UNet3d(**options)
    cfg = net.config
    expected_channels = [min(cfg.base_channels * cfg.channel_multiplier**level, cfg.max_channels)
                         for level in range(cfg.num_scales)]  # fmt: skip
    assert net.feature_channels == expected_channels == cfg.feature_channels
    out = net(_input(cfg.in_channels, spatial), torch.tensor([0, 5]))
    assert isinstance(out, UNet3dOutput)
    assert out.prediction.shape == (2, cfg.out_channels, *spatial)
    assert len(out.pyramid) == cfg.num_scales
    for level, (feature, channels) in enumerate(zip(out.pyramid, expected_channels, strict=True)):
        assert feature.shape == (2, channels, *(s // 2**level for s in spatial)), level
    assert all(torch.isfinite(p).all() for p in [out.prediction, *out.pyramid])


def test_channel_cap_and_multiplier():
    cfg = UNet3dConfig(base_channels=16, num_scales=6, max_channels=256)
    assert cfg.feature_channels == [16, 32, 64, 128, 256, 256]
    vox2vec = UNet3dConfig(base_channels=16, num_scales=6, max_channels=512)
    assert vox2vec.feature_channels == [16, 32, 64, 128, 256, 512] and sum(vox2vec.feature_channels) == 1008


@pytest.mark.parametrize("spatial", [(8, 16, 10), (12, 16, 16), (16, 6, 16)])
def test_spatial_size_not_divisible_is_refused_with_the_reason(spatial):
    net = UNet3d(in_channels=1, base_channels=4, num_scales=4)  # needs multiples of 8
    with pytest.raises(ValueError, match=r"not divisible by 8 .*num_scales=4") as info:
        net(_input(1, spatial), 0)
    assert str(spatial) in str(info.value)


def test_bad_inputs_and_options_are_refused():
    net = UNet3d(in_channels=4, base_channels=4, num_scales=2)
    with pytest.raises(ValueError, match=r"shape \(B, 4, D, H, W\)"):
        net(_input(3, (4, 4, 4)), 0)
    with pytest.raises(ValueError, match="pass t"):
        net(_input(4, (4, 4, 4)))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(2,\)"):
        net(_input(4, (4, 4, 4)), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="norm 'layer' is unknown"):
        UNet3d(norm="layer")
    with pytest.raises(ValueError, match="base_channels 0"):
        UNet3d(base_channels=0)
    with pytest.raises(ValueError, match="max_channels 8 is below base_channels 16"):
        UNet3d(max_channels=8)
    with pytest.raises(ValueError, match="not both"):
        UNet3d(UNet3dConfig(), base_channels=4)


def test_time_conditioning_changes_every_level_of_the_output():
    torch.manual_seed(0)
    net = UNet3d(in_channels=2, base_channels=4, num_scales=3, num_res_blocks=1).eval()
    x = _input(2, (8, 8, 8))
    with torch.no_grad():
        early, late = net(x, torch.tensor([0, 0])), net(x, torch.tensor([9, 9]))
        again = net(x, torch.tensor([0, 0]))
    torch.testing.assert_close(early.prediction, again.prediction)
    assert (early.prediction - late.prediction).abs().max() > 1e-3
    for a, b in zip(early.pyramid, late.pyramid, strict=True):
        assert (a - b).abs().max() > 1e-4
    # a scalar t is broadcast to the batch
    with torch.no_grad():
        torch.testing.assert_close(net(x, 9).prediction, late.prediction)


def test_without_time_conditioning_t_is_ignored_and_no_embedding_exists():
    torch.manual_seed(0)
    net = UNet3d(in_channels=1, base_channels=4, num_scales=3, time_conditioning=False).eval()
    assert net.time_embed is None
    assert not any("emb" in name for name, _ in net.named_parameters())
    x = _input(1, (8, 8, 8))
    with torch.no_grad():
        reference = net(x).prediction
        torch.testing.assert_close(net(x, torch.tensor([0, 3])).prediction, reference)
        torch.testing.assert_close(net(x, 7).prediction, reference)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    net = UNet3d(in_channels=4, base_channels=4, num_scales=3, num_res_blocks=2, norm="group")
    out = net(_input(4, (8, 8, 8)), torch.tensor([1, 4]))
    (out.prediction.square().mean() + sum(p.mean() for p in out.pyramid)).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_channels_last_3d_gives_the_same_result_and_keeps_the_layout():
    torch.manual_seed(0)
    net = UNet3d(in_channels=4, base_channels=8, num_scales=3).eval()
    x = _input(4, (8, 16, 16))
    with torch.no_grad():
        reference = net(x, 3)
        net = net.to(memory_format=torch.channels_last_3d)
        out = net(x.to(memory_format=torch.channels_last_3d), 3)
    torch.testing.assert_close(out.prediction, reference.prediction, atol=1e-4, rtol=1e-4)
    for a, b in zip(out.pyramid, reference.pyramid, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert out.pyramid[0].is_contiguous(memory_format=torch.channels_last_3d)


def test_bfloat16_autocast_runs_and_stays_close_to_float32():
    torch.manual_seed(0)
    net = UNet3d(in_channels=4, base_channels=4, num_scales=2, num_res_blocks=1).eval()
    x = _input(4, (4, 8, 8))
    with torch.no_grad():
        reference = net(x, 2).prediction
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, 2).prediction
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max() + 1e-2


def test_rebuilt_from_its_config_dict_loads_the_weights():
    net = UNet3d(in_channels=2, base_channels=4, num_scales=3, norm="group", time_conditioning=False)
    clone = UNet3d.from_config(net.config.to_dict())
    clone.load_state_dict(net.state_dict(), strict=True)
    x = _input(2, (4, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x).prediction, net.eval()(x).prediction)


def _with_running_statistics(net: UNet3d) -> UNet3d:
    """A network whose batch norms hold non-trivial running statistics and affine parameters (as after training)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return net.eval()


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_folded_network_gives_the_same_pyramid_at_its_timestep(time_conditioning):
    torch.manual_seed(0)
    net = _with_running_statistics(UNet3d(in_channels=4, base_channels=6, num_scales=3, num_res_blocks=2,
                                          time_conditioning=time_conditioning))  # fmt: skip
    x = _input(4, (8, 16, 12))
    with torch.no_grad():
        reference = net(x, 5)
        folded = net.folded_for_inference(5 if time_conditioning else None)
        out = folded(x, 5, prediction=False)
        other_step = net(x, 1)
    assert out.prediction is None
    for a, b in zip(out.pyramid, reference.pyramid, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if time_conditioning:  # the timestep is folded in: another step's pyramid differs
        assert (other_step.pyramid[0] - reference.pyramid[0]).abs().max() > 1e-3
    norms = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(norms) < len([m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)])
    assert all(not p.requires_grad for p in folded.parameters())
    assert any(p.requires_grad for p in net.parameters())  # the original is untouched


def test_folding_refuses_training_mode_and_leaves_other_norms_alone():
    net = UNet3d(in_channels=1, base_channels=4, num_scales=2, norm="group")
    with pytest.raises(ValueError, match="eval"):
        net.folded_for_inference(0)
    x = _input(1, (4, 8, 8))
    with torch.no_grad():
        reference = net.eval()(x, 2)
        folded = net.folded_for_inference(2)
        out = folded(x, 2)
    torch.testing.assert_close(out.prediction, reference.prediction)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in folded.modules()) == \
        sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())  # fmt: skip
