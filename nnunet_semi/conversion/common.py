"""Shared machinery of the dataset converters (``nnunet_semi.conversion.<dataset>``).

Every converter reads one public dataset layout and writes one semi-supervised raw dataset in the
layout of :mod:`nnunet_semi.layout` (described there) with :class:`RawDatasetWriter`; bad input or a
refused operation is a :class:`ConversionError` naming the case / file and the fix.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from nnunet_semi.image_checks import ImageFileError, check_voxels, read_image
from nnunet_semi.layout import (IMAGES_TR, IMAGES_TS, IMAGES_UNLABELED, LABELS_TR, LABELS_TS,
                                LABELS_WITHHELD, CaseMetadata, LayoutError, SemiSplit, dataset_folder_name,
                                image_filename, label_filename, save_standard_split)

ArrayOrImage = Union[np.ndarray, sitk.Image]
#: the groups of a SemiSplit, in the order converters write them
SPLIT_GROUPS = ("labeled", "unlabeled", "val", "test")


class ConversionError(RuntimeError):
    """Bad input to a converter. The message names the case / file and what to do."""


def _say(msg: str) -> None:
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(msg)
    sys.stdout.flush()


def check_image_voxels(arr, case: str, path: str) -> None:
    """:func:`~nnunet_semi.image_checks.check_voxels` (NaN/inf voxels, a constant image) of an input
    image read from ``path``, as a ConversionError naming the case and the file."""
    try:
        check_voxels(arr, path)
    except ImageFileError as e:
        raise ConversionError(f"case {case}: {e}") from e


def read_sitk(path: str, case: str, label: bool = False) -> sitk.Image:
    """Read an image with SimpleITK, the file once; an unreadable, truncated or corrupt file and, for an
    image (not ``label``), NaN/inf voxels or a constant image raise ConversionError naming case and file."""
    if not os.path.isfile(path):
        raise ConversionError(f"case {case}: file {path} does not exist.")
    try:
        return read_image(path, check=not label)
    except ImageFileError as e:
        raise ConversionError(f"case {case}: {e}") from e
    except Exception as e:  # SimpleITK raises RuntimeError with a long C++ message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"case {case}: cannot read {path} ({first}). Is the file complete?") from e


def as_label_array(arr: np.ndarray, case: str, where: str = "label") -> np.ndarray:
    """Integral check + cast to uint8 (uint16 if values exceed 255). Raises naming the case."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ConversionError(f"case {case}: {where} contains NaN/inf values.")
        if not np.all(arr == np.round(arr)):
            bad = arr[arr != np.round(arr)]
            raise ConversionError(f"case {case}: {where} is stored as {arr.dtype} with non-integral values "
                                  f"(e.g. {bad.flat[0]!r}); a label map must hold class indices.")
    elif arr.dtype.kind not in "iu":
        raise ConversionError(f"case {case}: {where} has unsupported dtype {arr.dtype}.")
    if arr.size and (arr.min() < 0):
        raise ConversionError(f"case {case}: {where} has negative values (min {arr.min()}).")
    mx = arr.max() if arr.size else 0
    return arr.astype(np.uint8 if mx <= 255 else np.uint16)


def read_list(path: str) -> List[str]:
    """The non-empty, stripped lines of a list file."""
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def restrict_split(split: SemiSplit, present: Iterable[str]) -> SemiSplit:
    """The split with the cases that are not in ``present`` dropped (order kept)."""
    present = set(present)
    groups = {k: [c for c in getattr(split, k) if c in present] for k in ("labeled", "unlabeled", "test", "val")}
    dropped = sum(len(getattr(split, k)) - len(v) for k, v in groups.items())
    notes = split.notes
    if dropped:
        notes = (notes + " " if notes else "") + f"[{dropped} listed case(s) absent from the converted copy were left out]"
    return SemiSplit(setting=split.setting, seed=split.seed, notes=notes, **groups)


def split_groups(split: SemiSplit) -> List[Tuple[str, str]]:
    """``(case, group)`` for every case of ``split``: its labeled, unlabeled, val and test cases, in
    that order (list order within a group). ``dict(split_groups(split))`` maps a case to its group."""
    return [(case, group) for group in SPLIT_GROUPS for case in getattr(split, group)]


def warn_absent_labeled(split: SemiSplit, written: Iterable[str]) -> List[str]:
    """Print one WARNING line when labeled cases of ``split`` were not written (absent from this copy),
    since the labeled set then is not the standard one; returns those cases (split order)."""
    written = set(written)
    absent = [c for c in split.labeled if c not in written]
    if absent:
        print(f"WARNING: {len(absent)} labeled case(s) of setting {split.setting} are absent ({', '.join(absent)}); "
              f"the labeled set is NOT the standard one.")
    return absent


def find_input_folder(root: str, candidates: Sequence[str], error: str) -> str:
    """The first of ``candidates`` that is a folder; each is taken relative to ``root`` unless absolute
    (an explicit ``--images-dir``-style option is a one-element list). When none is a folder, raises
    ``ConversionError(error.format(path=..., root=root, candidates=...))``: ``{path}`` is the first
    candidate as resolved, ``{candidates}`` the candidates joined by ``', '``."""
    paths = [c if os.path.isabs(c) else os.path.join(root, c) for c in candidates]
    for path in paths:
        if os.path.isdir(path):
            return path
    raise ConversionError(error.format(path=paths[0] if paths else root, root=root,
                                       candidates=", ".join(candidates)))


def nifti_path(folder: str, stem: str) -> str:
    """``folder/stem.nii.gz``, or ``folder/stem.nii`` when only that exists (the .nii.gz path otherwise,
    so that a missing file is reported under its usual name)."""
    gz = os.path.join(folder, stem + ".nii.gz")
    if not os.path.isfile(gz) and os.path.isfile(os.path.join(folder, stem + ".nii")):
        return os.path.join(folder, stem + ".nii")
    return gz


def _set_geometry(img: sitk.Image, spacing, origin, direction) -> sitk.Image:
    """Set (in place) whichever of spacing, origin, direction is not None; returns ``img``."""
    if spacing is not None:
        img.SetSpacing([float(s) for s in spacing])
    if origin is not None:
        img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    return img


def _to_sitk(arr_or_img: ArrayOrImage, case: str, what: str, axes: str, spacing, origin, direction) -> sitk.Image:
    if isinstance(arr_or_img, sitk.Image):
        img = arr_or_img
        if img.GetDimension() != 3:
            raise ConversionError(f"case {case}: {what} is {img.GetDimension()}D; 3D volumes are expected.")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ConversionError(f"case {case}: {what} has {img.GetNumberOfComponentsPerPixel()} components per "
                                  f"voxel; pass one image per channel.")
        if spacing is not None:  # copy before changing the spacing (origin/direction alone: set in place)
            img = sitk.Image(img)
        return _set_geometry(img, spacing, origin, direction)
    arr = np.asarray(arr_or_img)
    if arr.ndim != 3:
        raise ConversionError(f"case {case}: {what} has shape {arr.shape}; 3D volumes are expected.")
    if axes == "xyz":
        arr = np.transpose(arr, (2, 1, 0))
    elif axes != "zyx":
        raise ValueError(f"axes must be 'xyz' or 'zyx', not {axes!r}")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    if spacing is None:
        raise ConversionError(f"case {case}: no spacing given for the numpy {what}.")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ConversionError(f"case {case}: invalid spacing {tuple(spacing)} for {what}.")
    return _set_geometry(img, spacing, origin, direction)


def _allowed_label_values(labels: dict) -> set:
    vals = set()
    for v in labels.values():
        if isinstance(v, (list, tuple)):
            vals.update(int(i) for i in v)
        else:
            vals.add(int(v))
    return vals


class RawDatasetWriter:
    """Writes one semi-supervised raw dataset, ``<out_root>/DatasetXXX_Name/`` (:attr:`folder`).

    ``channel_names`` e.g. ``{0: 'MRI'}``, ``labels`` e.g. ``{'background': 0, 'LA': 1}`` (nnU-Net's
    dataset.json conventions); ``dataset_json_extra`` (description, reference, ...) goes into
    dataset.json as it is; ``origin_dataset`` is recorded for every case in case_metadata.json.

    A folder that exists and is not empty is refused unless ``overwrite``, before anything is written.
    Everything is written into a hidden temporary folder next to it (:attr:`staging`, same file
    system), which :meth:`finish` moves into place, replacing the old dataset only then. A failed
    :meth:`finish`, :meth:`abort`, or leaving a ``with`` block without finishing removes the temporary
    folder and leaves the old dataset as it was: converters use ``with RawDatasetWriter(...) as writer``.

    After writing: ``labeled``, ``unlabeled``, ``test``, ``val`` (cases in write order), ``withheld``
    (unlabeled cases whose label went to labelsWithheld), ``missing`` and ``skipped`` (``(case, text)``),
    ``metadata`` (the :class:`~nnunet_semi.layout.CaseMetadata` that :meth:`finish` writes).
    """

    def __init__(self, out_root: str, dataset_id: int, name: str, channel_names: dict, labels: dict,
                 file_ending: str = ".nii.gz", overwrite: bool = False, origin_dataset: Optional[str] = None,
                 **dataset_json_extra):
        if not out_root:
            raise ConversionError("no output root: pass -o/--output-root or set $nnUNet_raw.")
        self.out_root = os.path.abspath(out_root)
        self.dataset_id = int(dataset_id)
        self.name = name
        self.channel_names = {int(k): str(v) for k, v in channel_names.items()}
        self.labels = dict(labels)
        self.file_ending = file_ending
        self.dataset_json_extra = dataset_json_extra
        self.origin_dataset = origin_dataset
        self.overwrite = overwrite
        self.metadata = CaseMetadata()
        self._allowed = _allowed_label_values(self.labels)
        self.folder = os.path.join(self.out_root, dataset_folder_name(self.dataset_id, name))
        self._check_target()
        os.makedirs(self.out_root, exist_ok=True)
        # hidden (never a DatasetXXX_ name nnU-Net would find), removed unless finish moves it into place
        self.staging = tempfile.mkdtemp(prefix=f".{os.path.basename(self.folder)}.partial-", dir=self.out_root)
        self._discard = weakref.finalize(self, shutil.rmtree, self.staging, True)
        for sub in (IMAGES_TR, LABELS_TR):
            os.makedirs(os.path.join(self.staging, sub))
        self.labeled, self.unlabeled, self.withheld, self.test, self.val = [], [], [], [], []  # case ids
        self.missing: List[Tuple[str, str]] = []
        self.skipped: List[Tuple[str, str]] = []
        self._written: Dict[str, str] = {}

    def _check_target(self) -> None:
        if os.path.isdir(self.folder) and os.listdir(self.folder) and not self.overwrite:
            raise ConversionError(f"{self.folder} exists and is not empty; nothing was written. Pass --overwrite "
                                  f"to replace it (once the conversion succeeded), or choose another -d/--dataset-id.")
        if os.path.lexists(self.folder) and not os.path.isdir(self.folder):
            raise ConversionError(f"{self.folder} exists and is not a folder; remove it or choose another dataset id.")
        # other DatasetXXX_* folders with the same id would make nnU-Net's id lookup ambiguous
        if os.path.isdir(self.out_root):
            prefix = f"Dataset{self.dataset_id:03d}_"
            clash = [d for d in os.listdir(self.out_root)
                     if d.startswith(prefix) and d != os.path.basename(self.folder)]
            if clash:
                raise ConversionError(f"{os.path.join(self.out_root, clash[0])} already uses dataset id "
                                      f"{self.dataset_id}; nnU-Net needs unique ids. Pass another -d/--dataset-id.")

    def abort(self) -> None:
        """Remove the temporary folder (nothing is done after :meth:`finish` succeeded)."""
        self._discard()

    def __enter__(self) -> "RawDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    # ----------------------------------------------------------------------------- reporting
    def report_missing(self, case: str, path: str) -> None:
        """One line ``skipped CASE: not found at PATH (withheld from this copy?)``, counted in ``missing``."""
        msg = f"skipped {case}: not found at {path} (withheld from this copy?)"
        self.missing.append((case, msg))
        _say(msg)

    def report_skipped(self, case: str, reason: str) -> None:
        """One line ``skipped CASE: REASON`` (e.g. a label without image), counted in ``skipped``."""
        msg = f"skipped {case}: {reason}"
        self.skipped.append((case, msg))
        _say(msg)

    def report_note(self, case: str, text: str) -> None:
        """An informational line about a case that is converted (e.g. a dtype cast)."""
        _say(f"note {case}: {text}")

    @staticmethod
    def progress(iterable: Iterable, desc: str, total: Optional[int] = None):
        """A tqdm progress bar on stderr."""
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, mininterval=1.0)

    # ----------------------------------------------------------------------------- writing
    def _prepare(self, case: str, image, label, spacing, origin, direction, axes):
        if case in self._written:
            raise ConversionError(f"case {case}: written twice (already in {self._written[case]}).")
        if "/" in case or case.startswith("."):
            raise ConversionError(f"case {case}: not a valid case id.")
        channels = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(channels) != len(self.channel_names):
            raise ConversionError(f"case {case}: {len(channels)} channel(s) given, the dataset has "
                                  f"{len(self.channel_names)} ({self.channel_names}).")
        imgs = [_to_sitk(c, case, f"image channel {i}", axes, spacing, origin, direction)
                for i, c in enumerate(channels)]
        ref = imgs[0]
        for i, im in enumerate(imgs):
            arr = sitk.GetArrayViewFromImage(im)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ConversionError(f"case {case}: image channel {i} contains NaN/inf values.")
            if i and im.GetSize() != ref.GetSize():
                raise ConversionError(f"case {case}: channel {i} has size {im.GetSize()} but channel 0 has "
                                      f"{ref.GetSize()} (x,y,z).")
            if i and not np.allclose(im.GetSpacing(), ref.GetSpacing(), rtol=1e-4, atol=1e-5):
                raise ConversionError(f"case {case}: channel {i} spacing {im.GetSpacing()} differs from channel 0 "
                                      f"spacing {ref.GetSpacing()}.")
        lab = None
        if label is not None:
            if isinstance(label, sitk.Image):
                if label.GetDimension() != 3:
                    raise ConversionError(f"case {case}: label is {label.GetDimension()}D; 3D expected.")
                if label.GetSize() != ref.GetSize():
                    raise ConversionError(f"case {case}: label size {label.GetSize()} differs from image size "
                                          f"{ref.GetSize()} (x,y,z).")
                if not np.allclose(label.GetSpacing(), ref.GetSpacing(), rtol=1e-4, atol=1e-5):
                    raise ConversionError(f"case {case}: label spacing {label.GetSpacing()} differs from image "
                                          f"spacing {ref.GetSpacing()}.")
                larr = sitk.GetArrayFromImage(label)  # z,y,x
            else:
                larr = np.asarray(label)
                if larr.ndim != 3:
                    raise ConversionError(f"case {case}: label has shape {larr.shape}; 3D expected.")
                if axes == "xyz":
                    larr = np.transpose(larr, (2, 1, 0))
                img_zyx = tuple(reversed(ref.GetSize()))
                if larr.shape != img_zyx:
                    shown = tuple(reversed(larr.shape)) if axes == "xyz" else larr.shape
                    want = ref.GetSize() if axes == "xyz" else img_zyx
                    raise ConversionError(f"case {case}: label shape {shown} differs from image shape {want} "
                                          f"(axes {axes}).")
            larr = as_label_array(larr, case)
            present = set(np.unique(larr).tolist())
            bad = sorted(present - self._allowed)
            if bad:
                raise ConversionError(f"case {case}: label values {bad} are not in the dataset's label map "
                                      f"{self.labels}.")
            lab = sitk.GetImageFromArray(np.ascontiguousarray(larr))
            lab.CopyInformation(ref)
        return imgs, lab

    def _write(self, case, imgs, lab, img_dir, lab_dir, where):
        os.makedirs(os.path.join(self.staging, img_dir), exist_ok=True)
        for i, im in enumerate(imgs):
            sitk.WriteImage(im, os.path.join(self.staging, img_dir, image_filename(case, i, self.file_ending)),
                            useCompression=True)
        if lab is not None:
            os.makedirs(os.path.join(self.staging, lab_dir), exist_ok=True)
            sitk.WriteImage(lab, os.path.join(self.staging, lab_dir, label_filename(case, self.file_ending)),
                            useCompression=True)
        self._written[case] = where

    def add_labeled(self, case: str, image, label, spacing: Optional[Sequence[float]] = None,
                    origin=None, direction=None, axes: str = "xyz") -> None:
        """imagesTr/CASE_0000... + labelsTr/CASE. ``image``: a numpy array or ``SimpleITK.Image``, or a list
        of them, one per channel; ``label``: integral values of ``labels`` (float labels are cast after
        checking, :func:`as_label_array`). A numpy array is ``array[x, y, z]`` (``axes='xyz'``: nibabel,
        pynrrd, UA-MT h5) or ``array[z, y, x]`` (``axes='zyx'``: ``sitk.GetArrayFromImage``, SSL4MIS h5) and
        needs ``spacing``; ``spacing``/``origin`` are (x, y, z) in mm, ``direction`` SimpleITK's row-major
        9-tuple, taken from a ``SimpleITK.Image`` unless given. Shape, spacing, label values, 3D, NaN/inf
        and a case written twice are checked (ConversionError naming the case)."""
        if label is None:
            raise ConversionError(f"case {case}: a labeled case needs a label.")
        imgs, lab = self._prepare(case, image, label, spacing, origin, direction, axes)
        self._write(case, imgs, lab, IMAGES_TR, LABELS_TR, "labeled")
        self.labeled.append(case)

    def add_unlabeled(self, case: str, image, label=None, spacing: Optional[Sequence[float]] = None,
                      origin=None, direction=None, axes: str = "xyz") -> None:
        """imagesUnlabeled/CASE_0000...; a label that exists but is withheld goes to labelsWithheld/CASE."""
        imgs, lab = self._prepare(case, image, label, spacing, origin, direction, axes)
        self._write(case, imgs, lab, IMAGES_UNLABELED, LABELS_WITHHELD, "unlabeled")
        self.unlabeled.append(case)
        if lab is not None:
            self.withheld.append(case)

    def add_heldout(self, case: str, image, label=None, group: str = "test",
                    spacing: Optional[Sequence[float]] = None, origin=None, direction=None,
                    axes: str = "xyz") -> None:
        """imagesTs/labelsTs (the split's ``val`` and ``test`` groups both live there)."""
        if group not in ("test", "val"):
            raise ValueError(f"group must be 'test' or 'val', not {group!r}")
        imgs, lab = self._prepare(case, image, label, spacing, origin, direction, axes)
        self._write(case, imgs, lab, IMAGES_TS, LABELS_TS, group)
        (self.test if group == "test" else self.val).append(case)

    def add_case(self, case: str, group: str, image, label=None, **geometry) -> None:
        """Write ``case`` to the place of its split group: ``'labeled'`` -> :meth:`add_labeled`,
        ``'unlabeled'`` -> :meth:`add_unlabeled`, ``'test'``/``'val'`` -> :meth:`add_heldout` with that
        group. ``geometry``: ``spacing``, ``origin``, ``direction``, ``axes`` as for those methods."""
        if group == "labeled":
            self.add_labeled(case, image, label, **geometry)
        elif group == "unlabeled":
            self.add_unlabeled(case, image, label, **geometry)
        elif group in ("test", "val"):
            self.add_heldout(case, image, label, group=group, **geometry)
        else:
            raise ValueError(f"group must be one of {SPLIT_GROUPS}, not {group!r}")

    # ----------------------------------------------------------------------------- finishing
    def _check_split(self, split: SemiSplit, what: str, active: bool) -> None:
        try:
            split.check_disjoint(what)
        except LayoutError as e:
            raise ConversionError(str(e)) from e
        train_written = set(self.labeled) | set(self.unlabeled)
        if active:
            pairs = [("labeled", split.labeled, self.labeled), ("unlabeled", split.unlabeled, self.unlabeled)]
        else:
            pairs = [("labeled+unlabeled", list(split.labeled) + list(split.unlabeled), sorted(train_written))]
        pairs += [("test", split.test, self.test), ("val", split.val, self.val)]
        for name, listed, written in pairs:
            if set(listed) != set(written):
                extra = sorted(set(listed) - set(written))
                lacking = sorted(set(written) - set(listed))
                raise ConversionError(
                    f"{what}: group '{name}' does not match the written cases"
                    + (f"; listed but not written: {extra[:5]}" if extra else "")
                    + (f"; written but not listed: {lacking[:5]}" if lacking else "")
                    + ". (Converter bug: build the split from the cases actually written, e.g. restrict_split.)")

    def finish(self, split: SemiSplit, standard_splits: Optional[Dict[str, SemiSplit]] = None) -> str:
        """Check that the split's groups are the cases written (``standard_splits``, keyed by settings such
        as ``8_labeled``: the same cases), write dataset.json (numTraining = labeled cases), splits_semi.json,
        ``splits_standard/<setting>.json``, case_metadata.json (if anything was recorded), move the dataset
        into place and return :attr:`folder`. On failure the temporary folder is removed, the old one kept."""
        try:
            self._write_dataset_files(split, standard_splits)
            self._check_target()
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        lines = [f"wrote {self.folder}",
                 f"  setting: {split.setting or '-'}" + (f" (seed {split.seed})" if split.seed is not None else ""),
                 f"  labeled   (imagesTr/labelsTr):                {len(self.labeled)}",
                 f"  unlabeled (imagesUnlabeled):                  {len(self.unlabeled)}"
                 f" ({len(self.withheld)} with label in {LABELS_WITHHELD}/)",
                 f"  held out  (imagesTs/labelsTs): test {len(self.test)}, val {len(self.val)}"]
        if standard_splits:
            lines.append(f"  standard splits: {', '.join(sorted(standard_splits))}")
        lines.append(f"  skipped: {len(self.missing)} missing (listed but absent), {len(self.skipped)} other")
        _say("\n".join(lines))
        return self.folder

    def _write_dataset_files(self, split: SemiSplit, standard_splits: Optional[Dict[str, SemiSplit]]) -> None:
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
        self._check_split(split, "splits_semi.json", active=True)
        for setting, s in (standard_splits or {}).items():
            self._check_split(s, f"splits_standard/{setting}.json", active=False)
        if not self.labeled:
            raise ConversionError(f"{self.folder}: no labeled case was written; nnU-Net needs at least one.")
        extra = dict(self.dataset_json_extra)
        extra.setdefault("converted_by", "nnunet_semi.conversion")
        extra.setdefault("license", "see the source dataset's licence")
        generate_dataset_json(self.staging, {str(k): v for k, v in self.channel_names.items()}, dict(self.labels),
                              num_training_cases=len(self.labeled), file_ending=self.file_ending,
                              dataset_name=dataset_folder_name(self.dataset_id, self.name), **extra)
        for case in self._written if self.origin_dataset else ():
            self.metadata.cases.setdefault(case, {}).setdefault("origin_dataset", self.origin_dataset)
        try:
            split.save(self.staging)
            for setting, s in (standard_splits or {}).items():
                save_standard_split(self.staging, setting, s)
            if self.metadata.to_json() != CaseMetadata().to_json():  # anything recorded
                self.metadata.save(self.staging)
        except LayoutError as e:  # named as the files will be
            raise ConversionError(str(e).replace(self.staging, self.folder)) from e

    def _move_into_place(self) -> None:
        """Rename the temporary folder to :attr:`folder`; an existing one is renamed aside until then."""
        old = None
        if os.path.lexists(self.folder):
            old = self.staging + ".replaced"
            os.rename(self.folder, old)
        try:
            os.rename(self.staging, self.folder)
        except OSError:
            if old is not None:
                os.rename(old, self.folder)
            raise
        self._discard.detach()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_case_sitk(case: str, image_path: str, label_path: Optional[str]) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    """Image and label (None when ``label_path`` is None) read with :func:`read_sitk`, image first."""
    image = read_sitk(image_path, case)
    return image, (read_sitk(label_path, case, label=True) if label_path is not None else None)


class CaseAbsent(Exception):
    """Raised by the ``read_case`` of :func:`write_split` for a listed case that this copy of the data
    lacks; ``path`` is where it was looked for."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def write_split(writer: RawDatasetWriter, split: SemiSplit, read_case: Callable[[str, str], tuple],
                desc: str = "converting") -> List[str]:
    """The per-case loop of the converters: every case of ``split`` (order of :func:`split_groups`, with
    a progress bar ``desc``) is read with ``read_case(case, group) -> (image, label, geometry)`` and
    written with :meth:`RawDatasetWriter.add_case` (``geometry``: its keyword arguments); a case whose
    ``read_case`` raises :class:`CaseAbsent` is reported with ``report_missing`` and skipped. Returns the
    cases written, in write order."""
    written: List[str] = []
    for case, group in writer.progress(split_groups(split), desc=desc):
        try:
            image, label, geometry = read_case(case, group)
        except CaseAbsent as e:
            writer.report_missing(case, e.path)
            continue
        writer.add_case(case, group, image, label, **geometry)
        written.append(case)
    return written


def write_cases(writer: RawDatasetWriter, split: SemiSplit, locate: Callable[[str], Tuple[str, str]],
                read: Callable[[str, str, Optional[str]], tuple] = read_case_sitk,
                desc: str = "converting") -> List[str]:
    """:func:`write_split` for converters that find each case's image and label file by name:
    ``locate(case) -> (image_path, label_path)``. No image file, or no label file for a labeled, val or
    test case, is absent (that path is reported); otherwise ``read(case, image_path, label_path or None)
    -> (image, label)`` (default: :func:`read_case_sitk`), with a note for an unlabeled case without label."""
    def read_case(case: str, group: str) -> tuple:
        img_path, lab_path = locate(case)
        if not os.path.isfile(img_path):
            raise CaseAbsent(img_path)
        has_label = os.path.isfile(lab_path)
        if not has_label and group != "unlabeled":
            raise CaseAbsent(lab_path)
        image, label = read(case, img_path, lab_path if has_label else None)
        if group == "unlabeled" and label is None:
            writer.report_note(case, f"no label at {lab_path}; written as unlabeled without a withheld label")
        return image, label, {}

    return write_split(writer, split, read_case, desc)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def make_parser(description: str, default_dataset_id: int, default_labeled: Optional[int] = None,
                labeled_help: str = "number of labeled training cases", input_help: str = "input folder",
                labeled_choices: Optional[Sequence[int]] = None, labeled: bool = True,
                labeled_error: str = "--labeled does not apply to this dataset") -> argparse.ArgumentParser:
    """argparse with ``-i/--input`` (required), ``-d/--dataset-id``, ``--labeled N``, ``--overwrite`` and
    ``-o/--output-root``; add dataset-specific options to it. ``labeled=False``: the dataset fixes its labeled
    cases otherwise, so ``--labeled`` is left out of the help and usage, ``args.labeled`` is None, and
    :func:`parse_args` stops with the parser error ``labeled_error`` if it is given anyway."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help=input_help)
    p.add_argument("-d", "--dataset-id", type=int, default=default_dataset_id,
                   help=f"nnU-Net dataset id (default {default_dataset_id})")
    if labeled:
        p.add_argument("--labeled", type=int, default=default_labeled, choices=labeled_choices,
                       help=f"{labeled_help} (default {default_labeled})")
    else:  # still parsed, so that giving it is one clear error rather than 'unrecognized arguments'
        p.add_argument("--labeled", type=int, default=None, help=argparse.SUPPRESS)
        p.set_defaults(_labeled_error=labeled_error)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset folder if it exists, once the conversion succeeded (default: refuse)")
    p.add_argument("-o", "--output-root", default=None,
                   help="folder that receives DatasetXXX_Name/ (default: $nnUNet_raw)")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, and resolve ``args.output_root`` (``-o`` or ``$nnUNet_raw``; a parser error if neither)."""
    args = parser.parse_args(argv)
    if not args.output_root:
        args.output_root = os.environ.get("nnUNet_raw")
        if not args.output_root:
            parser.error("no output folder: pass -o/--output-root or set the nnUNet_raw environment variable")
    if not os.path.exists(args.input):
        parser.error(f"input {args.input} does not exist")
    labeled_error = vars(args).pop("_labeled_error", None)
    if labeled_error is not None and args.labeled is not None:
        parser.error(labeled_error)
    return args


def run_main(fn, argv=None) -> int:
    """Call ``fn(argv)``; a ConversionError becomes one 'error: ...' line on stderr and exit code 1."""
    try:
        fn(argv)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
