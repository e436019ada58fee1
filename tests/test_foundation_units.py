"""Fast unit tests of the shared machinery: layout, discovery, views, loader seeding, EMA, losses,
schedules, CutMix and atomic checkpoints."""
import math
import os
import sys

import numpy as np
import pytest
import torch

from nnunet_semi import ema, layout, losses, perturbations, schedules
from nnunet_semi.data.loader import split_over_ranks, worker_seeds
from nnunet_semi.data.views import MultiViewTransform, split_views, strong_view_transform
from nnunet_semi.env import ENV_VAR, check_environment, ensure_ext_trainer, trainers_folder
from nnunet_semi.training.checkpoint import atomic_torch_save


def tiny_unet(dim=3, ds=True):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    return PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), 2, 3, (2, 2), True, norm, {"affine": True},
                         None, None, torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=ds)


# ---------------------------------------------------------------------------------------- discovery
def test_nnunet_finds_the_trainers_through_the_env_var(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    monkeypatch.delenv(ENV_VAR, raising=False)
    env = {}
    ensure_ext_trainer(env)
    assert env[ENV_VAR] == trainers_folder() and os.path.isfile(os.path.join(trainers_folder(), "nnunet_semi_trainers.py"))
    monkeypatch.setenv(ENV_VAR, env[ENV_VAR])
    cls = recursive_find_trainer_class_by_name("MeanTeacherTrainer")
    assert cls.__module__ == "nnunet_semi.methods.mean_teacher"  # the real class, importable by name (pickling)
    assert "nnunet_semi_trainers" not in sys.modules  # nnU-Net dropped the shim; the package stays


def test_env_check_names_the_missing_variable(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    problems = check_environment()
    assert any(ENV_VAR in p and trainers_folder() in p for p in problems)
    env = {ENV_VAR: "/some/other/folder"}
    ensure_ext_trainer(env)
    assert env[ENV_VAR] == os.pathsep.join(["/some/other/folder", trainers_folder()])
    ensure_ext_trainer(env)  # idempotent
    assert env[ENV_VAR].count(trainers_folder()) == 1


# ------------------------------------------------------------------------------------------- layout
def test_find_image_cases_and_errors(tmp_path):
    d = tmp_path / "imagesUnlabeled"
    d.mkdir()
    for n in ("a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"):
        (d / n).write_bytes(b"x")
    with pytest.raises(layout.LayoutError, match="case 'a' has channel files"):
        layout.find_image_cases(str(d), ".nii.gz", 2)
    (d / "a_0000.nii.gz").unlink()
    assert layout.find_image_cases(str(d), ".nii.gz", 2) == {
        "b": [str(d / "b_0000.nii.gz"), str(d / "b_0001.nii.gz")]}
    (d / "c.nii.gz").write_bytes(b"x")
    with pytest.raises(layout.LayoutError, match="c.nii.gz: name does not follow"):
        layout.find_image_cases(str(d), ".nii.gz", 2)


def test_split_groups_are_disjoint(tmp_path):
    s = layout.SemiSplit(labeled=["a"], unlabeled=["b", "a"])
    with pytest.raises(layout.LayoutError, match="'a' is listed both as labeled and as unlabeled"):
        s.save(str(tmp_path))
    s = layout.SemiSplit(labeled=["a"], unlabeled=["b"], test=["c"], setting="1 labeled", seed=3)
    s.save(str(tmp_path))
    back = layout.SemiSplit.load(str(tmp_path))
    assert (back.labeled, back.unlabeled, back.test, back.seed) == (["a"], ["b"], ["c"], 3)


# ----------------------------------------------------------------------------------- weak / strong
def test_strong_views_share_the_weak_geometry():
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    torch.manual_seed(0)
    weak = ComposeTransforms([SpatialTransform((16, 16, 16), 0, False, p_elastic_deform=0, p_rotation=1,
                                               rotation=(0.3, 0.6), p_scaling=1, scaling=(0.8, 1.2),
                                               border_mode_seg="constant", padding_value_seg=-1)])
    brighten = ComposeTransforms([RandomTransform(MultiplicativeBrightnessTransform((2.0, 3.0), False, 1), 1.0)])
    t = MultiViewTransform(weak, brighten, num_strong=2)
    img = torch.rand(1, 24, 24, 24) + 0.5
    seg = torch.zeros(1, 24, 24, 24, dtype=torch.int16)
    seg[:, :4] = -1  # outside the nonzero region
    out = t(image=img, segmentation=seg)
    w, s1, s2 = split_views(out["image"][None], 1)
    nz = w.abs() > 1e-3
    r1, r2 = (s1[nz] / w[nz]), (s2[nz] / w[nz])
    # a pure intensity change of the same pixels: a constant factor per view, independently drawn
    assert torch.allclose(r1, r1[0].expand_as(r1), atol=1e-4) and 2.0 <= float(r1[0]) <= 3.0
    assert torch.allclose(r2, r2[0].expand_as(r2), atol=1e-4) and not math.isclose(float(r1[0]), float(r2[0]))
    assert out["segmentation"].dtype == torch.int16 and set(out["segmentation"].unique().tolist()) <= {0, 1}
    assert (out["segmentation"] == 0).any()  # padding / outside region marked invalid


def test_default_strong_view_is_image_only_and_perturbs():
    torch.manual_seed(1)
    st = strong_view_transform(p=1.0)
    img = torch.rand(1, 16, 16, 16)
    out = st(image=img.clone())["image"]
    assert out.shape == img.shape and not torch.allclose(out, img)
    assert torch.equal(strong_view_transform(p=0.0)(image=img.clone())["image"], img)


class _FakeDataset:
    identifiers = ["a", "b", "c"]

    def load_case(self, i):
        return (np.zeros((1, 8, 8, 8), np.float32), np.zeros((1, 8, 8, 8), np.int16), None,
                {"class_locations": {}})


class _RandImage:
    def __call__(self, image, segmentation):
        return {"image": torch.rand(1, 8, 8, 8), "segmentation": segmentation}


def test_unlabeled_workers_draw_distinct_torch_streams():
    from nnunet_semi.data.loader import build_unlabeled_augmenter
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    lm = LabelManager({"background": 0, "x": 1}, regions_class_order=None)
    aug = build_unlabeled_augmenter(_FakeDataset(), 1, (8, 8, 8), (8, 8, 8), lm, _RandImage(), num_processes=2,
                                    rank=0, pin_memory=False)
    try:
        firsts = [float(next(aug)["data"].flatten()[0]) for _ in range(12)]
    finally:
        aug._finish()
    # nnU-Net's seeds=None would give both workers the same torch stream: values would repeat in pairs
    assert len(set(firsts)) == len(firsts)


def test_batch_split_over_ranks_and_seeds():
    assert [split_over_ranks(5, 2, r) for r in range(2)] == [3, 2]
    assert sum(split_over_ranks(7, 3, r) for r in range(3)) == 7
    with pytest.raises(ValueError):
        split_over_ranks(1, 2, 0)
    s0, s1 = worker_seeds(3, 0, base=10), worker_seeds(3, 1, base=10)
    assert len(set(s0 + s1)) == 6


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_updates_each_shared_tensor_once():
    student, teacher = tiny_unet(), tiny_unet()
    ema.copy_weights(teacher, student)
    # the decoder aliases the encoder: the state dict has more entries than unique tensors
    sd = student.state_dict()
    assert len(sd) > len({v.data_ptr() for v in sd.values()})
    t_before = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.ema_update(teacher, student, 0.9)
    for tb, t, s in zip(t_before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * tb + 0.1 * s, atol=1e-6)
    assert ema.ema_decay_at(0, 0.99) == 0.0 and ema.ema_decay_at(9, 0.99) == pytest.approx(0.9)
    assert ema.ema_decay_at(10 ** 6, 0.99) == 0.99


# ---------------------------------------------------------------------------------- losses, schedules
def test_masked_dice_excludes_masked_voxels():
    probs = torch.tensor([[[0.9, 0.2, 0.5, 0.1], [0.1, 0.8, 0.5, 0.9]]])  # (B=1, C=2, N=4)
    target = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    got = losses.masked_dice_loss(probs, target, mask, include_background=True, smooth=0.0)
    # kept voxels 0 and 1 only: class 0 dice = 2*0.9/(0.9+0.2+1), class 1 dice = 2*0.8/(0.1+0.8+1)
    want = 1 - 0.5 * (2 * 0.9 / 2.1 + 2 * 0.8 / 1.9)
    assert got.item() == pytest.approx(want, rel=1e-5)
    sq = losses.masked_dice_loss(probs, target, mask, smooth=0.0, squared_denominator=True)
    assert sq.item() == pytest.approx(1 - 0.5 * (1.8 / (0.81 + 0.04 + 1) + 1.6 / (0.01 + 0.64 + 1)), rel=1e-5)


def test_masked_dice_absent_classes_trap_and_skip():
    """A class absent from the target scores smooth / (S + smooth), S = sum(p^2): flat (loss ~1) while
    S >> smooth, a steep pull of its probabilities towards 0 (about 2 p / smooth) once S is small.
    skip_absent_classes averages over the present classes only, so the absent class gets no gradient."""
    n, smooth = 1000, 1e-4
    target = torch.zeros(1, n, dtype=torch.long)                    # a pseudo-label with background only
    for p_fg in (0.3, 1e-4):
        probs = torch.stack((torch.full((n,), 1 - p_fg), torch.full((n,), p_fg)))[None].requires_grad_(True)
        loss = losses.masked_dice_loss(probs, target, smooth=smooth, squared_denominator=True)
        (g,) = torch.autograd.grad(loss, probs)
        S = n * p_fg ** 2
        assert g[0, 1, 0].item() == pytest.approx(0.5 * smooth * 2 * p_fg / (S + smooth) ** 2, rel=1e-3)
        if p_fg == 0.3:
            # fg Dice ~0: the loss is 1 - bg Dice / 2, flat in the fg channel
            assert g[0, 1].abs().max().item() < 1e-6 and loss.item() == pytest.approx(1 - 0.5 * 1.4 / 1.49, abs=1e-4)
        else:
            assert g[0, 1, 0].item() > 0.5 and loss.item() < 0.1
        skipped = losses.masked_dice_loss(probs, target, smooth=smooth, squared_denominator=True,
                                          skip_absent_classes=True)
        bg = 1 - p_fg
        assert skipped.item() == pytest.approx(1 - (2 * bg * n + smooth) / (n * bg ** 2 + n + smooth), rel=1e-4, abs=1e-6)
        (g,) = torch.autograd.grad(skipped, probs)
        assert torch.all(g[0, 1] == 0)
    # present classes are averaged as before; nothing present at all gives 0
    probs = torch.tensor([[[0.9, 0.2, 0.5, 0.1], [0.1, 0.8, 0.5, 0.9]]])
    target = torch.tensor([[0, 1, 1, 0]])
    assert losses.masked_dice_loss(probs, target, skip_absent_classes=True).item() == \
        pytest.approx(losses.masked_dice_loss(probs, target).item())
    assert losses.masked_dice_loss(probs, target, torch.zeros(1, 4), skip_absent_classes=True).item() == 0.0


def test_consistency_losses_and_statistics():
    t = torch.randn(2, 3, 4, 4, 4)
    s = t.clone().requires_grad_(True)
    l, stats = losses.consistency_loss("mse", s, t)
    assert l.item() == pytest.approx(0.0, abs=1e-7) and stats["mask_ratio"].item() == 1.0
    l, stats = losses.consistency_loss("ce", s, t * 10, conf_thresh=0.99)
    conf = torch.softmax(t * 10, 1).max(1).values
    assert stats["mask_ratio"].item() == pytest.approx((conf >= 0.99).float().mean().item())
    l.backward()
    assert s.grad is not None
    label, c = losses.pseudo_label(s)
    assert not label.requires_grad and not c.requires_grad


def test_schedules():
    assert schedules.sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert schedules.sigmoid_rampup(100, 100) == 1.0 and schedules.sigmoid_rampup(500, 100) == 1.0
    assert schedules.linear_rampup(25, 100) == 0.25 and schedules.ramp("none", 0, 100) == 1.0
    assert schedules.ramp("sigmoid", 3, 0) == 1.0
    with pytest.raises(ValueError):
        schedules.ramp("cosine?", 0, 1)


def test_cutmix_boxes():
    torch.manual_seed(0)
    fracs = []
    for _ in range(200):
        m = perturbations.cutmix_box_mask((20, 24, 28), p=1.0)
        fracs.append(m.float().mean().item())
        idx = m.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values
        assert m[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))].all()  # one solid box
    assert 0.005 < min(fracs) and max(fracs) < 0.6
    assert not perturbations.cutmix_box_mask((8, 8), p=0.0).any()
    a, b = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    box = perturbations.cutmix_box_masks(2, (8, 8), p=1.0)
    mixed = perturbations.apply_cutmix(a, b, box)
    assert torch.equal(mixed[:, 0] == 1, box)
    lab = perturbations.apply_cutmix(torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 8, 8, dtype=torch.long), box)
    assert torch.equal(lab == 1, box)


def test_mix_within_batch_pastes_the_next_sample_into_every_tensor_alike():
    img = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 6, 5).clone()   # sample i is filled with i
    label = torch.arange(3).view(3, 1, 1).expand(3, 6, 5).clone()
    box = torch.zeros(3, 6, 5, dtype=torch.bool)
    box[0, 1:3, 1:4] = True
    box[2, 4:, :2] = True                                                 # sample 1: no box
    m_img, m_label = perturbations.mix_within_batch(box, img, label)
    partner = torch.tensor([1, 2, 0])
    for i in range(3):
        want = torch.where(box[i], partner[i], i)
        assert torch.equal(m_label[i], want) and torch.equal(m_img[i], want.float().expand(2, 6, 5))
    assert torch.equal(img[:, 0, 0, 0], torch.arange(3.0))                # out of place
    one = perturbations.mix_within_batch(torch.ones(1, 6, 5, dtype=torch.bool), img[:1], label[:1])
    assert one[0] is img[:1] or torch.equal(one[0], img[:1])


# ------------------------------------------------------------------------------------- checkpoints
def test_atomic_save_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    f = str(tmp_path / "checkpoint_latest.pth")
    atomic_torch_save({"v": torch.ones(3)}, f)

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": torch.zeros(3)}, f)
    monkeypatch.undo()
    assert torch.equal(torch.load(f)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]


_MALLOC_PROBE = r"""
import resource, sys, time, torch
from nnunet_semi import cpu_malloc
tuned = cpu_malloc.tune_cpu_malloc()
assert cpu_malloc.tune_cpu_malloc() == tuned      # once per process
torch.set_num_threads(1)
x = torch.empty(0)
def step():                                      # 8 x 64 MiB blocks allocated, touched and freed
    blocks = [torch.ones(16 * 2 ** 20) for _ in range(8)]
    return sum(float(b[0]) for b in blocks)
step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_malloc_tuning_reuses_freed_tensor_memory():
    """With the tuning, freed large tensors are reused by the next step instead of being unmapped and
    page-faulted again (the cause of the 2x slower stacked CPU steps); switched off by the env var."""
    import subprocess
    from nnunet_semi import cpu_malloc
    assert cpu_malloc.enabled({}) and not cpu_malloc.enabled({cpu_malloc.ENV_VAR: "0"})
    faults = {}
    for setting in ("1", "0"):
        env = dict(os.environ, **{cpu_malloc.ENV_VAR: setting})
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        faults[setting] = (int(out[0]), int(out[1]))
    assert faults["1"][0] == 1 and faults["0"][0] == 0
    # untuned: every 64 MiB block is mmapped afresh (16384 pages each, 5 x 8 blocks); tuned: reused
    assert faults["0"][1] > 5 * 8 * 16384 * 0.9
    assert faults["1"][1] < faults["0"][1] / 4
