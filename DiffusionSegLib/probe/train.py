"""Training a probe head on frozen features from a few labeled volumes.

1. Each CT is prepared on the backbone's working grid, its labels resampled onto it, and the whole-volume
   inputs (scaled image, BPR coordinates, fixed noise fields) built once.
2. Class-balanced patches are cut and the frozen backbone's pyramid of each is cached (float16, CPU):
   about ``sum_l C_l / 8^l`` (21 for base 16) numbers per voxel, so a pool of dozens of patches is small
   (:func:`cache_patch_features`, one :class:`PatchFeatures` per volume).
3. The head is trained on the cache with Dice + cross-entropy (``monai.losses.DiceCELoss``); held-out
   patches (or a held-out volume) measure a validation loss and the best head is kept (:func:`train_head`).

:func:`fit_probe` does all three; the evaluation harness calls the steps itself so that every head and fold
reuses one cache per case.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.probe.config import ProbeConfig

__all__ = ["TrainedProbe", "ProbeTrainingCancelled", "PatchFeatures", "fit_probe", "train_head", "cache_patch_features",
           "build_head", "backbone_record"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]


class ProbeTrainingCancelled(RuntimeError):
    """``should_stop()`` returned True before the head had been trained at all."""


@dataclass
class TrainedProbe:
    """A probe head with what is needed to use it.

    Attributes:
        head: the head module (eval mode), mapping the pyramid to ``len(labels) + 1`` logits.
        config: the :class:`ProbeConfig` it was trained with.
        labels: organs in class order (class ``i + 1`` is ``labels[i]``; class 0 is background).
        backbone: :func:`backbone_record` of the backbone it reads (sha256, window, spacing, BPR...).
        history: one dict per validation (step, train_loss, val_loss).
        best_step: step of the kept head.
        best_val_loss: its validation loss.
        cancelled: training was stopped by ``should_stop()``; the best head so far was kept.
        field_of_view: where the organs lay along the body axis in the training CTs
            (:mod:`~DiffusionSegLib.probe.extent`): ``{"bpr_sha256", "organ_z_mm": {name: [low, high]}}``, or
            empty (not recorded).
    """

    head: nn.Module
    config: ProbeConfig
    labels: list[OrganLabel]
    backbone: dict
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_val_loss: float = float("nan")
    cancelled: bool = False
    field_of_view: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.labels) + 1

    @property
    def backbone_sha256(self) -> str:
        return str(self.backbone["sha256"])


def backbone_record(backbone) -> dict:
    """What a probe records about its backbone: hash, path and the settings that shape its features."""
    pretrain = backbone.pretrain
    return {
        "sha256": backbone.sha256, "path": str(backbone.path), "method": pretrain.method,
        "use_bpr": bool(pretrain.use_bpr), "bpr_sha256": backbone.bpr_sha256,
        "window_hu": list(pretrain.data.window_hu), "spacing_mm": list(pretrain.preprocess.spacing_mm),
        "preprocess": pretrain.preprocess.to_dict(), "num_timesteps": pretrain.diffusion.num_timesteps,
        "schedule": pretrain.diffusion.schedule, "feature_channels": list(backbone.feature_channels),
    }  # fmt: skip


class FeatureStandardizer(nn.Module):
    """Per-channel standardisation of each pyramid level, with statistics of the training features.

    Frozen features have small, uneven spreads (random or pretrained), which leaves a linear probe badly
    conditioned; scaling every channel to zero mean and unit variance (statistics stored as buffers, so they
    travel with the probe file) lets one learning rate suit all channels.
    """

    def __init__(self, feature_channels: Sequence[int]) -> None:
        super().__init__()
        self.levels = len(feature_channels)
        for level, channels in enumerate(feature_channels):
            self.register_buffer(f"mean_{level}", torch.zeros(channels))
            self.register_buffer(f"inv_std_{level}", torch.ones(channels))

    @torch.no_grad()
    def fit(self, pyramids: Sequence[Sequence[torch.Tensor]]) -> None:
        """Set the statistics from cached pyramids (a list of per-patch pyramids)."""
        for level in range(self.levels):
            values = torch.cat([p[level].float().transpose(0, 1).reshape(p[level].shape[1], -1) for p in pyramids], 1)
            getattr(self, f"mean_{level}").copy_(values.mean(1))
            getattr(self, f"inv_std_{level}").copy_(1.0 / values.std(1).clamp_min(1e-6))

    def forward(self, pyramid: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return [(level - getattr(self, f"mean_{i}").view(shape)) * getattr(self, f"inv_std_{i}").view(shape)
                for i, level in enumerate(pyramid)]  # fmt: skip


class StandardizedHead(nn.Module):
    """A probe head applied to standardised features (see :class:`FeatureStandardizer`)."""

    def __init__(self, head: nn.Module, feature_channels: Sequence[int]) -> None:
        super().__init__()
        self.standardize = FeatureStandardizer(feature_channels)
        self.head = head

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.standardize(pyramid))


def build_head(kind: str, feature_channels: Sequence[int], num_classes: int, hidden: int = 64) -> nn.Module:
    """The head of a probe kind (``HEADS``) on standardised pyramid features: ``linear``
    (:class:`LinearProbeHead`), ``nonlinear`` (:class:`NonLinearProbeHead` of 1x1x1 blocks) or ``context`` (the
    same decoder with 3x3x3 blocks on the coarser levels)."""
    from DiffusionSegLib.nets import LinearProbeHead, NonLinearProbeHead
    from DiffusionSegLib.probe.config import HEADS

    if kind == "linear":
        head: nn.Module = LinearProbeHead(feature_channels, num_classes)
    elif kind in ("nonlinear", "context"):
        head = NonLinearProbeHead(feature_channels, num_classes, hidden, kernel_size=3 if kind == "context" else 1)
    else:
        raise ValueError(f"head {kind!r} is unknown; expected one of {list(HEADS)}")
    return StandardizedHead(head, feature_channels)


def _check_patch(cfg: ProbeConfig, divisor: int) -> None:
    bad = [s for s in (*cfg.patch_size_vox, *(cfg.train_crop or ())) if s % divisor]
    if bad:
        raise UserInputError(f"patch size {cfg.patch_size_vox} is not a multiple of {divisor} (the backbone's size "
                             "divisor) along every axis")  # fmt: skip


def _check_labels(labels: Sequence[OrganLabel], present: Sequence[set[int]]) -> None:
    if not labels:
        raise UserInputError("no organs to learn; pass at least one label")
    values = [label.value for label in labels]
    if len(set(values)) != len(values):
        raise UserInputError(f"label ids {values} repeat; each organ needs its own id")
    for index, label in enumerate(labels):
        if not any(index + 1 in classes for classes in present):
            raise UserInputError(f"organ '{label.name}' (id {label.value}) has no voxels in any training case")


class _Cache:
    """Frozen pyramids (float16, CPU) and class maps of cut patches."""

    def __init__(self) -> None:
        self.pyramids: list[list[torch.Tensor]] = []
        self.classes: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.classes)

    def batch(self, indices: Sequence[int], device: torch.device, crop: Sequence[int] | None = None,
              rng: np.random.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """Stack cached patches, or a random crop of each (origins on the coarsest level's grid) when ``crop``."""
        levels = len(self.pyramids[0])
        boxes = [None] * len(indices)
        if crop is not None:
            stride = 2 ** (levels - 1)
            shape = self.classes[indices[0]].shape[2:]
            boxes = [[int(rng.integers(0, (n - c) // stride + 1)) * stride for n, c in zip(shape, crop)]
                     for _ in indices]  # fmt: skip

        def cut(tensor: torch.Tensor, box, scale: int) -> torch.Tensor:
            if box is None:
                return tensor
            z, y, x = (b // scale for b in box)
            d, h, w = (c // scale for c in crop)
            return tensor[:, :, z : z + d, y : y + h, x : x + w]

        pyramid = [torch.cat([cut(self.pyramids[i][level], box, 2**level) for i, box in zip(indices, boxes)])
                   .to(device).float() for level in range(levels)]  # fmt: skip
        return pyramid, torch.cat([cut(self.classes[i], box, 1) for i, box in zip(indices, boxes)]).to(device)


@dataclass
class PatchFeatures:
    """The frozen pyramids (float16, CPU) and class maps of the patches cut from one labeled volume.

    Computing them is most of a probe's cost; keeping them lets several heads, or the folds of an evaluation that
    share a training case, be trained without running the backbone again (:func:`train_head`).

    Attributes:
        pyramids: per patch, the pyramid levels (1, C_l, d/2^l, h/2^l, w/2^l).
        classes: per patch, (1, 1, d, h, w) int64 class indices.
        present: class indices present anywhere in the volume (not only in the patches).
    """

    pyramids: list[list[torch.Tensor]]
    classes: list[torch.Tensor]
    present: set[int]


def cache_patch_features(volume, origins: Sequence[Sequence[int]], extractor, cfg: ProbeConfig,
                         device: torch.device, *, first_draw: int = 0,
                         before_patch: Callable[[int], None] | None = None) -> PatchFeatures:  # fmt: skip
    """Run the frozen backbone on patches of a prepared labeled volume and keep their pyramids.

    Args:
        volume: a :class:`~DiffusionSegLib.probe.sampling.LabeledVolume`.
        origins: patch corners (:func:`~DiffusionSegLib.probe.sampling.sample_patch_origins`).
        extractor: the :class:`~DiffusionSegLib.features.FeatureExtractor`, on ``device``.
        cfg: gives the patch size.
        device: where the backbone runs.
        first_draw: patch ``i`` uses noise draw ``(first_draw + i) % num_draws``.
        before_patch: called with the patch index before each patch (progress, cancellation).
    """
    from DiffusionSegLib.probe.sampling import cut_patch

    features = PatchFeatures([], [], volume.present)
    for i, origin in enumerate(origins):
        if before_patch is not None:
            before_patch(i)
        window, classes = cut_patch(volume, origin, cfg.patch_size_vox)
        pyramid = extractor(window.to(device), (first_draw + i) % extractor.num_draws)
        features.pyramids.append([level.to("cpu", torch.float16) for level in pyramid])
        features.classes.append(classes)
    return features


def fit_probe(cases: Sequence[tuple[sitk.Image, sitk.Image]], labels: Sequence[OrganLabel], backbone,
              cfg: ProbeConfig | None = None, *, bpr=None, progress: bool = True,
              progress_callback: ProgressCallback | None = None,
              should_stop: Callable[[], bool] | None = None) -> TrainedProbe:  # fmt: skip
    """Train a probe head on a frozen backbone from a few labeled CTs.

    Args:
        cases: ``(ct, label map)`` pairs; each label map on its CT's grid, ids as in ``labels``.
        labels: the organs to learn (others in the label maps count as background).
        backbone: the frozen :class:`~DiffusionSegLib.pretrain.export.BackboneBundle`.
        cfg: probe settings; default :class:`ProbeConfig`.
        bpr: BPR for a backbone that uses coordinates (module, path or None for the recorded default).
        progress: show a tqdm progress bar.
        progress_callback: called as ``(fraction in [0, 1], message)`` while preparing, caching and training.
        should_stop: polled often; when it returns True the best head so far is returned (``cancelled=True``).

    Returns:
        A :class:`TrainedProbe`.

    Raises:
        UserInputError: no cases, an unusable CT or label map, an organ absent from every case, a patch
            size that is not a multiple of the backbone's divisor, a timestep outside [0, T - 1].
        ProbeTrainingCancelled: stopped before any training step.

    Example::

        probe = fit_probe([(ct, seg)], BTCV_LABELS[5:6], load_backbone("backbone.safetensors"), ProbeConfig(steps=200))
        save_probe("liver.safetensors", probe)
    """
    from DiffusionSegLib.features import FeatureExtractor, resolve_device
    from DiffusionSegLib.precision import autocast_context, resolve_precision
    from DiffusionSegLib.probe.extent import record_field_of_view
    from DiffusionSegLib.probe.sampling import prepare_labeled_volume, sample_patch_origins

    cfg = cfg or ProbeConfig()
    labels = list(labels)
    if not cases:
        raise UserInputError("no labeled cases given; a probe needs at least one CT with its label map")
    _check_patch(cfg, backbone.model.config.size_divisor)
    feature_cfg = cfg.feature_config()
    device = resolve_device(cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device))  # the probe records the choice
    report = progress_callback or (lambda fraction, message: None)
    stop = should_stop or (lambda: False)
    rng = np.random.default_rng(cfg.seed)
    extractor = FeatureExtractor(backbone, feature_cfg).to(device)  # checks the timestep early

    volumes = []
    for i, (image, label) in enumerate(cases):
        if stop():
            raise ProbeTrainingCancelled("probe training cancelled while preparing the volumes")
        report(0.2 * i / len(cases), f"preparing volume {i + 1}/{len(cases)}")
        volumes.append(prepare_labeled_volume(image, label, labels, backbone, feature_cfg, f"case {i + 1}",
                                              bpr=bpr, device=device))  # fmt: skip
    _check_labels(labels, [v.present for v in volumes])
    origins = [sample_patch_origins(v.classes, cfg.patch_size_vox, cfg.patches_per_volume, rng) for v in volumes]
    total, done, patch_sets = sum(map(len, origins)), 0, []
    for volume, volume_origins in zip(volumes, origins):

        def before_patch(i: int, done: int = done) -> None:
            if stop():
                raise ProbeTrainingCancelled("probe training cancelled while caching features")
            report(0.2 + 0.3 * (done + i) / total, f"caching features of patch {done + i + 1}/{total}")

        with autocast_context(cfg.precision, device):
            patch_sets.append(cache_patch_features(volume, volume_origins, extractor, cfg, device, first_draw=done,
                                                   before_patch=before_patch))  # fmt: skip
        done += len(volume_origins)
    del volumes
    probe = train_head(patch_sets, labels, backbone, cfg, rng=rng, progress=progress,
                       progress_callback=lambda f, m: report(0.5 + 0.5 * f, m), should_stop=stop)  # fmt: skip
    probe.field_of_view = record_field_of_view(cases, labels)
    return probe


def train_head(patch_sets: Sequence[PatchFeatures], labels: Sequence[OrganLabel], backbone, cfg: ProbeConfig, *,
               rng: np.random.Generator | None = None, progress: bool = False,
               progress_callback: ProgressCallback | None = None,
               should_stop: Callable[[], bool] | None = None) -> TrainedProbe:  # fmt: skip
    """Train a probe head on cached patch features (:func:`cache_patch_features`), one set per labeled volume.

    The last ``cfg.val_volumes`` sets are held out for early stopping when more remain, else a random
    ``cfg.val_fraction`` of the patches (at most ``cfg.max_val_patches``, and never all of them: with a single
    patch, the training patches validate). Arguments as :func:`fit_probe`;
    ``rng`` (default: seeded with ``cfg.seed``) draws the held-out patches, batches and crops.

    Raises:
        UserInputError: an organ absent from every volume.
        ProbeTrainingCancelled: stopped before any training step.
    """
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from DiffusionSegLib.features import resolve_device

    labels = list(labels)
    _check_labels(labels, [s.present for s in patch_sets])
    rng = rng if rng is not None else np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    report = progress_callback or (lambda fraction, message: None)
    stop = should_stop or (lambda: False)
    held_out = cfg.val_volumes if len(patch_sets) > cfg.val_volumes > 0 else 0
    jobs = [(v, p) for v, s in enumerate(patch_sets) for p in range(len(s.classes))]
    n_val = 0 if held_out else (max(1, int(round(cfg.val_fraction * len(jobs)))) if cfg.val_fraction > 0 else 0)
    n_val = min(n_val, cfg.max_val_patches, len(jobs) - 1)  # one patch at least trains (validation then reads it)
    val_jobs = set(rng.choice(len(jobs), n_val, replace=False).tolist()) if n_val else set()
    train_cache, val_cache = _Cache(), _Cache()
    for j, (v, p) in enumerate(jobs):
        target = val_cache if (j in val_jobs or v >= len(patch_sets) - held_out) else train_cache
        target.pyramids.append(patch_sets[v].pyramids[p])
        target.classes.append(patch_sets[v].classes[p])

    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, cfg.head_channels(backbone.feature_channels, backbone.use_bpr), len(labels) + 1,
                      cfg.hidden_channels)  # fmt: skip
    head.standardize.fit(train_cache.pyramids)
    head = head.to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)  # Dice over the batch: crops lack organs
    optimiser = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    probe = TrainedProbe(head, cfg, labels, backbone_record(backbone))
    best_state, best_loss, since_best, losses = copy.deepcopy(head.state_dict()), float("inf"), 0, []
    drops_left = cfg.lr_drops
    started = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="probe", disable=not progress, leave=False)
    for step in bar:
        if stop():
            probe.cancelled = True
            if step == 1:
                raise ProbeTrainingCancelled("probe training cancelled before the first step")
            break
        head.train()
        indices = rng.choice(len(train_cache), size=cfg.batch_size, replace=cfg.batch_size > len(train_cache))
        pyramid, target = train_cache.batch(indices.tolist(), device, cfg.train_crop, rng)
        loss = loss_fn(head(pyramid), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if step % cfg.val_every == 0 or step == cfg.steps:
            val_loss = _validate(head, val_cache if len(val_cache) else train_cache, loss_fn, device, cfg.batch_size)
            train_loss = float(np.mean(losses[-cfg.val_every :]))
            probe.history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss,
                                  "lr": optimiser.param_groups[0]["lr"]})  # fmt: skip
            if val_loss < best_loss:
                best_state, best_loss, probe.best_step, since_best = copy.deepcopy(head.state_dict()), val_loss, step, 0
            else:
                since_best += 1
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if cfg.patience and since_best >= cfg.patience:
                if drops_left:
                    drops_left, since_best = drops_left - 1, 0
                    head.load_state_dict(best_state)
                    for group in optimiser.param_groups:
                        group["lr"] *= 0.1
                    log.info("probe: no improvement in %d validations; back to step %d at learning rate %.2g",
                             cfg.patience, probe.best_step, optimiser.param_groups[0]["lr"])  # fmt: skip
                else:
                    log.info("probe: no improvement in %d validations; stopping at step %d", since_best, step)
                    break
        report(step / max(cfg.steps, 1), f"training step {step}/{cfg.steps} (loss {losses[-1]:.3f})")
    bar.close()
    if probe.cancelled and losses and (not probe.history or probe.history[-1]["step"] != len(losses)):
        val_loss = _validate(head, val_cache if len(val_cache) else train_cache, loss_fn, device, cfg.batch_size)
        probe.history.append({"step": len(losses), "train_loss": losses[-1], "val_loss": val_loss})
        if val_loss < best_loss:
            best_state, best_loss, probe.best_step = copy.deepcopy(head.state_dict()), val_loss, len(losses)
    head.load_state_dict(best_state)
    head.eval()
    probe.best_val_loss = best_loss
    log.info("probe: %s head, %d organs, best validation loss %.4f at step %d (%.1f s of training)", cfg.head,
             len(labels), best_loss, probe.best_step, time.perf_counter() - started)  # fmt: skip
    report(1.0, "done")
    return probe


@torch.no_grad()
def _validate(head: nn.Module, cache: _Cache, loss_fn, device: torch.device, batch_size: int) -> float:
    head.eval()
    total, count = 0.0, 0
    for start in range(0, len(cache), batch_size):
        indices = list(range(start, min(start + batch_size, len(cache))))
        pyramid, target = cache.batch(indices, device)
        total += float(loss_fn(head(pyramid), target)) * len(indices)
        count += len(indices)
    return total / max(count, 1)
