"""Fine-tuning patches: the contrast-phase simulation moves real organs to their target HU and nothing else, a
patch is a pure function of the generator (what exact resume relies on) and a plain tensor; the precision
setting."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import data_path
from scipy import ndimage

from DiffusionSegLib.data.labels import organ_label
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.features import FeatureConfig, autocast_dtype
from DiffusionSegLib.finetune import FinetuneConfig, finetune_backbone_bundle
from DiffusionSegLib.finetune.augment import PatchAugment, simulate_enhancement
from DiffusionSegLib.preprocess.intensity import scale_hu
from DiffusionSegLib.probe.sampling import prepare_labeled_volume

WINDOW = (-125.0, 275.0)
LIVER, RIGHT_KIDNEY, SPLEEN = 6, 2, 1


def to_window(hu: float, window=WINDOW) -> float:
    return (hu - window[0]) / (window[1] - window[0])


@pytest.fixture(scope="module")
def unenhanced():
    """A slab of an unenhanced BTCV scan (liver ~40 HU) with its manual labels."""
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("btcv/btcv_0023_ct.nii.gz"))))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("btcv/btcv_0023_labels.nii.gz"))))
    rows = np.flatnonzero((labels == RIGHT_KIDNEY).any(axis=(1, 2)))
    middle = int(np.median(rows))
    keep = slice(middle - 10, middle + 10)
    return torch.as_tensor(scale_hu(ct[keep], WINDOW)), torch.as_tensor(labels[keep].astype(np.int64))


def test_enhancement_moves_each_organ_to_its_target_and_leaves_distant_tissue_alone(unenhanced):
    image, classes = unenhanced
    targets = np.full(14, np.nan)
    targets[LIVER], targets[RIGHT_KIDNEY] = to_window(140.0), to_window(220.0)
    out = simulate_enhancement(image, classes, targets, sigma_vox=1.0)

    assert out.shape == image.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    for organ in (LIVER, RIGHT_KIDNEY):
        inside = (classes == organ).numpy()
        interior = ndimage.binary_erosion(inside, iterations=4)
        assert interior.sum() > 100
        shift = float((out - image).numpy()[interior].mean())
        wanted = targets[organ] - float(image.numpy()[inside].mean())
        assert shift == pytest.approx(wanted, abs=0.01)  # the organ's mean moves to its target (+100..+200 HU)
    assert shift > to_window(150.0) - to_window(0.0)
    untouched = ~ndimage.binary_dilation(np.isin(classes.numpy(), (LIVER, RIGHT_KIDNEY)), np.ones((3, 3, 3)), 5)
    assert np.abs(out.numpy()[untouched] - image.numpy()[untouched]).max() < 1e-6  # fat, muscle, bone, other organs
    spleen = (classes == SPLEEN).numpy() & untouched
    assert spleen.sum() > 0  # a NaN target leaves an organ as it was (checked inside ``untouched``)


def test_patch_is_a_function_of_the_generator_and_its_labels_stay_on_the_anatomy(case, backbone):
    liver = organ_label(6, "liver")
    only_enhance = FinetuneConfig(spacing_mm=(6.0, 6.0, 6.0), patch_size_vox=(32, 32, 32), rotate_deg=15.0,
                                  enhancement_probability=1.0, enhancement_hu=(180.0, 180.0), gamma_probability=0.0,
                                  blur_probability=0.0, noise_probability=0.0, intensity_scale=0.0,
                                  intensity_shift=0.0, device="cpu")  # fmt: skip
    trainable = finetune_backbone_bundle(backbone, only_enhance)
    volume = prepare_labeled_volume(case[0], case[1], [liver], trainable, FeatureConfig(), "ircadb1.01")
    augment = PatchAugment(only_enhance, trainable.pretrain.data.window_hu, 2)

    first = [augment(volume, np.random.default_rng(7)) for _ in range(2)]
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    other = augment(volume, np.random.default_rng(8))
    assert not torch.equal(first[0][0], other[0])

    rng = np.random.default_rng(0)
    shifts = []
    for _ in range(6):  # rotated and zoomed, the liver label still covers the voxels that were moved to 180 HU
        window, classes = augment(volume, rng)
        interior = ndimage.binary_erosion(classes[0].numpy() == 1, iterations=3)
        if interior.sum() > 50:
            shifts.append(float(window[0].numpy()[interior].mean()))
    window_hu = trainable.pretrain.data.window_hu
    assert shifts and np.allclose(shifts, to_window(180.0, window_hu), atol=25.0 / (window_hu[1] - window_hu[0]))


def test_training_patches_are_plain_tensors(case, backbone):
    """MONAI transforms return MetaTensors, whose per-operation metadata tracking made every training step of the
    network 1.25x slower; the augmentation hands the network plain tensors."""
    cfg = FinetuneConfig(spacing_mm=(6.0, 6.0, 6.0), patch_size_vox=(32, 32, 32), budget_minutes=0, steps=1)
    trainable = finetune_backbone_bundle(backbone, cfg)
    volume = prepare_labeled_volume(*case, [organ_label(LIVER, "liver")], trainable, FeatureConfig(), "case")
    window, classes = PatchAugment(cfg, trainable.pretrain.data.window_hu, 2)(volume, np.random.default_rng(0))
    assert type(window) is torch.Tensor and type(classes) is torch.Tensor


def test_precision_resolves_to_an_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None and autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(UserInputError, match="precision"):
        autocast_dtype("float16", cpu)
    with pytest.raises(ValueError, match="precision"):
        FinetuneConfig(precision="half")
