"""Convert the 2018 Left Atrium Segmentation Challenge (LA) into a semi-supervised nnU-Net raw
dataset (default Dataset028_LeftAtrium), with the community-standard UA-MT split.

Input layouts (one per conversion; mixing them is refused because they differ in crop and intensities):

- UA-MT h5 (``<root>/<ID>/mri_norm2.h5``, e.g. ``2018LA_Seg_Training Set/<ID>/mri_norm2.h5``): datasets
  ``image`` (float32, z-scored, cropped in x/y around the atrium) and ``label`` (uint8 {0,1}), both with
  axes **x, y, z**. The h5 stores no spacing; the challenge LGE-MRI is **0.625 mm isotropic**, which is
  the spacing written (origin 0, identity direction). Published metrics on LA are in voxels anyway.
- original challenge nrrd (``<ID>/lgemri.nrrd`` + ``<ID>/laendo.nrrd``, e.g. under ``Training Set/``
  and ``Testing Set/``): read with pynrrd; spacing, origin and direction from the header's
  ``space directions`` / ``space origin`` (RAS headers are converted to ITK's LPS); the cavity mask
  value 255 becomes label 1. Intensities are the raw uint8 ones and the volume is not cropped (nnU-Net
  normalises and crops itself), so results are not bit-comparable with the UA-MT crops.

Case folders are found anywhere up to three levels below ``-i``; case ids are the challenge ids.

Split: ``train.list`` (80 ids) and ``test.list`` (20 ids) are read from the input folder (or the case
folder's parent) when present, else the canonical UA-MT lists embedded below
(:data:`TRAIN_IDS`, :data:`TEST_IDS`; the original download has no list files). Labeled = the first
N of train.list (``--labeled``, standard N = 4, 8, 16; default 8), unlabeled = the rest of train.list
(their labels go to labelsWithheld/), test = test.list (imagesTs/labelsTs). ``splits_standard/``
gets ``4_labeled``, ``8_labeled`` and ``16_labeled``. Listed cases that are absent (the shared copy has
only the first 24 train cases and no test case) are skipped with one line each and counted; the split
files list only the cases that were converted.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnunet_semi.conversion.common import (CaseAbsent, ConversionError, RawDatasetWriter, check_image_voxels,
                                           make_parser, parse_args, read_list, restrict_split, run_main,
                                           warn_absent_labeled, write_split)
from nnunet_semi.layout import SemiSplit

DEFAULT_DATASET_ID = 28
DATASET_NAME = "LeftAtrium"
CHANNEL_NAMES = {0: "LGE-MRI"}
LABELS = {"background": 0, "left atrium": 1}
DEFAULT_LABELED = 8
STANDARD_LABELED = (4, 8, 16)
H5_SPACING = (0.625, 0.625, 0.625)
H5_NAME = "mri_norm2.h5"
NRRD_IMAGE = "lgemri.nrrd"
NRRD_LABEL = "laendo.nrrd"

# UA-MT data/train.list (yulequan/UA-MT; identical in CrossMatch, RLSSS, GenericSSL): 80 ids, sorted
TRAIN_IDS: Tuple[str, ...] = tuple("""
06SR5RBREL16DQ6M8LWS 0RZDK210BSMWAA6467LU 1D7CUD1955YZPGK8XHJX 1GU15S0GJ6PFNARO469W
1MHBF3G6DCPWHSKG7XCP 23X6SY44VT9KFHR7S7OC 2XL5HSFSE93RMOJDRGR4 38CWS74285MFGZZXR09Z
3C2QTUNI0852XV7ZH4Q1 3DA0T2V6JJ2NLUAV6FWM 4498CA6DZWELOXCBRYRF 45C45I6IXAFGNRO067W9
4CHFJGF6ZUM7CMZTNFQF 4EPVTT1HPA8U60CDUKXE 57SGAJMLCTCH92QUA0EE 5BHTH9RHH3PQT913I59W
5FKQL4K14KCB72Y8YMC2 5HH0WPWIY06DLAFOBQ4M 5QFK2PMHNX7UALK52NNA 5UB5KFD2PK38Z4LS6W80
6799D6LEBH3NSRV1KH27 78NJ5YFQF72BGC8RO51C 7FUCNXB39F78WTOP5K71 8GYK8A9MBRC9TV0FVSRA
8M99G0JLAXG9GLPV0O8G 8RE90C8H5DKF4V6HO8UU 8ZG2TRZ81MAWHZPN9KKG 9DCM2IB45SK6YKQNYUQY
9DHWWP5Y66VDMPXISZ13 9DQYTIU00I4JC0OEOKQQ A11O45O3NAXWM7T2H8CH A4R1S23KR0KU2WSYHK2X
A5RNNK0A891WUSC2V624 AT5CRO5JUDBWD4RUPXSQ BNK95S2SJXEGSW7VAKYU BXJWOUYP2J3EN4U92517
BYSRSI3H4YTWKMM3MADP BZUFJX66T0W6ZPVTL9DU CB5P5W7X310NIIVU7UZV CBIJFVZ5L9BS0LKWE8YL
CCGAKN4EDT72KC8TTJ76 CLXFYOBQDCVXQ9P7YC07 CMPXO4J23G58J53Q98SZ CZPMV6KWZ4I7IJJP9FOK
DLKXBV73A55ZTSZ0QQI2 DQ5UYBGR5QP6L692QSG6 DYXSCIWHLSUOZIDDSZ40 E2ZMO66WGS74UKXTZPPQ
EJ5V7SPR4961JWD6SS8V FGM5NIWN3URY4HF4WNUW GSC9KNY0VEZXFSGWNF25 HVE7DR3CUA2IM3RC6OMA
HZZ4O0BRKF8S0YX3NNF7 I2VZ7N8H9QYNYT7ZZF1Y IDWWHGWJ5STOQXSDT6GU IIY6TYJMTJIZRIZLB9YW
IJJY51YW3W4YJJ7DTVTK IQYKPTWXVV9H0IHB8YXC JEC6HJ7SQJXBKVREX03F JGFOLWJF7YCYD8DPHQNH
K32FD6LRSUSSXGS1YUOX KM5RYAMP4P4ZP6XWP3Q2 KSNYHUBHHUJTYJ14UQZR LH4FVU3TQDEC87YGN6FL
LJSDNMND9SHKM7Q4IRHJ MFTDVMBWFNQ3F5KHBRDR MJHV7F65TB2A76CQLOC3 MVKIPGBKTNSENNP1S4HB
O5TSIKRD4AIB8K84WIR9 OIRDLE32TXZX942FVZMM P1OTI3IWJUIB5NRLULLH PVNXUK681N9BY14K4Z86
Q0MEX9ZIKAGJORSPLQ3Y Q7J0WYM695R9MA285ZW0 QZC1W0FNR19KJFLOCFLH R8ER97O9UUN77C02VE2J
RSZY41MT2FGDKHWWL5L2 SN4LF8SGBSRQUPTDSX78 TDDI6L3Y0L9VVFP9MNFS UZUZZT2W9IUSHL6ASOX3
""".split())

# UA-MT data/test.list, file order (it is not the last 20 alphabetically)
TEST_IDS: Tuple[str, ...] = tuple("""
UPT6DX9IQY9JAZ7HJKA7 UTBUJIWZMKP64E3N73YC ULHWPWKKLTE921LQLH1P V0MZOWJ6MU3RMRCV9EXR
VDOF02M8ZHEAADFMS6NP VG4C826RAAKVMV9BQLVD VIXBEFTNVHZWKAKURJBN VQ2L3WM8KEVF6L44E6G9
WBG9WYZ1B25WDT5WAT8T WMDG2EFA6L2SNDZXIRU0 WNPKE0W404QE9AELX1LR WSJB9P4JCXUVHBOYFVWL
WW8F5CO4S4K5IM5Z7EXX X18LU5AOBNNDMLTA0JZL XYDLYJ5CS19FDBVLJIPI Y7ZU0B2APPF54WG6PDMF
YDKD1HVHSME6NVMA8I39 Z9GMG63CJLL0VW893BB1 ZIJLJAVQV3FJ6JSQOH1E ZQPMJ4XEC5A4BISD45P1
""".split())


def _list_id(line: str) -> str:
    """UA-MT list lines are bare ids; tolerate paths such as '<ID>/mri_norm2.h5'."""
    parts = [p for p in line.replace("\\", "/").split("/") if p]
    if len(parts) > 1 and parts[-1] in (H5_NAME, NRRD_IMAGE, NRRD_LABEL):
        return parts[-2]
    return parts[-1]


def find_cases(root: str, max_depth: int = 3) -> Dict[str, Tuple[str, str]]:
    """Case id -> (layout 'h5' | 'nrrd', case folder), searching up to ``max_depth`` levels below root."""
    found: Dict[str, Tuple[str, str]] = {}
    root = os.path.abspath(root)
    base_depth = root.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = dirpath.rstrip(os.sep).count(os.sep) - base_depth
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if depth >= max_depth:
            dirnames[:] = []
        kind = "h5" if H5_NAME in filenames else ("nrrd" if NRRD_IMAGE in filenames else None)
        if kind is None or dirpath == root:
            continue
        case = os.path.basename(dirpath)
        if case in found:
            raise ConversionError(f"case {case}: found twice ({found[case][1]} and {dirpath}); keep one copy.")
        found[case] = (kind, dirpath)
    kinds = {k for k, _ in found.values()}
    if len(kinds) > 1:
        ex = {k: next(d for kk, d in found.values() if kk == k) for k in kinds}
        raise ConversionError(f"{root} mixes the UA-MT h5 layout (e.g. {ex['h5']}) and the challenge nrrd layout "
                              f"(e.g. {ex['nrrd']}); they differ in crop and intensities. Convert one of them.")
    return found


def find_lists(root: str, case_parent: Optional[str]) -> Tuple[List[str], List[str], str]:
    """(train ids, test ids, where they came from): list files next to the input or the case folders,
    else the embedded canonical lists."""
    for d in [root] + ([case_parent] if case_parent else []):
        tr, te = os.path.join(d, "train.list"), os.path.join(d, "test.list")
        if os.path.isfile(tr) and os.path.isfile(te):
            train = [_list_id(x) for x in read_list(tr)]
            test = [_list_id(x) for x in read_list(te)]
            if set(train) & set(test):
                raise ConversionError(f"{tr} and {te} share cases: {sorted(set(train) & set(test))[:5]}")
            return train, test, f"{tr}, {te}"
    return list(TRAIN_IDS), list(TEST_IDS), "canonical UA-MT lists embedded in nnunet_semi.conversion.la"


def read_h5_case(folder: str, case: str):
    import h5py
    path = os.path.join(folder, H5_NAME)
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f:
                raise ConversionError(f"case {case}: {path} lacks the 'image'/'label' datasets (has {list(f)}).")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = np.asarray(f["label"][()])
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"case {case}: cannot read {path} ({e}).") from e
    check_image_voxels(image, case, path)
    return image, label, dict(spacing=H5_SPACING, axes="xyz")


def _nrrd_geometry(header: dict, path: str, case: str):
    """spacing, origin, direction (ITK/LPS) from a pynrrd header with axes x, y, z."""
    sd = header.get("space directions")
    if sd is not None:
        sd = np.asarray(sd, dtype=float)
        if sd.shape != (3, 3) or not np.all(np.isfinite(sd)):
            raise ConversionError(f"case {case}: {path} has unsupported 'space directions' {sd.tolist()}.")
        spacing = np.linalg.norm(sd, axis=1)
        if np.any(spacing <= 0):
            raise ConversionError(f"case {case}: {path} has a zero-length space direction.")
        dirs = (sd / spacing[:, None]).T          # columns = axis directions
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
        space = str(header.get("space", "left-posterior-superior")).lower()
        if space in ("right-anterior-superior", "ras"):
            flip = np.diag([-1.0, -1.0, 1.0])
            dirs, origin = flip @ dirs, flip @ origin
        elif space not in ("left-posterior-superior", "lps"):
            raise ConversionError(f"case {case}: {path} has unsupported space '{space}'.")
        return tuple(spacing), tuple(origin), tuple(dirs.flatten())
    sp = header.get("spacings")
    if sp is not None and len(sp) == 3 and np.all(np.isfinite(sp)):
        return tuple(float(s) for s in sp), None, None
    raise ConversionError(f"case {case}: {path} has neither 'space directions' nor 'spacings'; spacing unknown.")


def read_nrrd_case(folder: str, case: str, with_label: bool = True):
    import nrrd
    ipath, lpath = os.path.join(folder, NRRD_IMAGE), os.path.join(folder, NRRD_LABEL)
    try:
        image, ih = nrrd.read(ipath)  # index order 'F': axes x, y, z
    except Exception as e:
        raise ConversionError(f"case {case}: cannot read {ipath} ({e}).") from e
    if image.ndim != 3:
        raise ConversionError(f"case {case}: {ipath} is {image.ndim}D; 3D expected.")
    check_image_voxels(image, case, ipath)
    spacing, origin, direction = _nrrd_geometry(ih, ipath, case)
    label = None
    if with_label and os.path.isfile(lpath):
        try:
            label, lh = nrrd.read(lpath)
        except Exception as e:
            raise ConversionError(f"case {case}: cannot read {lpath} ({e}).") from e
        lsp = _nrrd_geometry(lh, lpath, case)[0]
        if not np.allclose(lsp, spacing, rtol=1e-4):
            raise ConversionError(f"case {case}: label spacing {lsp} differs from image spacing {spacing}.")
        vals = np.unique(label)
        if not set(vals.tolist()) <= {0, 255}:
            raise ConversionError(f"case {case}: {lpath} has values {vals.tolist()[:10]}; expected 0 and 255.")
        label = (label == 255).astype(np.uint8)
    return image, label, dict(spacing=spacing, origin=origin, direction=direction, axes="xyz")


def standard_splits(train: List[str], test: List[str]) -> Dict[str, SemiSplit]:
    return {f"{n}_labeled": SemiSplit(labeled=train[:n], unlabeled=train[n:], test=list(test), val=[],
                                      setting=f"{n}_labeled",
                                      notes=f"LA, UA-MT split: labeled = first {n} of train.list")
            for n in STANDARD_LABELED}


def build_parser():
    p = make_parser(
        "Convert the 2018 Left Atrium challenge data into a semi-supervised nnU-Net raw dataset with the UA-MT "
        "split (labeled = first N of train.list, test = test.list).\n"
        "Layouts: UA-MT h5 (<ID>/mri_norm2.h5, 'image'/'label' with axes x,y,z; no spacing stored, "
        "0.625 mm isotropic is written) or the challenge nrrd (<ID>/lgemri.nrrd + laendo.nrrd, spacing from "
        "the header, 255 -> 1). train.list/test.list are read from the input folder if present, else the "
        "canonical lists built into this converter are used.",
        DEFAULT_DATASET_ID, DEFAULT_LABELED, labeled_help="labeled cases = first N of train.list (standard: 4, 8, 16)",
        input_help="folder holding the case folders (e.g. the UA-MT 'data' folder or '2018LA_Seg_Training Set')")
    return p


def convert(argv=None) -> str:
    parser = build_parser()
    args = parse_args(parser, argv)
    cases = find_cases(args.input)
    if not cases:
        raise ConversionError(f"{args.input}: no case folder with {H5_NAME} or {NRRD_IMAGE} found (searched 3 "
                              f"levels deep).")
    parents = sorted({os.path.dirname(d) for _, d in cases.values()})
    train, test, list_src = find_lists(args.input, parents[0] if len(parents) == 1 else None)
    if not 1 <= args.labeled <= len(train):
        parser.error(f"--labeled must be between 1 and {len(train)}")
    layout = next(iter(cases.values()))[0]
    print(f"input {args.input}: {layout} layout, {len(cases)} case folders; lists: {list_src}")
    if not list_src.startswith("canonical") and (tuple(train) != TRAIN_IDS or tuple(test) != TEST_IDS):
        print("note: the list files differ from the canonical UA-MT lists; using the list files.")
    listed = set(train) | set(test)
    extra = sorted(set(cases) - listed)
    if extra:
        print(f"note: {len(extra)} case folder(s) not in train.list/test.list are ignored (e.g. {extra[0]})")
    split = SemiSplit(labeled=train[:args.labeled], unlabeled=train[args.labeled:], test=test, val=[],
                      setting=f"{args.labeled}_labeled",
                      notes=f"LA, UA-MT split: labeled = first {args.labeled} of train.list; lists from {list_src}")

    def read_case(case: str, group: str):
        if case not in cases:
            raise CaseAbsent(os.path.join(parents[0] if len(parents) == 1 else args.input, case))
        kind, folder = cases[case]
        image, label, geo = read_h5_case(folder, case) if kind == "h5" else read_nrrd_case(folder, case)
        if group == "labeled" and label is None:
            raise ConversionError(f"case {case}: labeled case without label in {folder}.")
        return image, label, geo

    with RawDatasetWriter(args.output_root, args.dataset_id, DATASET_NAME, CHANNEL_NAMES, LABELS,
                          overwrite=args.overwrite,
                          description=f"2018 LA Segmentation Challenge, {layout} layout, UA-MT split "
                                      f"(nnunet_semi)" + (", spacing 0.625 mm isotropic assigned (not stored "
                                                          "in the h5)" if layout == "h5" else ""),
                          reference="Xiong et al., MedIA 2021 (2018 Atrial Segmentation Challenge)",
                          license="research use with citation", origin_dataset=DATASET_NAME) as writer:
        present = write_split(writer, split, read_case, desc="LA")
        warn_absent_labeled(split, present)
        std = {k: restrict_split(s, present) for k, s in standard_splits(train, test).items()}
        return writer.finish(restrict_split(split, present), std)


def main(argv=None) -> None:
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
