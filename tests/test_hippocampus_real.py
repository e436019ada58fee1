"""One end-to-end run on a handful of real Hippocampus cases from ../shared/data: the project's converter,
nnU-Net planning, unlabeled preprocessing, MeanTeacherTrainer through nnUNetv2_train on CPU, and
nnUNetv2_predict."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from e2e_util import make_env, run
from helpers import shared_data_dir

pytestmark = pytest.mark.slow

HIPPO = os.path.join(shared_data_dir(), "hippocampus")


@pytest.mark.skipif(not os.path.isdir(HIPPO), reason=f"{HIPPO} not found (set NNUNET_SEMI_SHARED_DATA)")
def test_meanteacher_on_real_hippocampus_cases(tmp_path):
    env = make_env(str(tmp_path), nnUNet_semi_epochs="1", nnUNet_semi_iters="2", nnUNet_semi_val_iters="1")
    run(["nnUNetv2_semi_convert_hippocampus", "-i", HIPPO, "-d", "104", "--labeled", "4", "--num-test", "2",
         "--max-cases", "12", "--seed", "3"], env)
    raw = os.path.join(env["nnUNet_raw"], "Dataset104_Hippocampus")
    split = json.load(open(os.path.join(raw, "splits_semi.json")))
    assert len(split["labeled"]) == 4 and len(split["test"]) == 2 and len(split["unlabeled"]) >= 5
    run(["nnUNetv2_plan_and_preprocess", "-d", "104", "-c", "3d_fullres", "-np", "1"], env)
    run(["nnUNetv2_preprocess_unlabeled", "-d", "104", "-c", "3d_fullres", "-np", "1"], env)
    unl = os.path.join(env["nnUNet_preprocessed"], "Dataset104_Hippocampus", "nnUNetPlans_3d_fullres_unlabeled")
    assert sorted(f[:-5] for f in os.listdir(unl) if f.endswith(".b2nd") and "_seg" not in f) == sorted(split["unlabeled"])
    run(["nnUNetv2_train", "104", "3d_fullres", "0", "-tr", "MeanTeacherTrainer", "-device", "cpu"], env)
    folder = os.path.join(env["nnUNet_results"], "Dataset104_Hippocampus", "MeanTeacherTrainer__nnUNetPlans__3d_fullres")
    assert os.path.isfile(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    out = str(tmp_path / "pred")
    run(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", out, "-d", "104", "-c", "3d_fullres",
         "-f", "0", "-tr", "MeanTeacherTrainer", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    for case in split["test"]:
        pred = sitk.ReadImage(os.path.join(out, case + ".nii.gz"))
        ref = sitk.ReadImage(os.path.join(raw, "labelsTs", case + ".nii.gz"))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


@pytest.mark.skipif(not os.path.isdir(HIPPO), reason=f"{HIPPO} not found (set NNUNET_SEMI_SHARED_DATA)")
def test_aggregating_decoupling_uda_on_domain_shifted_real_cases(tmp_path):
    """UDA end to end on real images: a few Hippocampus cases converted, a shifted second 'scanner' made by
    nnUNetv2_semi_domain_shift (labeled = source, unlabeled and held-out = shifted), then the benchmark
    harness (planning, unlabeled preprocessing, nnUNetv2_train of A&D and of supervised nnU-Net,
    nnUNetv2_predict, evaluation) on the target-domain test cases only."""
    import sys
    env = make_env(str(tmp_path), nnUNet_semi_warmup_iters="0", nnUNet_semi_warmup_pseudo_dice="none",
                   nnUNet_semi_rampup_iters="2")
    run(["nnUNetv2_semi_convert_hippocampus", "-i", HIPPO, "-d", "104", "--labeled", "4", "--num-test", "2",
         "--max-cases", "10", "--seed", "3"], env)
    run(["nnUNetv2_semi_domain_shift", "-i", "104", "-o", "107", "--no-invert"], env)
    raw = os.path.join(env["nnUNet_raw"], "Dataset107_HippocampusShift")
    meta = json.load(open(os.path.join(raw, "case_metadata.json")))
    split = json.load(open(os.path.join(raw, "splits_semi.json")))
    assert meta["target_domain"] == "shifted"
    assert {meta["cases"][c]["domain"] for c in split["labeled"]} == {"source"}
    assert {meta["cases"][c]["domain"] for c in split["unlabeled"]} == {"shifted"}
    out = str(tmp_path / "bench")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run([sys.executable, os.path.join(repo, "benchmarks", "run_benchmark.py"), "-d", "107", "-c", "2d", "-s", "0",
         "--epochs", "1", "--iters", "3", "-tr", "SupervisedBaselineTrainer", "AggregatingDecouplingTrainer",
         "--eval-group", "test", "--eval-domain", "target", "--disable_tta", "-o", out], env)
    results = json.load(open(os.path.join(out, "results.json")))
    settings = json.load(open(os.path.join(out, "settings.json")))
    target_test = sorted(c for c in split["test"] if meta["cases"][c]["domain"] == "shifted")
    assert settings["evaluated_cases"] == target_test and settings["evaluated_domain"] == "shifted"
    text = json.dumps(results)
    assert "AggregatingDecouplingTrainer" in text and "SupervisedBaselineTrainer" in text
    ck = os.path.join(out, "seed_0", "nnUNet_results", "Dataset107_HippocampusShift",
                      "AggregatingDecouplingTrainer__nnUNetPlans__2d", "fold_all", "checkpoint_final.pth")
    import torch
    state = torch.load(ck, map_location="cpu", weights_only=False)
    assert np.isfinite(state["logging"]["loss_unsup"][-1])      # the shifted unlabeled images were trained on
