"""NIH Pancreas-CT (TCIA, 82 contrast-enhanced abdominal CTs) -> semi-supervised nnU-Net raw dataset,
with the Reciprocal Learning (RLSSS) split (or, with ``--protocol versemi``, VerSemi's).

Accepted input: the common NIfTI layout derived from the TCIA download (the CT series converted to
one NIfTI per case, next to the TCIA NIfTI labels)::

    <input>/Pancreas-CT/data/PANCREAS_0001.nii.gz ... PANCREAS_0082.nii.gz
    <input>/TCIA_pancreas_labels-02-05-2017/label0001.nii.gz ... label0082.nii.gz

Other copies are read with ``--images-dir``/``--labels-dir`` (relative to ``-i`` or absolute) and
``--image-pattern``/``--label-pattern``: Python format strings of the 1-based case number ``n``
(defaults ``PANCREAS_{n:04d}.nii.gz`` and ``label{n:04d}.nii.gz``; e.g. ``img{n:04d}.nii.gz``). The
image and the label must be stored in the same voxel order: the converter checks size and spacing
(errors name the case), not whether a DICOM-to-NIfTI conversion flipped an axis.

Labels: 0 background, 1 pancreas; any other value is an error naming the case.

Cases 0025 and 0070 were removed from the TCIA collection as duplicates of other scans (80 scans
of 80 subjects remain). Both are listed by RLSSS (as labeled cases); when absent they are reported
(one line each, counted in the summary) and left out, so the RLSSS setting becomes 10 labeled /
50 unlabeled / 20 test. Case ``n`` becomes ``pancreas_00nn`` (RLSSS ``img00nn``, VerSemi ``data00nn``).

Protocols (``--protocol``):

    rlsss    XYZach/RLSSS ``data/pancreas_trian_test_list.txt``: 62 train / 20 test; labeled = the
             first ``--labeled`` (default 12) train cases in file order (0014, 0009, 0002, 0012, 0040,
             0065, 0011, 0025, 0034, 0026, 0017, 0070), unlabeled = the other train cases.
    versemi  maxwell0027/VerSemi ``datalist``: train = 0001-0063 without 0025 (62), test = 0064-0082
             without 0070 (18); labeled = the first ``--labeled`` train cases (6 = 10 %, 12 = 20 %).

Unlabeled cases' labels go to labelsWithheld/, test labels to labelsTs/. splits_standard/ holds the
protocol's standard settings (rlsss: 12_labeled; versemi: 6_labeled, 12_labeled). Images are written
at native resolution (no cropping: RLSSS's "Pancreas_region" crops are not published).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from nnunet_semi.conversion.common import (ConversionError, RawDatasetWriter, find_input_folder, make_parser,
                                           parse_args, restrict_split, run_main, warn_absent_labeled, write_cases)
from nnunet_semi.layout import SemiSplit

DEFAULT_DATASET_ID = 32
DATASET_NAME = "PancreasCT"
LABELS = {"background": 0, "pancreas": 1}
DEFAULT_IMAGES_DIR = "Pancreas-CT/data"
DEFAULT_LABELS_DIR = "TCIA_pancreas_labels-02-05-2017"
DEFAULT_IMAGE_PATTERN = "PANCREAS_{n:04d}.nii.gz"
DEFAULT_LABEL_PATTERN = "label{n:04d}.nii.gz"
REMOVED_FROM_TCIA = (25, 70)

# XYZach/RLSSS data/pancreas_trian_test_list.txt (file order; labeled = first N of the train list)
RLSSS_TRAIN = [14, 9, 2, 12, 40, 65, 11, 25, 34, 26, 17, 70, 44, 33, 23, 4, 29, 3, 42, 37, 66, 18, 58, 53, 51, 55,
               71, 35, 1, 22, 28, 57, 78, 27, 43, 81, 30, 49, 54, 21, 59, 61, 69, 41, 75, 24, 32, 52, 64, 77, 20, 47,
               73, 5, 10, 48, 67, 8, 68, 6, 7, 62]
RLSSS_TEST = [38, 63, 15, 31, 60, 46, 36, 16, 76, 50, 45, 82, 80, 39, 19, 56, 13, 79, 72, 74]
# maxwell0027/VerSemi datalist (pancreas): data0001-0063 without 0025 / data0064-0082 without 0070
VERSEMI_TRAIN = [n for n in range(1, 64) if n != 25]
VERSEMI_TEST = [n for n in range(64, 83) if n != 70]

PROTOCOLS = {
    "rlsss": dict(train=RLSSS_TRAIN, test=RLSSS_TEST, standard=(12,),
                  source="XYZach/RLSSS data/pancreas_trian_test_list.txt (62 train / 20 test); labeled = first N "
                         "train cases in file order"),
    "versemi": dict(train=VERSEMI_TRAIN, test=VERSEMI_TEST, standard=(6, 12),
                    source="maxwell0027/VerSemi datalist (train data0001-0063 w/o 0025, test data0064-0082 w/o 0070); "
                           "labeled = first N train cases (6 = 10%, 12 = 20%)"),
}


def case_id(n: int) -> str:
    return f"pancreas_{n:04d}"


def protocol_split(protocol: str, num_labeled: int) -> SemiSplit:
    p = PROTOCOLS[protocol]
    train = [case_id(n) for n in p["train"]]
    return SemiSplit(labeled=train[:num_labeled], unlabeled=train[num_labeled:], test=[case_id(n) for n in p["test"]],
                     val=[], setting=f"{num_labeled}_labeled",
                     notes=f"{p['source']}. Case pancreas_00nn = TCIA PANCREAS_00nn / label00nn. Cases 0025 and 0070 "
                           f"were removed from TCIA as duplicates; absent listed cases are left out.")


def _format(pattern: str, n: int, flag: str) -> str:
    try:
        return pattern.format(n=n)
    except (KeyError, IndexError, ValueError) as e:
        raise ConversionError(f"{flag} {pattern!r} is not a format string of the case number n "
                              f"(e.g. 'PANCREAS_{{n:04d}}.nii.gz'): {e}") from e


def _folder(root: str, path: str, flag: str) -> str:
    return find_input_folder(root, [path], f"{{path}} does not exist; point -i at the folder holding "
                                           f"{DEFAULT_IMAGES_DIR}/ and {DEFAULT_LABELS_DIR}/, or pass {flag}.")


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], DEFAULT_DATASET_ID, default_labeled=12,
                    labeled_help="labeled cases = the first N cases of the protocol's train list",
                    input_help=f"folder holding {DEFAULT_IMAGES_DIR}/ and {DEFAULT_LABELS_DIR}/")
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--protocol", default="rlsss", choices=sorted(PROTOCOLS),
                   help="split protocol (default rlsss)")
    p.add_argument("--images-dir", default=DEFAULT_IMAGES_DIR, help=f"image folder (default {DEFAULT_IMAGES_DIR})")
    p.add_argument("--labels-dir", default=DEFAULT_LABELS_DIR, help=f"label folder (default {DEFAULT_LABELS_DIR})")
    p.add_argument("--image-pattern", default=DEFAULT_IMAGE_PATTERN,
                   help="image file name as a format string of the case number n (default %(default)s)")
    p.add_argument("--label-pattern", default=DEFAULT_LABEL_PATTERN,
                   help="label file name as a format string of the case number n (default %(default)s)")
    return p


def convert(argv: Optional[List[str]] = None) -> str:
    parser = build_parser()
    args = parse_args(parser, argv)
    proto = PROTOCOLS[args.protocol]
    if not 1 <= args.labeled < len(proto["train"]):
        parser.error(f"--labeled must be between 1 and {len(proto['train']) - 1} for --protocol {args.protocol}")
    img_dir = _folder(args.input, args.images_dir, "--images-dir")
    lab_dir = _folder(args.input, args.labels_dir, "--labels-dir")
    _format(args.image_pattern, 1, "--image-pattern")
    _format(args.label_pattern, 1, "--label-pattern")
    with RawDatasetWriter(
            args.output_root, args.dataset_id, DATASET_NAME, {0: "CT"}, LABELS, overwrite=args.overwrite,
            description=f"NIH Pancreas-CT (TCIA), pancreas; {args.protocol} split",
            reference="https://www.cancerimagingarchive.net/collection/pancreas-ct/",
            license="CC BY 3.0 (TCIA Pancreas-CT)", origin_dataset=DATASET_NAME) as writer:
        print(f"Pancreas-CT: images from {img_dir}, labels from {lab_dir}, protocol {args.protocol}")
        split = protocol_split(args.protocol, args.labeled)
        number = {case_id(n): n for n in proto["train"] + proto["test"]}

        def locate(case: str) -> Tuple[str, str]:
            return (os.path.join(img_dir, _format(args.image_pattern, number[case], "--image-pattern")),
                    os.path.join(lab_dir, _format(args.label_pattern, number[case], "--label-pattern")))

        written = write_cases(writer, split, locate, desc="Pancreas-CT")
        warn_absent_labeled(split, writer.labeled)
        removed = [case_id(n) for n in REMOVED_FROM_TCIA if case_id(n) in split.labeled + split.unlabeled + split.test
                   and case_id(n) not in written]
        if removed:
            print(f"note: {', '.join(removed)} were removed from the TCIA collection as duplicates of other scans; "
                  f"their absence is expected for TCIA-derived copies.")
        active = restrict_split(split, written)
        standard = {f"{k}_labeled": restrict_split(protocol_split(args.protocol, k), written)
                    for k in proto["standard"]}
        return writer.finish(active, standard)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: exits with 0, or 1 after one 'error: ...' line for bad input."""
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
