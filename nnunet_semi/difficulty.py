"""A&D's difficulty-aware class weights (methods.md 2.5; ``Difficulty`` in ``xmed-lab/GenericSSL``).

Every iteration, from the denoising decoder's hard prediction on the labeled batch: d_c = batch hard Dice of
class c (background included, smooth 1e-8); its change against the previous iteration's d_c splits into a
learning and an unlearning signal (Delta_c and r_c = log(d_c / d_prev) have the same sign, so both products
are >= 0), each averaged by an EMA with momentum 0.98 (starting at 0); the difficulty is
diff_c = ((U_c + 1e-8) / (L_c + 1e-8))^(1/5) and, with the EMA D_c of 1 - d_c (starting at 1), the weight
w_c = C diff_c D_c for C classes. The weights are used for the difficulty-aware decoder's CE and Dice.
"""
from __future__ import annotations

import torch

EPS = 1e-8


def hard_batch_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int, smooth: float = EPS) -> torch.Tensor:
    """Per-class Dice of hard label maps (B, *spatial), summed over the batch, background included."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    p_sum = torch.bincount(pred, minlength=num_classes).double()
    y_sum = torch.bincount(target, minlength=num_classes).double()
    tp = torch.bincount(target[pred == target], minlength=num_classes).double()
    return (2 * tp + smooth) / (p_sum + y_sum + smooth)


class DifficultyWeights:
    """The running state of the difficulty-aware weights; :meth:`update` takes one iteration's hard
    prediction and label and returns w (float64, one weight per class)."""

    def __init__(self, num_classes: int, momentum: float = (50 - 1) / 50):
        self.num_classes, self.momentum = int(num_classes), float(momentum)
        self.prev = torch.full((self.num_classes,), EPS, dtype=torch.float64)
        self.learn = torch.zeros(self.num_classes, dtype=torch.float64)
        self.unlearn = torch.zeros(self.num_classes, dtype=torch.float64)
        self.dice_ema = torch.ones(self.num_classes, dtype=torch.float64)
        self.weights = torch.ones(self.num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the per-class Dice on the labels' device; only its C values travel to the state (float64, CPU)
        d = hard_batch_dice(pred, target, self.num_classes)
        return self.update_from_dice(d.cpu())

    def update_from_dice(self, d: torch.Tensor) -> torch.Tensor:
        d = d.double()
        delta, ratio = d - self.prev, torch.log(d / self.prev)
        b = self.momentum
        self.learn = b * self.learn + (1 - b) * delta.clamp_min(0) * ratio
        self.unlearn = b * self.unlearn + (1 - b) * delta.clamp_max(0) * ratio
        self.prev = d.clone()
        diff = ((self.unlearn + EPS) / (self.learn + EPS)) ** 0.2
        self.dice_ema = b * self.dice_ema + (1 - b) * (1 - d)
        self.weights = self.num_classes * diff * self.dice_ema
        return self.weights.clone()

    def state_dict(self) -> dict:
        return {k: getattr(self, k).clone() for k in ("prev", "learn", "unlearn", "dice_ema", "weights")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone().double())
