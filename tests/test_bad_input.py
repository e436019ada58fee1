"""Bad input gets an error that names the file and the fix, and nothing is overwritten."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from e2e_util import run

pytestmark = pytest.mark.slow

_counter = [900]


def clone(prepared, with_labeled_preprocessed=False):
    """A copy of the prepared dataset under a new id: raw folder, plans and (optionally) the labeled
    3d_fullres preprocessed data, but never the unlabeled preprocessed data."""
    _counter[0] += 1
    name = f"Dataset{_counter[0]}_Clone"
    raw = os.path.join(prepared.env["nnUNet_raw"], name)
    pre = os.path.join(prepared.env["nnUNet_preprocessed"], name)
    # never copy labelsWithheld: reading it would trip the withheld-label audit of test_end_to_end
    shutil.copytree(prepared.raw, raw, ignore=shutil.ignore_patterns("labelsWithheld"))
    os.makedirs(pre)
    plans = json.load(open(os.path.join(prepared.pre, "nnUNetPlans.json")))
    plans["dataset_name"] = name
    json.dump(plans, open(os.path.join(pre, "nnUNetPlans.json"), "w"))
    for f in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(os.path.join(prepared.pre, f), pre)
    if with_labeled_preprocessed:
        for d in ("nnUNetPlans_3d_fullres", "gt_segmentations"):
            shutil.copytree(os.path.join(prepared.pre, d), os.path.join(pre, d))
        if os.path.isfile(os.path.join(prepared.pre, "splits_final.json")):
            shutil.copy(os.path.join(prepared.pre, "splits_final.json"), pre)
    return name, raw, pre


def write(arr, path, spacing=None):
    im = sitk.GetImageFromArray(arr)
    if spacing:
        im.SetSpacing(spacing)
    sitk.WriteImage(im, path)


def preprocess(prepared, name, *extra):
    return run(["nnUNetv2_preprocess_unlabeled", "-d", name, "-c", "3d_fullres", "-np", "1", *extra],
               prepared.env, check=False)


def assert_error(p, *fragments):
    assert p.returncode != 0, p.stdout
    for frag in fragments:
        assert frag in p.stdout, f"{frag!r} not in:\n{p.stdout[-3000:]}"


def no_output(pre):
    return not os.path.exists(os.path.join(pre, "nnUNetPlans_3d_fullres_unlabeled"))


def test_unlabeled_image_with_extra_channel(prepared):
    name, raw, pre = clone(prepared)
    img = np.random.rand(32, 32, 32).astype(np.float32)
    write(img, os.path.join(raw, "imagesUnlabeled", "extra_0000.nii.gz"))
    write(img, os.path.join(raw, "imagesUnlabeled", "extra_0001.nii.gz"))
    split = json.load(open(os.path.join(raw, "splits_semi.json")))
    split["unlabeled"].append("extra")
    json.dump(split, open(os.path.join(raw, "splits_semi.json"), "w"))
    p = preprocess(prepared, name)
    assert_error(p, "extra", "1 channel(s)", "extra_0000.nii.gz")
    assert no_output(pre)


def test_unlabeled_image_with_multichannel_file(prepared):
    name, raw, pre = clone(prepared)
    os.remove(os.path.join(raw, "splits_semi.json"))
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(np.random.rand(32, 32, 32).astype(np.float32))] * 2)
    sitk.WriteImage(four_d, os.path.join(raw, "imagesUnlabeled", "fourd_0000.nii.gz"))
    p = preprocess(prepared, name)
    assert_error(p, "fourd_0000.nii.gz", "2 channel(s)")
    assert no_output(pre)


def test_unlabeled_image_with_other_file_ending(prepared):
    name, raw, pre = clone(prepared)
    write(np.random.rand(32, 32, 32).astype(np.float32), os.path.join(raw, "imagesUnlabeled", "other_0000.nrrd"))
    p = preprocess(prepared, name)
    assert_error(p, "other_0000.nrrd", "file ending", ".nii.gz")
    assert no_output(pre)


def test_unlabeled_image_with_other_dimensionality(prepared):
    name, raw, pre = clone(prepared)
    os.remove(os.path.join(raw, "splits_semi.json"))
    write(np.random.rand(32, 32).astype(np.float32), os.path.join(raw, "imagesUnlabeled", "flat_0000.nii.gz"))
    p = preprocess(prepared, name)
    assert_error(p, "flat_0000.nii.gz", "2D image", "3D")
    assert no_output(pre)


def test_truncated_unlabeled_image(prepared):
    """The first 300 bytes of a ~120 KB .nii.gz: SimpleITK alone would read an almost all-zero volume."""
    name, raw, pre = clone(prepared)
    path = os.path.join(raw, "imagesUnlabeled", "cut_0000.nii.gz")
    write(np.random.rand(32, 32, 32).astype(np.float32), path)
    data = open(path, "rb").read()
    assert len(data) > 100_000
    open(path, "wb").write(data[:300])
    split = json.load(open(os.path.join(raw, "splits_semi.json")))
    split["unlabeled"].append("cut")
    json.dump(split, open(os.path.join(raw, "splits_semi.json"), "w"))
    p = preprocess(prepared, name)
    assert_error(p, "cut_0000.nii.gz", "unlabeled case 'cut'", "truncated or corrupt", "Copy or export the file again")
    assert no_output(pre) and not os.path.exists(os.path.join(pre, "case_metadata.json"))


def test_empty_unlabeled_set(prepared):
    name, raw, pre = clone(prepared)
    os.remove(os.path.join(raw, "splits_semi.json"))
    shutil.rmtree(os.path.join(raw, "imagesUnlabeled"))
    p = preprocess(prepared, name)
    assert_error(p, "No unlabeled images found", "imagesUnlabeled")
    assert no_output(pre)


def test_split_names_missing_case(prepared):
    name, raw, pre = clone(prepared)
    split = json.load(open(os.path.join(raw, "splits_semi.json")))
    split["unlabeled"].append("case_404")
    json.dump(split, open(os.path.join(raw, "splits_semi.json"), "w"))
    p = preprocess(prepared, name)
    assert_error(p, "splits_semi.json", "case_404", "imagesUnlabeled")
    assert no_output(pre)


def test_split_calls_a_labeled_case_unlabeled(prepared):
    name, raw, pre = clone(prepared)
    split = json.load(open(os.path.join(raw, "splits_semi.json")))
    victim = split["labeled"].pop(0)
    split["unlabeled"].append(victim)
    json.dump(split, open(os.path.join(raw, "splits_semi.json"), "w"))
    p = preprocess(prepared, name)
    assert_error(p, victim, "labelsWithheld", "planning")
    assert no_output(pre)


def test_existing_output_is_not_overwritten(prepared):
    name, raw, pre = clone(prepared)
    assert preprocess(prepared, name).returncode == 0
    out = os.path.join(pre, "nnUNetPlans_3d_fullres_unlabeled")
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    assert len(before) == 18  # 6 cases x (data, seg, properties)
    plans_file = os.path.join(pre, "nnUNetPlans.json")
    plans = json.load(open(plans_file))
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization"]
    json.dump(plans, open(plans_file, "w"))
    p = preprocess(prepared, name)
    assert_error(p, "other plans", "--overwrite")
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == before
    assert preprocess(prepared, name, "--overwrite").returncode == 0


def test_training_without_preprocessed_unlabeled_data(prepared):
    name, raw, pre = clone(prepared, with_labeled_preprocessed=True)
    env = dict(prepared.env, nnUNet_semi_epochs="1", nnUNet_semi_iters="1")
    p = run(["nnUNetv2_train", name, "3d_fullres", "0", "-tr", "MeanTeacherTrainer", "-device", "cpu"], env,
            check=False)
    assert_error(p, "never preprocessed", f"nnUNetv2_preprocess_unlabeled -d {name} -c 3d_fullres")


def test_plans_identity_follows_inherits_from(prepared):
    """A configuration that only changes the network (e.g. a smaller CPU variant) shares the preprocessed
    unlabeled data of its parent; a change of normalisation does not."""
    import copy
    from nnunet_semi.layout import plans_identity
    plans = json.load(open(os.path.join(prepared.pre, "nnUNetPlans.json")))
    plans["configurations"]["3d_small"] = {"inherits_from": "3d_fullres", "batch_size": 1}
    assert plans_identity(plans, "3d_small") == plans_identity(plans, "3d_fullres")
    changed = copy.deepcopy(plans)
    changed["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization"]
    assert plans_identity(changed, "3d_small") != plans_identity(plans, "3d_small")
