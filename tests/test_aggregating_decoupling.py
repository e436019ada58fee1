"""A&D (AggregatingDecouplingTrainer) on the tiny plans: the three decoders on nnU-Net's encoder, the EMA of
D_theta from (D_xi + D_psi) / 2, the exported network, the pseudo-label path (no gradient to D_xi / D_psi,
10 DDIM passes), the class-weighted loss, the warm-up gate, the checkpoint state, and two-rank gloo DDP.
(The training step, gradients of every parameter and the auxiliary round trip are in test_method_template.)"""
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import NUM_CLASSES, PATCH, build, ds_targets, flat_parameters, goto_step, make_trainer, run_two_ranks
from nnunet_semi.ema import unwrap
from nnunet_semi.losses import ClassWeightedDiceCE, deep_supervision_targets
from nnunet_semi.methods.aggregating_decoupling import AggregatingDecouplingTrainer as AD
from nnunet_semi.methods.aggregating_decoupling import AggregatingDecouplingTrainer_released as ADr
from nnunet_semi.networks.aggregating_decoupling import ADExtras, decode, encode, timestep_embedding

OPEN_GATE = {"warmup_iters": 0, "warmup_pseudo_dice": None}
B = 2


def batches(tr, ndim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (PATCH,) * ndim
    data = torch.randn((B, 1) + shape, generator=g)
    target = torch.randint(0, NUM_CLASSES, (B, 1) + shape, generator=g)
    with torch.no_grad():
        tgt = ds_targets(tr.network(data), target) if tr.enable_deep_supervision else target
    from nnunet_semi.data.loader import UnlabeledBatch
    views = [torch.randn((B, 1) + shape, generator=g) for _ in range(1 + tr.num_strong_views)]
    u = UnlabeledBatch(weak=views[0], strong=views[1:], valid=torch.ones((B,) + shape, dtype=torch.bool),
                       keys=[f"u{i}" for i in range(B)])
    return data, tgt, u


# ---- the network ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("resenc", [False, True], ids=["plain", "resenc"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_paths_share_nnunets_encoder_and_the_image_path_is_nnunets_forward(ndim, resenc):
    net = build(AD, ndim, resenc, deep_supervision=True)
    extras = ADExtras(net, NUM_CLASSES)
    x = torch.randn((2, 1) + (PATCH,) * ndim)
    # no encoder parameter is registered in the extras (one owner: the network)
    enc_ids = {id(p) for p in net.encoder.parameters()}
    assert not enc_ids & {id(p) for p in extras.parameters()}
    # the image path is nnU-Net's own encoder and decoder
    skips = encode(net, x)
    ref = net(x)
    out = decode(net.decoder, skips)
    assert len(out) == len(ref) and all(torch.allclose(a, b) for a, b in zip(out, ref))
    # the diffusion stem takes image + classes channels; D_xi predicts one logit map per class at every scale
    assert extras.diffusion_stem.conv.in_channels == 1 + NUM_CLASSES
    t = torch.tensor([0, 999])
    x_t = torch.randn((2, NUM_CLASSES) + (PATCH,) * ndim)
    p = extras.denoise(net, x, x_t, t, deep_supervision=True)
    assert [o.shape for o in p] == [o.shape for o in ref]
    # the timestep matters on the denoising path, and the noisy label does
    p_other_t = extras.denoise(net, x, x_t, torch.tensor([500, 500]), deep_supervision=False)
    assert not torch.allclose(p[0], p_other_t)
    assert not torch.allclose(p[0], extras.denoise(net, x, torch.zeros_like(x_t), t, deep_supervision=False))
    # D_psi reads the same skips; 'shared' init: D_xi and D_psi start as D_theta, 'independent' does not
    assert torch.allclose(extras.difficulty(skips, deep_supervision=False), ref[0])
    indep = ADExtras(net, NUM_CLASSES, init="independent")
    assert not torch.allclose(indep.difficulty(skips, deep_supervision=False), ref[0])


def test_timestep_embedding_is_the_sinusoid():
    e = timestep_embedding(torch.tensor([0, 10]), 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    assert torch.allclose(e[1], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]))
    assert torch.allclose(e[0], torch.cat([torch.zeros(4), torch.ones(4)]))


# ---- EMA and export --------------------------------------------------------------------------------------
def test_ema_of_d_theta_from_the_mean_of_d_xi_and_d_psi_touches_exactly_the_matched_parameters():
    tr = make_trainer(AD, **OPEN_GATE)
    ex = tr.extras
    with torch.no_grad():                           # make the three decoders differ
        for p in list(ex.decoder_xi.parameters()) + list(ex.decoder_psi.parameters()):
            p.add_(torch.randn_like(p))
    net = unwrap(tr.network)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xi = {k: v.clone() for k, v in ex.decoder_xi.state_dict().items()}
    psi = {k: v.clone() for k, v in ex.decoder_psi.state_dict().items()}
    ex_before = {k: v.clone() for k, v in ex.state_dict().items()}
    goto_step(tr, 5)
    tr.update_ema_modules()
    after = net.state_dict()
    d = tr.theta_ema_decay
    for k, v in before.items():
        if k.startswith("decoder.") and not k.startswith("decoder.encoder."):
            sub = k[len("decoder."):]
            assert torch.allclose(after[k], d * v + (1 - d) * (xi[sub] + psi[sub]) / 2, atol=1e-6), k
            assert not torch.equal(after[k], v), k
        else:                                        # encoder (and the decoder's reference to it): untouched
            assert torch.equal(after[k], v), k
    assert all(torch.equal(v, ex.state_dict()[k]) for k, v in ex_before.items())   # the sources are unchanged


def test_exported_network_loads_strictly_into_plain_nnunet_and_equals_the_d_theta_path():
    tr = make_trainer(AD, **OPEN_GATE)
    data, tgt, u = batches(tr)
    for _ in range(2):
        tr.method_step(data, tgt, [u])
        tr.update_ema_modules()
    exported = tr.export_module().state_dict()
    plain = build(AD, 2, False, deep_supervision=False, seed=7)
    plain.load_state_dict(exported, strict=True)
    plain.eval()
    net = unwrap(tr.network).eval()
    x = torch.randn(3, 1, PATCH, PATCH)
    with torch.no_grad():
        ours = decode(net.decoder, encode(net, x), None, deep_supervision=False)
        assert torch.allclose(plain(x), ours, atol=1e-6)


# ---- pseudo-labels and losses ---------------------------------------------------------------------------
def test_pseudo_labels_use_ten_ddim_passes_and_carry_no_gradient_to_d_xi_or_d_psi():
    tr = make_trainer(AD, **OPEN_GATE)
    calls = []
    orig = tr.extras.denoise
    tr.extras.denoise = lambda *a, **k: (calls.append(a[3].clone()), orig(*a, **k))[1]
    x = torch.randn(B, 1, PATCH, PATCH)
    label, stats = tr.pseudo_labels(x)
    assert [int(t[0]) for t in calls] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert label.shape == (B, PATCH, PATCH) and not label.requires_grad
    assert set(label.unique().tolist()) <= set(range(NUM_CLASSES))
    assert 0 <= float(stats["pl_agreement"]) <= 1
    # L_u on D_theta: gradients reach the network only
    tr.extras.denoise = orig
    net = unwrap(tr.network)
    out = decode(net.decoder, encode(net, x), None, True)
    tr.loss(out, deep_supervision_targets(out, label)).backward()
    assert all(p.grad is None for p in tr.extras.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.decoder.parameters())


def test_class_weighted_dice_ce_is_nnunets_dc_ce_without_weights_and_weights_both_terms():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (2, 1, 8, 8), generator=g)
    ours = ClassWeightedDiceCE(batch_dice=True)
    ref = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                         weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    assert torch.allclose(ours(logits, y), ref(logits, y), atol=1e-6)
    w = torch.tensor([0.5, 2.0, 3.0])
    ours.class_weights = w
    lab = y[:, 0]
    ce = F.cross_entropy(logits, lab, weight=w)
    p = torch.softmax(logits, 1)
    oh = F.one_hot(lab, 3).movedim(-1, 1).float()
    dice = (2 * (p * oh).sum((0, 2, 3)) + 1e-5) / (p.sum((0, 2, 3)) + oh.sum((0, 2, 3)) + 1e-5)
    assert torch.allclose(ours(logits, y), ce - (dice[1:] * w[1:]).mean(), atol=1e-6)


def test_difficulty_weights_come_from_d_xi_and_weight_d_psi_loss_and_are_checkpoint_state(tmp_path):
    tr = make_trainer(AD, **OPEN_GATE)
    data, tgt, u = batches(tr)
    captured = {}
    orig = tr.difficulty.update
    tr.difficulty.update = lambda pred, y: (captured.update(pred=pred.clone(), y=y.clone()), orig(pred, y))[1]
    _, terms = tr.method_step(data, tgt, [u])
    assert torch.equal(captured["y"], tgt[0][:, 0].long())
    assert captured["pred"].shape == (B, PATCH, PATCH)
    w = tr.difficulty.weights.float()
    assert torch.allclose(tr._weighted_dc_ce.class_weights, w / w.mean())   # the default normalises them
    assert [float(terms[f"difficulty_w{c}"]) for c in range(NUM_CLASSES)] == pytest.approx(
        tr.difficulty.weights.tolist(), rel=1e-6)
    torch.save(tr.semi_state_dict(), tmp_path / "s.pth")
    fresh = make_trainer(AD, seed=1, **OPEN_GATE)
    fresh.load_semi_state_dict(torch.load(tmp_path / "s.pth", weights_only=False))
    for k, v in tr.difficulty.state_dict().items():
        assert torch.equal(v, getattr(fresh.difficulty, k)), k


def test_closed_gate_gives_exactly_zero_weight_and_skips_the_sampler():
    tr = make_trainer(AD)                            # default warm-up: 250 iterations and pseudo Dice 0.5
    goto_step(tr, 10)
    tr.update_unsup_gate()
    assert tr.unsup_weight_now() == 0.0
    tr.pseudo_labels = lambda *a, **k: pytest.fail("the sampler ran while the gate is closed")
    data, tgt, u = batches(tr)
    _, terms = tr.method_step(data, tgt, [u])
    assert "loss_unsup" not in terms and {"loss_deno", "loss_diff"} <= set(terms)
    assert not tr.draws_unlabeled()                  # the base draws no unlabeled batch while the gate is closed
    _, terms = tr.method_step(data, tgt, [])
    assert "loss_unsup" not in terms and {"loss_deno", "loss_diff"} <= set(terms)


def test_recipes_and_bad_settings():
    r = make_trainer(ADr)
    assert (r.augmentation, r.pseudo_label_view, r.decoder_init, r.unsup_weight) == ("svda", "same", "independent", 10)
    assert r.optimizer.param_groups[0]["momentum"] == 0.9 and r.aux["ad"].optimizer.param_groups[0]["momentum"] == 0.9
    d = make_trainer(AD)
    assert d.optimizer.param_groups[0]["momentum"] == 0.99
    with pytest.raises(ValueError, match="pseudo_label_view"):
        make_trainer(AD, pseudo_label_view="strong")
    with pytest.raises(ValueError, match="decoder_init"):
        make_trainer(AD, decoder_init="random")


def test_svda_variant_changes_only_the_augmentation_and_labels_the_view_it_trains_on():
    from nnunet_semi.methods.aggregating_decoupling import AggregatingDecouplingTrainer_svda as ADs
    from nnunet_semi.training.base import class_hparams
    diff = {k for k, v in class_hparams(ADs).items() if class_hparams(AD).get(k) != v}
    assert diff == {"augmentation", "pseudo_label_view"}
    tr = make_trainer(ADs, **OPEN_GATE)
    from nnunet_semi.data.svda import SVDATransform
    assert isinstance(tr.get_strong_transform(False), SVDATransform)
    assert not isinstance(make_trainer(AD).get_strong_transform(False), SVDATransform)
    tr.update_unsup_gate()
    data, tgt, u = batches(tr)
    seen = []
    real = tr.pseudo_labels

    def spy(image, skips_u=None):
        seen.append((image, skips_u))
        return real(image, skips_u)
    tr.pseudo_labels = spy
    _, terms = tr.method_step(data, tgt, [u])
    assert "loss_unsup" in terms and len(seen) == 1
    image, skips_u = seen[0]
    # the pseudo-labels are made on the strong (SVDA) view D_theta trains on, from the skips already computed
    assert image is u.strong[0] and skips_u is not None


# ---- DDP ---------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    tr = make_trainer(AD, root=os.path.join(out_dir, f"trainer_rank{rank}"), **OPEN_GATE)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr.is_ddp, tr.local_rank = True, rank
        tr.loss = tr._build_loss()
        tr.network = DDP(tr.network)
        tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
        tr.aux = dict(tr.build_auxiliary_modules())
        tr.setup_auxiliary_modules()
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        tr.weighted_loss = DeepSupervisionWrapper(tr._weighted_dc_ce, tr.loss.weight_factors)
        data, tgt, u = batches(tr, seed=10 + rank)    # every rank its own data
        for step in range(3):
            goto_step(tr, step)
            tr.update_unsup_gate()                     # open from step 0: the whole step runs, DDIM included
            _, terms = tr.method_step(data, tgt, [u])
            assert "loss_unsup" in terms
            tr.update_ema_modules()
        torch.save(flat_parameters({"network": unwrap(tr.network), "extras": tr.extras}),
                   os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_keeps_network_and_decoders_identical(tmp_path):
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path)
    for name in ("network", "extras"):
        assert torch.equal(r0[name], r1[name]), name
    init = make_trainer(AD, **OPEN_GATE)
    assert not torch.equal(r0["network"], torch.cat([p.flatten() for p in unwrap(init.network).parameters()]))


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_step_with_residual_encoder_plans(ndim):
    tr = make_trainer(AD, ndim=ndim, resenc=True, **OPEN_GATE)
    assert tr.extras.diffusion_stem.conv.in_channels == 1 + NUM_CLASSES
    goto_step(tr, 3)
    tr.update_unsup_gate()
    data, tgt, u = batches(tr, ndim)
    before = {k: v.clone() for k, v in unwrap(tr.network).state_dict().items()}
    loss, terms = tr.method_step(data, tgt, [u])
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)) for v in terms.values())
    assert "loss_unsup" in terms
    after = unwrap(tr.network).state_dict()
    assert not torch.equal(before["encoder.stem.convs.0.conv.weight"], after["encoder.stem.convs.0.conv.weight"])


def test_normalised_difficulty_weights_keep_the_class_ratios_at_mean_one():
    from nnunet_semi.methods.aggregating_decoupling import AggregatingDecouplingTrainer_normDifficulty as ADn
    tr = make_trainer(ADn, **OPEN_GATE)
    data, tgt, u = batches(tr)
    for _ in range(2):
        tr.method_step(data, tgt, [u])
    used, w = tr._weighted_dc_ce.class_weights, tr.difficulty.weights.float()
    assert float(used.mean()) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(used, w / w.mean()) and not torch.allclose(used, w)


@pytest.mark.parametrize("gate_open", [False, True], ids=["gate_closed", "gate_open"])
def test_default_trains_d_theta_with_nnunets_loss_on_the_labeled_batch(gate_open):
    from nnunet_semi.methods.aggregating_decoupling import AggregatingDecouplingTrainer_thetaUnlabeled as ADu
    from nnunet_semi.methods.aggregating_decoupling import split_decode
    tr = make_trainer(AD, **(OPEN_GATE if gate_open else {}))
    tr.update_unsup_gate()
    assert (tr.unsup_weight_now() > 0) == gate_open
    data, tgt, u = batches(tr)
    net = unwrap(tr.network)
    with torch.no_grad():
        x = torch.cat((data, u.strong[0]))
        skips = encode(net, x)
        want_l = tr.loss(decode(net.decoder, [s[:B] for s in skips], None, True), tgt)
        # one pass on [labeled; unlabeled] equals separate passes (instance norm: per sample)
        l, un = split_decode(net.decoder, skips, B, True, True, True)
        sep_u = decode(net.decoder, [s[B:] for s in skips], None, True)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(un, sep_u))
        assert split_decode(net.decoder, skips, B, False, False, True) == (None, None)
    before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    _, terms = tr.method_step(data, tgt, [u])
    assert float(terms["loss_sup"]) == pytest.approx(float(want_l), rel=1e-5)
    assert ("loss_unsup" in terms) == gate_open
    # D_theta is trained by its own gradient now, also while the gate is closed
    grad = net.decoder.seg_layers[-1].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert not all(torch.equal(before[k], v) for k, v in net.decoder.state_dict().items())
    # as released (D_theta on unlabeled data only, raw difficulty weights): the earlier default and the released
    # recipe; with the gate closed D_theta gets no gradient at all
    assert (ADr.theta_supervised, ADr.difficulty_normalize) == (False, False)
    other = make_trainer(ADu)
    d2, t2, u2 = batches(other)
    _, terms = other.method_step(d2, t2, [u2])
    assert "loss_sup" not in terms and unwrap(other.network).decoder.seg_layers[-1].weight.grad is None
    assert torch.equal(other._weighted_dc_ce.class_weights, other.difficulty.weights.float())
