"""Training crops of cached feature pyramids: every level and the class map cut at the same physical place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DiffusionSegLib.probe import ProbeConfig
from DiffusionSegLib.probe.train import _Cache


def _cache_with_positions(shape=(16, 32, 32), levels=3) -> _Cache:
    """One cached patch whose features and classes hold the finest-grid (z, y, x) index of each cell."""
    cache = _Cache()
    grids = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    pyramid = []
    for level in range(levels):
        s = 2**level
        pyramid.append(torch.stack([g[::s, ::s, ::s] for g in grids])[None].to(torch.float16))
    cache.pyramids.append(pyramid)
    cache.classes.append((grids[0] * 1000 + grids[1] * 10 + grids[2] % 10)[None, None])
    return cache


def test_crops_cut_every_level_and_the_labels_at_the_same_place():
    cache = _cache_with_positions()
    rng = np.random.default_rng(0)
    origins = set()
    for _ in range(20):
        pyramid, classes = cache.batch([0, 0], torch.device("cpu"), crop=(8, 8, 16), rng=rng)
        assert classes.shape == (2, 1, 8, 8, 16)
        for b in range(2):
            z0, y0, x0 = (int(pyramid[0][b, axis, 0, 0, 0]) for axis in range(3))
            origins.add((z0, y0, x0))
            assert z0 % 4 == 0 and y0 % 4 == 0 and x0 % 4 == 0  # on the coarsest level's grid
            assert int(classes[b, 0, 0, 0, 0]) == z0 * 1000 + y0 * 10 + x0 % 10
            for level, features in enumerate(pyramid):
                s = 2**level
                assert features.shape[2:] == (8 // s, 8 // s, 16 // s)
                expected = torch.tensor([z0, y0, x0]).view(3, 1, 1, 1) + s * torch.stack(
                    torch.meshgrid(*(torch.arange(n) for n in features.shape[2:]), indexing="ij"))
                assert torch.equal(features[b].long(), expected)
    assert len(origins) > 5  # crops move around


def test_whole_patches_without_a_crop():
    cache = _cache_with_positions()
    pyramid, classes = cache.batch([0], torch.device("cpu"))
    assert classes.shape == (1, 1, 16, 32, 32) and pyramid[2].shape == (1, 3, 4, 8, 8)


def test_crop_is_clipped_to_the_patch_and_checked():
    assert ProbeConfig(patch_size_vox=(16, 16, 16), train_crop_vox=(16, 32, 32)).train_crop == (16, 16, 16)
    assert ProbeConfig(train_crop_vox=None).train_crop is None
    with pytest.raises(ValueError, match="train_crop_vox"):
        ProbeConfig(train_crop_vox=(0, 32, 32))
