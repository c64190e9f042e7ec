"""Fixtures of the Slicer-module tests: the module file loaded without Qt, a fresh MRML scene (slicer-core), and a
tiny backbone + a probe trained from a segmentation node on real CT (once per session, in a background process:
the same path the widget uses)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, data_path, import_or_missing

MODULE_FILE = REPO / "DiffusionSeg" / "DiffusionSeg.py"
CT_NAME = "labeled/totalseg_example_ct_sm_3mm.nii.gz"
LABEL_NAME = "labeled/totalseg_example_sm_seg117_pseudo.nii.gz"
BONE = 200  # not a TotalSegmentator id: "bone" is drawn by thresholding the CT (easy even for an untrained backbone)
ORGANS = {5: "liver", BONE: "bone"}  # the organs the tiny probe learns (5: TotalSegmentator liver)
TINY_PROBE_OPTIONS = {"patch_size_vox": [16, 32, 32], "patches_per_volume": 4, "val_every": 10, "lr": 0.03,
                      "window_vox": [32, 128, 128]}


@pytest.fixture(scope="session")
def ds():
    """DiffusionSeg/DiffusionSeg.py as a module (Logic usable; no Qt here)."""
    import_or_missing("slicer", "slicer-core (the MRML scene without Qt) is not installed")
    spec = importlib.util.spec_from_file_location("DiffusionSeg", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["DiffusionSeg"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scene(ds):
    import slicer

    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(True)


def add_ct_and_organs(scene, organs: dict[int, str] = ORGANS, name: str = "CT"):
    """A CT volume node and a segmentation node with the given organs, as a user would have them."""
    import SimpleITK as sitk

    from DiffusionSegLib.data.labels import labels_from_names
    from DiffusionSegLib.mrml import segmentation_node_from_labelmap, volume_node_from_image

    ct = sitk.ReadImage(str(data_path(CT_NAME)))
    labels = sitk.ReadImage(str(data_path(LABEL_NAME)))
    array = sitk.GetArrayFromImage(labels)
    kept = np.where(np.isin(array, list(organs)), array, 0).astype(np.uint8)
    if BONE in organs:
        kept[(sitk.GetArrayViewFromImage(ct) > 250) & (kept == 0)] = BONE
    label_image = sitk.GetImageFromArray(kept)
    label_image.CopyInformation(labels)
    volume_node = volume_node_from_image(ct, scene, name)
    segmentation_node = segmentation_node_from_labelmap(label_image, labels_from_names(organs), scene,
                                                        f"{name} annotations", volume_node)  # fmt: skip
    return ct, volume_node, segmentation_node


@pytest.fixture
def make_case():
    """``make_case(scene, organs={id: name}, name="CT") -> (ct image, volume node, segmentation node)``."""
    return add_ct_and_organs


@pytest.fixture
def organs() -> dict[int, str]:
    return dict(ORGANS)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, ds) -> Path:
    """An untrained, tiny backbone (no BPR, 3 mm working grid) exported like a pretrained one."""
    import torch

    from DiffusionSegLib.pretrain import BackboneConfig, PretrainConfig, export_backbone
    from DiffusionSegLib.pretrain.methods import build_backbone

    cfg = PretrainConfig(use_bpr=False, backbone=BackboneConfig(base_channels=4, num_scales=3, max_channels=16))
    cfg.preprocess.spacing_mm = (3.0, 3.0, 3.0)
    cfg.data.patch_size_vox = (16, 32, 32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny_backbone.safetensors"
    return export_backbone(path, cfg, build_backbone(cfg), steps=0, bpr_path=None, val_loss=None)


@pytest.fixture(scope="session")
def trained_probe(tmp_path_factory, ds, tiny_backbone):
    """A probe trained from a segmentation node through the background process; returns (logic, probe path)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path_factory.mktemp("probes"))
    _, volume_node, segmentation_node = add_ct_and_organs(scene)
    task = logic.prepareTrainProbe([volume_node], [segmentation_node], logic.newProbePath("tiny organs"), "linear",
                                   steps=30, backbonePath=tiny_backbone, probeOptions=TINY_PROBE_OPTIONS)  # fmt: skip
    logic.start(task)
    path = logic.complete(task, timeout=240)
    scene.Clear(True)
    return logic, path


@pytest.fixture(scope="session")
def fixed_probe(trained_probe, tiny_backbone, tmp_path_factory) -> Path:
    """The trained probe with its decision fixed: every voxel of the working box is "bone" (weights zeroed, bias
    set). An untrained tiny backbone gives no reliable organs, and these tests check the Slicer side: segment
    names, colours, codes, geometry and the output policy, not learning."""
    import torch

    from DiffusionSegLib.pretrain import load_backbone
    from DiffusionSegLib.probe import load_probe, save_probe

    _, path = trained_probe
    probe = load_probe(path, load_backbone(tiny_backbone))
    bone = 1 + [label.name for label in probe.labels].index("bone")
    with torch.no_grad():
        for name, parameter in probe.head.named_parameters():
            parameter.zero_()
            if name.endswith("bias"):
                parameter[bone] = 10.0
    return save_probe(tmp_path_factory.mktemp("fixed") / "bone_everywhere.safetensors", probe)
