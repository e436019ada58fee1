"""Convert ACDC (cardiac cine MRI) into a semi-supervised nnU-Net raw dataset (default Dataset027_ACDC)
with the community-standard SSL4MIS split (70 train / 10 val / 20 test patients).

Input layouts (detected automatically):

- SSL4MIS h5 (``<root>/data/`` or ``<root>/data/slices/``, plus ``train.list``, ``val.list``,
  ``test.list``): training volumes ``patientXXX_frameYY`` are stored as 2D slices
  ``patientXXX_frameYY_slice_K.h5`` (K = 1..N) and are stacked back into a volume in slice order;
  a volume file ``patientXXX_frameYY.h5`` (``image``/``label`` with axes **z, y, x**) is used when
  present. Images are min-max normalised to [0, 1] per volume (as shipped); labels 0..3.
- original ACDC NIfTI (``patientXXX/patientXXX_frameYY.nii.gz`` + ``_gt.nii.gz`` + ``Info.cfg``,
  under e.g. ``training/``): real spacing and geometry from the files, raw intensities. The two
  annotated frames are named like SSL4MIS: ``patientXXX_frame01`` = end-diastole (``ED`` in Info.cfg),
  ``patientXXX_frame02`` = end-systole (``ES``). This layout has no list files: the canonical SSL4MIS
  patient order embedded below (:data:`TRAIN_PATIENTS`, :data:`VAL_PATIENTS`, :data:`TEST_PATIENTS`)
  is used.

Spacing of the h5 layout. The h5 files store no spacing. This converter writes
``H5_SPACING = (1.5625, 1.5625, 10.0)`` mm (x, y, z; override with ``--h5-spacing``): ACDC's native
in-plane resolution is about 1.37-1.68 mm (1.5625 is the typical value) and its slices are 5-10 mm
apart (10 mm is the common inter-slice distance, i.e. 5-8 mm thickness plus gap). Why it matters:
nnU-Net plans from spacing. With the real anisotropy (about 6.4:1) it plans 2D as the main
configuration, keeps 3D patches flat in z and never pools/resamples across slices as if they were
close; with a placeholder 1 mm isotropic spacing it would treat the 10-slice stacks as isotropic
volumes. The volumes are not resampled by the converter, so voxel-based metrics (the ones published
for ACDC on these h5 files, Dice, and HD95/ASD in voxels) are unaffected; only mm-based distances
depend on the assumed spacing.

Split (patient level, from the lists, or the embedded canonical order for the NIfTI layout):
labeled = the first 3 or 7 patients of train.list (``--labeled``, default 3; both frames of a labeled
patient are labeled; SSL4MIS' 68 / 136 labeled slices), all other training patients unlabeled (their
labels go to labelsWithheld/), val patients -> imagesTs/labelsTs as ``split.val``, test patients ->
imagesTs/labelsTs as ``split.test``. ``splits_standard/`` gets ``3_labeled`` and ``7_labeled``.
Listed volumes that are absent (the shared copy withholds all test volumes) are skipped with one line
each and counted. Slice counts of the first 7 patients (both frames) are checked against SSL4MIS'
``patients_to_slices`` figures (099:32, 038:16, 050:20, 100:16, 058:18, 021:20, 049:14).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_semi.conversion.common import (CaseAbsent, ConversionError, RawDatasetWriter, check_image_voxels,
                                           make_parser, parse_args, read_list, read_sitk, restrict_split, run_main,
                                           warn_absent_labeled, write_split)
from nnunet_semi.layout import SemiSplit

DEFAULT_DATASET_ID = 27
DATASET_NAME = "ACDC"
CHANNEL_NAMES = {0: "cineMRI"}
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
DEFAULT_LABELED = 3
STANDARD_LABELED = (3, 7)
H5_SPACING = (1.5625, 1.5625, 10.0)  # x, y, z in mm; see the module docstring

# SSL4MIS data/ACDC/{train,val,test}.list, patient order of train.list (the order matters)
TRAIN_PATIENTS: Tuple[str, ...] = tuple("""
099 038 050 100 058 021 049 020 072 040 060 089 004 056 098 096 031 018 094 047 048 055 097 074 043 041 063 037
095 054 026 088 032 069 006 071 012 073 061 017 025 010 057 029 051 005 036 046 062 034 076 092 070 077 067 003
091 016 014 044 042 090 053 027 035 086 023 009 079 015""".split())
VAL_PATIENTS: Tuple[str, ...] = tuple("028 085 082 087 019 030 078 045 002 039".split())
TEST_PATIENTS: Tuple[str, ...] = tuple(
    "011 013 084 033 093 022 068 024 083 081 080 001 007 066 008 065 075 064 059 052".split())
# SSL4MIS patients_to_slices: slices of both frames of the first 7 training patients
KNOWN_SLICE_COUNTS = {"099": 32, "038": 16, "050": 20, "100": 16, "058": 18, "021": 20, "049": 14}

_CASE_RE = re.compile(r"^patient(\d{3})_frame(\d{2})$")
_SLICE_RE = re.compile(r"^(patient\d{3}_frame\d{2})_slice_(\d+)\.h5$")


def patient_of(case: str) -> str:
    m = _CASE_RE.match(case)
    if m is None:
        raise ConversionError(f"'{case}' is not an ACDC volume id (patientXXX_frameYY).")
    return m.group(1)


def canonical_cases(patients: Sequence[str]) -> List[str]:
    return [f"patient{p}_frame{f:02d}" for p in patients for f in (1, 2)]


def patients_in_order(cases: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(patient_of(c) for c in cases))


# --------------------------------------------------------------------------------------------
# h5 layout
# --------------------------------------------------------------------------------------------
class H5Source:
    def __init__(self, root: str):
        self.root = root
        self.dirs = [d for d in (os.path.join(root, "data"), os.path.join(root, "data", "slices"), root)
                     if os.path.isdir(d)]
        self.volumes: Dict[str, str] = {}
        self.slices: Dict[str, Dict[int, str]] = {}
        for d in self.dirs:
            for fname in sorted(os.listdir(d)):
                m = _SLICE_RE.match(fname)
                if m:
                    self.slices.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(d, fname)
                elif fname.endswith(".h5") and _CASE_RE.match(fname[:-3]):
                    self.volumes.setdefault(fname[:-3], os.path.join(d, fname))
        self.listed_slices: Optional[Dict[str, set]] = None
        sl = os.path.join(root, "train_slices.list")
        if os.path.isfile(sl):
            self.listed_slices = {}
            for line in read_list(sl):
                m = _SLICE_RE.match(line + ".h5")
                if m:
                    self.listed_slices.setdefault(m.group(1), set()).add(int(m.group(2)))

    def where(self, case: str) -> str:
        return os.path.join(self.dirs[0] if self.dirs else self.root, case + ".h5")

    def has(self, case: str) -> bool:
        return case in self.volumes or case in self.slices

    @staticmethod
    def _read(path: str, case: str):
        import h5py
        try:
            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise ConversionError(f"case {case}: {path} has no 'image' dataset (has {list(f)}).")
                image = np.asarray(f["image"][()], dtype=np.float32)
                label = np.asarray(f["label"][()]) if "label" in f else None
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"case {case}: cannot read {path} ({e}).") from e
        return image, label

    def read(self, case: str):
        """(image zyx, label zyx or None); the image checked with :func:`check_image_voxels`."""
        if case in self.volumes:
            image, label = self._read(self.volumes[case], case)
            if image.ndim != 3:
                raise ConversionError(f"case {case}: {self.volumes[case]} holds a {image.ndim}D image; 3D expected.")
            check_image_voxels(image, case, self.volumes[case])
            return image, label
        slices = self.slices[case]
        ks = sorted(slices)
        if ks != list(range(1, len(ks) + 1)):
            gaps = sorted(set(range(1, max(ks) + 1)) - set(ks))
            raise ConversionError(f"case {case}: slice files are not consecutive from slice_1 (missing slice(s) "
                                  f"{gaps[:5]} in {os.path.dirname(slices[ks[0]])}); cannot rebuild the volume.")
        if self.listed_slices is not None and case in self.listed_slices and self.listed_slices[case] != set(ks):
            raise ConversionError(f"case {case}: train_slices.list names slices {sorted(self.listed_slices[case])} but "
                                  f"the folder has {ks}.")
        imgs, labs = [], []
        for k in ks:
            im, lb = self._read(slices[k], f"{case} (slice {k})")
            if im.ndim != 2:
                raise ConversionError(f"case {case}: {slices[k]} is {im.ndim}D; slices must be 2D (y, x).")
            if imgs and im.shape != imgs[0].shape:
                raise ConversionError(f"case {case}: slice {k} has shape {im.shape}, slice 1 has {imgs[0].shape}.")
            if lb is None:
                raise ConversionError(f"case {case}: {slices[k]} has no 'label' dataset.")
            imgs.append(im)
            labs.append(lb)
        image = np.stack(imgs, 0)
        check_image_voxels(image, case, os.path.join(os.path.dirname(slices[ks[0]]), f"{case}_slice_*.h5"))
        return image, np.stack(labs, 0)


# --------------------------------------------------------------------------------------------
# NIfTI layout
# --------------------------------------------------------------------------------------------
def _read_info_cfg(path: str) -> Dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            if ":" in line:
                k, v = line.split(":", 1)
                out[k.strip()] = v.strip()
    return out


class NiftiSource:
    """Original ACDC layout: patientXXX/ folders up to two levels below the input."""

    def __init__(self, root: str):
        self.root = root
        self.patient_dirs: Dict[str, str] = {}
        for pattern in ("patient[0-9][0-9][0-9]", "*/patient[0-9][0-9][0-9]", "*/*/patient[0-9][0-9][0-9]"):
            for d in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(d):
                    p = os.path.basename(d)[7:]
                    if p in self.patient_dirs and self.patient_dirs[p] != d:
                        raise ConversionError(f"patient{p}: found twice ({self.patient_dirs[p]} and {d}); keep one.")
                    self.patient_dirs[p] = d
        self._frames: Dict[str, Tuple[str, str]] = {}

    def _frame_files(self, case: str) -> Optional[Tuple[str, str]]:
        if case in self._frames:
            return self._frames[case]
        p = patient_of(case)
        d = self.patient_dirs.get(p)
        if d is None:
            return None
        frames = sorted(int(m.group(1)) for f in os.listdir(d)
                        for m in [re.match(rf"^patient{p}_frame(\d\d)_gt\.nii(\.gz)?$", f)] if m)
        info_path = os.path.join(d, "Info.cfg")
        if os.path.isfile(info_path):
            info = _read_info_cfg(info_path)
            try:
                ed, es = int(info["ED"]), int(info["ES"])
            except (KeyError, ValueError) as e:
                raise ConversionError(f"patient{p}: {info_path} lacks valid ED/ES entries.") from e
            order = [ed, es]
        else:
            if len(frames) != 2:
                raise ConversionError(f"patient{p}: no Info.cfg and {len(frames)} annotated frames in {d}; "
                                      f"cannot tell ED from ES.")
            order = frames
        for i, fr in enumerate(order, start=1):
            img = None
            for e in (".nii.gz", ".nii"):
                cand = os.path.join(d, f"patient{p}_frame{fr:02d}{e}")
                if os.path.isfile(cand):
                    img, gt = cand, os.path.join(d, f"patient{p}_frame{fr:02d}_gt{e}")
                    break
            if img is not None:
                self._frames[f"patient{p}_frame{i:02d}"] = (img, gt)
        return self._frames.get(case)

    def where(self, case: str) -> str:
        p = patient_of(case)
        return self.patient_dirs.get(p, os.path.join(self.root, f"patient{p}"))

    def has(self, case: str) -> bool:
        return self._frame_files(case) is not None

    def read(self, case: str):
        img_path, gt_path = self._frame_files(case)
        image = read_sitk(img_path, case)
        label = read_sitk(gt_path, case, label=True) if os.path.isfile(gt_path) else None
        return image, label


def detect(root: str):
    src = NiftiSource(root)
    if src.patient_dirs:
        return "nifti", src
    h5 = H5Source(root)
    if h5.volumes or h5.slices:
        return "h5", h5
    raise ConversionError(f"{root}: found neither SSL4MIS h5 files (data/patientXXX_frameYY[_slice_K].h5) nor "
                          f"ACDC patient folders (patientXXX/patientXXX_frameYY.nii.gz).")


def find_lists(root: str, layout: str) -> Tuple[List[str], List[str], List[str], str]:
    files = [os.path.join(root, f"{n}.list") for n in ("train", "val", "test")]
    if all(os.path.isfile(f) for f in files):
        lists = []
        for f in files:
            ids = [x[:-3] if x.endswith(".h5") else x for x in read_list(f)]
            for c in ids:
                patient_of(c)
            lists.append(ids)
        return lists[0], lists[1], lists[2], ", ".join(files)
    if layout == "h5" and any(os.path.isfile(f) for f in files):
        missing = [f for f in files if not os.path.isfile(f)]
        raise ConversionError(f"{root}: incomplete list files (missing {missing}); provide all three or none.")
    return (canonical_cases(TRAIN_PATIENTS), canonical_cases(VAL_PATIENTS), canonical_cases(TEST_PATIENTS),
            "canonical SSL4MIS patient lists embedded in nnunet_semi.conversion.acdc")


def standard_splits(train: List[str], val: List[str], test: List[str]) -> Dict[str, SemiSplit]:
    out = {}
    patients = patients_in_order(train)
    for n in STANDARD_LABELED:
        lab_p = set(patients[:n])
        out[f"{n}_labeled"] = SemiSplit(
            labeled=[c for c in train if patient_of(c) in lab_p], unlabeled=[c for c in train if patient_of(c) not in lab_p],
            test=list(test), val=list(val), setting=f"{n}_labeled",
            notes=f"ACDC, SSL4MIS split: labeled = both frames of the first {n} patients of train.list")
    return out


def build_parser():
    p = make_parser(
        "Convert ACDC into a semi-supervised nnU-Net raw dataset with the SSL4MIS patient split (70/10/20; "
        "labeled = both frames of the first 3 or 7 patients of train.list; val and test patients go to imagesTs).\n"
        "Layouts: SSL4MIS h5 (data/patientXXX_frameYY_slice_K.h5 slices, stacked into volumes, and "
        "data/patientXXX_frameYY.h5 volumes, axes z,y,x, plus train/val/test.list) or the original NIfTI "
        "(patientXXX/patientXXX_frameYY[_gt].nii.gz + Info.cfg; canonical lists built in).\n"
        f"The h5 files store no spacing: {H5_SPACING} mm (x,y,z) is written, ACDC's typical ~1.5 mm in-plane "
        "and 5-10 mm slice distance, so that nnU-Net sees the real anisotropy and plans 2D / flat 3D patches; "
        "volumes are not resampled, so voxel-based metrics are unaffected.",
        DEFAULT_DATASET_ID, DEFAULT_LABELED,
        labeled_help="labeled patients = first N patients of train.list (standard: 3, 7)",
        input_help="SSL4MIS ACDC folder (holding data/ and the .list files) or the ACDC NIfTI folder")
    p.add_argument("--h5-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=list(H5_SPACING),
                   help=f"spacing in mm written for the h5 layout (default {H5_SPACING[0]} {H5_SPACING[1]} "
                        f"{H5_SPACING[2]})")
    return p


def convert(argv=None) -> str:
    parser = build_parser()
    args = parse_args(parser, argv)
    layout, src = detect(args.input)
    train, val, test, list_src = find_lists(args.input, layout)
    patients = patients_in_order(train)
    if not 1 <= args.labeled <= len(patients):
        parser.error(f"--labeled must be between 1 and {len(patients)} (patients)")
    if layout == "h5":
        print(f"input {args.input}: SSL4MIS h5 layout ({len(src.slices)} sliced volumes, {len(src.volumes)} volume "
              f"files); lists: {list_src}; spacing assigned: {tuple(args.h5_spacing)} mm (x,y,z)")
    else:
        print(f"input {args.input}: ACDC NIfTI layout ({len(src.patient_dirs)} patient folders); lists: {list_src}")
    lab_p = set(patients[:args.labeled])
    split = SemiSplit(labeled=[c for c in train if patient_of(c) in lab_p],
                      unlabeled=[c for c in train if patient_of(c) not in lab_p], test=list(test), val=list(val),
                      setting=f"{args.labeled}_labeled",
                      notes=f"ACDC, SSL4MIS split: labeled = both frames of the first {args.labeled} patients of "
                            f"train.list; lists from {list_src}")
    geometry = dict(spacing=tuple(args.h5_spacing), axes="zyx") if layout == "h5" else {}
    slices_per_patient: Dict[str, int] = {}

    def read_case(case: str, group: str):
        if not src.has(case):
            raise CaseAbsent(src.where(case))
        image, label = src.read(case)
        nz = image.shape[0] if layout == "h5" else image.GetSize()[2]
        slices_per_patient[patient_of(case)] = slices_per_patient.get(patient_of(case), 0) + nz
        if group == "labeled" and label is None:
            raise ConversionError(f"case {case}: labeled case without label ({src.where(case)}).")
        return image, label, geometry

    with RawDatasetWriter(args.output_root, args.dataset_id, DATASET_NAME, CHANNEL_NAMES, LABELS,
                          overwrite=args.overwrite,
                          description=f"ACDC, {layout} layout, SSL4MIS split (nnunet_semi)"
                                      + (f"; spacing {tuple(args.h5_spacing)} mm assigned (not stored in the h5)"
                                         if layout == "h5" else ""),
                          reference="Bernard et al., IEEE TMI 2018 (ACDC)", license="research use with citation",
                          origin_dataset=DATASET_NAME) as writer:
        present = write_split(writer, split, read_case, desc="ACDC")
        for p, n in KNOWN_SLICE_COUNTS.items():
            both = [f"patient{p}_frame01", f"patient{p}_frame02"]
            if all(c in present for c in both) and slices_per_patient.get(p) != n:
                raise ConversionError(f"patient{p}: {slices_per_patient.get(p)} slices over both frames, but "
                                      f"SSL4MIS counts {n}; the input does not match the standard ACDC data.")
        warn_absent_labeled(split, present)
        std = {k: restrict_split(s, present) for k, s in standard_splits(train, val, test).items()}
        return writer.finish(restrict_split(split, present), std)


def main(argv=None) -> None:
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
