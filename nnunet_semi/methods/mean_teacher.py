"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as used for segmentation by UA-MT/SSL4MIS.

The teacher is an exponential moving average of the student (decay ``ema_decay``, with Mean
Teacher's warm-up min(1 - 1/(t+1), decay)). Each step the teacher predicts the weak view of the
unlabeled batch and the student is trained to match it on a strong, pixel-aligned view of the same
patch. The unsupervised loss acts on the full-resolution output only; the labeled loss is nnU-Net's
(deep supervision included). The student is exported by default (SSL4MIS and UA-MT test the
student); ``MeanTeacherTrainer_exportTeacher`` exports and validates the teacher.

Default recipe (for nnU-Net; measured against the released one in benchmarks/RESULTS.md): nnU-Net's own
loss form on the teacher's hard pseudo-label, CE + foreground Dice over the classes present in the
pseudo-label, on the voxels with teacher confidence >= 0.9 inside the image (nnU-Net's padding left out),
weight 1, after a supervised warm-up (at least 250 iterations and nnU-Net's EMA pseudo Dice >= 0.5), then
a sigmoid ramp over 500 iterations.

``MeanTeacherTrainer_released`` is SSL4MIS' Mean Teacher: softmax-MSE consistency on every voxel, weight
0.1, sigmoid ramp-up over the whole training, no warm-up, no confidence mask. Against nnU-Net's loss that
term is below 0.001 of the total, so the recipe trains much like the supervised trainer.
"""
from typing import Optional

import torch

from nnunet_semi.losses import consistency_loss
from nnunet_semi.perturbations import mix_within_batch
from nnunet_semi.training.base import SemiSupervisedTrainer


class MeanTeacherTrainer(SemiSupervisedTrainer):
    benchmark_default = True
    use_ema_teacher = True
    ema_decay: float = 0.99
    #: the teacher's decay until the unsupervised weight has fully ramped up (warm-up gate and ramp), ema_decay
    #: after (None: ema_decay throughout); the original Mean Teacher uses 0.99 during its ramp-up, 0.999 after
    ema_decay_rampup: Optional[float] = None
    #: 'mse' (softmax MSE), 'ce' or 'dice_ce' on the teacher's hard pseudo-label
    consistency: str = "dice_ce"
    #: weights of the two parts of 'dice_ce' (1 and 1: nnU-Net's DC_and_CE_loss)
    consistency_dice_weight: float = 1.0
    consistency_ce_weight: float = 1.0
    #: Dice of 'dice_ce' with the background class (nnU-Net's loss: without)
    dice_include_background: bool = False
    #: Dice of 'dice_ce' averaged over the classes present in the kept pseudo-label only
    dice_skip_absent_classes: bool = True
    unsup_weight: float = 1.0
    rampup: str = "sigmoid"
    rampup_iters: Optional[int] = 500
    warmup_iters: int = 250
    warmup_pseudo_dice: Optional[float] = 0.5
    #: keep only voxels whose teacher confidence is >= this (None = all voxels)
    conf_thresh: Optional[float] = 0.9
    #: leave voxels outside the image (nnU-Net's padding) out of the loss and the logged statistics
    mask_padding: bool = True

    def ema_rules(self):
        rules = super().ema_rules()
        if self.ema_decay_rampup is None or self.rampup_factor() >= 1.0:
            return rules
        return [(t, src, self.ema_decay_rampup if t == "teacher" else d, w, ex) for t, src, d, w, ex in rules]

    def compute_loss(self, data, target, unlabeled):
        u = unlabeled[0]
        with torch.no_grad():
            teacher_logits = self.teacher(u.weak).float()
        strong, valid = u.strong[0], u.valid
        if self.cutmix_p > 0:   # CutMix within the batch: no extra pass, the teacher's logits are mixed alike
            strong, teacher_logits, valid = mix_within_batch(
                self.cutmix_boxes(strong.shape[0], strong.shape[2:]).to(strong.device, non_blocking=True), strong,
                teacher_logits, valid)
        out_l, (out_u,) = self.joint_forward(data, strong)
        loss_sup = self.loss(out_l, target)
        loss_u, stats = consistency_loss(self.consistency, out_u, teacher_logits, self.conf_thresh,
                                         valid=valid if self.mask_padding else None,
                                         dice_include_background=self.dice_include_background,
                                         dice_skip_absent_classes=self.dice_skip_absent_classes,
                                         dice_weight=self.consistency_dice_weight,
                                         ce_weight=self.consistency_ce_weight)
        total = loss_sup + self.unsup_weight_now() * loss_u
        return total, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_u.detach(), **stats}


class MeanTeacherTrainer_released(MeanTeacherTrainer):
    """SSL4MIS' Mean Teacher: softmax MSE on every voxel (padding included), weight 0.1, sigmoid ramp-up
    over the whole run, no warm-up. (The default of this plugin up to version 0.1.)"""
    consistency = "mse"
    consistency_dice_weight = 0.5
    consistency_ce_weight = 0.5
    dice_include_background = True
    dice_skip_absent_classes = False
    unsup_weight = 0.1
    rampup_iters = None
    rampup_fraction = 1.0
    warmup_iters = 0
    warmup_pseudo_dice = None
    conf_thresh = None
    mask_padding = False


class MeanTeacherTrainer_weight2(MeanTeacherTrainer):
    """The default recipe with the unsupervised weight doubled (2 instead of 1), tried on the validation group
    since the default's gain grew with the share of the run under the unsupervised term; it scored below the
    default there (benchmarks/RESULTS.md), so the default keeps 1."""
    unsup_weight = 2.0


class MeanTeacherTrainer_fromSupervised(MeanTeacherTrainer):
    """The default recipe with the student (and so its EMA teacher) started from the supervised nnU-Net run of the
    same dataset, plans, configuration and fold in nnUNet_results, as Reciprocal Learning's teacher is in
    ``ReciprocalLearningTrainer`` (its default); benchmarks/RESULTS.md gives what it measured."""
    network_init = "supervised_run"


class MeanTeacherTrainer_ema999(MeanTeacherTrainer):
    """The default recipe with the original Mean Teacher's decay schedule: 0.99 until the unsupervised weight has
    ramped up, then 0.999 (the teacher averages about 1000 steps instead of 100). Tried on the validation group at
    4000 iterations: with 0.99 throughout the teacher scores no better than its student (benchmarks/RESULTS.md,
    `@teacher`), so its pseudo-labels add little the student does not already predict."""
    ema_decay = 0.999
    ema_decay_rampup = 0.99


class MeanTeacherTrainer_cutmix(MeanTeacherTrainer):
    """The default recipe with CutMix on the student's strong view (Mean Teacher with CutMix, French et al. 2020):
    each unlabeled sample gets, with probability 0.5, a box of the next sample of the batch pasted in, and the
    teacher's prediction of the weak views is mixed with the same boxes. No extra forward pass; a batch of one
    sample (per DDP rank) is not mixed."""
    cutmix_p = 0.5


class MeanTeacherTrainer_svda(MeanTeacherTrainer):
    """The default recipe with A&D's SVDA in place of nnU-Net's augmentation: the whole SVDA on the labeled batch,
    and as the student's strong view SVDA's intensity operations (3 of blur, brightness, contrast, gamma, p 0.7),
    which keep it pixel-aligned with the teacher's weak view. Its control is ``SupervisedBaselineTrainer_svda``:
    the same augmentation without the unlabeled images (benchmarks/RESULTS.md)."""
    augmentation = "svda"


class MeanTeacherTrainer_exportTeacher(MeanTeacherTrainer):
    export_network = "teacher"


class MeanTeacherTrainer_confCE(MeanTeacherTrainer_released):
    """FixMatch-style variant of the released recipe: CE on teacher pseudo-labels with confidence >= 0.9,
    weight 1."""
    consistency = "ce"
    conf_thresh = 0.9
    unsup_weight = 1.0
