"""Self-supervised BPR training (``fit_bpr``), checkpointed and exactly resumable.

Files in ``out_dir``:

* ``bpr_state.pt`` — model, optimiser, step, sampling RNG and global torch RNG (written every
  ``checkpoint_every`` steps and at exit, also on Ctrl-C); a run started again with ``resume=True`` continues
  from it and gives the same weights as an uninterrupted run.
* ``bpr.safetensors`` — the weights with their config (what ``load_bpr`` / ``coords --weights`` read).
* ``bpr_log.jsonl`` — one line of loss statistics per step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch

from DiffusionSegLib.bpr.model import AnyBPR, AnyBPRConfig, bpr_config_from_dict, build_bpr, save_bpr
from DiffusionSegLib.bpr.objective import bpr_objective, slice_objective
from DiffusionSegLib.bpr.sampling import TrainingVolume, sample_crop_pairs, sample_slice_crops
from DiffusionSegLib.bpr.slice_model import SliceBodyPartRegressor
from DiffusionSegLib.checkpoint import load_training_state, save_training_state, truncate_log
from DiffusionSegLib.data.gate import read_ct
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.preprocess import PreparedVolume, PreprocessConfig, prepare_volume

__all__ = ["fit_bpr", "BPRFitResult", "load_training_volumes", "STATE_NAME", "WEIGHTS_NAME", "LOG_NAME"]

log = logging.getLogger(__name__)

STATE_NAME = "bpr_state.pt"
WEIGHTS_NAME = "bpr.safetensors"
LOG_NAME = "bpr_log.jsonl"
# fields that may differ when resuming (a run may be extended); everything else must match the checkpoint
_RESUMABLE_CHANGES = {"steps"}

ImageLike = str | os.PathLike | sitk.Image | PreparedVolume | TrainingVolume


@dataclass
class BPRFitResult:
    """What :func:`fit_bpr` returns."""

    model: AnyBPR
    step: int
    weights_path: Path
    history: list[dict] = field(default_factory=list)
    """Loss statistics of the steps run in this call."""
    seconds: float = 0.0


def load_training_volumes(images: Sequence[ImageLike], cfg: AnyBPRConfig, progress: bool = True) -> list[TrainingVolume]:
    """Put CTs on the BPR's working grid (files are read; ``PreparedVolume`` must already be on it)."""
    from tqdm import tqdm

    volumes = []
    for item in tqdm(images, desc="prepare CT", unit="scan", disable=not progress):
        if isinstance(item, TrainingVolume):
            if item.pool_zyx != cfg.pool_zyx:
                raise ValueError(f"training volume pooled by {item.pool_zyx}; the BPR pools by {cfg.pool_zyx}")
            volumes.append(item)
            continue
        if isinstance(item, PreparedVolume):
            prepared, name = item, "prepared"
        else:
            image = item if isinstance(item, sitk.Image) else read_ct(item)
            name = "" if isinstance(item, sitk.Image) else Path(item).name
            prepared = prepare_volume(image, PreprocessConfig(spacing_mm=cfg.spacing_mm))
        spacing = prepared.image.GetSpacing()
        if any(abs(a - b) > 1e-3 for a, b in zip(spacing, cfg.spacing_mm)):
            raise UserInputError(f"prepared volume has spacing {tuple(spacing)} mm; the BPR expects {cfg.spacing_mm}")
        volumes.append(TrainingVolume.from_image(prepared.image, cfg.window_hu, cfg.pool_zyx, name))
    return volumes


def _check_resumable(saved: dict, cfg: AnyBPRConfig, path: Path) -> None:
    saved = bpr_config_from_dict(saved).to_dict()  # fields added since the checkpoint take their defaults
    current = cfg.to_dict()
    differing = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if differing:
        detail = ", ".join(f"{k}: saved {saved.get(k)} vs now {current[k]}" for k in differing)
        raise UserInputError(f"cannot resume from {path}: config differs ({detail}); use another output folder "
                             "or start afresh")  # fmt: skip


def _training_loss(model: AnyBPR, volumes: list[TrainingVolume],
                   generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Sample one batch for the model's design and return its objective."""
    cfg = model.config
    if isinstance(model, SliceBodyPartRegressor):
        batch = sample_slice_crops(volumes, cfg, generator)
        return slice_objective(model.offsets(batch.images, batch.step_xy_mm), batch.centre_mm, batch.crops_per_scan)
    pairs = sample_crop_pairs(volumes, cfg.batch_pairs, cfg.patch_size_vox, generator, zoom_range=cfg.zoom_range,
                              max_shift_fraction=cfg.max_shift_fraction, far_pair_fraction=cfg.far_pair_fraction)
    output = model.coarse_pooled(pairs.images, pairs.step_mm)
    return bpr_objective(output, pairs, cfg.patch_size_vox, model.output_stride_zyx, generator,
                         objective=cfg.objective, points_per_crop=cfg.points_per_crop,
                         invariance_weight=cfg.invariance_weight)  # fmt: skip


def fit_bpr(images: Sequence[ImageLike], cfg: AnyBPRConfig, out_dir: str | os.PathLike, resume: bool = True, *,
            checkpoint_every: int = 100, progress: bool = True, max_seconds: float | None = None,
            extra_metadata: dict | None = None) -> BPRFitResult:  # fmt: skip
    """Train a Body Part Regressor on unlabeled CT (self-supervised, see :mod:`DiffusionSegLib.bpr.objective`).

    Args:
        images: CT files, ``sitk.Image`` (any grid), ``PreparedVolume`` or ``TrainingVolume`` on the working grid.
        cfg: model and training config of either design (``cfg.steps`` is the total step count of the run).
        out_dir: folder for the state, weights and log (created).
        resume: continue from ``out_dir/bpr_state.pt`` when it exists (model, optimiser, step and RNG exactly).
        checkpoint_every: save state and weights every this many steps (and always at exit).
        progress: show tqdm progress bars.
        max_seconds: stop (after saving) once this much wall time has passed; ``None``: run all steps.
        extra_metadata: more JSON metadata stored with the weights (e.g. the training data's names).

    Returns:
        A :class:`BPRFitResult` with the trained model (eval mode) and the loss history of this call.

    Raises:
        UserInputError: no images, or a checkpoint made with another config.
    """
    from tqdm import tqdm

    if not images:
        raise UserInputError("no training CT given; expected at least one volume")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every {checkpoint_every} is invalid; expected a positive integer")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, weights_path, log_path = out_dir / STATE_NAME, out_dir / WEIGHTS_NAME, out_dir / LOG_NAME

    torch.manual_seed(cfg.seed)
    model = build_bpr(cfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    if resume and state_path.exists():
        state = load_training_state(state_path)
        _check_resumable(state["config"], cfg, state_path)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        log.info("resuming BPR training from step %d (%s)", step, state_path)
    truncate_log(log_path, step)

    volumes = load_training_volumes(images, cfg, progress)
    names = [v.name for v in volumes]
    metadata = dict(extra_metadata or {}, training_volumes=names)

    def save() -> None:
        save_training_state(state_path, {"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                                         "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                                         "step": step, "config": cfg.to_dict()})  # fmt: skip
        save_bpr(weights_path, model, extra=dict(metadata, step=step))

    history: list[dict] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="bpr-train", unit="step", disable=not progress)
    try:
        with open(log_path, "a") as log_file:
            while step < cfg.steps:
                loss, stats = _training_loss(model, volumes, generator)
                for group in optimiser.param_groups:
                    group["lr"] = cfg.learning_rate_at(step)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                optimiser.step()
                step += 1
                stats = {"step": step, **{k: round(v, 6) for k, v in stats.items()}}
                history.append(stats)
                log_file.write(json.dumps(stats) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", rmse_mm=f"{stats['rmse_mm']:.1f}")
                if step % checkpoint_every == 0:
                    log_file.flush()
                    save()
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    log.info("time limit of %.0f s reached at step %d", max_seconds, step)
                    break
    finally:
        bar.close()
        save()  # at exit, also on Ctrl-C or an error: the run resumes from here
    model.eval()
    return BPRFitResult(model, step, weights_path, history, time.perf_counter() - start)
