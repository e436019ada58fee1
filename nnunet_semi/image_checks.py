"""Checks of an input image's content, shared by the converters and ``nnUNetv2_preprocess_unlabeled``:
a complete, uncorrupted file whose voxels are finite and not all equal.

SimpleITK reads a truncated or corrupt ``.nii.gz`` without error (what is missing becomes zeros), and
its NIfTI reader turns NaN/inf voxels into 0. So :func:`read_image` decompresses a gzip file to its end
itself, which runs gzip's length and CRC checks, lets SimpleITK read the decompressed copy and checks
a NIfTI file's voxels as stored: each file is read once.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib

import numpy as np
import SimpleITK as sitk

GZIP_MAGIC = b"\x1f\x8b"


class ImageFileError(ValueError):
    """An input image that is truncated, corrupt, or has unusable voxels. ``str()`` names the file,
    the problem and the fix; callers add which case it is."""

    def __init__(self, path: str, problem: str, fix: str):
        super().__init__(f"{path}: {problem} {fix}")
        self.path, self.problem, self.fix = path, problem, fix


def read_image(path: str, check: bool = False) -> sitk.Image:
    """``sitk.ReadImage(path)``, reading the file once. A gzip-compressed file (by its magic bytes) is
    decompressed to its end into a temporary file first: a truncated or corrupt one raises
    :class:`ImageFileError`. With ``check``, :func:`check_voxels` too; for NIfTI on the voxels as
    stored, since SimpleITK's NIfTI reader (niftilib) silently replaces NaN/inf by 0. Other failures
    are SimpleITK's (RuntimeError)."""
    with open(path, "rb") as f:
        if f.read(2) == GZIP_MAGIC:
            f.seek(0)
            with tempfile.TemporaryDirectory(prefix="nnunet_semi_read_") as tmp:
                return _read(_gunzip(f, path, tmp), path, check)
    return _read(path, path, check)


def _gunzip(f, path: str, folder: str) -> str:
    """Decompress the open gzip file ``f`` (``path``) to its end into ``folder``; returns the copy."""
    name = os.path.basename(path)
    plain = os.path.join(folder, name[:-3] if name.endswith(".gz") else name)
    try:
        with gzip.GzipFile(fileobj=f, mode="rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated, bad CRC/length, bad deflate data
        raise ImageFileError(path, f"the compressed file is truncated or corrupt ({e}); SimpleITK would read "
                                   f"it without error, with zeros or wrong values for the lost data.",
                             "Copy or export the file again.") from e
    return plain


def _read(plain: str, path: str, check: bool) -> sitk.Image:
    img = sitk.ReadImage(plain)
    if check:
        stored = _stored_nifti_voxels(plain) if plain.endswith(".nii") else None
        check_voxels(sitk.GetArrayViewFromImage(img) if stored is None else stored, path)
    return img


def _stored_nifti_voxels(plain: str):
    """The voxels of an uncompressed NIfTI file as stored (unscaled, memory-mapped: the pages SimpleITK just
    read), or None where nibabel cannot map them."""
    import nibabel as nib
    try:
        arr = nib.load(plain, mmap=True).dataobj.get_unscaled()
    except Exception:  # a file SimpleITK reads but nibabel does not: check SimpleITK's array instead
        return None
    return arr if arr.dtype.kind in "biufc" else None


def check_voxels(arr, path: str) -> None:
    """NaN/inf voxels or an image whose voxels all have one value raise :class:`ImageFileError`.
    Costs one min and one max over the array (NaN and inf show in them); counts only on failure."""
    arr = np.asarray(arr)
    if not arr.size:
        return
    lo, hi = arr.min(), arr.max()
    if arr.dtype.kind in "fc" and not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ImageFileError(path, f"{bad} of {arr.size} voxels are NaN or infinite.",
                             "Replace them (e.g. with the image minimum) in the source image.")
    if lo == hi:
        raise ImageFileError(path, f"every voxel has the value {lo.item()!r} (a blank image).",
                             "Replace it with the real scan.")
