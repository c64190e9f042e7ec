"""Voxel features of a frozen backbone by sliding windows, with a fixed, position-bound noise field."""

from __future__ import annotations

from DiffusionSegLib.features.extractor import (
    CPU_WINDOWS_PER_PASS,
    PRECISIONS,
    FeatureConfig,
    FeatureExtractor,
    PyramidPredictor,
    VolumeInputs,
    auto_sw_batch_size,
    autocast_context,
    autocast_dtype,
    backbone_bpr_path,
    bpr_coordinates,
    build_inputs,
    extract_features,
    noise_field,
    pyramid_channels,
    resolve_device,
    sliding_window_apply,
    window_size,
)

__all__ = [
    "CPU_WINDOWS_PER_PASS",
    "PRECISIONS",
    "FeatureConfig",
    "FeatureExtractor",
    "PyramidPredictor",
    "VolumeInputs",
    "auto_sw_batch_size",
    "autocast_context",
    "autocast_dtype",
    "backbone_bpr_path",
    "bpr_coordinates",
    "build_inputs",
    "extract_features",
    "noise_field",
    "pyramid_channels",
    "resolve_device",
    "sliding_window_apply",
    "window_size",
]
