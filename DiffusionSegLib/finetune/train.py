"""End-to-end fine-tuning: a backbone plus a segmentation head trained on labeled CT.

The recipe a segmentation engineer expects (nnU-Net / MONAI style):

* every CT on the fine-tuning working grid (``FinetuneConfig.spacing_mm``), with the BPR coordinates the
  backbone was pretrained with as extra input channels;
* class-balanced patches (a class drawn uniformly among those present, then one of its voxels as the centre);
* spatial augmentation (rotation and zoom, no flips), intensity augmentation with a contrast-phase simulation,
  and a random offset of the BPR coordinates (:mod:`DiffusionSegLib.finetune.augment`);
* Dice + cross-entropy (``monai.losses.DiceCELoss``), AdamW, linear warm-up then cosine decay to 0 at the last
  step, or with a budget in minutes at the end of the budget (the cosine follows the share of the budget
  spent, validations included; training stops when it is spent);
* the forward pass in bfloat16 where the hardware computes it natively (``FinetuneConfig.precision``; weights,
  optimiser and loss in float32): on 2 AMX cores 0.73 s per step against 1.27 s in float32;
* optionally a lower learning rate for the backbone than for the head, and an exponential moving average of the
  weights that is validated, kept and written in place of the raw weights (``backbone_lr_scale``, ``ema_decay``);
* the checkpoint with the best mean Dice on held-out volumes (whole-volume sliding windows) is kept;
* a resumable snapshot (``last.pt``) every ``checkpoint_every`` steps and on cancel; running again resumes at
  the saved step with the same RNG state, so the resumed run equals the uninterrupted one.

The result is an ordinary backbone file (fine-tuned weights; its preprocessing records the fine-tuning spacing)
and a linear-head probe file on it, so ``segment``, the demo and the Slicer module use it unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.finetune.augment import PatchAugment
from DiffusionSegLib.finetune.config import FinetuneConfig
from DiffusionSegLib.finetune.loss import MaskedDiceCELoss

__all__ = ["SegmentationNetwork", "FinetuneResult", "FinetuneCancelled", "finetune", "finetune_backbone_bundle",
           "backbone_output_path", "learning_rate_at"]

log = logging.getLogger(__name__)

SNAPSHOT = "last.pt"
SELF_TRAINING_LABELS = "self_training_labels.npz"
"""Beside the snapshot: the labels self-training gave the unlabeled scans (a resumed run reuses them)."""


class FinetuneCancelled(RuntimeError):
    """``should_stop()`` returned True before the first training step."""


class SegmentationNetwork(nn.Module):
    """Backbone and head as one trainable module: a window of :class:`~DiffusionSegLib.features.VolumeInputs`
    (scaled image, coordinates, noise) → class logits, the input built exactly as for frozen features."""

    def __init__(self, bundle, head: nn.Module, timestep: int) -> None:
        super().__init__()
        from DiffusionSegLib.features import FeatureConfig, FeatureExtractor

        self.extractor = FeatureExtractor(bundle, FeatureConfig(timestep=timestep))
        self.head = head
        self.timestep = int(timestep)

    @property
    def backbone(self) -> nn.Module:
        return self.extractor.model

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        x = self.extractor.network_input(window).contiguous(memory_format=torch.channels_last_3d)
        t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        backbone = self.extractor.inference_model()  # in eval mode (validation, labeling) the folded copy
        return self.head(backbone(x, t, prediction=False).pyramid)


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        probe: the segmentation head as a :class:`~DiffusionSegLib.probe.TrainedProbe` of the fine-tuned backbone.
        backbone: the fine-tuned backbone (loaded from ``backbone_path``).
        probe_path, backbone_path: the written files.
        history: one dict per validation (step, minutes, train_loss, val_dice, lr).
        steps: steps trained; ``planned_steps``: the schedule's length.
        best_step: step of the kept model (the last step without held-out volumes).
        cancelled: stopped by ``should_stop()``; the best model so far was written.
        seconds: wall time by stage; with unlabeled scans ``cohort`` (their preparation and labeling) and, with
            registration, ``registration`` (the registrations' own seconds, a cached one counted as computed).
        cohort_path: with registration of unlabeled scans, the written cohort file beside the model
            (:mod:`DiffusionSegLib.cohort.fusion`); else None.
    """

    probe: object
    backbone: object
    probe_path: Path
    backbone_path: Path
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    planned_steps: int = 0
    best_step: int = 0
    cancelled: bool = False
    seconds: dict = field(default_factory=dict)
    cohort_path: Path | None = None


def learning_rate_at(step: int, planned: int, cfg: FinetuneConfig, fraction: float | None = None) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine decay to 0 at step ``planned``, or, with a
    budget in minutes, at the end of the budget (``fraction``: the share of it spent), so the schedule spans the
    budget whatever the rate of the machine (measured: a step count fitted to the first steps' rate left up to a
    third of the budget unused when the rate changed)."""
    warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if fraction is None:
        fraction = max(step - cfg.warmup_steps, 0) / max(planned - cfg.warmup_steps, 1)
    return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


def finetune_backbone_bundle(bundle, cfg: FinetuneConfig):
    """The backbone bundle as the fine-tuned model will record it: working spacing and patch of ``cfg``, the
    weights trainable (a copy), or freshly initialised with ``cfg.init == "random"``."""
    from DiffusionSegLib.nets import UNet3d
    from DiffusionSegLib.pretrain.export import BackboneBundle

    pretrain = bundle.pretrain
    pretrain = dataclasses.replace(
        pretrain,
        preprocess=dataclasses.replace(pretrain.preprocess, spacing_mm=tuple(cfg.spacing_mm)),
        data=dataclasses.replace(pretrain.data, patch_size_vox=tuple(cfg.patch_size_vox)),
    )
    if cfg.init == "random":
        torch.manual_seed(cfg.seed)
        model = UNet3d.from_config(bundle.model.config)
    else:
        model = copy.deepcopy(bundle.model)
    model.requires_grad_(True).train()
    return BackboneBundle(model, pretrain, bundle.sha256, bundle.bpr_sha256, bundle.path)


def backbone_output_path(probe_path: str | os.PathLike) -> Path:
    """Where the fine-tuned backbone of model file ``x.safetensors`` goes: ``x.backbone.safetensors``."""
    path = Path(probe_path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(f"{stem}.backbone.safetensors")


def _check(cfg: FinetuneConfig, divisor: int) -> None:
    if any(s % divisor for s in cfg.patch_size_vox):
        raise UserInputError(f"patch size {cfg.patch_size_vox} is not a multiple of {divisor} (the backbone's size "
                             "divisor) along every axis")  # fmt: skip


def _dice_per_class(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..num_classes-1 present in the reference (NaN where absent from it)."""
    scores = []
    for c in range(1, num_classes):
        ref, pred = reference == c, prediction == c
        total = int(ref.sum()) + int(pred.sum())
        scores.append(float("nan") if not ref.any() else 2.0 * float((ref & pred).sum()) / max(total, 1))
    return scores


@torch.no_grad()
def _predict_logits(network: SegmentationNetwork, volume, cfg: FinetuneConfig, device: torch.device,
                    autocast) -> torch.Tensor:  # fmt: skip
    """Class logits ``(C, D, H, W)`` of a whole prepared volume (sliding window, on the CPU)."""
    from DiffusionSegLib.features.extractor import CPU_WINDOWS_PER_PASS
    from DiffusionSegLib.windows import sliding_window_inference

    inputs = volume.inputs.tensor
    if volume.inputs.num_coords and not cfg.use_coordinates:
        inputs = inputs.clone()
        inputs[:, 1 : 1 + volume.inputs.num_coords] = 0.0
    with autocast:
        logits = sliding_window_inference(inputs, cfg.patch_size_vox, CPU_WINDOWS_PER_PASS, network,
                                          overlap=cfg.overlap, mode="gaussian", sw_device=device,
                                          device="cpu")  # fmt: skip
    return logits[0].float()


@torch.no_grad()
def _validate(network: SegmentationNetwork, volumes, cfg: FinetuneConfig, device: torch.device,
              num_classes: int, autocast=None) -> float:  # fmt: skip
    from DiffusionSegLib.precision import autocast_context

    autocast = autocast if autocast is not None else autocast_context(cfg.precision, device)
    network.eval()
    means = []
    for volume in volumes:
        prediction = _predict_logits(network, volume, cfg, device, autocast).argmax(0).numpy()
        means.append(np.nanmean(_dice_per_class(prediction, volume.classes, num_classes)))
    network.train()
    return float(np.mean(means))


@torch.no_grad()
def _self_labels(network: SegmentationNetwork, volume, cfg: FinetuneConfig, device: torch.device,
                 autocast) -> np.ndarray:  # fmt: skip
    """The network's own labels of an unlabeled volume: its predicted class where the softmax probability is at
    least ``cfg.pseudo_confidence``, :data:`~DiffusionSegLib.probe.sampling.IGNORE` elsewhere."""
    from DiffusionSegLib.probe.sampling import IGNORE

    network.eval()
    confidence, prediction = torch.softmax(_predict_logits(network, volume, cfg, device, autocast), 0).max(0)
    network.train()
    return np.where(confidence.numpy() >= cfg.pseudo_confidence, prediction.numpy(), IGNORE).astype(np.uint8)


def _weight_average(network: nn.Module, cfg: FinetuneConfig):
    """The exponential moving average of ``network``'s weights and buffers (``cfg.ema_decay``; None when off)."""
    if not cfg.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    def average(averaged: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # counters (BatchNorm's num_batches_tracked): the current value
            return current
        decay = min(cfg.ema_decay, (1.0 + float(updates)) / (10.0 + float(updates)))
        return averaged * decay + current * (1.0 - decay)

    return AveragedModel(network, avg_fn=average, use_buffers=True)


def _parameter_groups(network: SegmentationNetwork, cfg: FinetuneConfig) -> list[dict]:
    """The head at the peak rate, the backbone at ``backbone_lr_scale`` of it (one group when that is 1)."""
    if cfg.backbone_lr_scale == 1.0:
        return [{"params": list(network.parameters()), "lr_scale": 1.0}]
    head = list(network.head.parameters())
    head_ids = {id(p) for p in head}
    rest = [p for p in network.parameters() if id(p) not in head_ids]
    return [{"params": head, "lr_scale": 1.0}, {"params": rest, "lr_scale": cfg.backbone_lr_scale}]


def _state(network, optimiser, step, planned, best, history, losses, rng, elapsed, cfg, names, average) -> dict:
    return {"network": network.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
            "planned_steps": planned, "best": best, "history": history, "losses": losses[-50:],
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "elapsed_s": elapsed, "config": cfg.to_dict(),
            "cases": list(names), "average": average.state_dict() if average is not None else None}  # fmt: skip


def _batch_sources(labeled: list, pseudo: list, cfg: FinetuneConfig) -> list[list]:
    """Which pool each patch of a batch comes from: ``unlabeled_share`` of the batch (rounded, at least one
    labeled patch) from the pseudo-labeled volumes when there are any."""
    if not pseudo:
        return [labeled] * cfg.batch_size
    from_pseudo = min(round(cfg.unlabeled_share * cfg.batch_size), cfg.batch_size - 1)
    return [labeled] * (cfg.batch_size - from_pseudo) + [pseudo] * from_pseudo


def _with_pseudo_labels(volumes: list, labels: list[np.ndarray], cfg: FinetuneConfig, why_unused: str) -> list:
    """The unlabeled volumes given their pseudo-labels (background near organs and unsure voxels ignored,
    ``cfg.pseudo_background_margin_mm``); those left without an organ voxel are dropped with a warning."""
    from DiffusionSegLib.cohort.pseudo_labels import ignore_background_near_organs
    from DiffusionSegLib.probe.sampling import IGNORE

    kept = []
    for volume, classes in zip(volumes, labels, strict=True):
        spacing_zyx = volume.working.GetSpacing()[::-1]
        _set_classes(volume, ignore_background_near_organs(classes, cfg.pseudo_background_margin_mm, spacing_zyx,
                                                            IGNORE))  # fmt: skip
        if volume.present - {0}:
            kept.append(volume)
        else:
            log.warning("%s: %s; not used", volume.name, why_unused)
    return kept


def _set_classes(volume, classes: np.ndarray) -> None:
    """Give a prepared volume new (pseudo-)labels; its cached ``present`` classes follow."""
    volume.classes = classes
    volume.__dict__.pop("present", None)


def _keep_registered(registered: list[tuple], relabeled: list) -> list:
    """The volumes self-training left without a confident organ voxel, given back their registration labels."""
    kept = {id(v) for v in relabeled}
    restored = []
    for volume, classes in registered:
        if id(volume) not in kept:
            _set_classes(volume, classes)
            restored.append(volume)
    if restored:
        log.info("self-training: %d volumes keep their registration labels", len(restored))
    return restored


def _unlabeled_volumes(images, names, trainable, feature_cfg, bpr, device, report, stop) -> list:
    """The unlabeled scans prepared on the working grid, every voxel ignored until labeled."""
    from DiffusionSegLib.probe.sampling import prepare_unlabeled_volume

    volumes = []
    for i, (image, name) in enumerate(zip(images, names, strict=True)):
        if stop():
            raise FinetuneCancelled("fine-tuning cancelled while preparing the unlabeled volumes")
        report(0.05, f"preparing unlabeled volume {i + 1}/{len(images)}")
        volumes.append(prepare_unlabeled_volume(image, trainable, feature_cfg, name, bpr=bpr, device=device))
    return volumes


def _label_by_self_training(network, volumes, cfg: FinetuneConfig, device, autocast, stored: Path | None,
                            report) -> list:  # fmt: skip
    """Give ``volumes`` the network's confident labels (:func:`_self_labels`) and return those with any organ
    voxel. The labels are stored in ``stored`` (a resumed run reads them back instead of labeling again)."""
    names = [v.name for v in volumes]
    if stored is not None and stored.is_file():
        with np.load(stored) as data:
            if list(data["names"]) == names:
                labels = [data[f"volume_{i}"] for i in range(len(volumes))]
            else:
                labels = None
    else:
        labels = None
    if labels is None:
        labels = []
        for i, volume in enumerate(volumes):
            report(None, f"self-training: labeling unlabeled volume {i + 1}/{len(volumes)}")
            labels.append(_self_labels(network, volume, cfg, device, autocast))
        if stored is not None:
            from DiffusionSegLib.checkpoint import atomic_write

            stored.parent.mkdir(parents=True, exist_ok=True)
            arrays = {f"volume_{i}": a for i, a in enumerate(labels)}
            def write(tmp: str) -> None:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, names=np.asarray(names), **arrays)

            atomic_write(stored, write)
    kept = _with_pseudo_labels(volumes, labels, cfg, "no organ voxel predicted confidently")
    from DiffusionSegLib.probe.sampling import IGNORE

    log.info("self-training: %d unlabeled volumes labeled by the network (%.0f %% of their voxels confident)",
             len(kept), 100.0 * np.mean([float((v.classes != IGNORE).mean()) for v in volumes]))  # fmt: skip
    return kept


def _pseudo_labeled_volumes(images, names, atlases, trainable, feature_cfg, cfg: FinetuneConfig, bpr, device,
                            progress, report, stop, cache_dir) -> tuple[list, float, float, list]:  # fmt: skip
    """The unlabeled scans prepared and labeled by registration of the labeled ``atlases`` (fused by
    ``cfg.pseudo_fusion``),
    the seconds it all took, the registrations' own seconds (a cached registration counts the seconds it took
    when computed, not the moment it takes to read) and, per scan, ``(working key, name, locally weighted vote)``
    for the model's cohort file (:mod:`DiffusionSegLib.cohort.fusion`). Volumes where no voxel got a label are
    dropped."""
    from DiffusionSegLib.cohort.fusion import registration_vote, working_key
    from DiffusionSegLib.cohort.pseudo_labels import PropagationCache, fuse, propagate, volume_scan
    from DiffusionSegLib.cohort.registration import RegistrationConfig, require_ants, windowed
    from DiffusionSegLib.probe.sampling import IGNORE

    require_ants()
    started = time.perf_counter()

    def scan_of(volume):
        return volume_scan(volume, cfg.registration_bpr_start)

    volumes = _unlabeled_volumes(images, names, trainable, feature_cfg, bpr, device, report, stop)
    prepared_s = time.perf_counter() - started
    registration = RegistrationConfig(transform=cfg.registration, bpr_start=cfg.registration_bpr_start, seed=cfg.seed)
    results = propagate([scan_of(v) for v in volumes], [(scan_of(a), a.classes) for a in atlases], registration,
                        cache=PropagationCache(cache_dir), progress=progress,
                        report=lambda f, m: report(0.05, m), should_stop=stop)  # fmt: skip
    if results is None:
        raise FinetuneCancelled("fine-tuning cancelled while registering the unlabeled volumes")
    fused, votes = [], []
    for volume, row in zip(volumes, results, strict=True):
        target, spacing = windowed(volume.working, registration.window_hu), volume.working.GetSpacing()[::-1]
        fused.append(fuse(row, target, IGNORE, cfg.pseudo_fusion, spacing_mm=spacing))
        votes.append((working_key(volume.working), volume.name, registration_vote(row, target, spacing_mm=spacing)))
    kept = _with_pseudo_labels(volumes, fused, cfg, "no organ label survived registration")
    registration_s = sum(p.seconds for row in results for p in row)
    seconds = prepared_s + registration_s
    log.info("%d unlabeled volumes labeled by registration (%.0f s; %.0f %% of their voxels labeled)", len(kept),
             seconds, 100.0 * np.mean([float((v.classes != IGNORE).mean()) for v in volumes]))  # fmt: skip
    return kept, seconds, registration_s, votes


def finetune(cases: Sequence[tuple[sitk.Image, sitk.Image]], labels: Sequence[OrganLabel], backbone,
             output: str | os.PathLike, cfg: FinetuneConfig | None = None, *, run_dir: str | os.PathLike | None = None,
             case_names: Sequence[str] | None = None, bpr=None, progress: bool = True,
             progress_callback: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None, unlabeled: Sequence[sitk.Image] = (),
             unlabeled_names: Sequence[str] | None = None,
             registration_cache: str | os.PathLike | None = None) -> FinetuneResult:  # fmt: skip
    """Fine-tune a backbone and a segmentation head end to end on labeled CTs (and the unlabeled scans of their
    cohort) and write the model.

    With ``unlabeled`` scans, every labeled scan is registered to every unlabeled one (ANTs, started from the BPR
    coordinates; :mod:`DiffusionSegLib.cohort`) and the warped labels, kept where all labeled scans agree, train
    the network beside the true labels (``cfg.unlabeled_share`` of each batch; disagreeing voxels are left out of
    the loss). With ``cfg.pseudo_labels == "self-training"`` there is no registration: after
    ``cfg.self_training_start`` of the run the network labels the unlabeled scans itself, confident voxels only;
    with ``"registration+self-training"`` the network trained on registration's labels relabels them at that point.
    The budget in minutes includes the unlabeled scans' preparation, registration and labeling. With registration,
    the registrations' locally weighted vote of each unlabeled scan goes beside the model (``x.cohort.npz``), and
    ``segment`` of one of those scans fuses it with the network (:mod:`DiffusionSegLib.cohort.fusion`).

    Args:
        cases: ``(ct, label map)`` pairs, each label map on its CT's grid with the ids of ``labels``.
        labels: the organs to learn (other ids count as background).
        backbone: the pretrained :class:`~DiffusionSegLib.pretrain.export.BackboneBundle` (its architecture, HU
            window, BPR and, with ``cfg.init == "pretrained"``, its weights).
        output: the model file to write (a probe file); the fine-tuned backbone goes beside it
            (:func:`backbone_output_path`).
        cfg: settings; default :class:`FinetuneConfig`.
        run_dir: folder of the resumable snapshot ``last.pt`` (None: no snapshots). An existing snapshot of the
            same settings and cases is resumed; one of other settings is refused.
        case_names: names of the cases (recorded; default ``case 1``...).
        bpr: the BPR for the coordinates (default: the one the backbone was pretrained with).
        progress: show a tqdm bar.
        progress_callback: called as ``(fraction, message)``.
        should_stop: polled every step; True writes the best model so far (and the snapshot) and returns with
            ``cancelled=True``.
        unlabeled: CTs of the same cohort without labels (their labels, if any exist, are never read).
        unlabeled_names: their names (recorded; default ``unlabeled 1``...).
        registration_cache: folder keeping each registration for reuse (default: ``run_dir/registrations``).

    Raises:
        UserInputError: no cases, an unusable CT or label map, an organ absent from every case, a patch not a
            multiple of the backbone's divisor, or a snapshot of other settings in ``run_dir``.
        FinetuneCancelled: stopped before the first step (nothing is written).
    """
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from DiffusionSegLib.checkpoint import load_training_state, save_training_state
    from DiffusionSegLib.features import FeatureConfig, resolve_device
    from DiffusionSegLib.features.extractor import _bpr_model
    from DiffusionSegLib.precision import autocast_context
    from DiffusionSegLib.probe.extent import record_field_of_view
    from DiffusionSegLib.probe.sampling import prepare_labeled_volume
    from DiffusionSegLib.probe.train import _check_labels, build_head

    cfg = (cfg or FinetuneConfig()).as_trained(unlabeled=bool(len(unlabeled)))
    labels = list(labels)
    if not cases:
        raise UserInputError("no labeled cases given; fine-tuning needs at least one CT with its label map")
    names = list(case_names) if case_names is not None else [f"case {i + 1}" for i in range(len(cases))]
    cohort_names = (list(unlabeled_names) if unlabeled_names is not None
                    else [f"unlabeled {i + 1}" for i in range(len(unlabeled))])  # fmt: skip
    recorded_names = names + [f"unlabeled: {n}" for n in cohort_names]
    _check(cfg, backbone.model.config.size_divisor)
    report = progress_callback or (lambda fraction, message: None)
    stop = should_stop or (lambda: False)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    snapshot = Path(run_dir) / SNAPSHOT if run_dir is not None else None
    state = load_training_state(snapshot) if snapshot is not None and snapshot.is_file() else None
    if state is not None and (state["config"] != cfg.to_dict() or state["cases"] != recorded_names):
        raise UserInputError(f"'{snapshot}' holds a fine-tuning run of other settings or cases; choose another run "
                             "folder or delete it to start over")  # fmt: skip

    bpr_module = _bpr_model(backbone, bpr) if backbone.use_bpr else None
    trainable = finetune_backbone_bundle(backbone, cfg)
    feature_cfg = FeatureConfig(timestep=cfg.timestep)
    volumes = []
    for i, (image, label) in enumerate(cases):
        if stop():
            raise FinetuneCancelled("fine-tuning cancelled while preparing the volumes")
        report(0.05 * i / len(cases), f"preparing volume {i + 1}/{len(cases)}")
        volumes.append(prepare_labeled_volume(image, label, labels, trainable, feature_cfg, names[i],
                                              bpr=bpr_module, device=device))  # fmt: skip
    _check_labels(labels, [v.present for v in volumes])
    held_out = cfg.val_volumes if len(volumes) >= 3 and len(volumes) > cfg.val_volumes else 0
    train_volumes, val_volumes = volumes[: len(volumes) - held_out], volumes[len(volumes) - held_out :]
    if not held_out and cfg.val_volumes:
        log.info("%d case(s): none is held out for validation (that needs 3 or more); the last step's model is kept",
                 len(volumes))  # fmt: skip
    _check_labels(labels, [v.present for v in train_volumes])
    timings["prepare"] = time.perf_counter() - clock
    pseudo_volumes, cohort_seconds, awaiting_labels, votes = [], 0.0, [], []
    if len(unlabeled) and cfg.pseudo_labels == "self-training":  # labeled later, by the network itself
        awaiting_labels = _unlabeled_volumes(unlabeled, cohort_names, trainable, feature_cfg, bpr_module, device,
                                             report, stop)  # fmt: skip
        cohort_seconds = time.perf_counter() - clock - timings["prepare"]
        timings["cohort"] = cohort_seconds
    elif len(unlabeled):
        pseudo_volumes, cohort_seconds, timings["registration"], votes = _pseudo_labeled_volumes(
            unlabeled, cohort_names, train_volumes, trainable, feature_cfg, cfg, bpr_module, device, progress, report,
            stop, registration_cache if registration_cache is not None else (
                Path(run_dir) / "registrations" if run_dir is not None else None))  # fmt: skip
        timings["cohort"] = cohort_seconds
        if cfg.pseudo_labels == "registration+self-training":  # the network relabels them later
            awaiting_labels = list(pseudo_volumes)

    torch.manual_seed(cfg.seed)
    head = build_head("linear", trainable.feature_channels, len(labels) + 1)
    network = SegmentationNetwork(trainable, head, cfg.timestep).to(device)
    network.train()
    optimiser = torch.optim.AdamW(_parameter_groups(network, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    average = _weight_average(network, cfg)
    evaluated = average.module if average is not None else network  # what is validated, kept and written
    loss_fn = (DiceCELoss(to_onehot_y=True, softmax=True, batch=True) if not (pseudo_volumes or awaiting_labels)
               else MaskedDiceCELoss())  # fmt: skip
    autocast = autocast_context(cfg.precision, device)  # resolved once, re-entered every step
    augment = PatchAugment(cfg, trainable.pretrain.data.window_hu, len(labels) + 1)
    rng = np.random.default_rng(cfg.seed)
    step, elapsed, history, losses = 0, 0.0, [], []
    planned = cfg.steps if not cfg.budget_minutes else 0
    best = {"score": -1.0, "step": 0, "network": None}
    elapsed = cohort_seconds  # the budget includes the cohort's preparation and registration
    if state is not None:
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        if average is not None:
            average.load_state_dict(state["average"])
        step, planned, best, history = state["step"], state["planned_steps"], state["best"], state["history"]
        losses = list(state["losses"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        elapsed = float(state["elapsed_s"])
        log.info("resuming fine-tuning from %s at step %d of %d", snapshot, step, planned)

    def save_snapshot() -> None:
        if snapshot is not None:
            save_training_state(snapshot, _state(network, optimiser, step, planned, best, history, losses, rng,
                                                 elapsed, cfg, recorded_names, average))  # fmt: skip

    budget_s = cfg.budget_minutes * 60.0
    bar = tqdm(total=planned or None, initial=step, desc="fine-tune", disable=not progress, leave=False)
    cancelled, start = False, (step, elapsed)  # where this process's rate is measured from

    def finished() -> bool:
        if budget_s:
            return elapsed >= budget_s or bool(cfg.steps and step >= cfg.steps)
        return step >= planned

    def share_done() -> float:
        shares = [elapsed / budget_s] if budget_s else []
        if cfg.steps:
            shares.append(step / cfg.steps)
        return max(shares) if shares else step / max(planned, 1)

    while not finished():
        if stop():
            cancelled = True
            break
        started = time.perf_counter()
        if awaiting_labels and share_done() >= cfg.self_training_start:
            registered = [(v, v.classes) for v in pseudo_volumes]  # empty unless registration labeled them first
            pseudo_volumes = _label_by_self_training(
                evaluated, awaiting_labels, cfg, device, autocast,
                Path(run_dir) / SELF_TRAINING_LABELS if run_dir is not None else None,
                lambda fraction, message: report(0.05 + 0.95 * share_done(), message))  # fmt: skip
            pseudo_volumes += _keep_registered(registered, pseudo_volumes)
            awaiting_labels = []
            timings["self_labels"] = time.perf_counter() - started
        peak_share = learning_rate_at(step + 1, planned, cfg, elapsed / budget_s if budget_s else None)
        for group in optimiser.param_groups:
            group["lr"] = peak_share * group.get("lr_scale", 1.0)  # snapshots from before the groups: 1
        batch = [augment(source[int(rng.integers(len(source)))], rng)
                 for source in _batch_sources(train_volumes, pseudo_volumes, cfg)]  # fmt: skip
        windows = torch.stack([b[0] for b in batch]).to(device)
        targets = torch.stack([b[1] for b in batch]).to(device)
        with autocast:
            logits = network(windows)
        loss = loss_fn(logits.float(), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if average is not None:
            average.update_parameters(network)
        step += 1
        losses.append(float(loss.detach()))
        elapsed += time.perf_counter() - started
        last = finished()
        if step % cfg.val_every == 0 or last:
            val_start = time.perf_counter()
            score = (_validate(evaluated, val_volumes, cfg, device, len(labels) + 1, autocast) if val_volumes
                     else float("nan"))
            elapsed += time.perf_counter() - val_start
            record = {"step": step, "minutes": round(elapsed / 60.0, 3), "train_loss": float(np.mean(losses[-50:])),
                      "val_dice": score, "lr": optimiser.param_groups[0]["lr"]}  # fmt: skip
            history.append(record)
            shown = {"loss": f"{record['train_loss']:.3f}"}
            if np.isfinite(score):  # no held-out case (fewer than 3 cases), or none holds the organs: no score
                shown["val"] = f"{score:.3f}"
            bar.set_postfix(shown)
            if val_volumes and score > best["score"]:
                best = {"score": score, "step": step, "network": copy.deepcopy(evaluated.state_dict())}
        if budget_s:  # the step count the budget will allow at this process's rate (for progress only)
            rate = (elapsed - start[1]) / max(step - start[0], 1)
            estimate = step if last else step + max(int((budget_s - elapsed) / max(rate, 1e-6)), 1)
            planned = min(estimate, cfg.steps) if cfg.steps else estimate
            bar.total = planned
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or last:
            save_snapshot()
        report(0.05 + 0.95 * (elapsed / budget_s if budget_s else step / max(planned, 1)),
               f"fine-tuning step {step}/{planned or '?'} (loss {losses[-1]:.3f})")  # fmt: skip
    bar.close()
    if step == 0:
        raise FinetuneCancelled("fine-tuning cancelled before the first step")
    if cancelled:
        save_snapshot()
    timings["train"] = elapsed
    if val_volumes and best["network"] is not None:
        if not history or history[-1]["step"] != step:  # cancelled between validations: score the latest too
            score = _validate(evaluated, val_volumes, cfg, device, len(labels) + 1, autocast)
            history.append({"step": step, "minutes": round(elapsed / 60.0, 3),
                            "train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
                            "val_dice": score, "lr": optimiser.param_groups[0]["lr"]})  # fmt: skip
            if score > best["score"]:
                best = {"score": score, "step": step, "network": copy.deepcopy(evaluated.state_dict())}
        network.load_state_dict(best["network"])
        best_step = best["step"]
    else:
        if average is not None:
            network.load_state_dict(average.module.state_dict())
        best_step = step
    result = _write(network, trainable, backbone, labels, cfg, output, history, step, planned, best_step, cancelled,
                    recorded_names, timings, record_field_of_view(cases, labels))  # fmt: skip
    _write_cohort(result, votes, len(labels) + 1, cfg)
    return result


def _write_cohort(result: FinetuneResult, votes: list, num_classes: int, cfg: FinetuneConfig) -> None:
    """Beside the model, the registrations' vote of each cohort scan (``segment`` fuses it with the network for
    those scans); without registrations, a cohort file left by an earlier model of that name is removed."""
    from DiffusionSegLib.cohort.fusion import cohort_path, write_cohort

    path = cohort_path(result.probe_path)
    if not votes:
        path.unlink(missing_ok=True)
        return
    registration = {"transform": cfg.registration, "bpr_start": cfg.registration_bpr_start, "seed": cfg.seed,
                    "fusion": "weighted-vote"}  # fmt: skip
    write_cohort(path, votes, result.backbone.sha256, num_classes, registration)
    result.cohort_path = path
    log.info("wrote %s (the registrations of %d cohort scans, fused with the network when segment meets them)",
             path, len(votes))  # fmt: skip


def _write(network, trainable, source, labels, cfg, output, history, step, planned, best_step, cancelled, names,
           timings, field_of_view) -> FinetuneResult:  # fmt: skip
    from DiffusionSegLib.probe import ProbeConfig, TrainedProbe, save_probe
    from DiffusionSegLib.probe.train import backbone_record
    from DiffusionSegLib.pretrain.export import export_backbone, load_backbone

    network.eval()
    if source.use_bpr and not cfg.use_coordinates:  # trained on zero coordinates: make the model ignore them
        with torch.no_grad():
            network.backbone.stem.weight[:, 1:4] = 0.0
    output = Path(output)
    backbone_path = backbone_output_path(output)
    from DiffusionSegLib.features import resolve_device
    from DiffusionSegLib.precision import resolve_precision

    extra = {"finetuned_from": source.sha256, "finetune": cfg.to_dict(), "cases": list(names),
             "precision": resolve_precision(cfg.precision, resolve_device(cfg.device))}  # fmt: skip
    # the coordinates input is the source backbone's BPR (checked by its hash when the BPR was loaded)
    export_backbone(backbone_path, trainable.pretrain, network.backbone.cpu(), steps=step, bpr_path=None,
                    bpr_sha256=source.bpr_sha256, val_loss=None, extra=extra)  # fmt: skip
    bundle = load_backbone(backbone_path)
    # the head as a probe of the fine-tuned backbone; its "validation loss" is 1 - the held-out mean Dice
    probe_cfg = ProbeConfig(head="linear", timestep=cfg.timestep, patch_size_vox=cfg.patch_size_vox,
                            window_vox=cfg.patch_size_vox, overlap=cfg.overlap, steps=step, seed=cfg.seed,
                            device=cfg.device)  # fmt: skip
    probe = TrainedProbe(network.head.cpu().eval(), probe_cfg, list(labels), backbone_record(bundle),
                         [dict(h) for h in history], best_step,
                         1.0 - max((h["val_dice"] for h in history if h["step"] == best_step), default=float("nan")),
                         cancelled, field_of_view)  # fmt: skip
    save_probe(output, probe, finetune=dict(extra, planned_steps=planned, steps=step))
    log.info("wrote %s and %s (step %d of %d, kept step %d)", output, backbone_path, step, planned, best_step)
    return FinetuneResult(probe, bundle, output, backbone_path, history, step, planned, best_step, cancelled, timings)
