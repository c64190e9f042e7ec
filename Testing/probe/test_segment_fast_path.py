"""The default path (preparation in one pass over the input's voxels, the BPR's windows batched, labels read off the
working grid, the body axis one value per slice) gives the labels of the straightforward path (whole-image
preparation, one BPR window per pass, every class resampled through physical space, the full-resolution body-axis
map), with the shipped 13-organ model on a real CT finer than the working grid. No timing is asserted."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path

from DiffusionSegLib.data.volume import same_grid


@pytest.fixture(scope="module")
def shipped():
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe
    from DiffusionSegLib.resources import default_probe_path

    backbone = load_backbone(find_probe_backbone(default_probe_path()))
    return load_probe(default_probe_path(), backbone), backbone


def test_fast_path_gives_the_reference_labels(shipped):
    from DiffusionSegLib.probe import segment

    probe, backbone = shipped
    ct = sitk.ReadImage(str(data_path("labeled/ircadb1.17_ct.nii.gz")))
    fast = segment(ct, probe, backbone, precision="float32", device="cpu")
    reference = segment(ct, probe, backbone, precision="float32", device="cpu", reference_path=True)
    assert same_grid(fast.labels, ct) and same_grid(reference.labels, ct)
    a, b = sitk.GetArrayViewFromImage(fast.labels), sitk.GetArrayViewFromImage(reference.labels)
    assert np.mean(a == b) >= 0.999
    for organ in reference.organs:
        x, y = a == organ.value, b == organ.value
        assert 2 * np.sum(x & y) / (x.sum() + y.sum()) >= 0.99, organ.name
    assert [o.name for o in fast.organs] == [o.name for o in reference.organs]
    assert fast.not_found == reference.not_found
    assert fast.field_of_view is not None
    assert fast.field_of_view.outside == reference.field_of_view.outside
    assert fast.precision == "float32"
    assert {"prepare", "bpr", "features", "to_input_grid", "total"} <= fast.seconds.keys()


def test_label_counts_and_extents_match_the_direct_computation():
    """Voxel counts (specks) and the .seg.nrrd extents are computed slab by slab and within the labeled box: the
    same as ``np.bincount`` and as each label's own bounds, on a real label map and with absent labels."""
    from DiffusionSegLib.probe.segment import label_counts
    from DiffusionSegLib.probe.segnrrd import segment_extents

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_path("btcv/btcv_0004_labels.nii.gz")))).astype(np.uint8)
    np.testing.assert_array_equal(label_counts(labels, 20), np.bincount(labels.ravel(), minlength=20))
    values = [0, *range(1, 16)]  # 14 and 15 do not occur
    for value, extent in segment_extents(labels, values).items():
        mask = labels == value
        if not mask.any():
            assert extent == "0 -1 0 -1 0 -1"
            continue
        where = np.nonzero(mask)
        expected = [(int(where[axis].min()), int(where[axis].max())) for axis in (2, 1, 0)]
        assert extent == " ".join(f"{a} {b}" for a, b in expected), value
