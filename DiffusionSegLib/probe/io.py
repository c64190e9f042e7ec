"""Probe files: the head's weights (safetensors, kind ``"probe"``) with everything needed to use it.

The config holds the :class:`ProbeConfig` (head type, timestep, noise seed, draws, window), the label list
(names, colours, terminology) and the backbone record (sha256, HU window, spacing, BPR switch and hash). A
probe only makes sense on the features of the backbone it was trained on, so loading it with another backbone
is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from DiffusionSegLib.checkpoint import load_weights, read_weights_header, save_weights
from DiffusionSegLib.data.labels import labels_from_json, labels_to_json
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.probe.config import ProbeConfig
from DiffusionSegLib.probe.train import TrainedProbe, build_head

__all__ = ["save_probe", "load_probe", "read_probe_config", "check_backbone", "find_probe_backbone"]

PROBE_FORMAT = 1


def save_probe(path: str | os.PathLike, probe: TrainedProbe, finetune: dict | None = None) -> Path:
    """Write a probe (atomic).

    Args:
        path: destination, conventionally ``*.safetensors``.
        probe: the trained probe.
        finetune: for the head of a fine-tuned model, how it was fine-tuned (recorded as ``finetune``).

    Returns:
        The written path.
    """
    config = {
        "format": PROBE_FORMAT,
        "probe": probe.config.to_dict(),
        "labels": labels_to_json(probe.labels),
        "num_classes": probe.num_classes,
        "backbone": probe.backbone,
    }
    if probe.field_of_view:
        config["field_of_view"] = probe.field_of_view
    if finetune is not None:
        config["finetune"] = finetune
    extra = {"history": probe.history[-50:], "best_step": probe.best_step, "best_val_loss": probe.best_val_loss,
             "cancelled": probe.cancelled}  # fmt: skip
    return save_weights(path, probe.head.state_dict(), kind="probe", config=config, extra=extra)


def read_probe_config(path: str | os.PathLike) -> dict:
    """The config dict of a probe file (``probe``, ``labels``, ``backbone``...), from its header alone."""
    return read_weights_header(path, kind="probe")[0]


def check_backbone(record: dict, backbone, source: str = "the probe") -> None:
    """Refuse a backbone other than the one recorded (compared by the sha256 of its weights file).

    Raises:
        UserInputError: the hashes differ.
    """
    if record.get("sha256") != backbone.sha256:
        raise UserInputError(
            f"{source} was trained on backbone {str(record.get('sha256'))[:12]}… ({Path(str(record.get('path'))).name}"
            f"), not on '{Path(backbone.path).name}' ({backbone.sha256[:12]}…); its features differ — use the "
            "backbone it was trained on or train a new probe"
        )


def find_probe_backbone(probe_path: str | os.PathLike, folders: Sequence[str | os.PathLike] | None = None) -> Path:
    """The backbone file a probe was trained on: the path it recorded, a file of that name beside the probe, else a
    backbone file with the recorded hash in ``folders`` (default: the shipped models). Shipped probes record the path they were trained from, which a
    user's install lacks.

    Raises:
        UserInputError: no backbone file with the recorded hash; the caller should ask for the backbone.
    """
    from DiffusionSegLib.checkpoint import find_weights
    from DiffusionSegLib.resources import resources_dir

    record = read_probe_config(probe_path)["backbone"]
    recorded = str(record.get("path", ""))
    beside = Path(probe_path).parent / Path(recorded).name  # a fine-tuned model's backbone travels with it
    found = find_weights(str(record.get("sha256")), "backbone", [recorded, beside],
                         [resources_dir() / "Models"] if folders is None else folders)  # fmt: skip
    if found is None:
        raise UserInputError(f"the backbone of probe '{Path(probe_path).name}' ({Path(recorded).name}, sha256 "
                             f"{str(record.get('sha256'))[:12]}…) is not found; pass it with --backbone")
    return found


def load_probe(path: str | os.PathLike, backbone=None) -> TrainedProbe:
    """Rebuild a probe from its file.

    Args:
        path: a file written by :func:`save_probe`.
        backbone: the backbone it will run on; checked against the recorded sha256 when given.

    Returns:
        The :class:`TrainedProbe` with its head in eval mode on the CPU.

    Raises:
        UserInputError: not a probe file, damaged, or trained on another backbone.
    """
    state, config, metadata = load_weights(path, kind="probe")
    try:
        cfg = ProbeConfig.from_dict(config["probe"])
        labels = labels_from_json(config["labels"])
        record = dict(config["backbone"])
        channels = cfg.head_channels(record["feature_channels"], bool(record["use_bpr"]))
        head = build_head(cfg.head, channels, int(config["num_classes"]), cfg.hidden_channels)
        head.load_state_dict(state)
        view = dict(config.get("field_of_view") or {})
        if view and not all(len(r) == 2 and r[0] <= r[1] for r in view["organ_z_mm"].values()):
            raise ValueError("its field_of_view ranges are not (low, high) pairs")
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserInputError(f"'{path}' does not hold a usable probe: {str(error).splitlines()[0][:200]}") from None
    if backbone is not None:
        check_backbone(record, backbone, f"probe '{Path(path).name}'")
    extra = metadata.get("extra", {})
    return TrainedProbe(head.eval(), cfg, labels, record, list(extra.get("history", [])),
                        int(extra.get("best_step", 0)), float(extra.get("best_val_loss", float("nan"))),
                        bool(extra.get("cancelled", False)), view)  # fmt: skip
