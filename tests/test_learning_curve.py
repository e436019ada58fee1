"""benchmarks/learning_curve.py: the converged budget, the table and the refusal of mismatched folders,
on benchmark folders written here (settings.json + results.json as the harness writes them)."""
import json
import os
import subprocess
import sys


from e2e_util import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "learning_curve.py")


def fake_folder(root, epochs, iters, dice_by_seed, configuration="2d", train_s=60.0, others=None):
    """``others``: {trainer: {seed: Dice}} recorded in the same folder (semi-supervised arms)."""
    folder = os.path.join(root, f"b_{epochs}x{iters}_{configuration}")
    os.makedirs(folder)
    settings = {"dataset": "104", "configuration": configuration, "plans": "nnUNetPlans", "eval_group": "val",
                "plans_config": False, "epochs": epochs, "iters": iters, "evaluated_cases": ["a", "b"]}
    arms = {"SupervisedBaselineTrainer": dice_by_seed, **(others or {})}
    results = {"seed_level": {t: {"per_seed": {str(s): {"Dice": d} for s, d in by_seed.items()}}
                              for t, by_seed in arms.items()},
               "runs": {f"{t}/seed_{s}": {"trainer": t, "seed": s, "train_s": train_s * (2 if t != "SupervisedBaselineTrainer" else 1)}
                        for t, by_seed in arms.items() for s in by_seed}}
    json.dump(settings, open(os.path.join(folder, "settings.json"), "w"))
    json.dump(results, open(os.path.join(folder, "results.json"), "w"))
    return folder


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_converged_budget_table_and_plot(tmp_path):
    folders = [fake_folder(tmp_path, 10, 50, {0: 0.70, 1: 0.72}), fake_folder(tmp_path, 20, 50, {0: 0.79, 1: 0.80}),
               fake_folder(tmp_path, 40, 50, {0: 0.815, 1: 0.82}), fake_folder(tmp_path, 80, 50, {0: 0.82, 1: 0.83})]
    out = str(tmp_path / "curve")
    p = run(*folders[::-1], "-o", out)          # any order: sorted by budget
    assert p.returncode == 0, p.stderr
    md = open(out + ".md").read()
    rows = [line for line in md.splitlines() if line.startswith("| 1000 ") or line.startswith("| 2000 ")]
    assert rows[0] == "| 1000 | 20 x 50 | 79.00 | 80.00 | 79.50 | +8.50 | 1.0 min |"
    assert rows[1] == "| 2000 | 40 x 50 | 81.50 | 82.00 | 81.75 | +2.25 | 1.0 min |"
    # 1000 -> 2000 gains 2.25, 2000 -> 4000 gains 0.75 (< 1): converged at 2000
    assert "**2000 iterations**" in md
    assert os.path.getsize(out + ".png") > 1000
    # with a stricter threshold no budget qualifies
    p = run(*folders, "-o", out, "--threshold", "0.5")
    assert "not reached by these budgets" in open(out + ".md").read()


def test_mismatched_folders_are_refused(tmp_path):
    a = fake_folder(tmp_path, 10, 50, {0: 0.7})
    b = fake_folder(tmp_path, 20, 50, {0: 0.8}, configuration="3d_fullres")
    p = run(a, b, "-o", str(tmp_path / "c"))
    assert p.returncode != 0 and "differs from" in p.stderr and "configuration" in p.stderr
    p = run(a, str(tmp_path / "missing"), "-o", str(tmp_path / "c"))
    assert p.returncode != 0 and "missing" in p.stderr and "settings.json" in p.stderr


def test_semi_supervised_arms_beside_the_curve(tmp_path):
    """--arms: each arm's mean per budget and its difference from supervised over the seeds both have; a
    folder without the arm is skipped for it; an arm recorded nowhere is an error naming it."""
    mt = "MeanTeacherTrainer"
    folders = [fake_folder(tmp_path, 10, 50, {0: 0.70, 1: 0.72}),
               fake_folder(tmp_path, 20, 50, {0: 0.79, 1: 0.80}, others={mt: {0: 0.80, 1: 0.80}}),
               fake_folder(tmp_path, 40, 50, {0: 0.81, 1: 0.82}, others={mt: {0: 0.84}}),
               fake_folder(tmp_path, 80, 50, {0: 0.83})]
    out = str(tmp_path / "curve")
    p = run(*folders, "-o", out, "--arms", mt)
    assert p.returncode == 0, p.stderr
    md = open(out + ".md").read()
    rows = [line for line in md.splitlines() if f"| {mt} |" in line]
    assert rows == ["| 1000 | MeanTeacherTrainer | 80.00, 80.00 | 80.00 | +0.50 (2 seeds) | 2.0 min |",
                    "| 2000 | MeanTeacherTrainer | 84.00 | 84.00 | +3.00 (1 seed) | 2.0 min |"]
    assert "| 500 | 10 x 50 |" in md          # the supervised curve is unchanged
    # a budget with fewer seeds: its gain is over the seeds both budgets have, and says which
    assert "| 4000 | 80 x 50 | 83.00 | – | 83.00 | +2.00 (seed 0) |" in md
    assert os.path.getsize(out + ".png") > 1000
    p = run(*folders, "-o", out, "--arms", "CrossMatchTrainer")
    assert p.returncode != 0 and "CrossMatchTrainer" in p.stderr
