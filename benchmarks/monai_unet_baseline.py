"""What a user does without DiffusionSeg: a MONAI 3D U-Net trained from scratch (DESIGN.md section 2's recipe).

``monai.networks.nets.UNet(3, 1, C, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)`` (instance
norm), every CT resampled to 3 mm (linear; labels nearest), HU window [-125, 275] -> [0, 1], 64^3 patches, batch 2,
80 % of patches centred on a voxel of a randomly chosen organ (``RandCropByLabelClassesd``), ``RandAffined``
(+-15 degrees, +-15 % zoom, no flips) and intensity scale / shift, ``DiceCELoss``, Adam 1e-3 with cosine decay
over the budget (the step count fitted after timing the first steps, as the fine-tuning path does), sliding
windows 64^3 (overlap 0.25, gaussian), the argmax resampled onto the CT's own grid (nearest). With a held-out
volume the best of its validations is kept. Used by ``finetune_accuracy.py`` for its baseline rows; written
with MONAI and SimpleITK only (no DiffusionSeg code), as a user would.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

SPACING_MM = (3.0, 3.0, 3.0)
WINDOW_HU = (-125.0, 275.0)
PATCH = (64, 64, 64)
CALIBRATION_STEPS = 20
VAL_EVERY = 100


def _network(num_classes: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(3, 1, num_classes, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)


def resample_to_working_grid(image: sitk.Image, interpolator=sitk.sitkLinear, reference: sitk.Image | None = None):
    """``image`` oriented LPS and resampled to 3 mm (or onto ``reference``'s grid)."""
    image = sitk.DICOMOrient(image, "LPS")
    if reference is None:
        size = [max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), SPACING_MM)]
        reference = sitk.Image(size, sitk.sitkUInt8)
        reference.SetSpacing(SPACING_MM)
        reference.SetOrigin(image.GetOrigin())
        reference.SetDirection(image.GetDirection())
    default = -1024.0 if interpolator != sitk.sitkNearestNeighbor else 0
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default)


def _prepare(image: sitk.Image, label: sitk.Image | None, label_ids: list[int]) -> dict:
    """The CT on the 3 mm grid in [0, 1] (and its class map), padded to at least one patch, with the voxel
    indices of each class for the class-balanced crops."""
    from monai.transforms import ClassesToIndicesd, SpatialPadd

    working = resample_to_working_grid(sitk.Cast(image, sitk.sitkFloat32))
    hu = sitk.GetArrayFromImage(working)
    low, high = WINDOW_HU
    item = {"image": torch.as_tensor((np.clip(hu, low, high) - low) / (high - low))[None].float(), "grid": working}
    if label is not None:
        ids = sitk.GetArrayFromImage(resample_to_working_grid(label, sitk.sitkNearestNeighbor, working))
        classes = np.zeros(ids.shape, np.int64)
        for index, value in enumerate(label_ids, start=1):
            classes[ids == value] = index
        item["label"] = torch.as_tensor(classes)[None]
        padded = SpatialPadd(["image", "label"], PATCH)({"image": item["image"], "label": item["label"]})
        item.update(ClassesToIndicesd("label", num_classes=len(label_ids) + 1)(padded))
    return item


def _train_transforms(num_classes: int, seed: int):
    from monai.transforms import Compose, RandAffined, RandCropByLabelClassesd, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "label"]
    organ_share = 0.8  # 80 % of patches on an organ voxel, the organ chosen uniformly
    ratios = [(1 - organ_share) * (num_classes - 1) / organ_share] + [1.0] * (num_classes - 1)
    angle = math.radians(15.0)
    pipeline = Compose([
        RandCropByLabelClassesd(keys, "label", PATCH, ratios=ratios, num_classes=num_classes, num_samples=1,
                                indices_key="label_cls_indices", warn=False),
        RandAffined(keys, prob=0.8, rotate_range=(angle,) * 3, scale_range=(0.15,) * 3, mode=("bilinear", "nearest"),
                    padding_mode="border"),
        RandScaleIntensityd("image", factors=0.1, prob=1.0),
        RandShiftIntensityd("image", offsets=0.1, prob=1.0),
    ])  # fmt: skip
    pipeline.set_random_state(seed=seed)
    return pipeline


def _predict(network, item: dict, device) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(item["image"][None], PATCH, 1, network, overlap=0.25, mode="gaussian",
                                          sw_device=device, device="cpu")  # fmt: skip
    return logits[0].argmax(0).numpy()


def _mean_dice(prediction: np.ndarray, classes: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(1, num_classes):
        ref, pred = classes == c, prediction == c
        if ref.any():
            scores.append(2.0 * (ref & pred).sum() / (ref.sum() + pred.sum()))
    return float(np.mean(scores))


def train_unet(cases: list[tuple[sitk.Image, sitk.Image]], label_ids: list[int], budget_minutes: float, seed: int,
               output: Path, val_case: tuple[sitk.Image, sitk.Image] | None = None, device: str = "cpu") -> dict:  # fmt: skip
    """Train the baseline on ``cases`` (CT, label map) for ``budget_minutes`` and save it to ``output``.

    Returns the run's record: steps, planned steps, kept step, history (step, minutes, loss, val Dice), seconds.
    """
    from monai.losses import DiceCELoss

    num_classes = len(label_ids) + 1
    torch.manual_seed(seed)
    items = [_prepare(image, label, label_ids) for image, label in cases]
    val_item = _prepare(*val_case, label_ids) if val_case is not None else None
    transforms = _train_transforms(num_classes, seed)
    rng = np.random.default_rng(seed)
    network = _network(num_classes).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    budget_s, elapsed, step, planned, times, losses, history = budget_minutes * 60.0, 0.0, 0, 0, [], [], []
    best = {"score": -1.0, "step": 0, "state": None}
    window = (0, 0.0)
    while planned == 0 or step < planned:
        started = time.perf_counter()
        if planned:
            for group in optimiser.param_groups:
                group["lr"] = 1e-3 * 0.5 * (1.0 + math.cos(math.pi * step / planned))
        batch = []
        for _ in range(2):
            item = items[int(rng.integers(len(items)))]
            sample = {k: item[k] for k in ("image", "label", "label_cls_indices")}
            batch.append(transforms(sample)[0])
        images = torch.stack([torch.as_tensor(b["image"]) for b in batch]).float().to(device)
        targets = torch.stack([torch.as_tensor(b["label"]) for b in batch]).long().to(device)
        loss = loss_fn(network(images), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - started)
        elapsed += times[-1]
        if not planned and step == CALIBRATION_STEPS + 1:
            per_step = float(np.median(times[1:])) * (1.0 + (0.02 if val_item is not None else 0.0))
            planned = max(step, step + int((budget_s - elapsed) / per_step))
            window = (step, elapsed)
        elif planned and step % 50 == 0 and step <= planned // 2:  # re-fit to the measured rate, as fine-tuning does
            planned = max(step, step + int((budget_s - elapsed) / ((elapsed - window[1]) / (step - window[0]))))
        last = planned and step >= planned
        if step % VAL_EVERY == 0 or last:
            score = float("nan")
            if val_item is not None:
                val_start = time.perf_counter()
                network.eval()
                score = _mean_dice(_predict(network, val_item, device), val_item["label"][0].numpy(), num_classes)
                network.train()
                elapsed += time.perf_counter() - val_start
                if score > best["score"]:
                    best = {"score": score, "step": step, "state": copy.deepcopy(network.state_dict())}
            history.append({"step": step, "minutes": round(elapsed / 60, 3), "train_loss": float(np.mean(losses[-50:])),
                            "val_dice": score})  # fmt: skip
        if elapsed > budget_s * 1.02:
            break
    if best["state"] is not None:
        network.load_state_dict(best["state"])
    kept = best["step"] if best["state"] is not None else step
    torch.save({"state_dict": network.state_dict(), "label_ids": list(label_ids)}, output)
    return {"steps": step, "planned_steps": planned, "best_step": kept, "history": history,
            "seconds": {"train": elapsed}}  # fmt: skip


class UNetSegmenter:
    """A trained baseline file as a ``segment(image) -> label map on the image's grid`` callable."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        saved = torch.load(path, map_location=device, weights_only=True)
        self.label_ids = list(saved["label_ids"])
        self.network = _network(len(self.label_ids) + 1).to(device).eval()
        self.network.load_state_dict(saved["state_dict"])
        self.device = device

    def __call__(self, image: sitk.Image) -> sitk.Image:
        item = _prepare(image, None, self.label_ids)
        classes = _predict(self.network, item, self.device)
        ids = np.asarray([0] + self.label_ids, np.uint8)[classes]
        working = sitk.GetImageFromArray(ids)
        working.CopyInformation(item["grid"])
        return sitk.Resample(working, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
