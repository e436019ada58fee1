"""M&Ms (multi-centre, multi-vendor & multi-disease cardiac MRI, 2020) -> semi-supervised nnU-Net raw
dataset for semi-supervised domain generalisation (SemiDG), with the vendor splits of A&D / GenericSSL.

Accepted input (the public M&Ms "OpenDataset" download)::

    <input>/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
    <input>/Training/Labeled/<code>/<code>_sa.nii.gz  <code>_sa_gt.nii.gz
    <input>/Validation/<code>/...   <input>/Testing/<code>/...   (same two files)
    <input>/Training/Unlabeled/<code>/...                        (not used, see below)

``-i`` may also be the folder that contains ``OpenDataset/``. ``--info-csv`` overrides the
information file (default: the file above, else the only ``*M&Ms*information*.csv`` in the folder).
The CSV must have the columns ``External code``, ``Vendor`` (A-D), ``ED`` and ``ES`` (``Centre``
is recorded when present; other columns such as ``VendorName`` are not read);
``ED``/``ES`` are 0-based indices of the end-diastolic / end-systolic frame along the 4th (time)
axis of both 4D files (the frames that carry the ground truth). Each subject's ED and ES frames
become two 3D cases ``<code>_ED`` and ``<code>_ES`` (geometry of the 4D file's first three axes).
A subject is looked up in Training/Labeled, Validation and Testing; the 25 vendor-C subjects of
Training/Unlabeled have no annotation and are not used (as in GenericSSL, whose vendor lists hold
the 320 annotated subjects: A 95, B 125, C 50, D 50).

Labels (M&Ms convention, kept as they are): 0 background, 1 LV blood pool, 2 LV myocardium (MYO),
3 RV blood pool. Any other value is an error naming the case; so is an empty ground truth at the
ED or ES frame given by the CSV.

Setting (GenericSSL ``mnms_{A..D}_{0.02,0.05}``): ``--target X`` is the unseen vendor and ``--ratio
r`` the labeled fraction. labeled = ceil(r * n_v) subjects (both frames) of each of the three other
vendors v; unlabeled = the other subjects of those vendors (labels to labelsWithheld/); test = all
subjects of vendor X (labels to labelsTs/); no val group (GenericSSL's eval list is the labeled set,
its train.sh evaluates on the test vendor). By default the labeled subjects are GenericSSL's
published ones (``MNMS_data/split_txts/train_to<X>_labeled_<r>.txt``; where that file is not
published, the other-vendor subjects missing from ``train_to<X>_unlabeled_<r>.txt``); the eight
selections are in :data:`GENERICSSL_LABELED`. ``--seed N`` instead draws ceil(r * n_v) subjects per
vendor with ``numpy.random.default_rng(N)`` among the subjects present. splits_standard/ holds the
GenericSSL selections of both ratios for the target. Each case's vendor (also its ``domain``) and
centre are written to ``case_metadata.json`` (:class:`nnunet_semi.layout.CaseMetadata`) beside
``splits_semi.json``::

    {"format": 1, "target_domain": "A", "source_domains": ["B", "C", "D"],
     "cases": {"A0S9V9_ED": {"domain": "A", "vendor": "A", "centre": 1, "origin_dataset": "MNMs"}, ...}}

Images are written at native resolution; GenericSSL's z-crop to the labeled slices, central 2/3
in-plane crop and zoom to 32x144x144 are left to nnU-Net's preprocessing.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_semi.conversion.common import (ConversionError, RawDatasetWriter, make_parser, parse_args, read_sitk,
                                           restrict_split, run_main, split_groups, warn_absent_labeled)
from nnunet_semi.layout import CASE_METADATA_FILE, SemiSplit

DEFAULT_DATASET_ID = 31
DATASET_NAME = "MNMs"
INFO_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
VENDORS = ("A", "B", "C", "D")
RATIOS = ("0.02", "0.05")
PHASES = ("ED", "ES")
LABELS = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
ANNOTATED_FOLDERS = ("Training/Labeled", "Validation", "Testing")
UNANNOTATED_FOLDERS = ("Training/Unlabeled",)
REQUIRED_COLUMNS = ("External code", "Vendor", "ED", "ES")  # "Centre" is optional (case_metadata.json)

#: GenericSSL's labeled subjects per (target vendor, ratio), by source vendor
#: (MNMS_data/split_txts; ceil(r * n_v) subjects of each source vendor, n = A 95, B 125, C 50, D 50).
GENERICSSL_LABELED: Dict[Tuple[str, str], Dict[str, List[str]]] = {
    ("A", "0.02"): {"B": ["A5D0G0", "I6N3P3", "J9L6N9"], "C": ["E3F2U7"], "D": ["H6P7T1"]},
    ("A", "0.05"): {"B": ["A3B7E5", "A5D0G0", "A8E1F4", "B5L5Y4", "I6N3P3", "J9L6N9", "O3R8Y5"],
                    "C": ["D1H2O9", "E3F2U7", "I4R8V6"], "D": ["F9M1R2", "H6P7T1", "T2Z1Z9"]},
    ("B", "0.02"): {"A": ["C2J0K3", "D1J5P6"], "C": ["D2U0V0"], "D": ["A6B7Y4"]},
    ("B", "0.05"): {"A": ["B0H7V0", "B5F8L9", "C8P3S7", "K6N4N7", "L4Q2U3"],
                    "C": ["I6P4R0", "Q1Q3T1", "V4W8Z5"], "D": ["A5P5W0", "F9M1R2", "N7P3T8"]},
    ("C", "0.02"): {"A": ["N5S7Y1", "P0S5Y0"], "B": ["C0S7W0", "H1W2Y1", "Q3Q6R8"], "D": ["L8M2U8"]},
    ("C", "0.05"): {"A": ["A2L1N6", "C6E0F9", "C6J5P1", "D3D4Y5", "Q3R9W7"],
                    "B": ["A7G0P5", "A8E1F4", "D6H6O2", "F8N2S1", "G1K1V3", "H8K2K7", "Q7V1Y5"],
                    "D": ["E5J6L2", "H6P7T1", "Q4W5Z8"]},
    ("D", "0.02"): {"A": ["B0I2Z0", "B9H8N8"], "B": ["A3B7E5", "A9J8W7", "M6V2Y0"], "C": ["E9V9Z2"]},
    ("D", "0.05"): {"A": ["B0H7V0", "B5F8L9", "C8P3S7", "K6N4N7", "L4Q2U3"],
                    "B": ["B3D0N1", "C4S8W9", "G3M5S4", "G4L8Z7", "H4I2T8", "I0J5U3", "M6V2Y0"],
                    "C": ["I6P4R0", "Q1Q3T1", "V4W8Z5"]},
}


def case_ids(code: str) -> List[str]:
    return [f"{code}_{p}" for p in PHASES]


def setting_name(target: str, ratio: str) -> str:
    return f"to{target}_{ratio}"


def read_info_csv(path: str) -> Dict[str, dict]:
    """External code -> {'vendor', 'centre', 'ED', 'ES'} for every row with vendor A-D."""
    import pandas as pd
    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise ConversionError(f"cannot read the M&Ms information file {path} ({e}).") from e
    df.columns = [str(c).strip() for c in df.columns]
    lacking = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if lacking:
        raise ConversionError(f"{path}: missing column(s) {lacking}; the M&Ms information CSV has "
                              f"{list(REQUIRED_COLUMNS)} (found {list(df.columns)}).")
    info: Dict[str, dict] = {}
    for _, row in df.iterrows():
        code = str(row["External code"]).strip()
        vendor = str(row["Vendor"]).strip().upper()
        if vendor not in VENDORS or not code or code.lower() == "nan":
            continue
        if code in info:
            raise ConversionError(f"{path}: subject {code} is listed twice.")
        try:
            ed, es = int(row["ED"]), int(row["ES"])
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{path}: subject {code} has no integer ED/ES frame "
                                  f"(ED={row['ED']!r}, ES={row['ES']!r}).") from e
        centre = row["Centre"] if "Centre" in df.columns else None
        centre = None if centre is None or pd.isna(centre) else centre
        try:
            centre = int(centre)
        except (TypeError, ValueError):
            centre = None if centre is None else str(centre)
        info[code] = {"vendor": vendor, "centre": centre, "ED": ed, "ES": es}
    if not info:
        raise ConversionError(f"{path}: no subject with vendor A-D.")
    return info


def select_labeled(target: str, ratio: str, subjects_by_vendor: Dict[str, List[str]],
                   seed: Optional[int]) -> Dict[str, List[str]]:
    """Labeled subjects per source vendor: GenericSSL's (seed None) or a seeded ceil(r*n) draw."""
    if seed is None:
        return {v: list(s) for v, s in GENERICSSL_LABELED[(target, ratio)].items()}
    rng = np.random.default_rng(seed)
    out = {}
    for v in VENDORS:
        if v == target:
            continue
        subjects = sorted(subjects_by_vendor.get(v, []))
        k = min(len(subjects), math.ceil(float(ratio) * len(subjects)))
        picked = rng.choice(len(subjects), size=k, replace=False) if k else []
        out[v] = sorted(subjects[i] for i in picked)
    return out


def make_split(target: str, ratio: str, subjects_by_vendor: Dict[str, List[str]],
               labeled_by_vendor: Dict[str, List[str]], seed: Optional[int] = None) -> SemiSplit:
    labeled, unlabeled, test = [], [], []
    for v in VENDORS:
        subjects = subjects_by_vendor.get(v, [])
        if v == target:
            test += [c for s in subjects for c in case_ids(s)]
            continue
        chosen = labeled_by_vendor.get(v, [])
        labeled += [c for s in chosen for c in case_ids(s)]
        unlabeled += [c for s in subjects if s not in chosen for c in case_ids(s)]
    src = [v for v in VENDORS if v != target]
    how = (f"seeded draw (numpy default_rng({seed})) of ceil({ratio}*n) subjects per source vendor" if seed is not None
           else f"GenericSSL's published labeled subjects (MNMS_data/split_txts, to{target} {ratio})")
    return SemiSplit(labeled=labeled, unlabeled=unlabeled, test=test, val=[],
                     setting=setting_name(target, ratio) + (f"_seed{seed}" if seed is not None else ""), seed=seed,
                     notes=f"A&D/GenericSSL SemiDG M&Ms: target vendor {target} (all its subjects = test), source "
                           f"vendors {','.join(src)}; labeled = {how}, both ED and ES frames; unlabeled = the other "
                           f"source-vendor subjects; no val group. Cases <code>_ED/<code>_ES; vendor per case in "
                           f"{CASE_METADATA_FILE}.")


def _find_root(path: str) -> str:
    if not any(os.path.isdir(os.path.join(path, f)) for f in ANNOTATED_FOLDERS) \
            and os.path.isdir(os.path.join(path, "OpenDataset")):
        return os.path.join(path, "OpenDataset")
    return path


def _find_csv(root: str, override: Optional[str]) -> str:
    if override:
        if not os.path.isfile(override):
            raise ConversionError(f"information file {override} does not exist.")
        return override
    default = os.path.join(root, INFO_CSV)
    if os.path.isfile(default):
        return default
    found = sorted(glob.glob(os.path.join(glob.escape(root), "*M&Ms*nformation*.csv")))
    if len(found) == 1:
        return found[0]
    raise ConversionError(f"no M&Ms information file {default}" + (f" (several candidates: {found})" if found else "")
                          + "; pass --info-csv.")


def _extract_frame(img4d: sitk.Image, t: int) -> sitk.Image:
    size = list(img4d.GetSize())
    return sitk.Extract(img4d, size[:3] + [0], [0, 0, 0, t])


def _read_frames(path: str, case_prefix: str, what: str, frames: Dict[str, int]) -> Dict[str, sitk.Image]:
    img = read_sitk(path, case_prefix, label=what != "image")
    if img.GetDimension() != 4:
        raise ConversionError(f"case {case_prefix}: {path} is {img.GetDimension()}D; the M&Ms {what} is a 4D cine.")
    n_t = img.GetSize()[3]
    out = {}
    for phase, t in frames.items():
        if not 0 <= t < n_t:
            raise ConversionError(f"case {case_prefix}_{phase}: frame {t} (information CSV) is outside the "
                                  f"{n_t} frames of {path}.")
        out[phase] = _extract_frame(img, t)
    return out


def _labeled_frames(path: str) -> List[int]:
    arr = sitk.GetArrayViewFromImage(sitk.ReadImage(path))  # t, z, y, x
    return [int(t) for t in np.nonzero(arr.reshape(arr.shape[0], -1).any(axis=1))[0]]


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], DEFAULT_DATASET_ID, labeled=False,
                    labeled_error="--labeled does not apply to M&Ms: the labeled subjects are set by --ratio "
                                  "(and --seed)",
                    input_help="the extracted M&Ms OpenDataset folder (holding the information CSV, "
                               "Training/, Validation/, Testing/)")
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--target", required=True, choices=VENDORS, help="unseen (test) vendor")
    p.add_argument("--ratio", default="0.02", choices=RATIOS,
                   help="labeled fraction of each source vendor's subjects (default 0.02)")
    p.add_argument("--seed", type=int, default=None,
                   help="draw the labeled subjects with this seed instead of using GenericSSL's published ones")
    p.add_argument("--info-csv", default=None, help=f"information CSV (default <input>/{INFO_CSV})")
    return p


def convert(argv: Optional[List[str]] = None) -> str:
    args = parse_args(build_parser(), argv)
    root = _find_root(args.input)
    csv_path = _find_csv(root, args.info_csv)
    info = read_info_csv(csv_path)
    with RawDatasetWriter(
            args.output_root, args.dataset_id, f"{DATASET_NAME}_to{args.target}", {0: "cineMRI"}, LABELS,
            overwrite=args.overwrite,
            description=f"M&Ms cardiac cine MRI, ED/ES frames, SemiDG split (GenericSSL): unseen vendor {args.target}",
            reference="https://www.ub.edu/mnms/", license="see the M&Ms challenge data use terms",
            origin_dataset=DATASET_NAME) as writer:
        writer.metadata.target_domain = args.target
        writer.metadata.source_domains = [v for v in VENDORS if v != args.target]
        print(f"M&Ms: {len(info)} subjects with vendor A-D in {csv_path}")

        # where is each subject?
        folders: Dict[str, str] = {}
        unannotated: List[str] = []
        for code in sorted(info):
            where = [os.path.join(root, f, code) for f in ANNOTATED_FOLDERS]
            hit = next((w for w in where if os.path.isdir(w)), None)
            if hit is None:
                if any(os.path.isdir(os.path.join(root, f, code)) for f in UNANNOTATED_FOLDERS):
                    unannotated.append(code)
                else:
                    writer.report_missing(code, " or ".join(where))
                continue
            folders[code] = hit
        if unannotated:
            print(f"note: {len(unannotated)} subject(s) in {', '.join(UNANNOTATED_FOLDERS)} have no annotation "
                  f"and are not used")
        subjects_by_vendor = {v: sorted(c for c in folders if info[c]["vendor"] == v) for v in VENDORS}
        print("subjects per vendor: " + ", ".join(f"{v} {len(s)}" for v, s in subjects_by_vendor.items()))

        labeled_by_vendor = select_labeled(args.target, args.ratio, subjects_by_vendor, args.seed)
        for v, codes in labeled_by_vendor.items():
            for code in codes:
                if code not in info:
                    writer.report_missing(code, f"{csv_path} (labeled subject of vendor {v} not in the CSV)")
                elif info[code]["vendor"] != v:
                    raise ConversionError(f"subject {code}: vendor {info[code]['vendor']} in {csv_path}, but "
                                          f"GenericSSL lists it as a vendor-{v} subject. Is this the M&Ms "
                                          f"information file?")
        split = make_split(args.target, args.ratio, subjects_by_vendor, labeled_by_vendor, args.seed)
        standard = {setting_name(args.target, r): make_split(args.target, r, subjects_by_vendor,
                                                             select_labeled(args.target, r, subjects_by_vendor, None))
                    for r in RATIOS}
        group_of = dict(split_groups(split))

        for code in writer.progress(sorted(folders, key=lambda c: (info[c]["vendor"], c)),
                                    desc=f"M&Ms to{args.target}"):
            folder = folders[code]
            img_path = os.path.join(folder, f"{code}_sa.nii.gz")
            gt_path = os.path.join(folder, f"{code}_sa_gt.nii.gz")
            missing = [p for p in (img_path, gt_path) if not os.path.isfile(p)]
            if missing:
                writer.report_missing(code, missing[0])
                continue
            frames = {p: info[code][p] for p in PHASES}
            images = _read_frames(img_path, code, "image", frames)
            labels = _read_frames(gt_path, code, "ground truth", frames)
            for phase in PHASES:
                case = f"{code}_{phase}"
                if not np.any(sitk.GetArrayViewFromImage(labels[phase])):
                    raise ConversionError(
                        f"case {case}: the ground truth is empty at frame {frames[phase]} ({phase} in {csv_path}); "
                        f"annotated frames of {gt_path}: {_labeled_frames(gt_path)}.")
                writer.add_case(case, group_of.get(case, "test"), images[phase], labels[phase])
                writer.metadata.set(case, domain=info[code]["vendor"], vendor=info[code]["vendor"],
                                    centre=info[code]["centre"])
        warn_absent_labeled(split, writer.labeled)
        present = writer.labeled + writer.unlabeled + writer.test
        active = restrict_split(split, present)
        return writer.finish(active, {k: restrict_split(s, present) for k, s in standard.items()})


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: exits with 0, or 1 after one 'error: ...' line for bad input."""
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
