"""Domain-shift generator: an already converted raw dataset of this plugin -> a NEW raw dataset with a
second, synthetic "scanner", for unsupervised domain adaptation (UDA) and semi-supervised domain
generalisation (SemiDG) on real images.

Why: A&D (GenericSSL: one framework for SSL, UDA and SemiDG) evaluates UDA on MM-WHS CT<->MR and
SemiDG on the M&Ms vendors. Those datasets are not available here, so this command makes a cross-domain
setting from a dataset that is: the labeled cases stay as they are (the source domain) and the other
cases get a documented, seeded appearance and resolution shift (the target domain, "shifted"). Methods
that use ``case_metadata.json`` domains, and the benchmark's ``--eval-domain``, then run end to end.

Command line::

    nnUNetv2_semi_domain_shift -i $nnUNet_raw/Dataset104_Hippocampus -o 106 --name HippocampusShift
    nnUNetv2_semi_domain_shift -i 104 -o 106                     # id or DatasetXXX_Name in $nnUNet_raw

``-i`` is the input dataset folder (or its id / ``DatasetXXX_Name`` in ``$nnUNet_raw``); it must have the
plugin's ``dataset.json`` and ``splits_semi.json`` (made by an ``nnUNetv2_semi_convert_*`` command) and is
only read. ``-o`` (alias ``-d``) is the new dataset id, ``--name`` its name (default: the input's name +
``Shift``), ``--output-root`` the folder receiving ``DatasetXXX_Name/`` (default ``$nnUNet_raw``, else the
folder holding the input). An existing target (or another folder with that id) is refused and nothing is
written; ``--overwrite`` replaces it once the new dataset is complete (never the input). Everything is
written into a hidden ``.DatasetXXX_Name.partial-*`` folder that is moved into place only at the end.

What goes where (``--setting uda``, the default)::

    input split group   new dataset                                   domain    case id
    labeled             imagesTr/labelsTr, unchanged copy              source    CASE
    unlabeled           imagesUnlabeled, shifted (withheld label, if   shifted   CASE
                        the input has one, shifted into labelsWithheld)
    val / test          imagesTs/labelsTs, shifted, same group         shifted   CASE
    val / test          imagesTs/labelsTs, unchanged copy, same group  source    CASE_src

The unchanged held-out copies (``--source-suffix``, default ``_src``; ``--no-source-heldout`` leaves them
out) let one model be evaluated on both domains (``run_benchmark.py --eval-domain source`` / ``target``).
``--setting semidg``: the unlabeled cases stay unchanged source-domain images, so the shifted domain is
unseen in training (domain generalisation); everything else as above.

The shift (``--seed``, default 0; every part deterministic for a seed). Per image channel, in order:

1. normalise: intensities between the image's 0.5th and 99.5th percentile -> [0, 1] (clipped);
2. intensity remapping through a smooth curve (PCHIP through ``--curve-points`` 4 random interior
   control points on a uniform grid, drawn once per channel from the seed: one "scanner" contrast for
   every case). ``--curve monotone`` (default): random increments, ``(1 - s) / (K + 1) + s * Dirichlet(1)``
   with ``--curve-strength`` s = 0.8 (0: linear); ``non-monotone``: control values ``(1 - s) x + s U(0, 1)``;
   ``none``: linear. ``--invert`` (default; ``--no-invert`` off) then maps y -> 1 - y: the contrast is
   inverted, as between MR T1 and T2;
3. smooth multiplicative bias field, drawn per case: ``(1 + a) ** f`` with f a random combination of the
   3D Legendre polynomials of total degree 1..``--bias-order`` (2) over the image, scaled to max |f| = 1,
   ``--bias-amplitude`` a = 0.4 (field between 1/1.4 and 1.4; 0 switches it off);
4. resolution: resampled to the spacing times ``--spacing-factor`` (x y z, default ``1 1 2``: slices twice
   as thick) or to ``--spacing`` X Y Z mm, on a grid with the same centre and field of view. Along an axis
   whose spacing grows by r the image is first smoothed with a Gaussian of sigma sqrt(r^2 - 1) / sqrt(12)
   voxels (a slice profile r voxels wide), then resampled linearly; the label is resampled with nearest
   neighbour on the same grid (no smoothing), so image and label stay aligned. The new spacing, and the
   origin of the new grid, are written in the image and label headers (nnU-Net reads them);
5. noise, drawn per case: ``--noise rician`` (default; magnitude of complex Gaussian noise, as in MR
   magnitude images) or ``gaussian`` or ``none``, standard deviation ``--noise-level`` 0.05 of the
   normalised range;
6. back to the original intensity range (the two percentiles), written as float32.

Strength of the defaults, measured on MSD Hippocampus (208 cases, 8 labeled, 42 test): the voxelwise correlation
between a test image and its shifted copy (resampled back) is r = -0.82 +- 0.03. A small 3D U-Net trained on 48
source cases with nnU-Net-like intensity augmentation reached a mean foreground Dice of 76.5% on the unchanged
test cases and 1.3% on the shifted ones (without ``--invert``: 51.1%; the curve alone: 67.5%; the resolution and
noise alone: 72.1%), each shifted prediction made on the image resampled back to the source grid.

Labels are never changed other than by the nearest-neighbour resampling; a label value that resampling
loses is reported (``note CASE: ...``). Random streams: ``numpy.random.default_rng([seed, part, key])``,
part 0 for the curve (key = channel), 1 for the bias field and 2 for the noise (key = CRC32 of the input
case id), so a case's shift does not depend on which other cases are converted.

Written beside the images: ``dataset.json`` (the input's channels, labels and file ending), ``splits_semi.json``
(:class:`~nnunet_semi.layout.SemiSplit`: the groups above) and ``case_metadata.json``
(:class:`~nnunet_semi.layout.CaseMetadata`: ``target_domain`` "shifted", ``source_domains`` ["source"], every
case's ``domain``, ``origin_dataset`` (the input case's own, else the input folder name) and, under
``extra``, ``original_case`` (and ``original_domain`` where the input had one); the parameters, the curves'
control points and the input folder under the file's top-level ``extra.domain_shift``).

Channel names are kept: with nnU-Net's ``CT`` normalisation the shifted images are clipped with the source
domain's intensity statistics (as they would be in a real CT->other-scanner setting); MR-like channels
(z-score per image) are not affected by that.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import zlib
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_semi.conversion.common import ConversionError, RawDatasetWriter, read_sitk, run_main
from nnunet_semi.layout import (CASE_METADATA_FILE, IMAGES_TR, IMAGES_TS, IMAGES_UNLABELED, LABELS_TR, LABELS_TS,
                                LABELS_WITHHELD, SPLIT_FILE, LayoutError, SemiSplit, dataset_folder_name,
                                find_image_cases, label_filename, load_case_metadata, read_json)

SOURCE_DOMAIN = "source"
TARGET_DOMAIN = "shifted"
DEFAULT_SOURCE_SUFFIX = "_src"
SETTINGS = ("uda", "semidg")
CURVES = ("monotone", "non-monotone", "none")
NOISES = ("rician", "gaussian", "none")
#: percentiles of an image that are mapped to 0 and 1 before the remapping (and back after it)
PERCENTILES = (0.5, 99.5)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DATASET_RE = re.compile(r"^Dataset(\d+)_(.+)$")
#: dataset.json entries of the input that the new dataset.json keeps (and its licence)
_KEPT_DATASET_JSON = ("reference", "release", "regions_class_order", "overwrite_image_reader_writer")


# --------------------------------------------------------------------------------------------
# the shift
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShiftParameters:
    """The shift (defaults: the command's, see the module docstring). ``spacing_factor`` and ``spacing`` are
    (x, y, z); ``spacing`` (mm), when given, replaces ``spacing_factor``."""
    seed: int = 0
    curve: str = "monotone"
    curve_points: int = 4
    curve_strength: float = 0.8
    invert: bool = True
    bias_amplitude: float = 0.4
    bias_order: int = 2
    spacing_factor: Tuple[float, float, float] = (1.0, 1.0, 2.0)
    spacing: Optional[Tuple[float, float, float]] = None
    noise: str = "rician"
    noise_level: float = 0.05

    def __post_init__(self):
        """A bad value raises ValueError naming the command-line option."""
        if int(self.seed) < 0:
            raise ValueError(f"--seed must be >= 0, not {self.seed}")
        if self.curve not in CURVES:
            raise ValueError(f"--curve must be one of {CURVES}, not {self.curve!r}")
        if int(self.curve_points) < 1:
            raise ValueError(f"--curve-points must be >= 1, not {self.curve_points}")
        if not 0.0 <= float(self.curve_strength) <= 1.0:
            raise ValueError(f"--curve-strength must be in [0, 1], not {self.curve_strength}")
        if float(self.bias_amplitude) < 0:
            raise ValueError(f"--bias-amplitude must be >= 0, not {self.bias_amplitude}")
        if int(self.bias_order) < 1:
            raise ValueError(f"--bias-order must be >= 1, not {self.bias_order}")
        for option, value in (("--spacing-factor", self.spacing_factor), ("--spacing", self.spacing)):
            if value is not None and (len(value) != 3 or not all(float(v) > 0 for v in value)):
                raise ValueError(f"{option} needs three positive numbers (x y z), not {list(value)}")
        if self.noise not in NOISES:
            raise ValueError(f"--noise must be one of {NOISES}, not {self.noise!r}")
        if float(self.noise_level) < 0:
            raise ValueError(f"--noise-level must be >= 0, not {self.noise_level}")

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("spacing_factor", "spacing"):
            d[k] = None if d[k] is None else [float(v) for v in d[k]]
        return d


def _rng(seed: int, part: int, key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(part), int(key)])


def case_key(case: str) -> int:
    """The random-stream key of an input case id (CRC32 of its UTF-8 bytes)."""
    return zlib.crc32(case.encode("utf-8"))


def intensity_curve(params: ShiftParameters, channel: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """The control points ``(x, y)`` on [0, 1] of a channel's intensity remapping (see the module docstring)."""
    k = int(params.curve_points)
    s = float(params.curve_strength)
    x = np.linspace(0.0, 1.0, k + 2)
    rng = _rng(params.seed, 0, channel)
    if params.curve == "monotone":
        steps = (1.0 - s) / (k + 1) + s * rng.dirichlet(np.ones(k + 1))
        y = np.concatenate([[0.0], np.cumsum(steps)])
        y[-1] = 1.0
    elif params.curve == "non-monotone":
        y = (1.0 - s) * x + s * rng.uniform(0.0, 1.0, k + 2)
    else:
        y = x.copy()
    if params.invert:
        y = 1.0 - y
    return x, y


def apply_curve(u: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``u`` (in [0, 1]) through the PCHIP curve of the control points (no overshoot: monotone pieces stay monotone)."""
    from scipy.interpolate import PchipInterpolator
    return PchipInterpolator(x, y)(np.clip(u, 0.0, 1.0))


def bias_field(shape: Sequence[int], rng: np.random.Generator, amplitude: float, order: int) -> Optional[np.ndarray]:
    """A smooth multiplicative field on an array of ``shape``: ``(1 + amplitude) ** f``, f a random combination
    (standard normal coefficients) of the Legendre polynomial products of total degree 1..order over [-1, 1]
    per axis, scaled to max |f| = 1. None when ``amplitude`` is 0."""
    if amplitude <= 0:
        return None
    basis = [np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1), order)
             for n in shape]
    f = np.zeros(tuple(shape))
    for degrees in itertools.product(range(order + 1), repeat=len(shape)):
        if not 0 < sum(degrees) <= order:
            continue
        term = rng.standard_normal()
        for axis, d in enumerate(degrees):
            view = [1] * len(shape)
            view[axis] = shape[axis]
            term = term * basis[axis][:, d].reshape(view)
        f = f + term
    peak = np.abs(f).max()
    if peak == 0:
        return None
    return np.exp(np.log1p(amplitude) * f / peak)


def target_grid(image: sitk.Image, params: ShiftParameters) -> Tuple[tuple, tuple, tuple]:
    """``(size, spacing, origin)`` of the shifted grid: the new spacing, the same centre and field of view."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    size = np.asarray(image.GetSize(), dtype=float)
    if params.spacing is not None:
        new_spacing = np.asarray(params.spacing, dtype=float)
    else:
        new_spacing = spacing * np.asarray(params.spacing_factor, dtype=float)
    new_size = np.maximum(1, np.round(size * spacing / new_spacing)).astype(int)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    centre = np.asarray(image.GetOrigin(), dtype=float) + direction @ ((size - 1) / 2 * spacing)
    new_origin = centre - direction @ ((new_size - 1) / 2 * new_spacing)
    return tuple(int(v) for v in new_size), tuple(float(v) for v in new_spacing), tuple(float(v) for v in new_origin)


def _resample(image: sitk.Image, grid, interpolator, pixel_id) -> sitk.Image:
    size, spacing, origin = grid
    f = sitk.ResampleImageFilter()
    f.SetSize(size)
    f.SetOutputSpacing(spacing)
    f.SetOutputOrigin(origin)
    f.SetOutputDirection(image.GetDirection())
    f.SetInterpolator(interpolator)
    f.SetOutputPixelType(pixel_id)
    f.SetDefaultPixelValue(0)
    f.SetUseNearestNeighborExtrapolator(True)  # an upsampled grid reaches half a voxel past the outer centres
    return f.Execute(image)


def robust_range(arr: np.ndarray, case: str, path: str) -> Tuple[float, float]:
    """The image's :data:`PERCENTILES` (its min and max where they coincide)."""
    lo, hi = (float(v) for v in np.percentile(arr, PERCENTILES))
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise ConversionError(f"case {case}: {path} has one value everywhere; a blank image cannot be shifted.")
    return lo, hi


def shift_case(case: str, images: Sequence[sitk.Image], label: Optional[sitk.Image], params: ShiftParameters,
               paths: Optional[Sequence[str]] = None) -> Tuple[List[sitk.Image], Optional[sitk.Image]]:
    """The shifted channels (float32) and label (nearest neighbour, its pixel type kept) of one case. ``case``
    is the input case id (it keys the bias field and the noise); ``paths`` name the channel files in errors."""
    ref = images[0]
    if ref.GetDimension() != 3:
        raise ConversionError(f"case {case}: {paths[0] if paths else 'the image'} is {ref.GetDimension()}D; the "
                              f"domain shift needs 3D volumes.")
    grid = target_grid(ref, params)
    ratio = np.asarray(grid[1]) / np.asarray(ref.GetSpacing(), dtype=float)
    sigma_zyx = [float(np.sqrt(max(r * r - 1.0, 0.0) / 12.0)) for r in ratio[::-1]]
    key = case_key(case)
    shape_zyx = sitk.GetArrayViewFromImage(ref).shape
    bias = bias_field(shape_zyx, _rng(params.seed, 1, key), float(params.bias_amplitude), int(params.bias_order))
    noise_rng = _rng(params.seed, 2, key)
    out = []
    for c, im in enumerate(images):
        arr = sitk.GetArrayFromImage(im).astype(np.float64)
        lo, hi = robust_range(arr, case, paths[c] if paths else f"image channel {c}")
        v = apply_curve((arr - lo) / (hi - lo), *intensity_curve(params, c))
        if bias is not None:
            v = v * bias
        if any(s > 0 for s in sigma_zyx):
            from scipy.ndimage import gaussian_filter
            v = gaussian_filter(v, sigma_zyx, mode="nearest")
        smooth = sitk.GetImageFromArray(v.astype(np.float32))
        smooth.CopyInformation(im)
        resampled = _resample(smooth, grid, sitk.sitkLinear, sitk.sitkFloat32)
        w = sitk.GetArrayFromImage(resampled).astype(np.float64)
        sd = float(params.noise_level)
        if params.noise == "gaussian" and sd > 0:
            w = w + sd * noise_rng.standard_normal(w.shape)
        elif params.noise == "rician" and sd > 0:
            real, imag = sd * noise_rng.standard_normal(w.shape), sd * noise_rng.standard_normal(w.shape)
            w = np.sqrt((w + real) ** 2 + imag ** 2)
        shifted = sitk.GetImageFromArray((lo + w * (hi - lo)).astype(np.float32))
        shifted.CopyInformation(resampled)
        out.append(shifted)
    lab = None if label is None else _resample(label, grid, sitk.sitkNearestNeighbor, label.GetPixelID())
    return out, lab


# --------------------------------------------------------------------------------------------
# the input dataset
# --------------------------------------------------------------------------------------------
def resolve_input(value: str) -> str:
    """The input dataset folder: ``value`` itself when it is a folder, else a dataset id or ``DatasetXXX_Name``
    looked up in ``$nnUNet_raw``."""
    if os.path.isdir(value):
        return os.path.abspath(value)
    raw = os.environ.get("nnUNet_raw")
    name = os.path.basename(os.path.normpath(value))
    if raw and (value.isdigit() or _DATASET_RE.match(name)):
        if value.isdigit():
            prefix = f"Dataset{int(value):03d}_"
            found = sorted(d for d in os.listdir(raw) if d.startswith(prefix) and os.path.isdir(os.path.join(raw, d))) \
                if os.path.isdir(raw) else []
            if len(found) == 1:
                return os.path.join(raw, found[0])
            if len(found) > 1:
                raise ConversionError(f"{raw} has several folders for dataset id {int(value)}: {found}; pass the "
                                      f"folder itself with -i.")
            raise ConversionError(f"no {prefix}* folder in {raw} ($nnUNet_raw). Convert the dataset first (e.g. "
                                  f"nnUNetv2_semi_convert_hippocampus -d {int(value)}) or pass its folder with -i.")
        if os.path.isdir(os.path.join(raw, name)):
            return os.path.join(raw, name)
    raise ConversionError(f"{value} does not exist" + (f" (nor {os.path.join(raw, name)})" if raw else "")
                          + ". Pass the folder of a dataset converted by an nnUNetv2_semi_convert_* command (e.g. "
                            "$nnUNet_raw/Dataset104_Hippocampus) or its id with $nnUNet_raw set.")


@dataclass
class InputCase:
    case: str
    group: str                 # the input split's group
    images: List[str]          # channel files
    label: Optional[str]       # None: no label on disk


def read_input(folder: str) -> Tuple[dict, SemiSplit, Optional[object], List[InputCase]]:
    """``(dataset.json, split, case metadata or None, cases in split order)`` of a plugin raw dataset; anything
    missing or inconsistent is a ConversionError naming the file and the fix."""
    dj_path = os.path.join(folder, "dataset.json")
    split_path = os.path.join(folder, SPLIT_FILE)
    try:
        dj = read_json(dj_path)
        if dj is None:
            raise ConversionError(f"{dj_path} does not exist: {folder} is not an nnU-Net raw dataset. Point -i at a "
                                  f"dataset converted by an nnUNetv2_semi_convert_* command.")
        for key in ("channel_names", "labels", "file_ending"):
            if key not in dj:
                raise ConversionError(f"{dj_path}: no '{key}' entry; rewrite dataset.json as nnU-Net's "
                                      f"generate_dataset_json writes it (or convert the dataset again).")
        split = SemiSplit.load(folder)
        if split is None:
            raise ConversionError(f"{split_path} does not exist: {folder} is not a dataset of this plugin (no "
                                  f"semi-supervised split). Convert it with an nnUNetv2_semi_convert_* command (e.g. "
                                  f"nnUNetv2_semi_convert_hippocampus) and pass that folder.")
        metadata = load_case_metadata(folder)
        fe, nch = dj["file_ending"], len(dj["channel_names"])
        found = {IMAGES_TR: find_image_cases(os.path.join(folder, IMAGES_TR), fe, nch),
                 IMAGES_UNLABELED: find_image_cases(os.path.join(folder, IMAGES_UNLABELED), fe, nch),
                 IMAGES_TS: find_image_cases(os.path.join(folder, IMAGES_TS), fe, nch)}
    except LayoutError as e:
        raise ConversionError(str(e)) from e
    where = {"labeled": (IMAGES_TR, LABELS_TR), "unlabeled": (IMAGES_UNLABELED, LABELS_WITHHELD),
             "val": (IMAGES_TS, LABELS_TS), "test": (IMAGES_TS, LABELS_TS)}
    cases = []
    for group in ("labeled", "unlabeled", "val", "test"):
        img_dir, lab_dir = where[group]
        for case in getattr(split, group):
            if case not in found[img_dir]:
                raise ConversionError(f"{split_path} lists {group} case '{case}' but "
                                      f"{os.path.join(folder, img_dir)} has no image of it. Convert the dataset "
                                      f"again, or fix the split.")
            lab = os.path.join(folder, lab_dir, label_filename(case, fe))
            if group == "labeled" and not os.path.isfile(lab):
                raise ConversionError(f"labeled case '{case}' of {split_path} has no label {lab}. Convert the "
                                      f"dataset again, or fix the split.")
            cases.append(InputCase(case, group, found[img_dir][case], lab if os.path.isfile(lab) else None))
    if not split.labeled:
        raise ConversionError(f"{split_path} lists no labeled case: the source domain would be empty.")
    return dj, split, metadata, cases


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = ShiftParameters()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True,
                   help="input raw dataset of this plugin: its folder, or its id / DatasetXXX_Name in $nnUNet_raw")
    p.add_argument("-o", "--output-id", "-d", "--dataset-id", dest="output_id", type=int, required=True,
                   help="id of the new dataset")
    p.add_argument("--name", default=None, help="name of the new dataset (default: the input's name + 'Shift')")
    p.add_argument("--output-root", default=None,
                   help="folder receiving DatasetXXX_Name/ (default: $nnUNet_raw, else the folder holding the input)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing target dataset once the new one is complete (default: refuse)")
    p.add_argument("--setting", choices=SETTINGS, default="uda",
                   help="uda (default): the unlabeled cases are shifted (target-domain unlabeled images); semidg: "
                        "they stay unchanged source-domain images, the shifted domain is unseen in training")
    p.add_argument("--source-heldout", action=argparse.BooleanOptionalAction, default=True,
                   help="also keep the unchanged held-out cases as source-domain cases named CASE<suffix> (default on)")
    p.add_argument("--source-suffix", default=DEFAULT_SOURCE_SUFFIX,
                   help=f"case-id suffix of the unchanged held-out copies (default {DEFAULT_SOURCE_SUFFIX})")
    g = p.add_argument_group("the shift")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})")
    g.add_argument("--curve", choices=CURVES, default=d.curve, help=f"intensity remapping (default {d.curve})")
    g.add_argument("--curve-points", type=int, default=d.curve_points,
                   help=f"interior control points of the curve (default {d.curve_points})")
    g.add_argument("--curve-strength", type=float, default=d.curve_strength,
                   help=f"0 = linear .. 1 = fully random control values (default {d.curve_strength})")
    g.add_argument("--invert", action=argparse.BooleanOptionalAction, default=d.invert,
                   help="invert the contrast after the curve, y -> 1 - y (default on)")
    g.add_argument("--bias-amplitude", type=float, default=d.bias_amplitude,
                   help=f"bias field between 1/(1+a) and 1+a; 0 = none (default {d.bias_amplitude})")
    g.add_argument("--bias-order", type=int, default=d.bias_order,
                   help=f"highest total degree of the bias field's polynomials (default {d.bias_order})")
    r = g.add_mutually_exclusive_group()
    r.add_argument("--spacing-factor", type=float, nargs=3, metavar=("FX", "FY", "FZ"), default=list(d.spacing_factor),
                   help="new spacing = input spacing x these factors (x y z; default 1 1 2)")
    r.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), default=None,
                   help="new spacing in mm (x y z), instead of --spacing-factor")
    g.add_argument("--noise", choices=NOISES, default=d.noise, help=f"noise model (default {d.noise})")
    g.add_argument("--noise-level", type=float, default=d.noise_level,
                   help=f"noise standard deviation, fraction of the normalised range (default {d.noise_level})")
    return p


def _check_target(out_root: str, dataset_id: int, name: str, input_folder: str, overwrite: bool) -> str:
    target = os.path.join(out_root, dataset_folder_name(dataset_id, name))
    if os.path.abspath(target) == os.path.abspath(input_folder):
        raise ConversionError(f"{target} is the input dataset; the shifted dataset needs a new id (-o) and name.")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ConversionError(f"{target} exists and is not a folder; nothing was written. Remove it or choose "
                              f"another -o/--output-id or --name.")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise ConversionError(f"{target} exists and is not empty; nothing was written. Choose another -o/--output-id "
                              f"or --name, delete that folder, or pass --overwrite to replace it.")
    if os.path.isdir(out_root):
        prefix = f"Dataset{int(dataset_id):03d}_"
        clash = sorted(d for d in os.listdir(out_root) if d.startswith(prefix) and d != os.path.basename(target))
        if clash:
            raise ConversionError(f"{os.path.join(out_root, clash[0])} already uses dataset id {int(dataset_id)}; "
                                  f"nnU-Net needs unique ids, nothing was written. Pass another -o/--output-id.")
    return target


def generate(argv: Optional[Sequence[str]] = None) -> str:
    """Write the shifted dataset (see the module docstring); returns its folder."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    try:
        params = ShiftParameters(seed=args.seed, curve=args.curve, curve_points=args.curve_points,
                                 curve_strength=args.curve_strength, invert=args.invert,
                                 bias_amplitude=args.bias_amplitude, bias_order=args.bias_order,
                                 spacing_factor=tuple(args.spacing_factor), noise=args.noise,
                                 noise_level=args.noise_level,
                                 spacing=tuple(args.spacing) if args.spacing is not None else None)
    except ValueError as e:
        parser.error(str(e))
    if args.output_id < 1:
        parser.error(f"-o/--output-id must be a positive dataset id, not {args.output_id}")
    suffix = args.source_suffix
    if not suffix or not _NAME_RE.match("x" + suffix) or re.search(r"_\d{4}$", suffix):
        parser.error(f"--source-suffix {suffix!r}: use letters, digits, '_', '.', '-' (not '_' + four "
                     f"digits, nnU-Net's channel suffix)")
    src = resolve_input(args.input)
    m = _DATASET_RE.match(os.path.basename(src))
    in_name = m.group(2) if m else os.path.basename(src)
    name = args.name or f"{in_name}Shift"
    if not _NAME_RE.match(name):
        parser.error(f"--name {name!r}: use letters, digits, '_', '.', '-' only")
    out_root = os.path.abspath(args.output_root or os.environ.get("nnUNet_raw") or os.path.dirname(src))
    target = _check_target(out_root, args.output_id, name, src, args.overwrite)
    dj, split_in, md_in, cases = read_input(src)
    fe = dj["file_ending"]
    source_heldout = args.source_heldout
    shift_groups = {"unlabeled", "val", "test"} if args.setting == "uda" else {"val", "test"}

    # (new case, group, domain, input case)
    plan: List[Tuple[str, str, str, InputCase]] = []
    for ic in cases:
        if ic.group in shift_groups:
            plan.append((ic.case, ic.group, TARGET_DOMAIN, ic))
        else:
            plan.append((ic.case, ic.group, SOURCE_DOMAIN, ic))
    if source_heldout:
        plan += [(ic.case + suffix, ic.group, SOURCE_DOMAIN, ic) for ic in cases
                 if ic.group in ("val", "test")]
    names = [p[0] for p in plan]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConversionError(f"case id(s) {dup[:5]} would be written twice: the input already has cases named like "
                              f"the unchanged held-out copies (CASE{suffix}). Pass another --source-suffix "
                              f"or --no-source-heldout.")
    counts = {(g, dm): sum(1 for _, gg, dd, _ in plan if gg == g and dd == dm)
              for g in ("labeled", "unlabeled", "val", "test") for dm in (SOURCE_DOMAIN, TARGET_DOMAIN)}
    print(f"input {src}: {len(split_in.labeled)} labeled, {len(split_in.unlabeled)} unlabeled, {len(split_in.val)} "
          f"val, {len(split_in.test)} test case(s) -> {target} (setting {args.setting})")
    grid_text = (f"spacing {list(params.spacing)} mm" if params.spacing is not None
                 else f"spacing x {list(params.spacing_factor)}")
    print(f"shift (seed {params.seed}): curve {params.curve} ({params.curve_points} points, strength "
          f"{params.curve_strength}{', inverted' if params.invert else ''}), bias field amplitude "
          f"{params.bias_amplitude} (order {params.bias_order}), {grid_text}, noise {params.noise} {params.noise_level}")

    description = (f"{in_name} with a synthetic domain shift (nnunet_semi.conversion.domain_shift, setting "
                   f"{args.setting}, seed {params.seed}): domain '{SOURCE_DOMAIN}' = the input's cases unchanged, "
                   f"domain '{TARGET_DOMAIN}' = shifted copies; per-case domains in {CASE_METADATA_FILE}")
    kept = {k: dj[k] for k in _KEPT_DATASET_JSON if dj.get(k) is not None}
    kept["license"] = dj.get("licence") or dj.get("license") or "see the input dataset's licence"
    with RawDatasetWriter(out_root, args.output_id, name, {int(k): v for k, v in dj["channel_names"].items()},
                          dj["labels"], file_ending=fe, overwrite=args.overwrite, description=description,
                          converted_by="nnunet_semi.conversion.domain_shift", **kept) as writer:
        for new_case, group, domain, ic in writer.progress(plan, desc=f"domain shift -> {os.path.basename(target)}"):
            images = [read_sitk(p, ic.case) for p in ic.images]
            label = read_sitk(ic.label, ic.case, label=True) if ic.label is not None else None
            if domain == TARGET_DOMAIN:
                images, shifted_label = shift_case(ic.case, images, label, params, ic.images)
                if label is not None:
                    before = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
                    after = set(np.unique(sitk.GetArrayViewFromImage(shifted_label)).tolist())
                    if before - after:
                        writer.report_note(new_case, f"label value(s) {sorted(before - after)} of {ic.label} vanished "
                                                     f"in the resampling to spacing {images[0].GetSpacing()}")
                label = shifted_label
            writer.add_case(new_case, group, list(images), label)
            old = md_in.get(ic.case) if md_in is not None else {}
            extra = dict(old.get("extra", {}), original_case=ic.case)
            if old.get("domain") is not None:
                extra["original_domain"] = old["domain"]
            writer.metadata.set(new_case, domain=domain, vendor=old.get("vendor"), centre=old.get("centre"),
                                task=old.get("task"), extra=extra,
                                origin_dataset=old.get("origin_dataset") or os.path.basename(src))
        writer.metadata.target_domain, writer.metadata.source_domains = TARGET_DOMAIN, [SOURCE_DOMAIN]
        writer.metadata.extra = {"domain_shift": {
            "input_dataset": src, "setting": args.setting, "parameters": params.to_json(),
            "curves": {str(c): [v.tolist() for v in intensity_curve(params, c)]
                       for c in range(len(dj["channel_names"]))},
            "percentiles": list(PERCENTILES), "source_heldout_suffix": suffix if source_heldout else None}}
        unlabeled_text = (f"shifted (domain {TARGET_DOMAIN})" if "unlabeled" in shift_groups
                          else f"unchanged (domain {SOURCE_DOMAIN})")
        copies_text = f" and unchanged as CASE{suffix} (domain {SOURCE_DOMAIN}), same group" if source_heldout else ""
        split = SemiSplit(
            **{g: [n for n, gg, _, _ in plan if gg == g] for g in ("labeled", "unlabeled", "val", "test")},
            setting=f"{split_in.setting or os.path.basename(src)}, {args.setting} {SOURCE_DOMAIN}->{TARGET_DOMAIN}",
            seed=params.seed,
            notes=f"domain shift of {os.path.basename(src)} (nnunet_semi.conversion.domain_shift, setting "
                  f"{args.setting}): labeled = the input's labeled cases unchanged (domain {SOURCE_DOMAIN}); "
                  f"unlabeled = the input's unlabeled cases, {unlabeled_text}; val/test = the input's held-out cases "
                  f"shifted (domain {TARGET_DOMAIN}){copies_text}. Per-case domains and the shift's parameters: "
                  f"{CASE_METADATA_FILE}. Input split: {split_in.setting or '-'} (seed {split_in.seed}).")
        folder = writer.finish(split, None)
    print("  domains: " + "; ".join(f"{g} {counts[(g, SOURCE_DOMAIN)]} {SOURCE_DOMAIN} + {counts[(g, TARGET_DOMAIN)]} "
                                    f"{TARGET_DOMAIN}" for g in ("labeled", "unlabeled", "val", "test")))
    return folder


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point (``nnUNetv2_semi_domain_shift``): exits with 0, or 1 after one 'error: ...' line."""
    raise SystemExit(run_main(generate, argv))


if __name__ == "__main__":
    main()
