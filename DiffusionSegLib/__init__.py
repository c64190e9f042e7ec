"""DiffusionSeg: anatomically guided diffusion pretraining and few-shot organ segmentation for CT.

One public verb per stage (imported lazily, so ``import DiffusionSegLib`` stays light inside Slicer)::

    image = read_volume("ct.nii.gz")                        # NIfTI / NRRD / MHA / DICOM folder, geometry kept
    coords = predict_body_coordinates(image, *load_bpr())   # Body Part Regressor: 3 anatomical coordinates
    pretrain_backbone(PretrainConfig(...))                  # diffusion (+ BPR) or a baseline, torchrun-ready
    backbone = load_backbone("backbone.safetensors")
    probe = fit_probe([(ct, labels)], organs, backbone)     # few-shot probe on frozen features
    finetune([(ct, labels)], organs, backbone, "model.safetensors", FinetuneConfig())  # end to end (accurate)
    result = segment(image, probe, backbone)                # labels on the exact input grid
    found = find_scans(["cohort/"])                         # many scans: models load once, a bad scan is skipped
    outcomes = list(segment_many(found.scans, plan_outputs(found, "segmentations/")))
    results = evaluate(cases, {"diffusion+BPR": backbone}, EvaluationConfig())
"""

from __future__ import annotations

import importlib

__all__ = [
    "EvaluationConfig",
    "FinetuneConfig",
    "PretrainConfig",
    "ProbeConfig",
    "PreprocessConfig",
    "UserInputError",
    "evaluate",
    "extract_features",
    "find_scans",
    "finetune",
    "fit_bpr",
    "fit_probe",
    "load_backbone",
    "load_bpr",
    "load_probe",
    "plan_outputs",
    "predict_body_coordinates",
    "prepare_volume",
    "pretrain_backbone",
    "read_volume",
    "save_probe",
    "segment",
    "segment_many",
    "to_input_grid",
    "write_volume",
]

_WHERE = {
    "EvaluationConfig": "DiffusionSegLib.evaluate.harness",
    "FinetuneConfig": "DiffusionSegLib.finetune",
    "PretrainConfig": "DiffusionSegLib.pretrain.config",
    "ProbeConfig": "DiffusionSegLib.probe",
    "PreprocessConfig": "DiffusionSegLib.preprocess",
    "UserInputError": "DiffusionSegLib.errors",
    "evaluate": "DiffusionSegLib.evaluate.harness",
    "extract_features": "DiffusionSegLib.features",
    "find_scans": "DiffusionSegLib.data.scans",
    "finetune": "DiffusionSegLib.finetune",
    "fit_bpr": "DiffusionSegLib.bpr",
    "fit_probe": "DiffusionSegLib.probe",
    "load_backbone": "DiffusionSegLib.pretrain.export",
    "load_bpr": "DiffusionSegLib.bpr",
    "load_probe": "DiffusionSegLib.probe",
    "plan_outputs": "DiffusionSegLib.data.scans",
    "predict_body_coordinates": "DiffusionSegLib.bpr",
    "prepare_volume": "DiffusionSegLib.preprocess",
    "pretrain_backbone": "DiffusionSegLib.pretrain.trainer",
    "read_volume": "DiffusionSegLib.data.volume",
    "save_probe": "DiffusionSegLib.probe",
    "segment": "DiffusionSegLib.probe",
    "segment_many": "DiffusionSegLib.probe.batch",
    "to_input_grid": "DiffusionSegLib.preprocess",
    "write_volume": "DiffusionSegLib.data.volume",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'DiffusionSegLib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
