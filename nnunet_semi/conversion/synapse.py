"""Synapse multi-organ CT (BTCV, MICCAI 2015 "Multi-Atlas Labeling Beyond the Cranial Vault") ->
semi-supervised nnU-Net raw dataset, with the ImbSSL split of A&D / GenericSSL.

Accepted input (the public Synapse download, ``RawData.zip``)::

    <input>/RawData/Training/img/img0001.nii.gz   ... img0040.nii.gz   (30 CT volumes)
    <input>/RawData/Training/label/label0001.nii.gz ... label0040.nii.gz

``-i`` may also point at ``RawData/``, at ``RawData/Training/`` or at any folder holding ``img/`` and
``label/`` directly; ``--images-dir`` / ``--labels-dir`` override the search (relative to ``-i`` or
absolute). Uncompressed ``.nii`` files are accepted too. The training cases are 0001-0010 and
0021-0040; ``RawData/Testing`` (no labels) is not used.

Labels (BTCV order, values kept as they are): 0 background, 1 spleen, 2 right kidney, 3 left
kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta, 9 inferior vena cava, 10 portal and
splenic vein, 11 pancreas, 12 right adrenal gland, 13 left adrenal gland. Any other value is an error
naming the case.

Split (GenericSSL ``Synapse_data/split_txts``, setting ``synapse_0.2``): train 20, eval 4, test 6;
labeled = 20 % of train = {0009, 0021, 0025, 0034}, unlabeled = the other 16 train cases (their
labels go to labelsWithheld/), eval -> the split's ``val`` group, test -> ``test`` (both in
imagesTs/labelsTs). Case ``img00XX`` becomes ``synapse_00XX``. Images are written at their native
resolution; GenericSSL's resize to 80x160x160 and HU clipping are left to nnU-Net's own
preprocessing (CT normalisation).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from nnunet_semi.conversion.common import (ConversionError, RawDatasetWriter, make_parser, parse_args,
                                           read_sitk, restrict_split, run_main)
from nnunet_semi.layout import SemiSplit

DEFAULT_DATASET_ID = 29
DATASET_NAME = "Synapse"

# BTCV label order (values 1..13)
LABELS = {
    "background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5,
    "liver": 6, "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_and_splenic_vein": 10,
    "pancreas": 11, "right_adrenal_gland": 12, "left_adrenal_gland": 13,
}

# GenericSSL Synapse_data/split_txts (A&D ImbSSL setting synapse_0.2)
TRAIN_IDS = ["0002", "0003", "0004", "0005", "0006", "0009", "0010", "0021", "0022", "0024", "0025", "0026",
             "0028", "0031", "0032", "0034", "0035", "0036", "0038", "0040"]
EVAL_IDS = ["0001", "0007", "0023", "0030"]
TEST_IDS = ["0008", "0027", "0029", "0033", "0037", "0039"]
LABELED_IDS = ["0009", "0021", "0025", "0034"]
UNLABELED_IDS = [i for i in TRAIN_IDS if i not in LABELED_IDS]
SETTING = "4_labeled"

_IMAGE_DIR_CANDIDATES = ("RawData/Training/img", "Training/img", "img")
_LABEL_DIR_CANDIDATES = ("RawData/Training/label", "Training/label", "label")


def case_id(num: str) -> str:
    return f"synapse_{num}"


def standard_split() -> SemiSplit:
    return SemiSplit(labeled=[case_id(i) for i in LABELED_IDS], unlabeled=[case_id(i) for i in UNLABELED_IDS],
                     test=[case_id(i) for i in TEST_IDS], val=[case_id(i) for i in EVAL_IDS], setting=SETTING,
                     notes="A&D/GenericSSL ImbSSL Synapse 20% split (Synapse_data/split_txts: labeled_0.2, "
                           "unlabeled_0.2, eval -> val, test). Case synapse_00XX = img00XX/label00XX of "
                           "RawData/Training.")


def _resolve_dir(root: str, override: Optional[str], candidates: Sequence[str], what: str) -> str:
    if override:
        path = override if os.path.isabs(override) else os.path.join(root, override)
        if not os.path.isdir(path):
            raise ConversionError(f"{what} folder {path} does not exist.")
        return path
    for c in candidates:
        path = os.path.join(root, c)
        if os.path.isdir(path):
            return path
    raise ConversionError(f"no {what} folder under {root}: looked for {', '.join(candidates)}. Point -i at the "
                          f"extracted Synapse RawData download or pass --{what}s-dir.")


def _nifti(folder: str, stem: str) -> str:
    """``folder/stem.nii.gz``, or ``folder/stem.nii`` when only that exists (the .nii.gz path otherwise)."""
    gz = os.path.join(folder, stem + ".nii.gz")
    if not os.path.isfile(gz) and os.path.isfile(os.path.join(folder, stem + ".nii")):
        return os.path.join(folder, stem + ".nii")
    return gz


def _warn_absent_labeled(split: SemiSplit, written: List[str]) -> None:
    absent = [c for c in split.labeled if c not in written]
    if absent:
        print(f"WARNING: {len(absent)} labeled case(s) of setting {split.setting} are absent ({', '.join(absent)}); "
              f"the labeled set is NOT the standard one.")


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], DEFAULT_DATASET_ID, default_labeled=4, labeled_choices=[4],
                    labeled_help="labeled cases; 4 = the ImbSSL 20%% setting, the only standard one",
                    input_help="the extracted Synapse download (folder holding RawData/Training/img and "
                               "RawData/Training/label, or img/ and label/ directly)")
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--images-dir", default=None, help="image folder (img00XX.nii.gz), relative to -i or absolute")
    p.add_argument("--labels-dir", default=None, help="label folder (label00XX.nii.gz), relative to -i or absolute")
    return p


def convert(argv: Optional[List[str]] = None) -> str:
    args = parse_args(build_parser(), argv)
    img_dir = _resolve_dir(args.input, args.images_dir, _IMAGE_DIR_CANDIDATES, "image")
    lab_dir = _resolve_dir(args.input, args.labels_dir, _LABEL_DIR_CANDIDATES, "label")
    writer = RawDatasetWriter(
        args.output_root, args.dataset_id, DATASET_NAME, {0: "CT"}, LABELS, overwrite=args.overwrite,
        description="Synapse multi-organ abdominal CT (BTCV), 13 organs; GenericSSL ImbSSL split",
        reference="https://www.synapse.org/#!Synapse:syn3193805/wiki/217789",
        license="see the Synapse BTCV data use terms")
    print(f"Synapse: images from {img_dir}, labels from {lab_dir}")
    split = standard_split()
    order = ([(n, "labeled") for n in LABELED_IDS] + [(n, "unlabeled") for n in UNLABELED_IDS]
             + [(n, "val") for n in EVAL_IDS] + [(n, "test") for n in TEST_IDS])
    for num, group in writer.progress(order, desc="Synapse"):
        case = case_id(num)
        img_path = _nifti(img_dir, f"img{num}")
        lab_path = _nifti(lab_dir, f"label{num}")
        if not os.path.isfile(img_path):
            writer.report_missing(case, img_path)
            continue
        has_label = os.path.isfile(lab_path)
        if not has_label and group != "unlabeled":
            writer.report_missing(case, lab_path)
            continue
        image = read_sitk(img_path, case)
        label = read_sitk(lab_path, case) if has_label else None
        if group == "labeled":
            writer.add_labeled(case, image, label)
        elif group == "unlabeled":
            if label is None:
                print(f"note {case}: no label at {lab_path}; written as unlabeled without a withheld label")
            writer.add_unlabeled(case, image, label)
        else:
            writer.add_heldout(case, image, label, group=group)
    _warn_absent_labeled(split, writer.labeled)
    present = writer.labeled + writer.unlabeled + writer.val + writer.test
    active = restrict_split(split, present)
    return writer.finish(active, {SETTING: active})


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: exits with 0, or 1 after one 'error: ...' line for bad input."""
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
