"""Timestep embedding: sinusoidal features of the diffusion step followed by a small MLP.

The sinusoid is the Transformer positional encoding (Vaswani et al. 2017, section 3.5) as used for the diffusion
step by DDPM (Ho et al. 2020, appendix B). Timesteps are the scheduler's integer indices ``0 .. T - 1`` (floats are
accepted too); no rescaling to ``[0, 1000]`` is done, so a backbone trained with ``T = 10`` sees ``t`` in ``0..9``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["timestep_embedding", "TimestepEmbedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
        t: timesteps, shape (B,), any real dtype.
        dim: embedding size (even or odd; an odd size is zero-padded by one).
        max_period: longest period of the sinusoids. Default 10000.

    Returns:
        (B, dim) float32 tensor ``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period^(-k / (dim // 2))``.

    Raises:
        ValueError: if ``t`` is not one-dimensional or ``dim < 2``.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"embedding dim {dim} must be at least 2")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = nn.functional.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep features mapped by ``Linear -> SiLU -> Linear`` to a conditioning vector.

    Args:
        embed_dim: size of the output vector, shared by every residual block of the backbone.
        sinusoid_dim: size of the sinusoidal features. Default: ``embed_dim``.
    """

    def __init__(self, embed_dim: int, sinusoid_dim: int | None = None) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim {embed_dim} must be positive")
        self.sinusoid_dim = int(sinusoid_dim or embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.sinusoid_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps.

        Args:
            t: (B,) timesteps.

        Returns:
            (B, embed_dim) conditioning vectors.
        """
        return self.mlp(timestep_embedding(t, self.sinusoid_dim))
