"""Training-length overrides from environment variables, shared by every trainer of the plugin
(the semi-supervised ones and :class:`~nnunet_semi.methods.supervised.SupervisedBaselineTrainer`), so
a benchmark or a quick CPU run gives every arm the same budget without new trainer classes:

- ``nnUNet_semi_epochs``: number of epochs (nnU-Net default 1000)
- ``nnUNet_semi_iters``: training iterations per epoch (default 250)
- ``nnUNet_semi_val_iters``: validation iterations per epoch (default 50)
- ``nnUNet_semi_save_every``: write checkpoint_latest every N epochs (default 50)
- ``nnUNet_semi_seed``: seed python, numpy and torch when the trainer is built (network initialisation,
  sampling in the main process; augmentation workers get seeds derived from it), so benchmark repeats
  differ by seed and a seed can be re-run. nnU-Net itself is not bit-deterministic (workers, cuDNN).
- ``nnUNet_semi_skip_final_validation``: ``1`` skips the validation nnU-Net runs right after training
  (``nnUNetv2_train ... --val`` still runs it); benchmarks and the demo evaluate held-out cases instead.

Three more set the semi-supervised trainers' warm-up schedule (class attributes of the same names),
for runs far shorter than nnU-Net's 250000 iterations (demos, smoke tests):

- ``nnUNet_semi_warmup_iters``: supervised-only iterations before the unsupervised terms may act (>= 0; taken
  as given: the recipe's ``warmup_max_fraction`` cap, if any, is lifted)
- ``nnUNet_semi_warmup_pseudo_dice``: EMA pseudo Dice that must also be reached first (``none``: no gate)
- ``nnUNet_semi_rampup_iters``: ramp-up length in iterations after the gate opens (>= 0)

They are read when the trainer is built; the values in force are printed to the training log.
"""
from __future__ import annotations

import os

SKIP_FINAL_VALIDATION_VAR = "nnUNet_semi_skip_final_validation"
BUDGET_VARS = {"nnUNet_semi_epochs": "num_epochs", "nnUNet_semi_iters": "num_iterations_per_epoch",
               "nnUNet_semi_val_iters": "num_val_iterations_per_epoch", "nnUNet_semi_save_every": "save_every"}


def env_flag(name: str, environ=None) -> bool:
    """A yes/no environment variable: 1/true/yes/on (any case) is yes; unset, empty or anything else no."""
    environ = os.environ if environ is None else environ
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def apply_budget_overrides(trainer) -> dict:
    applied = {}
    for var, attr in BUDGET_VARS.items():
        raw = os.environ.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
            if value < 1:
                raise ValueError
        except ValueError:
            raise RuntimeError(f"environment variable {var}={raw!r} must be a positive integer") from None
        setattr(trainer, attr, value)
        applied[attr] = value
    seed = os.environ.get("nnUNet_semi_seed")
    if seed not in (None, ""):
        import random

        import numpy as np
        import torch
        seed = int(seed)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        applied["seed"] = seed
    if applied:
        trainer.print_to_log_file(f"nnunet_semi budget overrides from the environment: {applied}")
    return applied


SCHEDULE_VARS = {"nnUNet_semi_warmup_iters": "warmup_iters", "nnUNet_semi_warmup_pseudo_dice": "warmup_pseudo_dice",
                 "nnUNet_semi_rampup_iters": "rampup_iters"}
#: the attributes those variables may change (``nnUNet_semi_warmup_iters`` also lifts ``warmup_max_fraction``)
SCHEDULE_ATTRS = frozenset(SCHEDULE_VARS.values()) | {"warmup_max_fraction"}


def apply_schedule_overrides(trainer) -> dict:
    """The warm-up/ramp-up variables above, set on ``trainer`` (a semi-supervised trainer)."""
    applied = {}
    for var, attr in SCHEDULE_VARS.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        try:
            if attr == "warmup_pseudo_dice":
                value = None if raw.lower() == "none" else float(raw)
                if value is not None and not 0 <= value <= 1:
                    raise ValueError
            else:
                value = int(raw)
                if value < 0:
                    raise ValueError
        except ValueError:
            want = "a number in [0, 1] or 'none'" if attr == "warmup_pseudo_dice" else "an integer >= 0"
            raise RuntimeError(f"environment variable {var}={raw!r} must be {want}") from None
        setattr(trainer, attr, value)
        applied[attr] = value
    if "warmup_iters" in applied and getattr(trainer, "warmup_max_fraction", None) is not None:
        trainer.warmup_max_fraction = None   # a length given for this run is taken as given, not capped
        applied["warmup_max_fraction"] = None
    if applied:
        trainer.print_to_log_file(f"nnunet_semi warm-up schedule from the environment: {applied}")
    return applied
