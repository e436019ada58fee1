"""Benchmark records (nnunet_semi/benchmark/records.py, benchmarks/record.py): a benchmark folder's settings, wall
times and per-case evaluations kept in the repository, merged over folders of other sessions, with the report
rebuilt over every recorded seed; refusals leave the record as it was."""
import json
import os
import subprocess
import sys

import pytest

from e2e_util import REPO
from helpers import files_under
from nnunet_semi.benchmark.records import RecordError, record_folder
from nnunet_semi.evaluation.evaluate import summarize

SUP, MT = "SupervisedBaselineTrainer", "MeanTeacherTrainer"
CASES = ["c0", "c1", "c2"]


def evaluation(dice_per_case):
    metrics = {"Jaccard": 0.5, "HD95_mm": 2.0, "HD95_vox": 2.0, "ASD_mm": 1.0, "ASD_vox": 1.0, "ASSD_mm": 1.0,
               "ASSD_vox": 1.0, "TP": 1, "FP": 0, "FN": 0, "TN": 0, "n_pred": 1, "n_ref": 1}
    per_case = [{"case": c, "metrics": {"1": dict(metrics, Dice=d)}} for c, d in zip(CASES, dice_per_case)]
    return {"metric_per_case": per_case, **summarize(per_case, ["1"]), "label_names": {"1": "organ"},
            "settings": {"labels": ["1"], "empty_policy": "default"}, "missing_predictions": []}


def bench_folder(root, name, runs, epochs=80, commit="abc1234"):
    """A benchmark folder as the harness leaves it: settings.json, runs.json, seed_<s>/eval/<arm>.json (and the
    large files a record must not take: a checkpoint)."""
    folder = os.path.join(root, name)
    os.makedirs(folder)
    seeds = sorted({s for _, s in runs})
    settings = {"dataset": "Dataset104_Hippocampus", "configuration": "2d", "effective_configuration": "2d",
                "plans": "nnUNetPlans", "fold": "all", "epochs": epochs, "iters": 50, "val_iters": 5, "device": "cpu",
                "plans_config": False, "eval_group": "val", "disable_tta": True, "step_size": 0.5,
                "evaluated_cases": CASES, "n_evaluated_cases": 3, "iterations_total": epochs * 50,
                "trainers": list(dict.fromkeys(a for a, _ in runs)), "seeds": seeds, "git_commit": commit,
                "first_started": "2026-12-02 06:03:43"}
    json.dump(settings, open(os.path.join(folder, "settings.json"), "w"))
    json.dump({f"{a}/seed_{s}": {"trainer": a, "seed": s, "train_s": 60.0 + s} for a, s in runs},
              open(os.path.join(folder, "runs.json"), "w"))
    for (arm, seed), dice in runs.items():
        ev = os.path.join(folder, f"seed_{seed}", "eval")
        os.makedirs(ev, exist_ok=True)
        json.dump(evaluation(dice), open(os.path.join(ev, arm + ".json"), "w"))
        model = os.path.join(folder, f"seed_{seed}", "nnUNet_results", arm)
        os.makedirs(model, exist_ok=True)
        open(os.path.join(model, "checkpoint_final.pth"), "wb").write(b"x" * 1000)
    return folder


def test_record_merges_sessions_and_rebuilds_the_report(tmp_path):
    into = str(tmp_path / "records")
    # session 1: seed 0 of both arms; the session's machine and its folder are then lost
    s1 = bench_folder(tmp_path / "session1", "curve_80x50_val", {(SUP, 0): [0.80, 0.82, 0.84], (MT, 0): [0.84, 0.84, 0.86]})
    ch = record_folder(s1, into)
    rec = os.path.join(into, "curve_80x50_val")
    assert sorted(ch.added) == [f"{MT}/seed_0", f"{SUP}/seed_0"] and not ch.kept
    assert sorted(files_under(rec)) == sorted(["settings.json", "runs.json", "results.json", "results.md",
                                            f"seed_0/eval/{SUP}.json", f"seed_0/eval/{MT}.json"])   # no checkpoint
    # session 2: seed 2 only, in a new folder of the same name
    s2 = bench_folder(tmp_path / "session2", "curve_80x50_val", {(SUP, 2): [0.70, 0.80, 0.90], (MT, 2): [0.75, 0.80, 0.88]},
                      commit="def5678")
    ch = record_folder(s2, into)
    assert sorted(ch.added) == [f"{MT}/seed_2", f"{SUP}/seed_2"]
    assert sorted(ch.kept) == [f"{MT}/seed_0", f"{SUP}/seed_0"]
    res = json.load(open(os.path.join(rec, "results.json")))
    per_seed = res["seed_level"][MT]["per_seed"]
    assert set(per_seed) == {"0", "2"}
    assert per_seed["0"]["Dice"] == pytest.approx((0.84 + 0.84 + 0.86) / 3)
    assert per_seed["2"]["Dice"] == pytest.approx((0.75 + 0.80 + 0.88) / 3)
    # the paired comparison runs over the (seed, case) pairs of both sessions: 6 pairs, MT better on 4, worse on 1
    paired = res["paired"][MT]["foreground"]["Dice"]
    assert (paired["wins"], paired["losses"], paired["ties"]) == (4, 1, 1)
    assert set(res["runs"]) == {f"{a}/seed_{s}" for a in (SUP, MT) for s in (0, 2)}
    settings = json.load(open(os.path.join(rec, "settings.json")))
    assert settings["seeds"] == [0, 2] and settings["trainers"] == [SUP, MT]
    assert settings["git_commits"] == ["abc1234", "def5678"]
    md = open(os.path.join(rec, "results.md")).read()
    assert "seeds [0, 2] (record)" in md and MT in md and "abc1234, def5678" in md
    # recording the same folder again changes nothing
    before = files_under(rec)
    ch = record_folder(s2, into)
    assert sorted(ch.unchanged) == [f"{MT}/seed_2", f"{SUP}/seed_2"] and not ch.added and not ch.replaced
    assert files_under(rec) == before


def test_refusals_leave_the_record_as_it_was(tmp_path):
    into = str(tmp_path / "records")
    rec = os.path.join(into, "b")
    record_folder(bench_folder(tmp_path / "a", "b", {(SUP, 0): [0.8, 0.8, 0.8]}), into)
    before = files_under(rec)
    # other key settings (the budget)
    other = bench_folder(tmp_path / "c", "b", {(SUP, 1): [0.8, 0.8, 0.8]}, epochs=40)
    with pytest.raises(RecordError, match="epochs: 80 in the record, 40 in the folder") as e:
        record_folder(other, into)
    assert os.path.join(other, "settings.json") in str(e.value) and "--name" in str(e.value)
    # a re-run of a recorded (arm, seed) with other results
    rerun = bench_folder(tmp_path / "d", "b", {(SUP, 0): [0.7, 0.8, 0.8]})
    with pytest.raises(RecordError, match="--replace") as e:
        record_folder(rerun, into)
    assert f"{SUP}/seed_0" in str(e.value)
    assert files_under(rec) == before
    assert sorted(os.listdir(into)) == ["b"]                      # no temporary folder left behind
    # not a benchmark folder, or one with nothing evaluated
    with pytest.raises(RecordError, match="settings.json does not exist"):
        record_folder(str(tmp_path / "nothing"), into)
    empty = tmp_path / "e" / "b"
    empty.mkdir(parents=True)
    (empty / "settings.json").write_text(json.dumps({"epochs": 80}))
    with pytest.raises(RecordError, match="no evaluated run"):
        record_folder(str(empty), into)
    assert files_under(rec) == before
    # --replace takes the re-run
    ch = record_folder(rerun, into, replace=True)
    assert ch.replaced == [f"{SUP}/seed_0"]
    assert json.load(open(os.path.join(rec, "results.json")))["seed_level"][SUP]["per_seed"]["0"]["Dice"] == \
        pytest.approx(2.3 / 3)


def test_cli_commit_rebuild_and_learning_curve_read_records(tmp_path):
    into = str(tmp_path / "records")
    folders = [bench_folder(tmp_path / "runs", f"curve_{e}x50_val", {(SUP, 0): [d, d, d]}, epochs=e, commit="unknown")
               for e, d in ((20, 0.70), (40, 0.80), (80, 0.805))]
    cli = os.path.join(REPO, "benchmarks", "record.py")
    p = subprocess.run([sys.executable, cli, *folders, "--into", into, "--commit", "a35622a"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("added:") == 3
    recs = [os.path.join(into, os.path.basename(f)) for f in folders]
    assert json.load(open(os.path.join(recs[0], "settings.json")))["git_commits"] == ["a35622a"]
    os.remove(os.path.join(recs[0], "results.md"))
    p = subprocess.run([sys.executable, cli, "--rebuild", recs[0]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"{SUP} seeds [0]" in p.stdout and os.path.isfile(os.path.join(recs[0], "results.md"))
    p = subprocess.run([sys.executable, cli, folders[0], folders[1], "--name", "x"], capture_output=True, text=True)
    assert p.returncode != 0 and "--name takes one folder" in p.stderr
    # the learning curve from the records alone: 1000 -> 2000 gains 10, 2000 -> 4000 gains 0.5 -> converged at 2000
    out = str(tmp_path / "curve")
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "learning_curve.py"), *recs, "-o", out],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "**2000 iterations**" in open(out + ".md").read()


def test_per_seed_comparison_and_target_verdict():
    """Per seed: the paired difference against the baseline's run of the same seed; the verdict needs 3 seeds, a mean
    gain of at least 1.5 points and no seed below -1 (the worst-seed rule alone can fail it)."""
    from nnunet_semi.benchmark.aggregate import aggregate
    from nnunet_semi.benchmark.report import per_seed_markdown

    def arm(gains):
        return {s: evaluation([0.80 + g / 100, 0.80 + g / 100, 0.80 + g / 100]) for s, g in gains.items()}
    summaries = {SUP: arm({0: 0, 1: 0, 2: 0}), "A": arm({0: 2, 1: 2, 2: 1}), "B": arm({0: 2, 1: 2, 2: -1.5}),
                 "C": arm({0: 3, 1: 3, 2: -1.2}), "D": arm({0: 3, 2: 3})}
    comp = aggregate(summaries, SUP)["per_seed_paired"]
    assert comp["A"]["per_seed"][2]["mean_diff"] == pytest.approx(0.01)
    assert (comp["A"]["per_seed"][0]["wins"], comp["A"]["per_seed"][0]["losses"]) == (3, 0)
    assert comp["A"]["mean_gain_points"] == pytest.approx(5 / 3) and comp["A"]["target"] == "met"
    assert comp["B"]["target"] == "missed"                                   # mean +0.83
    assert comp["C"]["mean_gain_points"] == pytest.approx(1.6) and comp["C"]["worst_seed_points"] == pytest.approx(-1.2)
    assert comp["C"]["target"] == "missed"                                   # mean above 1.5, one seed below -1
    assert comp["D"]["target"] == "open (2 of 3 seeds)" and set(comp["D"]["per_seed"]) == {0, 2}
    md = "\n".join(per_seed_markdown(aggregate(summaries, SUP)))
    assert "| A | 2 | 80.00 | 81.00 | +1.00 | 3/0 |" in md
    assert "| C | mean |  |  | +1.60 | worst seed -1.20 | target: missed |" in md


def test_commit_of_a_frozen_copy(tmp_path):
    """A benchmark run from a `git archive` copy records the archived commit (export-subst), not 'unknown'."""
    from nnunet_semi.benchmark.settings import git_commit
    (tmp_path / "nnunet_semi").mkdir()
    (tmp_path / "nnunet_semi" / "COMMIT").write_text("$Format:%H$\n")       # the file as committed: not substituted
    assert git_commit(str(tmp_path)) == "unknown"
    (tmp_path / "nnunet_semi" / "COMMIT").write_text("0123abcd\n")
    assert git_commit(str(tmp_path)) == "0123abcd"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:   # in a checkout: git substitutes the committed file when archiving
        out = subprocess.run("git archive HEAD nnunet_semi/COMMIT | tar -xO", shell=True, cwd=REPO,
                             capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == head.stdout.strip()


def test_pairs_trained_in_different_environments_are_named():
    from nnunet_semi.benchmark.report import environment_difference
    a = {"environments": [{"commit": "abc", "torch": "2.14.1", "cpu_model": "X"}]}
    assert environment_difference(a, a) == "same environment"
    b = {"environments": [{"commit": "abc", "torch": "2.15.0", "cpu_model": "Y"}]}
    assert environment_difference(a, b) == "differs: torch 2.14.1 / 2.15.0; cpu_model X / Y"
    resumed = {"environments": a["environments"] + b["environments"]}
    assert environment_difference(a, resumed) == "differs: resumed in another environment"
    assert environment_difference({}, a) == "not recorded"


def test_an_arm_of_its_own_folder_is_recorded_beside_the_others_under_a_new_name(tmp_path):
    """--rename: an arm trained in a folder of its own (e.g. Reciprocal Learning with its teacher from the same seed's
    supervised checkpoint) is recorded under a new name beside supervised, paired against it, with its provenance;
    its export arm (ARM@teacher) follows it; bad renames are refused before anything is written."""
    RL = "ReciprocalLearningTrainer"
    into = str(tmp_path / "records")
    record_folder(bench_folder(tmp_path / "a", "curve", {(SUP, 0): [0.80, 0.80, 0.80], (RL, 0): [0.79, 0.80, 0.80]}),
                  into)
    rec = os.path.join(into, "curve")
    before = files_under(rec)
    other = bench_folder(tmp_path / "b", "rlckpt", {(RL, 0): [0.82, 0.83, 0.80], (RL + "@teacher", 0): [0.81] * 3})
    with pytest.raises(RecordError, match="no evaluated arm Nope"):
        record_folder(other, into, name="curve", rename={"Nope": "X"})
    with pytest.raises(RecordError, match="arm name"):
        record_folder(other, into, name="curve", rename={RL: "a/b"})
    with pytest.raises(RecordError, match="renamed arms only"):
        record_folder(other, into, name="curve", note="teacher from a checkpoint")
    assert files_under(rec) == before
    cli = os.path.join(REPO, "benchmarks", "record.py")
    p = subprocess.run([sys.executable, cli, other, "--into", into, "--name", "curve", "--rename", f"{RL}={RL}-supTeacher",
                        "--note", "teacher from the supervised checkpoint"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"added:     {RL}-supTeacher/seed_0, {RL}-supTeacher@teacher/seed_0" in p.stdout
    assert files_under(rec) != before and os.path.isfile(os.path.join(rec, "seed_0", "eval", f"{RL}.json"))  # kept
    res = json.load(open(os.path.join(rec, "results.json")))
    assert res["per_seed_paired"][f"{RL}-supTeacher"]["per_seed"]["0"]["mean_diff"] == pytest.approx(0.05 / 3)
    assert res["runs"][f"{RL}-supTeacher/seed_0"]["trainer"] == f"{RL}-supTeacher"
    assert res["runs"][f"{RL}-supTeacher/seed_0"]["arm_in_folder"] == RL
    settings = json.load(open(os.path.join(rec, "settings.json")))
    assert settings["renamed_arms"][f"{RL}-supTeacher@teacher"] == {
        "arm": RL + "@teacher", "folder": "rlckpt", "note": "teacher from the supervised checkpoint"}
    md = open(os.path.join(rec, "results.md")).read()
    assert f"- `{RL}-supTeacher`: arm `{RL}` of the folder `rlckpt`; teacher from the supervised checkpoint" in md
    # a later session's seed of the same folder keeps the provenance of the first
    later = bench_folder(tmp_path / "c", "rlckpt", {(RL, 1): [0.8] * 3, (SUP, 1): [0.79] * 3})
    record_folder(later, into, name="curve", rename={RL: f"{RL}-supTeacher"}, note="teacher from the supervised checkpoint")
    settings = json.load(open(os.path.join(rec, "settings.json")))
    assert set(settings["renamed_arms"]) == {f"{RL}-supTeacher", f"{RL}-supTeacher@teacher"}
    assert settings["seeds"] == [0, 1]
