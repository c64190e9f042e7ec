from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.diffusion import NoiseScheduler, diffusion_loss
from DiffusionSegLib.nets import UNet3d



SPATIAL = (16, 16, 16)


def _smooth_batch(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """CT-like smooth volumes in [0, 1], (B, 1, D, H, W)."""
    x = torch.randn(batch, 1, *SPATIAL, generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    return (x - x.amin()) / (x.amax() - x.amin())


def _coordinates(batch: int = 2) -> torch.Tensor:
    """Stand-in for the BPR map: three linear ramps, (B, 3, D, H, W)."""
    axes = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in SPATIAL), indexing="ij")
    return torch.stack(axes)[None].repeat(batch, 1, 1, 1, 1)


class _Spy(torch.nn.Module):
    """Records its inputs and returns a fixed function of them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x, t))
        return x[:, :1] * 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_loss_decreases_when_training_on_a_fixed_batch(prediction_type):
    torch.manual_seed(0)
    model = UNet3d(in_channels=4, out_channels=1, base_channels=4, num_scales=3, num_res_blocks=1)
    scheduler = NoiseScheduler(num_timesteps=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0, coords = _smooth_batch(), _coordinates()
    t = torch.tensor([2, 7])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = diffusion_loss(model, x0, coords, scheduler, prediction_type, timesteps=t, noise=noise).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_network_input_is_noised_patch_then_condition_and_target_follows_the_type():
    scheduler = NoiseScheduler(num_timesteps=10)
    x0, coords = _smooth_batch(), _coordinates()
    spy = _Spy()
    out = diffusion_loss(spy, x0, coords, scheduler, "epsilon", generator=torch.Generator().manual_seed(4))
    x_in, t = spy.calls[0]
    assert x_in.shape == (2, 4, *SPATIAL)
    torch.testing.assert_close(x_in[:, :1], scheduler.add_noise(x0, out.noise, out.timesteps))
    torch.testing.assert_close(x_in[:, 1:], coords)
    assert torch.equal(t, out.timesteps) and out.timesteps.shape == (2,)
    assert torch.equal(out.target, out.noise)
    torch.testing.assert_close(out.loss, torch.mean((out.x_t * 0.5 - out.noise) ** 2))
    sample = diffusion_loss(spy, x0, coords, scheduler, "sample", timesteps=out.timesteps, noise=out.noise)
    assert torch.equal(sample.target, x0)
    torch.testing.assert_close(sample.loss, torch.mean((out.x_t * 0.5 - x0) ** 2))


def test_without_condition_the_input_is_x_t_alone():
    spy = _Spy()
    out = diffusion_loss(spy, _smooth_batch(), None, NoiseScheduler(num_timesteps=10))
    assert torch.equal(spy.calls[0][0], out.x_t)


def test_same_generator_seed_gives_the_same_loss():
    model = UNet3d(in_channels=4, base_channels=4, num_scales=2, num_res_blocks=1).eval()
    scheduler = NoiseScheduler(num_timesteps=10)
    x0, coords = _smooth_batch(), _coordinates()
    first, second, other = (
        diffusion_loss(model, x0, coords, scheduler, generator=torch.Generator().manual_seed(seed)).loss
        for seed in (5, 5, 6)
    )
    assert first == second and first != other


def test_bad_arguments_are_refused():
    scheduler = NoiseScheduler(num_timesteps=10)
    x0, coords = _smooth_batch(), _coordinates()
    with pytest.raises(ValueError, match=r"prediction_type 'v' is unknown"):
        diffusion_loss(_Spy(), x0, coords, scheduler, "v")
    with pytest.raises(ValueError, match=r"condition shape \(2, 3, 8, 16, 16\) does not fit"):
        diffusion_loss(_Spy(), x0, coords[:, :, :8], scheduler)
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, C, D, H, W\)"):
        diffusion_loss(_Spy(), x0[0], None, scheduler)
    with pytest.raises(ValueError, match="model prediction shape"):
        diffusion_loss(lambda x, t: x, x0, coords, scheduler)
