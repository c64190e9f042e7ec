"""The pretraining loop: one process or many (torchrun/DDP), resumable exactly, logged as JSONL.

Snapshot ``last.pt`` (model, optimiser, LR schedule, sampler and noise RNG states, step) is written atomically
every ``checkpoint_every`` steps, at the end, and when the run is interrupted (Ctrl-C or SIGTERM); a run started
again with the same output folder continues from it and draws the same patches and noise an uninterrupted
run would. The frozen backbone is exported to ``backbone.safetensors`` with its full config.
"""

from __future__ import annotations

import gc
import glob
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from DiffusionSegLib.checkpoint import append_log, load_training_state, save_training_state, truncate_log
from DiffusionSegLib.data.datasets import find_images
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.pretrain.config import PretrainConfig
from DiffusionSegLib.pretrain.data import PatchSampler, load_training_volumes
from DiffusionSegLib.pretrain.export import export_backbone
from DiffusionSegLib.pretrain.distributed import DistributedContext, cleanup_distributed, setup_distributed
from DiffusionSegLib.pretrain.methods import PretrainMethod, build_method

__all__ = ["pretrain_backbone", "PretrainResult", "resolve_images"]

log = logging.getLogger(__name__)
SNAPSHOT_NAME = "last.pt"
WEIGHTS_NAME = "backbone.safetensors"
LOG_NAME = "log.jsonl"


def intermediate_weights_name(step: int) -> str:
    """File name of the backbone exported at ``step`` (``TrainingConfig.export_at``)."""
    return f"backbone_step{step:05d}.safetensors"


@dataclass
class PretrainResult:
    weights: Path | None
    step: int
    losses: list[float]
    """Training loss of each step run in this invocation."""
    val_loss: float | None


def resolve_images(entries: list[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of volumes."""
    paths: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            paths.extend(find_images(path))
        elif path.exists():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(entry))
            if not matches:
                raise UserInputError(f"training images: nothing found at {entry!r}")
            paths.extend(matches)
    return sorted(dict.fromkeys(paths))


def _lr_factor(cfg: PretrainConfig, step: int) -> float:
    warmup = cfg.optim.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.optim.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.training.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _coordinate_function(cfg: PretrainConfig, device: torch.device):
    """Working-grid HU volume (1, 1, D, H, W) -> BPR map (1, 3, D, H, W) with the frozen BPR, or None."""
    if not cfg.use_bpr:
        return None, None
    from DiffusionSegLib.bpr import coordinate_channels, default_bpr_path, load_bpr

    path = Path(cfg.bpr_weights) if cfg.bpr_weights else default_bpr_path()
    model, bpr_cfg = load_bpr(path)
    if tuple(bpr_cfg.spacing_mm) != tuple(cfg.preprocess.spacing_mm):
        raise UserInputError(f"BPR {path} works at {tuple(bpr_cfg.spacing_mm)} mm but pretraining uses "
                             f"{tuple(cfg.preprocess.spacing_mm)} mm; use the same working spacing")  # fmt: skip
    model.to(device).eval()
    return (lambda hu: coordinate_channels(hu, model, device=device).cpu()), path


class _StopFlag:
    """Turns SIGTERM into a graceful stop (snapshot, then exit) instead of a lost run."""

    def __init__(self) -> None:
        self.stop = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. inside Slicer's worker)
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def pretrain_backbone(cfg: PretrainConfig, *, resume: bool = True, max_steps_this_run: int | None = None,
                      export: bool = True) -> PretrainResult:  # fmt: skip
    """Pretrain a backbone with ``cfg.method`` on the configured unlabeled CT.

    Args:
        cfg: the full configuration.
        resume: continue from ``output_dir/last.pt`` when it exists (otherwise that file is refused, so an
            earlier run is never overwritten silently).
        max_steps_this_run: stop (with a snapshot) after this many steps even if ``cfg.training.steps`` is not
            reached — for time-sliced jobs; a later call resumes.
        export: write ``backbone.safetensors`` when training is complete.

    Returns:
        The exported weights path (None until training is complete), the step reached, this run's losses and the
        last validation loss.
    """
    context = setup_distributed(cfg.training.device)
    try:
        result = _run(cfg, context, resume, max_steps_this_run, export)
        if context.enabled:
            dist.barrier()  # no rank tears gloo down while another still exports (it aborted one rank in CI)
        return result
    finally:
        gc.collect()  # DDP's reducer holds the process group: free it now, not during interpreter shutdown
        cleanup_distributed()


def _run(cfg: PretrainConfig, ctx: DistributedContext, resume: bool, max_steps_this_run: int | None,
         export: bool) -> PretrainResult:  # fmt: skip
    out_dir = Path(cfg.output_dir)
    snapshot_path = out_dir / SNAPSHOT_NAME
    if snapshot_path.exists() and not resume:
        raise UserInputError(f"{snapshot_path} exists: resume it, or choose another output folder")
    torch.manual_seed(cfg.training.seed + ctx.rank)
    method = build_method(cfg).to(ctx.device)
    use_cuda = ctx.device.type == "cuda"
    if use_cuda and cfg.training.channels_last:
        method = method.to(memory_format=torch.channels_last_3d)
    method.generator = torch.Generator(device="cpu").manual_seed(cfg.training.seed * 1000 + ctx.rank)

    state = load_training_state(snapshot_path) if snapshot_path.exists() else None
    if state is not None:  # snapshots from before the precision setting resume as "auto"
        state["config"].get("training", {}).setdefault("precision", "auto")
    if state is not None and state["config"] != cfg.to_dict():
        changed = sorted(k for k in cfg.to_dict() if state["config"].get(k) != cfg.to_dict()[k])
        log.warning("resuming %s with a changed config (sections: %s)", snapshot_path, ", ".join(changed))
    if cfg.method == "random":
        return _finish(cfg, ctx, method, 0, [], None, export)
    if state is not None and state["step"] >= cfg.training.steps:
        method.load_state_dict(state["model"])
        return _finish(cfg, ctx, method, state["step"], [], state.get("val_loss"), export)

    coordinate_fn, bpr_path = _coordinate_function(cfg, ctx.device)
    images = resolve_images(cfg.data.images)
    n_val = min(cfg.data.val_volumes, len(images) - 1) if cfg.data.val_patches else 0
    train_images, val_images = images[: len(images) - n_val], images[len(images) - n_val :]
    show = cfg.training.progress and ctx.is_main
    train_volumes = load_training_volumes(train_images, cfg.preprocess, coordinate_fn, progress=show)
    sampler = PatchSampler(train_volumes, cfg.data.patch_size_vox, cfg.data.window_hu, seed=cfg.training.seed + 7919 * ctx.rank,
                           clip_probability=cfg.data.clip_probability)  # fmt: skip
    val_batch = None
    if val_images:
        val_volumes = load_training_volumes(val_images, cfg.preprocess, coordinate_fn, progress=False)
        val_sampler = PatchSampler(val_volumes, cfg.data.patch_size_vox, cfg.data.window_hu, seed=12345)
        val_batch = method.draw(val_sampler, cfg.data.val_patches)

    optimizer = torch.optim.AdamW(method.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
    step, val_loss = 0, None
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"][ctx.rank])
        method.generator.set_state(state["generator"][ctx.rank])
        torch.set_rng_state(state["torch_rng"][ctx.rank])
        step, val_loss = state["step"], state.get("val_loss")
        if ctx.is_main:
            truncate_log(out_dir / LOG_NAME, step)
            log.info("resumed %s at step %d", snapshot_path, step)
    model = DistributedDataParallel(method, find_unused_parameters=cfg.method == "contrastive") if ctx.enabled else method

    def snapshot() -> None:
        sampler_states = _gather(ctx, sampler.state_dict())
        generator_states = _gather(ctx, method.generator.get_state())
        torch_states = _gather(ctx, torch.get_rng_state())
        if ctx.is_main:
            save_training_state(snapshot_path, {
                "step": step, "config": cfg.to_dict(), "model": method.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": sampler_states, "generator": generator_states, "torch_rng": torch_states,
                "val_loss": val_loss, "bpr_weights": str(bpr_path) if bpr_path else None,
            })  # fmt: skip

    from tqdm.auto import tqdm

    end = cfg.training.steps if max_steps_this_run is None else min(cfg.training.steps, step + max_steps_this_run)
    losses: list[float] = []
    from DiffusionSegLib.precision import autocast_context

    autocast = autocast_context(_precision(cfg, ctx.device), ctx.device)
    progress = tqdm(total=cfg.training.steps, initial=step, desc=f"pretrain {cfg.method}", disable=not show)
    started = time.perf_counter()
    with _StopFlag() as flag:
        try:
            while step < end and not _any(ctx, flag.stop):
                method.train()
                batch = {k: _to_device(v, ctx.device, use_cuda and cfg.training.channels_last)
                         for k, v in method.draw(sampler, cfg.training.batch_size).items()}  # fmt: skip
                with autocast:
                    loss = model(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(float(loss.detach()))
                progress.update(1)
                record = None
                if val_batch is not None and (step % cfg.training.val_every == 0 or step == cfg.training.steps):
                    val_loss = _validate(method, val_batch, ctx.device, autocast)
                    record = {"val_loss": val_loss}
                if step % cfg.training.log_every == 0 or record is not None or step == end:
                    mean = float(_mean(ctx, np.mean(losses[-cfg.training.log_every :])))
                    record = {"step": step, "loss": mean, "lr": scheduler.get_last_lr()[0],
                              "seconds": round(time.perf_counter() - started, 2)} | (record or {})  # fmt: skip
                    progress.set_postfix(loss=f"{mean:.4f}")
                    if ctx.is_main:
                        append_log(out_dir / LOG_NAME, record)
                if step % cfg.training.checkpoint_every == 0:
                    snapshot()
                if step in cfg.training.export_at and step < cfg.training.steps and ctx.is_main:
                    export_backbone(out_dir / intermediate_weights_name(step), cfg, method.backbone, steps=step,
                                    bpr_path=bpr_path, val_loss=val_loss,
                                    extra={"precision": _precision(cfg, ctx.device)})  # fmt: skip
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving a snapshot to resume from", step)
            snapshot()
            raise
    progress.close()
    snapshot()
    if step < cfg.training.steps:
        return PretrainResult(None, step, losses, val_loss)
    return _finish(cfg, ctx, method, step, losses, val_loss, export, bpr_path)


def _precision(cfg, device: torch.device) -> str:
    """The forward pass's precision, resolved (``bf16 = false`` forces float32)."""
    from DiffusionSegLib.precision import resolve_precision

    return resolve_precision(cfg.training.precision if cfg.training.bf16 else "float32", device)


def _finish(cfg, ctx, method, step, losses, val_loss, export, bpr_path=None) -> PretrainResult:
    weights = None
    agree = _ranks_agree(ctx, method)
    if ctx.is_main:
        append_log(Path(cfg.output_dir) / LOG_NAME, {"step": step, "done": True, "ranks_agree": agree,
                                                       "world_size": ctx.world_size})  # fmt: skip
    if export and ctx.is_main:
        weights = export_backbone(Path(cfg.output_dir) / WEIGHTS_NAME, cfg, method.backbone, steps=step,
                                  bpr_path=bpr_path, val_loss=val_loss,
                                  extra={"precision": _precision(cfg, ctx.device)})  # fmt: skip
    return PretrainResult(weights, step, losses, val_loss)


def _to_device(value, device: torch.device, channels_last: bool):
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device, non_blocking=True)
    if channels_last and value.dim() == 5:
        value = value.contiguous(memory_format=torch.channels_last_3d)
    return value


@torch.no_grad()
def _validate(method: PretrainMethod, batch: dict, device: torch.device, autocast) -> float:
    """Validation loss on fixed patches with fixed noise (the generator's state is restored afterwards)."""
    method.eval()
    saved = method.generator.get_state()
    method.generator.manual_seed(2024)
    with autocast:
        loss = float(method({k: _to_device(v, device, False) for k, v in batch.items()}))
    method.generator.set_state(saved)
    return loss


def _gather(ctx: DistributedContext, obj) -> list:
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _any(ctx: DistributedContext, flag: bool) -> bool:
    return any(_gather(ctx, bool(flag))) if ctx.enabled else flag


def _mean(ctx: DistributedContext, value: float) -> float:
    return float(np.mean(_gather(ctx, float(value))))


def _ranks_agree(ctx: DistributedContext, method: PretrainMethod) -> bool:
    """True when every rank holds bit-identical backbone parameters (DDP must keep them in sync)."""
    if not ctx.enabled:
        return True
    digest = float(sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(method.backbone.parameters())))
    return len(set(_gather(ctx, digest))) == 1
