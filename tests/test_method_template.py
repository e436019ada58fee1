"""The unit tests every method runs (a new method adds its trainer classes to METHODS), on real trainers of the
tiny plans (helpers.make_trainer) with the warm-up gate open:

- one nnU-Net training step (``train_step``; the unlabeled loader replaced by random batches of the method's
  views) gives a finite loss and finite logged terms and changes the network and every trainable or EMA
  auxiliary module;
- during that step every trainable parameter of the network and of every trainable auxiliary module receives
  a finite gradient, except nnU-Net's lowest deep-supervision head, whose loss weight is 0 outside DDP;
- the auxiliary modules' weights and optimizer states, the student (when another network is exported) and the
  warm-up gate round-trip through ``semi_state_dict`` / ``load_semi_state_dict`` (and torch.save) into a fresh
  trainer initialised differently."""
import numpy as np
import pytest
import torch

from helpers import PATCH, ds_targets, goto_step, is_lowest_ds_head, make_trainer
from nnunet_semi.ema import unwrap
from nnunet_semi.methods.crossmatch import CrossMatchTrainer, CrossMatchTrainer_released
from nnunet_semi.methods.mean_teacher import MeanTeacherTrainer, MeanTeacherTrainer_released
from nnunet_semi.methods.reciprocal_learning import ReciprocalLearningTrainer, ReciprocalLearningTrainer_released
from nnunet_semi.methods.aggregating_decoupling import (AggregatingDecouplingTrainer,
                                                        AggregatingDecouplingTrainer_released,
                                                        AggregatingDecouplingTrainer_thetaUnlabeled)

#: every method's default and released recipe
METHODS = [MeanTeacherTrainer, MeanTeacherTrainer_released, CrossMatchTrainer, CrossMatchTrainer_released,
           ReciprocalLearningTrainer, ReciprocalLearningTrainer_released, AggregatingDecouplingTrainer,
           AggregatingDecouplingTrainer_released, AggregatingDecouplingTrainer_thetaUnlabeled]
#: the unsupervised terms act from the step the test takes (the base's warm-up gate opens there)
OPEN_GATE = {"warmup_iters": 0, "warmup_pseudo_dice": None}
BATCH = 2


def trainer(cls, ndim: int = 2, seed: int = 0):
    """A trainer of ``cls`` at the last iterations of its run, past any warm-up phase of the method, with random
    unlabeled batches (a little padding on one side) in place of its loader."""
    tr = make_trainer(cls, ndim=ndim, seed=seed, **OPEN_GATE)
    goto_step(tr, tr.total_steps - 2)
    g = torch.Generator().manual_seed(seed)
    shape = (PATCH,) * ndim

    def unlabeled_batch():
        views = torch.randn((BATCH, tr.num_input_channels * (1 + tr.num_strong_views)) + shape, generator=g)
        valid = torch.ones((BATCH, 1) + shape)
        valid[:, :, :2] = 0
        return {"data": views, "target": valid, "keys": [f"u{i}" for i in range(BATCH)]}

    tr.dataloader_unlabeled = iter(unlabeled_batch, None)
    torch.manual_seed(seed)                          # the method's own draws (CutMix boxes, dropout masks)
    return tr


def labeled_batch(tr, ndim: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    data = torch.randn((BATCH, tr.num_input_channels) + (PATCH,) * ndim, generator=g)
    target = torch.randint(0, tr.label_manager.num_segmentation_heads, (BATCH, 1) + (PATCH,) * ndim, generator=g)
    with torch.no_grad():
        target = ds_targets(tr.network(data), target) if tr.enable_deep_supervision else target
    return {"data": data, "target": target, "keys": [f"l{i}" for i in range(BATCH)]}


def trained_modules(tr) -> dict:
    """The network and every auxiliary module that trains, by name."""
    out = {"network": unwrap(tr.network)}
    out.update({name: a.module for name, a in tr.aux.items() if a.trainable})
    return out


def state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_training_step_is_finite_and_reaches_every_parameter(cls, ndim):
    tr = trainer(cls, ndim)
    batch = labeled_batch(tr, ndim)
    assert tr.loss.weight_factors[-1] == 0           # nnU-Net's loss outside DDP: the lowest head is unused
    grads, handles = {}, []
    for mod_name, module in trained_modules(tr).items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                hook = lambda p, key=f"{mod_name}.{name}": grads.setdefault(key, []).append(
                    bool(torch.isfinite(p.grad).all()))
                handles.append(p.register_post_accumulate_grad_hook(hook))
    moved = {"network": unwrap(tr.network), **{n: a.module for n, a in tr.aux.items() if a.trainable or a.ema_sources}}
    before = {name: state(m) for name, m in moved.items()}
    out = tr.train_step(batch)
    for hd in handles:
        hd.remove()

    assert np.isfinite(out["loss"]).all()
    assert all(np.isfinite(v) for v in out.values()), out
    assert out["unsup_weight_factor"] > 0 and tr.unsup_gate_step is not None
    expected = {f"{mod_name}.{name}" for mod_name, module in trained_modules(tr).items()
                for name, p in module.named_parameters() if p.requires_grad and not is_lowest_ds_head(name)}
    assert expected and not expected - set(grads), f"no gradient: {sorted(expected - set(grads))}"
    assert all(all(ok) for ok in grads.values()), f"non-finite gradient: {[k for k, v in grads.items() if not all(v)]}"
    for name, m in moved.items():
        after = m.state_dict()
        assert any(not torch.equal(v, after[k]) for k, v in before[name].items()), f"{name} did not change"


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_a_warmup_step_draws_no_unlabeled_batch_and_trains(cls):
    """With the warm-up gate closed the base draws no unlabeled batch (the loader would fail) and the method's
    step trains on the labeled batch alone, with finite terms (Reciprocal Learning without a teacher checkpoint:
    its teacher; every other method: the network)."""
    tr = make_trainer(cls, warmup_iters=250, warmup_pseudo_dice=None)
    goto_step(tr, 10)
    tr.dataloader_unlabeled = iter(lambda: pytest.fail("an unlabeled batch was drawn in the warm-up"), None)
    if hasattr(tr, "teacher_pretrained"):
        tr.teacher_pretrained = False                # the in-run warm-up: only the teacher trains
    name, module = ("teacher", tr.aux["teacher"].module) if hasattr(tr, "teacher_pretrained") else \
        ("network", unwrap(tr.network))
    before = state(module)
    out = tr.train_step(labeled_batch(tr, 2))
    assert tr.unsup_gate_step is None and out["unsup_weight_factor"] == 0.0
    assert all(np.isfinite(v) for v in out.values()), out
    assert any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items()), f"{name} did not change"


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_auxiliary_state_round_trips_into_a_fresh_trainer(cls, tmp_path):
    tr = trainer(cls)
    for seed in (0, 1):                              # two steps: momentum buffers, EMA weights moved
        tr.train_step(labeled_batch(tr, 2, seed))
    path = tmp_path / "semi_state.pth"
    torch.save(tr.semi_state_dict(), path)
    fresh = make_trainer(cls, seed=1, **OPEN_GATE)   # other initial weights: what matches below was loaded
    for name, a in tr.aux.items():
        assert any(not torch.equal(v, fresh.aux[name].module.state_dict()[k]) for k, v in a.module.state_dict().items())
    fresh.load_semi_state_dict(torch.load(path, weights_only=False))

    assert fresh.unsup_gate_step == tr.unsup_gate_step is not None
    assert sorted(fresh.aux) == sorted(tr.aux)
    for name, a in tr.aux.items():
        b = fresh.aux[name]
        assert all(torch.equal(v, b.module.state_dict()[k]) for k, v in a.module.state_dict().items()), name
        assert (a.optimizer is None) == (b.optimizer is None), name
        if a.optimizer is not None:
            sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
            assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys(), name
            assert sa["state"], f"{name}: the optimizer of a module that trained has state"
            for i, per_param in sa["state"].items():
                for k, v in per_param.items():
                    assert torch.equal(v, sb["state"][i][k]) if torch.is_tensor(v) else v == sb["state"][i][k]
    if tr.export_module() is not unwrap(tr.network):  # the student travels beside the exported network
        assert all(torch.equal(v, fresh.network.state_dict()[k]) for k, v in tr.network.state_dict().items())
