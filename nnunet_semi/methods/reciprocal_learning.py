"""Reciprocal Learning (code ``XYZach/RLSSS``): a teacher that learns from the student's feedback.

Two networks of the plans' architecture: the student S (``self.network``, nnU-Net's optimizer and
schedule, exported by default as the released code tests the student) and a trainable teacher T (the
auxiliary module ``'teacher'`` with its own optimizer and schedule). Each iteration, on the labeled batch
x_l and one unlabeled batch x_u (the same augmented view for both networks, as released):

1. T predicts [x_l; x_u] (with gradient); its hard argmax on x_u is the pseudo-label y_hat (no gradient).
2. Student step on the pseudo-labels: L(S(x_u), y_hat); its gradient g_u is kept (unscaled, fp32) and S
   takes an optimizer step.
3. Feedback: the updated student's labeled loss L(S'(x_l), y) gives g_l. S takes **no** step with it (the
   student never trains on labels); its gradients are cleared.
4. h = eta_S <g_u, g_l> (eta_S the student's current learning rate; a first-order Meta Pseudo Labels
   approximation; 0 if the product is not finite).
5. Teacher step on h * L(T(x_u), y_hat) + L(T(x_l), y).

``loss``: ``'ce'`` is the released recipe (cross-entropy on the full-resolution output only; the other
deep-supervision outputs enter with weight 0 so DDP sees every parameter used); ``'nnunet'`` uses nnU-Net's
DC+CE with deep supervision for every term (pseudo-labels downsampled to each output by nearest
neighbour). The default is ``'nnunet'``: it is the loss the supervised nnU-Net arm trains with; see
benchmarks/RESULTS.md for what was measured.

Teacher initialisation: the released code starts from a supervised model of the same labeled cases, and so does
the default (``teacher_init = 'supervised_run'``): the ``checkpoint_final.pth`` of the supervised run of the same
dataset, plans, configuration and fold that nnUNet_results already holds (SupervisedBaselineTrainer's, else
nnUNetTrainer's: the run a user of nnU-Net has), refused with the paths looked at and the command that trains it
when there is none. ``nnUNet_semi_teacher_checkpoint=<checkpoint_final.pth>`` names another one (of any nnU-Net
trainer of the same dataset, plans and configuration; a checkpoint of other plans, configuration or architecture is
refused with a message naming it). ``ReciprocalLearningTrainer_warmup`` (``teacher_init = 'warmup'``) needs no other
run: a supervised warm-up inside the same run, while the base trainer's warm-up gate is closed (``warmup_iters`` =
400, at most ``warmup_max_fraction`` = 20% of a shorter run; ``nnUNet_semi_warmup_iters`` sets it per run, as for
every method), trains the teacher alone on the labeled batch; the student starts when the gate opens. The gate
cannot wait for nnU-Net's pseudo Dice there (that Dice is the student's, which does not train before the gate
opens), so ``warmup_pseudo_dice`` is refused. Why the default: on Hippocampus 2d (8 labeled, 4000 iterations, 3
seeds) the teacher from the supervised run beats supervised nnU-Net by +1.61 Dice on the test cases, the in-run
warm-up is level with it (benchmarks/RESULTS.md). ``--c`` restores both networks and both optimizers from the
checkpoint (the teacher is never re-initialised); the LR schedules are functions of the epoch, rebuilt as nnU-Net's.

Optimisers: ``optimizer = 'nnunet'`` (default) gives both networks nnU-Net's SGD (momentum 0.99, Nesterov,
poly schedule from ``initial_lr``); ``'released'`` the LA code's SGD (momentum 0.9, weight decay 1e-4, lr
0.01 x 0.1 every 2500 iterations) for both.

Per iteration: teacher forward/backward on B_l + B_u samples, student forward/backward on B_u and on B_l.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


from nnunet_semi.losses import deep_supervision_targets, pseudo_label
from nnunet_semi.networks.feature_perturbation import full_resolution, split_batch
from nnunet_semi.training.auxiliary import AuxiliaryModule
from nnunet_semi.training.base import SemiSupervisedTrainer

TEACHER_CHECKPOINT_VAR = "nnUNet_semi_teacher_checkpoint"


class IterationStepLR:
    """lr = base_lr x gamma^floor(iteration / step_iters) with iteration = epoch x iterations per epoch;
    stepped with the epoch like nnU-Net's PolyLRScheduler (the released code's step decay)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, iters_per_epoch: int,
                 step_iters: int = 2500, gamma: float = 0.1):
        self.optimizer, self.base_lr, self.iters_per_epoch = optimizer, base_lr, iters_per_epoch
        self.step_iters, self.gamma = step_iters, gamma
        self.step(0)

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** ((epoch * self.iters_per_epoch) // self.step_iters)

    def step(self, epoch: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(epoch)



def flat_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """<a, b> over all tensors, in float32."""
    return sum((x.float() * y.float()).sum() for x, y in zip(a, b))


class ReciprocalLearningTrainer(SemiSupervisedTrainer):
    benchmark_default = True
    num_strong_views = 0            # student and teacher see the same augmented unlabeled batch (released)
    unlabeled_batches_per_step = 1
    #: 'nnunet' (DC+CE with deep supervision for every term) or 'ce' (released: full-resolution CE only)
    loss_recipe: str = "nnunet"
    #: 'nnunet' (SGD 0.99 Nesterov, poly) or 'released' (SGD 0.9, wd 1e-4, lr 0.01 x 0.1 every 2500 iterations)
    optimizer_recipe: str = "nnunet"
    released_lr: float = 0.01
    released_weight_decay: float = 1e-4
    released_step_iters: int = 2500
    #: iterations in which only the teacher trains (supervised) when no teacher checkpoint is given: the base
    #: warm-up gate, a fixed number as for the other methods, so a longer run gives the student more iterations
    #: rather than a later start ...
    warmup_iters = 400
    #: ... but at most this fraction of the run (demos and smoke tests of a few iterations; None: no cap)
    warmup_max_fraction = 0.2
    #: gradient clipping of the teacher's steps (nnU-Net's 12; None: none, as released)
    teacher_grad_clip: Optional[float] = 12.0
    #: 'student' (released) or 'teacher'
    export_network: str = "student"
    #: where the teacher starts without nnUNet_semi_teacher_checkpoint: 'supervised_run' (the supervised run of this
    #: dataset / plans / configuration / fold in nnUNet_results, the base's ``supervised_run_path``; as released) or
    #: 'warmup' (trained alone for warmup_iters in this run)
    teacher_init: str = "supervised_run"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: True when the teacher was loaded from a supervised checkpoint (no in-run warm-up then) ...
        self.teacher_pretrained = False
        #: ... this one (nnUNet_semi_teacher_checkpoint, or the supervised run found in nnUNet_results)
        self.teacher_checkpoint: Optional[str] = None

    def initialize(self):
        if self.loss_recipe not in ("nnunet", "ce"):
            raise ValueError(f"{type(self).__name__}.loss_recipe must be 'nnunet' or 'ce'")
        if self.optimizer_recipe not in ("nnunet", "released"):
            raise ValueError(f"{type(self).__name__}.optimizer_recipe must be 'nnunet' or 'released'")
        if self.teacher_init not in ("warmup", "supervised_run"):
            raise ValueError(f"{type(self).__name__}.teacher_init must be 'warmup' or 'supervised_run'")
        if self.warmup_pseudo_dice is not None:
            raise ValueError(
                f"{type(self).__name__}: the teacher-only warm-up cannot wait for a pseudo Dice of "
                f"{self.warmup_pseudo_dice} (nnU-Net's pseudo Dice is the student's, which does not train before the "
                f"gate opens). Set nnUNet_semi_warmup_pseudo_dice=none, or give its length in iterations with "
                f"nnUNet_semi_warmup_iters.")
        super().initialize()
        self.print_to_log_file(
            f"Reciprocal Learning: loss {self.loss_recipe}, optimizers {self.optimizer_recipe}, teacher "
            + (f"from {self.teacher_checkpoint}" if self.teacher_pretrained else
               "restored from this run's checkpoint (its supervised run is gone)" if self._supervised_run_missing else
               f"trained alone for the first {self.warmup_length()} iterations"))

    # ---- optimisers -----------------------------------------------------------------------------
    def make_optimizer(self, module: nn.Module):
        if self.optimizer_recipe == "released":
            opt = torch.optim.SGD(module.parameters(), self.released_lr, momentum=0.9,
                                  weight_decay=self.released_weight_decay)
            return opt, IterationStepLR(opt, self.released_lr, self.num_iterations_per_epoch,
                                        self.released_step_iters)
        return self.nnunet_optimizer(module.parameters())

    def configure_optimizers(self):
        return self.make_optimizer(self.network)

    def build_auxiliary_modules(self) -> Dict[str, AuxiliaryModule]:
        teacher = self.build_plain_network()
        path = self.find_teacher_checkpoint()
        if path:
            self.load_supervised_run(teacher, path, teacher_checkpoint_fix(
                self.plans_manager.dataset_name, self.configuration_name, self.plans_manager.plans_name, self.fold),
                TEACHER_CHECKPOINT_VAR if os.environ.get(TEACHER_CHECKPOINT_VAR, "").strip() else "")
            self.teacher_pretrained, self.teacher_checkpoint = True, path
        opt, sched = self.make_optimizer(teacher)
        return {"teacher": AuxiliaryModule(teacher, trainable=True, optimizer=opt, lr_scheduler=sched,
                                           grad_clip=self.teacher_grad_clip)}

    @classmethod
    def needs_supervised_run(cls) -> bool:
        return super().needs_supervised_run() or cls.teacher_init == "supervised_run"

    def find_teacher_checkpoint(self) -> Optional[str]:
        """nnUNet_semi_teacher_checkpoint if set; else, with ``teacher_init = 'supervised_run'``, the supervised run's
        checkpoint in nnUNet_results (refused with the paths looked at when there is none); else None (warm-up)."""
        path = os.environ.get(TEACHER_CHECKPOINT_VAR, "").strip()
        if path or self.teacher_init == "warmup":
            return path or None
        return self.supervised_run_path(
            f"or give {TEACHER_CHECKPOINT_VAR}=<its checkpoint_final.pth>, or use ReciprocalLearningTrainer_warmup "
            f"(the teacher is warmed up inside the run)")

    def warmup_length(self) -> int:
        """Iterations of the teacher's supervised warm-up: 0 from a teacher checkpoint, else the base gate's
        min(warmup_iters, warmup_max_fraction x all iterations)."""
        return 0 if self.teacher_pretrained else super().warmup_length()

    # ---- losses ---------------------------------------------------------------------------------
    def sup_loss(self, out, target) -> torch.Tensor:
        """A labeled loss: nnU-Net's (DC+CE, deep supervision), or CE on the full-resolution output."""
        if self.loss_recipe == "nnunet":
            return self.loss(out, target)
        full_target = target[0] if isinstance(target, (list, tuple)) else target
        return self._ce_full(out, full_target[:, 0].long())

    def pl_loss(self, out, label: torch.Tensor) -> torch.Tensor:
        """A pseudo-label loss of the same recipe (hard label, no gradient through it)."""
        if self.loss_recipe == "nnunet":
            outs = out if isinstance(out, (list, tuple)) else [out]
            targets = deep_supervision_targets(outs, label)
            return self.loss(out, targets if isinstance(out, (list, tuple)) else targets[0])
        return self._ce_full(out, label)

    @staticmethod
    def _ce_full(out, label: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(full_resolution(out).float(), label.long())
        if isinstance(out, (list, tuple)):  # weight 0 on the other outputs: DDP sees every parameter used
            ce = ce + 0.0 * sum(o.float().sum() for o in out[1:])
        return ce

    # ---- the step -------------------------------------------------------------------------------
    def _unscaled_grads(self, params: Sequence[nn.Parameter]) -> List[torch.Tensor]:
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        return [p.grad.detach().float() / scale if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                for p in params]

    def method_step(self, data, target, unlabeled):
        teacher = self.aux["teacher"]
        opt_s, opt_t = self.optimizer, teacher.optimizer
        bl = data.shape[0]
        opt_t.zero_grad(set_to_none=True)
        if self.global_step < self.warmup_length():   # the gate is closed: the teacher's supervised warm-up alone
            with self.autocast():
                loss_t = self.sup_loss(teacher.wrapped(data), target)
            self.backward(loss_t)
            self.step_optimizer(opt_t, teacher.module.parameters(), teacher.grad_clip, name="teacher")
            self.update_grad_scaler()
            return loss_t, {"loss_teacher_sup": loss_t.detach()}

        x_u = unlabeled[0].weak
        with self.autocast():
            t_out = teacher.wrapped(torch.cat((data, x_u)))
        t_l, t_u = split_batch(t_out, bl)
        y_hat, conf = pseudo_label(full_resolution(t_u))

        # 2. the student's step on the teacher's pseudo-labels; g_u kept (unscaled, fp32)
        params_s = [p for p in self.network.parameters() if p.requires_grad]
        opt_s.zero_grad(set_to_none=True)
        with self.autocast():
            loss_su = self.pl_loss(self.network(x_u), y_hat)
        self.backward(loss_su)
        g_u = self._unscaled_grads(params_s)
        self.step_optimizer(opt_s, params_s, name="network")
        lr_s = opt_s.param_groups[0]["lr"]

        # 3. feedback of the updated student on the labeled batch: gradient only, no step
        opt_s.zero_grad(set_to_none=True)
        with self.autocast():
            loss_sl = self.sup_loss(self.network(data), target)
        self.backward(loss_sl)
        # 4. h = eta_S <g_u, g_l>, read from the (scaled) gradients in place: no copy of g_l
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        h = lr_s * flat_dot(*zip(*[(gu, p.grad) for gu, p in zip(g_u, params_s) if p.grad is not None])) / scale
        opt_s.zero_grad(set_to_none=True)
        h = torch.where(torch.isfinite(h), h, torch.zeros_like(h)).detach()

        # 5. the teacher's step
        with self.autocast():
            loss_tu = self.pl_loss(t_u, y_hat)
            loss_tl = self.sup_loss(t_l, target)
            loss_t = h * loss_tu + loss_tl
        self.backward(loss_t)
        self.step_optimizer(opt_t, teacher.module.parameters(), teacher.grad_clip, name="teacher")
        self.update_grad_scaler()
        return loss_sl.detach(), {"loss_student_pl": loss_su.detach(), "loss_student_feedback": loss_sl.detach(),
                                  "loss_teacher_pl": loss_tu.detach(), "loss_teacher_sup": loss_tl.detach(),
                                  "feedback_h": h, "pl_confidence": conf.mean().detach()}

    # ---- checkpoint -----------------------------------------------------------------------------
    def semi_state_dict(self) -> dict:
        return {**super().semi_state_dict(), "teacher_pretrained": self.teacher_pretrained,
                "teacher_checkpoint": self.teacher_checkpoint}

    def load_semi_state_dict(self, state: dict) -> None:
        super().load_semi_state_dict(state)
        self.teacher_pretrained = bool(state.get("teacher_pretrained", self.teacher_pretrained))
        self.teacher_checkpoint = state.get("teacher_checkpoint", self.teacher_checkpoint)


def teacher_checkpoint_fix(dataset_name: str, configuration: str, plans_name: str, fold="all") -> str:
    """What to do about a refused teacher checkpoint: the command that trains the right one for ``fold`` (the run's),
    the lookup of the default, the warm-up variant."""
    return (f"train the teacher with: nnUNetv2_train {dataset_name} {configuration} {fold} -tr SupervisedBaselineTrainer "
            f"-p {plans_name}, or unset {TEACHER_CHECKPOINT_VAR} (the supervised run of this fold in nnUNet_results), or "
            f"use ReciprocalLearningTrainer_warmup (the teacher is warmed up inside the run)")


class ReciprocalLearningTrainer_released(ReciprocalLearningTrainer):
    """The released LA recipe: CE only, SGD 0.9 with step decay for both networks, no gradient clipping of
    the teacher (the student keeps nnU-Net's clipping at 12); the teacher from the supervised run, as released."""
    loss_recipe = "ce"
    optimizer_recipe = "released"
    teacher_grad_clip = None


class ReciprocalLearningTrainer_warmup(ReciprocalLearningTrainer):
    """Needs no supervised run: the teacher trains alone for the first ``warmup_iters`` iterations of this run,
    then the reciprocal phase starts (level with supervised nnU-Net where measured; benchmarks/RESULTS.md)."""
    teacher_init = "warmup"


class ReciprocalLearningTrainer_fromSupervised(ReciprocalLearningTrainer):
    """The default under the name its benchmark runs were trained and recorded with (before it became the
    default): the teacher from the supervised run in nnUNet_results. Kept so those runs' folders
    (``ReciprocalLearningTrainer_fromSupervised__<plans>__<configuration>``) still predict and resume."""
    teacher_init = "supervised_run"


class ReciprocalLearningTrainer_exportTeacher(ReciprocalLearningTrainer):
    export_network = "teacher"
