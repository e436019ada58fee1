"""ReciprocalLearningTrainer on tiny nnU-Net networks (CPU): the feedback coefficient and the teacher's
gradient against independent autograd computations, no student step on labeled data, no gradient from the
student's loss into the teacher, auxiliary state round trips, refused teacher checkpoints, and a two-rank
gloo DDP run whose networks stay bit-identical across ranks."""
import copy
import os
from unittest import mock

import pytest
import torch

from helpers import (LOWEST_DS_HEAD, NUM_CLASSES, build, config_manager, ds_targets, flat_parameters, make_trainer,
                     run_two_ranks)
from nnunet_semi.data.loader import UnlabeledBatch
from nnunet_semi.losses import pseudo_label
from nnunet_semi.methods import reciprocal_learning as rl
from nnunet_semi.training import budget
from nnunet_semi.methods.reciprocal_learning import (ReciprocalLearningTrainer, ReciprocalLearningTrainer_released,
                                                     TEACHER_CHECKPOINT_VAR, teacher_checkpoint_fix)
from nnunet_semi.training.supervised_init import load_supervised_checkpoint, supervised_run_checkpoint


def tiny_net(seed: int, ds: bool = True):
    return build(ReciprocalLearningTrainer, 2, False, ds, seed=seed)


def rl_trainer(cls=ReciprocalLearningTrainer, teacher_pretrained: bool = True, root=None, **class_attrs):
    """A real trainer of ``cls`` (:func:`helpers.make_trainer`: student, teacher as auxiliary module, both
    optimizers, nnU-Net's loss) whose student and teacher start from ``tiny_net(0)`` and ``tiny_net(1)``; with
    ``teacher_pretrained`` (as from a teacher checkpoint) the reciprocal step runs from step 0."""
    tr = make_trainer(cls, root=root, **class_attrs)
    tr.network.load_state_dict(tiny_net(0).state_dict())
    tr.aux["teacher"].module.load_state_dict(tiny_net(1).state_dict())
    tr.teacher_pretrained = teacher_pretrained
    return tr


def batch(seed: int, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(b, 1, 16, 16, generator=g)
    target = torch.randint(0, NUM_CLASSES, (b, 1, 16, 16), generator=g).float()
    x_u = torch.randn(b, 1, 16, 16, generator=g)
    u = UnlabeledBatch(weak=x_u, strong=[], valid=torch.ones(b, 16, 16, dtype=torch.bool), keys=["u0", "u1"][:b])
    return data, target, u


def reference(tr, s0, t0, data, target, x_u):
    """The update rule computed independently with plain autograd on flattened gradients."""
    tgt = ds_targets(s0(data), target)
    t_out = t0(torch.cat((data, x_u)))
    t_l, t_u = rl.split_batch(t_out, data.shape[0])
    y_hat, _ = pseudo_label(t_u[0])
    s_params = list(s0.parameters())
    g_u = torch.autograd.grad(tr.pl_loss(s0(x_u), y_hat), s_params, allow_unused=True)
    g_u = [torch.zeros_like(p) if g is None else g for g, p in zip(g_u, s_params)]
    s1 = copy.deepcopy(s0)
    opt, _ = tr.make_optimizer(s1)
    for p, g in zip(s1.parameters(), g_u):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(list(s1.parameters()), tr.grad_clip)
    opt.step()
    g_l = torch.autograd.grad(tr.sup_loss(s1(data), tgt), list(s1.parameters()), allow_unused=True)
    g_l = [torch.zeros_like(p) if g is None else g for g, p in zip(g_l, s1.parameters())]
    flat_u = torch.cat([g.flatten() for g in g_u])
    flat_l = torch.cat([g.flatten() for g in g_l])
    h = tr.optimizer.param_groups[0]["lr"] * torch.dot(flat_u, flat_l)
    g_t = torch.autograd.grad(h.detach() * tr.pl_loss(t_u, y_hat) + tr.sup_loss(t_l, tgt), list(t0.parameters()),
                              allow_unused=True)
    return s1, h, g_t, tgt


@pytest.mark.parametrize("cls", [ReciprocalLearningTrainer, ReciprocalLearningTrainer_released])
def test_feedback_and_teacher_gradient_match_an_independent_computation(cls):
    tr = rl_trainer(cls, teacher_grad_clip=None)   # unclipped, so the teacher's .grad is the raw composed gradient
    tr.aux["teacher"].grad_clip = None
    data, target, u = batch(0)
    s0, t0 = copy.deepcopy(tr.network), copy.deepcopy(tr.aux["teacher"].module)
    s1, h_ref, g_t_ref, tgt = reference(tr, s0, t0, data, target, u.weak)
    # the teacher's gradient accumulates exactly once per parameter: the student's losses never reach it
    counts = {}
    for n, p in tr.aux["teacher"].module.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
    loss, terms = tr.method_step(data, tgt, [u])
    got_grad = [n for n, p in tr.aux["teacher"].module.named_parameters() if p.grad is not None]
    assert set(counts.values()) == {1} and sorted(counts) == sorted(got_grad)
    assert abs(h_ref.item()) > 0
    assert terms["feedback_h"].item() == pytest.approx(h_ref.item(), rel=1e-4, abs=1e-10)
    for (n, p), g in zip(tr.aux["teacher"].module.named_parameters(), g_t_ref):
        ref = torch.zeros_like(p) if g is None else g
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=n)
    # the student took exactly one step, on the pseudo-labels: never on the labeled batch
    for (n, p), q in zip(tr.network.named_parameters(), s1.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert all(p.grad is None for p in tr.network.parameters())   # feedback gradients were cleared
    assert loss.item() == pytest.approx(terms["loss_student_feedback"].item())


def test_every_teacher_parameter_gets_a_gradient_and_the_step_is_finite():
    for cls in (ReciprocalLearningTrainer, ReciprocalLearningTrainer_released):
        tr = rl_trainer(cls)
        data, target, u = batch(1)
        tgt = ds_targets(tr.network(data), target)
        loss, terms = tr.method_step(data, tgt, [u])
        assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in terms.values())
        # (without DDP nnU-Net's deep-supervision weights leave the lowest head at weight 0, as in nnU-Net)
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for n, p in tr.aux["teacher"].module.named_parameters() if not n.startswith(LOWEST_DS_HEAD))
        assert set(tr._grad_norms) == {"network", "teacher"}


def test_teacher_warmup_length(monkeypatch):
    """The base gate's fixed number of iterations, capped by the fraction of a short run; 0 from a teacher
    checkpoint; nnUNet_semi_warmup_iters sets it per run as for every method (uncapped)."""
    tr = rl_trainer(teacher_pretrained=False)                 # the default: 400, at most 20% of the run
    assert tr.total_steps == 100 and tr.warmup_length() == 20
    tr.num_epochs = 5000 // tr.num_iterations_per_epoch    # 5000 iterations: the fixed 400
    assert tr.total_steps == 5000 and tr.warmup_length() == 400
    tr.warmup_max_fraction = None
    tr.num_epochs = 100 // tr.num_iterations_per_epoch
    assert tr.warmup_length() == 400                          # no cap
    tr.teacher_pretrained = True
    assert tr.warmup_length() == 0
    tr = rl_trainer(teacher_pretrained=False)
    monkeypatch.setenv("nnUNet_semi_warmup_iters", "60")
    assert budget.apply_schedule_overrides(tr) == {"warmup_iters": 60, "warmup_max_fraction": None}
    assert (tr.total_steps, tr.warmup_length()) == (100, 60)


def test_teacher_warmup_refuses_a_pseudo_dice_gate():
    """nnU-Net's pseudo Dice is the student's, which does not train during the teacher's warm-up: a gate on it
    would never open, so it is refused with the variable to set."""
    with pytest.raises(ValueError, match="nnUNet_semi_warmup_pseudo_dice=none"):
        rl_trainer(teacher_pretrained=False, warmup_pseudo_dice=0.5)


def test_teacher_warmup_trains_the_teacher_alone():
    tr = rl_trainer(teacher_pretrained=False, warmup_max_fraction=0.5, warmup_iters=10 ** 6)
    assert tr.warmup_length() == 50
    data, target, u = batch(2)
    tgt = ds_targets(tr.network(data), target)
    s0 = copy.deepcopy(tr.network.state_dict())
    t0 = copy.deepcopy(tr.aux["teacher"].module.state_dict())
    tr.update_unsup_gate()
    assert tr.unsup_gate_step is None                          # the base gate is closed
    assert not tr.draws_unlabeled()                            # no unlabeled batch drawn while it is closed
    loss, terms = tr.method_step(data, tgt, [])
    assert set(terms) == {"loss_teacher_sup"}
    assert all(torch.equal(v, s0[k]) for k, v in tr.network.state_dict().items())
    assert any(not torch.equal(v, t0[k]) for k, v in tr.aux["teacher"].module.state_dict().items())
    tr.current_epoch = 5                                       # step 50: the gate opens, the reciprocal phase
    tr.update_unsup_gate()
    assert tr.unsup_gate_step == 50 and tr.draws_unlabeled()
    _, terms = tr.method_step(data, tgt, [u])
    assert "feedback_h" in terms


def test_auxiliary_state_round_trips(tmp_path):
    tr = rl_trainer()
    data, target, u = batch(3)
    tgt = ds_targets(tr.network(data), target)
    for _ in range(2):
        tr.method_step(data, tgt, [u])
    tr.teacher_pretrained = False
    path = str(tmp_path / "state.pth")
    torch.save(tr.semi_state_dict(), path)
    fresh = rl_trainer()
    fresh.load_semi_state_dict(torch.load(path, weights_only=False))
    a, b = tr.aux["teacher"], fresh.aux["teacher"]
    assert all(torch.equal(v, b.module.state_dict()[k]) for k, v in a.module.state_dict().items())
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and len(sa["state"]) == len(sb["state"]) > 0
    assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"]) for i in sa["state"])
    # the schedules are functions of the epoch (as nnU-Net's): the same epoch gives the same rates after reload
    for sched_a, sched_b, opt_a, opt_b in ((a.lr_scheduler, b.lr_scheduler, a.optimizer, b.optimizer),
                                           (tr.lr_scheduler, fresh.lr_scheduler, tr.optimizer, fresh.optimizer)):
        sched_a.step(4)
        sched_b.step(4)
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] < 0.01
    assert fresh.teacher_pretrained is False
    # the released optimiser's step schedule round-trips too and decays as released
    rel = rl_trainer(ReciprocalLearningTrainer_released)
    sched = rel.aux["teacher"].lr_scheduler
    rel.num_iterations_per_epoch = 250
    sched.iters_per_epoch = 250
    assert [sched.lr_at(e) for e in (0, 9, 10, 20)] == pytest.approx([0.01, 0.01, 0.001, 0.0001])


def test_wrong_teacher_checkpoints_are_refused(tmp_path):
    """The loader and fix the trainer uses (build_auxiliary_modules): a checkpoint of other plans / configuration or
    architecture, or a missing file, is refused naming the command that trains the right one for the run's fold."""
    teacher = tiny_net(3)
    plans = {"plans_name": "nnUNetPlans", "dataset_name": "Dataset104_Hippocampus"}
    good = {"network_weights": tiny_net(4).state_dict(), "init_args": {"plans": plans, "configuration": "2d"}}
    path = str(tmp_path / "checkpoint_final.pth")
    torch.save(good, path)

    def load(p, cfg, dataset="Dataset104_Hippocampus", fold="0"):
        load_supervised_checkpoint(teacher, p, "nnUNetPlans", cfg, dataset, torch.device("cpu"),
                                   teacher_checkpoint_fix(dataset, cfg, "nnUNetPlans", fold), TEACHER_CHECKPOINT_VAR)

    load(path, "2d")
    assert all(torch.equal(v, good["network_weights"][k]) for k, v in teacher.state_dict().items())
    with pytest.raises(RuntimeError, match=r"configuration 2d .* this run uses plans nnUNetPlans, configuration "
                                           r"3d_fullres.*nnUNetv2_train Dataset104_Hippocampus 3d_fullres 0 -tr "
                                           r"SupervisedBaselineTrainer.*ReciprocalLearningTrainer_warmup"):
        load(path, "3d_fullres")
    other = dict(good, network_weights=ReciprocalLearningTrainer.build_network_architecture(
        None, config_manager(2, True), 1, NUM_CLASSES, True).state_dict())
    torch.save(other, path)
    with pytest.raises(RuntimeError, match="does not match this run's architecture"):
        load(path, "2d")
    with pytest.raises(RuntimeError, match="no such file"):
        load(str(tmp_path / "missing.pth"), "2d", "D")


def test_the_supervised_run_of_the_same_dataset_plans_configuration_and_fold_is_found(tmp_path):
    """teacher_init='supervised_run': SupervisedBaselineTrainer's final checkpoint beside this run's output folder,
    else nnUNetTrainer's; none (or only another fold's, configuration's or plans') is refused with the paths looked
    at and the commands that fix it."""
    ds = tmp_path / "nnUNet_results" / "Dataset104_Hippocampus"
    out = str(ds / "ReciprocalLearningTrainer_fromSupervised__nnUNetPlans__2d" / "fold_all")

    def ckpt(trainer, fold="all", config="2d", plans="nnUNetPlans"):
        path = ds / f"{trainer}__{plans}__{config}" / f"fold_{fold}" / "checkpoint_final.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return str(path)
    for other in (dict(fold="0"), dict(config="3d_fullres"), dict(plans="nnUNetResEncUNetMPlans")):
        ckpt("nnUNetTrainer", **other)
    ckpt("nnUNetTrainer", fold="all")
    (ds / "SupervisedBaselineTrainer__nnUNetPlans__2d" / "fold_all").mkdir(parents=True)   # started, not finished
    expected = str(ds / "nnUNetTrainer__nnUNetPlans__2d" / "fold_all" / "checkpoint_final.pth")
    assert supervised_run_checkpoint(out, "nnUNetPlans", "2d", "T") == expected
    sup = ckpt("SupervisedBaselineTrainer")
    assert supervised_run_checkpoint(out, "nnUNetPlans", "2d", "T") == sup          # the benchmark's reference first
    with pytest.raises(RuntimeError) as e:
        supervised_run_checkpoint(str(ds / "T__nnUNetPlans__2d" / "fold_3"), "nnUNetPlans", "2d", "T")
    msg = str(e.value)
    assert str(ds / "SupervisedBaselineTrainer__nnUNetPlans__2d" / "fold_3" / "checkpoint_final.pth") in msg
    assert str(ds / "nnUNetTrainer__nnUNetPlans__2d" / "fold_3" / "checkpoint_final.pth") in msg
    assert "nnUNetv2_train Dataset104_Hippocampus 2d 3 -p nnUNetPlans" in msg
    # the default looks for it, nnUNet_semi_teacher_checkpoint overrides it, the _warmup variant warms up instead
    t = ReciprocalLearningTrainer.__new__(ReciprocalLearningTrainer)
    t.output_folder, t.configuration_name = out, "2d"
    t.plans_manager = type("P", (), {"plans_name": "nnUNetPlans"})()
    with mock.patch.dict(os.environ, {TEACHER_CHECKPOINT_VAR: ""}):
        assert t.find_teacher_checkpoint() == sup
    with mock.patch.dict(os.environ, {TEACHER_CHECKPOINT_VAR: "/x/checkpoint_final.pth"}):
        assert t.find_teacher_checkpoint() == "/x/checkpoint_final.pth"
    t.output_folder = str(ds / "T__nnUNetPlans__2d" / "fold_3")      # no supervised run of fold 3: the fixes
    with mock.patch.dict(os.environ, {TEACHER_CHECKPOINT_VAR: ""}), pytest.raises(RuntimeError) as e:
        t.find_teacher_checkpoint()
    assert f"give {TEACHER_CHECKPOINT_VAR}=" in str(e.value) and "or use ReciprocalLearningTrainer_warmup" in str(e.value)
    t.teacher_init = "warmup"
    with mock.patch.dict(os.environ, {TEACHER_CHECKPOINT_VAR: ""}):
        assert t.find_teacher_checkpoint() is None


def test_the_default_needs_the_supervised_run_and_the_warmup_variant_does_not():
    """The default teacher starts from the supervised run (as released): built where nnUNet_results has none, it is
    refused before training, naming the paths, the command and the _warmup variant; ReciprocalLearningTrainer_warmup
    builds there and warms up; the alias under which the benchmark runs were recorded is the default."""
    from nnunet_semi.methods.reciprocal_learning import (ReciprocalLearningTrainer_fromSupervised,
                                                         ReciprocalLearningTrainer_warmup)
    with pytest.raises(RuntimeError) as e:
        make_trainer(ReciprocalLearningTrainer, supervised_run=False)
    msg = str(e.value)
    assert "SupervisedBaselineTrainer__nnUNetPlans__2d" in msg and "nnUNetv2_train Dataset999_Tiny 2d 0" in msg
    assert "ReciprocalLearningTrainer_warmup" in msg and TEACHER_CHECKPOINT_VAR in msg
    warm = make_trainer(ReciprocalLearningTrainer_warmup, supervised_run=False, epochs=10, iters=10)
    assert warm.teacher_pretrained is False and warm.warmup_length() == 20      # 20% of 100 iterations
    sup = make_trainer(ReciprocalLearningTrainer)                              # a supervised run beside it
    assert sup.teacher_pretrained is True and sup.warmup_length() == 0 and sup.teacher_checkpoint.endswith(
        os.path.join("SupervisedBaselineTrainer__nnUNetPlans__2d", "fold_0", "checkpoint_final.pth"))
    ref = torch.load(sup.teacher_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    assert all(torch.equal(v, ref[k]) for k, v in sup.aux["teacher"].module.state_dict().items())
    assert any(not torch.equal(v, ref[k]) for k, v in sup.network.state_dict().items())   # the student: nnU-Net's init
    assert ReciprocalLearningTrainer_fromSupervised.teacher_init == ReciprocalLearningTrainer.teacher_init


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    # built before the process group (nnU-Net's __init__ moves a trainer of one to CUDA), then made a DDP
    # trainer as nnU-Net's initialize() does on CUDA: DDP loss weights, wrapped network and teacher
    tr = rl_trainer(root=os.path.join(out_dir, f"trainer_rank{rank}"))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr.is_ddp, tr.local_rank = True, rank
        tr.loss = tr._build_loss()
        tr.network = DDP(tr.network)
        tr.optimizer, tr.lr_scheduler = tr.make_optimizer(tr.network)
        tr.setup_auxiliary_modules()
        assert isinstance(tr.aux["teacher"].wrapped, DDP)
        data, target, u = batch(10 + rank)                 # every rank its own data
        tgt = ds_targets(tr.network(data), target)
        for _ in range(3):
            tr.method_step(data, tgt, [u])
        torch.save(flat_parameters({"student": tr.network.module, "teacher": tr.aux["teacher"].module}),
                   os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_keeps_teacher_and_student_identical(tmp_path):
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path)
    for name in ("student", "teacher"):
        assert torch.equal(r0[name], r1[name]), name
    # and they trained: not the initial weights
    assert not torch.equal(r0["teacher"], torch.cat([p.flatten() for p in tiny_net(1).parameters()]))


def test_benchmark_trains_the_supervised_run_before_an_arm_that_starts_from_it():
    from nnunet_semi.benchmark.commands import BenchmarkError
    from nnunet_semi.benchmark.trainers import BASELINE, check_trainers, needs_supervised_run
    from nnunet_semi.methods.reciprocal_learning import ReciprocalLearningTrainer_warmup as W
    from nnunet_semi.methods.supervised import SupervisedBaselineTrainer
    registered = {BASELINE: SupervisedBaselineTrainer, "ReciprocalLearningTrainer": ReciprocalLearningTrainer,
                  "ReciprocalLearningTrainer_warmup": W}
    assert needs_supervised_run(ReciprocalLearningTrainer) and not needs_supervised_run(W)
    assert not needs_supervised_run(SupervisedBaselineTrainer)
    check_trainers([BASELINE, "ReciprocalLearningTrainer"], registered)
    check_trainers(["ReciprocalLearningTrainer"], registered)     # supervised trained earlier, elsewhere
    check_trainers(["ReciprocalLearningTrainer_warmup", BASELINE], registered)
    for arms in (["ReciprocalLearningTrainer", BASELINE], ["ReciprocalLearningTrainer@teacher", BASELINE]):
        with pytest.raises(BenchmarkError, match=f"list {BASELINE} first"):
            check_trainers(arms, registered)


def test_a_refused_supervised_run_names_the_command_for_this_runs_fold(tmp_path):
    """A supervised checkpoint of another configuration where the default looks (fold 0) is refused; the fix names
    the command for fold 0, not for another fold."""
    from nnunet_semi.training.supervised_init import write_supervised_checkpoint
    root = str(tmp_path)
    good = make_trainer(ReciprocalLearningTrainer, root=root)          # writes the stand-in, then overwrite it
    write_supervised_checkpoint(good.teacher_checkpoint, good.network, good.plans_manager.plans, "3d_fullres")
    with pytest.raises(RuntimeError) as e:
        make_trainer(ReciprocalLearningTrainer, root=root)
    msg = str(e.value)
    assert good.teacher_checkpoint in msg and "configuration 3d_fullres" in msg
    assert "nnUNetv2_train Dataset999_Tiny 2d 0 -tr SupervisedBaselineTrainer" in msg
    assert "ReciprocalLearningTrainer_warmup" in msg
