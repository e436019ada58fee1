"""Exponential moving average of network weights (Mean Teacher style).

Iterates ``parameters()`` and floating-point ``buffers()``, never ``state_dict()``: nnU-Net's
networks alias each encoder tensor up to four times in their state dict (the decoder holds the
encoder), so an in-place EMA over state-dict items would decay shared tensors several times.
"""
from __future__ import annotations

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def ema_decay_at(step: int, decay: float) -> float:
    """Mean Teacher's warm-up: alpha = min(1 - 1/(step + 1), decay), so early teachers follow the
    student closely instead of averaging in the random initialisation."""
    return min(1.0 - 1.0 / (step + 1.0), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for parameters and float buffers;
    integer buffers are copied."""
    student = unwrap(student)
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError("teacher and student have different parameter lists")
    if t_params:
        torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        if tb.dtype.is_floating_point:
            tb.lerp_(sb.detach(), 1.0 - decay)
        else:
            tb.copy_(sb)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    dst.load_state_dict(unwrap(src).state_dict())
