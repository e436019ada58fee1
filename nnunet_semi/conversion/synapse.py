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

from typing import List, Optional, Sequence, Tuple

from nnunet_semi.conversion.common import (RawDatasetWriter, find_input_folder, make_parser, nifti_path, parse_args,
                                           restrict_split, run_main, warn_absent_labeled, write_cases)
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
        return find_input_folder(root, [override], f"{what} folder {{path}} does not exist.")
    return find_input_folder(root, candidates, f"no {what} folder under {{root}}: looked for {{candidates}}. Point -i "
                                               f"at the extracted Synapse RawData download or pass --{what}s-dir.")


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
    with RawDatasetWriter(
            args.output_root, args.dataset_id, DATASET_NAME, {0: "CT"}, LABELS, overwrite=args.overwrite,
            description="Synapse multi-organ abdominal CT (BTCV), 13 organs; GenericSSL ImbSSL split",
            reference="https://www.synapse.org/#!Synapse:syn3193805/wiki/217789",
            license="see the Synapse BTCV data use terms", origin_dataset=DATASET_NAME) as writer:
        print(f"Synapse: images from {img_dir}, labels from {lab_dir}")
        split = standard_split()

        def locate(case: str) -> Tuple[str, str]:
            num = case.rsplit("_", 1)[1]  # synapse_00XX -> 00XX
            return nifti_path(img_dir, f"img{num}"), nifti_path(lab_dir, f"label{num}")

        written = write_cases(writer, split, locate, desc="Synapse")
        warn_absent_labeled(split, writer.labeled)
        active = restrict_split(split, written)
        return writer.finish(active, {SETTING: active})


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: exits with 0, or 1 after one 'error: ...' line for bad input."""
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
