"""MM-WHS 2017 (multi-modality whole heart segmentation, CT and MR) -> semi-supervised nnU-Net raw
dataset for unsupervised domain adaptation (UDA), with the CT<->MR splits of A&D / GenericSSL.

Accepted input (the public MM-WHS 2017 training release, ``ct_train.zip`` and ``mr_train.zip``)::

    <input>/ct_train/ct_train_1001_image.nii.gz  ct_train_1001_label.nii.gz  ... ct_train_1020_*
    <input>/mr_train/mr_train_1001_image.nii.gz  mr_train_1001_label.nii.gz  ... mr_train_1020_*

``--ct-dir`` / ``--mr-dir`` override the two folders (relative to ``-i`` or absolute); uncompressed
``.nii`` files are accepted too. The test releases (``ct_test``/``mr_test``, no labels) are not used.

Labels: MM-WHS encodes the structures as 205 myocardium (MYO), 420 left atrium blood cavity (LAC),
500 left ventricle blood cavity (LVC), 550 right atrium, 600 right ventricle, 820 ascending aorta
(AA), 850 pulmonary artery. As in GenericSSL, MYO 205 -> 1, LAC 420 -> 2, LVC 500 -> 3, AA 820 -> 4 and
every other MM-WHS structure (550, 600, 850) -> 0. A value that is not an MM-WHS code at all is an
error naming the case (wrong file?); ``--ignore-unknown-values`` maps such values to 0 as well, which
is exactly GenericSSL's ``label > 4 -> 0`` rule.

Settings (``--setting``; GenericSSL ``MMWHS_data/splits_txts``, settings ``mmwhs_ct2mr``/``mmwhs_mr2ct``):

    ct2mr  labeled = 16 CT (source), unlabeled = 13 MR, val = 3 MR {1012, 1015, 1016},
           test = 4 MR {1007, 1009, 1018, 1019}
    mr2ct  labeled = 16 MR (source), unlabeled = 13 CT, val = 3 CT {1005, 1011, 1015},
           test = 4 CT {1003, 1008, 1014, 1019}

The 16 source cases are the source-domain cases that are not in that domain's test list; the four
source-domain test cases are not used by the setting and are not written. Target-domain labels of
the unlabeled cases go to labelsWithheld/, those of val/test to labelsTs/. Case ids keep the MM-WHS
names (``ct_train_1001``, ``mr_train_1001``).

Domains: ``case_metadata.json`` (:class:`nnunet_semi.layout.CaseMetadata`) beside ``splits_semi.json``
holds every case's modality as its ``domain`` (and ``origin_dataset`` "MMWHS"), with the setting's
``target_domain`` and ``source_domains``::

    {"format": 1, "target_domain": "MR", "source_domains": ["CT"],
     "cases": {"ct_train_1006": {"domain": "CT", "origin_dataset": "MMWHS"}, ...}}

Channel name ``zscore`` (nnU-Net per-image z-score normalisation): nnU-Net's ``CT`` scheme would
clip target-domain MR with intensity statistics of the labeled domain. Every image and label is
reoriented to the identity direction (ITK "RAI", DICOM "LPS"), as GenericSSL does, so that CT and MR
share one voxel-axis order (``--no-reorient`` keeps the stored orientation). GenericSSL's crop to the
label bounding box, percentile clipping and zoom to 144^3 are not applied (nnU-Net preprocesses).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_semi.conversion.common import (ConversionError, RawDatasetWriter, as_label_array, find_input_folder,
                                           make_parser, nifti_path, parse_args, read_sitk, restrict_split, run_main,
                                           warn_absent_labeled, write_cases)
from nnunet_semi.layout import CASE_METADATA_FILE, SemiSplit

DEFAULT_DATASET_ID = 30
DATASET_NAME = "MMWHS"

LABELS = {"background": 0, "MYO": 1, "LAC": 2, "LVC": 3, "AA": 4}
#: MM-WHS raw label code -> structure
MMWHS_CODES = {0: "background", 205: "MYO", 420: "LAC", 500: "LVC", 550: "RAC", 600: "RVC", 820: "AA", 850: "PA"}
#: raw code -> output label (codes not listed here map to 0)
KEPT = {205: 1, 420: 2, 500: 3, 820: 4}


def _ids(prefix: str, nums: Sequence[int]) -> List[str]:
    return [f"{prefix}_train_{n}" for n in nums]


# GenericSSL MMWHS_data/splits_txts (file order kept)
TEST = {"CT": _ids("ct", [1003, 1008, 1014, 1019]), "MR": _ids("mr", [1007, 1009, 1018, 1019])}
SETTINGS = {
    "ct2mr": dict(source="CT", target="MR",
                  labeled=_ids("ct", [1006, 1018, 1016, 1013, 1017, 1004, 1020, 1009, 1007, 1001, 1012, 1010,
                                      1002, 1015, 1005, 1011]),
                  unlabeled=_ids("mr", [1001, 1002, 1003, 1004, 1005, 1006, 1008, 1010, 1011, 1013, 1014, 1017,
                                        1020]),
                  val=_ids("mr", [1012, 1015, 1016])),
    "mr2ct": dict(source="MR", target="CT",
                  labeled=_ids("mr", [1010, 1004, 1011, 1003, 1013, 1017, 1014, 1020, 1002, 1001, 1005, 1006,
                                      1008, 1015, 1012, 1016]),
                  unlabeled=_ids("ct", [1001, 1002, 1004, 1006, 1007, 1009, 1010, 1012, 1013, 1016, 1017, 1018,
                                        1020]),
                  val=_ids("ct", [1005, 1011, 1015])),
}


def standard_split(setting: str) -> SemiSplit:
    s = SETTINGS[setting]
    return SemiSplit(labeled=list(s["labeled"]), unlabeled=list(s["unlabeled"]), test=list(TEST[s["target"]]),
                     val=list(s["val"]), setting=setting,
                     notes=f"A&D/GenericSSL MM-WHS UDA {s['source']}->{s['target']} (MMWHS_data/splits_txts: "
                           f"train_{setting}_labeled/unlabeled, eval_{setting} -> val, test_{s['target'].lower()}). "
                           f"labeled = {s['source']} (source domain); unlabeled, val, test = {s['target']} (target "
                           f"domain); the {s['source']} test cases are not used. Per-case modality: "
                           f"{CASE_METADATA_FILE}.")


def remap_labels(arr: np.ndarray, case: str, ignore_unknown: bool = False) -> np.ndarray:
    """MM-WHS codes -> 0..4 (MYO, LAC, LVC, AA kept; other structures -> 0)."""
    arr = as_label_array(arr, case)
    values = np.unique(arr)
    unknown = [int(v) for v in values if int(v) not in MMWHS_CODES]
    if unknown and not ignore_unknown:
        raise ConversionError(
            f"case {case}: label values {unknown} are not MM-WHS codes {sorted(MMWHS_CODES)} (is this an MM-WHS "
            f"label file?). Pass --ignore-unknown-values to map them to 0 as GenericSSL does.")
    out = np.zeros(arr.shape, dtype=np.uint8)
    for code, new in KEPT.items():
        out[arr == code] = new
    return out


def _reorient(img: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(img, "LPS")


def _modality(case: str) -> str:
    return "CT" if case.startswith("ct_") else "MR"


def _modality_dir(root: str, override: Optional[str], default: str, flag: str) -> str:
    return find_input_folder(root, [override or default], f"{{path}} does not exist: -i must hold the MM-WHS "
                                                          f"{default}/ folder (or pass {flag}).")


def _case_reader(reorient: bool, ignore_unknown: bool):
    """``read`` for :func:`write_cases`: the label remapped to 0..4, both reoriented unless told not to."""
    def read(case: str, img_path: str, lab_path: Optional[str]) -> Tuple[sitk.Image, Optional[sitk.Image]]:
        image = read_sitk(img_path, case)
        label = None
        if lab_path is not None:
            raw = read_sitk(lab_path, case, label=True)
            label = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(raw), case, ignore_unknown))
            label.CopyInformation(raw)
        if reorient:
            for vol, path in ((image, img_path), (label, lab_path)):
                if vol is not None and vol.GetDimension() != 3:
                    raise ConversionError(f"case {case}: {path} is {vol.GetDimension()}D; 3D expected.")
            image = _reorient(image)
            label = _reorient(label) if label is not None else None
        return image, label
    return read


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], DEFAULT_DATASET_ID, default_labeled=16, labeled_choices=[16],
                    labeled_help="labeled cases: all 16 source-domain training cases (fixed by the setting)",
                    input_help="folder holding the extracted MM-WHS ct_train/ and mr_train/ folders")
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--setting", required=True, choices=sorted(SETTINGS),
                   help="UDA direction: ct2mr (labeled CT, target MR) or mr2ct (labeled MR, target CT)")
    p.add_argument("--ct-dir", default=None, help="CT folder (default <input>/ct_train)")
    p.add_argument("--mr-dir", default=None, help="MR folder (default <input>/mr_train)")
    p.add_argument("--no-reorient", action="store_true",
                   help="keep each volume's stored orientation (default: reorient to the identity direction)")
    p.add_argument("--ignore-unknown-values", action="store_true",
                   help="map label values that are not MM-WHS codes to 0 instead of stopping")
    return p


def convert(argv: Optional[List[str]] = None) -> str:
    args = parse_args(build_parser(), argv)
    dirs = {"CT": _modality_dir(args.input, args.ct_dir, "ct_train", "--ct-dir"),
            "MR": _modality_dir(args.input, args.mr_dir, "mr_train", "--mr-dir")}
    setting = SETTINGS[args.setting]
    with RawDatasetWriter(
            args.output_root, args.dataset_id, f"{DATASET_NAME}_{args.setting}", {0: "zscore"}, LABELS,
            overwrite=args.overwrite,
            description=f"MM-WHS 2017 whole heart CT/MR, UDA {setting['source']}->{setting['target']} "
                        f"(GenericSSL split); MYO, LAC, LVC, AA",
            reference="https://zmiclab.github.io/zxh/0/mmwhs/",
            license="see the MM-WHS 2017 data use terms", origin_dataset=DATASET_NAME) as writer:
        split = standard_split(args.setting)
        written = write_cases(writer, split,
                              lambda case: (nifti_path(dirs[_modality(case)], f"{case}_image"),
                                            nifti_path(dirs[_modality(case)], f"{case}_label")),
                              read=_case_reader(not args.no_reorient, args.ignore_unknown_values),
                              desc=f"MM-WHS {args.setting}")
        for case in written:
            writer.metadata.set(case, domain=_modality(case))
        writer.metadata.target_domain, writer.metadata.source_domains = setting["target"], [setting["source"]]
        warn_absent_labeled(split, writer.labeled)
        active = restrict_split(split, written)
        return writer.finish(active, {args.setting: active})


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: exits with 0, or 1 after one 'error: ...' line for bad input."""
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
