"""Command-line entry points ``nnUNetv2_semi_evaluate`` and ``nnUNetv2_semi_compare``.

The logic lives in :mod:`nnunet_semi.evaluation.evaluate`; this module only parses arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

from nnunet_semi.evaluation.metrics import DEFAULT_EMPTY_POLICY, EMPTY_POLICIES

_POLICY_HELP = ("what a metric becomes when a mask is empty. default: both empty -> Dice 1, distances 0; "
                "one empty -> Dice 0, distances NaN (left out of the distance means, counted separately). "
                "nnunet: Dice NaN when both are empty. ssl4mis: an empty prediction scores all zeros "
                "(UA-MT/SSL4MIS/CrossMatch test_util). genericssl: one empty -> Dice 0, distances 128; "
                "both empty -> Dice 1, distances 0. Default: %(default)s")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-l", "--labels", type=int, nargs="+", default=None,
                        help="foreground labels to evaluate, e.g. -l 1 2 3 (or use -djfile)")
    parser.add_argument("-djfile", "--dataset_json", default=None,
                        help="nnU-Net dataset.json: labels (and names, regions, ignore label), file ending and "
                             "reader. -l overrides its labels")
    parser.add_argument("--file_ending", default=None,
                        help="e.g. .nii.gz; default: from -djfile, else the ending of the reference files")
    parser.add_argument("-np", "--num_processes", type=int, default=2,
                        help="worker processes (default: %(default)s)")
    parser.add_argument("--chill", action="store_true",
                        help="skip reference cases without a prediction instead of failing")
    parser.add_argument("--empty_policy", default=DEFAULT_EMPTY_POLICY, choices=sorted(EMPTY_POLICIES),
                        help=_POLICY_HELP)
    parser.add_argument("--cases", nargs="+", default=None,
                        help="evaluate only these case ids (default: every file of the reference folder)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")


def _check_labels(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.labels is None and args.dataset_json is None:
        parser.error("give the labels with -l 1 2 ... or a dataset.json with -djfile")


def _progress(args: argparse.Namespace) -> Optional[bool]:
    return False if args.no_progress else None


def evaluate_entry(argv: Optional[Sequence[str]] = None) -> int:
    """``nnUNetv2_semi_evaluate REF PRED (-l 1 2 | -djfile dataset.json) [-o summary.json]``."""
    from nnunet_semi.evaluation.evaluate import SUMMARY_FILE, EvaluationError, evaluate_folder, markdown_table
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_semi_evaluate",
        description="Per-case and per-class Dice, Jaccard, HD95, ASD (directed, prediction -> reference) and "
                    "ASSD, distances in mm (image spacing) and in voxels (as the SSL papers report them). "
                    "Writes a summary.json-like JSON and a markdown table (mean ± std over cases).")
    parser.add_argument("ref_folder", help="folder with the reference segmentations (CASE<file_ending>)")
    parser.add_argument("pred_folder", help="folder with the predicted segmentations (same file names)")
    _add_common(parser)
    parser.add_argument("-o", "--output", default=None,
                        help=f"output JSON (default: PRED_FOLDER/{SUMMARY_FILE})")
    parser.add_argument("--md", default=None,
                        help="output markdown table (default: the output JSON with .md instead of .json)")
    args = parser.parse_args(argv)
    _check_labels(parser, args)
    output = args.output or os.path.join(args.pred_folder, SUMMARY_FILE)
    md = args.md or (output[:-5] if output.endswith(".json") else output) + ".md"
    try:
        summary = evaluate_folder(args.ref_folder, args.pred_folder, args.labels, args.file_ending,
                                  args.num_processes, args.empty_policy, args.dataset_json, chill=args.chill,
                                  case_ids=args.cases, output_file=output, markdown_file=md,
                                  progress=_progress(args))
    except EvaluationError as e:
        print(f"nnUNetv2_semi_evaluate: error: {e}", file=sys.stderr)
        return 1
    print(markdown_table(summary))
    print(f"wrote {output} and {md}", file=sys.stderr)
    return 0


def parse_named_folders(items: Sequence[str]) -> Dict[str, str]:
    """``["name=folder", "folder2"]`` -> ``{"name": "folder", "folder2-basename": "folder2"}``
    (ordered; the name is everything before the first ``=``)."""
    out: Dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or os.sep in name:
            name, folder = os.path.basename(os.path.normpath(item)), item
        if not folder:
            raise ValueError(f"no folder given in {item!r}")
        if name in out:
            raise ValueError(f"method name {name!r} given twice; use name=folder to make names unique")
        out[name] = folder
    return out


def compare_entry(argv: Optional[Sequence[str]] = None) -> int:
    """``nnUNetv2_semi_compare REF name1=PRED1 name2=PRED2 ... (-l ... | -djfile ...) -o prefix``."""
    from nnunet_semi.evaluation.evaluate import EvaluationError, compare_folders, comparison_markdown
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_semi_compare",
        description="Evaluate several prediction folders against one reference folder: one markdown table "
                    "(rows = methods; per-class and mean Dice, Jaccard, 95HD, ASD as mean ± std, in mm and in "
                    "voxels) and paired per-case differences of each method against the FIRST one (mean ± std "
                    "of the difference, number of cases, Wilcoxon signed-rank p-value for n >= 5). Writes "
                    "PREFIX.md and PREFIX.json.")
    parser.add_argument("ref_folder", help="folder with the reference segmentations")
    parser.add_argument("predictions", nargs="+", metavar="NAME=PRED_FOLDER",
                        help="prediction folders, optionally named (default name: the folder's name); "
                             "the first is the baseline of the paired differences")
    _add_common(parser)
    parser.add_argument("-o", "--output_prefix", required=True,
                        help="output prefix: writes PREFIX.md and PREFIX.json")
    args = parser.parse_args(argv)
    _check_labels(parser, args)
    try:
        predictions = parse_named_folders(args.predictions)
    except ValueError as e:
        parser.error(str(e))
    try:
        result = compare_folders(args.ref_folder, predictions, args.labels, args.file_ending, args.num_processes,
                                 args.empty_policy, args.dataset_json, chill=args.chill, case_ids=args.cases,
                                 output_prefix=args.output_prefix, progress=_progress(args))
    except EvaluationError as e:
        print(f"nnUNetv2_semi_compare: error: {e}", file=sys.stderr)
        return 1
    print(comparison_markdown(result))
    print(f"wrote {args.output_prefix}.md and {args.output_prefix}.json", file=sys.stderr)
    return 0


__all__: List[str] = ["evaluate_entry", "compare_entry", "parse_named_folders"]
