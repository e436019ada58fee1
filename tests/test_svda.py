"""A&D's strong augmentation (SVDA) as batchgeneratorsv2 transforms: nnunet_semi/data/svda.py."""
import math
import pickle
import random

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

from nnunet_semi.data.svda import (SVDA_OPS, SVDA_RANGES, SVDATransform, svda_strong_view_transform,
                                   svda_training_transforms)
from nnunet_semi.data.views import MultiViewTransform, weak_view_transform

INTENSITY_OPS = ("blur", "brightness", "contrast", "gamma")


def seed(s):
    np.random.seed(s)
    torch.manual_seed(s)


def blocks(shape, labels=(0, 1, 2), block=6):
    """A label map of constant blocks (interior pixels are far from label boundaries)."""
    idx = torch.meshgrid(*[torch.arange(n) // block for n in shape], indexing="ij")
    code = sum(i * (7 ** k) for k, i in enumerate(idx))
    lab = torch.tensor(labels, dtype=torch.int16)
    return lab[code % len(labels)][None]


def sample(shape, channels=1, s=0):
    g = torch.Generator().manual_seed(s)
    img = torch.rand((channels,) + tuple(shape), generator=g) * 3 + 1
    return img, blocks(shape)


def constant_neighbourhood(seg, r):
    """Pixels whose (2r+1)^n neighbourhood in the spatial map seg has a single value (not at the border)."""
    x = seg.float()[None, None]
    pool = torch.nn.functional.max_pool2d if seg.ndim == 2 else torch.nn.functional.max_pool3d
    mx = pool(x, 2 * r + 1, 1, r)
    mn = -pool(-x, 2 * r + 1, 1, r)
    ok = (mx == mn)[0, 0]
    inner = torch.zeros_like(ok)
    inner[tuple(slice(r, n - r) for n in ok.shape)] = True
    return ok & inner


# --------------------------------------------------------------------------------- op selection
@pytest.mark.parametrize("sample_num", [1, 3, 6])
def test_exactly_sample_num_distinct_ops_per_call(sample_num):
    seed(0)
    t = SVDATransform(sample_num=sample_num, p=0.0)
    combos = set()
    img, seg = sample((8, 8))
    for _ in range(300):
        t(image=img.clone(), segmentation=seg.clone())
        assert len(t.last_ops) == sample_num
        assert len(set(t.last_ops)) == sample_num
        assert set(t.last_ops) <= set(SVDA_OPS)
        assert t.last_applied == []
        combos.add(frozenset(t.last_ops))
    # every subset of the six ops is drawn (20 for 3 of 6): sampled without replacement, uniformly
    assert len(combos) == math.comb(6, sample_num)


def test_selection_is_uniform_and_order_random():
    seed(1)
    t = SVDATransform(sample_num=3, p=0.0)
    img, _ = sample((6, 6))
    counts = {o: 0 for o in SVDA_OPS}
    firsts = set()
    n = 1200
    for _ in range(n):
        t(image=img.clone())
        for o in t.last_ops:
            counts[o] += 1
        firsts.add(t.last_ops[0])
    for o, c in counts.items():  # each op in half of the calls (3 of 6)
        assert abs(c / n - 0.5) < 0.06, (o, c)
    assert firsts == set(SVDA_OPS)


def test_ops_subset_and_fixed_order():
    seed(2)
    t = SVDATransform(sample_num=2, p=1.0, ops=("gamma", "contrast"), random_order=False)
    img, seg = sample((10, 12))
    t(image=img.clone(), segmentation=seg.clone())
    assert t.last_ops == ["gamma", "contrast"] and t.last_applied == ["gamma", "contrast"]
    with pytest.raises(ValueError):
        SVDATransform(sample_num=3, ops=("gamma", "contrast"))
    with pytest.raises(ValueError):
        SVDATransform(ops=("rotation", "flip"))
    with pytest.raises(ValueError):
        SVDATransform(ops=("gamma", "gamma"), sample_num=1)


# --------------------------------------------------------------------------------- probability p
def test_p_one_every_chosen_op_acts():
    seed(3)
    t = SVDATransform(sample_num=3, p=1.0)
    img, seg = sample((12, 14))
    for _ in range(50):
        t(image=img.clone(), segmentation=seg.clone())
        assert t.last_applied == t.last_ops
        assert set(t.last_params) == set(t.last_ops)


@pytest.mark.parametrize("op", SVDA_OPS)
def test_each_op_changes_the_image(op):
    seed(4)
    t = SVDATransform(sample_num=1, p=1.0, ops=(op,))
    img, seg = sample((16, 18))
    changed = 0
    for _ in range(6):
        out = t(image=img.clone(), segmentation=seg.clone())
        assert t.last_applied == [op]
        diff = (out["image"] - img).abs().max().item()
        if op == "scale" and t.last_params["scale"]["scale"] == 1.0:
            assert diff == 0  # the released rule: half of the time s = 1, the identity
        else:
            assert diff > 1e-3
            changed += 1
    assert changed >= 1


def test_p_zero_is_identity():
    seed(5)
    t = SVDATransform(sample_num=6, p=0.0)
    for shape in [(20, 24), (10, 12, 14)]:
        img, seg = sample(shape, channels=2)
        out = t(image=img.clone(), segmentation=seg.clone())
        assert torch.equal(out["image"], img) and torch.equal(out["segmentation"], seg)
        assert len(t.last_ops) == 6 and t.last_applied == []


def test_p_is_the_acting_fraction():
    seed(6)
    t = SVDATransform(sample_num=3, p=0.7, ops=("brightness", "contrast", "scale"), random_order=False)
    img, _ = sample((4, 4))
    acted = 0
    for _ in range(200):
        t(image=img.clone())
        acted += len(t.last_applied)
    assert abs(acted / 600 - 0.7) < 0.06


# --------------------------------------------------------------------------------- shapes, dtypes
@pytest.mark.parametrize("shape,channels", [((24, 28), 2), ((12, 16, 14), 1), ((9, 13, 11), 3)])
def test_shapes_and_dtypes_preserved(shape, channels):
    seed(7)
    t = SVDATransform(sample_num=6, p=1.0)
    img, seg = sample(shape, channels)
    for seg_dtype in (torch.int16, torch.uint8, torch.int64):
        out = t(image=img.clone(), segmentation=seg.clone().to(seg_dtype))
        assert out["image"].shape == img.shape and out["image"].dtype == torch.float32
        assert out["segmentation"].shape == seg.shape and out["segmentation"].dtype == seg_dtype
        assert torch.isfinite(out["image"]).all()


def test_variant_follows_spatial_dims_and_ranges():
    seed(8)
    t = SVDATransform(sample_num=1, p=1.0, ops=("brightness",))
    m2, m3 = [], []
    for _ in range(200):
        t(image=torch.ones(1, 6, 6))
        m2.append(float(t.last_params["brightness"]["multipliers"][0]))
        t(image=torch.ones(1, 4, 4, 4))
        m3.append(float(t.last_params["brightness"]["multipliers"][0]))
    assert 0.5 <= min(m2) < 0.6 and 1.9 < max(m2) <= 2.0  # 2D: library default (0.5, 2)
    assert 0.7 <= min(m3) < 0.75 and 1.25 < max(m3) <= 1.3  # 3D: (0.7, 1.3)
    assert SVDA_RANGES["2d"]["scale"] == (0.5, 1.0) and SVDA_RANGES["3d"]["scale"] == (0.7, 1.0)
    assert SVDA_RANGES["2d"]["contrast"] == (0.5, 1.5) and SVDA_RANGES["3d"]["contrast"] == (0.7, 1.3)
    forced = SVDATransform(sample_num=1, p=1.0, ops=("brightness",), variant="3d")
    vals = []
    for _ in range(100):
        forced(image=torch.ones(1, 6, 6))
        vals.append(float(forced.last_params["brightness"]["multipliers"][0]))
    assert 0.7 <= min(vals) and max(vals) <= 1.3


def test_scale_and_rotation_parameters_follow_released_rules():
    seed(9)
    t = SVDATransform(sample_num=1, p=1.0, ops=("scale",))
    scales = []
    for _ in range(400):
        t(image=torch.ones(1, 6, 6, 6))
        scales.append(t.last_params["scale"]["scale"])
    scales = np.array(scales)
    assert abs((scales == 1.0).mean() - 0.5) < 0.08
    assert scales.min() >= 0.7 and scales[scales < 1].max() < 1.0 and scales.min() < 0.72
    r = SVDATransform(sample_num=1, p=1.0, ops=("rotation",))
    angles = []
    for _ in range(200):
        r(image=torch.ones(1, 6, 6, 6))
        assert r.last_params["rotation"]["axis"] == 0  # released: about the first axis only
        angles.append(r.last_params["rotation"]["angle"])
    assert max(np.abs(angles)) <= math.radians(15) and max(np.abs(angles)) > math.radians(14)


# --------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("op", ["rotation", "scale"])
@pytest.mark.parametrize("shape", [(40, 44), (20, 24, 22)])
def test_geometric_ops_move_image_and_segmentation_identically(op, shape):
    seed(10)
    t = SVDATransform(sample_num=1, p=1.0, ops=(op,), rotation_axes=(0, 1, 2))
    seg = blocks(shape, labels=(0, 1, 2, 3), block=8)
    moved = 0
    for _ in range(6):
        # the image is the label map: interpolated like the labels, it must round to them
        out = t(image=seg.float().clone(), segmentation=seg.clone())
        s = out["segmentation"]
        par = t.last_params[op]
        if op == "scale" and par["scale"] == 1.0:
            assert torch.equal(s, seg) and torch.equal(out["image"], seg.float())
            continue
        if op == "rotation" and abs(par["angle"]) < math.radians(2):
            continue
        moved += 1
        assert (s != seg).float().mean() > 0.01
        inner = constant_neighbourhood(s[0], 1)
        assert inner.float().mean() > 0.25
        agree = (out["image"][0].round().to(s.dtype) == s[0])[inner].float().mean().item()
        assert agree > 0.99, agree
    assert moved >= 2


def test_rotation_is_about_the_first_axis_in_3d():
    seed(11)
    # constant within each axis-0 slice: a rotation about axis 0 leaves the interior unchanged
    img = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1).expand(1, 10, 20, 20).contiguous()
    t = SVDATransform(sample_num=1, p=1.0, ops=("rotation",))
    out = t(image=img.clone())["image"]
    assert abs(t.last_params["rotation"]["angle"]) > 0
    centre = (slice(None), slice(None), slice(6, 14), slice(6, 14))
    assert torch.allclose(out[centre], img[centre], atol=1e-4)
    corner = out[0, :, 0, 0]  # rotated in from outside the patch: zero fill (released cval 0)
    assert (corner.abs() < img[0, :, 0, 0].abs() - 0.1).sum() >= 8


def test_zoom_keeps_the_patch_centre():
    seed(12)
    t = SVDATransform(sample_num=1, p=1.0, ops=("scale",))
    img = torch.rand(1, 21, 25)
    zoomed = 0
    for _ in range(10):
        out = t(image=img.clone())["image"]
        s = t.last_params["scale"]["scale"]
        if s < 1:
            zoomed += 1
            assert torch.allclose(out[0, 10, 12], img[0, 10, 12], atol=1e-5)
            assert not torch.allclose(out, img)
    assert zoomed >= 2
    # zoom in on a linear ramp: the output is the ramp scaled by s about the centre (exact for the
    # trilinear 3D image; the bicubic 2D kernel (a = -0.75) is within a few percent of the slope)
    for shape, atol in (((21, 25), 0.05), ((21, 9, 11), 1e-3)):
        ramp = (torch.arange(21, dtype=torch.float32) - 10).view(1, 21, *[1] * (len(shape) - 1)) \
            .expand(1, *shape).contiguous() + 20
        centre = (0, slice(2, 19)) + tuple(n // 2 for n in shape[1:])
        for _ in range(6):
            out = t(image=ramp.clone())["image"]
            s = t.last_params["scale"]["scale"]
            assert torch.allclose(out[centre], (ramp[centre] - 20) * s + 20, atol=atol)


def test_segmentation_values_stay_in_the_label_set():
    seed(13)
    shape = (24, 20, 18)
    seg = blocks(shape, labels=(0, 2, 5), block=4)
    for fill in (0, -1):
        t = SVDATransform(sample_num=2, p=1.0, ops=("rotation", "scale"), seg_fill_value=fill)
        seen = set()
        for _ in range(5):
            out = t(image=torch.rand((1,) + shape), segmentation=seg.clone())
            seen |= set(out["segmentation"].unique().tolist())
        assert seen <= {0, 2, 5, fill}
        assert {0, 2, 5} <= seen
    assert -1 in seen  # the fill appears where the rotation brings in outside voxels


def test_intensity_ops_never_touch_the_segmentation():
    seed(14)
    t = SVDATransform(sample_num=4, p=1.0, ops=INTENSITY_OPS)
    for shape in [(16, 18), (8, 10, 12)]:
        img, seg = sample(shape, channels=2)
        out = t(image=img.clone(), segmentation=seg.clone())
        assert torch.equal(out["segmentation"], seg)
        assert not torch.allclose(out["image"], img)


def test_image_only_moves_a_validity_mask_with_the_image():
    seed(15)
    t = SVDATransform(sample_num=1, p=1.0, ops=("rotation",), image_only=True)
    img = torch.rand(1, 30, 30) + 1.0
    mask = torch.ones(1, 30, 30, dtype=torch.int16)
    out = t(image=img.clone(), segmentation=mask.clone())
    m = out["segmentation"][0]
    assert set(m.unique().tolist()) == {0, 1}
    assert m[15, 15] == 1 and m[0, 0] == 0 and m[29, 29] == 0
    assert m.sum() < 900
    assert (out["image"][0][m == 0].abs() < 1.0 + 1e-4).all()  # invalid voxels: (mostly) zero fill
    assert (out["image"][0][constant_neighbourhood(m, 2) & (m == 1)] > 0.5).all()


# --------------------------------------------------------------------------------- intensity ops
def test_gamma_retains_mean_and_std_per_channel():
    seed(16)
    t = SVDATransform(sample_num=1, p=1.0, ops=("gamma",))
    img = torch.stack([torch.rand(16, 16) * 2 + 1, torch.rand(16, 16) * 10 - 3])
    for _ in range(3):
        out = t(image=img.clone())["image"]
        assert torch.allclose(out.mean((1, 2)), img.mean((1, 2)), atol=1e-4)
        assert torch.allclose(out.std((1, 2)), img.std((1, 2)), rtol=1e-4)
        assert not torch.allclose(out, img)
        g = t.last_params["gamma"]["gamma"]
        assert ((g >= 0.5) & (g <= 2.0)).all()


def test_contrast_and_brightness_use_each_channels_own_statistics():
    seed(17)
    img = torch.stack([torch.rand(12, 12, 12) + 5, torch.rand(12, 12, 12) * 4 - 2])
    t = SVDATransform(sample_num=1, p=1.0, ops=("brightness",))
    out = t(image=img.clone())["image"]
    ratio = out / img
    m = t.last_params["brightness"]["multipliers"]
    for c in range(2):
        assert torch.allclose(ratio[c], torch.full_like(ratio[c], float(m[c])), rtol=1e-5)
    c = SVDATransform(sample_num=1, p=1.0, ops=("contrast",))
    out = c(image=img.clone())["image"]
    f = c.last_params["contrast"]["multipliers"]
    for k in range(2):
        x, y = img[k], out[k]
        assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5  # range preserved
        expected = ((x - x.mean()) * f[k] + x.mean()).clamp(x.min(), x.max())
        assert torch.allclose(y, expected, atol=1e-5)  # around the channel's own mean


def test_blur_one_isotropic_sigma_per_channel_and_ignore_axes():
    seed(18)
    img = torch.zeros(2, 11, 11, 11)
    img[:, 5, 5, 5] = 1.0
    t = SVDATransform(sample_num=1, p=1.0, ops=("blur",))
    out = t(image=img.clone())["image"]
    sig = t.last_params["blur"]["sigmas"]
    assert len(sig) == 2 and all(0.7 <= s <= 1.3 for s in sig)
    assert abs(out[0].sum().item() - 1) < 1e-4
    for c in range(2):  # isotropic: the same profile along every axis
        a, b, d = out[c, :, 5, 5], out[c, 5, :, 5], out[c, 5, 5, :]
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, d, atol=1e-6)
    t2 = SVDATransform(sample_num=1, p=1.0, ops=("blur",), ignore_axes=(0,))
    out2 = t2(image=img.clone())["image"]
    assert torch.all(out2[:, 4] == 0) and torch.all(out2[:, 6] == 0)  # nothing spreads along axis 0
    assert out2[0, 5, 5, 4] > 0


def test_ignore_axes_no_zoom_or_rotation_along_axis_0():
    seed(19)
    img = torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1).expand(1, 8, 16, 16).contiguous()
    t = SVDATransform(sample_num=2, p=1.0, ops=("rotation", "scale"), ignore_axes=(0,))
    for _ in range(4):
        out = t(image=img.clone())["image"]
        assert torch.allclose(out[:, :, 5:11, 5:11], img[:, :, 5:11, 5:11], atol=1e-4)
    with pytest.raises(ValueError):
        SVDATransform(rotation_axes=(1,), ignore_axes=(0,))


# --------------------------------------------------------------------------------- randomness
def test_randomness_from_numpy_and_torch_only():
    img, seg = sample((14, 16, 12), channels=2)
    t = SVDATransform(sample_num=3, p=0.7)
    outs = []
    for py_seed in (0, 123):
        random.seed(py_seed)
        seed(20)
        o = [t(image=img.clone(), segmentation=seg.clone()) for _ in range(4)]
        outs.append((o, list(t.last_ops)))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["segmentation"], b["segmentation"])
    t2 = pickle.loads(pickle.dumps(t))  # nnU-Net ships transforms to its worker processes
    seed(20)
    o2 = [t2(image=img.clone(), segmentation=seg.clone()) for _ in range(4)]
    assert torch.equal(o2[-1]["image"], outs[0][0][-1]["image"])


# --------------------------------------------------------------------------------- nnU-Net pipeline
DS_2D = [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]
DS_3D = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]


def _nnunet_sample(shape, s=0):
    g = torch.Generator().manual_seed(s)
    img = torch.randn((1,) + shape, generator=g)
    seg = blocks(shape, labels=(0, 1, 2), block=7)
    seg[..., :2] = -1  # nnU-Net's padding label
    return img, seg


@pytest.mark.parametrize("patch,ds,dummy", [((40, 56), DS_2D, False), ((32, 40, 32), DS_3D, False),
                                            ((32, 40, 32), DS_3D, True)])
def test_training_transforms_on_an_nnunet_sample(patch, ds, dummy):
    seed(21)
    tr = svda_training_transforms(patch, (-math.pi, math.pi), ds, (0, 1), dummy)
    assert isinstance(tr, ComposeTransforms)
    kinds = [type(t) for t in tr.transforms]
    assert SpatialTransform in kinds and SVDATransform in kinds and MirrorTransform not in kinds
    assert kinds.index(SpatialTransform) < kinds.index(SVDATransform) < kinds.index(RemoveLabelTansform)
    assert kinds[-1] is DownsampleSegForDSTransform
    sp = tr.transforms[kinds.index(SpatialTransform)]
    assert sp.p_rotation == 0 and sp.p_scaling == 0 and sp.p_elastic_deform == 0
    svda = tr.transforms[kinds.index(SVDATransform)]
    assert svda.variant == f"{len(patch)}d" and svda.sample_num == 3 and svda.p == 0.7
    assert svda.ignore_axes == ((0,) if dummy else ())
    for k in range(3):
        img, seg = _nnunet_sample(tuple(patch), s=k)
        out = tr(image=img.clone(), segmentation=seg.clone())
        assert out["image"].shape == (1,) + tuple(patch) and out["image"].dtype == torch.float32
        segs = out["segmentation"]
        assert isinstance(segs, list) and len(segs) == 3
        for s, scale in zip(segs, ds):
            assert s.shape == (1,) + tuple(round(n * f) for n, f in zip(patch, scale))
            assert set(s.unique().tolist()) <= {0, 1, 2}  # -1 removed, labels kept
        assert len(svda.last_ops) == 3


def test_training_transforms_crop_a_larger_loader_patch_and_bookkeeping():
    seed(22)
    tr = svda_training_transforms((32, 40), None, None, (0, 1), False, use_mask_for_norm=[True],
                                  regions=[(1, 2), (2,)], ignore_label=None, sample_num=2, p=1.0)
    img, seg = _nnunet_sample((48, 56))
    out = tr(image=img.clone(), segmentation=seg.clone())
    assert out["image"].shape == (1, 32, 40)
    assert out["segmentation"].shape == (2, 32, 40)  # regions: one channel per region
    assert set(out["segmentation"].unique().tolist()) <= {0, 1}
    assert len(tr.transforms[1].last_applied) == 2
    # without deep supervision the segmentation is a tensor, not a list
    assert isinstance(out["segmentation"], torch.Tensor)


def test_weak_view_of_the_svda_pipeline_is_the_crop():
    seed(23)
    tr = svda_training_transforms((32, 40, 32), None, DS_3D, (0, 1, 2), False)
    weak = weak_view_transform(tr)
    assert [type(t) for t in weak.transforms] == [SpatialTransform]
    img, seg = _nnunet_sample((40, 48, 36))
    out = weak(image=img.clone(), segmentation=seg.clone())
    assert out["image"].shape == (1, 32, 40, 32) and out["segmentation"].shape == (1, 32, 40, 32)
    # the crop is the centre of the loader's patch
    assert torch.equal(out["image"], img[:, 4:36, 4:44, 2:34])
    mv = MultiViewTransform(weak, svda_strong_view_transform(3), 2)
    views = mv(image=img.clone(), segmentation=seg.clone())
    assert views["image"].shape == (3, 32, 40, 32)
    assert set(views["segmentation"].unique().tolist()) <= {0, 1}


# --------------------------------------------------------------------------------- strong view
@pytest.mark.parametrize("ndim,shape", [(2, (24, 28)), ("3d", (12, 14, 10)), (None, (16, 20))])
def test_strong_view_on_an_image_only_dict(ndim, shape):
    seed(24)
    t = svda_strong_view_transform(ndim, sample_num=3, p=1.0)
    assert isinstance(t, SVDATransform) and t.image_only
    img = torch.rand((2,) + shape) + 1
    out = t(image=img.clone())
    assert set(out) == {"image"} and out["image"].shape == img.shape and out["image"].dtype == img.dtype
    assert len(t.last_applied) == 3
    assert not torch.allclose(out["image"], img)  # at least two of the three are not the scale op
    assert t.variant == {2: "2d", "3d": "3d", None: None}[ndim]
    dummy = svda_strong_view_transform(3, ignore_axes=(0,))
    assert dummy.ignore_axes == (0,) and dummy(image=torch.rand(1, 6, 10, 10))["image"].shape == (1, 6, 10, 10)


# --------------------------------------------------------------------------------- any trainer
def _training_transforms_of(trainer):
    """The labeled stream's transforms as nnU-Net's ``get_dataloaders`` asks for them."""
    rot, dummy, _, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    return trainer.get_training_transforms(trainer.configuration_manager.patch_size, rot,
                                           trainer._get_deep_supervision_scales(), mirror, dummy)


def test_every_trainer_chooses_its_augmentation_the_supervised_reference_included():
    """``augmentation = 'svda'`` (the plugin mixin's attribute) gives any plugin trainer SVDA in place of nnU-Net's
    transforms, and a semi-supervised one SVDA as its strong view; 'nnunet' keeps nnU-Net's own; anything else is
    refused when the trainer is built."""
    from helpers import make_trainer
    from nnunet_semi.data.svda import GEOMETRIC_OPS, SVDA_INTENSITY_OPS
    from nnunet_semi.methods.aggregating_decoupling import AggregatingDecouplingTrainer, \
        AggregatingDecouplingTrainer_svda
    from nnunet_semi.methods.crossmatch import CrossMatchTrainer_svda
    from nnunet_semi.methods.mean_teacher import MeanTeacherTrainer, MeanTeacherTrainer_svda
    from nnunet_semi.methods.supervised import SupervisedBaselineTrainer, SupervisedBaselineTrainer_svda
    from nnunet_semi.training.base import class_hparams
    from nnunet_semi.training.plugin import PluginTrainerMixin

    def kinds(trainer):
        return [type(t) for t in _training_transforms_of(trainer).transforms]

    sup = make_trainer(SupervisedBaselineTrainer)
    assert SVDATransform not in kinds(sup) and MirrorTransform in kinds(sup)
    sup_svda = make_trainer(SupervisedBaselineTrainer_svda)
    logged = []
    sup_svda.print_to_log_file = lambda *a, **k: logged.append(" ".join(map(str, a)))
    k = kinds(sup_svda)
    assert SVDATransform in k and MirrorTransform not in k and k[-1] is DownsampleSegForDSTransform
    t = _training_transforms_of(sup_svda).transforms[k.index(SVDATransform)]
    assert (t.sample_num, t.p, t.variant) == (3, 0.7, "2d")
    assert any("SVDA" in line and "in place of nnU-Net's" in line for line in logged), logged
    # the variant differs from the reference in its class body only by the augmentation
    assert {a for a in vars(SupervisedBaselineTrainer_svda) if not a.startswith("__")} == {"augmentation"}
    assert PluginTrainerMixin.augmentation == "nnunet"

    mt = make_trainer(MeanTeacherTrainer)
    assert class_hparams(MeanTeacherTrainer)["augmentation"] == "nnunet"
    assert not isinstance(mt.get_strong_transform(False), SVDATransform) and SVDATransform not in kinds(mt)
    mt_svda = make_trainer(MeanTeacherTrainer, augmentation="svda", svda_sample_num=2, svda_p=0.5, ndim=3)
    strong = mt_svda.get_strong_transform(False)
    assert isinstance(strong, SVDATransform) and (strong.sample_num, strong.p, strong.variant) == (2, 0.5, "3d")
    assert strong.image_only and strong.ignore_axes == ()
    # Mean Teacher's target is the teacher's prediction of the weak view: its SVDA strong view must not move a voxel
    assert mt_svda.strong_views_must_align() and strong.ops == SVDA_INTENSITY_OPS
    assert set(SVDA_INTENSITY_OPS) == {"blur", "brightness", "contrast", "gamma"}
    # with nnU-Net's dummy-2D augmentation (anisotropic 3d) the strong view leaves axis 0 alone, as the training view does
    assert mt_svda.get_strong_transform(True).ignore_axes == (0,)
    k3 = kinds(mt_svda)
    assert SVDATransform in k3 and MirrorTransform not in k3

    # the variant: the class body sets the augmentation only; SVDA's default draw, 3 of the 4 intensity operations
    assert {a for a in vars(MeanTeacherTrainer_svda) if not a.startswith("__")} == {"augmentation"}
    strong = make_trainer(MeanTeacherTrainer_svda).get_strong_transform(False)
    assert (strong.sample_num, strong.p, strong.ops, strong.variant) == (3, 0.7, SVDA_INTENSITY_OPS, "2d")
    img = torch.rand(1, 24, 20)
    np.random.seed(0)
    applied = set()
    for _ in range(30):   # it acts, and never with rotation or zoom
        out = strong(image=img.clone())["image"]
        applied.update(strong.last_applied)
        assert out.shape == img.shape and not set(strong.last_ops) & GEOMETRIC_OPS
    assert applied == set(SVDA_INTENSITY_OPS)
    # CrossMatch's pseudo-labels come from the weak view too: both its strong views are aligned SVDA views
    cm_svda = make_trainer(CrossMatchTrainer_svda)
    assert {a for a in vars(CrossMatchTrainer_svda) if not a.startswith("__")} == {"augmentation"}
    assert cm_svda.num_strong_views == 2 and cm_svda.get_strong_transform(False).ops == SVDA_INTENSITY_OPS
    assert SVDATransform in kinds(cm_svda)
    # A&D's _svda takes its pseudo-labels from the view D_theta trains on: no alignment needed, the whole SVDA
    ad_svda = make_trainer(AggregatingDecouplingTrainer_svda)
    assert not ad_svda.strong_views_must_align() and ad_svda.get_strong_transform(False).ops == SVDA_OPS
    # A&D with SVDA and pseudo-labels from the weak view: accepted now, with the aligned strong view
    ad_weak = make_trainer(AggregatingDecouplingTrainer, augmentation="svda")
    assert ad_weak.strong_views_must_align() and ad_weak.get_strong_transform(False).ops == SVDA_INTENSITY_OPS

    with pytest.raises(ValueError, match=r"SupervisedBaselineTrainer\.augmentation = 'randaugment'.*'nnunet', 'svda'"):
        make_trainer(SupervisedBaselineTrainer, augmentation="randaugment")
