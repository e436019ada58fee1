"""End to end through nnU-Net's own commands: plan/preprocess, unlabeled preprocessing, nnUNetv2_train
(2d and 3d_fullres, -device cpu), nnUNetv2_predict, --c and --val, with an audit that no withheld label
is ever read (the finaliser of the 'prepared' fixture in conftest.py, and its positive control here)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_ID, audit_log, predict, train, withheld_reads
from e2e_util import atime_changed, run

pytestmark = pytest.mark.slow


# the default warm-up (250 iterations and a pseudo-Dice gate) is far longer than these runs: open it at once
SHORT_SCHEDULE = {"nnUNet_semi_warmup_iters": "0", "nnUNet_semi_warmup_pseudo_dice": "none",
                  "nnUNet_semi_rampup_iters": "6"}


@pytest.fixture(scope="session")
def mt3d(prepared):
    # with nnU-Net's validation after training (the e2e environment skips it elsewhere): checked below
    return train(prepared, "MeanTeacherTrainer", "3d_fullres", nnUNet_semi_skip_final_validation="0",
                 **SHORT_SCHEDULE)


def _predictions_ok(out_dir, prepared):
    cases = sorted(f for f in os.listdir(os.path.join(prepared.raw, "imagesTs")))
    preds = sorted(f for f in os.listdir(out_dir) if f.endswith(".nii.gz"))
    assert preds == [c.replace("_0000", "") for c in cases]
    for p in preds:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out_dir, p)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(prepared.raw, "labelsTs", p)))
        assert seg.shape == ref.shape
        assert set(np.unique(seg)) <= {0, 1, 2}


def test_meanteacher_3d_trains_with_unlabeled_data(mt3d, prepared):
    ckpt = torch.load(os.path.join(mt3d, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "MeanTeacherTrainer"
    assert ckpt["current_epoch"] == 2
    state = ckpt["nnunet_semi"]
    assert set(state["aux"]["teacher"]["weights"]) == set(ckpt["network_weights"])
    assert state["hparams"]["ema_decay"] == 0.99
    # the teacher is an average, not a copy, of the student
    k = next(k for k in ckpt["network_weights"] if k.endswith("weight"))
    assert not torch.equal(state["aux"]["teacher"]["weights"][k], ckpt["network_weights"][k])
    logging = ckpt["logging"]
    for key in ("loss_sup", "loss_unsup", "pl_confidence", "mask_ratio", "unsup_weight_factor", "grad_norm",
                "clip_ratio"):
        assert len(logging[key]) == 2 and all(np.isfinite(logging[key])), key
    assert 0 < logging["pl_confidence"][-1] <= 1
    assert all(g > 0 for g in logging["grad_norm"]) and all(0 <= c <= 1 for c in logging["clip_ratio"])
    # the ramp-up grows from the step the (immediately opened) gate opened
    assert state["unsup_gate_step"] == 0
    assert logging["unsup_weight_factor"][0] < logging["unsup_weight_factor"][1]
    assert os.path.isfile(os.path.join(mt3d, "progress.png"))
    from PIL import Image
    assert Image.open(os.path.join(mt3d, "progress.png")).height > 5400  # nnU-Net's 3 panels + the SSL panel
    log = open(next(os.path.join(mt3d, f) for f in os.listdir(mt3d) if f.startswith("training_log"))).read()
    assert "6 unlabeled cases" in log and "unlabeled data wait" in log
    assert os.path.isfile(os.path.join(mt3d, "validation", "summary.json"))


def test_meanteacher_3d_predict(mt3d, prepared):
    _predictions_ok(predict(prepared, "MeanTeacherTrainer", "3d_fullres"), prepared)


def test_meanteacher_3d_resume_restores_teacher_and_epoch(mt3d, prepared):
    final = os.path.join(mt3d, "checkpoint_final.pth")
    saved = torch.load(final, map_location="cpu", weights_only=False)
    # a fresh trainer that loads the checkpoint gets the saved teacher back (not a copy of the student)
    script = f"""
import json, torch, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
from nnunet_semi.methods.mean_teacher import MeanTeacherTrainer
pre = {prepared.pre!r}
plans = json.load(open(pre + '/nnUNetPlans.json')); plans['continue_training'] = True
t = MeanTeacherTrainer(plans, '3d_fullres', 0, json.load(open(pre + '/dataset.json')), torch.device('cpu'))
t.load_checkpoint({final!r})
ck = torch.load({final!r}, map_location='cpu', weights_only=False)
same_teacher = all(torch.equal(v, ck["nnunet_semi"]["aux"]["teacher"]["weights"][k]) for k, v in t.teacher.state_dict().items())
differs_from_student = any(not torch.equal(v, t.network.state_dict()[k]) for k, v in t.teacher.state_dict().items())
print('RESULT', json.dumps(dict(epoch=t.current_epoch, same_teacher=same_teacher, differs=differs_from_student)))
"""
    p = run([sys.executable, "-c", script], prepared.env)
    res = json.loads(p.stdout.split("RESULT", 1)[1])
    assert res == {"epoch": 2, "same_teacher": True, "differs": True}

    folder = train(prepared, "MeanTeacherTrainer", "3d_fullres", epochs=3, extra=("--c",), **SHORT_SCHEDULE)
    log = open(os.path.join(prepared.root, "train_MeanTeacherTrainer_3d_fullres--c.log")).read()
    assert "Epoch 2" in log and "Epoch 0\n" not in log and "Epoch 1\n" not in log
    resumed = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 3
    assert len(resumed["logging"]["loss_unsup"]) == 3
    # the teacher continued from the saved one: one more epoch of EMA moved it only a little
    k = next(k for k in saved["nnunet_semi"]["aux"]["teacher"]["weights"] if k.endswith("weight"))
    t0, t1 = saved["nnunet_semi"]["aux"]["teacher"]["weights"][k], resumed["nnunet_semi"]["aux"]["teacher"]["weights"][k]
    assert not torch.equal(t0, t1)

    # --val re-runs the final validation from checkpoint_final
    os.remove(os.path.join(folder, "validation", "summary.json"))
    train(prepared, "MeanTeacherTrainer", "3d_fullres", epochs=3, extra=("--val",))
    assert os.path.isfile(os.path.join(folder, "validation", "summary.json"))


def test_meanteacher_2d_train_and_predict(prepared):
    folder = train(prepared, "MeanTeacherTrainer_exportTeacher", "2d", iters=4)
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    # the teacher is exported: network_weights hold it, the student is kept apart for --c
    state = ckpt["nnunet_semi"]
    k = next(iter(ckpt["network_weights"]))
    assert torch.equal(ckpt["network_weights"][k], state["aux"]["teacher"]["weights"][k])
    assert "student_weights" in state
    _predictions_ok(predict(prepared, "MeanTeacherTrainer_exportTeacher", "2d"), prepared)


# with 2 iterations per epoch: epoch 0 is the supervised warm-up, the gate opens at the first step of epoch 1
GATE_AT_EPOCH_1 = {"nnUNet_semi_warmup_iters": "2", "nnUNet_semi_warmup_pseudo_dice": "none"}


def _crossmatch_checks(folder, epochs):
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "CrossMatchTrainer" and ckpt["current_epoch"] == epochs
    log = ckpt["logging"]
    assert ckpt["nnunet_semi"]["unsup_gate_step"] == 2
    assert log["unsup_weight_factor"][0] == 0.0 and all(f > 0 for f in log["unsup_weight_factor"][1:])
    assert len(log["loss_sup"]) == epochs and np.all(np.isfinite(log["loss_sup"]))
    # the warm-up epoch drew no unlabeled batch (no unsupervised term computed, NaN in the log); every epoch
    # after the gate computed them all
    for key in ("loss_s1", "loss_s2", "loss_tkd", "loss_dkd", "pl_confidence", "mask_ratio", "tau"):
        assert len(log[key]) == epochs and np.isnan(log[key][0]) and np.all(np.isfinite(log[key][1:])), key
    assert log["tau"][-1] == 0.95
    return ckpt


def test_crossmatch_3d_train_and_predict(prepared):
    folder = train(prepared, "CrossMatchTrainer", "3d_fullres", iters=2, **GATE_AT_EPOCH_1)
    _crossmatch_checks(folder, 2)
    _predictions_ok(predict(prepared, "CrossMatchTrainer", "3d_fullres"), prepared)
    # the all-background diagnostic of benchmarks/ reads the checkpoint and both preprocessed groups
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "foreground_probabilities.py")
    p = subprocess.run([sys.executable, script, os.path.join(folder, "checkpoint_final.pth"), "-n", "3"],
                       env=prepared.env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for group in ("labeled", "unlabeled"):
        line = next(x for x in p.stdout.splitlines() if x.startswith(group + ":"))
        s1, s2 = (float(v) for v in line.split("S per foreground class (sum of p^2 over those voxels): ")[1].split(", "))
        assert "3 crops" in line and s1 >= 0 and s2 >= 0, line


def test_crossmatch_2d_train_resume_and_predict(prepared):
    folder = train(prepared, "CrossMatchTrainer", "2d", iters=2, **GATE_AT_EPOCH_1)
    _crossmatch_checks(folder, 2)
    train(prepared, "CrossMatchTrainer", "2d", epochs=3, iters=2, extra=("--c",), **GATE_AT_EPOCH_1)
    _crossmatch_checks(folder, 3)
    log = open(os.path.join(prepared.root, "train_CrossMatchTrainer_2d--c.log")).read()
    assert "Epoch 2" in log and "Epoch 0\n" not in log
    _predictions_ok(predict(prepared, "CrossMatchTrainer", "2d"), prepared)


def test_crossmatch_with_residual_encoder_plans(prepared):
    """nnU-Net's ResEnc plans (ResidualEncoderUNet): same preprocessed data, CrossMatch trains and stock
    nnUNetv2_predict loads the weights."""
    run(["nnUNetv2_plan_experiment", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerResEncM"], prepared.env)
    plans = json.load(open(os.path.join(prepared.pre, "nnUNetResEncUNetMPlans.json")))
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    p = run(["nnUNetv2_preprocess_unlabeled", "-d", str(DATASET_ID), "-plans_name", "nnUNetResEncUNetMPlans",
             "-c", "3d_fullres", "-np", "1"], prepared.env)
    assert "6 already preprocessed, writing 0" in p.stdout  # the plans' data identifier and preprocessing are shared
    env = dict(prepared.env, nnUNet_semi_epochs="1", nnUNet_semi_iters="2", nnUNet_semi_val_iters="1", **SHORT_SCHEDULE)
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "CrossMatchTrainer", "-p",
         "nnUNetResEncUNetMPlans", "-device", "cpu"], env)
    folder = os.path.join(prepared.res, "CrossMatchTrainer__nnUNetResEncUNetMPlans__3d_fullres", "fold_0")
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert any(k.startswith("encoder.stem") for k in ckpt["network_weights"])
    out = os.path.join(prepared.root, "pred_crossmatch_resenc")
    run(["nnUNetv2_predict", "-i", os.path.join(prepared.raw, "imagesTs"), "-o", out, "-d", str(DATASET_ID),
         "-c", "3d_fullres", "-p", "nnUNetResEncUNetMPlans", "-f", "0", "-tr", "CrossMatchTrainer", "-device", "cpu",
         "--disable_tta", "-npp", "1", "-nps", "1"], prepared.env)
    _predictions_ok(out, prepared)


# ----------------------------------------------------------------------------------------------
# Reciprocal Learning: two trainable networks, two optimizers
# ----------------------------------------------------------------------------------------------
def _rl_checks(folder, trainer, epochs):
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == epochs
    teacher = ckpt["nnunet_semi"]["aux"]["teacher"]
    assert set(teacher["weights"]) == set(ckpt["network_weights"]) and teacher["optimizer"]["state"]
    for key in ("loss_student_pl", "loss_student_feedback", "loss_teacher_pl", "loss_teacher_sup", "feedback_h",
                "grad_norm", "grad_norm_teacher"):
        assert len(ckpt["logging"][key]) == epochs and np.isfinite(ckpt["logging"][key][-1]), key
    return ckpt


@pytest.mark.parametrize("config", ["2d", "3d_fullres"])
def test_reciprocal_learning_train_resume_and_predict(prepared, config):
    # ReciprocalLearningTrainer_warmup (no supervised run needed), 2 epochs x 3 iterations; the in-run teacher
    # warm-up takes the first 20% (1 iteration)
    rl = "ReciprocalLearningTrainer_warmup"
    folder = train(prepared, rl, config)
    first = _rl_checks(folder, rl, 2)
    assert first["nnunet_semi"]["teacher_pretrained"] is False
    train(prepared, rl, config, epochs=3, extra=("--c",))
    resumed = _rl_checks(folder, rl, 3)
    log = open(os.path.join(prepared.root, f"train_{rl}_{config}--c.log")).read()
    assert "Epoch 2" in log and "Epoch 0\n" not in log
    # the teacher continued from its saved state (its optimizer's momentum too)
    k = next(k for k in first["nnunet_semi"]["aux"]["teacher"]["weights"] if k.endswith("weight"))
    assert not torch.equal(first["nnunet_semi"]["aux"]["teacher"]["weights"][k],
                           resumed["nnunet_semi"]["aux"]["teacher"]["weights"][k])
    _predictions_ok(predict(prepared, rl, config), prepared)


@pytest.fixture(scope="session")
def sup2d(prepared):
    """SupervisedBaselineTrainer 2d, fold 0, 1 epoch x 2 iterations: the supervised run that Reciprocal Learning's
    default teacher starts from."""
    return train(prepared, "SupervisedBaselineTrainer", "2d", epochs=1, iters=2)


def test_reciprocal_learning_survives_sigkill_and_resumes(prepared, sup2d):
    """SIGKILL in the middle of training, then --c: it finishes, and the restored teacher is the saved one,
    not a copy of the student, a fresh network or the supervised run it started from."""
    import signal
    trainer, epochs = "ReciprocalLearningTrainer_exportTeacher", 8
    env = dict(prepared.env, nnUNet_semi_epochs=str(epochs), nnUNet_semi_iters="3", nnUNet_semi_val_iters="1",
               nnUNet_semi_save_every="1")
    folder = os.path.join(prepared.res, f"{trainer}__nnUNetPlans__2d", "fold_0")
    latest = os.path.join(folder, "checkpoint_latest.pth")
    cmd = ["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(latest):
                try:
                    if torch.load(latest, map_location="cpu", weights_only=False)["current_epoch"] >= 2:
                        break
                except Exception:   # being written: the atomic rename has not happened yet
                    pass
            time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    killed_at = saved["current_epoch"]
    assert 2 <= killed_at < epochs
    script = f"""
import json, torch, sys
from nnunet_semi.methods.reciprocal_learning import ReciprocalLearningTrainer_exportTeacher as T
pre = {prepared.pre!r}
plans = json.load(open(pre + '/nnUNetPlans.json')); plans['continue_training'] = True
t = T(plans, '2d', 0, json.load(open(pre + '/dataset.json')), torch.device('cpu'))
t.initialize()
t.load_checkpoint({latest!r})
ck = torch.load({latest!r}, map_location='cpu', weights_only=False)
tw = ck['nnunet_semi']['aux']['teacher']['weights']
same = all(torch.equal(v, tw[k]) for k, v in t.aux['teacher'].module.state_dict().items())
student = all(torch.equal(v, ck['nnunet_semi']['student_weights'][k]) for k, v in t.network.state_dict().items())
differs = any(not torch.equal(v, t.network.state_dict()[k]) for k, v in tw.items())
sup = torch.load({os.path.join(sup2d, "checkpoint_final.pth")!r}, map_location='cpu', weights_only=False)
trained = any(not torch.equal(v, sup['network_weights'][k]) for k, v in t.aux['teacher'].module.state_dict().items())
opt = t.aux['teacher'].optimizer.state_dict()['state']
print('RESULT', json.dumps(dict(epoch=t.current_epoch, same=same, student=student, differs=differs, trained=trained,
                                momentum=len(opt) > 0, pretrained=ck['nnunet_semi']['teacher_pretrained'])))
"""
    p = run([sys.executable, "-c", script], env)
    assert json.loads(p.stdout.split("RESULT", 1)[1]) == {"epoch": killed_at, "same": True, "student": True,
                                                         "differs": True, "trained": True, "momentum": True,
                                                         "pretrained": True}
    # only a new training needs the supervised run: --c resumes with it moved away
    sup_ckpt = os.path.join(sup2d, "checkpoint_final.pth")
    os.rename(sup_ckpt, sup_ckpt + ".away")
    try:
        run(cmd + ["--c"], env, log=os.path.join(prepared.root, "train_rl_sigkill_resume.log"))
    finally:
        os.rename(sup_ckpt + ".away", sup_ckpt)
    final = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["current_epoch"] == epochs
    log = open(os.path.join(prepared.root, "train_rl_sigkill_resume.log")).read()
    assert f"Epoch {killed_at}\n" in log and "Epoch 0\n" not in log
    assert "a new training is refused" in log and final["nnunet_semi"]["teacher_checkpoint"] == sup_ckpt
    # the exported network is the teacher
    k = next(iter(final["network_weights"]))
    assert torch.equal(final["network_weights"][k], final["nnunet_semi"]["aux"]["teacher"]["weights"][k])


def test_reciprocal_learning_teacher_from_a_supervised_checkpoint(prepared, mt3d, sup2d):
    sup = sup2d
    ckpt = os.path.join(sup, "checkpoint_final.pth")
    folder = train(prepared, "ReciprocalLearningTrainer_released", "2d", epochs=1, iters=2,
                   nnUNet_semi_teacher_checkpoint=ckpt)
    log = open(os.path.join(prepared.root, "train_ReciprocalLearningTrainer_released_2d.log")).read()
    assert f"teacher from {ckpt}" in log
    state = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert state["nnunet_semi"]["teacher_pretrained"] is True
    assert "feedback_h" in state["logging"]          # no warm-up phase: the reciprocal step from the start
    # the default ReciprocalLearningTrainer finds that supervised run itself (same dataset, plans, configuration,
    # fold) ...
    fs = "ReciprocalLearningTrainer"
    folder = train(prepared, fs, "2d", epochs=1, iters=2, nnUNet_semi_teacher_checkpoint="")
    assert f"teacher from {ckpt}" in open(os.path.join(prepared.root, f"train_{fs}_2d.log")).read()
    state = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert state["nnunet_semi"]["teacher_checkpoint"] == ckpt and "feedback_h" in state["logging"]
    # ... and refuses a fold that has none, naming where it looked
    e = dict(prepared.env, nnUNet_semi_epochs="1", nnUNet_semi_iters="2", nnUNet_semi_teacher_checkpoint="")
    p = run(["nnUNetv2_train", str(DATASET_ID), "2d", "1", "-tr", fs, "-device", "cpu"], e, check=False)
    assert p.returncode != 0
    assert os.path.join(os.path.dirname(sup), "fold_1", "checkpoint_final.pth") in p.stdout
    # a checkpoint of another configuration (3d_fullres) is refused, naming it and the fix
    wrong = os.path.join(mt3d, "checkpoint_final.pth")
    e = dict(prepared.env, nnUNet_semi_epochs="1", nnUNet_semi_iters="2", nnUNet_semi_teacher_checkpoint=wrong)
    p = run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", "ReciprocalLearningTrainer_released", "-device",
             "cpu"], e, check=False)
    assert p.returncode != 0
    assert wrong in p.stdout and "configuration 3d_fullres" in p.stdout and "this run uses plans nnUNetPlans, " \
        "configuration 2d" in p.stdout


def test_withheld_label_audit_detects_reads(prepared):
    """Positive control of the withheld-label audit that the 'prepared' fixture runs after the last test using it
    (conftest.py): a Python-level open in a process of the run is logged by the audit hook, and, where the file
    system updates access times, a C++ read (SimpleITK) is seen at the kernel level. It reads prepared.control, a
    copy in a watched folder of its own that the audit leaves out, so it can run in any order."""
    sitk.ReadImage(prepared.control)
    kernel_level = atime_changed([prepared.control]) == [prepared.control]
    run([sys.executable, "-c", f"open({prepared.control!r}, 'rb').read(1)"], prepared.env)
    assert prepared.control in audit_log(prepared)
    assert prepared.control not in withheld_reads(prepared)
    if not kernel_level:
        pytest.skip("this file system does not update access times; only the Python-level audit applies")


# ----------------------------------------------------------------------------------------------
# A&D: three decoders on one encoder, an auxiliary module with its own optimizer, D_theta exported
# ----------------------------------------------------------------------------------------------
def _ad_checks(folder, trainer, epochs):
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == epochs
    semi = ckpt["nnunet_semi"]
    ad = semi["aux"]["ad"]
    assert {k.split(".")[0] for k in ad["weights"]} == {"decoder_xi", "decoder_psi", "diffusion_stem",
                                                        "time_embedding", "temb_encoder", "temb_decoder"}
    assert ad["optimizer"]["state"] and set(semi["difficulty"]) >= {"weights", "dice_ema"}
    # network_weights is nnU-Net's own network (stem + encoder + D_theta): no A&D key in it
    assert not any(k.startswith(("decoder_xi", "decoder_psi", "diffusion_stem")) for k in ckpt["network_weights"])
    for key in ("loss_deno", "loss_diff", "loss_unsup", "pl_agreement", "grad_norm", "grad_norm_ad"):
        assert len(ckpt["logging"][key]) == epochs and np.isfinite(ckpt["logging"][key][-1]), key
    return ckpt


@pytest.mark.parametrize("config", ["2d", "3d_fullres"])
def test_aggregating_decoupling_train_resume_and_predict(prepared, config):
    trainer = "AggregatingDecouplingTrainer"
    folder = train(prepared, trainer, config, **SHORT_SCHEDULE)
    first = _ad_checks(folder, trainer, 2)
    train(prepared, trainer, config, epochs=3, extra=("--c",), **SHORT_SCHEDULE)
    resumed = _ad_checks(folder, trainer, 3)
    log = open(os.path.join(prepared.root, f"train_{trainer}_{config}--c.log")).read()
    assert "Epoch 2" in log and "Epoch 0\n" not in log
    k = next(k for k in first["nnunet_semi"]["aux"]["ad"]["weights"] if k.startswith("decoder_xi") and
             k.endswith("weight"))
    assert not torch.equal(first["nnunet_semi"]["aux"]["ad"]["weights"][k],
                           resumed["nnunet_semi"]["aux"]["ad"]["weights"][k])
    _predictions_ok(predict(prepared, trainer, config), prepared)


def test_aggregating_decoupling_released_recipe_trains_with_svda(prepared):
    trainer = "AggregatingDecouplingTrainer_released"
    folder = train(prepared, trainer, "2d", epochs=1)
    _ad_checks(folder, trainer, 1)
    log = open(os.path.join(prepared.root, f"train_{trainer}_2d.log")).read()
    assert "augmentation svda" in log
