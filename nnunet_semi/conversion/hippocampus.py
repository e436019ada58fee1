"""Convert MSD Task04 Hippocampus into a semi-supervised nnU-Net raw dataset (default Dataset104_Hippocampus).

Input layouts (detected automatically):

- MSD: ``imagesTr/hippocampus_XXX.nii.gz``, ``labelsTr/hippocampus_XXX.nii.gz``, ``imagesTs/`` and the
  MSD ``dataset.json``. Cases listed in dataset.json (``training``/``test``) but absent on disk are
  reported (one line each) and counted. ``imagesTs`` has no labels: those images are image-only
  cases and become unlabeled training cases. macOS ``._*`` files are ignored.
- plain: ``images/hippocampus_XXX.nii.gz`` + ``labels/hippocampus_XXX.nii.gz``
  (the copy in ``shared/data/hippocampus``).

Quirks handled:

- mixed dtypes: images are written in their stored dtype (float32 or uint8; nnU-Net normalises
  anyway); labels stored as float are checked to be integral and cast to uint8 (a note is printed);
- an image without label -> an unlabeled case (imagesUnlabeled, no label anywhere);
- a label without image -> reported (``skipped <case>: ...``, with its size) and not converted
  (``hippocampus_010``; ``hippocampus_281`` is a 512x512x94 mask of another dataset);
- shape/spacing mismatches between an image and its label raise an error naming the case.

Split (seeded; there is no community-standard semi-supervised split for this dataset, so none is
written to splits_standard/): the image/label pairs, sorted by case id, are permuted with
``numpy.random.RandomState(seed)``; the first ``M`` become test cases (imagesTs/labelsTs), the next
``N`` (``--labeled``) the labeled cases, the last ``V`` (``--num-val``, default 0) a validation group
(imagesTs/labelsTs, never trained on; for choosing hyper-parameters without touching the test cases),
all remaining pairs unlabeled (their labels go to labelsWithheld/). For one seed and one set of input
cases the labeled sets of different ``N`` are nested, and neither the test nor the validation group
depends on ``N``. ``--max-cases K`` first keeps a seeded subset of K
pairs (quick tests and demos); image-only cases are always kept.
Labels: background 0, Anterior 1, Posterior 2. Channel 0: MRI.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_semi.conversion.common import (ConversionError, RawDatasetWriter, make_parser, parse_args,
                                           read_sitk, run_main, split_groups)
from nnunet_semi.layout import SemiSplit

DEFAULT_DATASET_ID = 104
DATASET_NAME = "Hippocampus"
CHANNEL_NAMES = {0: "MRI"}
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
DEFAULT_LABELED = 8
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SEED = 12345
_ENDINGS = (".nii.gz", ".nii")


def _case_of(fname: str) -> Optional[str]:
    if fname.startswith("."):
        return None
    for e in _ENDINGS:
        if fname.endswith(e):
            return fname[: -len(e)]
    return None


def _scan_folder(folder: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    if not os.path.isdir(folder):
        return out
    for fname in sorted(os.listdir(folder)):
        case = _case_of(fname)
        if case is not None and os.path.isfile(os.path.join(folder, fname)):
            if case in out:
                raise ConversionError(f"case {case}: two files in {folder} ({os.path.basename(out[case])}, {fname}).")
            out[case] = os.path.join(folder, fname)
    return out


def scan_input(root: str) -> Tuple[str, Dict[str, str], Dict[str, str], List[Tuple[str, str]]]:
    """-> (layout name, images case->path, labels case->path, listed-but-absent [(case, path)])."""
    missing: List[Tuple[str, str]] = []
    if os.path.isdir(os.path.join(root, "imagesTr")):
        images = _scan_folder(os.path.join(root, "imagesTr"))
        labels = _scan_folder(os.path.join(root, "labelsTr"))
        for case, path in _scan_folder(os.path.join(root, "imagesTs")).items():
            if case in images:
                raise ConversionError(f"case {case}: present in both imagesTr and imagesTs of {root}.")
            images[case] = path
        dj = os.path.join(root, "dataset.json")
        if os.path.isfile(dj):
            try:
                with open(dj) as f:
                    meta = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ConversionError(f"{dj}: cannot be read as JSON ({e}).") from e
            listed = []
            for entry in meta.get("training", []):
                listed += [entry.get("image"), entry.get("label")]
            listed += list(meta.get("test", []))
            seen = set()
            for rel in listed:
                if not rel:
                    continue
                path = os.path.normpath(os.path.join(root, rel))
                case = _case_of(os.path.basename(path))
                if case is None or case in seen:
                    continue
                if not os.path.exists(path):
                    # only report a case once, and only when neither its image nor its label is there
                    if case not in images and case not in labels:
                        seen.add(case)
                        missing.append((case, path))
        return "MSD", images, labels, missing
    if os.path.isdir(os.path.join(root, "images")):
        return "plain", _scan_folder(os.path.join(root, "images")), _scan_folder(os.path.join(root, "labels")), missing
    raise ConversionError(f"{root}: neither the MSD layout (imagesTr/, labelsTr/) nor the plain layout "
                          f"(images/, labels/) was found. Point -i at the Task04_Hippocampus folder.")


def make_split(pairs: Sequence[str], image_only: Sequence[str], num_labeled: int, num_test: int,
               seed: int, max_cases: Optional[int] = None, num_val: int = 0) -> SemiSplit:
    """The seeded split described in the module docstring (pure function of its arguments)."""
    pairs = sorted(pairs)
    rng = np.random.RandomState(seed)
    if max_cases is not None and max_cases < len(pairs):
        pairs = sorted(rng.choice(pairs, size=max_cases, replace=False).tolist())
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    if num_test + num_labeled + num_val > len(order):
        raise ConversionError(f"{num_test} test + {num_labeled} labeled + {num_val} validation cases requested but "
                              f"only {len(order)} image/label pairs are available; lower --num-test/--test-fraction, "
                              f"--labeled or --num-val.")
    test = order[:num_test]
    labeled = order[num_test:num_test + num_labeled]
    end = len(order) - num_val
    val = order[end:]
    unlabeled = order[num_test + num_labeled:end] + sorted(image_only)
    return SemiSplit(labeled=labeled, unlabeled=unlabeled, test=test, val=val, setting=f"{num_labeled}_labeled",
                     seed=seed,
                     notes=f"MSD Task04 Hippocampus; seeded split (numpy RandomState({seed}) permutation of the "
                           f"{len(pairs)} image/label pairs: first {num_test} test, next {num_labeled} labeled, last "
                           f"{num_val} validation, rest unlabeled with labels withheld); {len(image_only)} image-only "
                           f"case(s) unlabeled.")


def _label_info(path: str) -> str:
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(path)
        r.ReadImageInformation()
        return "x".join(str(s) for s in r.GetSize()) + " voxels"
    except Exception:
        return "unreadable header"


def build_parser():
    p = make_parser(
        "Convert MSD Task04 Hippocampus (MSD layout imagesTr/labelsTr/imagesTs + dataset.json, or plain "
        "images/ + labels/) into a semi-supervised nnU-Net raw dataset with a seeded split. Labels with no "
        "image are reported and skipped; images with no label become unlabeled cases.",
        DEFAULT_DATASET_ID, DEFAULT_LABELED, labeled_help="number of labeled training cases",
        input_help="Task04_Hippocampus folder (MSD layout) or a folder with images/ and labels/")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-test", type=int, default=None, help="number of image/label pairs held out as test cases")
    g.add_argument("--test-fraction", type=float, default=None,
                   help=f"fraction of image/label pairs held out as test (default {DEFAULT_TEST_FRACTION})")
    p.add_argument("--num-val", type=int, default=0,
                   help="image/label pairs held out as a validation group for choosing hyper-parameters "
                        "(imagesTs/labelsTs, split 'val'; default 0); taken from the end of the seeded order, so the "
                        "test and labeled cases do not change")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"split seed (default {DEFAULT_SEED})")
    p.add_argument("--max-cases", type=int, default=None,
                   help="use a seeded subset of K image/label pairs (quick tests, demos); image-only cases are kept")
    return p


def convert(argv=None) -> str:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.labeled is None or args.labeled < 1:
        parser.error("--labeled must be >= 1")
    if args.max_cases is not None and args.max_cases < 1:
        parser.error("--max-cases must be >= 1")
    layout, images, labels, missing = scan_input(args.input)
    print(f"input {args.input}: {layout} layout, {len(images)} images, {len(labels)} labels")
    with RawDatasetWriter(args.output_root, args.dataset_id, DATASET_NAME, CHANNEL_NAMES, LABELS,
                          overwrite=args.overwrite,
                          description="MSD Task04 Hippocampus, semi-supervised split (nnunet_semi)",
                          reference="Medical Segmentation Decathlon (Simpson et al. 2019, Antonelli et al. 2022)",
                          license="CC BY-SA 4.0", origin_dataset=DATASET_NAME) as writer:
        for case, path in missing:
            writer.report_missing(case, path)
        for case in sorted(set(labels) - set(images)):
            writer.report_skipped(case, f"label {labels[case]} has no image ({_label_info(labels[case])}); "
                                        f"not converted")
        pairs = sorted(set(images) & set(labels))
        image_only = sorted(set(images) - set(labels))
        n_pairs = min(len(pairs), args.max_cases) if args.max_cases else len(pairs)
        if args.num_test is not None:
            num_test = args.num_test
        else:
            frac = DEFAULT_TEST_FRACTION if args.test_fraction is None else args.test_fraction
            if not 0 <= frac < 1:
                parser.error("--test-fraction must be in [0, 1)")
            num_test = int(round(frac * n_pairs))
        if num_test < 0:
            parser.error("--num-test must be >= 0")
        if args.num_val < 0:
            parser.error("--num-val must be >= 0")
        split = make_split(pairs, image_only, args.labeled, num_test, args.seed, args.max_cases, args.num_val)
        where = dict(split_groups(split))
        for case in writer.progress(sorted(where), desc="Hippocampus"):
            img = read_sitk(images[case], case)
            lab = read_sitk(labels[case], case, label=True) if case in labels else None
            if lab is not None and lab.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
                writer.report_note(case, f"label stored as {lab.GetPixelIDTypeAsString()}, cast to uint8 after "
                                         f"checking its values are integral")
            writer.add_case(case, where[case], img, lab)
        return writer.finish(split, None)


def main(argv=None) -> None:
    raise SystemExit(run_main(convert, argv))


if __name__ == "__main__":
    main()
