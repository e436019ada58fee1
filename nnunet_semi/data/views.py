"""Weak and strong views of unlabeled patches, as batchgeneratorsv2 transforms.

- The *weak* view is nnU-Net's own geometry: the spatial transform (rotation, scaling, dummy-2D
  handling), mirroring and, where the plans use it, the nonzero-mask image masking, taken from the
  trainer's ``get_training_transforms`` output so it always matches what the labeled stream gets.
- *Strong* views are image-only perturbations (noise, blur, brightness, contrast, gamma, low
  resolution) of a clone of the weak view, so every strong view is pixel-aligned with the weak one
  and the teacher's prediction on the weak view is a valid target for it.

:class:`MultiViewTransform` returns the views stacked along the channel axis, so nnU-Net's own
``nnUNetDataLoader`` (sampling, cropping, padding, preallocation) can produce them unchanged: a batch
``data`` of shape (B, C * (1 + n_strong), ...) is split back with :func:`split_views`. The
``segmentation`` of an unlabeled batch is a validity mask (1 inside the image, 0 in padding and
outside the nonzero region).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

GEOMETRIC_TRANSFORMS = (Convert3DTo2DTransform, SpatialTransform, Convert2DTo3DTransform, MirrorTransform,
                        MaskImageTransform)


def weak_view_transform(training_transforms: BasicTransform) -> ComposeTransforms:
    """The geometric part of nnU-Net's training pipeline, in its order and with its settings."""
    items = training_transforms.transforms if isinstance(training_transforms, ComposeTransforms) \
        else [training_transforms]
    kept = [t for t in items if isinstance(t, GEOMETRIC_TRANSFORMS)]
    if not any(isinstance(t, SpatialTransform) for t in kept):
        raise RuntimeError("the trainer's training transforms contain no SpatialTransform; the weak view "
                           "needs one (it crops the enlarged patch to the patch size)")
    return ComposeTransforms(kept)


def strong_view_transform(p: float = 0.5, ignore_axes: Optional[Tuple[int, ...]] = None,
                          brightness: RandomScalar = (0.7, 1.3), contrast: RandomScalar = (0.65, 1.5),
                          gamma: RandomScalar = (0.7, 1.5), blur_sigma: RandomScalar = (0.5, 1.5),
                          noise_variance: RandomScalar = (0, 0.1), p_lowres: Optional[float] = None
                          ) -> ComposeTransforms:
    """Image-only strong perturbation: each op applied independently with probability ``p``
    (low resolution with ``p_lowres``, default p / 2). Ranges are wider than nnU-Net's defaults."""
    p_lowres = p / 2 if p_lowres is None else p_lowres
    return ComposeTransforms([
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast(brightness),
                                                          synchronize_channels=False, p_per_channel=1), p),
        RandomTransform(ContrastTransform(contrast_range=BGContrast(contrast), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), p),
        RandomTransform(GammaTransform(gamma=BGContrast(gamma), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), p),
        RandomTransform(GaussianBlurTransform(blur_sigma=blur_sigma, synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1, benchmark=True), p),
        RandomTransform(GaussianNoiseTransform(noise_variance=noise_variance, p_per_channel=1,
                                               synchronize_channels=True), p),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=ignore_axes,
                                                       allowed_channels=None, p_per_channel=1), p_lowres),
    ])


class MultiViewTransform(BasicTransform):
    """weak(image, seg) -> [weak, strong_1(weak), ..., strong_n(weak)] stacked on channels, and the
    segmentation turned into a validity mask."""

    def __init__(self, weak: BasicTransform, strong: Optional[BasicTransform], num_strong: int):
        super().__init__()
        if num_strong > 0 and strong is None:
            raise ValueError("num_strong > 0 needs a strong transform")
        self.weak = weak
        self.strong = strong
        self.num_strong = num_strong

    def __call__(self, **data_dict) -> dict:
        out = self.weak(**data_dict)
        weak_img = out["image"]
        views = [weak_img] + [self.strong(image=weak_img.clone())["image"] for _ in range(self.num_strong)]
        out["image"] = torch.cat(views, dim=0)
        seg = out.get("segmentation")
        if seg is not None:
            out["segmentation"] = (seg[:1] >= 0).to(torch.int16)
        return out

    def __repr__(self):
        return f"{type(self).__name__}(weak={self.weak!r}, strong={self.strong!r}, num_strong={self.num_strong})"


def split_views(data: torch.Tensor, num_channels: int) -> List[torch.Tensor]:
    """Undo the channel stacking of :class:`MultiViewTransform`: [weak, strong_1, ...]."""
    if data.shape[1] % num_channels:
        raise ValueError(f"batch has {data.shape[1]} channels, not a multiple of {num_channels}")
    return list(torch.split(data, num_channels, dim=1))
