"""CrossMatch's feature perturbation for nnU-Net's encoder/decoder networks: the stacked weak/strong
channel-dropout streams of every encoder output, decoded in one decoder call, as a mixin that adds no module
or parameter (so state dicts, ``load_state_dict(strict=True)`` and stock ``nnUNetv2_predict`` are those of the
plain network). See :class:`FeaturePerturbationUNet`.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_semi.perturbations import perturb_skips


def full_resolution(out):
    """The highest-resolution output of a decoder result (a deep-supervision list or a tensor)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def split_batch(out, n: int):
    """(first n samples, the rest) of a network output (a deep-supervision list or a tensor): one forward on a
    concatenated batch, split back (Reciprocal Learning's teacher, A&D's D_theta)."""
    if isinstance(out, (list, tuple)):
        return [o[:n] for o in out], [o[n:] for o in out]
    return out[:n], out[n:]


class FeaturePerturbationUNet:
    """Mixin for nnU-Net's encoder/decoder networks (anything with ``.encoder(x) -> skips`` and
    ``.decoder(skips)``). Mixed in by :func:`add_feature_perturbation`; adds no module or parameter.

    ``forward(x)`` is the network's own forward. ``forward(x, fp_from=k)`` runs the encoder once on
    x, copies every encoder output of the samples ``x[k:]`` with weak (``p_weak``) and strong
    (``p_strong``) channel dropout (an independent mask per feature map and sample), stacks
    [all clean; weak copies; strong copies] in the batch dimension and decodes them in ONE decoder
    call. It returns ``(clean, weak, strong)``: the decoder output for x (a deep-supervision list if
    enabled) and the full-resolution outputs of the two dropout streams of ``x[k:]``.
    ``clean_no_grad = n`` decodes the clean streams of the last n samples in a second decoder call
    without autograd (their outputs only make pseudo-labels, so their backward would be all zeros;
    the encoder pass on them keeps its gradient through the dropout streams). The result is the same.
    ``fp_masks = (weak_masks, strong_masks)`` (one mask per encoder output, shaped for ``x[k:]``,
    see :func:`~nnunet_semi.perturbations.channel_dropout_mask`) replaces the random draw.
    """

    def forward(self, x: torch.Tensor, fp_from: Optional[int] = None, p_weak: float = 0.25, p_strong: float = 0.75,
                fp_masks: Optional[Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]] = None,
                clean_no_grad: int = 0):
        if fp_from is None:
            return super().forward(x)
        b = x.shape[0]
        if not 0 <= fp_from <= b:
            raise ValueError(f"fp_from={fp_from} is outside the batch of {b}")
        if not 0 <= clean_no_grad <= b:
            raise ValueError(f"clean_no_grad={clean_no_grad} is outside the batch of {b}")
        skips = self.encoder(x)
        tail = [s[fp_from:] for s in skips]
        weak_masks, strong_masks = fp_masks if fp_masks is not None else (None, None)
        weak = perturb_skips(tail, p_weak, weak_masks)
        strong = perturb_skips(tail, p_strong, strong_masks)
        keep = b - clean_no_grad
        out = self.decoder([torch.cat((s[:keep], w, st), 0) for s, w, st in zip(skips, weak, strong)])
        n = b - fp_from
        full = full_resolution(out)
        is_list = isinstance(out, (list, tuple))
        clean = [o[:keep] for o in out] if is_list else out[:keep]
        if clean_no_grad:  # outputs that only make pseudo-labels: no activations kept, no backward
            with torch.no_grad():
                rest = self.decoder([s[keep:].detach() for s in skips])
            clean = [torch.cat((c, r), 0) for c, r in zip(clean, rest)] if is_list else torch.cat((clean, rest), 0)
        return clean, full[keep:keep + n], full[keep + n:]


_FP_CLASSES: Dict[type, type] = {}


def feature_perturbation_class(cls: type) -> type:
    """The (cached) subclass of network class ``cls`` with :class:`FeaturePerturbationUNet` mixed in."""
    if issubclass(cls, FeaturePerturbationUNet):
        return cls
    if cls not in _FP_CLASSES:
        name = f"FeaturePerturbation{cls.__name__}"
        new = type(name, (FeaturePerturbationUNet, cls), {"__module__": __name__, "__doc__": (
            f"{cls.__module__}.{cls.__qualname__} with CrossMatch's stacked feature-perturbation streams "
            f"(same modules and state-dict keys; see FeaturePerturbationUNet).")})
        new.__qualname__ = name
        if name not in globals():  # importable by name, so pickling by reference works
            globals()[name] = new
        _FP_CLASSES[cls] = new
    return _FP_CLASSES[cls]


def add_feature_perturbation(network: nn.Module) -> nn.Module:
    """Give ``network`` (in place) the class from :func:`feature_perturbation_class`: modules,
    parameters and state-dict keys stay exactly those of the plain network."""
    for attr in ("encoder", "decoder"):
        if not isinstance(getattr(network, attr, None), nn.Module):
            raise TypeError(f"CrossMatch needs a network with .encoder (returning all skips) and .decoder "
                            f"modules; {type(network).__name__} has no '{attr}'")
    network.__class__ = feature_perturbation_class(type(network))
    return network
