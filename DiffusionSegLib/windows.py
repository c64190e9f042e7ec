"""Sliding-window inference over a whole volume, as MONAI's ``sliding_window_inference`` does it, without MONAI.

``import monai`` imports every MONAI subpackage (``monai/__init__.py`` loads them all, and their optional imports
pull in matplotlib and pandas): 2.5 s on 2 CPU cores, a third of what a command-line ``segment`` of a full CT may
take. The segmentation path (the BPR, the backbone's windows, fine-tuning's validation and self-labeling) uses one
case of that function: one volume, windows stitched at their own resolution, "gaussian" or "constant" blending,
constant padding of a volume smaller than the window. This module computes that case the way MONAI 1.x does:
the same windows in the same order (``dense_patch_slices``), the same importance map (``compute_importance_map``),
the same accumulation and normalisation; ``Testing/features/test_windows.py`` checks it against MONAI's.
Training and evaluation still use MONAI (losses, transforms, metrics), where its import cost does not matter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["BLEND_MODES", "window_slices", "importance_map", "sliding_window_inference"]

BLEND_MODES = ("gaussian", "constant")


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows (one slice per spatial axis) covering ``image_size``, first axis slowest: steps of
    ``int(roi * (1 - overlap))`` (at least 1; the whole axis where the window spans it), the last window of an
    axis moved back to end at the border. ``roi_size`` must not exceed ``image_size``."""
    starts = []
    for size, roi in zip(image_size, roi_size, strict=True):
        interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
        count = next((d for d in range(math.ceil(size / interval)) if d * interval + roi >= size), 0) + 1
        starts.append([i * interval - max(i * interval + roi - size, 0) for i in range(count)])
    grids = torch.meshgrid(*(torch.tensor(s) for s in starts), indexing="ij")
    corners = torch.stack([g.flatten() for g in grids], 1).tolist()
    return [tuple(slice(s, s + r) for s, r in zip(corner, roi_size, strict=True)) for corner in corners]


def importance_map(roi_size: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """A window's blending weights ``roi_size``: ones ("constant"), or a separable Gaussian of sigma
    ``sigma_scale`` x the window size per axis, centred, clamped below at its smallest value or 1e-3
    ("gaussian")."""
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode {mode!r} is unknown; expected one of {list(BLEND_MODES)}")
    if mode == "constant":
        weights = torch.ones(tuple(roi_size), device=device, dtype=torch.float)
    else:
        weights = None
        for axis, size in enumerate(roi_size):
            x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float, device=device)
            x = torch.exp(x**2 / (-2 * (size * sigma_scale) ** 2))
            weights = x if weights is None else weights.unsqueeze(-1) * x[(None,) * axis]
    floor = max(torch.min(weights).item(), 1e-3)
    return torch.clamp_(weights.to(torch.float), min=floor).to(dtype)


def sliding_window_inference(inputs: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int,
                             predictor: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]], *,
                             overlap: float = 0.25, mode: str = "gaussian", cval: float = 0.0,
                             sw_device: torch.device | str | None = None, device: torch.device | str | None = None,
                             progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:  # fmt: skip
    """Run ``predictor`` over windows of one volume and blend the window outputs into whole-volume maps.

    Args:
        inputs: (1, C, *spatial) volume.
        roi_size: the window size, one per spatial axis.
        sw_batch_size: windows per ``predictor`` call.
        predictor: maps (B, C, *roi_size) windows to (B, K, *roi_size) outputs, or a tuple of such outputs.
        overlap: fraction of a window shared with the next, in [0, 1).
        mode: "gaussian" (window centres count most) or "constant" blending.
        cval: value of the padding of a volume smaller than the window along an axis.
        sw_device: where the windows go (default: ``inputs``' device); ``device``: where the maps are stitched.
        progress: show a tqdm progress bar.

    Returns:
        (1, K, *spatial) maps in ``inputs``' dtype on ``device``, a tuple of them when the predictor returns a tuple.

    Raises:
        ValueError: on an input that is not one volume of ``len(roi_size)`` spatial axes, or a bad overlap or mode.
    """
    spatial = tuple(inputs.shape[2:])
    if inputs.shape[0] != 1 or len(spatial) != len(roi_size):
        raise ValueError(f"inputs {tuple(inputs.shape)} must be one volume (1, C, ...) with {len(roi_size)} "
                         "spatial axes")  # fmt: skip
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap} is invalid; expected a value in [0, 1)")
    dtype = inputs.dtype
    device = torch.device(device) if device is not None else inputs.device
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    roi_size = tuple(int(r) for r in roi_size)
    pad = []  # F.pad order: last axis first, (before, after)
    for size, roi in zip(reversed(spatial), reversed(roi_size), strict=True):
        missing = max(roi - size, 0)
        pad += [missing // 2, missing - missing // 2]
    if any(pad):
        inputs = F.pad(inputs, pad=pad, mode="constant", value=cval)
    image_size = tuple(inputs.shape[2:])
    slices = window_slices(image_size, roi_size, overlap)
    weights = importance_map(roi_size, mode, device=sw_device, dtype=dtype)[None, None]
    outputs: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    tuple_output = False
    batches = range(0, len(slices), sw_batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches)
    for first in batches:
        batch = slices[first : first + sw_batch_size]
        windows = torch.cat([inputs[(slice(0, 1), slice(None), *s)] for s in batch]).to(sw_device)
        result = predictor(windows)
        tuple_output = isinstance(result, (tuple, list))
        for index, part in enumerate(result if tuple_output else (result,)):
            if len(outputs) <= index:
                outputs.append(torch.zeros((1, part.shape[1], *image_size), dtype=dtype, device=device))
                count = torch.zeros((1, 1, *image_size), dtype=dtype, device=device)
                on_device = weights.to(device)
                for s in slices:
                    count[(slice(None), slice(None), *s)] += on_device
                counts.append(count)
            part *= weights
            part = part.to(device)
            for s, window in zip(batch, part, strict=True):
                outputs[index][(slice(None), slice(None), *s)] += window
    for output, count in zip(outputs, counts, strict=True):
        output /= count
    if any(pad):
        crop = tuple(slice(pad[2 * k], pad[2 * k] + n) for k, n in enumerate(reversed(spatial)))[::-1]
        outputs = [o[(slice(None), slice(None), *crop)] for o in outputs]
    outputs = [o.to(dtype) for o in outputs]
    return tuple(outputs) if tuple_output else outputs[0]
