"""End to end (slow): the demo in --quick mode, and the benchmark harness (benchmarks/run_benchmark.py) on
the demo's tiny generated dataset: report, skip, resume and settings checks; and the trainers' progress
file over a training and its ``--c`` resume. Plus fast checks of the harness' parts (CPU configuration,
progress lines, aggregation, trainer discovery, the executor and its dry run on a simulated benchmark).

Both drive nnU-Net's real commands in subprocesses. To stay within a few minutes on 2 cores the harness
test works in the demo's folder: the demo itself runs the harness' training path (Benchmark.run_all:
nnUNetv2_train + nnUNetv2_predict for SupervisedBaselineTrainer and MeanTeacherTrainer), and the CLI is
then checked to report on those runs, to skip what is finished, to redo only what is missing, to plan a
``--c`` resume for an interrupted training, and to refuse changed settings.
"""
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest

from e2e_util import REPO

TRAINERS = ["SupervisedBaselineTrainer", "MeanTeacherTrainer"]
DATASET_ID = "991"


def _env():
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd, cwd, log, timeout=900):
    t0 = time.time()
    p = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    with open(log, "w") as f:
        f.write(p.stdout)
    print(f"$ {' '.join(cmd)}  [{time.time() - t0:.0f} s, rc {p.returncode}]")
    return p


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _table_rows(text):
    """Rows of the first results table (| Method | Class | Dice (%) | ...): (method, class, Dice mean)."""
    rows, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\| Method \| Class \| Dice \(%\) \|", line):
            inside = True
            continue
        if inside and not line.startswith("|"):
            break
        if inside and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            m = re.match(r"^(-?[\d.]+) ± ([\d.]+)$", cells[2])
            rows.append((cells[0], cells[1], float(m.group(1)) if m else float("nan")))
    return rows


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    out = os.path.join(root, "demo")
    t0 = time.time()
    p = _run([sys.executable, "-m", "nnunet_semi.demo", "--quick", "--out", out], root,
             os.path.join(root, "demo.log"))
    return {"root": root, "out": out, "proc": p, "seconds": time.time() - t0}


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_demo):
    p, out = quick_demo["proc"], quick_demo["out"]
    assert p.returncode == 0, p.stdout[-6000:]
    text = p.stdout
    # progress: stage lines with elapsed time, one line per training epoch
    assert re.search(r"^\[\d\d:\d\d\] == stage 1/5: data", text, re.M)
    assert re.search(r"^\[\d\d:\d\d\] == stage 5/5: picture", text, re.M)
    for t in TRAINERS:
        assert re.search(rf"{t} seed 0: epoch 1/1, train_loss", text), t
    # the printed table: a Mean row with a finite Dice for every method
    rows = _table_rows(text)
    means = {m: d for m, c, d in rows if c == "Mean"}
    assert sorted(means) == sorted(TRAINERS), rows
    assert all(math.isfinite(d) and 0 <= d <= 100 for d in means.values()), means
    assert {c for _, c, _ in rows} >= {"shell (1)", "core (2)", "Mean"}
    # the picture
    png = os.path.join(out, "demo_overview.png")
    w, h = _png_size(png)
    assert 400 <= w <= 5000 and 400 <= h <= 5000, (w, h)
    assert os.path.getsize(png) > 20_000
    for f in ("results.md", "results.json", "benchmark.png", "settings.json", "demo_timings.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    for t in TRAINERS:
        fold = os.path.join(out, "nnUNet_results", "Dataset991_SemiDemo", f"{t}__nnUNetPlans__3d_fullres", "fold_all")
        assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
        # nnU-Net's validation after training is skipped (nnUNet_semi_skip_final_validation), and says so
        assert not os.path.exists(os.path.join(fold, "validation"))
        logs = [open(os.path.join(fold, f)).read() for f in os.listdir(fold) if f.startswith("training_log")]
        assert any("validation after training is skipped" in x and "--val" in x for x in logs), t
        # the progress file: one line for the one epoch, then the skipped validation; the harness printed both
        from nnunet_semi.training.progress_file import read_progress
        records = read_progress(os.path.join(fold, "progress.jsonl"))
        assert [r.get("epoch", r.get("event")) for r in records] == [0, "final_validation_skipped"], records
        assert {"train_losses", "val_losses", "dice_per_class_or_region", "lrs", "epoch_time_s"} <= set(records[0])
        if t == "MeanTeacherTrainer":
            assert {"loss_sup", "loss_unsup", "unsup_weight_factor", "unlabeled_wait_s"} <= set(records[0])
        assert f"{t} seed 0: nnU-Net's validation after training skipped" in text, t
    print(f"quick demo: {quick_demo['seconds']:.0f} s")


def _bench_cmd(out, *extra):
    return [sys.executable, os.path.join(REPO, "benchmarks", "run_benchmark.py"), "-d", DATASET_ID,
            "--raw", os.path.join(out, "nnUNet_raw"), "--preprocessed", os.path.join(out, "nnUNet_preprocessed"),
            "-o", out, "--results-dir", os.path.join(out, "nnUNet_results"), "-tr", *TRAINERS, "-s", "0",
            "--epochs", "1", "--iters", "2", "--val-iters", "1", "--disable_tta", *extra]


@pytest.mark.slow
def test_benchmark_harness_report_skip_resume(quick_demo):
    assert quick_demo["proc"].returncode == 0, "the quick demo failed"
    out, root = quick_demo["out"], quick_demo["root"]
    model = {t: os.path.join(out, "nnUNet_results", "Dataset991_SemiDemo", f"{t}__nnUNetPlans__3d_fullres", "fold_all")
             for t in TRAINERS}
    preds = {t: os.path.join(out, "seed_0", "predictions", t) for t in TRAINERS}

    # 1. the same settings: every run is finished -> skipped; the report is written
    os.remove(os.path.join(out, "results.md"))
    p = _run(_bench_cmd(out), root, os.path.join(root, "bench1.log"))
    assert p.returncode == 0, p.stdout[-6000:]
    for t in TRAINERS:
        assert re.search(rf"{t} seed 0: skip \(checkpoint_final and predictions exist\)", p.stdout), t
    assert "nnUNetv2_train" not in p.stdout and "nnUNetv2_predict" not in p.stdout
    md = open(os.path.join(out, "results.md")).read()
    rows = _table_rows(md)
    assert sorted(m for m, c, _ in rows if c == "Mean") == sorted(TRAINERS)
    assert all(math.isfinite(d) for _, _, d in rows)
    assert "Paired comparison against SupervisedBaselineTrainer" in md
    assert re.search(r"\| MeanTeacherTrainer \| Mean \| 2 \| -?[\d.]+ ± [\d.]+ \|", md), md
    w, h = _png_size(os.path.join(out, "benchmark.png"))
    assert w > 600 and h > 400
    settings = json.load(open(os.path.join(out, "settings.json")))
    for key in ("dataset", "configuration", "effective_configuration", "fold", "trainers", "seeds", "epochs", "iters",
                "val_iters", "iterations_total", "budget_env", "checkpoint", "evaluated_cases", "git_commit", "machine",
                "plans_config", "plans_config_change", "nnunet_env", "protocol_notes"):
        assert key in settings, key
    assert settings["checkpoint"] == "checkpoint_final.pth" and settings["fold"] == "all"
    assert settings["iterations_total"] == 2 and settings["budget_env"]["nnUNet_semi_iters"] == "2"
    assert {"cpu_count", "torch", "device"} <= set(settings["machine"])
    assert settings["git_commit"] == "unknown" or re.match(r"^[0-9a-f]{40}", settings["git_commit"])

    # 1b. a call naming one trainer still reports every run recorded in the folder
    one = _bench_cmd(out, "--report-only")
    i = one.index("-tr")
    one[i + 1:i + 1 + len(TRAINERS)] = [TRAINERS[-1]]
    p = _run(one, root, os.path.join(root, "bench_one.log"))
    assert p.returncode == 0, p.stdout[-6000:]
    assert re.search(r"evaluate: trainers " + ", ".join(settings["trainers"]) + r"; seeds \[0\]", p.stdout), p.stdout
    assert sorted(m for m, c, _ in _table_rows(open(os.path.join(out, "results.md")).read()) if c == "Mean") \
        == sorted(TRAINERS)

    # 2. an interrupted training (only checkpoint_latest) is planned as a --c resume
    final = os.path.join(model["SupervisedBaselineTrainer"], "checkpoint_final.pth")
    latest = os.path.join(model["SupervisedBaselineTrainer"], "checkpoint_latest.pth")
    os.rename(final, latest)
    try:
        p = _run(_bench_cmd(out, "--dry-run"), root, os.path.join(root, "bench_dry.log"))
    finally:
        os.rename(latest, final)
    assert p.returncode == 0, p.stdout[-6000:]
    assert "SupervisedBaselineTrainer seed 0: resume" in p.stdout
    assert re.search(r"nnUNetv2_train 991 3d_fullres all -tr SupervisedBaselineTrainer .*--c$", p.stdout, re.M)
    assert "MeanTeacherTrainer seed 0: skip (checkpoint_final and predictions exist)" in p.stdout

    # 3. deleted predictions of one trainer: only those are redone
    shutil.rmtree(preds["MeanTeacherTrainer"])
    kept = {f: os.path.getmtime(os.path.join(preds["SupervisedBaselineTrainer"], f))
            for f in os.listdir(preds["SupervisedBaselineTrainer"])}
    ckpt_mtime = {t: os.path.getmtime(os.path.join(model[t], "checkpoint_final.pth")) for t in TRAINERS}
    t_before = time.time()
    p = _run(_bench_cmd(out), root, os.path.join(root, "bench2.log"))
    assert p.returncode == 0, p.stdout[-6000:]
    assert re.search(r"SupervisedBaselineTrainer seed 0: skip \(checkpoint_final", p.stdout)
    assert re.search(r"MeanTeacherTrainer seed 0: skip training \(checkpoint_final exists\); predict", p.stdout)
    assert "nnUNetv2_train" not in p.stdout
    assert len(re.findall(r"\$ .*nnUNetv2_predict", p.stdout)) == 1
    assert {f: os.path.getmtime(os.path.join(preds["SupervisedBaselineTrainer"], f)) for f in kept} == kept
    assert all(os.path.getmtime(os.path.join(model[t], "checkpoint_final.pth")) == ckpt_mtime[t] for t in TRAINERS)
    new = [os.path.join(preds["MeanTeacherTrainer"], f) for f in os.listdir(preds["MeanTeacherTrainer"])
           if f.endswith(".nii.gz")]
    assert len(new) == 2 and all(os.path.getmtime(f) >= t_before for f in new)
    assert not os.path.exists(preds["MeanTeacherTrainer"] + ".tmp")

    # 4. other key settings in the same folder are refused
    p = _run(_bench_cmd(out)[:-7] + ["--epochs", "1", "--iters", "3", "--val-iters", "1", "--disable_tta"], root,
             os.path.join(root, "bench3.log"))
    assert p.returncode == 1 and "other settings" in p.stdout and "iters" in p.stdout


# --------------------------------------------------------------------------------------------
# fast checks
# --------------------------------------------------------------------------------------------
def _plans():
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 4, "features_per_stage": [32, 64, 128, 256], "strides": [[1, 1, 1]] * 4},
            "_kw_requires_import": []}
    return {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans",
            "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 9,
                                              "patch_size": [40, 56, 40], "spacing": [1, 1, 1],
                                              "architecture": arch}}}


def test_cpu_configuration_inherits_and_is_idempotent(tmp_path):
    from nnunet_semi.benchmark import BenchmarkError, add_cpu_configuration
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_file = str(tmp_path / "nnUNetPlans.json")
    json.dump(_plans(), open(plans_file, "w"))
    change = add_cpu_configuration(plans_file, "3d_fullres")
    assert change["status"] == "added" and change["name"] == "3d_fullres_cpu"
    assert change["changes"]["architecture.arch_kwargs.features_per_stage"] == {"from": [32, 64, 128, 256],
                                                                              "to": [16, 32, 64, 128]}
    assert change["changes"]["batch_size"] == {"from": 9, "to": 2}
    plans = json.load(open(plans_file))
    entry = plans["configurations"]["3d_fullres_cpu"]
    assert entry["inherits_from"] == "3d_fullres" and set(entry) == {"inherits_from", "batch_size", "architecture"}
    cm = PlansManager(plans).get_configuration("3d_fullres_cpu")  # nnU-Net resolves it
    assert cm.data_identifier == "nnUNetPlans_3d_fullres" and list(cm.patch_size) == [40, 56, 40]
    assert cm.batch_size == 2 and list(cm.network_arch_init_kwargs["features_per_stage"]) == [16, 32, 64, 128]
    assert add_cpu_configuration(plans_file, "3d_fullres")["status"] == "already present"
    with pytest.raises(BenchmarkError, match="differs"):
        add_cpu_configuration(plans_file, "3d_fullres", features_scale=0.25)


def test_cpu_configuration_with_a_smaller_patch(tmp_path):
    from nnunet_semi.benchmark import BenchmarkError, add_cpu_configuration
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = _plans()
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [2, 2, 2], [2, 2, 1],
                                                                                      [2, 2, 1]]
    plans_file = str(tmp_path / "nnUNetPlans.json")
    json.dump(plans, open(plans_file, "w"))
    for bad, msg in (([20, 32, 40], "multiple of the network's total stride"), ([32, 32], "needs 3 values")):
        with pytest.raises(BenchmarkError, match=msg):
            add_cpu_configuration(plans_file, "3d_fullres", patch_size=bad)
    assert "3d_fullres_cpu" not in json.load(open(plans_file))["configurations"]   # nothing written on error
    change = add_cpu_configuration(plans_file, "3d_fullres", patch_size=[16, 24, 10])   # strides total 8, 8, 2
    assert change["changes"]["patch_size"] == {"from": [40, 56, 40], "to": [16, 24, 10]}
    cm = PlansManager(json.load(open(plans_file))).get_configuration("3d_fullres_cpu")
    assert list(cm.patch_size) == [16, 24, 10] and cm.data_identifier == "nnUNetPlans_3d_fullres"
    with pytest.raises(BenchmarkError, match="differs"):   # a resumed benchmark cannot silently change the patch
        add_cpu_configuration(plans_file, "3d_fullres")


def test_epoch_progress_reads_the_progress_file(tmp_path):
    """One line per epoch from the trainer's progress file, re-read as the training prints; epochs already in the
    file when the training started (a --c resume) are not repeated, those it rewrites afterwards are."""
    from nnunet_semi.benchmark import EpochProgress
    from nnunet_semi.training.progress_file import FINAL_VALIDATION_SKIPPED, ProgressFileWriter
    path = str(tmp_path / "progress.jsonl")
    writer = ProgressFileWriter(path)
    logging = {"train_losses": [-0.3, -0.4123], "val_losses": [-0.4, -0.5],
               "dice_per_class_or_region": [[0.5, 0.5], [0.8, 0.6]], "epoch_start_timestamps": [0.0, 10.0],
               "epoch_end_timestamps": [9.0, 19.51], "loss_sup": [-0.4, -0.5], "loss_unsup": [0.1, 0.0123],
               "pl_confidence": [0.9, 0.91]}
    writer.epoch(logging, 0)
    p = EpochProgress("MT seed 0", 5, path)
    assert p.feed("2026-01-01 10:00:00.000002: Epoch 1") == []           # epoch 0 was there before the start
    writer.epoch(logging, 1, unlabeled_wait_s=0.25)
    assert p.feed("2026-01-01 10:00:19.6: ") == [
        "    MT seed 0: epoch 2/5, train_loss -0.4123, loss_unsup 0.0123, pseudo Dice 0.700, 9.5 s/epoch"]
    assert p.feed("2026-01-01 10:00:19.7: Yayy! New best EMA pseudo Dice: 0.7") == []
    # the skipped validation is written after "Training done." is printed, but may be in the file before that
    # line reaches the harness: it still comes after it
    writer.event(FINAL_VALIDATION_SKIPPED)
    msgs = p.feed("2026-01-01 10:01:00.0: Training done.")
    assert len(msgs) == 2 and "training done" in msgs[0]
    assert msgs[1] == "    MT seed 0: nnU-Net's validation after training skipped (nnUNet_semi_skip_final_validation)"
    assert p.finish() == []
    # a resumed training cuts the file back to its first epoch and writes that epoch again: a new line
    logging["epoch_end_timestamps"][1] = 21.0
    writer.restart(logging, 1)
    writer.epoch(logging, 1)
    assert [m.split(", ")[0] for m in p.poll()] == ["    MT seed 0: epoch 2/5"]


def test_progress_file_restart_keeps_each_epoch_once(tmp_path):
    """restart() keeps the epochs before the first one of the new training, fills those it lacks from the
    checkpoint's logging, drops the rest and the events; a line cut by a crash is ignored; the curves read back
    equal those of the checkpoint's logging."""
    import torch

    from nnunet_semi.benchmark.aggregate import curves_from_checkpoint
    from nnunet_semi.training.progress_file import ProgressFileWriter, curves_from_progress, read_progress
    path = str(tmp_path / "progress.jsonl")
    logging = {"mean_fg_dice": [0.1, 0.2, 0.3], "dice_per_class_or_region": [[0.1, float("nan")], [0.2, 0.2],
                                                                               [0.3, 0.3]],
               "train_losses": [1.0, 0.9, 0.8], "epoch_start_timestamps": [0.0, 1.0, 2.0],
               "epoch_end_timestamps": [1.0, 2.0, 3.5], "loss_unsup": [float("nan"), 0.5, 0.4]}
    w = ProgressFileWriter(path)
    w.restart(logging, 0)
    w.epoch(logging, 0, unlabeled_wait_s=0.1)
    w.event("final_validation_skipped")
    with open(path, "a") as f:
        f.write('{"epoch": 1, "train_los')                     # a crash in the middle of a line
    assert [r.get("epoch", r.get("event")) for r in read_progress(path)] == [0, "final_validation_skipped"]
    w.restart(logging, 2)                                       # --c from a checkpoint of epochs 0 and 1
    records = read_progress(path)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["unlabeled_wait_s"] == 0.1 and "unlabeled_wait_s" not in records[1]   # 1: from the logging
    assert records[0]["loss_unsup"] is None and records[0]["dice_per_class_or_region"] == [0.1, None]
    w.epoch(logging, 2)
    assert [r["epoch"] for r in read_progress(path)] == [0, 1, 2]
    assert curves_from_progress(path, 4) is None
    curves = curves_from_progress(path, 3)
    torch.save({"logging": logging}, str(tmp_path / "ckpt.pth"))
    want = curves_from_checkpoint(str(tmp_path / "ckpt.pth"))
    assert list(curves) == list(want)
    assert json.dumps(curves) == json.dumps(want)              # NaN where NaN, the same floats


@pytest.mark.slow
def test_progress_file_over_a_training_and_its_resume(quick_demo):
    """A real training (the demo's dataset) writes one line per epoch. A run killed after writing a line its
    checkpoint does not hold (simulated: a stale epoch-2 line after a 2-epoch run) and then resumed with --c
    (here with a 3-epoch budget, from checkpoint_final of epoch 2) continues the file without a duplicated
    epoch, and the file's curves equal the final checkpoint's logging."""
    assert quick_demo["proc"].returncode == 0, "the quick demo failed"
    from nnunet_semi.benchmark.aggregate import curves_from_checkpoint
    from nnunet_semi.env import ensure_ext_trainer
    from nnunet_semi.training.progress_file import curves_from_progress, read_progress
    out, root = quick_demo["out"], quick_demo["root"]
    env = dict(_env(), nnUNet_raw=os.path.join(out, "nnUNet_raw"),
               nnUNet_preprocessed=os.path.join(out, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(root, "results_progress"), nnUNet_n_proc_DA="0", nnUNet_semi_iters="2",
               nnUNet_semi_val_iters="1", nnUNet_semi_save_every="1", nnUNet_semi_seed="0",
               nnUNet_semi_skip_final_validation="1", nnUNet_semi_warmup_iters="0",
               nnUNet_semi_warmup_pseudo_dice="none", nnUNet_semi_rampup_iters="0")
    ensure_ext_trainer(env)
    fold = os.path.join(env["nnUNet_results"], "Dataset991_SemiDemo", "MeanTeacherTrainer__nnUNetPlans__3d_fullres",
                        "fold_all")
    path = os.path.join(fold, "progress.jsonl")

    def train(epochs, *extra):
        p = subprocess.run(["nnUNetv2_train", DATASET_ID, "3d_fullres", "all", "-tr", "MeanTeacherTrainer", "-device",
                            "cpu", *extra], env=dict(env, nnUNet_semi_epochs=str(epochs)), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-6000:]

    def order(records):
        return [r.get("epoch", r.get("event")) for r in records]

    train(2)
    first = read_progress(path)
    assert order(first) == [0, 1, "final_validation_skipped"]
    assert all({"train_losses", "val_losses", "lrs", "mean_fg_dice", "dice_per_class_or_region", "loss_unsup",
                "grad_norm", "unlabeled_wait_s", "epoch_time_s"} <= set(r) for r in first[:2])
    assert first[1]["epoch_start_timestamps"] >= first[0]["epoch_end_timestamps"]
    with open(path, "a") as f:                                  # what a killed run may leave behind
        f.write(json.dumps(dict(first[1], epoch=2, stale=True)) + "\n")
    train(3, "--c")
    second = read_progress(path)
    assert order(second) == [0, 1, 2, "final_validation_skipped"]
    assert second[:2] == first[:2]                              # the epochs before the resume, as they were
    assert "stale" not in second[2] and second[2]["epoch_start_timestamps"] > first[2]["time"]
    curves = curves_from_progress(path, 3)
    want = curves_from_checkpoint(os.path.join(fold, "checkpoint_final.pth"))
    assert json.dumps(curves) == json.dumps(want)


def test_aggregate_pairs_seeds_and_cases():
    from nnunet_semi.benchmark import aggregate, results_markdown
    from nnunet_semi.evaluation.evaluate import summarize

    def summary(dice):
        per_case = []
        for i, d in enumerate(dice):
            m = {k: float("nan") for k in ("Dice", "Jaccard", "HD95_mm", "HD95_vox", "ASD_mm", "ASD_vox",
                                           "ASSD_mm", "ASSD_vox")}
            m.update(Dice=d, Jaccard=d / (2 - d), HD95_mm=1.0, HD95_vox=1.0, ASD_mm=0.5, ASD_vox=0.5,
                     TP=1, FP=0, FN=0, TN=0, n_pred=1, n_ref=1)
            per_case.append({"case": f"c{i}", "metrics": {"1": m}})
        out = {"metric_per_case": per_case, **summarize(per_case, ["1"])}
        out["settings"] = {"labels": ["1"]}
        out["label_names"] = {"1": "organ"}
        return out

    summ = {"SupervisedBaselineTrainer": {0: summary([0.5, 0.6, 0.7]), 1: summary([0.5, 0.6, 0.9])},
            "MeanTeacherTrainer": {0: summary([0.6, 0.6, 0.8]), 1: summary([0.4, 0.7, 0.9])}}
    agg = aggregate(summ, "SupervisedBaselineTrainer")
    st = agg["stats"]["MeanTeacherTrainer"]["foreground"]["Dice"]
    assert st["n"] == 6 and abs(st["mean"] - 4.0 / 6) < 1e-9
    pd = agg["paired"]["MeanTeacherTrainer"]["foreground"]["Dice"]
    assert pd["n"] == 6 and (pd["wins"], pd["ties"], pd["losses"]) == (3, 2, 1)
    assert abs(pd["mean_diff"] - 0.2 / 6) < 1e-9
    assert abs(agg["seed_level"]["MeanTeacherTrainer"]["per_seed"][0]["Dice"] - 2.0 / 3) < 1e-9
    md = results_markdown(agg, "toy")
    assert "| MeanTeacherTrainer | Mean | 66.67 ± " in md and "| 3/2/1 |" in md

    # the Runs table shows when each run's pseudo Dice first reached 0.5 (1-based epoch) and its last value
    from nnunet_semi.benchmark import curve_milestones
    assert curve_milestones({"mean_fg_dice": [0.0, 0.1, 0.49, 0.5, 0.3, 0.8]}) == \
        {"pseudo_dice_first_epoch": 4, "pseudo_dice_last": 0.8}
    assert curve_milestones({"mean_fg_dice": [0.0, float("nan"), 0.2]}) == \
        {"pseudo_dice_first_epoch": None, "pseudo_dice_last": 0.2}
    agg["runs"] = {"MeanTeacherTrainer/seed_1": {"trainer": "MeanTeacherTrainer", "seed": 1, "train_s": 65.0,
                                                 **curve_milestones({"mean_fg_dice": [0.2, 0.6, 0.75]})},
                   "SupervisedBaselineTrainer/seed_0": {"trainer": "SupervisedBaselineTrainer", "seed": 0,
                                                        **curve_milestones({"mean_fg_dice": [0.1, 0.2]})}}
    md = results_markdown(agg, "toy")
    assert "| MeanTeacherTrainer | 1 | 1 min 05 s | – | no | 2 | 0.750 |" in md, md
    assert "| SupervisedBaselineTrainer | 0 | – | – | no | – | 0.200 |" in md, md


def test_default_trainers_are_declared_by_the_trainers():
    """The default list is [SupervisedBaselineTrainer] + every registered trainer whose own class body says
    benchmark_default = True; a subclass does not inherit it, whatever its name."""
    from nnunet_semi.benchmark import default_trainers, is_benchmark_default, registered_trainers
    from nnunet_semi.methods.mean_teacher import MeanTeacherTrainer
    from nnunet_semi.training.base import SemiSupervisedTrainer
    reg = registered_trainers()
    assert default_trainers(reg) == ["SupervisedBaselineTrainer", "CrossMatchTrainer", "MeanTeacherTrainer",
                                     "ReciprocalLearningTrainer", "AggregatingDecouplingTrainer"]
    assert not is_benchmark_default(SemiSupervisedTrainer)
    assert not any(is_benchmark_default(c) for n, c in reg.items() if "_" in n)   # the registered variants

    class MeanTeacherTrainerW1(MeanTeacherTrainer):          # no '_', still a variant: not a default
        unsup_weight = 0.5

    class MeanTeacherTrainer_mine(MeanTeacherTrainer):       # declares itself: a default despite the '_'
        benchmark_default = True

    assert MeanTeacherTrainerW1.benchmark_default and not is_benchmark_default(MeanTeacherTrainerW1)
    assert is_benchmark_default(MeanTeacherTrainer_mine)
    fake = dict(reg, MeanTeacherTrainerW1=MeanTeacherTrainerW1, MeanTeacherTrainer_mine=MeanTeacherTrainer_mine)
    assert default_trainers(fake) == default_trainers(reg) + ["MeanTeacherTrainer_mine"]
    # --list-trainers marks them
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run_benchmark.py"), "--list-trainers"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stdout
    marked = {line.split()[0] for line in p.stdout.splitlines() if line.rstrip().endswith("default")}
    assert marked == set(default_trainers(reg)), p.stdout


# --------------------------------------------------------------------------------------------
# the executor: a dry run gives the commands a real run runs
# --------------------------------------------------------------------------------------------
def _fake_benchmark_data(root):
    """A raw dataset (2 held-out cases with references) and a preprocessed folder that looks planned and
    preprocessed for 3d_fullres (plans and a data folder; no unlabeled data yet)."""
    from nnunet_semi.synthetic import make_synthetic_dataset
    raw, pre = os.path.join(root, "raw"), os.path.join(root, "pre")
    make_synthetic_dataset(raw, 991, "Fake", n_labeled=2, n_unlabeled=1, n_test=2, shape=(12, 12, 12), seed=0)
    data = os.path.join(pre, "Dataset991_Fake", "nnUNetPlans_3d_fullres")
    os.makedirs(data)
    open(os.path.join(data, "case_000.pkl"), "w").close()
    json.dump({"configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"}}},
              open(os.path.join(pre, "Dataset991_Fake", "nnUNetPlans.json"), "w"))
    return raw, pre


def _simulated_executor(epochs):
    """The real executor (the harness' own changes to files are made) with nnU-Net's commands simulated: a
    training writes checkpoint_final.pth and its progress file, a prediction copies the references."""
    from nnunet_semi.benchmark import Executor
    from nnunet_semi.training.progress_file import ProgressFileWriter

    class Simulated(Executor):
        bench = None

        def run(self, cmd, env, log_file, progress=None, echo=None, creates=None):
            cmd = [str(c) for c in cmd]
            self.commands.append(cmd)
            b = self.bench
            if cmd[0] == "nnUNetv2_train":
                fold = b.model_dir(cmd[cmd.index("-tr") + 1], int(env["nnUNet_semi_seed"]))
                os.makedirs(fold, exist_ok=True)
                logging = {"train_losses": [1.0 - 0.1 * e for e in range(epochs)],
                           "mean_fg_dice": [0.3 * e for e in range(epochs)],
                           "epoch_start_timestamps": [float(e) for e in range(epochs)],
                           "epoch_end_timestamps": [e + 0.5 for e in range(epochs)]}
                w = ProgressFileWriter(os.path.join(fold, "progress.jsonl"))
                w.restart(logging, 0)
                for e in range(epochs):
                    w.epoch(logging, e)
                open(os.path.join(fold, "checkpoint_final.pth"), "w").close()
                if os.path.isfile(os.path.join(fold, "checkpoint_latest.pth")):
                    os.remove(os.path.join(fold, "checkpoint_latest.pth"))
            elif cmd[0] == "nnUNetv2_predict":
                out = cmd[cmd.index("-o") + 1]
                os.makedirs(out, exist_ok=True)
                for c in b.cases:
                    shutil.copy(os.path.join(b.raw_folder, "labelsTs", c + b.file_ending), out)
            return 1.0

    return Simulated()


def test_dry_run_executor_records_the_commands_a_real_run_runs(tmp_path, capsys):
    from nnunet_semi.benchmark import Benchmark, BenchmarkSettings, DryRunExecutor
    raw, pre = _fake_benchmark_data(str(tmp_path))
    out = str(tmp_path / "bench")

    def settings():
        return BenchmarkSettings(dataset="991", out=out, trainers=TRAINERS, seeds=[0, 1], epochs=2, iters=1,
                                 raw=raw, preprocessed=pre)

    def both():
        dry = DryRunExecutor()
        assert Benchmark(settings(), executor=dry).run() is None
        real = _simulated_executor(epochs=2)
        real.bench = Benchmark(settings(), executor=real)
        return dry, real, real.bench.run()

    def steps(commands):
        return [(c[0], c[c.index("-tr") + 1] if "-tr" in c else None, "--c" in c) for c in commands]

    # a fresh benchmark: the dry run changes nothing, the real run then runs exactly the same commands
    dry = DryRunExecutor()
    Benchmark(settings(), executor=dry).run()
    assert not os.path.exists(out)
    printed = capsys.readouterr().out
    dry, real, agg = both()
    assert dry.commands == real.commands
    assert steps(real.commands) == [("nnUNetv2_preprocess_unlabeled", None, False)] + [
        (cmd, t, False) for seed in (0, 1) for t in TRAINERS for cmd in ("nnUNetv2_train", "nnUNetv2_predict")]
    for cmd in dry.commands:
        assert " ".join(cmd) in printed.replace("'", "")
    assert all(agg["stats"][t]["foreground"]["Dice"]["mean"] == 1.0 for t in TRAINERS)
    assert os.path.isfile(os.path.join(out, "results.md")) and os.path.isfile(os.path.join(out, "benchmark.png"))
    # the report's curves come from the progress files
    assert agg["curves"]["MeanTeacherTrainer"][1]["train_losses"] == [1.0, 0.9]
    assert agg["runs"]["MeanTeacherTrainer/seed_1"]["pseudo_dice_first_epoch"] is None

    # resumed: an interrupted training (checkpoint_latest only) and a run without predictions
    bench = real.bench
    sup0 = bench.model_dir("SupervisedBaselineTrainer", 0)
    os.rename(os.path.join(sup0, "checkpoint_final.pth"), os.path.join(sup0, "checkpoint_latest.pth"))
    shutil.rmtree(bench.pred_dir("MeanTeacherTrainer", 1))
    capsys.readouterr()
    dry, real, agg = both()
    printed = capsys.readouterr().out
    assert dry.commands == real.commands
    assert steps(real.commands) == [("nnUNetv2_preprocess_unlabeled", None, False),
                                    ("nnUNetv2_train", "SupervisedBaselineTrainer", True),
                                    ("nnUNetv2_predict", "SupervisedBaselineTrainer", False),
                                    ("nnUNetv2_predict", "MeanTeacherTrainer", False)]
    assert "(1/4) SupervisedBaselineTrainer seed 0: resume training from checkpoint_latest (--c)" in printed
    assert "(4/4) MeanTeacherTrainer seed 1: skip training (checkpoint_final exists); predict" in printed
    runs = json.load(open(os.path.join(out, "runs.json")))
    assert runs["SupervisedBaselineTrainer/seed_0"]["resumed"] is True
    assert runs["SupervisedBaselineTrainer/seed_0"]["train_s"] == 2.0    # accumulated over the two trainings
    from nnunet_semi.benchmark.settings import ENVIRONMENT_KEYS
    envs = runs["SupervisedBaselineTrainer/seed_0"]["environments"]      # resumed in the same environment: one
    import torch
    assert len(envs) == 1 and set(ENVIRONMENT_KEYS) <= set(envs[0]) and envs[0]["torch"] == torch.__version__
    assert "| same environment |" in open(os.path.join(out, "results.md")).read()
    assert sorted(agg["methods"]) == sorted(TRAINERS)
