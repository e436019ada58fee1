"""The formatting shared by the evaluation reports and the benchmark report (nnunet_semi/reporting.py), and that
both use it (fast, no files)."""
import math

from nnunet_semi.reporting import (fmt_seconds, format_difference, format_mean_std, format_p, is_finite,
                                   markdown_rows, mean_std)


def test_markdown_rows():
    assert markdown_rows(["a", "b"], [["1", "2"], [3, "x y"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | x y |"
    assert markdown_rows(["only"], []) == "| only |\n|---|"


def test_mean_std_over_the_finite_values():
    st = mean_std([1.0, 3.0, float("nan"), float("inf")])
    assert st == {"mean": 2.0, "std": 1.0, "n": 2}                  # ddof 0
    empty = mean_std([float("nan")])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])
    assert not is_finite(None) and not is_finite("x") and not is_finite(float("nan")) and is_finite("1.5")


def test_format_mean_std_and_differences():
    assert format_mean_std({"mean": 0.5, "std": 0.125, "n": 3}, 100) == "50.00 ± 12.50"
    assert format_mean_std({"mean": 1.23456, "std": 0.1, "n": 3}, 1, 3) == "1.235 ± 0.100"
    assert format_mean_std({"mean": -0.001, "std": 0.01, "n": 2}) == "0.00 ± 0.01"    # no "-0.00"
    assert format_mean_std({"mean": float("nan"), "std": 0.0, "n": 0}) == "n/a"
    assert format_mean_std({}) == "n/a" and format_mean_std({"mean": 1.0, "std": 0.0, "n": 0}) == "n/a"
    assert format_difference({"mean_diff": -0.02, "std_diff": 0.01, "n": 6}, 100) == "-2.00 ± 1.00"
    assert format_difference({"mean_diff": float("nan"), "std_diff": float("nan"), "n": 0}) == "n/a"


def test_format_p_and_seconds():
    assert format_p(0.0186) == "0.0186" and format_p(0.5) == "0.5" and format_p(1.0) == "1"
    assert format_p(0.00012) == "1.2e-04"
    assert format_p(float("nan")) == "n/a" and format_p(None) == "n/a"
    assert fmt_seconds(42.4) == "42 s" and fmt_seconds(65) == "1 min 05 s" and fmt_seconds(7620) == "2 h 07 min"


def test_evaluation_and_benchmark_tables_use_the_helpers():
    """The evaluation's per-class table and the benchmark's results table are built with markdown_rows and
    format_mean_std (same header rule, same cells)."""
    from nnunet_semi.benchmark import aggregate, results_table
    from nnunet_semi.evaluation.evaluate import markdown_table, summarize

    metrics = {"Dice": 0.8, "Jaccard": 0.8 / 1.2, "HD95_mm": 2.0, "HD95_vox": 2.0, "ASD_mm": 1.0, "ASD_vox": 1.0,
               "ASSD_mm": 1.0, "ASSD_vox": 1.0, "TP": 1, "FP": 0, "FN": 0, "TN": 0, "n_pred": 1, "n_ref": 1}
    per_case = [{"case": "c0", "metrics": {"1": dict(metrics)}}, {"case": "c1", "metrics": {"1": dict(metrics, Dice=0.6)}}]
    summary = {"metric_per_case": per_case, **summarize(per_case, ["1"]), "label_names": {"1": "organ"},
               "settings": {"labels": ["1"], "empty_policy": "default"}, "missing_predictions": []}
    dice = format_mean_std(summary["stats"]["1"]["Dice"], 100)
    assert dice == "70.00 ± 10.00"
    table = markdown_table(summary)
    assert table.startswith(markdown_rows(["Class", "Dice (%)", "Jaccard (%)", "95HD (mm)", "ASD (mm)", "95HD (voxel)",
                                           "ASD (voxel)"], []))
    assert f"| organ (1) | {dice} |" in table
    agg = aggregate({"SupervisedBaselineTrainer": {0: summary}}, "SupervisedBaselineTrainer")
    text = results_table(agg)
    assert text.splitlines()[1] == "|" + "---|" * 9
    assert f"| SupervisedBaselineTrainer | organ (1) | {dice} |" in text


def test_every_logged_term_has_one_axis():
    from nnunet_semi.training.progress import axis_of
    assert [axis_of(k) for k in ("tau", "mask_ratio", "clip_ratio", "clip_ratio_teacher")] == ["ratio"] * 4
    assert [axis_of(k) for k in ("grad_norm", "grad_norm_teacher")] == ["own"] * 2
    assert [axis_of(k) for k in ("loss_sup", "loss_s1", "feedback_h", "loss_teacher_pl")] == ["loss"] * 4
