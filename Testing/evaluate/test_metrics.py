"""Per-organ Dice / HD95 against hand-computed values, empty cases, size groups and summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import data_path
from scipy import ndimage
from scipy.spatial.distance import cdist

from DiffusionSegLib.data.labels import BTCV_LABELS, OrganLabel
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.evaluate import ORGAN_SIZE_GROUPS, SIZE_GROUPS, organ_metrics, size_group_means, summarise

LIVER = OrganLabel(6, "liver", (0.87, 0.51, 0.40))
AORTA = OrganLabel(8, "aorta", (0.88, 0.38, 0.30))
ADRENAL = OrganLabel(12, "right adrenal gland", (0.96, 0.84, 0.19))
SPACING_XYZ = (0.7, 0.8, 2.5)  # SimpleITK order; arrays are (z, y, x)


def _cube(shape=(24, 26, 28), start=(5, 5, 5), size=10, value=6) -> np.ndarray:
    array = np.zeros(shape, dtype=np.int16)
    array[tuple(slice(s, s + size) for s in start)] = value
    return array


def _shifted(start=(5, 5, 5), axis=0, by=3) -> tuple[int, int, int]:
    return tuple(s + by if a == axis else s for a, s in enumerate(start))  # type: ignore[return-value]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_dice_of_a_shifted_cube_is_its_overlap(axis):
    """10³ cube vs the same cube moved 3 voxels: overlap 10·10·7 = 700 voxels, Dice = 2·700 / 2000 = 0.7."""
    ref, pred = _cube(), _cube(start=_shifted(axis=axis))
    scores = organ_metrics(pred, ref, [LIVER], SPACING_XYZ)["liver"]
    assert scores["dice"] == pytest.approx(0.7, abs=1e-6)
    assert scores["present_in_reference"] and scores["present_in_prediction"]


def test_dice_of_nested_cubes_and_identical_spheres():
    """A 6³ cube inside a 10³ cube: 2·216 / (1000 + 216); a sphere against itself: Dice 1, HD95 0."""
    ref, pred = _cube(size=10), _cube(start=(7, 7, 7), size=6)
    assert organ_metrics(pred, ref, [LIVER], SPACING_XYZ)["liver"]["dice"] == pytest.approx(432 / 1216, abs=1e-6)
    z, y, x = np.ogrid[:21, :21, :21]
    sphere = (((z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2) <= 64).astype(np.uint8) * 6
    same = organ_metrics(sphere, sphere.copy(), [LIVER], SPACING_XYZ)["liver"]
    assert same["dice"] == pytest.approx(1.0) and same["hd95_mm"] == 0.0


@pytest.mark.parametrize(("axis", "expected_mm"), [(0, 3 * 2.5), (1, 3 * 0.8), (2, 3 * 0.7)])
def test_hd95_of_a_shifted_cube_is_the_shift_in_mm_along_that_axis(axis, expected_mm):
    """Cube moved by k = 3 voxels along one array axis with spacing (x, y, z) = (0.7, 0.8, 2.5) mm.

    Every surface voxel of one cube is within k voxels along the shift of the other cube's surface, so no surface
    distance exceeds k·s; the 100 voxels of the trailing face (of 488 surface voxels, 20 % > 5 %) are exactly k·s
    away (the straight line hits the other cube's face; any other surface voxel is farther). Hence HD95 = k·s, and
    axis 0 of the array must take the z spacing (2.5 mm), axis 2 the x spacing (0.7 mm).
    """
    ref, pred = _cube(), _cube(start=_shifted(axis=axis))
    scores = organ_metrics(pred, ref, [LIVER], SPACING_XYZ)["liver"]
    assert scores["hd95_mm"] == pytest.approx(expected_mm, rel=1e-6)


def test_hd95_of_a_shifted_plate_is_exact():
    """A one-voxel-thick plate moved 2 slices along z: every surface distance is 2 · 2.5 mm = 5 mm."""
    ref = np.zeros((12, 20, 20), dtype=np.uint8)
    pred = ref.copy()
    ref[3, 4:16, 2:18] = 6
    pred[5, 4:16, 2:18] = 6
    scores = organ_metrics(pred, ref, [LIVER], SPACING_XYZ)["liver"]
    assert scores["dice"] == 0.0
    assert scores["hd95_mm"] == pytest.approx(5.0, rel=1e-6)


def _brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> float:
    surface = [np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing_zyx) for m in (pred, ref)]
    distances = cdist(surface[0], surface[1])
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def test_hd95_matches_a_brute_force_reference_on_irregular_masks_touching_the_border():
    """Irregular blobs (one touching the array border, so the internal crop matters) against all-pairs distances."""
    rng = np.random.default_rng(0)
    ref = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((16, 22, 18)), 2) > 0.5)
    pred = np.roll(ref, (1, -2, 3), axis=(0, 1, 2))
    pred[0, 5:12, 5:12] = True  # touches the first slice
    assert ref.any() and pred.any()
    scores = organ_metrics(pred.astype(np.uint8) * 8, ref.astype(np.uint8) * 8, [AORTA], SPACING_XYZ)["aorta"]
    expected = _brute_force_hd95(pred, ref, SPACING_XYZ[::-1])
    assert scores["hd95_mm"] == pytest.approx(expected, rel=1e-5)
    assert scores["dice"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()), abs=1e-6)


def test_empty_cases_follow_the_documented_table():
    ref = _cube(value=6)
    ref[20:22, 20:22, 20:22] = 8  # aorta only in the reference: missed
    pred = _cube(value=6)
    pred[0:2, 0:2, 0:2] = 12  # adrenal only in the prediction: false positive
    pred[3, 3, 3] = -1  # a negative id is not an organ and does no harm
    extra = OrganLabel(5, "esophagus", (0.8, 0.6, 0.5))  # in neither
    scores = organ_metrics(pred, ref, [LIVER, AORTA, ADRENAL, extra], SPACING_XYZ)
    assert list(scores) == ["liver", "aorta", "right adrenal gland", "esophagus"]
    assert scores["liver"]["dice"] == pytest.approx(1.0) and scores["liver"]["hd95_mm"] == 0.0
    missed, false_positive, absent = scores["aorta"], scores["right adrenal gland"], scores["esophagus"]
    assert (missed["dice"], missed["present_in_reference"], missed["present_in_prediction"]) == (0.0, True, False)
    assert (false_positive["dice"], false_positive["present_in_reference"]) == (0.0, False)
    assert false_positive["present_in_prediction"]
    assert math.isnan(missed["hd95_mm"]) and math.isnan(false_positive["hd95_mm"])
    assert math.isnan(absent["dice"]) and math.isnan(absent["hd95_mm"])
    assert not absent["present_in_reference"] and not absent["present_in_prediction"]


def test_bad_inputs_raise_with_the_offending_value():
    ref = _cube()
    mismatch = r"prediction shape \(24, 26, 27\) differs from reference shape \(24, 26, 28\)"
    with pytest.raises(UserInputError, match=mismatch):
        organ_metrics(ref[..., :-1], ref, [LIVER], SPACING_XYZ)
    with pytest.raises(UserInputError, match="spacing_mm"):
        organ_metrics(ref, ref, [LIVER], (1.0, 1.0))
    with pytest.raises(UserInputError, match="spacing_mm"):
        organ_metrics(ref, ref, [LIVER], (1.0, 0.0, 1.0))
    with pytest.raises(UserInputError, match="integer"):
        organ_metrics(ref + 0.5, ref, [LIVER], SPACING_XYZ)
    with pytest.raises(UserInputError, match="3D"):
        organ_metrics(ref[0], ref[0], [LIVER], SPACING_XYZ)
    with pytest.raises(UserInputError, match="distinct"):
        organ_metrics(ref, ref, [LIVER, OrganLabel(6, "spleen", (0, 0, 0))], SPACING_XYZ)
    # float arrays holding whole numbers are label maps too
    assert organ_metrics(ref.astype(np.float32), ref, [LIVER], SPACING_XYZ)["liver"]["dice"] == pytest.approx(1.0)


def test_size_groups_cover_the_13_btcv_organs():
    assert sorted(ORGAN_SIZE_GROUPS) == sorted(label.name for label in BTCV_LABELS)
    assert set(ORGAN_SIZE_GROUPS.values()) == set(SIZE_GROUPS)
    assert [n for n, g in ORGAN_SIZE_GROUPS.items() if g == "small"] == [
        "esophagus", "left adrenal gland", "right adrenal gland"
    ]  # fmt: skip


def test_size_group_means_accept_any_spelling_and_skip_nan():
    means = size_group_means({"Liver": 0.9, "kidney_right": 0.7, "aorta": 0.6, "ivc": math.nan, "esophagus": 0.3})
    assert means["big"] == pytest.approx(0.8)
    assert means["medium"] == pytest.approx(0.6)
    assert means["small"] == pytest.approx(0.3)
    assert means["mean"] == pytest.approx((0.9 + 0.7 + 0.6 + 0.3) / 4)
    assert math.isnan(size_group_means({"liver": 0.9})["small"])


def _case(**dice: float) -> dict:
    return {
        organ.replace("_", " "): {
            "dice": value,
            "hd95_mm": math.nan if math.isnan(value) else 10 * (1 - value),
            "present_in_reference": not math.isnan(value),
            "present_in_prediction": not math.isnan(value) and value > 0,
        }
        for organ, value in dice.items()
    }


def test_summarise_gives_mean_std_per_organ_group_and_overall():
    cases = [
        _case(liver=0.9, spleen=0.7, aorta=0.6, esophagus=0.2),
        {"case_id": "b", "organs": _case(liver=0.8, spleen=0.9, aorta=0.0, esophagus=math.nan)},
    ]
    summary = summarise(cases)
    assert summary["n_cases"] == 2
    liver = summary["organs"]["liver"]["dice"]
    assert (liver["mean"], liver["n"]) == (pytest.approx(0.85), 2)
    assert liver["std"] == pytest.approx(0.05)  # population std of (0.9, 0.8)
    esophagus = summary["organs"]["esophagus"]
    assert (esophagus["dice"]["mean"], esophagus["dice"]["n"]) == (pytest.approx(0.2), 1)  # NaN case left out
    assert esophagus["hd95_mm"]["mean"] == pytest.approx(8.0)
    assert summary["organs"]["aorta"]["n_missed"] == 1 and summary["organs"]["aorta"]["n_false_positive"] == 0
    # groups: per case mean over the group's organs, then over cases: big (0.8, 0.85), medium (0.6, 0.0)
    assert summary["groups"]["big"]["dice"]["mean"] == pytest.approx(0.825)
    assert summary["groups"]["medium"]["dice"]["mean"] == pytest.approx(0.3)
    assert summary["groups"]["medium"]["dice"]["std"] == pytest.approx(0.3)
    small = summary["groups"]["small"]["dice"]
    assert (small["mean"], small["n"]) == (pytest.approx(0.2), 1)
    # overall: case means (0.6, 1.7 / 3)
    assert summary["overall"]["dice"]["mean"] == pytest.approx((0.6 + 1.7 / 3) / 2)
    assert summary["overall"]["dice"]["n"] == 2


def test_summarise_rejects_empty_or_malformed_input():
    with pytest.raises(UserInputError, match="at least one case"):
        summarise([])
    with pytest.raises(UserInputError, match="case 0"):
        summarise([{"liver": 0.9}])


def test_btcv_reference_against_itself_and_a_one_slice_shift():
    """Real BTCV labels: identical maps score Dice 1 / HD95 0; a one-slice shift costs about one z spacing."""
    image = sitk.ReadImage(str(data_path("btcv/btcv_0001_labels.nii.gz")))
    ref = sitk.GetArrayFromImage(image)
    spacing = image.GetSpacing()
    same = organ_metrics(ref, ref.copy(), BTCV_LABELS, spacing)
    assert all(s["dice"] == pytest.approx(1.0) and s["hd95_mm"] == 0.0 for s in same.values())
    shifted = organ_metrics(np.roll(ref, 1, axis=0), ref, BTCV_LABELS, spacing)
    assert shifted["liver"]["dice"] > 0.9
    assert shifted["liver"]["hd95_mm"] == pytest.approx(spacing[2], rel=0.01)
    summary = summarise([shifted])
    assert summary["groups"]["big"]["dice"]["mean"] > summary["groups"]["small"]["dice"]["mean"]
