"""nnUNetv2_semi_export (nnunet_semi.training.export): another network of a finished run written as a checkpoint
that stock nnU-Net loads strictly, and the benchmark's TRAINER@NETWORK arms that predict with it."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import PATCH, REPO, build, make_trainer
from nnunet_semi.ema import unwrap
from nnunet_semi.methods.aggregating_decoupling import AggregatingDecouplingTrainer as AD
from nnunet_semi.methods.reciprocal_learning import ReciprocalLearningTrainer as RL
from nnunet_semi.networks.aggregating_decoupling import decode, encode
from nnunet_semi.training import export


def _checkpoint(tr, path):
    """What nnU-Net's save_checkpoint writes, in the parts export reads (the trainer's own method needs an
    output folder and a logger; the layout is the same)."""
    ckpt = {"network_weights": tr.export_module().state_dict(), "trainer_name": type(tr).__name__,
            "init_args": {"configuration": "2d"}, "inference_allowed_mirroring_axes": None,
            "nnunet_semi": tr.semi_state_dict()}
    torch.save(ckpt, path)
    return str(path)


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _plain(cls):
    return build(cls, 2, False, deep_supervision=False, seed=7).eval()


def test_teacher_export_loads_strictly_and_keeps_the_student_and_the_source(tmp_path):
    tr = make_trainer(RL)
    tr.aux["teacher"].module.load_state_dict(build(RL, 2, False, True, seed=3).state_dict())
    src = _checkpoint(tr, tmp_path / "checkpoint_final.pth")
    before = _digest(src)
    ckpt = torch.load(src, weights_only=False)
    assert list(export.export_choices(ckpt, RL.partial_exports)) == ["student", "teacher"]
    out = export.export_checkpoint(src, "teacher")
    assert out == str(tmp_path / "checkpoint_final_teacher.pth") and _digest(src) == before
    new = torch.load(out, weights_only=False)
    teacher = tr.aux["teacher"].module.state_dict()
    student = unwrap(tr.network).state_dict()
    assert list(new["network_weights"]) == list(ckpt["network_weights"])
    assert all(torch.equal(new["network_weights"][k], teacher[k]) for k in teacher)
    assert all(torch.equal(new["nnunet_semi"]["student_weights"][k], student[k]) for k in student)
    assert new["nnunet_semi"]["export_network"] == "teacher" and new["trainer_name"] == "ReciprocalLearningTrainer"
    _plain(RL).load_state_dict(new["network_weights"], strict=True)
    # exporting the student back from the teacher export gives the original weights
    back = export.exported_weights(new, "student")
    assert all(torch.equal(back[k], student[k]) for k in student)
    # --c from the exported file restores the student, not the teacher
    fresh = make_trainer(RL, seed=1)
    fresh.network.load_state_dict(new["network_weights"])
    fresh.load_semi_state_dict(new["nnunet_semi"])
    assert all(torch.equal(unwrap(fresh.network).state_dict()[k], student[k]) for k in student)


def test_ad_psi_export_is_the_encoder_with_d_psi_and_matches_the_d_psi_path(tmp_path):
    tr = make_trainer(AD, warmup_iters=0, warmup_pseudo_dice=None)
    with torch.no_grad():   # make D_psi differ from D_theta
        for p in tr.extras.decoder_psi.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = _checkpoint(tr, tmp_path / "checkpoint_final.pth")
    ckpt = torch.load(src, weights_only=False)
    choices = export.export_choices(ckpt, AD.partial_exports)
    assert list(choices) == ["student", "psi"]     # D_xi needs the diffusion input: not offered
    weights = export.exported_weights(ckpt, "psi", AD.partial_exports)
    plain = _plain(AD)
    plain.load_state_dict(weights, strict=True)
    net = unwrap(tr.network).eval()
    x = torch.randn(2, 1, PATCH, PATCH)
    with torch.no_grad():
        psi = tr.extras.difficulty(encode(net, x), deep_supervision=False)
        theta = decode(net.decoder, encode(net, x), None, deep_supervision=False)
        assert torch.allclose(plain(x), psi, atol=1e-6) and not torch.allclose(plain(x), theta, atol=1e-3)
    # encoder tensors are the student's (shared), decoder tensors D_psi's
    student = unwrap(tr.network).state_dict()
    assert all(torch.equal(weights[k], student[k]) for k in student if not k.startswith("decoder."))
    # the trainer class is found from the checkpoint, so the file export offers psi too
    out = export.export_checkpoint(src, "psi")
    assert all(torch.equal(torch.load(out, weights_only=False)["network_weights"][k], v) for k, v in weights.items())


def test_bad_requests_name_the_file_and_the_choices(tmp_path):
    tr = make_trainer(RL)
    src = _checkpoint(tr, tmp_path / "checkpoint_final.pth")
    with pytest.raises(export.ExportError, match=r"checkpoint_final.pth: no network 'teachr'.*student, teacher"):
        export.export_checkpoint(src, "teachr")
    with pytest.raises(export.ExportError, match="refusing to overwrite the source"):
        export.export_checkpoint(src, "teacher", src)
    with pytest.raises(export.ExportError, match="does not exist: train first"):
        export.export_checkpoint(str(tmp_path / "nope.pth"), "teacher")
    plain = tmp_path / "plain.pth"
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer"}, plain)
    with pytest.raises(export.ExportError, match="not written by a nnunet_semi trainer"):
        export.export_checkpoint(str(plain), "teacher")
    ckpt = torch.load(src, weights_only=False)
    with pytest.raises(export.ExportError, match="does not match"):
        export.exported_weights(ckpt, "bad", {"bad": ("teacher", "encoder.", "decoder.")})
    assert not os.path.exists(tmp_path / "checkpoint_final_teachr.pth")


def test_cli_finds_the_run_like_nnunet_predict_and_lists_then_exports(tmp_path):
    tr = make_trainer(RL)
    results = tmp_path / "results"
    fold = results / "Dataset993_Tiny" / "ReciprocalLearningTrainer__nnUNetPlans__2d" / "fold_0"
    fold.mkdir(parents=True)
    _checkpoint(tr, fold / "checkpoint_final.pth")
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(tmp_path / "raw"),
               nnUNet_preprocessed=str(tmp_path / "pre"), PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "nnunet_semi.training.export", "-d", "993", "-c", "2d", "-tr",
           "ReciprocalLearningTrainer"]
    listed = subprocess.run(cmd + ["--list"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "exports 'student'" in listed.stdout and "teacher" in listed.stdout
    done = subprocess.run(cmd + ["-n", "teacher"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (fold / "checkpoint_final_teacher.pth").is_file()
    assert "-chk checkpoint_final_teacher.pth" in done.stdout
    bad = subprocess.run(cmd[:-1] + ["MeanTeacherTrainer", "-n", "teacher"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "MeanTeacherTrainer__nnUNetPlans__2d does " \
        "not exist" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_benchmark_arm_predicts_with_the_exported_network_and_shares_the_training(tmp_path, monkeypatch):
    from test_demo_and_benchmark import _fake_benchmark_data, _simulated_executor
    from nnunet_semi.benchmark import Benchmark, BenchmarkError, BenchmarkSettings
    raw, pre = _fake_benchmark_data(str(tmp_path))
    arms = ["SupervisedBaselineTrainer", "ReciprocalLearningTrainer", "ReciprocalLearningTrainer@teacher"]
    exported = []
    monkeypatch.setattr(export, "export_checkpoint", lambda src, net, out: exported.append((src, net, out)))
    real = _simulated_executor(epochs=2)
    real.bench = Benchmark(BenchmarkSettings(dataset="991", out=str(tmp_path / "bench"), trainers=arms, seeds=[0],
                                             epochs=2, iters=1, raw=raw, preprocessed=pre), executor=real)
    agg = real.bench.run()
    steps = [(c[0], c[c.index("-tr") + 1], c[c.index("-chk") + 1] if "-chk" in c else None)
             for c in real.commands if "-tr" in c]
    assert steps == [("nnUNetv2_train", "SupervisedBaselineTrainer", None),
                     ("nnUNetv2_predict", "SupervisedBaselineTrainer", "checkpoint_final.pth"),
                     ("nnUNetv2_train", "ReciprocalLearningTrainer", None),
                     ("nnUNetv2_predict", "ReciprocalLearningTrainer", "checkpoint_final.pth"),
                     ("nnUNetv2_predict", "ReciprocalLearningTrainer", "checkpoint_final_teacher.pth")]
    fold = real.bench.model_dir("ReciprocalLearningTrainer", 0)
    assert exported == [(os.path.join(fold, "checkpoint_final.pth"), "teacher",
                         os.path.join(fold, "checkpoint_final_teacher.pth"))]
    assert "ReciprocalLearningTrainer@teacher" in agg["stats"]
    report = open(tmp_path / "bench" / "results.md").read()
    assert "| ReciprocalLearningTrainer@teacher | 0 | ReciprocalLearningTrainer's |" in report
    settings = json.load(open(tmp_path / "bench" / "settings.json"))
    assert settings["exported_networks"] == {"ReciprocalLearningTrainer@teacher": "teacher"}
    # alone, the arm trains its trainer
    real2 = _simulated_executor(epochs=2)
    real2.bench = Benchmark(BenchmarkSettings(dataset="991", out=str(tmp_path / "bench2"), trainers=arms[2:],
                                              seeds=[0], epochs=2, iters=1, raw=raw, preprocessed=pre), executor=real2)
    real2.bench.run()
    assert [c[c.index("-tr") + 1] for c in real2.commands if c[0] == "nnUNetv2_train"] == ["ReciprocalLearningTrainer"]
    for bad in ("SupervisedBaselineTrainer@teacher", "ReciprocalLearningTrainer@", "NoSuchTrainer@teacher"):
        with pytest.raises(BenchmarkError, match="TRAINER@NETWORK"):
            Benchmark(BenchmarkSettings(dataset="991", out=str(tmp_path / "b3"), trainers=[bad], seeds=[0],
                                        epochs=2, iters=1, raw=raw, preprocessed=pre))


def test_benchmark_refuses_a_recorded_run_of_other_hyper_parameters(tmp_path):
    """A default that changed after a run was recorded: the harness stops before running anything, naming the
    checkpoint and the hyper-parameter, instead of reporting (or resuming) the old recipe as the new one."""
    from test_demo_and_benchmark import _fake_benchmark_data, _simulated_executor
    from nnunet_semi.benchmark import Benchmark, BenchmarkError, BenchmarkSettings
    from nnunet_semi.methods.mean_teacher import MeanTeacherTrainer
    from nnunet_semi.training.base import class_hparams
    raw, pre = _fake_benchmark_data(str(tmp_path))

    def bench(executor):
        executor.bench = Benchmark(BenchmarkSettings(dataset="991", out=str(tmp_path / "bench"),
                                                     trainers=["MeanTeacherTrainer"], seeds=[0], epochs=2, iters=1,
                                                     raw=raw, preprocessed=pre), executor=executor)
        return executor.bench

    real = _simulated_executor(epochs=2)
    fold = bench(real).model_dir("MeanTeacherTrainer", 0)
    os.makedirs(fold)
    hp = class_hparams(MeanTeacherTrainer)
    torch.save({"nnunet_semi": {"hparams": dict(hp, unsup_weight=0.1)}}, os.path.join(fold, "checkpoint_final.pth"))
    with pytest.raises(BenchmarkError, match=r"checkpoint_final.pth was trained with other hyper-parameters than "
                                             r"MeanTeacherTrainer has now: unsup_weight 0.1 \(now 1.0\)"):
        real.bench.run()
    assert real.commands == [c for c in real.commands if c[0] == "nnUNetv2_preprocess_unlabeled"]
    # the same recipe (and a stored key the class no longer has) is taken as it is: predicted, not retrained
    torch.save({"nnunet_semi": {"hparams": dict(hp, removed_attribute=3)}}, os.path.join(fold, "checkpoint_final.pth"))
    real2 = _simulated_executor(epochs=2)
    bench(real2).run()
    assert [c[0] for c in real2.commands if "-tr" in c] == ["nnUNetv2_predict"]
