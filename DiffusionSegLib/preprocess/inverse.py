"""Working grid → input grid without a full-resolution float volume per class.

The working grid is axis-aligned LPS; an input grid that is not oblique differs from it by a permutation and
flips of its axes, a scale and a shift. Then the linear interpolation ``sitk.Resample`` does is separable: along
each input array axis, an input index reads two working indices ``i0``, ``i1`` with weight ``w``
(:class:`AxisMap`), and an input voxel's value is the trilinear blend of the 8 working voxels of its stencil.

That makes the label map of the running argmax (:func:`argmax_on_input_grid`) cheap and exact: where the 8 working
voxels of a stencil share one argmax class ``c``, every class's blend is a convex combination of values below
``c``'s at the same voxels, so ``c`` wins the blend too. Only stencils that straddle a label border (a thin band
near organ surfaces) are blended, class by class, for those input voxels alone; every other voxel is read off the
working-grid labels by index, as nearest-neighbour upsampling does.

Oblique inputs (a rotated direction) are not separable: :func:`axis_maps` returns None and callers resample
through physical space (``to_input_grid``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = ["AxisMap", "axis_maps", "argmax_on_input_grid"]

_BAND_CHUNK = 1 << 20
"""Band voxels blended at once (bounds the temporary (chunk, classes) arrays to tens of MB)."""
_SLAB_VOXELS = 1 << 22
"""Input voxels labelled at once (slabs of input slices): the temporaries stay a few tens of MB whatever the size
of the input."""


@dataclass
class AxisMap:
    """How one input array axis reads the working grid (``sitk.Resample``'s linear interpolation).

    Attributes:
        working_axis: the working array axis (0 z, 1 y, 2 x) this input array axis runs along.
        i0, i1: per input index, the two working indices of the stencil (clamped to the grid, as ITK does).
        weight: per input index, the weight of ``i1`` (``1 - weight`` of ``i0``).
        inside: per input index, whether it lies within the working grid's extent (half a voxel beyond the
            first and last voxel centres); voxels outside take the default value.
    """

    working_axis: int
    i0: np.ndarray
    i1: np.ndarray
    weight: np.ndarray
    inside: np.ndarray


def axis_maps(working: sitk.Image, input_grid: sitk.Image) -> list[AxisMap] | None:
    """Per input array axis (z, y, x), its :class:`AxisMap` onto ``working``; None when the grids are not
    separable (either direction oblique, i.e. not a signed permutation of the other)."""
    d_in = np.asarray(input_grid.GetDirection(), dtype=np.float64).reshape(3, 3)
    d_w = np.asarray(working.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(d_w, np.eye(3), atol=1e-6):
        return None
    signs = np.rint(d_in)
    if not np.allclose(d_in, signs, atol=1e-6) or not np.array_equal(np.abs(signs).sum(0), np.ones(3)) \
            or not np.array_equal(np.abs(signs).sum(1), np.ones(3)):  # fmt: skip
        return None
    o_in, s_in = np.asarray(input_grid.GetOrigin(), float), np.asarray(input_grid.GetSpacing(), float)
    o_w, s_w = np.asarray(working.GetOrigin(), float), np.asarray(working.GetSpacing(), float)
    size_in, size_w = input_grid.GetSize(), working.GetSize()
    maps = []
    for array_axis in range(3):
        b = 2 - array_axis  # ITK index axis of this input array axis
        a = int(np.flatnonzero(signs[:, b])[0])  # physical (and working ITK index) axis it runs along
        index = np.arange(size_in[b], dtype=np.float64)
        u = (o_in[a] + d_in[a, b] * s_in[b] * index - o_w[a]) / s_w[a]  # continuous working index
        n = size_w[a]
        inside = (u >= -0.5) & (u < n - 0.5)
        clamped = np.clip(u, 0.0, n - 1)
        i0 = np.floor(clamped).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        weight = np.where(i1 > i0, clamped - i0, 0.0)
        maps.append(AxisMap(2 - a, i0, i1, weight, inside))
    return maps


def _gather(table: np.ndarray, maps: list[AxisMap], index: list[np.ndarray]) -> np.ndarray:
    """``table`` (on the working array's axes) read at per-input-axis indices: the input-grid array, built one
    axis at a time with ``np.take`` (the last step writes the full-size result once)."""
    order = [m.working_axis for m in maps]
    out = table.transpose(order)
    for axis, idx in enumerate(index):
        out = np.take(out, idx, axis=axis)
    return out


def argmax_on_input_grid(probabilities: np.ndarray, working: sitk.Image, input_grid: sitk.Image,
                         maps: list[AxisMap] | None = None) -> np.ndarray | None:  # fmt: skip
    """The class index of every input voxel that a per-class linear resampling onto ``input_grid`` followed by a
    running argmax gives (class 0 reads 1 and the others 0 outside the working grid; ties go to the lower class).

    Args:
        probabilities: (C, D, H, W) float class probabilities on ``working``'s grid (C <= 255).
        working: the working grid; ``input_grid``: the grid of the result.
        maps: :func:`axis_maps` of the two grids, if already computed.

    Returns:
        (z, y, x) uint8 class indices on ``input_grid``, or None when the grids are not separable.
    """
    maps = maps if maps is not None else axis_maps(working, input_grid)
    if maps is None:
        return None
    num_classes = probabilities.shape[0]
    if num_classes > 255:
        raise ValueError(f"{num_classes} classes do not fit the uint8 class map")
    labels = probabilities.argmax(0).astype(np.int16)  # first maximum: ties go to the lower class
    # a cell (i, j, k) is the stencil i..i+1, j..j+1, k..k+1 (the last cell of an axis repeats its last voxel):
    # its label where all 8 voxels agree, -1 where they do not; one more cell per axis (0) for "outside"
    padded = np.pad(labels, [(0, 1)] * 3, mode="edge")
    cells = np.full(tuple(s + 1 for s in labels.shape), 0, dtype=np.int16)
    core = padded[:-1, :-1, :-1]
    mixed = np.zeros(labels.shape, dtype=bool)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if dz or dy or dx:
                    mixed |= padded[dz : dz + labels.shape[0], dy : dy + labels.shape[1],
                                    dx : dx + labels.shape[2]] != core  # fmt: skip
    cells[:-1, :-1, :-1] = np.where(mixed, -1, core)
    del padded, core, mixed
    cell_index = [np.where(m.inside, m.i0, labels.shape[m.working_axis]) for m in maps]
    flat = np.ascontiguousarray(np.moveaxis(probabilities, 0, -1), dtype=np.float32).reshape(-1, num_classes)
    shape = tuple(index.size for index in cell_index)
    classes = np.empty(shape, dtype=np.uint8)
    step = max(1, _SLAB_VOXELS // max(1, shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        part = _gather(cells, maps, [cell_index[0][start : start + step], *cell_index[1:]])
        band = np.unravel_index(np.flatnonzero(part < 0), part.shape)  # (3x faster than np.nonzero in 3D)
        if band[0].size:
            part[band] = _blend_argmax(flat, probabilities.shape[1:], maps, (band[0] + start, *band[1:]))
        classes[start : start + step] = part
    return classes


def _blend_argmax(flat: np.ndarray, shape: tuple[int, ...], maps: list[AxisMap],
                  band: tuple[np.ndarray, ...]) -> np.ndarray:  # fmt: skip
    """Argmax of the trilinear blend of the classes at the input voxels ``band`` (all inside the working grid).

    A blend is a convex combination of its 8 stencil voxels, so class ``k`` cannot win where its largest value
    over the stencil is below the smallest value some other class takes over it: per stencil only the classes
    that pass this bound are blended (mostly two, the classes either side of the border).

    Args:
        flat: the probabilities class-last, ``(D * H * W, C)``; ``shape``: (D, H, W).
        maps: the input axes' :class:`AxisMap`; ``band``: input array indices of the voxels.
    """
    num_classes = flat.shape[1]
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    # per band voxel, per input array axis: working offsets of i0 and i1 and the weight of i1
    axes = []
    for m, idx in zip(maps, band, strict=True):
        stride = strides[m.working_axis]
        axes.append((m.i0[idx] * stride, m.i1[idx] * stride, m.weight[idx].astype(np.float32)))
    corner_offsets = [a[0] + b[0] + c[0] for a in ((axes[0][0],), (axes[0][1],)) for b in ((axes[1][0],), (axes[1][1],))
                      for c in ((axes[2][0],), (axes[2][1],))]  # fmt: skip
    corner_weights = [a * b * c for a in (1.0 - axes[0][2], axes[0][2]) for b in (1.0 - axes[1][2], axes[1][2])
                      for c in (1.0 - axes[2][2], axes[2][2])]  # fmt: skip
    # candidate classes per stencil (stencils named by their first corner)
    # (numbered in the order of their first corner's offset, through a table over the working grid: no sort)
    seen = np.full(int(np.prod(shape)), -1, dtype=np.int64)
    seen[corner_offsets[0]] = np.arange(corner_offsets[0].size)  # one band voxel per stencil, to read its corners
    used = seen >= 0
    rank = np.cumsum(used) - 1
    first = seen[used]
    inverse = rank[corner_offsets[0]]
    del seen, used, rank
    values = np.stack([flat[offsets[first]] for offsets in corner_offsets])  # (8, stencils, classes)
    candidates = values.max(0) >= values.min(0).max(1, keepdims=True)
    del values
    count = candidates.sum(1)[inverse]
    low = candidates.argmax(1)[inverse]  # the lowest candidate class
    high = (num_classes - 1 - candidates[:, ::-1].argmax(1))[inverse]  # the highest
    result = low.astype(np.int16)
    pair = np.flatnonzero(count == 2)
    if pair.size:
        low_pair, high_pair, classes_flat = low[pair], high[pair], flat.reshape(-1)
        blend_low = blend_high = 0
        for offsets, weights in zip(corner_offsets, corner_weights, strict=True):
            base, weight = offsets[pair] * num_classes, weights[pair]
            blend_low = blend_low + weight * classes_flat[base + low_pair]
            blend_high = blend_high + weight * classes_flat[base + high_pair]
        result[pair] = np.where(blend_high > blend_low, high_pair, low_pair)  # ties: the lower class
    for start in range(0, inverse.size, _BAND_CHUNK):  # three or more candidates: blend every class
        part = np.flatnonzero(count[start : start + _BAND_CHUNK] > 2) + start
        if part.size:
            blend = np.zeros((part.size, num_classes), dtype=np.float32)
            for offsets, weight in zip(corner_offsets, corner_weights, strict=True):
                blend += weight[part, None] * flat[offsets[part]]
            result[part] = blend.argmax(1)
    return result
