"""A&D's strong augmentation ("SVDA", ``get_StrongAug``) as batchgeneratorsv2 transforms.

What the released code does
---------------------------
xmed-lab/GenericSSL ``code/data/StrongAug.py`` (3D, ``get_StrongAug`` L427-450) and
``code/data/StrongAug_2d.py`` (2D, L289-313), called as ``get_StrongAug(patch_size, 3, 0.7)`` for the
labeled and the unlabeled stream alike (``train_diffusion.py`` L192-193, ``train_diffusion_2d.py``
L194-195):

1. ``RandomCrop(patch_size)`` (zero padding when the volume is too small).
2. ``RandomSelect``: ``random.sample(ops, k=sample_num)`` picks ``sample_num`` of the six operations
   below *without replacement*, anew for every sample; the picked ones are inserted into the list
   before ``RemoveLabelTransform(-1, 0)`` (``list.insert(3, ...)``, so they run in the reverse of the
   sampling order: still a uniformly random order). Each picked operation then acts with its own
   ``p_per_sample`` (0.7 as called):

   ======================  ===========================================  ==========================
   operation               3D (``StrongAug.py``)                        2D (``StrongAug_2d.py``)
   ======================  ===========================================  ==========================
   rotation                one angle ~ U(-15 deg, 15 deg) about the     the same angle range, in
                           first array axis only (``rotate_coords_3d``  the plane (L38-86)
                           with ``a_y = a_z = 0``, L33-81)
   scale                   prob 0.5: s ~ U(0.7, 1), else s = 1         (0.5, 1) (L298)
                           (``augment_scale``, L84-137, L436)
   Gaussian blur           sigma ~ U(0.7, 1.3), one per channel,        the same (L301)
                           isotropic (L439)
   multiplicative bright.  per channel ~ U(0.7, 1.3) (L440)             library default U(0.5, 2)
                                                                        (L302)
   contrast                (0.7, 1.3), around the channel mean,         (0.5, 1.5) (L303)
                           range preserved (L441)
   gamma                   (0.7, 1.3), per channel, retain_stats,       library default (0.5, 2)
                           not inverted (L442)                          (L304)
   ======================  ===========================================  ==========================

   Rotation and scale resample about the patch centre (``data.shape / 2 - 0.5``) to the same patch
   size: image cubic spline (``order_data=3``), label per-label linear (``order_seg=1``,
   ``is_seg=True``), both with constant fill 0 outside (``border_mode_*='constant'``, cval 0).
   Contrast and gamma factors are drawn by batchgenerators' rule: with prob 0.5 from (low, 1), else
   from (1, high). Brightness is plain uniform. There are no flips and no other augmentation. The
   repository pins ``batchgenerators==0.21`` (``requirements.txt`` L5), whose defaults and sampling are
   those listed here.
3. ``RemoveLabelTransform(-1, 0)`` and conversion to tensors.

What is the same here
---------------------
:class:`SVDATransform` draws ``sample_num`` distinct operations per call (``ops`` chooses the pool),
applies each with probability ``p`` in a random order, and uses the same ranges, the same sampling
rules (the 0.5 split of scale, contrast and gamma; the fixed rotation axis) and the same centre and
fill. Contrast, brightness and gamma are batchgeneratorsv2's ``ContrastTransform``,
``MultiplicativeBrightnessTransform`` and ``GammaTransform`` with the v1 settings the released code
used (per channel, range preserved, retain_stats, no inversion), so they act with every channel's own
statistics. The blur is batchgeneratorsv2's separable Gaussian (``blur_dimension``), one isotropic sigma
per channel, as ``GaussianBlurTransform(synchronize_axes=True, synchronize_channels=False)``.

What differs
------------
- Resampling is ``torch.nn.functional.grid_sample`` on voxel coordinates (``align_corners=True``, so the
  sample points are exactly those of ``map_coordinates``): the image is bicubic in 2D (torch's cubic
  convolution, a = -0.75: sharp like the spline, but off linear ramps by a few percent of the slope) and
  trilinear in 3D (torch has no tricubic), instead of a cubic spline. The segmentation is resampled per label
  (linear interpolation of each label's indicator, argmax, ties settled by the nearest-neighbour
  label) instead of the ``>= 0.5`` assignment, which left voxels where three labels meet at 0.
  Outside the patch the image is 0 and the segmentation is ``seg_fill_value`` (0 as released; the
  nnU-Net pipeline uses -1, its padding label, which its ``RemoveLabelTansform(-1, 0)`` turns into 0,
  the released value, while ``seg >= 0`` still marks those voxels as outside the image).
- Gamma's retain_stats keeps each channel's mean and std. In the pinned batchgenerators 0.21
  (``augment_gamma``) the mean was restored *before* dividing by the new std, so the std was kept but
  the mean came out scaled by ``sd / std_after``; later batchgenerators, and batchgeneratorsv2's
  ``GammaTransform`` used here, restore both.
- The blur pads by reflection (torch ``reflect``) where scipy's ``gaussian_filter`` used ``reflect``
  (= symmetric); the kernel is truncated at 6 sigma instead of 4. Negligible.
- Randomness: numpy's (and torch's) global RNGs, which nnU-Net seeds per worker, instead of Python's
  ``random`` for the choice of operations, the p checks and the blur sigma.
- ``ignore_axes`` (nnU-Net's dummy-2D case): no operation acts along those axes (no zoom along them,
  the rotation must be about them, the blur skips them).
- In nnU-Net's pipeline (:func:`svda_training_transforms`) nnU-Net's ``SpatialTransform`` crops
  (centre of the loader's patch, as nnU-Net does) instead of ``RandomCrop``; the loader's own random
  crop with foreground oversampling comes first, as in every nnU-Net trainer.

Segmentation and ``image_only``
--------------------------------
The geometric operations move whatever segmentation the data dict holds with exactly the same
geometry as the image. With ``image_only=False`` (labeled data) the segmentation is a label map and is
resampled per label as above. With ``image_only=True`` (unlabeled data) there is no label: the
segmentation, if present, is a validity mask (the plugin's unlabeled ``segmentation``) and is moved with
nearest-neighbour sampling, ``seg_fill_value`` (0 = invalid by default) outside the original field of
view, so that it keeps describing where the moved image is real. Intensity operations never touch the
segmentation.

:func:`svda_strong_view_transform` is the SVDA as the plugin's strong view (``transform(image=...)``).
Its geometric operations act on the image alone, so that view is *not* pixel-aligned with the weak
view or with the unlabeled validity mask; A&D does not need the alignment, because its pseudo-labels
and its prediction are computed on the same (strong) view. Methods whose targets come from the weak
view (Mean Teacher, CrossMatch) get it with ``ops=SVDA_INTENSITY_OPS``, which keeps every voxel in place
(``SemiSupervisedTrainer.get_strong_transform``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
    RemoveRandomConnectedComponentFromOneHotEncodingTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import _compute_kernel_size, blur_dimension
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

#: the six operations, in the order of the released ``tr_transforms_select``
SVDA_OPS: Tuple[str, ...] = ("rotation", "scale", "blur", "brightness", "contrast", "gamma")
GEOMETRIC_OPS = frozenset({"rotation", "scale"})
#: the operations that leave every voxel where it is (a strong view from these stays pixel-aligned)
SVDA_INTENSITY_OPS: Tuple[str, ...] = tuple(o for o in SVDA_OPS if o not in GEOMETRIC_OPS)

_MAX_ANGLE = 15. / 360 * 2. * np.pi

#: per-variant ranges (see the module docstring for where each comes from)
SVDA_RANGES: Dict[str, Dict[str, Tuple[float, float]]] = {
    "3d": {"rotation": (-_MAX_ANGLE, _MAX_ANGLE), "scale": (0.7, 1.0), "blur": (0.7, 1.3),
           "brightness": (0.7, 1.3), "contrast": (0.7, 1.3), "gamma": (0.7, 1.3)},
    "2d": {"rotation": (-_MAX_ANGLE, _MAX_ANGLE), "scale": (0.5, 1.0), "blur": (0.7, 1.3),
           "brightness": (0.5, 2.0), "contrast": (0.5, 1.5), "gamma": (0.5, 2.0)},
}


def _variant_of(ndim_or_variant: Union[int, str, None]) -> Optional[str]:
    if ndim_or_variant is None:
        return None
    if isinstance(ndim_or_variant, str):
        v = ndim_or_variant.lower()
        if v not in SVDA_RANGES:
            raise ValueError(f"unknown SVDA variant {ndim_or_variant!r}; expected '2d' or '3d'")
        return v
    if int(ndim_or_variant) not in (2, 3):
        raise ValueError(f"SVDA supports 2 or 3 spatial dimensions, not {ndim_or_variant}")
    return f"{int(ndim_or_variant)}d"


def _batchgenerators_split(low: float, high: float) -> float:
    """batchgenerators' factor rule: with prob 0.5 from (low, 1) if low < 1, else from (max(low, 1), high)."""
    if np.random.random() < 0.5 and low < 1:
        return float(np.random.uniform(low, 1))
    return float(np.random.uniform(max(low, 1), high))


def _rotation_matrix(ndim: int, axis: int, angle: float) -> torch.Tensor:
    """The released rotation (``create_matrix_rotation_2d`` / ``..._x_3d`` generalised to any axis)."""
    c, s = math.cos(angle), math.sin(angle)
    m = torch.eye(ndim, dtype=torch.float64)
    i, j = (0, 1) if ndim == 2 else tuple(a for a in range(3) if a != axis)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _sampling_grid(shape: Sequence[int], matrix: torch.Tensor, device) -> torch.Tensor:
    """grid_sample grid (1, *shape, ndim) for output voxel x sampling input ``ctr + (x - ctr) @ matrix``,
    ``ctr = (shape - 1) / 2``, as the released code's coordinates (coords^T . rot_matrix) with
    ``align_corners=True`` normalisation."""
    ndim = len(shape)
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2. for n in shape]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    src = mesh.reshape(-1, ndim) @ matrix
    half = torch.tensor([(n - 1) / 2. if n > 1 else math.inf for n in shape], dtype=torch.float64)
    grid = (src / half).reshape(*shape, ndim).flip(-1)  # grid_sample wants (x=last axis, ..., first axis)
    return grid[None].to(device=device, dtype=torch.float32)


def _resample_image(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    mode = "bicubic" if img.ndim == 3 else "bilinear"
    out = F.grid_sample(img[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
    return out.to(img.dtype)


def _resample_labels(seg: torch.Tensor, grid: torch.Tensor, fill: int) -> torch.Tensor:
    """Per-label linear resampling with argmax; outside the patch counts as label ``fill``; ties go to
    the nearest-neighbour label."""
    out = torch.empty((seg.shape[0],) + tuple(grid.shape[1:-1]), dtype=seg.dtype, device=seg.device)
    for c in range(seg.shape[0]):
        s = seg[c]
        labels = torch.unique(torch.cat([s.reshape(-1), torch.tensor([fill], dtype=s.dtype, device=s.device)]))
        onehot = torch.stack([(s == lab) for lab in labels]).float()
        score = F.grid_sample(onehot[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        fill_idx = int((labels == fill).nonzero()[0, 0])
        score[fill_idx] += (1. - score.sum(0)).clamp_min(0.)
        nearest = _resample_mask(s[None], grid, fill)[0]
        score += 1e-4 * (nearest[None] == labels.view(-1, *[1] * nearest.ndim)).float()
        out[c] = labels[score.argmax(0)]
    return out


def _resample_mask(seg: torch.Tensor, grid: torch.Tensor, fill: int) -> torch.Tensor:
    """Nearest-neighbour resampling, ``fill`` outside the patch."""
    shifted = seg[None].float() - float(fill)
    out = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]
    return (out + float(fill)).round().to(seg.dtype)


class SVDATransform(BasicTransform):
    """A&D's strong augmentation on nnU-Net's per-sample dict (``image`` (C, *spatial), optional
    ``segmentation`` (n, *spatial)), 2D or 3D; the output has the input's shapes and dtypes.

    :param sample_num: operations drawn without replacement per call (released: 3)
    :param p: probability with which each drawn operation acts (released call: 0.7)
    :param variant: '3d' or '2d' ranges (:data:`SVDA_RANGES`); None: from the number of spatial dims
    :param ops: the pool to draw from (names of :data:`SVDA_OPS`), for tests and ablations
    :param image_only: the data carries no label: a ``segmentation``, if present, is a validity mask,
        moved by the geometric operations with nearest-neighbour sampling (see the module docstring);
        False: it is a label map, resampled per label
    :param seg_fill_value: segmentation value outside the field of view after rotation/zoom
    :param rotation_axes: the rotation is about one of these axes, drawn per call (3D; released: the
        first axis only). Ignored in 2D
    :param ignore_axes: spatial axes that no operation acts along (dummy-2D)
    :param random_order: apply the drawn operations in the order drawn (True) or in the order of ``ops``

    After every call, :attr:`last_ops` lists the drawn operations in the order they were considered,
    :attr:`last_applied` those that acted (passed ``p``), and :attr:`last_params` their parameters.
    """

    def __init__(self, sample_num: int = 3, p: float = 0.7, variant: Optional[str] = None,
                 ops: Optional[Sequence[str]] = None, image_only: bool = False, seg_fill_value: int = 0,
                 rotation_axes: Sequence[int] = (0,), ignore_axes: Optional[Sequence[int]] = None,
                 random_order: bool = True):
        super().__init__()
        self.ops = tuple(SVDA_OPS if ops is None else ops)
        unknown = [o for o in self.ops if o not in SVDA_OPS]
        if unknown or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be distinct names from {SVDA_OPS}, got {ops}")
        if not 0 <= sample_num <= len(self.ops):
            raise ValueError(f"sample_num={sample_num} must be between 0 and the {len(self.ops)} ops")
        if not 0. <= p <= 1.:
            raise ValueError(f"p={p} is not a probability")
        self.sample_num = int(sample_num)
        self.p = float(p)
        self.variant = _variant_of(variant)
        self.image_only = bool(image_only)
        self.seg_fill_value = int(seg_fill_value)
        self.rotation_axes = tuple(int(a) for a in rotation_axes)
        self.ignore_axes = tuple(int(a) for a in (ignore_axes or ()))
        if self.ignore_axes and any(a not in self.ignore_axes for a in self.rotation_axes):
            raise ValueError("with ignore_axes, the rotation must be about an ignored axis (in the other axes' "
                             f"plane): rotation_axes={self.rotation_axes}, ignore_axes={self.ignore_axes}")
        self.random_order = bool(random_order)
        self.last_ops: List[str] = []
        self.last_applied: List[str] = []
        self.last_params: Dict[str, dict] = {}
        # the released v1 intensity transforms, as their batchgeneratorsv2 equivalents, per variant
        self._intensity = {}
        for v, r in SVDA_RANGES.items():
            self._intensity[v] = {
                "brightness": MultiplicativeBrightnessTransform(multiplier_range=r["brightness"],
                                                                synchronize_channels=False, p_per_channel=1),
                "contrast": ContrastTransform(contrast_range=BGContrast(r["contrast"]), preserve_range=True,
                                              synchronize_channels=False, p_per_channel=1),
                "gamma": GammaTransform(gamma=BGContrast(r["gamma"]), p_invert_image=0, synchronize_channels=False,
                                        p_per_channel=1, p_retain_stats=1),
            }

    # -------------------------------------------------------------------------------------------------
    def __call__(self, **data_dict) -> dict:
        img = data_dict["image"]
        ndim = img.ndim - 1
        variant = self.variant or _variant_of(ndim)
        ranges = SVDA_RANGES[variant]
        idx = np.random.choice(len(self.ops), size=self.sample_num, replace=False)
        if not self.random_order:
            idx = np.sort(idx)
        self.last_ops = [self.ops[i] for i in idx]
        self.last_applied, self.last_params = [], {}
        for name in self.last_ops:
            if not np.random.uniform() < self.p:
                continue
            if name in GEOMETRIC_OPS:
                params = self._geometric(data_dict, name, ranges, ndim)
            elif name == "blur":
                params = self._blur(data_dict, ranges["blur"])
            else:
                t = self._intensity[variant][name]
                params = t.get_parameters(**data_dict)
                data_dict = t.apply(data_dict, **params)
            self.last_applied.append(name)
            self.last_params[name] = params
        return data_dict

    def _geometric(self, data_dict: dict, name: str, ranges: dict, ndim: int) -> dict:
        img = data_dict["image"]
        if name == "rotation":
            axis = self.rotation_axes[np.random.randint(len(self.rotation_axes))] if ndim == 3 else None
            angle = float(np.random.uniform(*ranges["rotation"]))
            matrix, params = _rotation_matrix(ndim, axis if axis is not None else 0, angle), \
                {"axis": axis, "angle": angle}
        else:
            s = _batchgenerators_split(*ranges["scale"])
            diag = torch.tensor([1. if a in self.ignore_axes else s for a in range(ndim)], dtype=torch.float64)
            matrix, params = torch.diag(diag), {"scale": s}
            if s == 1.:  # resampling at the voxel centres themselves: the identity
                return params
        grid = _sampling_grid(img.shape[1:], matrix, img.device)
        data_dict["image"] = _resample_image(img, grid)
        seg = data_dict.get("segmentation")
        if seg is not None:
            data_dict["segmentation"] = _resample_mask(seg, grid, self.seg_fill_value) if self.image_only \
                else _resample_labels(seg, grid, self.seg_fill_value)
        return params

    def _blur(self, data_dict: dict, sigma_range: Tuple[float, float]) -> dict:
        img = data_dict["image"]
        sigmas = [float(np.random.uniform(*sigma_range)) for _ in range(img.shape[0])]
        for c, sigma in enumerate(sigmas):
            half = _compute_kernel_size(sigma, truncate=6) // 2
            x = img[c:c + 1]
            for d in range(img.ndim - 1):
                if d not in self.ignore_axes and img.shape[d + 1] > half:
                    x = blur_dimension(x, sigma, d)
            img[c:c + 1] = x
        return {"sigmas": sigmas}

    def __repr__(self):
        return (f"{type(self).__name__}(sample_num={self.sample_num}, p={self.p}, variant={self.variant}, "
                f"ops={self.ops}, image_only={self.image_only}, seg_fill_value={self.seg_fill_value}, "
                f"rotation_axes={self.rotation_axes}, ignore_axes={self.ignore_axes})")


def svda_training_transforms(patch_size: Union[np.ndarray, Tuple[int, ...]], rotation_for_DA: RandomScalar,
                             deep_supervision_scales: Union[List, Tuple, None], mirror_axes: Tuple[int, ...],
                             do_dummy_2d_data_aug: bool, use_mask_for_norm: Optional[List[bool]] = None,
                             is_cascaded: bool = False, foreground_labels: Union[Tuple[int, ...], List[int]] = None,
                             regions: List[Union[List[int], Tuple[int, ...], int]] = None,
                             ignore_label: Optional[int] = None, sample_num: int = 3, p: float = 0.7
                             ) -> ComposeTransforms:
    """Drop-in replacement for nnU-Net 2.8's ``nnUNetTrainer.get_training_transforms`` with A&D's
    augmentation: nnU-Net's ``SpatialTransform`` only crops (no rotation, scaling or elastic deformation;
    dummy-2D handling as nnU-Net's), then :class:`SVDATransform` (ranges of ``len(patch_size)``), no
    mirroring (``mirror_axes`` and ``rotation_for_DA`` are accepted and unused), then nnU-Net's
    bookkeeping exactly as nnU-Net has it."""
    transforms = []
    if do_dummy_2d_data_aug:
        transforms.append(Convert3DTo2DTransform())
        patch_size_spatial = patch_size[1:]
    else:
        patch_size_spatial = patch_size
    transforms.append(SpatialTransform(
        patch_size_spatial, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=0, rotation=rotation_for_DA, p_scaling=0, scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1,
        bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1))
    if do_dummy_2d_data_aug:
        transforms.append(Convert2DTo3DTransform())

    # on 3D data after the dummy-2D round trip: in-plane rotation (about axis 0) and zoom only
    transforms.append(SVDATransform(sample_num=sample_num, p=p, variant=_variant_of(len(patch_size)),
                                    image_only=False, seg_fill_value=-1, rotation_axes=(0,),
                                    ignore_axes=(0,) if do_dummy_2d_data_aug else None))

    if use_mask_for_norm is not None and any(use_mask_for_norm):
        transforms.append(MaskImageTransform(
            apply_to_channels=[i for i in range(len(use_mask_for_norm)) if use_mask_for_norm[i]],
            channel_idx_in_seg=0, set_outside_to=0))
    transforms.append(RemoveLabelTansform(-1, 0))
    if is_cascaded:
        assert foreground_labels is not None, "We need foreground_labels for cascade augmentations"
        transforms.append(MoveSegAsOneHotToDataTransform(source_channel_idx=1, all_labels=foreground_labels,
                                                         remove_channel_from_source=True))
        transforms.append(RandomTransform(ApplyRandomBinaryOperatorTransform(
            channel_idx=list(range(-len(foreground_labels), 0)), strel_size=(1, 8), p_per_label=0.5),
            apply_probability=0.4))
        transforms.append(RandomTransform(RemoveRandomConnectedComponentFromOneHotEncodingTransform(
            channel_idx=list(range(-len(foreground_labels), 0)), fill_with_other_class_p=0,
            dont_do_if_covers_more_than_x_percent=0.15, p_per_label=0.5), apply_probability=0.2))
    if regions is not None:
        # the ignore label must also be converted
        transforms.append(ConvertSegmentationToRegionsTransform(
            regions=list(regions) + [ignore_label] if ignore_label is not None else regions, channel_in_seg=0))
    if deep_supervision_scales is not None:
        transforms.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
    return ComposeTransforms(transforms)


def svda_strong_view_transform(ndim_or_variant: Union[int, str, None] = None, sample_num: int = 3, p: float = 0.7,
                               ignore_axes: Optional[Sequence[int]] = None,
                               ops: Optional[Sequence[str]] = None) -> SVDATransform:
    """The SVDA as the plugin's image-only strong view (``transform(image=tensor)['image']``), e.g. from a
    trainer's ``get_strong_transform(do_dummy_2d)``: ``svda_strong_view_transform(len(patch_size),
    ignore_axes=(0,) if do_dummy_2d else None)``. ``ndim_or_variant``: 2, 3, '2d' or '3d' ranges; None:
    from each image's number of spatial dims. The geometric operations act on the image alone, so the
    view is not pixel-aligned with the weak view (module docstring)."""
    return SVDATransform(sample_num=sample_num, p=p, variant=_variant_of(ndim_or_variant), ops=ops,
                         image_only=True, seg_fill_value=0, rotation_axes=(0,), ignore_axes=ignore_axes)
