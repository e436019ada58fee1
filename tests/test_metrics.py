"""Tests of nnunet_semi.evaluation.metrics: closed-form distances, MedPy agreement, empty masks."""
import math

import numpy as np
import pytest

from nnunet_semi.evaluation.metrics import (
    DISTANCE_METRICS, EMPTY_POLICIES, METRICS, asd, assd, binary_metrics, dice, hd95, jaccard, multilabel_metrics,
    surface_distances,
)


def ball(shape, center, radius, spacing=(1.0, 1.0, 1.0)):
    """Voxels whose centre lies within ``radius`` (in the units of ``spacing``) of ``center``."""
    grid = np.indices(shape).astype(float)
    d2 = sum(((grid[i] - center[i]) * spacing[i]) ** 2 for i in range(len(shape)))
    return d2 <= radius ** 2


def cube(shape=(30, 30, 30), start=10, size=10):
    m = np.zeros(shape, bool)
    m[start:start + size, start:start + size, start:start + size] = True
    return m


# ------------------------------------------------------------------ overlap
def test_dice_jaccard_hand_made():
    ref = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    ref[0, :3] = True
    ref[1, :3] = True      # 6 voxels
    pred[0, 1:] = True     # 3 voxels, 2 of them in ref
    pred[3, 3] = True      # + 1 false positive -> 4 voxels, TP 2
    assert dice(pred, ref) == pytest.approx(2 * 2 / (4 + 6))
    assert jaccard(pred, ref) == pytest.approx(2 / 8)
    m = binary_metrics(pred, ref)
    assert (m["TP"], m["FP"], m["FN"], m["TN"], m["n_pred"], m["n_ref"]) == (2, 2, 4, 8, 4, 6)
    assert m["Dice"] == pytest.approx(0.4) and m["Jaccard"] == pytest.approx(0.25)
    # identical masks
    assert binary_metrics(ref, ref)["Dice"] == 1.0
    assert binary_metrics(ref, ref)["HD95_mm"] == 0.0


def test_dice_jaccard_relation_on_random_masks():
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 20, 20)) > 0.5, rng.random((20, 20, 20)) > 0.6
    d, j = dice(a, b), jaccard(a, b)
    assert d == pytest.approx(2 * j / (1 + j))
    assert d == pytest.approx(2 * np.sum(a & b) / (a.sum() + b.sum()))


# ------------------------------------------------------------------ closed-form distances
@pytest.mark.parametrize("R, r, spacing", [(10, 6, 1.0), (12, 5, 0.5)])
def test_concentric_spheres(R, r, spacing):
    shape, c = (32, 32, 32), (16, 16, 16)
    ref, pred = ball(shape, c, R), ball(shape, c, r)
    m = binary_metrics(pred, ref, (spacing,) * 3)
    gap = R - r  # in voxels
    assert m["HD95_vox"] == pytest.approx(gap, abs=0.75)
    assert m["ASD_vox"] == pytest.approx(gap, abs=0.5)
    assert m["ASSD_vox"] == pytest.approx(gap, abs=0.5)
    for k in ("HD95", "ASD", "ASSD"):  # isotropic: mm = voxels * spacing
        assert m[f"{k}_mm"] == pytest.approx(m[f"{k}_vox"] * spacing)
    assert m["Dice"] < 1


def test_concentric_spheres_anisotropic_in_mm():
    sp = (2.0, 1.0, 1.0)
    shape, c = (20, 40, 40), (10, 20, 20)
    ref, pred = ball(shape, c, 14, sp), ball(shape, c, 6, sp)  # balls in physical space
    m = binary_metrics(pred, ref, sp)
    assert m["HD95_mm"] == pytest.approx(8, abs=1.0)  # discretisation: half the coarse spacing
    assert m["ASD_mm"] == pytest.approx(8, abs=1.0)
    # in voxels the shapes are ellipsoids: distances are not R - r
    assert m["ASD_vox"] < 6


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_hd95_is_shift(k, axis):
    ref = cube()
    pred = np.roll(ref, k, axis)
    m = binary_metrics(pred, ref)
    assert m["HD95_vox"] == pytest.approx(k)
    assert m["HD95_mm"] == pytest.approx(k)
    assert m["Dice"] == pytest.approx((10 - k) / 10)


def test_shifted_cube_asd_closed_form():
    # cube of side 10 shifted by 3 along axis 0: 488 surface voxels each. Distances of the
    # prediction surface to the reference surface: side faces in the overlap 0 (252 voxels);
    # side rings of the 3 protruding slices 1, 2, 3 (36 each); front face interior min(3, ring
    # distance) = 28*1 + 20*2 + 12*3 + 4*3; back face interior 3 (64) -> 524 / 488.
    ref = cube()
    pred = np.roll(ref, 3, 0)
    m = binary_metrics(pred, ref)
    assert m["ASD_vox"] == pytest.approx(524 / 488)
    assert m["ASSD_vox"] == pytest.approx(524 / 488)  # symmetric configuration
    # spacing (2, 1, 1): protruding rings 2, 4, 6; front interior min(6, ring) = 28+40+36+16; back 6
    m = binary_metrics(pred, ref, (2.0, 1.0, 1.0))
    assert m["ASD_mm"] == pytest.approx((36 * (2 + 4 + 6) + 120 + 64 * 6) / 488)
    assert m["ASD_vox"] == pytest.approx(524 / 488)


def test_asd_is_directed_prediction_to_reference():
    ref = cube(size=12, start=8)
    pred = cube(size=6, start=11)  # nested, 3 voxels from every face
    p2r = asd(pred, ref)
    r2p = asd(ref, pred)
    assert p2r == pytest.approx(3.0)  # every prediction surface voxel is 3 from the nearest face
    assert r2p > p2r                  # reference corners and edges are further away
    m = binary_metrics(pred, ref)
    assert m["ASD_vox"] == pytest.approx(p2r)
    n_p = 6 ** 3 - 4 ** 3
    n_r = 12 ** 3 - 10 ** 3
    assert m["ASSD_vox"] == pytest.approx((p2r * n_p + r2p * n_r) / (n_p + n_r))
    assert assd(pred, ref) == pytest.approx(m["ASSD_vox"])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_anisotropic_shift_along_coarse_axis(k):
    ref = cube()
    pred = np.roll(ref, k, 0)
    m = binary_metrics(pred, ref, (2.0, 1.0, 1.0))
    assert m["HD95_mm"] == pytest.approx(2 * k)
    assert m["HD95_vox"] == pytest.approx(k)
    # a shift along a fine axis is k in both units
    m = binary_metrics(np.roll(ref, k, 1), ref, (2.0, 1.0, 1.0))
    assert m["HD95_mm"] == pytest.approx(k)
    assert m["HD95_vox"] == pytest.approx(k)


# ------------------------------------------------------------------ agreement with MedPy
def _blobs(shape, seed, threshold):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return field > threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (0.625, 0.625, 1.0)])
def test_matches_medpy(seed, spacing):
    from medpy.metric import binary as mb
    shape = (40, 36, 28)
    ref = _blobs(shape, seed, 0.05)
    pred = _blobs(shape, seed + 100, 0.08) | (np.roll(ref, 2, 1) & _blobs(shape, seed + 7, -0.1))
    assert ref.any() and pred.any()
    # objects touching the image border exercise the crop/erosion equivalence
    assert ref[0].any() or ref[-1].any() or ref[:, 0].any()
    m = binary_metrics(pred, ref, spacing)
    unit = "vox" if spacing is None else "mm"
    assert m[f"HD95_{unit}"] == pytest.approx(mb.hd95(pred, ref, voxelspacing=spacing), rel=1e-9)
    assert m[f"ASD_{unit}"] == pytest.approx(mb.asd(pred, ref, voxelspacing=spacing), rel=1e-9)
    assert m[f"ASSD_{unit}"] == pytest.approx(mb.assd(pred, ref, voxelspacing=spacing), rel=1e-9)
    assert m["HD95_vox"] == pytest.approx(mb.hd95(pred, ref), rel=1e-9)
    assert m["ASD_vox"] == pytest.approx(mb.asd(pred, ref), rel=1e-9)
    assert m["Dice"] == pytest.approx(mb.dc(pred, ref))
    assert m["Jaccard"] == pytest.approx(mb.jc(pred, ref))
    assert hd95(pred, ref, spacing) == pytest.approx(m[f"HD95_{unit}"])


def test_surface_distances_small_objects_match_medpy():
    from medpy.metric import binary as mb
    ref = np.zeros((9, 9, 9), bool)
    pred = np.zeros((9, 9, 9), bool)
    ref[4, 4, 4] = True               # single voxel
    pred[0, 0, 0] = pred[8, 8, 8] = True  # two corners of the image
    d = surface_distances(pred, ref, (1.0, 2.0, 3.0))
    assert d["mm"][0] == pytest.approx([math.sqrt(16 + 64 + 144)] * 2)
    assert d["vox"][1] == pytest.approx([math.sqrt(48)])
    assert asd(pred, ref, (1.0, 2.0, 3.0)) == pytest.approx(mb.asd(pred, ref, voxelspacing=(1.0, 2.0, 3.0)))


def test_singleton_axis_is_dropped():
    disk_ref = ball((1, 40, 40), (0, 20, 20), 12)
    disk_pred = ball((1, 40, 40), (0, 22, 20), 10)
    m3 = binary_metrics(disk_pred, disk_ref, (999.0, 0.5, 0.5))  # nnU-Net's 2D spacing convention
    m2 = binary_metrics(disk_pred[0], disk_ref[0], (0.5, 0.5))
    for k in METRICS:
        assert m3[k] == pytest.approx(m2[k])
    assert m3["HD95_mm"] == pytest.approx(m3["HD95_vox"] * 0.5)
    assert 0 < m3["ASD_vox"] < 5  # contours, not "every voxel is surface"


def test_input_validation():
    a = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(a, np.ones((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="empty_policy"):
        binary_metrics(a, a, empty_policy="nope")
    with pytest.raises(ValueError, match="empty"):
        hd95(np.zeros_like(a), a)


# ------------------------------------------------------------------ empty masks
EMPTY = np.zeros((12, 12, 12), bool)
FULL = cube((12, 12, 12), 3, 5)

EXPECTED = {  # policy -> situation -> (Dice, Jaccard, distance)
    "default": {"both": (1, 1, 0), "pred": (0, 0, None), "ref": (0, 0, None)},
    "nnunet": {"both": (None, None, None), "pred": (0, 0, None), "ref": (0, 0, None)},
    "ssl4mis": {"both": (0, 0, 0), "pred": (0, 0, 0), "ref": (0, 0, None)},
    "genericssl": {"both": (1, 1, 0), "pred": (0, 0, 128), "ref": (0, 0, 128)},
}


def _check(value, expected):
    if expected is None:
        assert math.isnan(value)
    else:
        assert value == expected


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_empty_policies(policy):
    cases = {"both": (EMPTY, EMPTY), "pred": (EMPTY, FULL), "ref": (FULL, EMPTY)}
    for situation, (pred, ref) in cases.items():
        m = binary_metrics(pred, ref, (2.0, 1.0, 1.0), empty_policy=policy)
        d, j, dist = EXPECTED[policy][situation]
        _check(m["Dice"], d)
        _check(m["Jaccard"], j)
        for k in DISTANCE_METRICS:
            _check(m[k], dist)
        assert m["n_pred"] == int(pred.sum()) and m["n_ref"] == int(ref.sum())


def test_default_policy_is_documented_one():
    assert set(EXPECTED) == set(EMPTY_POLICIES)
    m = binary_metrics(EMPTY, EMPTY)
    assert (m["Dice"], m["Jaccard"], m["HD95_mm"], m["ASD_vox"]) == (1.0, 1.0, 0.0, 0.0)
    assert math.isnan(binary_metrics(EMPTY, FULL)["HD95_mm"])
    # raw helpers apply no policy
    assert math.isnan(dice(EMPTY, EMPTY)) and math.isnan(jaccard(EMPTY, EMPTY))


# ------------------------------------------------------------------ multi-label
def test_multilabel_labels_regions_and_ignore():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[10:16, 10:16, 10:16] = 2
    ref[0, 0, :] = 3  # ignore label
    pred = ref.copy()
    pred[pred == 3] = 1  # predicted label 1 in the ignored voxels
    pred[10:16, 10:16, 10:16] = 0
    pred[11:17, 10:16, 10:16] = 2  # label 2 shifted by one voxel
    res = multilabel_metrics(pred, ref, [1, 2, (1, 2)], (1.0, 1.0, 1.0), ignore_label=3)
    assert set(res) == {1, 2, (1, 2)}
    assert res[1]["Dice"] == 1.0 and res[1]["FP"] == 0  # ignored voxels do not count
    assert res[2]["HD95_vox"] == pytest.approx(1.0)
    assert res[2]["Dice"] == pytest.approx(5 / 6)
    assert res[(1, 2)]["n_ref"] == 2 * 6 ** 3
    res_no_ignore = multilabel_metrics(pred, ref, [1])
    assert res_no_ignore[1]["FP"] == 20 and res_no_ignore[1]["Dice"] < 1
