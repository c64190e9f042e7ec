"""Intensity preprocessing: HU windowing and scaling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["scale_hu", "check_window"]


def check_window(window_hu: Sequence[float]) -> tuple[float, float]:
    """Validate an HU window ``(low, high)`` and return it as floats."""
    if len(window_hu) != 2 or not all(np.isfinite(v) for v in window_hu) or window_hu[0] >= window_hu[1]:
        raise ValueError(f"HU window {tuple(window_hu)} is invalid; expected (low, high) with low < high")
    return float(window_hu[0]), float(window_hu[1])


def scale_hu(array, window_hu: Sequence[float]):
    """Clip HU values to ``window_hu`` and scale them linearly to [0, 1].

    Works on numpy arrays and torch tensors alike (returns the same kind, float32).
    """
    low, high = check_window(window_hu)
    if isinstance(array, np.ndarray):
        return ((np.clip(array.astype(np.float32, copy=False), low, high) - low) / (high - low)).astype(np.float32)
    return (array.float().clamp(low, high) - low) / (high - low)
