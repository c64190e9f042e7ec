"""Voxel features of a frozen backbone: noise a whole CT to step t with a fixed noise field, run sliding windows.

The feature of a voxel is the backbone's decoder pyramid at that voxel (Baranchuk et al. 2022, vox2vec). The
network input of a window is ``cat(x_t, BPR coordinates)`` with ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` and
``x0 = 2 * scale_hu(HU) - 1`` (the pretraining convention); the restorative / contrastive / random baselines see
the scaled image ``scale_hu(HU)`` itself and ignore ``t``.

Determinism: the noise is drawn **once for the whole working volume** from ``noise_seed`` and travels to the
windows as extra input channels of the sliding windows (:mod:`DiffusionSegLib.windows`, MONAI's
``sliding_window_inference`` without importing MONAI); the predictor splits them off
inside. A voxel's noise therefore depends on its position only, never on the window that covers it, so the
features do not change with the window size or overlap beyond the convolutions' own border effects.

Windows go two at a time through the backbone on a CPU (:data:`CPU_WINDOWS_PER_PASS`), and in eval mode the
backbone runs as a copy with its batch norms and timestep modulation folded into the convolutions
(:meth:`FeatureExtractor.inference_model`): the same features, about 15 % faster.

Whole-volume features are too large to keep (hundreds of channels per voxel), so the consumer — a probe head —
runs inside the predictor (:class:`PyramidPredictor`) and only its output is stitched, on the CPU.

Layout: the backbone runs in channels_last_3d and every pyramid level is handed on in that layout, so the heads'
1x1x1 convolutions are single matrix products (``PointwiseConv3d``). On 2 CPU cores this makes a 48 x 128 x 128
window 1.3x faster through the backbone and 1.7x faster through the non-linear head than NCDHW.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.precision import PRECISIONS, autocast_context, autocast_dtype  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from DiffusionSegLib.pretrain.export import BackboneBundle

__all__ = [
    "FeatureConfig",
    "VolumeInputs",
    "FeatureExtractor",
    "PyramidPredictor",
    "resolve_device",
    "noise_field",
    "build_inputs",
    "backbone_bpr_path",
    "bpr_coordinates",
    "window_size",
    "CPU_WINDOWS_PER_PASS",
    "auto_sw_batch_size",
    "sliding_window_apply",
    "extract_features",
    "pyramid_channels",
]

log = logging.getLogger(__name__)


@dataclass
class FeatureConfig:
    """How voxel features are computed from a frozen backbone (recorded in every probe)."""

    timestep: int = 0
    """Diffusion step t in [0, T - 1] at which the CT is noised (ignored by non-diffusion backbones). With the
    default T = 10 ``ddpm_linear`` schedule, alpha_bar is 0.9999 at t = 0 and 0.90 at t = 9: the anatomy stays."""
    noise_seed: int = 0
    """Seed of the whole-volume noise field: same seed, same features."""
    num_noise_draws: int = 1
    """Noise fields averaged over (an ensemble; more than 1 also gives a disagreement map)."""
    window_vox: tuple[int, int, int] | None = None
    """Sliding-window size (D, H, W) in working voxels, multiples of the backbone's size divisor;
    None: the backbone's pretraining patch size rounded up to the divisor."""
    overlap: float = 0.25
    """Sliding-window overlap in [0, 1)."""
    blend: Literal["gaussian", "constant"] = "gaussian"
    """How overlapping window outputs are blended."""
    sw_batch_size: int = 0
    """Windows per forward pass; 0 chooses from the free memory (see :func:`auto_sw_batch_size`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the backbone runs; stitching is always on the CPU."""
    with_input: bool = False
    """Append the window's clean input (the scaled image and the BPR coordinates) to the finest pyramid level, so
    that a head reads intensity and position next to the learned features."""

    def __post_init__(self) -> None:
        if self.timestep < 0:
            raise ValueError(f"timestep {self.timestep} is negative; expected a step in [0, T - 1]")
        if self.num_noise_draws < 1:
            raise ValueError(f"num_noise_draws {self.num_noise_draws} must be at least 1")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap {self.overlap} is invalid; expected a value in [0, 1)")
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"blend {self.blend!r} is unknown; expected 'gaussian' or 'constant'")
        if self.sw_batch_size < 0:
            raise ValueError(f"sw_batch_size {self.sw_batch_size} is negative (0: automatic)")
        if self.window_vox is not None:
            self.window_vox = tuple(int(s) for s in self.window_vox)  # type: ignore[assignment]
            if len(self.window_vox) != 3 or min(self.window_vox) < 1:
                raise ValueError(f"window_vox {self.window_vox} is invalid; expected three positive sizes (D, H, W)")

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU raises :class:`UserInputError`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserInputError(f"device {device!r} is unknown; expected auto, cpu or cuda")
    return torch.device(device)


def noise_field(shape: Sequence[int], seed: int, num_draws: int = 1) -> torch.Tensor:
    """Standard normal noise for a whole working volume, a function of the seed and the voxel position only.

    Args:
        shape: (D, H, W) of the working volume.
        seed: the noise seed.
        num_draws: independent fields.

    Returns:
        (num_draws, D, H, W) float32 on the CPU (drawn on the CPU, so the same on every machine).
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((int(num_draws), *(int(s) for s in shape)), generator=generator, dtype=torch.float32)


def window_size(backbone: BackboneBundle, cfg: FeatureConfig) -> tuple[int, int, int]:
    """The sliding-window size (D, H, W): ``cfg.window_vox`` checked, or the pretraining patch rounded up."""
    divisor = backbone.model.config.size_divisor
    if cfg.window_vox is not None:
        bad = [s for s in cfg.window_vox if s % divisor]
        if bad:
            raise UserInputError(f"window {tuple(cfg.window_vox)} is not a multiple of {divisor} (the backbone's "
                                 f"size divisor 2^(num_scales - 1)) along every axis")  # fmt: skip
        return tuple(cfg.window_vox)  # type: ignore[return-value]
    patch = backbone.pretrain.data.patch_size_vox
    return tuple(int(math.ceil(s / divisor) * divisor) for s in patch)  # type: ignore[return-value]


def backbone_bpr_path(backbone: BackboneBundle) -> Path:
    """The BPR weights a backbone was pretrained with.

    A backbone records the BPR's file (``pretrain.bpr_weights``, empty: the shipped default at the time) and
    its sha256. The recorded file, the current default and the shipped models (``Resources/Models``) are
    searched by that hash, so a backbone keeps its own BPR when the default BPR changes.

    Raises:
        UserInputError: no file with the recorded hash is found.
    """
    from DiffusionSegLib.bpr import default_bpr_path
    from DiffusionSegLib.checkpoint import find_weights
    from DiffusionSegLib.resources import resources_dir

    recorded = backbone.pretrain.bpr_weights
    if not backbone.bpr_sha256:  # saved without a hash: trust the recorded file, else the default
        return Path(recorded) if recorded and Path(recorded).is_file() else default_bpr_path()
    found = find_weights(backbone.bpr_sha256, "bpr", [recorded, default_bpr_path()], [resources_dir() / "Models"])
    if found is None:
        raise UserInputError(f"the BPR weights the backbone '{backbone.path}' was pretrained with (sha256 "
                             f"{backbone.bpr_sha256[:12]}…) are neither at '{recorded or default_bpr_path()}' nor "
                             "among the shipped models; pass that BPR file")  # fmt: skip
    return found


def _bpr_model(backbone: BackboneBundle, bpr: Any) -> nn.Module:
    """The BPR the backbone was pretrained with: a loaded model, a path, or the one found by its recorded hash."""
    from DiffusionSegLib.bpr import load_bpr
    from DiffusionSegLib.checkpoint import file_sha256

    if isinstance(bpr, nn.Module):
        return bpr
    if isinstance(bpr, tuple):  # (model, cfg) as load_bpr returns it
        return bpr[0]
    if not bpr:
        return load_bpr(backbone_bpr_path(backbone))[0]
    path = Path(bpr)
    if backbone.bpr_sha256 and path.is_file() and file_sha256(path) != backbone.bpr_sha256:
        raise UserInputError(f"BPR weights '{path}' are not those the backbone was pretrained with (sha256 "
                             f"{backbone.bpr_sha256[:12]}…); pass the matching BPR file")  # fmt: skip
    return load_bpr(path)[0]


def bpr_coordinates(working_hu: torch.Tensor | sitk.Image, backbone: BackboneBundle, bpr: Any = None,
                    device: str | torch.device = "cpu", reference_path: bool = False) -> torch.Tensor:  # fmt: skip
    """BPR coordinates of a whole working volume, as the backbone saw them in pretraining.

    Args:
        working_hu: (1, 1, D, H, W) HU on the BPR's working grid, or a working ``sitk.Image`` at any spacing.
        backbone: the backbone (its recorded BPR hash is checked).
        bpr: a BPR module, ``(module, cfg)``, a weights path, or None for the recorded / shipped default.
        device: where the BPR runs.
        reference_path: the straightforward way (see ``bpr.predict_working_coordinates``), for checks.

    Returns:
        (1, 3, D, H, W) float32 on the CPU, scaled as network input (see ``bpr.coordinate_channels``).
    """
    from DiffusionSegLib.bpr import coordinate_channels

    model = _bpr_model(backbone, bpr)
    return coordinate_channels(working_hu, model, device=device, reference_path=reference_path).cpu()


@dataclass
class VolumeInputs:
    """Everything the windows need, for a whole working volume, as one CPU tensor.

    Attributes:
        tensor: (1, 1 + K + N, D, H, W) float32: the HU-window-scaled image in [0, 1], K coordinate channels
            (3 with BPR, else 0) and N noise fields.
        num_coords: K.
        num_draws: N.
    """

    tensor: torch.Tensor
    num_coords: int
    num_draws: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.tensor.shape[2:])  # type: ignore[return-value]


def build_inputs(working_hu: torch.Tensor | np.ndarray | sitk.Image, backbone: BackboneBundle, cfg: FeatureConfig,
                 *, coords: torch.Tensor | None = None, bpr: Any = None,
                 device: str | torch.device = "cpu") -> VolumeInputs:  # fmt: skip
    """Stack the scaled image, the BPR coordinates (when the backbone uses them) and the noise fields.

    Args:
        working_hu: HU on the working grid, (D, H, W) array / tensor or a working ``sitk.Image``.
        backbone: the frozen backbone (its HU window, BPR switch and method).
        cfg: feature settings (noise seed and number of draws).
        coords: (1, 3, D, H, W) BPR coordinates if already computed; else computed with ``bpr``.
        bpr: see :func:`bpr_coordinates`.
        device: where the BPR runs.

    Returns:
        :class:`VolumeInputs` on the CPU.
    """
    from DiffusionSegLib.preprocess import scale_hu

    working_image = working_hu if isinstance(working_hu, sitk.Image) else None
    if working_image is not None:
        working_hu = sitk.GetArrayFromImage(working_image)
    hu = torch.as_tensor(np.asarray(working_hu, dtype=np.float32) if isinstance(working_hu, np.ndarray)
                         else working_hu, dtype=torch.float32)  # fmt: skip
    if hu.ndim == 5:
        hu = hu[0, 0]
    if hu.ndim != 3:
        raise ValueError(f"working volume shape {tuple(hu.shape)} is invalid; expected (D, H, W) or (1, 1, D, H, W)")
    parts = [scale_hu(hu, backbone.pretrain.data.window_hu)[None, None].float()]
    num_coords = 0
    if backbone.use_bpr:
        if coords is None:  # an image carries its spacing: the BPR resamples it to its own grid and back
            coords = bpr_coordinates(working_image if working_image is not None else hu[None, None], backbone, bpr,
                                     device)  # fmt: skip
        if tuple(coords.shape) != (1, 3, *hu.shape):
            raise ValueError(f"coordinates shape {tuple(coords.shape)} does not fit the volume {tuple(hu.shape)}")
        parts.append(coords.float().cpu())
        num_coords = 3
    draws = cfg.num_noise_draws if backbone.pretrain.method == "diffusion" else 0
    if draws:
        parts.append(noise_field(hu.shape, cfg.noise_seed, draws)[None])
    return VolumeInputs(torch.cat(parts, dim=1), num_coords, draws)


class FeatureExtractor(nn.Module):
    """Turns windows of :class:`VolumeInputs` into the backbone's feature pyramid.

    Args:
        backbone: the frozen backbone bundle.
        cfg: feature settings (timestep).
        num_coords: coordinate channels K in the windows (3 with BPR).

    Raises:
        UserInputError: the timestep is outside the backbone's [0, T - 1].
    """

    def __init__(self, backbone: BackboneBundle, cfg: FeatureConfig, num_coords: int | None = None) -> None:
        super().__init__()
        from DiffusionSegLib.diffusion import NoiseScheduler

        self.model = backbone.model
        self.diffusion = backbone.pretrain.method == "diffusion"
        steps = backbone.pretrain.diffusion.num_timesteps
        if self.diffusion and not 0 <= cfg.timestep < steps:
            raise UserInputError(f"timestep {cfg.timestep} is outside the backbone's diffusion steps [0, {steps - 1}]")
        self.scheduler = NoiseScheduler(steps, backbone.pretrain.diffusion.schedule)
        self.timestep = int(cfg.timestep)
        self.num_coords = (3 if backbone.use_bpr else 0) if num_coords is None else int(num_coords)
        self.num_draws = cfg.num_noise_draws if self.diffusion else 1
        self.with_input = bool(cfg.with_input)
        self.model.to(memory_format=torch.channels_last_3d)  # weights only: the results do not change
        self._folded: tuple[tuple, nn.Module] | None = None

    def inference_model(self) -> nn.Module:
        """The backbone to run: in eval mode, a copy with its batch norms and timestep modulation folded into the
        convolutions (:meth:`~DiffusionSegLib.nets.UNet3d.folded_for_inference`; same features, ~15 % faster),
        rebuilt whenever a weight or running statistic of the backbone changes (a fine-tuning step), its device
        or dtype; in training mode the backbone itself."""
        model = self.model
        if model.training or not hasattr(model, "folded_for_inference"):
            return model
        tensors = [*model.parameters(), *model.buffers()]
        key = (self.timestep, tuple((id(p), p._version, p.device, p.dtype) for p in tensors))
        if self._folded is None or self._folded[0] != key:
            self._folded = None  # release the old copy first
            self._folded = (key, model.folded_for_inference(self.timestep if model.time_embed is not None else None))
        return self._folded[1]

    def network_input(self, window: torch.Tensor, draw: int = 0) -> torch.Tensor:
        """(B, 1 + K + N, d, h, w) window → (B, 1 + K, d, h, w) backbone input for noise draw ``draw``."""
        image = window[:, :1]
        coords = window[:, 1 : 1 + self.num_coords]
        if self.diffusion:
            noise = window[:, 1 + self.num_coords + draw : 2 + self.num_coords + draw]
            if noise.shape[1] != 1:
                raise ValueError(f"window has {window.shape[1]} channels; noise draw {draw} is missing")
            image = self.scheduler.add_noise(image * 2.0 - 1.0, noise, self.timestep)  # DDPM eq. 4
        return torch.cat([image, coords], dim=1) if self.num_coords else image

    @torch.no_grad()
    def forward(self, window: torch.Tensor, draw: int = 0) -> list[torch.Tensor]:
        """The pyramid (finest first, level l: (B, C_l, d/2^l, h/2^l, w/2^l)) of a window for one noise draw,
        every level in channels_last_3d layout."""
        x = self.network_input(window, draw).contiguous(memory_format=torch.channels_last_3d)
        t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        pyramid = list(self.inference_model()(x, t, prediction=False).pyramid)
        if self.with_input:
            clean = window[:, : 1 + self.num_coords].to(pyramid[0].dtype)
            pyramid[0] = torch.cat([pyramid[0], clean], dim=1)
        return [level.contiguous(memory_format=torch.channels_last_3d) for level in pyramid]


def pyramid_channels(backbone_channels: Sequence[int], with_input: bool, num_coords: int) -> list[int]:
    """Channels per pyramid level that a head reads: the backbone's, plus the image and ``num_coords``
    coordinate channels on the finest level when ``with_input`` (:attr:`FeatureConfig.with_input`)."""
    channels = [int(c) for c in backbone_channels]
    if with_input:
        channels[0] += 1 + int(num_coords)
    return channels


class PyramidPredictor:
    """A ``sliding_window_inference`` predictor: window → pyramid → ``consumer(pyramid)``, averaged over draws.

    Args:
        extractor: the :class:`FeatureExtractor`.
        consumer: maps a pyramid to a (B, C, d, h, w) map at the finest resolution (a probe head, several heads'
            logits concatenated, or ``upsample_and_concat`` for raw features).
        disagreement: also return (B, G, d, h, w): per group of channels, the fraction of noise draws whose
            argmax differs from the argmax of the mean (only meaningful for more than one draw).
        groups: channel counts of the groups the consumer's output is made of (one per probe head; default one
            group of all channels).
    """

    def __init__(self, extractor: FeatureExtractor, consumer: Callable[[list[torch.Tensor]], torch.Tensor],
                 disagreement: bool = False, groups: Sequence[int] | None = None) -> None:  # fmt: skip
        self.extractor = extractor
        self.consumer = consumer
        self.disagreement = disagreement
        self.groups = list(groups) if groups is not None else None

    @torch.no_grad()
    def __call__(self, window: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        outputs = [self.consumer(self.extractor(window, draw)).float() for draw in range(self.extractor.num_draws)]
        mean = torch.stack(outputs).mean(0) if len(outputs) > 1 else outputs[0]
        if not self.disagreement:
            return mean
        groups = self.groups or [mean.shape[1]]
        votes = []
        for winner, *draws in zip(mean.split(groups, 1), *(o.split(groups, 1) for o in outputs)):
            winner = winner.argmax(1, keepdim=True)
            votes.append(torch.stack([(d.argmax(1, keepdim=True) != winner).float() for d in draws]).mean(0))
        return mean, torch.cat(votes, 1)


CPU_WINDOWS_PER_PASS = 2
"""Windows per forward pass on a CPU: 64^3 windows of the default backbone on 2 cores take 0.43 s each one at a
time, 0.25 s two at a time and 0.36 s four at a time (AMD EPYC, float32): two keep the activations closest to
the caches while giving the convolutions enough work."""


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 4 GiB
        return 4 << 30


def auto_sw_batch_size(feature_channels: Sequence[int], in_channels: int, window: Sequence[int],
                       device: torch.device, out_channels: int = 1, cap: int | None = None) -> int:  # fmt: skip
    """Windows per forward pass that fit comfortably in the free memory of ``device``.

    The estimate per window is ``4 bytes x voxels x (in + 8 x sum_l C_l / 8^l + 2 x out)``: the factor 8 covers
    the encoder and decoder activations kept during one forward pass (residual blocks, norms, skips). A quarter
    of the free CPU memory, or half of the free GPU memory, is used.

    Returns:
        An integer in [1, cap] (cap: :data:`CPU_WINDOWS_PER_PASS` on CPU, 32 on GPU).
    """
    voxels = int(np.prod(window))
    per_voxel = in_channels + 8 * sum(c / 8**level for level, c in enumerate(feature_channels)) + 2 * out_channels
    per_window = 4 * voxels * per_voxel
    share = 0.5 if device.type == "cuda" else 0.25
    cap = cap or (32 if device.type == "cuda" else CPU_WINDOWS_PER_PASS)
    return int(max(1, min(cap, _available_bytes(device) * share // max(per_window, 1))))


def sliding_window_apply(inputs: VolumeInputs, predictor: PyramidPredictor, backbone: BackboneBundle,
                         cfg: FeatureConfig, *, out_channels: int = 1,
                         progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:  # fmt: skip
    """Run a :class:`PyramidPredictor` over a whole volume by MONAI sliding windows, stitched on the CPU.

    Args:
        inputs: the whole-volume inputs (:func:`build_inputs`).
        predictor: its extractor's model (and consumer) must already be on the compute device.
        backbone: gives the window size divisor and feature channels.
        cfg: window size, overlap, blending, batch size and device.
        out_channels: channels the consumer returns (for the batch size estimate).
        progress: show MONAI's progress bar.

    Returns:
        (1, C, D, H, W) float32 on the CPU, or a tuple of such maps when the predictor returns a tuple.
    """
    from DiffusionSegLib.windows import sliding_window_inference

    device = next(predictor.extractor.model.parameters()).device
    roi = window_size(backbone, cfg)
    batch = cfg.sw_batch_size or auto_sw_batch_size(backbone.feature_channels, inputs.tensor.shape[1], roi, device,
                                                     out_channels)  # fmt: skip
    return sliding_window_inference(inputs.tensor, roi, batch, predictor, overlap=cfg.overlap, mode=cfg.blend,
                                    cval=0.0, sw_device=device, device="cpu", progress=progress)  # fmt: skip


def extract_features(image: sitk.Image | Any, backbone: BackboneBundle, cfg: FeatureConfig | None = None, *,
                     bpr: Any = None, progress: bool = False) -> torch.Tensor:  # fmt: skip
    """The full voxel features of a (small) volume on its working grid: every pyramid level, upsampled, concatenated.

    Meant for inspection and tests: the result holds ``sum(feature_channels)`` floats per voxel. Probes never call
    this; they run inside the sliding window (:class:`PyramidPredictor`).

    Args:
        image: a CT (``sitk.Image``, prepared with the backbone's preprocessing) or a ``PreparedVolume``.
        backbone: the frozen backbone.
        cfg: feature settings; default :class:`FeatureConfig`.
        bpr: see :func:`bpr_coordinates`.
        progress: show a progress bar.

    Returns:
        (1, sum(C_l), D, H, W) float32 on the CPU, averaged over the noise draws.

    Example::

        features = extract_features(ct, load_backbone("backbone.safetensors"), FeatureConfig(timestep=2))
    """
    from DiffusionSegLib.nets import upsample_and_concat
    from DiffusionSegLib.preprocess import PreparedVolume, prepare_volume

    cfg = cfg or FeatureConfig()
    prepared = image if isinstance(image, PreparedVolume) else prepare_volume(image, backbone.pretrain.preprocess)
    device = resolve_device(cfg.device)
    inputs = build_inputs(prepared.image, backbone, cfg, bpr=bpr, device=device)
    extractor = FeatureExtractor(backbone, cfg, inputs.num_coords).to(device)
    backbone.model.to(device)
    predictor = PyramidPredictor(extractor, lambda pyramid: upsample_and_concat(pyramid, mode="nearest"))
    return sliding_window_apply(inputs, predictor, backbone, cfg, out_channels=sum(backbone.feature_channels),
                                progress=progress)  # fmt: skip
