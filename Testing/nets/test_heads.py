from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.nets import LinearProbeHead, NonLinearProbeHead, PointwiseConv3d, UNet3d, upsample_and_concat



CHANNELS = [4, 8, 12]
SPATIAL = (8, 12, 16)


def _pyramid(seed: int, batch: int = 2, channels: list[int] = CHANNELS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, *(s // 2**level for s in SPATIAL), generator=generator)
            for level, c in enumerate(channels)]  # fmt: skip


@pytest.mark.parametrize("upsample", ["nearest", "trilinear"])
@pytest.mark.parametrize("head_class", [LinearProbeHead, NonLinearProbeHead])
def test_heads_give_logits_at_the_finest_resolution(head_class, upsample):
    head = head_class(CHANNELS, num_classes=5, upsample=upsample)
    assert head(_pyramid(0)).shape == (2, 5, *SPATIAL)


def test_heads_take_a_real_backbone_pyramid():
    net = UNet3d(in_channels=4, base_channels=4, num_scales=3, num_res_blocks=1)
    with torch.no_grad():  # frozen backbone
        pyramid = net(torch.randn(1, 4, 8, 8, 16), 3).pyramid
    for head in (LinearProbeHead(net.feature_channels, 14), NonLinearProbeHead(net.feature_channels, 14, hidden=8)):
        logits = head(pyramid)
        assert logits.shape == (1, 14, 8, 8, 16)
        logits.mean().backward()
        assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("upsample", ["nearest", "trilinear"])
def test_linear_head_is_affine(upsample):
    torch.manual_seed(0)
    head = LinearProbeHead(CHANNELS, num_classes=3, upsample=upsample)
    a, b = _pyramid(1), _pyramid(2)
    zero = [torch.zeros_like(level) for level in a]
    with torch.no_grad():
        total = head([x + y for x, y in zip(a, b, strict=True)])
        torch.testing.assert_close(total, head(a) + head(b) - head(zero), atol=1e-5, rtol=1e-5)


def test_non_linear_head_is_not_affine():
    torch.manual_seed(0)
    head = NonLinearProbeHead(CHANNELS, num_classes=3, hidden=8).eval()
    a, b = _pyramid(1), _pyramid(2)
    zero = [torch.zeros_like(level) for level in a]
    with torch.no_grad():
        total = head([x + y for x, y in zip(a, b, strict=True)])
        assert (total - (head(a) + head(b) - head(zero))).abs().max() > 1e-3


@pytest.mark.parametrize("upsample", ["nearest", "trilinear"])
def test_linear_head_equals_a_linear_map_on_the_concatenated_feature(upsample):
    torch.manual_seed(0)
    head = LinearProbeHead(CHANNELS, num_classes=3, upsample=upsample)
    pyramid = _pyramid(3)
    feature = upsample_and_concat(pyramid, mode=upsample)
    assert feature.shape == (2, sum(CHANNELS), *SPATIAL)
    weight = torch.cat([conv.weight for conv in head.convs], dim=1)  # (classes, sum C, 1, 1, 1)
    with torch.no_grad():
        expected = torch.nn.functional.conv3d(feature, weight, head.convs[0].bias)
        torch.testing.assert_close(head(pyramid), expected, atol=1e-5, rtol=1e-5)


def test_mismatched_pyramids_are_refused():
    head = LinearProbeHead(CHANNELS, num_classes=2)
    with pytest.raises(ValueError, match=r"pyramid channels \[4, 8\] do not match the head's \[4, 8, 12\]"):
        head(_pyramid(0, channels=[4, 8]))
    with pytest.raises(ValueError, match="empty"):
        upsample_and_concat([])
    with pytest.raises(ValueError, match="upsample 'cubic' is unknown"):
        NonLinearProbeHead(CHANNELS, 2, upsample="cubic")


def test_pointwise_conv_matches_conv3d_in_both_layouts():
    torch.manual_seed(0)
    conv = PointwiseConv3d(6, 3)
    reference = torch.nn.Conv3d(6, 3, kernel_size=1)
    reference.load_state_dict(conv.state_dict())  # same parameters and keys as nn.Conv3d
    x = torch.randn(2, 6, 4, 5, 3)
    x_last = x.to(memory_format=torch.channels_last_3d).requires_grad_(True)
    out = conv(x_last)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv(x), reference(x), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_class", [LinearProbeHead, NonLinearProbeHead])
def test_heads_give_the_same_logits_on_channels_last_features(head_class):
    torch.manual_seed(0)
    head = head_class(CHANNELS, num_classes=4).eval()
    pyramid = _pyramid(5)
    with torch.no_grad():
        reference = head(pyramid)
        logits = head([p.to(memory_format=torch.channels_last_3d) for p in pyramid])
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
