"""Unsupervised loss primitives shared by the semi-supervised trainers.

Conventions: ``logits`` are (B, C, *spatial) float tensors, hard targets are (B, *spatial) int64,
masks are (B, *spatial) bool/float with 1 = voxel counts. Pseudo-labels are produced under
``torch.no_grad`` and carry no gradient.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


@torch.no_grad()
def pseudo_label(logits: torch.Tensor, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-label (argmax) and its confidence (max softmax) of ``logits``; no gradient."""
    probs = torch.softmax(logits.detach().float() / temperature, dim=1)
    conf, label = probs.max(dim=1)
    return label, conf


def masked_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     include_background: bool = True, smooth: float = 1e-5,
                     squared_denominator: bool = False, batch_dice: bool = True,
                     skip_absent_classes: bool = False) -> torch.Tensor:
    """Soft Dice loss against a hard target, with voxels where ``mask`` is 0 *excluded* from the
    intersection and both denominator sums (nothing is re-weighted).

    ``squared_denominator`` uses sum(p^2) + sum(y^2) as in the V-Net/UA-MT/SSL4MIS Dice that the
    CrossMatch code uses; otherwise sum(p) + sum(y). Returns 1 - mean Dice over classes.

    ``skip_absent_classes`` averages only over the classes present in the (masked) target (per batch with
    ``batch_dice``, else per sample); 0 when none is. Without it an absent class scores
    smooth / (sum(p^2) + smooth): about 0 (a flat loss of 1) while sum(p^2) >> smooth, but a steep pull of
    that class's probabilities towards 0 (gradient about 2 p / smooth) once sum(p^2) is near or below smooth.
    """
    num_classes = probs.shape[1]
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    if mask is not None:
        m = mask.to(probs.dtype).unsqueeze(1)
        probs = probs * m
        onehot = onehot * m
    dims = (0,) + tuple(range(2, probs.ndim)) if batch_dice else tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    y_sum = onehot.sum(dims)        # one-hot and mask are 0/1, so sum(y^2) = sum(y): one reduction serves both
    den = ((probs * probs).sum(dims) if squared_denominator else probs.sum(dims)) + y_sum
    dice = (2.0 * inter + smooth) / (den + smooth)
    if not include_background:
        dice, y_sum = dice[..., 1:], y_sum[..., 1:]
    if skip_absent_classes:
        w = (y_sum > 0).to(dice.dtype)
        return (w * (1.0 - dice)).sum() / w.sum().clamp_min(1.0)
    return 1.0 - dice.mean()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Voxel-wise CE against a hard target, averaged over the voxels where ``mask`` is 1
    (0 if no voxel counts)."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if mask is None:
        return ce.mean()
    m = mask.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of the softmax maps (Mean Teacher / UA-MT consistency), averaged
    over classes and the voxels where ``mask`` is 1. The teacher side is detached."""
    p_s = torch.softmax(student_logits.float(), dim=1)
    p_t = torch.softmax(teacher_logits.detach().float(), dim=1)
    se = ((p_s - p_t) ** 2).mean(dim=1)
    if mask is None:
        return se.mean()
    m = mask.to(se.dtype)
    return (se * m).sum() / m.sum().clamp_min(1.0)


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``x`` over the voxels where ``mask`` is 1 (all voxels without a mask; 0 if none counts)."""
    x = x.float()
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def consistency_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     conf_thresh: Optional[float] = None, valid: Optional[torch.Tensor] = None,
                     dice_include_background: bool = True, dice_skip_absent_classes: bool = False,
                     dice_weight: float = 0.5, ce_weight: float = 0.5) -> Tuple[torch.Tensor, dict]:
    """Teacher -> student consistency of one of the kinds

    - ``'mse'``: softmax MSE (Mean Teacher, UA-MT, SSL4MIS),
    - ``'ce'``: CE on the teacher's hard pseudo-label,
    - ``'dice_ce'``: ``ce_weight`` CE + ``dice_weight`` soft Dice on the hard pseudo-label (FixMatch/UniMatch
      style; (CE + Dice) / 2 by default, CE + Dice with both weights 1 as nnU-Net's own loss), the Dice
      with or without the background and optionally over the classes present in the kept pseudo-label only,

    restricted to the voxels inside the image (``valid``: nnU-Net's padding excluded) and, with
    ``conf_thresh``, to those whose teacher confidence is >= it. Returns the loss and statistics (mean
    teacher confidence and ratio of voxels kept, both over the valid voxels) for logging.
    """
    label, conf = pseudo_label(teacher_logits)
    mask = (conf >= conf_thresh) if conf_thresh is not None else None
    if valid is not None:
        mask = valid if mask is None else mask & valid
    if kind == "mse":
        loss = softmax_mse(student_logits, teacher_logits, mask)
    elif kind == "ce":
        loss = masked_cross_entropy(student_logits, label, mask)
    elif kind == "dice_ce":
        probs = torch.softmax(student_logits.float(), dim=1)
        dice = masked_dice_loss(probs, label, mask, include_background=dice_include_background,
                                skip_absent_classes=dice_skip_absent_classes)
        loss = ce_weight * masked_cross_entropy(student_logits, label, mask) + dice_weight * dice
    else:
        raise ValueError(f"unknown consistency loss '{kind}' (use 'mse', 'ce' or 'dice_ce')")
    kept = (conf >= conf_thresh) if conf_thresh is not None else torch.ones_like(conf, dtype=torch.bool)
    stats = {"pl_confidence": masked_mean(conf, valid).detach(), "mask_ratio": masked_mean(kept, valid).detach()}
    return loss, stats


def gaussian_kernel(ndim: int, size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """A normalised ``size``^ndim Gaussian (separable product of 1-D Gaussians), float32."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = g
    for _ in range(ndim - 1):
        k = k.unsqueeze(-1) * g
    return (k / k.sum()).float()


def gaussian_smooth(x: torch.Tensor, size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise Gaussian smoothing of (B, C, *spatial), zero padding to the same size."""
    ndim = x.ndim - 2
    k = gaussian_kernel(ndim, size, sigma).to(x.device, x.dtype)
    weight = k.expand(x.shape[1], 1, *k.shape).contiguous()
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
    return conv(x, weight, padding=size // 2, groups=x.shape[1])


@torch.no_grad()
def reparameterize_and_smooth(x0_diffusion: torch.Tensor, logits_difficulty: torch.Tensor,
                              gumbel: Optional[torch.Tensor] = None, tau: float = 1.0) -> torch.Tensor:
    """A&D's R&S pseudo-label fusion: argmax_c [G * GumbelSoftmax(x0; tau) + softmax(logits)], with the
    denoising decoder's sampled x_0 (in [-1, 1], taken as logits) and the difficulty-aware decoder's logits;
    G a depthwise 3x3(x3) Gaussian (sigma 1). ``gumbel`` (standard Gumbel noise, -log(-log U)) replaces the
    random draw. No gradient reaches either decoder."""
    x0 = x0_diffusion.detach().float()
    g = -torch.log(-torch.log(torch.rand_like(x0).clamp(1e-20, 1.0))) if gumbel is None else gumbel
    soft = torch.softmax((x0 + g) / tau, dim=1)
    fused = gaussian_smooth(soft) + torch.softmax(logits_difficulty.detach().float(), dim=1)
    return fused.argmax(1)


def deep_supervision_targets(outputs, label: torch.Tensor):
    """A hard label (B, *spatial) as nnU-Net's deep-supervision targets: (B, 1, *size) for every output,
    downsampled by nearest neighbour."""
    lab = label.unsqueeze(1).float()
    return [lab if o.shape[2:] == lab.shape[2:] else F.interpolate(lab, size=o.shape[2:], mode="nearest")
            for o in outputs]


class ClassWeightedDiceCE(torch.nn.Module):
    """A&D's class-weighted DC_CE (methods.md 2.3/2.5) in nnU-Net's form: CE with class weights ``w`` (torch's
    weighted mean) plus nnU-Net's soft Dice without background (batch Dice when ``batch_dice``, smooth 1e-5)
    whose per-class Dice values are multiplied by ``w[1:]`` before the mean, taken negative as nnU-Net does.
    ``class_weights`` (C,) is set before each call (None: all 1, i.e. nnU-Net's DC_and_CE_loss). Targets
    are nnU-Net's (B, 1, *spatial)."""

    def __init__(self, batch_dice: bool = True, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice, self.smooth = bool(batch_dice), float(smooth)
        self.class_weights: Optional[torch.Tensor] = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        y = target[:, 0].long() if target.ndim == logits.ndim else target.long()
        w = None if self.class_weights is None else self.class_weights.to(logits.device, torch.float32)
        ce = F.cross_entropy(logits, y, weight=w)
        probs = torch.softmax(logits, 1)[:, 1:]
        onehot = F.one_hot(y, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
        dims = (0,) + tuple(range(2, logits.ndim)) if self.batch_dice else tuple(range(2, logits.ndim))
        dice = (2 * (probs * onehot).sum(dims) + self.smooth) / (probs.sum(dims) + onehot.sum(dims) + self.smooth)
        if w is not None:
            dice = dice * w[1:]
        return ce - dice.mean()
