"""The exported backbone file: weights + everything feature extraction needs to use them.

``backbone.safetensors`` (kind ``"backbone"``) holds the network's weights and, as config: ``unet`` (the
``UNet3dConfig``), ``pretrain`` (the full pretraining config: method, BPR switch, HU window, working spacing,
diffusion schedule) and ``bpr_sha256`` (the BPR weights the backbone was trained with).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from DiffusionSegLib.checkpoint import file_sha256, load_weights, save_weights
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.pretrain.config import PretrainConfig

__all__ = ["BackboneBundle", "export_backbone", "load_backbone"]

log = logging.getLogger(__name__)


@dataclass
class BackboneBundle:
    """A loaded, frozen backbone with its provenance.

    Attributes:
        model: the ``UNet3d`` in eval mode with gradients off.
        pretrain: the pretraining config (``pretrain.use_bpr``, ``pretrain.data.window_hu``,
            ``pretrain.preprocess``, ``pretrain.diffusion`` ...).
        sha256: hash of the weights file (probes record it to refuse another backbone).
        bpr_sha256: hash of the BPR weights used in pretraining, or None without BPR.
        path: where it was loaded from.
    """

    model: nn.Module
    pretrain: PretrainConfig
    sha256: str
    bpr_sha256: str | None
    path: Path

    @property
    def use_bpr(self) -> bool:
        return self.pretrain.use_bpr

    @property
    def feature_channels(self) -> list[int]:
        return list(self.model.config.feature_channels)


def export_backbone(path: str | Path, cfg: PretrainConfig, backbone: nn.Module, *, steps: int,
                    bpr_path: Path | None, val_loss: float | None, bpr_sha256: str | None = None,
                    extra: dict | None = None) -> Path:  # fmt: skip
    """Write a backbone's weights with its full config (see module docstring); ``bpr_sha256`` records the BPR
    by its hash instead of hashing ``bpr_path`` (a fine-tuned backbone keeps its source's); ``extra`` adds
    provenance to the metadata."""
    config = {
        "unet": backbone.config.to_dict(),
        "pretrain": cfg.to_dict(),
        "bpr_sha256": bpr_sha256 or (file_sha256(bpr_path) if bpr_path else None),
    }
    extra = {"steps": steps, "val_loss": val_loss, "method": cfg.method, "use_bpr": cfg.use_bpr, **(extra or {})}
    path = save_weights(path, backbone.state_dict(), kind="backbone", config=config, extra=extra)
    log.info("wrote %s (step %d)", path, steps)
    return path


def load_backbone(path: str | Path) -> BackboneBundle:
    """Load an exported backbone, frozen, on the CPU.

    Raises:
        UserInputError: not a backbone file, or its weights do not fit its config.
    """
    from DiffusionSegLib.nets import UNet3d

    path = Path(path)
    state, config, _ = load_weights(path, kind="backbone")
    model = UNet3d.from_config(config["unet"])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserInputError(f"backbone '{path}': weights do not match its config ({str(error)[:200]})") from None
    model.eval().requires_grad_(False)
    return BackboneBundle(model, PretrainConfig.from_dict(config["pretrain"]), file_sha256(path),
                          config.get("bpr_sha256"), path)  # fmt: skip
