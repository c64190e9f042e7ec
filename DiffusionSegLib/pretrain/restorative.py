"""Models Genesis-style corruptions for the restorative baseline (Zhou et al., MedIA 2021).

A patch in [0, 1] is corrupted by a random non-linear intensity curve, local voxel shuffling and in- or
out-painting; the backbone learns to restore the original. All randomness comes from the given
``torch.Generator`` so runs are reproducible and resumable.
"""

from __future__ import annotations

import torch

__all__ = ["corrupt", "bezier_intensity", "local_shuffle", "paint"]


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0, size: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def bezier_intensity(patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Map intensities through a random monotonic-or-inverted cubic Bezier curve from (0,0) to (1,1)."""
    p1, p2 = _uniform(generator, size=2), _uniform(generator, size=2)
    t = torch.linspace(0, 1, 256)
    curve_x = 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t**2 * p2[0] + t**3
    curve_y = 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t**2 * p2[1] + t**3
    if _uniform(generator).item() < 0.5:
        curve_y = 1 - curve_y  # inverted curve, as in Models Genesis
    order = torch.argsort(curve_x)
    xs, ys = curve_x[order].to(patch), curve_y[order].to(patch)
    index = torch.searchsorted(xs, patch.clamp(0, 1).contiguous()).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    weight = ((patch - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0, 1)
    return y0 + weight * (y1 - y0)


def local_shuffle(patch: torch.Tensor, generator: torch.Generator, blocks: int = 200, max_block: int = 6) -> torch.Tensor:
    """Shuffle the voxels inside many small random blocks (texture changes, shapes kept)."""
    out = patch.clone()
    depth, height, width = patch.shape[-3:]
    for _ in range(blocks):
        size = [int(torch.randint(1, max(2, min(max_block, n) + 1), (1,), generator=generator)) for n in (depth, height, width)]
        start = [int(torch.randint(0, n - s + 1, (1,), generator=generator)) for n, s in zip((depth, height, width), size, strict=True)]
        region = (..., slice(start[0], start[0] + size[0]), slice(start[1], start[1] + size[1]),
                  slice(start[2], start[2] + size[2]))  # fmt: skip
        block = out[region]
        flat = block.reshape(*block.shape[:-3], -1)
        permutation = torch.randperm(flat.shape[-1], generator=generator)
        out[region] = flat[..., permutation].reshape(block.shape)
    return out


def paint(patch: torch.Tensor, generator: torch.Generator, outpaint: bool) -> torch.Tensor:
    """In-painting (random boxes replaced by noise) or out-painting (all but one box replaced by noise)."""
    shape = patch.shape[-3:]
    noise = torch.rand(patch.shape, generator=generator).to(patch)
    mask = torch.zeros(shape, dtype=torch.bool)
    boxes = 1 if outpaint else int(torch.randint(1, 6, (1,), generator=generator))
    for _ in range(boxes):
        low, high = (0.3, 0.7) if outpaint else (0.1, 0.3)
        size = [max(1, int(n * _uniform(generator, low, high).item())) for n in shape]
        start = [int(torch.randint(0, n - s + 1, (1,), generator=generator)) for n, s in zip(shape, size, strict=True)]
        mask[start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]] = True
    mask = mask.to(patch.device)
    return torch.where(mask, noise, patch) if not outpaint else torch.where(mask, patch, noise)


def corrupt(batch: torch.Tensor, generator: torch.Generator, *, intensity_probability: float = 0.9,
            shuffle_probability: float = 0.5, paint_probability: float = 0.9,
            outpaint_fraction: float = 0.5) -> torch.Tensor:  # fmt: skip
    """Corrupt each patch of a batch ``(B, C, D, H, W)`` in [0, 1] independently (Models Genesis recipe)."""
    out = []
    for patch in batch:
        corrupted = patch
        if _uniform(generator).item() < intensity_probability:
            corrupted = bezier_intensity(corrupted, generator)
        if _uniform(generator).item() < shuffle_probability:
            corrupted = local_shuffle(corrupted, generator)
        if _uniform(generator).item() < paint_probability:
            corrupted = paint(corrupted, generator, outpaint=_uniform(generator).item() < outpaint_fraction)
        out.append(corrupted)
    return torch.stack(out)
