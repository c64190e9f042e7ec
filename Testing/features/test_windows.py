"""DiffusionSeg's sliding windows give MONAI's ``sliding_window_inference`` results, and the segment path does
not import MONAI."""

import subprocess
import sys

import pytest
import torch

from DiffusionSegLib.windows import importance_map, sliding_window_inference, window_slices


def _predictor(weight: torch.Tensor, with_tuple: bool):
    """A position-dependent map (a 3x3x3 convolution, so window borders matter), optionally with a second output."""

    def predict(window: torch.Tensor):
        out = torch.nn.functional.conv3d(window, weight, padding=1)
        return (out, out[:, :1].square()) if with_tuple else out

    return predict


@pytest.mark.parametrize("shape, roi, overlap, batch, mode", [
    ((37, 50, 29), (16, 16, 16), 0.25, 2, "gaussian"),  # several windows per axis, the last moved back
    ((12, 40, 16), (16, 16, 16), 0.5, 3, "gaussian"),  # smaller than the window along one axis: padded
    ((16, 16, 16), (16, 16, 16), 0.25, 1, "constant"),  # exactly one window
    ((30, 21, 45), (8, 16, 24), 0.0, 4, "constant"),  # no overlap
])
@pytest.mark.parametrize("with_tuple", [False, True])
def test_sliding_windows_match_monai(shape, roi, overlap, batch, mode, with_tuple):
    from monai.inferers import sliding_window_inference as monai_sliding_window_inference

    generator = torch.Generator().manual_seed(0)
    volume = torch.randn((1, 2, *shape), generator=generator)
    predict = _predictor(torch.randn((3, 2, 3, 3, 3), generator=generator), with_tuple)
    ours = sliding_window_inference(volume, roi, batch, predict, overlap=overlap, mode=mode, cval=0.5)
    theirs = monai_sliding_window_inference(volume, roi_size=roi, sw_batch_size=batch, predictor=predict,
                                            overlap=overlap, mode=mode, padding_mode="constant", cval=0.5)
    ours, theirs = (ours, theirs) if with_tuple else ((ours,), (theirs,))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == (1, b.shape[1], *shape)
        torch.testing.assert_close(a, torch.as_tensor(b), rtol=1e-6, atol=1e-6)


def test_windows_and_weights_are_monais():
    from monai.data.utils import compute_importance_map, dense_patch_slices

    for size, roi, overlap in [((69, 84, 98), (64, 64, 64), 0.25), ((200, 30, 64), (64, 30, 32), 0.6)]:
        interval = [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(size, roi)]
        assert window_slices(size, roi, overlap) == dense_patch_slices(size, roi, interval)
    torch.testing.assert_close(importance_map((64, 48, 32)), compute_importance_map((64, 48, 32), mode="gaussian"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="one volume"):
        sliding_window_inference(torch.zeros(2, 1, 8, 8, 8), (8, 8, 8), 1, lambda w: w)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(torch.zeros(1, 1, 8, 8, 8), (8, 8, 8), 1, lambda w: w, overlap=1.0)
    with pytest.raises(ValueError, match="blend mode"):
        importance_map((8, 8, 8), mode="median")


def test_segmenting_does_not_import_monai(tmp_path):
    """``import monai`` costs seconds of the command line's start: ``diffusionseg segment`` of the bundled sample
    CT with the shipped model (BPR, backbone windows, labels on the input grid, field of view, .seg.nrrd) must not
    need it."""
    output = tmp_path / "sample.seg.nrrd"
    code = (
        "import sys\n"
        "from DiffusionSegLib.cli import main\n"
        "from DiffusionSegLib.resources import sample_ct_path\n"
        f"assert main(['segment', str(sample_ct_path()), '-o', {str(output)!r}]) == 0\n"
        "print('monai' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert output.is_file()
    assert result.stdout.strip().splitlines()[-1] == "False", "the segment path imported monai"
