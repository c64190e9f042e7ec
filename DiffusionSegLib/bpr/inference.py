"""Dense anatomical coordinates of a whole CT: sliding windows on the working grid, then back to the input grid.

Coordinates are in **mm-equivalent** units (differences ≈ physical displacements in mm): component 0 runs
right → left, 1 anterior → posterior, 2 inferior → superior. Two entry points:

* :func:`predict_working_coordinates` — a torch tensor ``(1, 3, D, H, W)`` on the working grid, for the
  diffusion pretraining (compute it once per working volume and crop patches from it along with the CT:
  a patch seen alone lacks the context the BPR needs, and a whole volume costs about one second per million
  working voxels on 2 CPU cores).
* :func:`predict_body_coordinates` — a 3-component ``sitk.Image`` exactly on the input grid.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from DiffusionSegLib.bpr.model import UNIT_MM, AnyBPR, AnyBPRConfig
from DiffusionSegLib.bpr.sampling import TrainingVolume
from DiffusionSegLib.bpr.slice_model import SliceBodyPartRegressor, body_crop_centres_mm, slice_offsets
from DiffusionSegLib.preprocess import PreparedVolume, PreprocessConfig, prepare_volume, scale_hu, to_input_grid
from DiffusionSegLib.preprocess.spatial import grid_like, resample_onto

__all__ = ["predict_working_coordinates", "predict_body_coordinates", "coordinates_to_image", "default_mode", "MODES"]


def _working_tensor(working: torch.Tensor | np.ndarray | sitk.Image | PreparedVolume) -> torch.Tensor:
    if isinstance(working, PreparedVolume):
        working = working.image
    if isinstance(working, sitk.Image):
        working = sitk.GetArrayFromImage(working)
    tensor = torch.as_tensor(working, dtype=torch.float32)
    if tensor.ndim == 3:
        tensor = tensor[None, None]
    if tensor.ndim != 5 or tensor.shape[:2] != (1, 1):
        raise ValueError(f"working volume shape {tuple(tensor.shape)} is invalid; expected (D, H, W) or "
                         "(1, 1, D, H, W)")
    return tensor


MODES = ("translation", "affine", "monotone", "dense")
_SCALE_RANGE = (0.5, 2.0)
BODY_HU = -100.0


def _affine_fit(coordinates: torch.Tensor, hu: torch.Tensor, spacing_mm, mode: str) -> list[tuple[float, float]]:
    """Per axis (x, y, z) the ``(scale, offset)`` of ``mode`` ("translation" or "affine"), fitted over body voxels:
    the fitted coordinate is ``scale · position + offset`` (position in mm from the first voxel)."""
    shape = coordinates.shape[-3:]
    body = hu[0, 0] > BODY_HU
    if not bool(body.any()):
        body = torch.ones_like(body)
    fit = []
    for axis in range(3):
        along = 2 - axis  # the array axis (z, y, x) of physical axis ``axis``
        line = torch.arange(shape[along], dtype=torch.float32) * spacing_mm[axis]
        view = [1, 1, 1]
        view[along] = -1
        p, c = line.view(view).expand(shape)[body].double(), coordinates[0, axis][body].double()
        scale = 1.0
        if mode == "affine" and float(p.std()) > 0:
            scale = float(((p - p.mean()) * (c - c.mean())).mean() / p.var(unbiased=False))
            scale = min(max(scale, _SCALE_RANGE[0]), _SCALE_RANGE[1])
        offset = float((c - scale * p).median()) if mode == "translation" else float((c - scale * p).mean())
        fit.append((scale, offset))
    return fit


def _fit_to_position(coordinates: torch.Tensor, hu: torch.Tensor, spacing_mm, mode: str) -> torch.Tensor:
    """Reduce a blended map to a function of physical position, fitted over body voxels (see ``mode``)."""
    position = _positions_mm(coordinates.shape[-3:], spacing_mm)
    fitted = torch.empty_like(position)
    for axis, (scale, offset) in enumerate(_affine_fit(coordinates, hu, spacing_mm, mode)):
        fitted[axis] = scale * position[axis] + offset
    return fitted[None]


def _affine_on_grid(fit: list[tuple[float, float]], image: sitk.Image, fitted_on: sitk.Image) -> torch.Tensor:
    """The fitted coordinates (``fit``: :func:`_affine_fit` on the grid of ``fitted_on``, positions from its first
    voxel) evaluated on ``image``'s voxels, both grids axis-aligned: ``(1, 3, D, H, W)``. What resampling the
    fitted map onto ``image`` linearly gives (a linear function interpolates exactly), without the fine map:
    voxels beyond ``fitted_on``'s extent read 0, as the resampling's default."""
    size, shape = image.GetSize(), tuple(reversed(image.GetSize()))
    out = torch.empty((1, 3, *shape), dtype=torch.float32)
    inside = torch.ones(shape, dtype=torch.bool)
    for axis, (scale, offset) in enumerate(fit):
        along, view = 2 - axis, [1, 1, 1]
        view[along] = -1
        step = fitted_on.GetSpacing()[axis]
        first = image.GetOrigin()[axis] - fitted_on.GetOrigin()[axis]
        position = first + image.GetSpacing()[axis] * np.arange(size[axis])
        index = position / step  # continuous index on ``fitted_on`` (inside: within half a voxel of its extent)
        within = torch.from_numpy((index >= -0.5) & (index < fitted_on.GetSize()[axis] - 0.5))
        inside &= within.view(view)
        out[0, axis] = torch.from_numpy(scale * position + offset).float().view(view)
    return out * inside


def _is_axis_aligned(image: sitk.Image) -> bool:
    return np.allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)


def isotonic_increasing(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in weighted least squares (pool adjacent violators), as
    ``scipy.optimize.isotonic_regression`` gives it; here because importing ``scipy.optimize`` costs 0.3 s of the
    command line's start for a regression of one value per slice."""
    means: list[float] = []
    totals: list[float] = []
    counts: list[int] = []
    for value, weight in zip(np.asarray(values, np.float64), np.asarray(weights, np.float64), strict=True):
        means.append(float(value))
        totals.append(float(weight))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            mean, total, count = means.pop(), totals.pop(), counts.pop()
            merged = totals[-1] + total
            means[-1] = (means[-1] * totals[-1] + mean * total) / merged
            totals[-1] = merged
            counts[-1] += count
    return np.repeat(np.asarray(means), counts)


def _monotone_slices(coordinates: torch.Tensor, hu: torch.Tensor, spacing_mm) -> torch.Tensor:
    """Per working slice one offset (coordinates − position, averaged over the slice's body voxels), the slices'
    cranio-caudal coordinates made non-decreasing along z by isotonic regression (weighted by body voxels)."""
    position = _positions_mm(coordinates.shape[-3:], spacing_mm)
    body = (hu[0, 0] > BODY_HU).double()
    weight = body.sum(dim=(1, 2))  # (D,)
    empty = weight == 0
    mask = torch.where(empty[:, None, None], torch.ones_like(body), body)  # a slice without body: all its voxels
    offset = ((coordinates[0].double() - position) * mask).sum(dim=(2, 3)) / mask.sum(dim=(1, 2))  # (3, D)
    z = position[2, :, 0, 0].double() + offset[2]
    fitted = isotonic_increasing(z.numpy(), weight.clamp(min=1e-3).numpy())  # empty slices: ~no weight
    offset[2] = torch.from_numpy(fitted) - position[2, :, 0, 0].double()
    return (position + offset.float()[:, :, None, None])[None]


def _aggregate(dense: torch.Tensor, hu: torch.Tensor, spacing_mm, mode: str) -> torch.Tensor:
    """The dense network map turned into the result of ``mode`` (see :func:`predict_working_coordinates`)."""
    if mode == "dense":
        return dense
    if mode == "monotone":
        return _monotone_slices(dense, hu, spacing_mm)
    return _fit_to_position(dense, hu, spacing_mm, mode)


def _positions_mm(shape, spacing_mm) -> torch.Tensor:
    """Physical (x, y, z) of every working voxel in mm from the first one: ``(3, D, H, W)``."""
    axes = [torch.arange(n, dtype=torch.float32) * s for n, s in zip(reversed(shape), spacing_mm)]  # x, y, z
    zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([xx, yy, zz])


def working_slice_offsets(hu: torch.Tensor, model: SliceBodyPartRegressor, device="cpu") -> torch.Tensor:
    """Slice design: every working slice's offset ``(D, 3)`` (anatomical coordinates of its crop, centred on the
    body in that slice, minus the crop's position); ``hu``: ``(1, 1, D, H, W)`` on the BPR's grid. The network's
    per-slice z (``offset[:, 2]`` plus the slice's position) is the slice's own anatomical level, before any
    fitting along z: the orientation check reads its slope, the coordinates are built from it."""
    cfg = model.config
    volume = TrainingVolume.from_array(hu[0, 0], cfg.spacing_mm, cfg.window_hu, cfg.pool_zyx)
    return slice_offsets(model, volume, body_crop_centres_mm(hu[0, 0], cfg.spacing_mm), device)


def slice_coordinates_from_offsets(offset: torch.Tensor, shape, spacing_mm) -> torch.Tensor:
    """The slice design's dense map ``(1, 3, D, H, W)``: each voxel's position plus its slice's offset."""
    return (_positions_mm(shape, spacing_mm) + offset.T[:, :, None, None])[None]


def _slice_coordinates(hu: torch.Tensor, model: SliceBodyPartRegressor, device) -> torch.Tensor:
    """Slice design: every working slice's crop (centred on the body in that slice) gives its offset; a voxel's
    coordinates are its position plus its slice's offset. ``(1, 3, D, H, W)``."""
    offset = working_slice_offsets(hu, model, device)  # (D, 3)
    return slice_coordinates_from_offsets(offset, hu.shape[-3:], model.config.spacing_mm)


def default_mode(model: AnyBPR) -> str:
    """How a design's network map becomes coordinates by default: ``"monotone"`` for the slice design (its
    per-slice offsets are the anatomy), ``"translation"`` for the 3D patch design (the mode its backbones were
    pretrained with)."""
    return "monotone" if isinstance(model, SliceBodyPartRegressor) else "translation"


@torch.no_grad()
def predict_working_coordinates(working: torch.Tensor | np.ndarray | sitk.Image | PreparedVolume,
                                model: AnyBPR, *, mode: str | None = None, overlap: float = 0.25,
                                sw_batch_size: int = 8, device: str | torch.device = "cpu",
                                progress: bool = False, reference_path: bool = False) -> torch.Tensor:  # fmt: skip
    """Coordinates of every voxel of a working-grid CT (HU).

    Slice design: each working slice's crop (centred on the body in that slice) gives that slice's offset, and
    a voxel's dense coordinates are its position plus its slice's offset. Patch design: Gaussian-weighted
    sliding windows.

    Args:
        working: HU volume on the BPR's working grid (``model.config.spacing_mm``, canonical LPS): an array
            ``(D, H, W)`` / ``(1, 1, D, H, W)``, a working ``sitk.Image`` or a :class:`PreparedVolume`.
            An ``sitk.Image`` at another spacing is resampled to the BPR's spacing and the result back.
        model: the BPR of either design (its config gives the HU window and the crop or window size).
        mode: how the dense map (per-slice offsets, or the Gaussian-blended windows) becomes the result;
            default: the design's (:func:`default_mode`: ``"monotone"`` for the slice design, ``"translation"``
            for the patch design).
            ``"monotone"``: one offset per working slice (coordinate − position, averaged over the slice's body
            voxels), the slices' cranio-caudal coordinates made non-decreasing along z by isotonic regression —
            anatomy per slice, monotonic in z, 1 unit = 1 mm within a slice, and (slice design) unchanged by
            cropping the scan along z;
            ``"translation"``: physical position plus one anatomical offset per scan (per axis, the median of
            coordinate − position over body voxels) — monotonic along every axis, 1 unit = 1 mm, anatomy only in
            the offset, which depends on the field of view unless the network's z scale is exact;
            ``"affine"``: per axis the least-squares line ``scale · position + offset`` through the blended map
            (scale clipped to [0.5, 2]); it also follows the network's estimate of the anatomy's size, but an
            under-trained network compresses the cranio-caudal scale (measured: 0.16–0.44 on BTCV), which
            shrinks every distance; ``"dense"``: the map itself (not guaranteed monotonic; for the slice design
            unchanged by cropping the scan along z).
        overlap: sliding-window overlap in [0, 1) (patch design).
        sw_batch_size: windows per forward pass (patch design). On the CPU a batch of one small 3D window goes
            through PyTorch's slow reference convolution rather than oneDNN's: the default 8 (a whole abdominal
            CT's windows) ran the windows of a 512 x 512 x 129 CT about 10x faster than 1.
        device: where the network runs; the result is stitched on the CPU.
        progress: show a progress bar.
        reference_path: the straightforward way, kept for checks: one window per forward pass in PyTorch's
            default layout, and on a grid at another spacing the fitted map resampled back through physical
            space (the default evaluates the fitted lines of ``"translation"`` and ``"affine"`` on the given grid
            directly; the same values, to float rounding).

    Returns:
        Float32 tensor ``(1, 3, D, H, W)`` on the CPU, in mm-equivalent units.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap} is invalid; expected a value in [0, 1)")
    mode = mode or default_mode(model)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; expected one of {MODES}")
    cfg = model.config
    image = working.image if isinstance(working, PreparedVolume) else working
    if isinstance(image, sitk.Image) and not np.allclose(image.GetSpacing(), cfg.spacing_mm, atol=1e-3):
        resampled = resample_onto(sitk.Cast(image, sitk.sitkFloat32), grid_like(image, cfg.spacing_mm), "linear",
                                  -1024.0)  # fmt: skip
        if mode in ("translation", "affine") and not reference_path and _is_axis_aligned(image):
            hu = _working_tensor(resampled)  # the fit is three lines: evaluated on the given grid directly
            dense = _network_map(hu, model, overlap, sw_batch_size, device, progress)
            return _affine_on_grid(_affine_fit(dense, hu, cfg.spacing_mm, mode), image, resampled)
        coarse = predict_working_coordinates(resampled, model, mode=mode, overlap=overlap,
                                             sw_batch_size=sw_batch_size, device=device, progress=progress,
                                             reference_path=reference_path)  # fmt: skip
        on_bpr_grid = coordinates_to_image(coarse, resampled)
        back = resample_onto(on_bpr_grid, image, "linear", 0.0)
        return torch.from_numpy(sitk.GetArrayFromImage(back)).permute(3, 0, 1, 2)[None].contiguous()
    hu = _working_tensor(image)
    dense = _network_map(hu, model, overlap, 1 if reference_path else sw_batch_size, device, progress,
                         channels_last=not reference_path)  # fmt: skip
    return _aggregate(dense, hu, cfg.spacing_mm, mode)


def _network_map(hu: torch.Tensor, model: AnyBPR, overlap: float, sw_batch_size: int, device,
                 progress: bool, channels_last: bool = True) -> torch.Tensor:  # fmt: skip
    """The network's dense map ``(1, 3, D, H, W)`` of a ``(1, 1, D, H, W)`` HU volume on the BPR's grid: per-slice
    offsets (slice design) or Gaussian-blended sliding windows (patch design), before ``_aggregate``."""
    from DiffusionSegLib.windows import sliding_window_inference

    cfg = model.config
    if isinstance(model, SliceBodyPartRegressor):
        return _slice_coordinates(hu, model, device)
    tensor = scale_hu(hu, cfg.window_hu)
    was_training = model.training
    model.eval()
    if channels_last:  # oneDNN's layout for 3D convolutions (weights only: the results do not change)
        model.to(memory_format=torch.channels_last_3d)
    try:
        result = sliding_window_inference(tensor, cfg.patch_size_vox, sw_batch_size, model, overlap=overlap,
                                          mode="gaussian", cval=0.0, sw_device=device, device="cpu",
                                          progress=progress)  # fmt: skip
    finally:
        model.train(was_training)
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return result.float()


def coordinates_to_image(coordinates: torch.Tensor, reference: sitk.Image) -> sitk.Image:
    """A ``(1, 3, D, H, W)`` coordinate tensor as a 3-component float32 image on ``reference``'s grid."""
    if coordinates.ndim != 5 or coordinates.shape[:2] != (1, 3):
        raise ValueError(f"coordinates shape {tuple(coordinates.shape)} is invalid; expected (1, 3, D, H, W)")
    array = coordinates[0].permute(1, 2, 3, 0).numpy().astype(np.float32)
    if array.shape[:3] != tuple(reversed(reference.GetSize())):
        expected = tuple(reversed(reference.GetSize()))
        raise ValueError(f"coordinates size {array.shape[:3]} does not match the grid {expected}")
    image = sitk.GetImageFromArray(array, isVector=True)
    image.CopyInformation(reference)
    return image


def predict_body_coordinates(image: sitk.Image | PreparedVolume, model: AnyBPR,
                             cfg: AnyBPRConfig | None = None, *,
                             mode: str | None = None, overlap: float = 0.25, sw_batch_size: int = 1,
                             device: str | torch.device = "cpu", progress: bool = False) -> sitk.Image:  # fmt: skip
    """Dense anatomical coordinates of a CT, exactly on its input grid.

    Args:
        image: a CT in HU (any spacing and orientation; it is prepared with the BPR's spacing), or a
            :class:`PreparedVolume` (mapped back onto its input grid).
        model: the BPR (e.g. from ``load_bpr()``).
        cfg: optional, for ``predict_body_coordinates(image, *load_bpr())``; must be ``model.config``.
        mode, overlap, sw_batch_size, device, progress: see :func:`predict_working_coordinates`.

    Returns:
        A 3-component ``sitkVectorFloat32`` image with the input's size, spacing, origin and direction, in
        mm-equivalent units (x R→L, y A→P, z I→S); input voxels outside the body box read 0.

    Raises:
        UserInputError: the image is not a usable 3D CT.
    """
    if cfg is not None and cfg != model.config:
        raise ValueError("cfg differs from model.config; pass the config the model was loaded with (or none)")
    if isinstance(image, PreparedVolume):
        prepared = image
    else:
        prepared = prepare_volume(image, PreprocessConfig(spacing_mm=model.config.spacing_mm))
    working = predict_working_coordinates(prepared.image, model, mode=mode, overlap=overlap,
                                          sw_batch_size=sw_batch_size, device=device, progress=progress)
    return to_input_grid(coordinates_to_image(working, prepared.image), prepared, "linear", 0.0)


def coordinate_channels(working: torch.Tensor | np.ndarray | sitk.Image | PreparedVolume, model: AnyBPR, *,
                        device: str | torch.device = "cpu", reference_path: bool = False) -> torch.Tensor:  # fmt: skip
    """BPR coordinates as input channels of the denoising network: (1, 3, D, H, W) in units of 100 mm.

    Pretraining and feature extraction both call this, so the backbone sees the same scaling in both; 100 mm
    units keep the channels at the scale of the [0, 1] image (a trunk spans a few units). ``reference_path``: see
    :func:`predict_working_coordinates`.
    """
    coordinates = predict_working_coordinates(working, model, device=device, reference_path=reference_path)
    return coordinates.float() / UNIT_MM
