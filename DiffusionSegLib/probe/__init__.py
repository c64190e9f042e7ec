"""Few-shot probes on frozen backbone features: training, files, and segmentation of whole CTs."""

from __future__ import annotations

from DiffusionSegLib.probe.config import HEADS, ProbeConfig
from DiffusionSegLib.probe.io import check_backbone, find_probe_backbone, load_probe, read_probe_config, save_probe
from DiffusionSegLib.probe.segment import (
    SegmentationCancelled,
    SegmentationResult,
    keep_largest_components,
    segment,
    segment_with_probes,
    write_segmentation,
)
from DiffusionSegLib.probe.batch import ScanOutcome, segment_many
from DiffusionSegLib.probe.segnrrd import read_seg_nrrd, write_seg_nrrd
from DiffusionSegLib.probe.train import (
    PatchFeatures,
    ProbeTrainingCancelled,
    TrainedProbe,
    backbone_record,
    build_head,
    cache_patch_features,
    fit_probe,
    train_head,
)

__all__ = [
    "HEADS",
    "PatchFeatures",
    "ProbeConfig",
    "ProbeTrainingCancelled",
    "SegmentationCancelled",
    "ScanOutcome",
    "SegmentationResult",
    "TrainedProbe",
    "backbone_record",
    "build_head",
    "cache_patch_features",
    "check_backbone",
    "find_probe_backbone",
    "fit_probe",
    "keep_largest_components",
    "load_probe",
    "read_probe_config",
    "read_seg_nrrd",
    "save_probe",
    "segment",
    "segment_many",
    "segment_with_probes",
    "train_head",
    "write_seg_nrrd",
    "write_segmentation",
]
