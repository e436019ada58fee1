"""The semi-supervised recipes for nnU-Net (issue: defaults that beat supervised nnU-Net): the supervised
warm-up gate and its ramp, the logged gradient norm and clip ratio, the new loss options of Mean Teacher and
CrossMatch against direct computations, the released recipes kept as variants, the schedule variables, and
the DDP rule for the CutMix mix source with batch norm."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import config_manager, ds_targets, goto_step, make_trainer, unlabeled
from nnunet_semi import losses
from nnunet_semi.methods.crossmatch import CrossMatchTrainer, CrossMatchTrainer_released
from nnunet_semi.methods.mean_teacher import (MeanTeacherTrainer, MeanTeacherTrainer_cutmix, MeanTeacherTrainer_ema999,
                                              MeanTeacherTrainer_released)
from nnunet_semi.training import budget
from nnunet_semi.training.base import SemiSupervisedTrainer


def trainer(cls, **class_attrs):
    """A real trainer of ``cls`` (:func:`helpers.make_trainer`) for 10 epochs x 100 iterations."""
    return make_trainer(cls, epochs=10, iters=100, **class_attrs)


def at_step(tr, step: int):
    goto_step(tr, step).update_unsup_gate()
    return tr.rampup_factor()


# ----------------------------------------------------------------------------------------------
# warm-up gate and ramp
# ----------------------------------------------------------------------------------------------
def test_warmup_gate_is_exactly_zero_then_follows_the_ramp():
    tr = trainer(MeanTeacherTrainer, warmup_iters=250, warmup_pseudo_dice=0.5, rampup_iters=500)
    # before warmup_iters: 0 whatever the pseudo Dice
    tr.logger.local_logger.my_fantastic_logging["ema_fg_dice"] = [0.9]
    assert at_step(tr, 0) == 0.0 and at_step(tr, 249) == 0.0 and tr.unsup_gate_step is None
    # after warmup_iters but the pseudo Dice below the gate: still exactly 0
    tr.logger.local_logger.my_fantastic_logging["ema_fg_dice"] = [0.1, 0.3, 0.49]
    assert at_step(tr, 300) == 0.0 and at_step(tr, 399) == 0.0 and tr.unsup_gate_step is None
    # the gate opens at the first step with the pseudo Dice reached, and the ramp starts there
    tr.logger.local_logger.my_fantastic_logging["ema_fg_dice"].append(0.5)
    assert at_step(tr, 400) == pytest.approx(math.exp(-5)) and tr.unsup_gate_step == 400
    assert at_step(tr, 650) == pytest.approx(math.exp(-5 * 0.25))
    assert at_step(tr, 900) == 1.0 and at_step(tr, 999) == 1.0
    # it never closes again, even if the pseudo Dice drops
    tr.logger.local_logger.my_fantastic_logging["ema_fg_dice"].append(0.1)
    assert at_step(tr, 950) == 1.0 and tr.unsup_gate_step == 400
    assert tr.unsup_weight_now() == tr.unsup_weight * 1.0


def test_without_warmup_the_schedule_is_the_old_fraction_ramp():
    """Released recipes (no warm-up, ramp as a fraction of the run) keep their old factors exactly."""
    tr = trainer(MeanTeacherTrainer_released)
    total = tr.total_steps
    for step in (0, 1, 250, 999):
        assert at_step(tr, step) == pytest.approx(math.exp(-5 * (1 - step / total) ** 2))
    assert tr.unsup_gate_step == 0
    cm = trainer(CrossMatchTrainer_released)
    assert at_step(cm, 0) == 1.0 and at_step(cm, 500) == 1.0


def test_gate_state_round_trips_through_the_checkpoint_state(monkeypatch):
    tr = trainer(MeanTeacherTrainer, warmup_iters=10, warmup_pseudo_dice=None, rampup_iters=20)
    at_step(tr, 15)
    assert tr.unsup_gate_step == 15
    state = SemiSupervisedTrainer.semi_state_dict(tr)
    assert state["unsup_gate_step"] == 15
    fresh = trainer(MeanTeacherTrainer, warmup_iters=10, warmup_pseudo_dice=None, rampup_iters=20)
    fresh.load_semi_state_dict(state)
    assert fresh.unsup_gate_step == 15
    goto_step(fresh, 25)
    goto_step(tr, 25)
    assert fresh.rampup_factor() == tr.rampup_factor() == pytest.approx(math.exp(-5 * 0.25))
    # a checkpoint of a semi-supervised trainer from before the gate existed: its schedule began at step 0
    old = {k: v for k, v in state.items() if k != "unsup_gate_step"}
    fresh.load_semi_state_dict(old)
    assert fresh.unsup_gate_step == 0


def warmup_batch(tr, seed: int = 3):
    """A labeled batch for ``tr`` (image, deep-supervision targets) and the dict nnU-Net's loader gives."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(2, 1, 16, 16, generator=g)
    with torch.no_grad():
        tgt = ds_targets(tr.network(data), torch.randint(0, 3, (2, 1, 16, 16), generator=g))
    return data, tgt, {"data": data, "target": tgt, "keys": ["a", "b"]}


@pytest.mark.parametrize("cls", [MeanTeacherTrainer, CrossMatchTrainer])
def test_closed_gate_draws_no_unlabeled_batch_and_steps_as_at_weight_zero(cls, monkeypatch):
    """While the warm-up gate is closed the step draws no unlabeled batch and runs no pass on unlabeled data,
    and it changes the weights as the method's full step at unsupervised weight 0 does (the plugin up to stop
    26, kept as ``warmup_draws_unlabeled``); once the gate is open every step draws its batches."""
    trained = []
    for draws in (True, False):
        tr = trainer(cls, warmup_iters=250, warmup_pseudo_dice=None, warmup_draws_unlabeled=draws)
        goto_step(tr, 10)
        data, tgt, batch = warmup_batch(tr)
        torch.manual_seed(5)
        batches = [unlabeled(2, (16, 16), views=2) for _ in range(tr.unlabeled_batches_per_step)]
        calls = []

        def next_unlabeled():
            calls.append(1)
            return batches[len(calls) - 1]
        monkeypatch.setattr(tr, "next_unlabeled", next_unlabeled)
        out = tr.train_step(batch)
        assert tr.unsup_gate_step is None and out["unsup_weight_factor"] == 0.0
        assert len(calls) == (tr.unlabeled_batches_per_step if draws else 0)
        assert "loss_sup" in out and ("pl_confidence" in out) == draws
        trained.append((out["loss"], {k: v.clone() for k, v in tr.network.state_dict().items()}))
    (loss_drawn, w_drawn), (loss_skipped, w_skipped) = trained
    assert loss_skipped == pytest.approx(loss_drawn, rel=1e-5)
    assert all(torch.allclose(w_skipped[k], v, atol=1e-6) for k, v in w_drawn.items())
    moved = trainer(cls, warmup_iters=250, warmup_pseudo_dice=None)
    assert any(not torch.equal(v, moved.network.state_dict()[k]) for k, v in w_skipped.items())
    # the gate open: the step draws its unlabeled batches and computes the unsupervised terms
    goto_step(tr, 300)
    calls.clear()
    batches[:] = [unlabeled(2, (16, 16), views=2) for _ in range(tr.unlabeled_batches_per_step)]
    out = tr.train_step(batch)
    assert tr.unsup_gate_step == 300 and len(calls) == tr.unlabeled_batches_per_step and "pl_confidence" in out


def test_schedule_variables(monkeypatch):
    tr = trainer(MeanTeacherTrainer)
    monkeypatch.setenv("nnUNet_semi_warmup_iters", "0")
    monkeypatch.setenv("nnUNet_semi_warmup_pseudo_dice", "none")
    monkeypatch.setenv("nnUNet_semi_rampup_iters", "12")
    assert budget.apply_schedule_overrides(tr) == {"warmup_iters": 0, "warmup_pseudo_dice": None, "rampup_iters": 12}
    assert (tr.warmup_iters, tr.warmup_pseudo_dice, tr.rampup_iters) == (0, None, 12)
    assert at_step(tr, 0) == pytest.approx(math.exp(-5)) and at_step(tr, 12) == 1.0
    monkeypatch.setenv("nnUNet_semi_warmup_pseudo_dice", "1.5")
    with pytest.raises(RuntimeError, match="nnUNet_semi_warmup_pseudo_dice='1.5' must be a number in"):
        budget.apply_schedule_overrides(tr)
    monkeypatch.setenv("nnUNet_semi_warmup_pseudo_dice", "0.4")
    monkeypatch.setenv("nnUNet_semi_warmup_iters", "-1")
    with pytest.raises(RuntimeError, match="nnUNet_semi_warmup_iters='-1' must be an integer >= 0"):
        budget.apply_schedule_overrides(tr)


# ----------------------------------------------------------------------------------------------
# gradient norm and clip ratio
# ----------------------------------------------------------------------------------------------
def test_optimizer_step_keeps_the_norm_before_clipping():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    tr = trainer(MeanTeacherTrainer)        # (leaves the global RNG as it was)
    assert tr.grad_scaler is None           # on the CPU
    tr.network, tr.optimizer = net, torch.optim.SGD(net.parameters(), lr=0.0)
    x = torch.randn(8, 4) * 50
    loss = (net(x) ** 2).sum()
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)])
    tr.optimizer_step(loss)
    assert tr._grad_norm.item() == pytest.approx(expected.norm().item(), rel=1e-5)
    assert tr._grad_norm.item() > tr.grad_clip      # so this step was clipped ...
    clipped = torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item()
    assert clipped == pytest.approx(tr.grad_clip, rel=1e-4)   # ... to 12, as nnU-Net does


# ----------------------------------------------------------------------------------------------
# Mean Teacher: nnU-Net's loss form on the teacher's pseudo-label, padding left out
# ----------------------------------------------------------------------------------------------
def test_mean_teacher_default_consistency_is_ce_plus_present_foreground_dice():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 3, 6, 6, generator=g) * 4
    student = torch.randn(2, 3, 6, 6, generator=g)
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    valid[:, :, 4:] = False                                  # padding on the right
    loss, stats = losses.consistency_loss("dice_ce", student, teacher, 0.9, valid=valid,
                                          dice_include_background=False, dice_skip_absent_classes=True,
                                          dice_weight=1.0, ce_weight=1.0)
    label, conf = losses.pseudo_label(teacher)
    keep = (conf >= 0.9) & valid
    ce = F.cross_entropy(student, label, reduction="none")[keep].mean()
    p = torch.softmax(student, 1)
    dice_terms = []
    for c in (1, 2):
        y = (label == c) & keep
        if y.any():
            inter = (p[:, c] * y).sum()
            den = (p[:, c] * keep).sum() + y.sum()
            dice_terms.append(1 - (2 * inter + 1e-5) / (den + 1e-5))
    assert dice_terms, "the test input must hold some confident foreground"
    assert loss.item() == pytest.approx((ce + sum(dice_terms) / len(dice_terms)).item(), rel=1e-5)
    # statistics over the image only
    assert stats["pl_confidence"].item() == pytest.approx(conf[valid].mean().item(), rel=1e-6)
    assert stats["mask_ratio"].item() == pytest.approx((conf[valid] >= 0.9).float().mean().item(), rel=1e-6)
    # the padded voxels do not matter at all
    moved = student.clone()
    moved[..., 4:] = torch.randn(2, 3, 6, 2, generator=g) * 10
    again, _ = losses.consistency_loss("dice_ce", moved, teacher, 0.9, valid=valid, dice_include_background=False,
                                       dice_skip_absent_classes=True, dice_weight=1.0, ce_weight=1.0)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_mean_teacher_cutmix_mixes_the_student_view_and_the_teacher_prediction_alike(monkeypatch):
    """MeanTeacherTrainer_cutmix: the student's unlabeled input is the strong view with the next sample's box
    pasted in, and the consistency target is the teacher's prediction of the weak views mixed with the same box
    (one teacher pass, one student pass); the default draws no box."""
    from helpers import unlabeled
    from nnunet_semi.methods import mean_teacher as mt
    torch.manual_seed(5)
    tr = trainer(MeanTeacherTrainer_cutmix)
    tr.unsup_gate_step = 0
    b, shape = 3, (16, 16)
    u = unlabeled(b, shape)
    u.valid[1, :, 12:] = False                                            # padding in sample 1
    box = torch.zeros((b,) + shape, dtype=torch.bool)
    box[0, 2:9, 3:12] = True
    box[2, 8:, :5] = True
    tr.cutmix_boxes = lambda n, spatial: box if (n, tuple(spatial)) == (b, shape) else None
    seen, got = [], {}
    forward = tr.network.forward
    tr.network.forward = lambda x: seen.append(x) or forward(x)
    real = mt.consistency_loss
    monkeypatch.setattr(mt, "consistency_loss", lambda kind, out, tl, thr, valid=None, **k:
                        got.update(teacher=tl, valid=valid) or real(kind, out, tl, thr, valid=valid, **k))
    data = torch.randn((2, 1) + shape)
    target = [torch.zeros((2, 1) + tuple(s // 2 ** i for s in shape)) for i in range(len(tr.network.decoder.seg_layers))]
    tr.compute_loss(data, target, [u])
    partner = torch.tensor([1, 2, 0])
    mixed = torch.where(box[:, None], u.strong[0][partner], u.strong[0])
    assert len(seen) == 1 and torch.equal(seen[0][2:], mixed)
    with torch.no_grad():
        t = tr.teacher(u.weak).float()
    assert torch.allclose(got["teacher"], torch.where(box[:, None], t[partner], t))
    assert torch.equal(got["valid"], torch.where(box, u.valid[partner], u.valid))
    assert MeanTeacherTrainer.cutmix_p == 0.0 and MeanTeacherTrainer_cutmix.cutmix_p == 0.5


def test_mean_teacher_recipes():
    d, r = MeanTeacherTrainer, MeanTeacherTrainer_released
    assert (d.consistency, d.conf_thresh, d.unsup_weight, d.mask_padding) == ("dice_ce", 0.9, 1.0, True)
    assert (d.warmup_iters, d.warmup_pseudo_dice, d.rampup_iters) == (250, 0.5, 500)
    assert (r.consistency, r.conf_thresh, r.unsup_weight, r.mask_padding) == ("mse", None, 0.1, False)
    assert (r.warmup_iters, r.warmup_pseudo_dice, r.rampup_iters, r.rampup_fraction) == (0, None, None, 1.0)


def test_mean_teacher_ema999_decay_schedule():
    """0.99 while the gate is closed and the weight ramps, 0.999 once it is at full weight; the default keeps
    0.99 throughout. The decay of an update is what the teacher moves by (checked on the weights)."""
    tr = trainer(MeanTeacherTrainer_ema999, warmup_iters=250, warmup_pseudo_dice=None, rampup_iters=500)
    decay = lambda t: {n: d for n, _, d, _, _ in t.ema_rules()}["teacher"]   # noqa: E731
    at_step(tr, 100)
    assert tr.unsup_gate_step is None and decay(tr) == 0.99
    at_step(tr, 250)
    at_step(tr, 600)                                            # gate open at 250, ramp still below 1
    assert tr.unsup_gate_step == 250 and 0 < tr.rampup_factor() < 1 and decay(tr) == 0.99
    at_step(tr, 750)                                            # 250 + 500: full weight
    assert tr.rampup_factor() == 1.0 and decay(tr) == 0.999
    with torch.no_grad():
        for p in tr.teacher.parameters():
            p.zero_()
        for p in tr.network.parameters():
            p.fill_(1.0)
    tr.update_ema_modules()   # with Mean Teacher's early-step rule: min(1 - 1/(t + 1), 0.999) at t = 750
    moved = 1.0 - min(1.0 - 1.0 / 751, 0.999)
    assert all(torch.allclose(p, torch.full_like(p, moved)) for p in tr.teacher.parameters())
    default = trainer(MeanTeacherTrainer, warmup_iters=250, warmup_pseudo_dice=None, rampup_iters=500)
    at_step(default, 100)
    assert decay(default) == 0.99
    at_step(default, 900)
    assert decay(default) == 0.99


# ----------------------------------------------------------------------------------------------
# CrossMatch: CE beside the Dice, foreground Dice over present classes, full-resolution ratio
# ----------------------------------------------------------------------------------------------
def test_crossmatch_default_unsupervised_term_is_ce_plus_present_foreground_dice():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, :3, :3] = 1                                   # class 2 absent from the pseudo-label
    keep = torch.rand(2, 8, 8, generator=g) > 0.3
    tr = trainer(CrossMatchTrainer)
    p = torch.softmax(logits, 1)
    y = (target == 1) & keep
    pk = p[:, 1] * keep
    dice1 = 1 - (2 * (pk * y).sum() + 1e-4) / ((pk ** 2).sum() + y.sum() + 1e-4)
    ce = F.cross_entropy(logits, target, reduction="none")[keep].mean()
    assert tr.unsup_dice(logits, target, keep).item() == pytest.approx((dice1 + ce).item(), rel=1e-5)
    # the released recipe: Dice over all three classes (absent class included), no CE
    rel = trainer(CrossMatchTrainer_released)
    assert rel.unsup_dice(logits, target, keep).item() == pytest.approx(
        losses.masked_dice_loss(p, target, keep, include_background=True, smooth=1e-4, squared_denominator=True).item(),
        rel=1e-6)


def test_crossmatch_full_resolution_ratio_option():
    tr = trainer(CrossMatchTrainer)
    assert tr.enable_deep_supervision
    tr.loss = type("DS", (), {"weight_factors": [1 / 1.5, 0.5 / 1.5, 0.0]})()
    assert tr.full_resolution_weight() == pytest.approx(2 / 3)
    tr.enable_deep_supervision = False
    assert tr.full_resolution_weight() == 1.0


def test_crossmatch_recipes():
    d, r = CrossMatchTrainer, CrossMatchTrainer_released
    assert (d.dice_include_background, d.dice_skip_absent_classes, d.unsup_ce_weight) == (False, True, 1.0)
    assert (d.warmup_iters, d.warmup_pseudo_dice, d.rampup_iters) == (250, 0.5, 500)
    assert (r.dice_include_background, r.dice_skip_absent_classes, r.unsup_ce_weight) == (None, False, 0.0)
    assert (r.warmup_iters, r.warmup_pseudo_dice, r.rampup_iters, r.rampup_fraction) == (0, None, None, 0.0)
    # the remaining hyper-parameters are the released code's in both
    for k in ("tau", "eta", "weight_s1", "weight_s2", "loss_divisor", "cutmix_p", "fp_dropout_weak"):
        assert getattr(d, k) == getattr(r, k), k


# ----------------------------------------------------------------------------------------------
# DDP with batch norm: the same mix-source collectives on every rank
# ----------------------------------------------------------------------------------------------
def _bn_unet(norm: str):
    cmgr = config_manager(2, False)
    cmgr.configuration["architecture"]["arch_kwargs"]["norm_op"] = norm
    torch.manual_seed(0)
    return CrossMatchTrainer.build_network_architecture(None, cmgr, 1, 3, True)


@pytest.mark.parametrize("ddp, norm, every", [
    (True, "torch.nn.BatchNorm2d", True), (True, "torch.nn.SyncBatchNorm", True),
    (True, "torch.nn.modules.instancenorm.InstanceNorm2d", False), (False, "torch.nn.BatchNorm2d", False)])
def test_mix_source_runs_every_sample_under_ddp_with_batch_norm(ddp, norm, every):
    net = _bn_unet(norm)
    net.eval()   # batch statistics are not what is tested here; which samples run is
    seen = []
    real = net.forward
    net.forward = lambda x, **kw: seen.append((x.shape[0], kw.get("fp_from"))) or real(x, **kw)
    tr = trainer(CrossMatchTrainer)
    tr.network, tr.is_ddp = net, ddp
    assert tr.mix_source_on_every_sample() == every
    m = torch.randn(4, 1, 16, 16)
    none = torch.zeros(4, 16, 16, dtype=torch.bool)       # this rank drew no CutMix box at all
    with torch.no_grad():
        tr.mix_source_predictions(m, none, none, {"p_weak": 0.0, "p_strong": 0.0})
    assert seen == ([(4, 0)] if every else [])
