"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), as used for segmentation by UA-MT/SSL4MIS.

The teacher is an exponential moving average of the student (decay ``ema_decay``, with Mean
Teacher's warm-up min(1 - 1/(t+1), decay)). Each step the teacher predicts the weak view of the
unlabeled batch and the student is trained to match it on a strong, pixel-aligned view of the same
patch, with the consistency weight ramped up by exp(-5(1 - t/T)^2). Defaults follow SSL4MIS'
Mean Teacher: softmax-MSE consistency, weight 0.1, ramp-up over the whole training, no confidence
mask. The unsupervised loss acts on the full-resolution output only; the labeled loss is nnU-Net's
(deep supervision included). The student is exported by default (SSL4MIS and UA-MT test the
student); ``MeanTeacherTrainer_exportTeacher`` exports and validates the teacher.
"""
from typing import Optional

import torch

from nnunet_semi.losses import consistency_loss
from nnunet_semi.training.base import SemiSupervisedTrainer


class MeanTeacherTrainer(SemiSupervisedTrainer):
    use_ema_teacher = True
    ema_decay: float = 0.99
    #: 'mse' (softmax MSE), 'ce' or 'dice_ce' on the teacher's hard pseudo-label
    consistency: str = "mse"
    unsup_weight: float = 0.1
    rampup: str = "sigmoid"
    rampup_fraction: float = 1.0
    #: keep only voxels whose teacher confidence is >= this (None = all voxels)
    conf_thresh: Optional[float] = None

    def compute_loss(self, data, target, unlabeled):
        u = unlabeled[0]
        with torch.no_grad():
            teacher_logits = self.teacher(u.weak).float()
        out_l, (out_u,) = self.joint_forward(data, u.strong[0])
        loss_sup = self.loss(out_l, target)
        loss_u, stats = consistency_loss(self.consistency, out_u, teacher_logits, self.conf_thresh)
        total = loss_sup + self.unsup_weight_now() * loss_u
        return total, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_u.detach(), **stats}


class MeanTeacherTrainer_exportTeacher(MeanTeacherTrainer):
    export_network = "teacher"


class MeanTeacherTrainer_confCE(MeanTeacherTrainer):
    """FixMatch-style variant: CE on teacher pseudo-labels with confidence >= 0.9, weight 1."""
    consistency = "ce"
    conf_thresh = 0.9
    unsup_weight = 1.0
