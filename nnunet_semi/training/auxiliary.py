"""Named auxiliary modules of a method: extra networks or decoders beside nnU-Net's ``self.network``.

A method declares them in :meth:`SemiSupervisedTrainer.build_auxiliary_modules` as
:class:`AuxiliaryModule` entries: trainable or not, an EMA of one or several other modules (matched by
parameter name), with their own optimizer and LR schedule or none. The base trainer moves them to the
device, wraps the trainable ones for nnU-Net's DDP, sets their train/eval mode each epoch, steps their
schedules, updates the EMA ones after each iteration, and saves and restores them (weights, optimizer and
its LR schedule is rebuilt, as nnU-Net's) under the ``nnunet_semi`` checkpoint key. This module holds the pieces that need no
trainer: the spec, EMA over several sources and the checkpoint state of one module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_semi.ema import unwrap

#: the name by which an EMA source refers to the trainer's own (exported-by-default) ``self.network``
NETWORK = "network"


@dataclass
class AuxiliaryModule:
    """One auxiliary network or decoder. ``ema_sources`` names the modules it averages: ``'network'``
    (the trainer's student network), another auxiliary module, or a submodule of either with a dotted path
    (``'network.decoder'``); with several sources the EMA target is their mean. ``train_mode`` None means
    train mode when trainable, eval mode otherwise."""
    module: nn.Module
    trainable: bool = False
    ema_sources: Sequence[str] = ()
    ema_decay: float = 0.99
    #: Mean Teacher's early-step decay min(1 - 1/(t + 1), ema_decay)
    ema_warmup: bool = True
    optimizer: Optional[torch.optim.Optimizer] = None
    #: stepped with the epoch at the start of every epoch (nnU-Net's PolyLRScheduler convention)
    lr_scheduler: Optional[object] = None
    train_mode: Optional[bool] = None
    #: gradient-norm clipping of its optimizer steps (nnU-Net's 12; None = no clipping)
    grad_clip: Optional[float] = 12.0
    #: what the method calls: the DDP wrapper when trainable under DDP (set by the base), else the module
    wrapped: Optional[nn.Module] = field(default=None, repr=False)

    def __post_init__(self):
        if self.trainable and self.ema_sources:
            raise ValueError("an auxiliary module is either trained by its optimizer or an EMA of others, not both")
        if self.optimizer is not None and not self.trainable:
            raise ValueError("an optimizer was given for a module that is not trainable")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], not {self.ema_decay}")
        if self.wrapped is None:
            self.wrapped = self.module

    @property
    def wants_train_mode(self) -> bool:
        return self.trainable if self.train_mode is None else bool(self.train_mode)


def resolve(path: str, network: nn.Module, aux: Dict[str, AuxiliaryModule]) -> nn.Module:
    """The module a dotted ``path`` names: ``'network[.sub...]'`` or ``'<aux name>[.sub...]'``."""
    head, _, rest = path.partition(".")
    if head == NETWORK:
        module = unwrap(network)
    elif head in aux:
        module = aux[head].module
    else:
        raise KeyError(f"unknown module '{head}' (known: {', '.join([NETWORK, *aux])})")
    return module.get_submodule(rest) if rest else module


def matched_tensors(target: nn.Module, sources: Sequence[nn.Module], exclude: Sequence[str] = ()
                    ) -> List[Tuple[str, torch.Tensor, List[torch.Tensor]]]:
    """``(name, target tensor, source tensors)`` for every parameter and buffer of ``target`` whose name
    exists in every source with the same shape (parameters and buffers as ``named_parameters`` /
    ``named_buffers`` list them: each shared tensor once), except names starting with a prefix in
    ``exclude`` (nnU-Net's decoders hold a reference to the encoder: ``'encoder.'`` keeps it out)."""
    out = []
    src = [dict(list(s.named_parameters()) + list(s.named_buffers())) for s in sources]
    for name, t in list(target.named_parameters()) + list(target.named_buffers()):
        if any(name.startswith(x) for x in exclude):
            continue
        ss = [d.get(name) for d in src]
        if all(s is not None and s.shape == t.shape for s in ss):
            out.append((name, t, ss))
    return out


@torch.no_grad()
def ema_update_from(target: nn.Module, sources: Sequence[nn.Module], decay: float,
                    exclude: Sequence[str] = ()) -> List[str]:
    """target <- decay * target + (1 - decay) * mean(sources) for every matched float tensor (integer
    buffers are copied from the first source); unmatched and excluded tensors are left alone. Returns the
    names updated."""
    sources = [unwrap(s) for s in sources]
    matched = matched_tensors(target, sources, exclude)
    floats = [(t, ss) for _, t, ss in matched if t.dtype.is_floating_point]
    if floats:
        ts = [t for t, _ in floats]
        mean = [ss[0].detach() if len(ss) == 1 else torch.stack([s.detach() for s in ss]).mean(0) for _, ss in floats]
        torch._foreach_lerp_(ts, mean, 1.0 - decay)
    for _, t, ss in matched:
        if not t.dtype.is_floating_point:
            t.copy_(ss[0])
    return [name for name, _, _ in matched]


def module_state(aux: AuxiliaryModule) -> dict:
    """Checkpoint state of one auxiliary module: its weights and its optimizer's state. Its LR schedule is,
    as nnU-Net's own, a function of the epoch it is stepped with (rebuilt with the run's budget on ``--c``),
    so it has no state to save: a run resumed with more epochs gets the schedule of its new length."""
    return {"weights": unwrap(aux.module).state_dict(),
            "optimizer": aux.optimizer.state_dict() if aux.optimizer is not None else None}


def load_module_state(aux: AuxiliaryModule, state: dict, name: str) -> None:
    """Restore :func:`module_state` output; a checkpoint whose weights do not fit is an error naming the
    module."""
    try:
        unwrap(aux.module).load_state_dict(state["weights"])
    except RuntimeError as e:
        raise RuntimeError(f"auxiliary module '{name}': the checkpoint's weights do not fit ({e})") from None
    if aux.optimizer is not None and state.get("optimizer") is not None:
        aux.optimizer.load_state_dict(state["optimizer"])
