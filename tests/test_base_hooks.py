"""The base trainer's hooks for multi-network methods: the default method step and the EMA module give the
numbers of the code before the hooks existed (Mean Teacher, CrossMatch: same seed, same losses and weights
for the first steps), EMA of several sources touches exactly the matched tensors, auxiliary-module specs are
checked, and the export hook picks the exported network."""
import copy

import pytest
import torch
from torch import nn

from helpers import ds_targets, goto_step, make_trainer, unlabeled
from nnunet_semi.ema import ema_decay_at
from nnunet_semi.methods.crossmatch import CrossMatchTrainer_released
from nnunet_semi.methods.mean_teacher import MeanTeacherTrainer
from nnunet_semi.training.auxiliary import AuxiliaryModule, ema_update_from, resolve


def legacy_ema_update(teacher, student, decay):
    """The EMA of plugin 0.1 (nnunet_semi.ema.ema_update before the auxiliary modules)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1.0 - decay)
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            tb.lerp_(sb, 1.0 - decay) if tb.dtype.is_floating_point else tb.copy_(sb)


def legacy_step(tr, data, target, us):
    """train_step of plugin 0.1 without its logging: zero_grad, compute_loss, backward, clip 12, step, EMA."""
    tr.optimizer.zero_grad(set_to_none=True)
    loss, _ = tr.compute_loss(data, target, us)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tr.network.parameters(), 12)
    tr.optimizer.step()
    if tr.teacher is not None:
        legacy_ema_update(tr.teacher, tr.network, ema_decay_at(tr.global_step, tr.ema_decay))
    return loss


def new_step(tr, data, target, us):
    loss, _ = tr.method_step(data, target, us)
    tr.after_optimizer_step()
    return loss


@pytest.mark.parametrize("method", ["mean_teacher", "crossmatch"])
def test_default_method_step_reproduces_the_code_before_the_hooks(method):
    g = torch.Generator().manual_seed(7)
    data = torch.randn(2, 1, 16, 16, generator=g)
    target = torch.randint(0, 3, (2, 1, 16, 16), generator=g)
    runs = []
    for use_new in (False, True):
        # two trainers built alike (same weights): nnU-Net's SGD, loss and, for Mean Teacher, the EMA teacher
        if method == "mean_teacher":
            tr = make_trainer(MeanTeacherTrainer, rampup_iters=2)
        else:
            tr = make_trainer(CrossMatchTrainer_released, tau=0.4)
        tr.unsup_gate_step = 0                               # the unsupervised term acts from step 0
        with torch.no_grad():
            tgt = ds_targets(tr.network(data), target)
        torch.manual_seed(11)
        us = [unlabeled(2, (16, 16), views=2) for _ in range(2)]
        losses = []
        for step in range(3):
            goto_step(tr, step)
            losses.append((new_step if use_new else legacy_step)(tr, data, tgt, us).item())
        teacher = tr.teacher.state_dict() if tr.teacher is not None else {}
        runs.append((losses, tr.network.state_dict(), teacher))
    (l0, s0, t0), (l1, s1, t1) = runs
    assert l0 == l1 and l0[0] != l0[2]                          # bit-identical losses, and training moved
    assert all(torch.equal(v, s1[k]) for k, v in s0.items())
    assert all(torch.equal(v, t1[k]) for k, v in t0.items())


def test_ema_of_several_sources_touches_exactly_the_matched_tensors():
    class Dec(nn.Module):
        def __init__(self, extra: bool, out: int = 3):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)
            self.head = nn.Conv2d(4, out, 1)
            self.register_buffer("count", torch.zeros((), dtype=torch.long))
            if extra:
                self.temb = nn.Linear(8, 4)          # only in the sources (like A&D's timestep embedding)

    torch.manual_seed(0)
    target, a, b = Dec(False, out=5), Dec(True), Dec(True)
    a.count.fill_(3)
    before = copy.deepcopy(target.state_dict())
    names = ema_update_from(target, [a, b], 0.9)
    assert sorted(names) == ["conv.bias", "conv.weight", "count"]   # head differs in shape, temb is not in target
    for k in ("conv.weight", "conv.bias"):
        mean = (a.state_dict()[k] + b.state_dict()[k]) / 2
        torch.testing.assert_close(target.state_dict()[k], 0.9 * before[k] + 0.1 * mean)
    assert torch.equal(target.head.weight, before["head.weight"]) and target.count.item() == 3


def test_auxiliary_module_specs_and_resolution():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="either trained by its optimizer or an EMA"):
        AuxiliaryModule(m, trainable=True, ema_sources=("network",))
    with pytest.raises(ValueError, match="not trainable"):
        AuxiliaryModule(m, optimizer=torch.optim.SGD(m.parameters(), 0.1))
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    aux = {"t": AuxiliaryModule(m)}
    assert resolve("network.1", net, aux) is net[1] and resolve("t", net, aux) is m
    with pytest.raises(KeyError, match="unknown module 'x'"):
        resolve("x", net, aux)


def test_export_hook_picks_and_restores_the_exported_network():
    tr = make_trainer(MeanTeacherTrainer)
    net = tr.network
    tr.export_network = "student"
    assert tr.export_module() is net
    tr.export_network = "teacher"
    teacher = tr.aux["teacher"].module
    teacher.decoder.deep_supervision = False
    teacher.eval()
    assert tr.export_module() is teacher
    with tr.exported_network():
        assert tr.network is teacher and teacher.decoder.deep_supervision is True   # as the student's
    assert tr.network is net and teacher.decoder.deep_supervision is False and not teacher.training


def test_case_metadata_by_the_keys_nnunet_uses(tmp_path, monkeypatch):
    import numpy as np
    from nnunet_semi.layout import CaseMetadata, find_case_metadata
    md = CaseMetadata()
    md.set("ct_1001", domain="CT", origin_dataset="MMWHS")
    tr = make_trainer(MeanTeacherTrainer)
    tr.case_metadata = md
    # nnU-Net's loaders hand out numpy strings; a case without metadata gives {}
    assert tr.metadata_of(np.array(["ct_1001", "mr_1"])) == [{"domain": "CT", "origin_dataset": "MMWHS"}, {}]
    # initialize() looks the file up next to the preprocessed data when nnUNet_raw has no such dataset
    pre = tmp_path / "Dataset030_MMWHS"
    pre.mkdir()
    (pre / "case_metadata.json").write_text('{"format": 1, "cases": {"ct_1001": {"domain": "CT"}}}')
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "no_raw"))
    assert find_case_metadata(str(pre)).domain_of("ct_1001") == "CT"


def test_an_ema_rule_can_target_part_of_the_trained_network():
    """A&D's decoupling: the exported network's decoder is trained by SGD and also moved towards the mean of
    two auxiliary decoders after each iteration (matched by parameter name); nnU-Net's decoder holds a reference
    to the encoder, which the rule excludes."""
    tr = make_trainer(MeanTeacherTrainer)
    net = tr.network
    torch.manual_seed(3)
    d_xi, d_psi = (copy.deepcopy(net.decoder) for _ in range(2))
    for d in (d_xi, d_psi):
        for p in d.parameters():
            p.data.add_(torch.randn_like(p))
    tr.aux = {"d_xi": AuxiliaryModule(d_xi, trainable=True), "d_psi": AuxiliaryModule(d_psi, trainable=True)}
    tr.ema_rules = lambda: [("network.decoder", ("d_xi", "d_psi"), 0.9, False, ("encoder.",))]
    before = copy.deepcopy(net.state_dict())
    tr.update_ema_modules()
    name = "stages.0.convs.0.conv.weight"
    expected = 0.9 * before["decoder." + name] + 0.1 * (d_xi.state_dict()[name] + d_psi.state_dict()[name]) / 2
    torch.testing.assert_close(net.decoder.state_dict()[name], expected)
    # the encoder (reached through the decoder's reference too) is untouched
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items() if "encoder." in k)
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("decoder.") and not k.startswith("decoder.encoder.") for k in changed)
