"""One segmentation, however it is asked for: ``diffusionseg segment``, Slicer's Segment (the module's logic and
its job script) and the accuracy benchmark's evaluation call pass the same options
(:data:`DiffusionSegLib.defaults.SEGMENT_OPTIONS`: each organ's largest component) and give identical labels on a
real CT with the shipped model."""

from __future__ import annotations

import sys

import numpy as np
import SimpleITK as sitk
from helpers import REPO, data_path

from DiffusionSegLib.defaults import LARGEST_COMPONENT, SEGMENT_OPTIONS

CT_NAME = "labeled/totalseg_example_ct_sm_3mm.nii.gz"  # a real abdominal CT crop (122 x 101 x 30 voxels)


def _pieces(mask: np.ndarray) -> int:
    return int(sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)).max())


def test_cli_slicer_and_benchmark_segment_alike(ds, scene, tmp_path, monkeypatch):
    from DiffusionSegLib.cli import main
    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.mrml import labelmap_from_segmentation_node, volume_node_from_image
    from DiffusionSegLib.pretrain import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment
    from DiffusionSegLib.resources import default_probe_path

    assert SEGMENT_OPTIONS == {"largest_component": True} and LARGEST_COMPONENT is True
    ct = read_volume(data_path(CT_NAME))
    # the command line, with nothing but the input and the output
    out = tmp_path / "cli.nii.gz"
    assert main(["segment", str(data_path(CT_NAME)), "-o", str(out), "--device", "cpu", "--precision", "float32"]) == 0
    cli = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))

    # Slicer's Segment: the logic prepares the job (the widget's path), the job script runs it
    logic = ds.DiffusionSegLogic(scene, probeFolder=tmp_path / "probes")
    volume_node = volume_node_from_image(ct, scene, "patient")
    task = logic.prepareSegment(volume_node, str(default_probe_path()), device="cpu")
    assert {k: task.job[k] for k in SEGMENT_OPTIONS} == SEGMENT_OPTIONS
    task.job["precision"] = "float32"  # the CLI's arithmetic here (auto may pick bfloat16 on an AMX CPU)
    node = logic.run(task)
    labels, legend = labelmap_from_segmentation_node(node, volume_node)
    slicer_names = sitk.GetArrayFromImage(labels)

    # the accuracy benchmark's evaluation call
    sys.path.insert(0, str(REPO / "benchmarks"))
    import finetune_accuracy

    from DiffusionSegLib import precision

    monkeypatch.setattr(precision, "_RESOLVED", {})
    monkeypatch.setattr(precision, "resolve_precision", lambda p, device="cpu": "float32")  # as --precision float32
    benchmark = sitk.GetArrayFromImage(finetune_accuracy._segmenter(default_probe_path())(ct))

    assert np.array_equal(cli, benchmark)
    organs = {v for v in np.unique(cli).tolist() if v}
    assert len(organs) >= 4  # liver, spleen, kidneys... of a real abdomen
    assert {legend[v] for v in np.unique(slicer_names).tolist() if v} == {legend_name(v) for v in organs}
    by_name = {name: value for value, name in legend.items()}
    for value in organs:  # the Slicer segments hold the same voxels as the command line's label values
        assert np.array_equal(slicer_names == by_name[legend_name(value)], cli == value), legend_name(value)
        assert _pieces(cli == value) == 1  # each organ its largest component

    backbone = load_backbone(find_probe_backbone(default_probe_path()))
    raw = sitk.GetArrayFromImage(segment(ct, load_probe(default_probe_path(), backbone), backbone,
                                         largest_component=False, device="cpu").labels)  # fmt: skip
    assert any(_pieces(raw == value) > 1 for value in organs)  # the clean-up did act on this scan


def legend_name(value: int) -> str:
    from DiffusionSegLib.data.labels import BTCV_LABELS

    return {o.value: o.name for o in BTCV_LABELS}[value]
