"""Tests of the folder evaluator and the commands nnUNetv2_semi_evaluate / nnUNetv2_semi_compare
on tiny NIfTI folders written at test time (spacing (z, y, x) = (2, 1, 1) mm)."""
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_semi.evaluation import cli
from nnunet_semi.evaluation.evaluate import (
    EvaluationError, compare_folders, evaluate_folder, labels_from_dataset_json, paired_difference,
)

CASES = [f"case_{i:03d}" for i in range(6)]
SPACING_XYZ = (1.0, 1.0, 2.0)  # SimpleITK order; nnU-Net's reader gives (2, 1, 1) for (z, y, x)


def _write(seg: np.ndarray, path: str) -> None:
    img = sitk.GetImageFromArray(seg.astype(np.uint8))
    img.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(img, path)


def _reference(i: int) -> np.ndarray:
    seg = np.zeros((14, 24, 24), np.uint8)
    seg[2:8, 3:11, 3:11 + i % 3] = 1  # label 1, size varies a little between cases
    seg[3:9, 14:20, 14:20] = 2        # label 2
    return seg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ref/ ; shifted/: label 1 shifted by one slice (2 mm), label 2 exact ;
    exact/: identical to ref except case 5 where label 2 is not predicted."""
    root = tmp_path_factory.mktemp("evalcli")
    paths = {name: root / name for name in ("ref", "shifted", "exact")}
    for p in paths.values():
        p.mkdir()
    for i, case in enumerate(CASES):
        ref = _reference(i)
        _write(ref, str(paths["ref"] / f"{case}.nii.gz"))
        shifted = ref.copy()
        shifted[ref == 1] = 0
        shifted[np.roll(ref == 1, 1, axis=0)] = 1
        _write(shifted, str(paths["shifted"] / f"{case}.nii.gz"))
        exact = ref.copy()
        if i == 5:
            exact[exact == 2] = 0
        _write(exact, str(paths["exact"] / f"{case}.nii.gz"))
    dj = {"labels": {"background": 0, "LA": 1, "Myo": 2}, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"},
          "numTraining": 6}
    with open(root / "dataset.json", "w") as f:
        json.dump(dj, f)
    return {k: str(v) for k, v in paths.items()} | {"root": str(root), "dj": str(root / "dataset.json")}


def _label1_dice(i: int) -> float:
    n_vox = 6 * 8 * (8 + i % 3)
    return 2 * (n_vox * 5 / 6) / (2 * n_vox)


def _row(markdown: str, title: str) -> list:
    line = next(l for l in markdown.splitlines() if l.startswith(f"| {title}"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_evaluate_cli_json_and_markdown(folders, tmp_path, capsys):
    out = str(tmp_path / "summary.json")
    rc = cli.evaluate_entry([folders["ref"], folders["shifted"], "-l", "1", "2", "-np", "1", "-o", out])
    assert rc == 0
    s = json.load(open(out))
    assert {"metric_per_case", "mean", "foreground_mean", "stats", "empty_counts", "settings"} <= set(s)
    assert len(s["metric_per_case"]) == 6
    for i, entry in enumerate(s["metric_per_case"]):
        assert entry["case"] == CASES[i]
        assert entry["prediction_file"].endswith(f"shifted/{CASES[i]}.nii.gz")
        assert entry["reference_file"].endswith(f"ref/{CASES[i]}.nii.gz")
        assert entry["spacing"] == [2.0, 1.0, 1.0]
        m1, m2 = entry["metrics"]["1"], entry["metrics"]["2"]
        assert set(m1) >= {"Dice", "Jaccard", "HD95_mm", "HD95_vox", "ASD_mm", "ASD_vox", "ASSD_mm", "ASSD_vox",
                           "n_ref", "n_pred"}
        assert m1["Dice"] == pytest.approx(5 / 6)
        assert m1["HD95_mm"] == pytest.approx(2.0)  # one slice of 2 mm
        assert m1["HD95_vox"] == pytest.approx(1.0)
        assert m1["n_ref"] == m1["n_pred"] == 6 * 8 * (8 + i % 3)
        assert m2["Dice"] == 1.0 and m2["HD95_mm"] == 0.0
    assert s["mean"]["1"]["Dice"] == pytest.approx(5 / 6)
    assert s["foreground_mean"]["Dice"] == pytest.approx((5 / 6 + 1) / 2)
    assert s["foreground_mean"]["HD95_mm"] == pytest.approx(1.0)
    assert s["stats"]["1"]["HD95_mm"] == {"mean": pytest.approx(2.0), "std": pytest.approx(0.0), "n": 6}
    assert s["stats"]["foreground"]["Dice"]["mean"] == pytest.approx((5 / 6 + 1) / 2)
    assert s["empty_counts"]["2"] == {"n_cases": 6, "n_both_empty": 0, "n_empty_pred": 0, "n_empty_ref": 0}
    assert s["settings"]["empty_policy"] == "default"

    md = open(out[:-5] + ".md").read()
    assert md == capsys.readouterr().out.strip() + "\n"  # also printed
    assert "| Class | Dice (%) | Jaccard (%) | 95HD (mm) | ASD (mm) | 95HD (voxel) | ASD (voxel) |" in md
    row = _row(md, "1")
    assert row[1] == "83.33 ± 0.00"
    assert row[2] == f"{100 * 5 / 7:.2f} ± 0.00"  # Jaccard of a 1-slice shift of 6 slices
    assert row[3] == "2.00 ± 0.00" and row[5] == "1.00 ± 0.00"
    asd_mm = s["stats"]["1"]["ASD_mm"]
    assert row[4] == f"{asd_mm['mean']:.2f} ± {asd_mm['std']:.2f}"
    mean_row = _row(md, "Mean")
    assert mean_row[1] == f"{100 * (5 / 6 + 1) / 2:.2f} ± 0.00"
    assert mean_row[3] == "1.00 ± 0.00"

    # nnU-Net can read it back
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    back = load_summary_json(out)
    assert back["mean"][1]["Dice"] == pytest.approx(5 / 6)


def test_default_output_location_and_dataset_json(folders, tmp_path):
    pred = str(tmp_path / "pred")
    shutil.copytree(folders["exact"], pred)
    rc = cli.evaluate_entry([folders["ref"], pred, "-djfile", folders["dj"], "-np", "1"])
    assert rc == 0
    s = json.load(open(os.path.join(pred, "summary_semi.json")))
    assert s["label_names"] == {"1": "LA", "2": "Myo"}
    # case 5: label 2 not predicted -> default policy: Dice 0, distances NaN, counted
    m2 = s["metric_per_case"][5]["metrics"]["2"]
    assert m2["Dice"] == 0.0 and math.isnan(m2["HD95_mm"]) and m2["n_pred"] == 0
    assert s["empty_counts"]["2"]["n_empty_pred"] == 1
    assert s["stats"]["2"]["HD95_mm"]["n"] == 5 and s["stats"]["2"]["Dice"]["n"] == 6
    assert s["stats"]["2"]["Dice"]["mean"] == pytest.approx(5 / 6)
    md = open(os.path.join(pred, "summary_semi.md")).read()
    assert "| LA (1) | 100.00 ± 0.00 |" in md
    assert "Myo (2): 1 empty prediction(s)" in md and "distances over 5 of 6 cases" in md


def test_labels_from_dataset_json_regions_and_ignore():
    labels, names, ignore = labels_from_dataset_json(
        {"labels": {"background": 0, "whole": [1, 2], "core": [2], "ignore": 3}})
    assert labels == [(1, 2), 2] and names == {"(1, 2)": "whole", "2": "core"} and ignore == 3


def test_empty_policy_option(folders, tmp_path):
    out = str(tmp_path / "g.json")
    assert cli.evaluate_entry([folders["ref"], folders["exact"], "-l", "2", "-np", "1", "-o", out,
                               "--empty_policy", "genericssl"]) == 0
    m2 = json.load(open(out))["metric_per_case"][5]["metrics"]["2"]
    assert m2["Dice"] == 0.0 and m2["HD95_mm"] == 128.0 and m2["ASD_vox"] == 128.0
    assert cli.evaluate_entry([folders["ref"], folders["exact"], "-l", "2", "-np", "1", "-o", out,
                               "--empty_policy", "ssl4mis"]) == 0
    m2 = json.load(open(out))["metric_per_case"][5]["metrics"]["2"]
    assert m2["Dice"] == 0.0 and m2["HD95_mm"] == 0.0


def test_missing_prediction_errors_unless_chill(folders, tmp_path, capsys):
    pred = tmp_path / "partial"
    shutil.copytree(folders["shifted"], pred)
    os.remove(pred / f"{CASES[2]}.nii.gz")
    rc = cli.evaluate_entry([folders["ref"], str(pred), "-l", "1", "-np", "1", "-o", str(tmp_path / "x.json")])
    assert rc == 1
    assert os.path.join(str(pred), f"{CASES[2]}.nii.gz") in capsys.readouterr().err
    with pytest.raises(EvaluationError, match=f"{CASES[2]}.nii.gz"):
        evaluate_folder(folders["ref"], str(pred), [1], num_processes=1)
    s = evaluate_folder(folders["ref"], str(pred), [1], num_processes=1, chill=True)
    assert s["missing_predictions"] == [CASES[2]]
    assert [c["case"] for c in s["metric_per_case"]] == [c for c in CASES if c != CASES[2]]


def test_process_pool_gives_same_results(folders):
    one = evaluate_folder(folders["ref"], folders["shifted"], [1, 2], num_processes=1, progress=False)
    two = evaluate_folder(folders["ref"], folders["shifted"], [1, 2], num_processes=2, progress=True)
    assert [c["case"] for c in two["metric_per_case"]] == CASES
    for a, b in zip(one["metric_per_case"], two["metric_per_case"]):
        assert a["metrics"] == b["metrics"]


def test_compare_paired_differences(folders, tmp_path):
    prefix = str(tmp_path / "cmp")
    rc = cli.compare_entry([folders["ref"], f"shift={folders['shifted']}", folders["exact"], "-l", "1", "2",
                            "-np", "1", "-o", prefix])
    assert rc == 0
    res = json.load(open(prefix + ".json"))
    assert res["methods"] == ["shift", "exact"] and res["baseline"] == "shift"
    assert set(res["summaries"]) == {"shift", "exact"} and set(res["paired"]) == {"exact"}
    p1 = res["paired"]["exact"]["1"]
    assert p1["Dice"]["n"] == 6
    assert p1["Dice"]["mean_diff"] == pytest.approx(1 / 6) and p1["Dice"]["std_diff"] == pytest.approx(0, abs=1e-12)
    assert p1["HD95_mm"]["mean_diff"] == pytest.approx(-2.0) and p1["HD95_vox"]["mean_diff"] == pytest.approx(-1.0)
    from scipy.stats import wilcoxon
    assert p1["Dice"]["p_value"] == pytest.approx(wilcoxon([1 / 6] * 6).pvalue)
    assert p1["Dice"]["p_value"] < 0.05
    # label 2: the exact method missed it in case 5 -> Dice over 6 cases, HD95 over the 5 finite pairs
    p2 = res["paired"]["exact"]["2"]
    assert p2["Dice"]["n"] == 6 and p2["Dice"]["mean_diff"] == pytest.approx(-1 / 6)
    assert p2["HD95_mm"]["n"] == 5 and p2["HD95_mm"]["mean_diff"] == 0.0 and p2["HD95_mm"]["p_value"] == 1.0
    # foreground (classes averaged within each case)
    pf = res["paired"]["exact"]["foreground"]
    expected = [((1 + 1) / 2 - (5 / 6 + 1) / 2) if i < 5 else ((1 + 0) / 2 - (5 / 6 + 1) / 2) for i in range(6)]
    assert pf["Dice"]["mean_diff"] == pytest.approx(np.mean(expected))
    assert pf["Dice"]["std_diff"] == pytest.approx(np.std(expected))

    md = open(prefix + ".md").read()
    assert "### Metrics (distances in mm)" in md and "### Metrics (distances in voxel)" in md
    assert "1 Dice (%)" in md and "Mean 95HD (mm)" in md
    shift_row = _row(md, "shift")
    assert shift_row[1] == "83.33 ± 0.00" and shift_row[3] == "2.00 ± 0.00"
    diff_row = _row(md, "exact | 1 ")
    assert diff_row[2] == "6" and diff_row[3] == "16.67 ± 0.00"
    assert diff_row[5] == "6" and diff_row[6] == "-2.00 ± 0.00"
    diff_row2 = _row(md, "exact | 2 ")
    assert diff_row2[2] == "6" and diff_row2[5] == "5" and diff_row2[7] == "1"  # 95HD over 5 pairs, p = 1
    assert "-0.00" not in md


def test_compare_api_and_paired_difference():
    res = paired_difference({"a": 1.0, "b": 2.0, "c": float("nan")}, {"a": 2.0, "b": 2.5, "c": 1.0, "d": 0.0})
    assert res["n"] == 2 and res["mean_diff"] == pytest.approx(0.75) and math.isnan(res["p_value"])
    a = {str(i): float(i) for i in range(8)}
    b = {str(i): float(i) + (0.1 * i + 0.05) for i in range(8)}
    res = paired_difference(a, b)
    assert res["n"] == 8 and res["p_value"] == pytest.approx(2 / 2 ** 8)  # exact test, all differences > 0


def test_compare_folders_api(folders):
    res = compare_folders(folders["ref"], {"exact": folders["exact"], "same": folders["exact"]}, [1],
                          num_processes=1)
    assert res["paired"]["same"]["1"]["Dice"] == {"mean_diff": 0.0, "std_diff": 0.0, "n": 6, "p_value": 1.0}


def test_help_and_argument_errors(capsys):
    for entry in (cli.evaluate_entry, cli.compare_entry):
        with pytest.raises(SystemExit) as e:
            entry(["--help"])
        assert e.value.code == 0
        assert "--empty_policy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.evaluate_entry(["a", "b"])  # no labels
    assert e.value.code == 2
    assert "-djfile" in capsys.readouterr().err
    assert cli.parse_named_folders(["x=/p/a", "/p/b"]) == {"x": "/p/a", "b": "/p/b"}
    with pytest.raises(ValueError, match="twice"):
        cli.parse_named_folders(["/p/a", "/q/a"])


def test_console_scripts_installed():
    exe = shutil.which("nnUNetv2_semi_compare")
    if exe is None:
        pytest.skip("console scripts not on PATH")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Wilcoxon" in out.stdout
