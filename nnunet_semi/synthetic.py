"""A small synthetic semi-supervised dataset in the plugin's raw layout, generated on the fly.

Used by the tests, the demo and the benchmark smoke runs: no download needed. Each case is a noisy
MR-like volume with a bright ellipsoid (label 1) that contains a darker core (label 2), random
position and size, a smooth bias field, and per-case intensity scaling. Labels of unlabeled cases are
written to ``labelsWithheld/`` (as a benchmark split would withhold them), test labels to ``labelsTs``.

Two settings (``make_synthetic_dataset(setting=...)``):

- ``"iid"`` (the default): every case drawn the same way (:func:`synthetic_case`). Supervised nnU-Net
  already segments these almost perfectly from a few labeled cases, so unlabeled images add nothing.
- ``"narrow_labeled"``: the labeled cases come from a narrow corner of appearance and size
  (:data:`NARROW`: small, nearly centred ellipsoids, high contrast, little noise, no bias field; one
  "scanner"), the unlabeled and held-out cases from the full range (:data:`FULL`: semi-axes up to 1.8x
  longer, elongated, off-centre, down to a third of the contrast, up to 2.7x the noise, a bias field of up
  to ±45%). The unlabeled images then show what the labeled ones lack. The shift is chosen to lie outside
  what nnU-Net's augmentation covers (its per-image z-score normalisation removes a global intensity
  scale, its scaling stops at 1.4x, it has no bias field) while every case stays segmentable by eye.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnunet_semi.layout import (IMAGES_TR, IMAGES_TS, IMAGES_UNLABELED, LABELS_TR, LABELS_TS, LABELS_WITHHELD,
                                SemiSplit, dataset_folder_name, image_filename, label_filename)


def synthetic_case(rng: np.random.Generator, shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    center = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
    radii = [rng.uniform(0.18 * s, 0.3 * s) for s in shape]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    seg = np.zeros(shape, np.uint8)
    seg[r2 <= 1.0] = 1
    seg[r2 <= 0.3] = 2
    bias = 1.0 + 0.2 * np.sin(grids[-1] / shape[-1] * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, 3))
    img = np.where(seg == 1, 1.0, np.where(seg == 2, 0.6, 0.25)).astype(np.float32)
    img = img * bias * rng.uniform(80, 120) + rng.normal(0, 12, shape)
    return img.astype(np.float32), seg


@dataclass(frozen=True)
class AppearanceRange:
    """Ranges ``(low, high)`` from which :func:`ranged_case` draws each case, uniformly and independently.

    Intensities are in units of the background level (a global scale of 80-120 is applied on top; nnU-Net's
    z-score normalisation removes it)."""
    #: each semi-axis of the ellipsoid, as a fraction of the image side along that axis
    radius: Tuple[float, float]
    #: centre, as a fraction of the side (then clipped so that the ellipsoid stays 1 voxel inside)
    center: Tuple[float, float]
    #: (shell - background) / background
    shell_contrast: Tuple[float, float]
    #: core level between background (0) and shell (1)
    core_level: Tuple[float, float]
    #: standard deviation of the Gaussian noise / background
    noise: Tuple[float, float]
    #: bias field: a multiplicative linear ramp from 1 - bias to 1 + bias along a random direction
    bias: Tuple[float, float]


#: the labeled cases of the "narrow_labeled" setting: one "scanner", small round objects near the centre
NARROW = AppearanceRange(radius=(0.14, 0.2), center=(0.42, 0.58), shell_contrast=(2.6, 3.0), core_level=(0.45, 0.55),
                         noise=(0.08, 0.12), bias=(0.0, 0.05))
#: the unlabeled and held-out cases of the "narrow_labeled" setting (NARROW lies inside it)
FULL = AppearanceRange(radius=(0.14, 0.36), center=(0.3, 0.7), shell_contrast=(0.8, 3.0), core_level=(0.35, 0.65),
                       noise=(0.08, 0.32), bias=(0.0, 0.45))
SETTINGS = ("iid", "narrow_labeled")
#: per-case parameters of the "narrow_labeled" setting, in the raw dataset folder
CASES_FILE = "synthetic_cases.json"


def draw_appearance(rng: np.random.Generator, shape: Sequence[int], r: AppearanceRange) -> Dict[str, object]:
    """One case's parameters drawn from ``r`` (lists per axis for radius, centre and bias direction)."""
    shape = tuple(int(s) for s in shape)
    radius = [float(rng.uniform(*r.radius) * s) for s in shape]
    center = [float(np.clip(rng.uniform(*r.center) * s, rad + 1, s - rad - 1)) for s, rad in zip(shape, radius)]
    direction = rng.normal(size=len(shape))
    return {"radius": radius, "center": center, "shell_contrast": float(rng.uniform(*r.shell_contrast)),
            "core_level": float(rng.uniform(*r.core_level)), "noise": float(rng.uniform(*r.noise)),
            "bias": float(rng.uniform(*r.bias)), "bias_direction": (direction / np.linalg.norm(direction)).tolist(),
            "scale": float(rng.uniform(80, 120))}


def bias_field(shape: Sequence[int], amplitude: float, direction: Sequence[float]) -> np.ndarray:
    """Multiplicative linear ramp along ``direction``, from 1 - amplitude to 1 + amplitude over the image."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, int(s), dtype=np.float32) for s in shape], indexing="ij")
    ramp = sum(g * float(d) for g, d in zip(grids, direction))
    return (1.0 + amplitude * ramp / max(float(np.abs(ramp).max()), 1e-6)).astype(np.float32)


def render_case(rng: np.random.Generator, shape: Sequence[int], p: Dict[str, object]) -> Tuple[np.ndarray, np.ndarray]:
    """Image and label of one case with parameters ``p`` (see :func:`draw_appearance`); noise from ``rng``."""
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, p["center"], p["radius"]))
    seg = np.zeros(shape, np.uint8)
    seg[r2 <= 1.0] = 1
    seg[r2 <= 0.3] = 2
    shell = 1.0 + p["shell_contrast"]
    core = 1.0 + p["core_level"] * p["shell_contrast"]
    img = np.where(seg == 1, shell, np.where(seg == 2, core, 1.0)).astype(np.float32)
    img = img * bias_field(shape, p["bias"], p["bias_direction"]) + rng.normal(0, p["noise"], shape)
    return (img * p["scale"]).astype(np.float32), seg


def ranged_case(rng: np.random.Generator, shape: Sequence[int], r: AppearanceRange):
    """Image, label and parameters of one case drawn from ``r``."""
    p = draw_appearance(rng, shape, r)
    img, seg = render_case(rng, shape, p)
    return img, seg, p


def _write(arr: np.ndarray, path: str, spacing: Sequence[float]) -> None:
    import SimpleITK as sitk
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(s) for s in spacing)[::-1])
    sitk.WriteImage(im, path, useCompression=True)


def make_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "SemiSynthetic",
                           n_labeled: int = 6, n_unlabeled: int = 6, n_test: int = 2,
                           shape: Sequence[int] = (32, 32, 32), spacing: Optional[Sequence[float]] = None,
                           seed: int = 0, withhold_labels: bool = True, setting: str = "iid") -> str:
    """Write ``DatasetXXX_Name`` under ``raw_root``; returns its folder. Arrays are (z, y, x) for 3D and
    (y, x) for 2D shapes; spacing in the same order (default 1).

    ``setting``: ``"iid"`` (every case alike, :func:`synthetic_case`) or ``"narrow_labeled"`` (labeled cases
    from :data:`NARROW`, unlabeled and test cases from :data:`FULL`; each case's parameters are written to
    ``synthetic_cases.json``). Both are deterministic for a seed."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown synthetic setting {setting!r}; choose one of {SETTINGS}")
    rng = np.random.default_rng(seed)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
    folder = os.path.join(raw_root, dataset_folder_name(dataset_id, name))
    for sub in (IMAGES_TR, LABELS_TR, IMAGES_UNLABELED, IMAGES_TS, LABELS_TS) + ((LABELS_WITHHELD,) if withhold_labels else ()):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    fe = ".nii.gz"
    narrow = setting == "narrow_labeled"
    split = SemiSplit(labeled=[], unlabeled=[], test=[], seed=seed,
                      setting=f"{n_labeled} labeled"
                      + (" (narrow range; unlabeled and test: full range)" if narrow else ""),
                      notes="synthetic ellipsoids generated by nnunet_semi.synthetic"
                            + (f" (setting {setting}, see synthetic_cases.json)" if narrow else ""))
    params = {}
    for i in range(n_labeled + n_unlabeled + n_test):
        case = f"case_{i:03d}"
        if narrow:
            img, seg, p = ranged_case(rng, shape, NARROW if i < n_labeled else FULL)
            params[case] = dict(group="labeled" if i < n_labeled else "unlabeled" if i < n_labeled + n_unlabeled
                                else "test", **p)
        else:
            img, seg = synthetic_case(rng, shape)
        if i < n_labeled:
            _write(img, os.path.join(folder, IMAGES_TR, image_filename(case, 0, fe)), spacing)
            _write(seg, os.path.join(folder, LABELS_TR, label_filename(case, fe)), spacing)
            split.labeled.append(case)
        elif i < n_labeled + n_unlabeled:
            _write(img, os.path.join(folder, IMAGES_UNLABELED, image_filename(case, 0, fe)), spacing)
            if withhold_labels:
                _write(seg, os.path.join(folder, LABELS_WITHHELD, label_filename(case, fe)), spacing)
            split.unlabeled.append(case)
        else:
            _write(img, os.path.join(folder, IMAGES_TS, image_filename(case, 0, fe)), spacing)
            _write(seg, os.path.join(folder, LABELS_TS, label_filename(case, fe)), spacing)
            split.test.append(case)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "shell": 1, "core": 2},
                   "numTraining": n_labeled, "file_ending": fe, "name": name,
                   "description": "synthetic semi-supervised toy dataset (nnunet_semi.synthetic)"}, f, indent=2)
    split.save(folder)
    if narrow:
        with open(os.path.join(folder, CASES_FILE), "w") as f:
            ranges = {"labeled": asdict(NARROW), "unlabeled": asdict(FULL), "test": asdict(FULL)}
            json.dump({"setting": setting, "seed": seed, "ranges": ranges, "cases": params}, f, indent=1)
    return folder
