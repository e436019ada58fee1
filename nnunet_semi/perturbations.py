"""Image- and feature-level perturbations on batches (torch, any device, 2D or 3D).

CutMix follows the UniMatch/CrossMatch recipe: with probability ``p`` a box whose area (volume)
fraction is ~U(area_min, area_max) and whose aspect ratio is ~U(ratio_min, 1/ratio_min) is cut from
a mix-source sample and pasted into the target sample; the same box mixes images, pseudo-labels
and confidences. Feature dropout draws channel-wise masks (Dropout2d/3d) out of place.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def cutmix_box_mask(spatial_shape: Sequence[int], p: float = 0.5, area_range=(0.02, 0.4),
                    ratio_min: float = 0.3, generator: Optional[torch.Generator] = None,
                    device=None) -> torch.Tensor:
    """One bool mask of ``spatial_shape`` (2D or 3D), True inside the box, all False with
    probability 1 - p."""
    mask = torch.zeros(tuple(spatial_shape), dtype=torch.bool, device=device)
    u = lambda: float(torch.rand((), generator=generator))
    if u() > p:
        return mask
    dims = len(spatial_shape)
    total = float(math.prod(spatial_shape))
    size = (area_range[0] + u() * (area_range[1] - area_range[0])) * total
    ratio = ratio_min + u() * (1.0 / ratio_min - ratio_min)
    if dims == 2:
        sides = [math.sqrt(size / ratio), math.sqrt(size * ratio)]
    elif dims == 3:
        c = size ** (1.0 / 3.0)
        sides = [c / ratio ** (1.0 / 3.0), c * ratio ** (1.0 / 3.0), c]
        # shuffle which axis gets which side so no axis is systematically the long one
        perm = torch.randperm(3, generator=generator).tolist()
        sides = [sides[i] for i in perm]
    else:
        raise ValueError(f"cutmix needs 2D or 3D shapes, got {spatial_shape}")
    slices = []
    for s, n in zip(sides, spatial_shape):
        s = int(max(1, min(n, round(s))))
        start = int(torch.randint(0, n - s + 1, (1,), generator=generator))
        slices.append(slice(start, start + s))
    mask[tuple(slices)] = True
    return mask


def cutmix_box_masks(batch_size: int, spatial_shape: Sequence[int], p: float = 0.5, area_range=(0.02, 0.4),
                     ratio_min: float = 0.3, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, *spatial) bool masks, one independent box per sample (a CPU ``generator`` makes them
    reproducible)."""
    return torch.stack([cutmix_box_mask(spatial_shape, p, area_range, ratio_min, generator=generator, device=device)
                        for _ in range(batch_size)])


def apply_cutmix(target: torch.Tensor, source: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Out of place: ``target`` with ``source`` pasted where ``box`` (B, *spatial) is True. Works for
    images (B, C, ...) and for label/confidence maps (B, ...)."""
    m = box if target.ndim == box.ndim else box.unsqueeze(1)
    return torch.where(m, source, target)


def mix_within_batch(box: torch.Tensor, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """CutMix inside one batch: in each tensor (images, logits, label or mask maps; batch first) sample i gets
    sample i + 1's content (the last gets the first's) where ``box`` (B, *spatial) is True. The same boxes and
    partners for every tensor, so an image and its prediction stay aligned. A batch of one is returned as is."""
    if box.shape[0] < 2:
        return tensors
    partner = torch.roll(torch.arange(box.shape[0], device=box.device), -1)
    return tuple(apply_cutmix(t, t[partner], box) for t in tensors)


def channel_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Channel-wise dropout (whole feature maps zeroed, survivors scaled by 1/(1-p)), always
    active, out of place (nnU-Net's encoders use in-place LeakyReLUs, so skips must not be
    modified in place). Works for 2D and 3D feature maps."""
    if p <= 0:
        return x
    if x.ndim == 4:
        return F.dropout2d(x, p, training=True)
    if x.ndim == 5:
        return F.dropout3d(x, p, training=True)
    raise ValueError(f"channel_dropout expects 4D or 5D tensors, got {x.ndim}D")


def channel_dropout_mask(x: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """An explicit channel-dropout mask for ``x`` (B, C, *spatial): shape (B, C, 1, ...), entries 0
    (dropped, probability p) or 1/(1-p), in ``x``'s dtype and device. ``x * mask`` is distributed as
    :func:`channel_dropout` (``F.dropout2d/3d``); drawn on the CPU when a CPU ``generator`` is given,
    so tests can replay identical masks."""
    shape = tuple(x.shape[:2]) + (1,) * (x.ndim - 2)
    if p <= 0:
        return torch.ones(shape, dtype=x.dtype, device=x.device)
    if p >= 1:
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    dev = generator.device if generator is not None else x.device
    keep = torch.rand(shape, generator=generator, device=dev) >= p
    return (keep.to(torch.float32) / (1.0 - p)).to(device=x.device, dtype=x.dtype)


def perturb_skips(skips: List[torch.Tensor], p: float,
                  masks: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Independent channel-dropout masks on every encoder output (all skips and the bottleneck),
    out of place. ``masks`` (one per skip, from :func:`channel_dropout_mask`) replaces the random
    draw, e.g. to apply identical masks on two code paths."""
    if masks is None:
        return [channel_dropout(s, p) for s in skips]
    if len(masks) != len(skips):
        raise ValueError(f"{len(masks)} dropout masks for {len(skips)} feature maps")
    return [s * m.to(s.dtype) for s, m in zip(skips, masks)]
