"""Evaluate folders of segmentations in nnU-Net's layout, and compare several prediction folders.

Files are ``CASE<file_ending>`` in a reference folder and in each prediction folder (nnU-Net's
``labelsTr``/``labelsTs`` and ``nnUNetv2_predict`` output). They are read with nnU-Net's readers,
and the spacing comes from the reader's properties (same axis order as the array).

:func:`evaluate_folder` returns (and optionally writes) a dict in the spirit of nnU-Net's
``summary.json``:

* ``metric_per_case``: list of ``{"case", "reference_file", "prediction_file", "spacing",
  "metrics": {label_key: {metric: value}}}``; the metrics are those of
  :func:`nnunet_semi.evaluation.metrics.binary_metrics` (``Dice``, ``Jaccard``, ``HD95_mm``,
  ``HD95_vox``, ``ASD_mm``, ``ASD_vox``, ``ASSD_mm``, ``ASSD_vox``, ``TP``, ``FP``, ``FN``,
  ``TN``, ``n_pred``, ``n_ref``).
* ``mean``: per label key, ``np.nanmean`` over cases of every metric (as nnU-Net).
* ``foreground_mean``: per metric, the mean of the per-label means (as nnU-Net).
* ``stats``: per label key and for ``"foreground"``, per metric of ``METRICS``:
  ``{"mean", "std", "n"}`` over the cases where the value is not NaN (``std`` with ddof 0, like
  ``np.std`` in the papers' scripts). ``"foreground"`` first averages the labels within each case
  (ignoring NaN), then takes mean and std over cases; this is the "Mean" row of the tables. Its
  mean equals ``foreground_mean`` unless some values are NaN.
* ``empty_counts``: per label key, ``n_cases``, ``n_both_empty``, ``n_empty_pred`` (reference
  not empty) and ``n_empty_ref`` (prediction not empty).
* ``settings``, ``missing_predictions``, ``label_names``.

Label keys are strings as in nnU-Net (``"1"``, regions ``"(1, 2)"``), so
``nnunetv2.evaluation.evaluate_predictions.load_summary_json`` reads the file back.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_semi.evaluation.metrics import (
    COUNT_KEYS, DEFAULT_EMPTY_POLICY, EMPTY_POLICIES, METRICS, LabelOrRegion, empty_situation, multilabel_metrics,
)
from nnunet_semi.reporting import (finite, format_difference, format_mean_std, format_p, is_finite, markdown_rows,
                                   mean_std)

#: file endings tried (in this order) when none is given and there is no dataset.json
KNOWN_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".tif", ".tiff", ".png", ".bmp")
#: metrics for which :func:`compare_folders` computes paired differences
PAIRED_METRICS = ("Dice", "Jaccard", "HD95_mm", "HD95_vox", "ASD_mm", "ASD_vox", "ASSD_mm", "ASSD_vox")
FOREGROUND = "foreground"
SUMMARY_FILE = "summary_semi.json"


class EvaluationError(RuntimeError):
    """Bad input (missing files, mismatching shapes, no labels). The message names the file."""


# --------------------------------------------------------------------------------------------
# labels, files, readers
# --------------------------------------------------------------------------------------------
def label_key(label: LabelOrRegion) -> str:
    """nnU-Net's key for a label or region: ``"1"`` or ``"(1, 2)"``."""
    return str(tuple(label)) if isinstance(label, (tuple, list)) else str(int(label))


def _load_dataset_json(dataset_json: Union[str, Mapping, None]) -> Optional[dict]:
    if dataset_json is None or isinstance(dataset_json, Mapping):
        return None if dataset_json is None else dict(dataset_json)
    with open(dataset_json) as f:
        return json.load(f)


def labels_from_dataset_json(dataset_json: Union[str, Mapping]) -> Tuple[List[LabelOrRegion], Dict[str, str],
                                                                           Optional[int]]:
    """Foreground labels (or regions, as tuples), ``{label_key: name}`` and the ignore label
    (or None) of an nnU-Net dataset.json (path or dict). Background and ``ignore`` are left out."""
    dj = _load_dataset_json(dataset_json)
    if "labels" not in dj:
        raise EvaluationError("dataset.json has no 'labels' entry")
    labels: List[LabelOrRegion] = []
    names: Dict[str, str] = {}
    ignore = dj["labels"].get("ignore")
    for name, value in dj["labels"].items():
        if name in ("background", "ignore"):
            continue
        if isinstance(value, (list, tuple)):
            value = int(value[0]) if len(value) == 1 else tuple(int(v) for v in value)
        else:
            value = int(value)
        if value == 0:
            continue
        labels.append(value)
        names[label_key(value)] = name
    return labels, names, (int(ignore) if ignore is not None else None)


def detect_file_ending(folder: str) -> str:
    """The known file ending (see :data:`KNOWN_FILE_ENDINGS`) that most files of ``folder`` have."""
    files = [f for f in os.listdir(folder) if not f.startswith(".")]
    counts = {}
    for f in files:
        for fe in KNOWN_FILE_ENDINGS:  # .nii.gz before .nii
            if f.lower().endswith(fe):
                counts[fe] = counts.get(fe, 0) + 1
                break
    if not counts:
        raise EvaluationError(f"no segmentation files with a known ending {KNOWN_FILE_ENDINGS} in {folder}; "
                              f"pass file_ending (--file_ending)")
    return max(counts, key=counts.get)


def _case_ids(folder: str, file_ending: str) -> List[str]:
    return sorted(f[: -len(file_ending)] for f in os.listdir(folder)
                  if f.endswith(file_ending) and not f.startswith(".") and len(f) > len(file_ending))


def _determine_reader(file_ending: str, example_file: str, dataset_json: Optional[dict]):
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json, determine_reader_writer_from_file_ending)
    if dataset_json is not None:
        return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False)
    return determine_reader_writer_from_file_ending(file_ending, example_file, allow_nonmatching_filename=True,
                                                    verbose=False)


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def evaluate_case(reference_file: str, prediction_file: str, labels: Sequence[LabelOrRegion], reader=None,
                  empty_policy: str = DEFAULT_EMPTY_POLICY, ignore_label: Optional[int] = None) -> dict:
    """Read one reference/prediction pair with an nnU-Net reader (class or instance; default
    ``SimpleITKIO``) and return ``{"reference_file", "prediction_file", "spacing", "metrics"}``
    with ``metrics = {label_key: binary_metrics(...)}``. Spacing is the reference's."""
    if reader is None:
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
        reader = SimpleITKIO
    rw = reader() if isinstance(reader, type) else reader
    seg_ref, props_ref = rw.read_seg(reference_file)
    seg_pred, props_pred = rw.read_seg(prediction_file)
    if seg_ref.shape != seg_pred.shape:
        raise EvaluationError(f"shape mismatch: {prediction_file} has shape {tuple(seg_pred.shape)}, "
                              f"reference {reference_file} has {tuple(seg_ref.shape)}")
    spacing = tuple(float(s) for s in props_ref["spacing"])
    spacing_pred = tuple(float(s) for s in props_pred.get("spacing", spacing))
    if not np.allclose(spacing, spacing_pred, rtol=1e-3, atol=1e-5):
        warnings.warn(f"spacing {spacing_pred} of {prediction_file} differs from the reference spacing {spacing}; "
                      f"using the reference spacing")
    # readers return (c, z, y, x) with c = 1 for segmentations; spacing covers the spatial axes
    seg_ref, seg_pred = seg_ref[0], seg_pred[0]
    if len(spacing) != seg_ref.ndim:
        raise EvaluationError(f"{reference_file}: spacing {spacing} does not match the array shape {seg_ref.shape}")
    metrics = multilabel_metrics(seg_pred, seg_ref, labels, spacing, empty_policy, ignore_label)
    return {"reference_file": reference_file, "prediction_file": prediction_file, "spacing": list(spacing),
            "metrics": {label_key(k): v for k, v in metrics.items()}}


def _run_cases(jobs: List[tuple], num_processes: int, progress: bool, desc: str) -> List[dict]:
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc=desc, file=sys.stderr, disable=not progress, leave=False)
    results: List[Optional[dict]] = [None] * len(jobs)
    try:
        if num_processes <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = evaluate_case(*job)
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs)), mp_context=ctx) as pool:
                futures = {pool.submit(evaluate_case, *job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def _nanmean(values) -> float:
    v = finite(values)
    return float(v.mean()) if v.size else float("nan")


def per_case_foreground(case_metrics: Mapping[str, Mapping[str, float]], metric: str) -> float:
    """Mean of one metric over the labels of one case, ignoring NaN (NaN if all are NaN)."""
    return _nanmean([m[metric] for m in case_metrics.values()])


def summarize(metric_per_case: List[dict], label_keys: Sequence[str]) -> dict:
    """``mean``, ``foreground_mean``, ``stats`` and ``empty_counts`` of per-case results."""
    all_keys = list(METRICS) + list(COUNT_KEYS)
    mean = {k: {m: _nanmean([c["metrics"][k][m] for c in metric_per_case]) for m in all_keys} for k in label_keys}
    foreground_mean = {m: (float(np.mean([mean[k][m] for k in label_keys if k != "0"]))
                           if label_keys else float("nan")) for m in all_keys}
    stats = {k: {m: mean_std([c["metrics"][k][m] for c in metric_per_case]) for m in METRICS} for k in label_keys}
    stats[FOREGROUND] = {m: mean_std([per_case_foreground(c["metrics"], m) for c in metric_per_case])
                         for m in METRICS}
    empty_counts = {}
    for k in label_keys:
        situations = [empty_situation(c["metrics"][k]["n_pred"], c["metrics"][k]["n_ref"]) for c in metric_per_case]
        empty_counts[k] = {"n_cases": len(situations), "n_both_empty": situations.count("both_empty"),
                           "n_empty_pred": situations.count("pred_empty"),
                           "n_empty_ref": situations.count("ref_empty")}
    return {"mean": mean, "foreground_mean": foreground_mean, "stats": stats, "empty_counts": empty_counts}


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_json(data: dict, output_file: str) -> None:
    """Write a result dict (NaN is written as ``NaN``, as nnU-Net's summary.json does)."""
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as f:
        json.dump(_json_ready(data), f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------
# folder evaluation
# --------------------------------------------------------------------------------------------
def evaluate_folder(ref_folder: str, pred_folder: str, labels: Optional[Sequence[LabelOrRegion]] = None,
                    file_ending: Optional[str] = None, num_processes: int = 2,
                    empty_policy: str = DEFAULT_EMPTY_POLICY, dataset_json: Union[str, Mapping, None] = None,
                    label_names: Optional[Mapping] = None, chill: bool = False,
                    case_ids: Optional[Sequence[str]] = None, ignore_label: Optional[int] = None, reader=None,
                    output_file: Optional[str] = None, markdown_file: Optional[str] = None,
                    progress: Optional[bool] = None) -> dict:
    """Evaluate every ``CASE<file_ending>`` of ``ref_folder`` against ``pred_folder``.

    Args:
        labels: foreground labels (ints) or regions (tuples); default: from ``dataset_json``.
        file_ending: default: ``dataset_json['file_ending']``, else the ending most files of
            ``ref_folder`` have.
        num_processes: worker processes (``<= 1``: in this process).
        empty_policy: key of :data:`nnunet_semi.evaluation.metrics.EMPTY_POLICIES`.
        dataset_json: path or dict; gives labels, names, ignore label, file ending and reader.
        label_names: ``{label or label_key: name}`` for the tables (default: from dataset_json).
        chill: skip cases without a prediction (listed in ``missing_predictions``) instead of
            raising :class:`EvaluationError`.
        case_ids: evaluate only these cases (default: all files of ``ref_folder``).
        ignore_label: reference voxels with this label are excluded (default: from dataset_json).
        reader: nnU-Net reader class or instance (default: from dataset_json / file ending).
        output_file, markdown_file: where to write the JSON and the markdown table (optional).
        progress: progress bar on stderr; default: when there are more than 10 cases.

    Returns the summary dict described in the module docstring.
    """
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty_policy {empty_policy!r}; choose one of {sorted(EMPTY_POLICIES)}")
    for folder, what in ((ref_folder, "reference"), (pred_folder, "prediction")):
        if not os.path.isdir(folder):
            raise EvaluationError(f"{what} folder {folder} does not exist")
    dj = _load_dataset_json(dataset_json)
    names: Dict[str, str] = {}
    if dj is not None:
        dj_labels, names, dj_ignore = labels_from_dataset_json(dj)
        labels = dj_labels if labels is None else labels
        ignore_label = dj_ignore if ignore_label is None else ignore_label
        file_ending = file_ending or dj.get("file_ending")
    if not labels:
        raise EvaluationError("no labels to evaluate: pass labels (-l 1 2 ...) or a dataset.json (-djfile)")
    labels = [tuple(int(x) for x in lab) if isinstance(lab, (tuple, list)) else int(lab) for lab in labels]
    keys = [label_key(lab) for lab in labels]
    if label_names:
        names.update({label_key(k) if not isinstance(k, str) else k: str(v) for k, v in label_names.items()})
    file_ending = file_ending or detect_file_ending(ref_folder)

    if case_ids is None:
        cases = _case_ids(ref_folder, file_ending)
        if not cases:
            raise EvaluationError(f"no files ending with {file_ending} in reference folder {ref_folder}")
    else:
        cases = list(case_ids)
        absent = [os.path.join(ref_folder, c + file_ending) for c in cases
                  if not os.path.isfile(os.path.join(ref_folder, c + file_ending))]
        if absent:
            raise EvaluationError(f"reference file(s) not found: {', '.join(absent)}")
    missing = [c for c in cases if not os.path.isfile(os.path.join(pred_folder, c + file_ending))]
    if missing and not chill:
        files = [os.path.join(pred_folder, c + file_ending) for c in missing]
        raise EvaluationError(f"{len(missing)} prediction file(s) missing: {', '.join(files)} "
                              f"(use chill=True / --chill to evaluate the cases that are present)")
    cases = [c for c in cases if c not in set(missing)]
    if not cases:
        raise EvaluationError(f"no prediction in {pred_folder} matches a reference in {ref_folder}")

    if reader is None:
        reader = _determine_reader(file_ending, os.path.join(ref_folder, cases[0] + file_ending), dj)
    jobs = [(os.path.join(ref_folder, c + file_ending), os.path.join(pred_folder, c + file_ending), labels,
             reader, empty_policy, ignore_label) for c in cases]
    progress = len(jobs) > 10 if progress is None else progress
    per_case = _run_cases(jobs, num_processes, progress, desc=f"evaluating {os.path.basename(os.path.normpath(pred_folder))}")
    for case, res in zip(cases, per_case):
        res["case"] = case

    summary = {"metric_per_case": per_case, **summarize(per_case, keys),
               "label_names": {k: names.get(k, k) for k in keys},
               "missing_predictions": missing,
               "settings": {"reference_folder": os.path.abspath(ref_folder),
                            "prediction_folder": os.path.abspath(pred_folder),
                            "file_ending": file_ending, "labels": keys, "empty_policy": empty_policy,
                            "ignore_label": ignore_label,
                            "reader": getattr(reader, "__name__", type(reader).__name__),
                            "hd_percentile": 95, "surface_connectivity": 1, "std_ddof": 0,
                            "ASD": "directed, prediction surface -> reference surface (medpy asd)",
                            "ASSD": "mean over both directed distance sets (medpy assd)"}}
    if output_file:
        save_json(summary, output_file)
    if markdown_file:
        write_markdown_table(summary, markdown_file)
    return summary


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------
_UNIT_HEADER = {"mm": "mm", "vox": "voxel"}


def _row_name(summary: dict, key: str) -> str:
    name = summary.get("label_names", {}).get(key, key)
    return key if name == key else f"{name} ({key})"


def markdown_table(summary: dict, units: Sequence[str] = ("mm", "vox"), digits: int = 2) -> str:
    """The papers' table for one :func:`evaluate_folder` result: one row per class plus a Mean row,
    columns Dice (%), Jaccard (%), 95HD and ASD (per unit), each ``mean ± std`` over cases."""
    keys = summary["settings"]["labels"]
    header = ["Class", "Dice (%)", "Jaccard (%)"]
    for u in units:
        header += [f"95HD ({_UNIT_HEADER[u]})", f"ASD ({_UNIT_HEADER[u]})"]
    rows = []
    for key, title in [(k, _row_name(summary, k)) for k in keys] + [(FOREGROUND, "Mean")]:
        st = summary["stats"][key]
        row = [title, format_mean_std(st["Dice"], 100, digits), format_mean_std(st["Jaccard"], 100, digits)]
        for u in units:
            row += [format_mean_std(st[f"HD95_{u}"], 1, digits), format_mean_std(st[f"ASD_{u}"], 1, digits)]
        rows.append(row)
    n_cases = len(summary["metric_per_case"])
    notes = [f"{n_cases} cases, mean ± std (ddof 0) over cases; Mean row: classes averaged within each case first. "
             f"ASD: prediction → reference surface (medpy `asd`). Empty-mask policy: "
             f"`{summary['settings']['empty_policy']}`."]
    for key in keys:
        ec = summary["empty_counts"][key]
        n_dist = summary["stats"][key][f"HD95_{units[0]}"]["n"] if units else n_cases
        if ec["n_both_empty"] or ec["n_empty_pred"] or ec["n_empty_ref"] or n_dist != n_cases:
            notes.append(f"{_row_name(summary, key)}: {ec['n_empty_pred']} empty prediction(s), "
                         f"{ec['n_empty_ref']} empty reference(s), {ec['n_both_empty']} both empty; "
                         f"distances over {n_dist} of {n_cases} cases.")
    if summary.get("missing_predictions"):
        notes.append(f"Missing predictions (skipped): {', '.join(summary['missing_predictions'])}.")
    return markdown_rows(header, rows) + "\n\n" + "\n".join(notes) + "\n"


def write_markdown_table(summary: dict, output_file: Optional[str] = None, units: Sequence[str] = ("mm", "vox"),
                         digits: int = 2) -> str:
    """:func:`markdown_table` of a summary; also written to ``output_file`` if given. Returns the text."""
    text = markdown_table(summary, units, digits)
    if output_file:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w") as f:
            f.write(text)
    return text


# --------------------------------------------------------------------------------------------
# comparison of several prediction folders
# --------------------------------------------------------------------------------------------
def paired_difference(a: Mapping[str, float], b: Mapping[str, float], min_n_test: int = 5) -> dict:
    """Paired differences ``b - a`` over the keys (cases) both have with finite values.

    Returns ``{"mean_diff", "std_diff", "n", "p_value"}``; ``p_value`` is the two-sided Wilcoxon
    signed-rank test (scipy, zeros dropped) when ``n >= min_n_test``, 1.0 if all differences are
    0, otherwise NaN."""
    common = [k for k in a if k in b and is_finite(a[k]) and is_finite(b[k])]
    d = np.asarray([float(b[k]) - float(a[k]) for k in common], dtype=float)
    out = {"mean_diff": float("nan"), "std_diff": float("nan"), "n": int(d.size), "p_value": float("nan")}
    if d.size:
        out["mean_diff"], out["std_diff"] = float(d.mean()), float(d.std())
    if d.size >= min_n_test:
        if not np.any(d):
            out["p_value"] = 1.0
        else:
            from scipy.stats import wilcoxon
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    out["p_value"] = float(wilcoxon(d).pvalue)
                except ValueError:
                    pass
    return out


def _case_values(summary: dict, key: str, metric: str) -> Dict[str, float]:
    if key == FOREGROUND:
        return {c["case"]: per_case_foreground(c["metrics"], metric) for c in summary["metric_per_case"]}
    return {c["case"]: c["metrics"][key][metric] for c in summary["metric_per_case"]}


def compare_folders(ref_folder: str, predictions: Mapping[str, str], labels: Optional[Sequence[LabelOrRegion]] = None,
                    file_ending: Optional[str] = None, num_processes: int = 2,
                    empty_policy: str = DEFAULT_EMPTY_POLICY, dataset_json: Union[str, Mapping, None] = None,
                    label_names: Optional[Mapping] = None, chill: bool = False,
                    case_ids: Optional[Sequence[str]] = None, output_prefix: Optional[str] = None,
                    progress: Optional[bool] = None) -> dict:
    """Evaluate several prediction folders (``{method_name: folder}``, the first is the baseline)
    against one reference folder and compare them.

    Returns ``{"methods": [names], "baseline": name, "summaries": {name: evaluate_folder(...)},
    "paired": {name: {label_key or "foreground": {metric: paired_difference(...)}}},
    "settings": {...}}``; ``paired`` has every method but the baseline, differences are
    ``method - baseline`` per case, for :data:`PAIRED_METRICS`. With ``output_prefix``, writes
    ``<prefix>.json`` and ``<prefix>.md`` (:func:`comparison_markdown`). Other arguments as in
    :func:`evaluate_folder`.
    """
    if not predictions:
        raise EvaluationError("no prediction folders to compare")
    names = list(predictions)
    summaries = {}
    for name in names:
        summaries[name] = evaluate_folder(ref_folder, predictions[name], labels, file_ending, num_processes,
                                          empty_policy, dataset_json, label_names, chill, case_ids,
                                          progress=progress)
    baseline = names[0]
    keys = list(summaries[baseline]["settings"]["labels"]) + [FOREGROUND]
    paired = {}
    for name in names[1:]:
        paired[name] = {key: {m: paired_difference(_case_values(summaries[baseline], key, m),
                                                   _case_values(summaries[name], key, m))
                              for m in PAIRED_METRICS} for key in keys}
    result = {"methods": names, "baseline": baseline, "summaries": summaries, "paired": paired,
              "settings": {"reference_folder": os.path.abspath(ref_folder),
                           "predictions": {n: os.path.abspath(p) for n, p in predictions.items()},
                           "empty_policy": empty_policy, "difference": "method - baseline, per case",
                           "test": "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon), n >= 5"}}
    if output_prefix:
        save_json(result, output_prefix + ".json")
        with open(output_prefix + ".md", "w") as f:
            f.write(comparison_markdown(result))
    return result


def comparison_markdown(comparison: dict, units: Sequence[str] = ("mm", "vox"), digits: int = 2) -> str:
    """Markdown for a :func:`compare_folders` result: per unit, a table with one row per method
    and ``mean ± std`` of Dice (%), Jaccard (%), 95HD and ASD per class and for the mean; then
    the paired differences of Dice and 95HD against the baseline."""
    names, baseline = comparison["methods"], comparison["baseline"]
    first = comparison["summaries"][baseline]
    keys = list(first["settings"]["labels"])
    titles = [(k, _row_name(first, k)) for k in keys] + [(FOREGROUND, "Mean")]
    out = []
    for u in units:
        out.append(f"### Metrics (distances in {_UNIT_HEADER[u]})\n")
        header = ["Method"]
        for _, t in titles:
            header += [f"{t} Dice (%)", f"{t} Jaccard (%)", f"{t} 95HD ({_UNIT_HEADER[u]})",
                       f"{t} ASD ({_UNIT_HEADER[u]})"]
        rows = []
        for name in names:
            st = comparison["summaries"][name]["stats"]
            row = [name]
            for k, _ in titles:
                row += [format_mean_std(st[k]["Dice"], 100, digits), format_mean_std(st[k]["Jaccard"], 100, digits),
                        format_mean_std(st[k][f"HD95_{u}"], 1, digits), format_mean_std(st[k][f"ASD_{u}"], 1, digits)]
            rows.append(row)
        out.append(markdown_rows(header, rows))
        out.append("")
    if len(names) > 1:
        out.append(f"### Paired differences against {baseline} (method − baseline, per case)\n")
        header = ["Method", "Class", "n", "ΔDice (%)", "p (Dice)"]
        for u in units:
            header += [f"n (95HD {_UNIT_HEADER[u]})", f"Δ95HD ({_UNIT_HEADER[u]})", f"p (95HD {_UNIT_HEADER[u]})"]
        rows = []
        for name in names[1:]:
            for k, t in titles:
                pd = comparison["paired"][name][k]
                row = [name, t, str(pd["Dice"]["n"]), format_difference(pd["Dice"], 100, digits),
                       format_p(pd["Dice"]["p_value"])]
                for u in units:
                    h = pd[f"HD95_{u}"]
                    row += [str(h["n"]), format_difference(h, 1, digits), format_p(h["p_value"])]
                rows.append(row)
        out.append(markdown_rows(header, rows))
        out.append("")
        out.append("n: cases where both methods have a finite value. "
                   "p: two-sided Wilcoxon signed-rank test, only for n ≥ 5.")
    n_cases = {name: len(comparison["summaries"][name]["metric_per_case"]) for name in names}
    out.append(f"\nCases per method: {', '.join(f'{n}: {c}' for n, c in n_cases.items())}; mean ± std (ddof 0) over "
               f"cases; ASD: prediction → reference (medpy `asd`); empty-mask policy "
               f"`{comparison['settings']['empty_policy']}`.")
    return "\n".join(out) + "\n"


__all__ = [
    "EvaluationError", "evaluate_case", "evaluate_folder", "summarize", "markdown_table", "write_markdown_table",
    "compare_folders", "comparison_markdown", "paired_difference", "labels_from_dataset_json", "label_key",
    "detect_file_ending", "save_json", "PAIRED_METRICS", "KNOWN_FILE_ENDINGS", "SUMMARY_FILE", "FOREGROUND",
]
