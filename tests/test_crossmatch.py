"""Unit tests of CrossMatchTrainer (CPU, tiny networks): tau masking, gradient-free pseudo-labels, CutMix
alignment, stacked feature-perturbation streams, state-dict compatibility with nnU-Net's plain networks
and a full compute_loss + backward."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from helpers import LOWEST_DS_HEAD, NUM_CLASSES, build, ds_targets, goto_step, make_trainer, unlabeled
from nnunet_semi.methods import crossmatch as cm
from nnunet_semi.methods.crossmatch import (CrossMatchTrainer, CrossMatchTrainer_annealedTau, CrossMatchTrainer_paper,
                                            CrossMatchTrainer_presentClassDice, CrossMatchTrainer_rampUp,
                                            CrossMatchTrainer_released, MixSource, StudentStreams, annealed_tau,
                                            crossmatch_unsupervised_terms)
from nnunet_semi.networks.feature_perturbation import FeaturePerturbationUNet, add_feature_perturbation
from nnunet_semi.perturbations import channel_dropout_mask, perturb_skips


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def nnunet_loss(num_outputs: int, ddp: bool = False) -> nn.Module:
    """nnU-Net's _build_loss with deep supervision; the lowest output's weight is 0, or 1e-6 under DDP
    without compile (nnU-Net's own fix for DDP's unused-parameter error)."""
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    w = np.array([1 / (2 ** i) for i in range(num_outputs)])
    w[-1] = 1e-6 if ddp else 0
    return DeepSupervisionWrapper(loss, list(w / w.sum()))


def cm_trainer(network=None, loss=None, ndim: int = 2, cls=CrossMatchTrainer_released, num_classes: int = NUM_CLASSES,
               **attrs):
    """A real CrossMatch trainer (:func:`helpers.make_trainer`; ``attrs`` are class attributes) with the test's
    network and loss when given, and the warm-up gate open from step 0 (compute_loss alone does not step it); by
    default the released recipe, whose arithmetic most tests here check against the released code."""
    tr = make_trainer(cls, ndim=ndim, num_classes=num_classes, **attrs)
    if network is not None:
        tr.network = network
    if loss is not None:
        tr.loss = loss
    tr.unsup_gate_step = 0
    return tr


# ----------------------------------------------------------------------------------------------
# tau masking and pseudo-labels
# ----------------------------------------------------------------------------------------------
def _logits_with_confidence(conf: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose softmax has max ``conf`` (> 1/C) at class ``label``, the rest spread evenly."""
    other = (1 - conf) / (num_classes - 1)
    probs = other.unsqueeze(1).repeat(1, num_classes, *([1] * (conf.ndim - 1)))
    probs.scatter_(1, label.unsqueeze(1), conf.unsqueeze(1))
    return probs.log()


@pytest.mark.parametrize("num_classes", [2, 4])
def test_tau_masking_excludes_exactly_low_confidence_voxels(num_classes):
    g = torch.Generator().manual_seed(1)
    shape = (2, 6, 5)
    label = torch.randint(0, num_classes, shape, generator=g)
    conf = torch.tensor([0.6, 0.9, 0.94, 0.951, 0.97, 0.99])[torch.randint(0, 6, shape, generator=g)]
    teacher = _logits_with_confidence(conf, label, num_classes)
    student = torch.randn((2, num_classes) + shape[1:], generator=g)
    tr = cm_trainer(None, None, 2, num_classes=num_classes)
    tau = 0.95
    y, c = cm.pseudo_label(teacher)
    assert torch.equal(y, label) and torch.allclose(c, conf, atol=1e-6)
    loss = tr.unsup_dice(student, y, c >= tau)

    # by hand, over the kept voxels only (float64)
    keep = conf.numpy() >= tau
    p = torch.softmax(student.double(), 1).numpy()
    classes = range(num_classes) if num_classes > 2 else [1]   # binary: foreground only (LA code)
    eps = 1e-4 if num_classes > 2 else 1e-5
    dices = []
    for k in classes:
        pk, yk = p[:, k][keep], (label.numpy() == k)[keep].astype(np.float64)
        dices.append((2 * (pk * yk).sum() + eps) / ((pk ** 2).sum() + (yk ** 2).sum() + eps))
    assert loss.item() == pytest.approx(1 - np.mean(dices), rel=1e-5, abs=1e-6)

    # excluded voxels do not matter: change the student there arbitrarily
    student2 = student.clone()
    excl = torch.from_numpy(~keep).unsqueeze(1).expand_as(student2)
    student2[excl] = torch.randn(int(excl.sum()), generator=g) * 10
    assert tr.unsup_dice(student2, y, c >= tau).item() == pytest.approx(loss.item(), rel=1e-6)

    # the statistics of the functional core use the same mask
    z = torch.zeros(2, num_classes, *shape[1:])
    no_box = torch.zeros(shape, dtype=torch.bool)
    terms = crossmatch_unsupervised_terms(StudentStreams(teacher, z, z, z, z, z, z), MixSource(z, z, z, no_box, no_box),
                                          tau, tr.unsup_dice)
    assert terms["mask_ratio"].item() == pytest.approx(keep.mean(), abs=1e-6)
    assert terms["pl_confidence"].item() == pytest.approx(conf.mean().item(), abs=1e-6)


def test_pseudo_labels_carry_no_gradient():
    g = torch.Generator().manual_seed(2)
    shape = (2, NUM_CLASSES, 8, 8)
    leaf = lambda: torch.randn(shape, generator=g).requires_grad_(True)
    p_w, p_ww, p_ws, p_s1, p_s2, p_s2w, p_s2s, mix, mixw, mixs = (leaf() for _ in range(10))
    box = torch.zeros((2, 8, 8), dtype=torch.bool)
    box[:, 2:5, 3:7] = True
    tr = cm_trainer(None, None, 2)
    streams, source = StudentStreams(p_w, p_ww, p_ws, p_s1, p_s2, p_s2w, p_s2s), MixSource(mix, mixw, mixs, box, box)
    terms = crossmatch_unsupervised_terms(streams, source, 0.0, tr.unsup_dice)
    y, c = cm.pseudo_label(p_w)
    assert not y.requires_grad and not c.requires_grad
    total = sum(terms[k] for k in ("loss_s1", "loss_s2", "loss_tkd", "loss_dkd"))
    total.backward()
    for pure_source in (p_w, mix, mixw, mixs):
        assert pure_source.grad is None
    for student in (p_ww, p_ws, p_s1, p_s2, p_s2w, p_s2s):
        assert student.grad is not None and student.grad.abs().sum() > 0
    # the dropout streams of the weak view are students only in L_tkd; as L_dkd teachers they get no gradient
    fresh = crossmatch_unsupervised_terms(streams, source, 0.0, tr.unsup_dice)
    assert torch.autograd.grad(fresh["loss_dkd"], [p_ww, p_ws], allow_unused=True) == (None, None)


# ----------------------------------------------------------------------------------------------
# CutMix alignment
# ----------------------------------------------------------------------------------------------
class VoxelNet(nn.Module):
    """Voxel-wise stand-in network: logits [0, k * image]; k = 1 clean, 2 weak and 3 strong dropout stream.
    Records its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = []

    def logits(self, x, k):
        return torch.cat((torch.zeros_like(x[:, :1]), k * self.scale * x[:, :1]), 1)

    def forward(self, x, fp_from=None, p_weak=0.25, p_strong=0.75, fp_masks=None, clean_no_grad=0):
        self.calls.append((x.detach().clone(), fp_from, torch.is_grad_enabled()))
        if fp_from is None:
            return self.logits(x, 1.0)
        return self.logits(x, 1.0), self.logits(x[fp_from:], 2.0), self.logits(x[fp_from:], 3.0)


@pytest.mark.parametrize("single_pass", [True, False])
def test_cutmix_region_of_images_labels_and_confidences_line_up(single_pass):
    torch.manual_seed(3)
    shape, b, tau = (12, 10, 8), 2, 0.8
    u = unlabeled(b, shape, -2.0, -0.05)    # the own image: pseudo-label 0 everywhere
    m = unlabeled(b, shape, 0.05, 2.0)      # the mix source: pseudo-label 1 everywhere
    boxes = []
    tr = cm_trainer(VoxelNet(), lambda out, tgt: out.float().mean() * 0, 3, num_classes=2, cutmix_p=1.0,
                    tau=tau, single_student_pass=single_pass)
    real_boxes = tr.cutmix_boxes
    tr.cutmix_boxes = lambda *a: boxes.append(real_boxes(*a)) or boxes[-1]
    calls = []
    real_dice = tr.unsup_dice
    tr.unsup_dice = lambda logits, y, keep: calls.append((logits.detach(), y, keep)) or real_dice(logits, y, keep)
    data = torch.randn((b, 1) + shape)
    tr.compute_loss(data, torch.zeros((b, 1) + shape), [u, m])
    box1, box2 = boxes
    assert box1.any() and box2.any() and not torch.equal(box1, box2)

    # images: the grad pass sees the strong views with the mix source's strong views pasted into the boxes
    grad_inputs = torch.cat([c[0] for c in tr.network.calls if c[2]])
    u_s1, u_s2 = (torch.where(bx.unsqueeze(1), ms, us) for bx, ms, us in ((box1, m.strong[0], u.strong[0]),
                                                                           (box2, m.strong[1], u.strong[1])))
    for img, bx in ((u_s1, box1), (u_s2, box2)):
        assert any(torch.equal(img, grad_inputs[i:i + b]) for i in range(0, grad_inputs.shape[0] - b + 1, b))
        assert torch.equal(img[:, 0] > 0, bx)   # pasted region == box
    # labels and confidences, in the order of crossmatch_unsupervised_terms: s1, s2, tkd x4, dkd x2
    sig = lambda x, k: torch.sigmoid(k * x[:, 0].abs())
    conf = lambda k, bx: torch.where(bx, sig(m.weak, k), sig(u.weak, k))
    expected = [(u_s1, 1, box1, conf(1, box1)), (u_s2, 1, box2, conf(1, box2)),
                (u.weak, 2, None, sig(u.weak, 1)), (u.weak, 3, None, sig(u.weak, 1)),
                (u_s2, 2, box2, conf(1, box2)), (u_s2, 3, box2, conf(1, box2)),
                (u_s2, 2, box2, conf(2, box2)), (u_s2, 3, box2, conf(3, box2))]   # dkd: mix-source dropout streams
    assert len(calls) == len(expected)
    for (logits, y, keep), (img, k, bx, c) in zip(calls, expected):
        assert torch.allclose(logits, tr.network.logits(img, k).detach())
        assert torch.equal(y, bx.long() if bx is not None else torch.zeros_like(y))
        assert torch.equal(keep, c >= tau)


def test_paper_time_bug_variant_takes_dropout_labels_from_the_same_image(monkeypatch):
    torch.manual_seed(4)
    shape, b = (12, 10), 2
    u, m = unlabeled(b, shape, -2.0, -0.05), unlabeled(b, shape, 0.05, 2.0)
    tr = cm_trainer(VoxelNet(), lambda out, tgt: out.float().mean() * 0, 2, num_classes=2, cutmix_p=1.0,
                    fp_labels_from_mix_source=False)
    calls = []
    tr.unsup_dice = lambda logits, y, keep: calls.append(y) or logits.float().mean()
    tr.compute_loss(torch.randn((b, 1) + shape), None, [u, m])
    assert not any(c[1] is not None and not c[2] for c in tr.network.calls)  # plain no-grad pass on the mix source
    assert calls[4].any() and not calls[6].any() and not calls[7].any()


# ----------------------------------------------------------------------------------------------
# network: stacked streams, state dict, inference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndim,resenc", [(2, False), (3, False), (2, True), (3, True)])
def test_streams_decoded_in_one_call_equal_one_by_one(ndim, resenc):
    net = build(CrossMatchTrainer, ndim, resenc, deep_supervision=True)
    assert isinstance(net, FeaturePerturbationUNet)
    assert isinstance(net, ResidualEncoderUNet if resenc else PlainConvUNet)
    x = torch.randn((3, 1) + (16,) * ndim)
    k = 1
    with torch.no_grad():
        skips = net.encoder(x)
        g = torch.Generator().manual_seed(5)
        weak_masks = [channel_dropout_mask(s[k:], 0.25, generator=g) for s in skips]
        strong_masks = [channel_dropout_mask(s[k:], 0.75, generator=g) for s in skips]
        clean, weak, strong = net(x, fp_from=k, p_weak=0.25, p_strong=0.75, fp_masks=(weak_masks, strong_masks))
        ref_clean = net.decoder(skips)
        ref_weak = net.decoder(perturb_skips([s[k:] for s in skips], 0.25, weak_masks))[0]
        ref_strong = net.decoder(perturb_skips([s[k:] for s in skips], 0.75, strong_masks))[0]
    assert isinstance(clean, list) and len(clean) == len(ref_clean)
    for a, r in zip(clean, ref_clean):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weak, ref_weak, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(strong, ref_strong, rtol=1e-4, atol=1e-5)
    assert weak.shape == strong.shape == (2, NUM_CLASSES) + (16,) * ndim
    # clean_no_grad: the last sample's clean stream decoded in a separate no-grad call gives the same
    # outputs and, for a loss that ignores that stream (as CrossMatch's do), the same gradients
    grads = []
    for n_ng in (0, 1):
        net.zero_grad()
        c, w, st = net(x, fp_from=k, fp_masks=(weak_masks, strong_masks), clean_no_grad=n_ng)
        for a, r in zip(c, ref_clean):
            torch.testing.assert_close(a.detach(), r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.detach(), ref_weak, rtol=1e-4, atol=1e-5)
        (c[0][:2].square().mean() + w.square().mean() + st.square().mean()).backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
    assert sum(g is not None for g in grads[0]) > len(grads[0]) // 2
    for g0, g1 in zip(*grads):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)
    # random masks: independent per feature map, the streams differ from the clean one and from each other
    with torch.no_grad():
        _, w1, s1 = net(x, fp_from=k)
    assert not torch.allclose(w1, clean[0][k:]) and not torch.allclose(w1, s1)
    # masks: dropout2d/3d semantics (channel-wise, survivors scaled)
    msk = channel_dropout_mask(torch.zeros(64, 32, *(4,) * ndim), 0.75, generator=torch.Generator().manual_seed(0))
    assert msk.shape == (64, 32) + (1,) * ndim and set(msk.unique().tolist()) <= {0.0, 4.0}
    assert 0.2 < (msk > 0).float().mean().item() < 0.3


@pytest.mark.parametrize("ndim,resenc", [(2, False), (3, False), (2, True), (3, True)])
def test_inference_network_loads_plain_state_dict(ndim, resenc):
    plain = build(nnUNetTrainer, ndim, resenc, deep_supervision=False)
    ours = build(CrossMatchTrainer, ndim, resenc, deep_supervision=False)
    torch.nn.init.normal_(next(ours.parameters()))     # make sure the weights really come from the load
    assert type(plain) in (PlainConvUNet, ResidualEncoderUNet) and type(ours).__mro__[2] is type(plain)
    assert list(plain.state_dict().keys()) == list(ours.state_dict().keys())
    ours.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(ours.state_dict(), strict=True)     # and the other way round (stock predict)
    plain.eval(), ours.eval()
    x = torch.randn((2, 1) + (16,) * ndim)
    with torch.no_grad():
        a, b = plain(x), ours(x)
    assert isinstance(b, torch.Tensor)
    assert torch.equal(a, b)
    # deep supervision toggled the nnU-Net way
    ours.decoder.deep_supervision = True
    with torch.no_grad():
        assert isinstance(ours(x), list)


def test_feature_perturbation_needs_encoder_and_decoder():
    with pytest.raises(TypeError):
        add_feature_perturbation(nn.Conv2d(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# compute_loss end to end
# ----------------------------------------------------------------------------------------------
def _step_inputs(ndim, b_l=2, b_u=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (16,) * ndim
    data = torch.randn((b_l, 1) + shape, generator=g)
    target = torch.randint(0, NUM_CLASSES, (b_l, 1) + shape, generator=g)
    us = [unlabeled(b_u, shape) for _ in range(2)]
    us[1].valid[:, :2] = False      # some padding in the mix source
    return data, target, us


@pytest.mark.parametrize("ndim,resenc,single_pass", [(2, False, True), (3, False, True), (2, True, False),
                                                     (3, True, True)])
def test_compute_loss_finite_and_every_parameter_gets_a_gradient(ndim, resenc, single_pass):
    net = build(CrossMatchTrainer, ndim, resenc, deep_supervision=True)
    data, target, us = _step_inputs(ndim)
    with torch.no_grad():
        n_out = len(net(data))
    for ddp in (True, False):
        net.zero_grad(set_to_none=True)
        tr = cm_trainer(net, nnunet_loss(n_out, ddp), ndim, single_student_pass=single_pass, tau=0.4)
        goto_step(tr, 3)
        loss, terms = tr.compute_loss(data, ds_targets(net(data), target), us)
        assert set(terms) == set(cm.LOG_TERMS)
        assert torch.isfinite(loss) and all(math.isfinite(float(v)) for v in terms.values())
        assert float(terms["tau"]) == 0.4 and 0 <= float(terms["mask_ratio"]) <= 1
        loss.backward()
        for name, p in net.named_parameters():
            if not ddp and name.startswith(LOWEST_DS_HEAD):
                # nnU-Net weights the lowest DS output 0 outside DDP (stock nnU-Net: no gradient there either)
                assert p.grad is None, name
                continue
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
    assert tr.kd_weight == (0.5 if ndim == 2 else 1.0)


def test_single_pass_equals_the_released_codes_two_passes():
    net = build(CrossMatchTrainer, 2, False, deep_supervision=True)
    data, target, us = _step_inputs(2, seed=7)
    with torch.no_grad():
        tgt = ds_targets(net(data), target)
        loss_fn = nnunet_loss(len(tgt))
    results = []
    for single in (True, False):
        tr = cm_trainer(net, loss_fn, 2, single_student_pass=single, fp_dropout_weak=0.0,
                        fp_dropout_strong=0.0, tau=0.3)
        torch.manual_seed(11)   # same CutMix boxes
        loss, terms = tr.compute_loss(data, tgt, us)
        results.append((loss.item(), {k: float(v) for k, v in terms.items()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for k in results[0][1]:
        assert results[0][1][k] == pytest.approx(results[1][1][k], rel=1e-5, abs=1e-6), k


def test_loss_weighting_and_variants():
    # weighted sum as documented, with stand-in terms
    tr = cm_trainer(None, None, 2)
    assert (tr.weight_s1, tr.weight_s2, tr.kd_weight, tr.loss_divisor, tr.sup_loss_scale) == (0.25, 0.25, 0.5, 2, 0.5)
    assert cm_trainer(None, None, 3).kd_weight == 1.0
    paper = cm_trainer(None, None, 2, cls=CrossMatchTrainer_paper)
    assert (paper.tau, paper.weight_s1, paper.weight_s2, paper.kd_weight, paper.loss_divisor) == (0.85, 0.5, 0.5, 1, 3)
    binary = cm_trainer(None, None, 3, num_classes=2)
    assert (binary.dice_bg, binary.dice_eps) == (False, 1e-5)
    multi = cm_trainer(None, None, 2, num_classes=4)
    assert (multi.dice_bg, multi.dice_eps) == (True, 1e-4)
    assert CrossMatchTrainer.num_strong_views == 2 and CrossMatchTrainer.unlabeled_batches_per_step == 2


def test_annealed_tau_follows_the_la_code():
    assert annealed_tau(0, 17000, 0.75) == 0.75
    assert annealed_tau(1, 17000, 0.75) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    end = annealed_tau(14000, 17000, 0.75)
    assert end == pytest.approx((0.75 + 0.25 * math.exp(-5 * (1 - 13999 / 17000) ** 2)) * math.log(2))
    assert 0.66 < end < 0.67
    tr = cm_trainer(None, None, 3, cls=CrossMatchTrainer_annealedTau)
    tr.num_epochs, tr.num_iterations_per_epoch = 14, 1000
    assert goto_step(tr, 0).tau_now() == 0.75
    goto_step(tr, 14000)     # step 14000 of 14000: the LA code's 17000-step ramp
    assert tr.tau_now() == pytest.approx(end)
    assert cm_trainer(None, None, 3).tau_now() == 0.95


@pytest.mark.parametrize("single_pass", [True, False])
def test_ddp_without_find_unused_parameters(tmp_path, single_pass):
    """Every student stream runs through the DDP wrapper's forward and every parameter gets a gradient:
    DDP (gloo, one CPU rank, find_unused_parameters=False as nnU-Net builds it) trains for several steps.
    Negative control: nnU-Net's non-DDP DS weights leave the lowest head unused and DDP must fail."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # the trainers are built before the process group (nnU-Net's __init__ moves a trainer of one to CUDA)
    trainers = [cm_trainer(tau=0.4, single_student_pass=single_pass) for _ in range(2)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for tr, (ddp_weights, ok) in zip(trainers, ((True, True), (False, False))):
            net = build(CrossMatchTrainer, 2, False, deep_supervision=True)
            data, target, us = _step_inputs(2)
            with torch.no_grad():
                tgt = ds_targets(net(data), target)
            tr.network, tr.loss = DDP(net), nnunet_loss(len(tgt), ddp_weights)

            def steps():
                for _ in range(3):
                    tr.compute_loss(data, tgt, us)[0].backward()
            if ok:
                steps()
            else:
                with pytest.raises(RuntimeError, match="finished reduction"):
                    steps()
    finally:
        dist.destroy_process_group()


def test_total_keeps_nnunet_loss_scale_and_the_codes_ratios():
    net = build(CrossMatchTrainer, 2, False, deep_supervision=True)
    data, target, us = _step_inputs(2, seed=3)
    with torch.no_grad():
        tgt = ds_targets(net(data), target)
        loss_fn = nnunet_loss(len(tgt))
    totals = {}
    for keep in (True, False):
        tr = cm_trainer(net, loss_fn, 2, keep_nnunet_loss_scale=keep, fp_dropout_weak=0.0,
                        fp_dropout_strong=0.0, tau=0.3)
        torch.manual_seed(5)
        with torch.no_grad():
            totals[keep], terms = tr.compute_loss(data, tgt, us)
    # the code's absolute scale: (0.5 L + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_kd) / 2; kept scale: x 4
    kd = 0.7 * terms["loss_tkd"] + 0.3 * terms["loss_dkd"]
    code = (terms["loss_sup"] + 0.25 * terms["loss_s1"] + 0.25 * terms["loss_s2"] + 0.5 * kd) / 2
    assert totals[False].item() == pytest.approx(code.item(), rel=1e-5)
    assert totals[True].item() == pytest.approx(4 * code.item(), rel=1e-5)


def test_mix_source_runs_only_the_samples_whose_box_is_used():
    net = build(CrossMatchTrainer, 2, False, deep_supervision=True)
    seen = []
    real_forward = net.forward
    net.forward = lambda x, **kw: seen.append((x.shape[0], kw.get("fp_from"))) or real_forward(x, **kw)
    tr = cm_trainer(net, None, 2)
    m = torch.randn(4, 1, 16, 16)
    fp = {"p_weak": 0.0, "p_strong": 0.0}   # dropout streams == clean stream, so rows can be compared
    with torch.no_grad():
        ref = net.decoder(net.encoder(m))[0]
    none, full = torch.zeros(16, 16, dtype=torch.bool), torch.ones(16, 16, dtype=torch.bool)
    # sample 0: no box; 1: box in view 1 only; 2: box in view 2 only; 3: both
    box1 = torch.stack([none, full, none, full])
    box2 = torch.stack([none, none, full, full])
    mix, mix_weak, mix_strong = tr.mix_source_predictions(m, box1, box2, fp)
    assert seen == [(3, 1)]   # samples 1 (clean only) then 2, 3 (with dropout streams)
    assert not mix[0].any() and not mix_weak[:2].any() and not mix_strong[:2].any()
    torch.testing.assert_close(mix[1:], ref[1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mix_weak[2:], ref[2:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mix_strong[2:], ref[2:], rtol=1e-4, atol=1e-5)
    # no box at all: no forward pass; paper-time code: a plain pass on the boxed samples only
    seen.clear()
    assert not tr.mix_source_predictions(m, box1 & False, box2 & False, fp)[0].any() and seen == []
    tr.fp_labels_from_mix_source = False
    mix, mix_weak, mix_strong = tr.mix_source_predictions(m, box1, box2, fp)
    assert seen == [(3, None)] and mix_weak is None and mix_strong is None
    torch.testing.assert_close(mix[1:], ref[1:], rtol=1e-4, atol=1e-5)


def test_mixed_precision_step_matches_float32():
    """Under autocast (nnU-Net uses it on CUDA; bfloat16 on the CPU here exercises the same dtype mixing:
    low-precision logits, float32 pseudo-labels, Dice and mix-source buffers) the step is finite, every
    parameter gets a gradient, and the loss is the float32 loss up to the precision."""
    net = build(CrossMatchTrainer, 2, False, deep_supervision=True)
    data, target, us = _step_inputs(2, seed=5)
    with torch.no_grad():
        tgt = ds_targets(net(data), target)
    tr = cm_trainer(net, nnunet_loss(len(tgt)), 2, tau=0.4, cutmix_p=1.0)
    losses = []
    for amp in (False, True):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(21)   # same boxes and dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, terms = tr.compute_loss(data, tgt, us)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in net.named_parameters()
                   if not n.startswith(LOWEST_DS_HEAD))
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.05)


def test_rampup_variant_scales_only_the_unsupervised_terms():
    """CrossMatchTrainer_rampUp: total = (L_sup + r(t) L_u) x kept scale, r = exp(-5 (1 - t/T)^2) over the first
    half of training; same inputs and boxes as the released recipe, whose r is 1."""
    net = build(CrossMatchTrainer, 2, False, deep_supervision=True)
    data, target, us = _step_inputs(2, seed=4)
    with torch.no_grad():
        tgt = ds_targets(net(data), target)
        loss_fn = nnunet_loss(len(tgt))
    steps = 10 * 10
    for step, factor in ((0, math.exp(-5)), (25, math.exp(-5 * 0.25)), (50, 1.0), (80, 1.0)):
        totals = {}
        for cls in (CrossMatchTrainer_released, CrossMatchTrainer_rampUp):
            tr = cm_trainer(net, loss_fn, 2, cls=cls, fp_dropout_weak=0.0, fp_dropout_strong=0.0, tau=0.3)
            goto_step(tr, step)
            assert tr.total_steps == steps
            torch.manual_seed(6)
            with torch.no_grad():
                totals[cls], terms = tr.compute_loss(data, tgt, us)
        assert tr.rampup_factor() == pytest.approx(factor)
        kd = 0.7 * terms["loss_tkd"] + 0.3 * terms["loss_dkd"]
        unsup = (0.25 * terms["loss_s1"] + 0.25 * terms["loss_s2"] + 0.5 * kd).item()
        sup = terms["loss_sup"].item()
        assert unsup > 0.01
        assert totals[CrossMatchTrainer_released].item() == pytest.approx((sup + unsup) / 0.5, rel=1e-5)
        assert totals[CrossMatchTrainer_rampUp].item() == pytest.approx((sup + factor * unsup) / 0.5, rel=1e-5)


def test_present_class_dice_variant_ignores_classes_absent_from_the_pseudo_label():
    from nnunet_semi.losses import masked_dice_loss
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, NUM_CLASSES, 8, 8, generator=g)
    logits[:, 0] += 6.0                                   # confident background, as early in training
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, :2, :2] = 1                                 # class 1 present in the batch, class 2 absent
    keep = torch.ones(2, 8, 8, dtype=torch.bool)
    default = cm_trainer(None, None, 2)
    variant = cm_trainer(None, None, 2, cls=CrossMatchTrainer_presentClassDice)
    assert not default.dice_skip_absent_classes and variant.dice_skip_absent_classes
    kw = dict(include_background=True, smooth=1e-4, squared_denominator=True, batch_dice=True)
    probs = torch.softmax(logits, 1)
    assert variant.unsup_dice(logits, target, keep).item() == pytest.approx(
        masked_dice_loss(probs, target, keep, skip_absent_classes=True, **kw).item(), rel=1e-6)
    assert default.unsup_dice(logits, target, keep).item() == pytest.approx(
        masked_dice_loss(probs, target, keep, **kw).item(), rel=1e-6)
    # default = mean over 3 classes, variant = mean over the 2 present ones: the absent class scores a loss of ~1
    absent = 3 * default.unsup_dice(logits, target, keep).item() - 2 * variant.unsup_dice(logits, target, keep).item()
    assert absent == pytest.approx(1.0, abs=0.02)
