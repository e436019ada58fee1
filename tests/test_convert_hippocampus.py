"""Hippocampus converter and the shared converter machinery (nnunet_semi.conversion.common)."""
import contextlib
import io
import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import cases_in, shared_data_dir
from nnunet_semi.conversion import hippocampus as hip
from nnunet_semi.conversion.common import ConversionError, RawDatasetWriter, run_main
from nnunet_semi.layout import SemiSplit, check_split_against_raw, load_standard_splits, unlabeled_cases_from_raw

HIPPO = os.path.join(shared_data_dir(), "hippocampus")

needs_hippo = pytest.mark.skipif(not os.path.isdir(os.path.join(HIPPO, "images")),
                                 reason=f"shared Hippocampus data not found at {HIPPO} "
                                        f"(set NNUNET_SEMI_SHARED_DATA)")


def run_convert(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        folder = hip.convert(argv)
    return folder, out.getvalue()


def write_nii(path, arr_zyx, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, path)


# ------------------------------------------------------------------------------ shared folder
@needs_hippo
def test_plain_layout_quirks_small(tmp_path):
    folder, out = run_convert(["-i", HIPPO, "-o", str(tmp_path), "--max-cases", "6", "--labeled", "3",
                               "--num-test", "1", "--seed", "7"])
    assert os.path.basename(folder) == "Dataset104_Hippocampus"
    split = SemiSplit.load(folder)
    # 6 pairs -> 1 test, 3 labeled, 2 unlabeled with withheld labels; plus the image-only case 118
    assert len(split.test) == 1 and len(split.labeled) == 3
    assert "hippocampus_118" in split.unlabeled and len(split.unlabeled) == 3
    assert cases_in(folder, "imagesTr") == cases_in(folder, "labelsTr") == set(split.labeled)
    assert cases_in(folder, "imagesUnlabeled") == set(split.unlabeled)
    assert cases_in(folder, "labelsWithheld") == set(split.unlabeled) - {"hippocampus_118"}
    assert cases_in(folder, "imagesTs") == cases_in(folder, "labelsTs") == set(split.test)
    # 118 has no label anywhere
    for sub in ("labelsTr", "labelsWithheld", "labelsTs"):
        assert not os.path.exists(os.path.join(folder, sub, "hippocampus_118.nii.gz"))
    # label-only files reported once each and never converted
    assert sum(line.startswith("skipped hippocampus_010: ") for line in out.splitlines()) == 1
    line281 = [line for line in out.splitlines() if line.startswith("skipped hippocampus_281: ")]
    assert len(line281) == 1 and "512x512x94" in line281[0]
    assert "2 other" in out
    for sub in os.listdir(folder):
        if os.path.isdir(os.path.join(folder, sub)):
            assert not {"hippocampus_010", "hippocampus_281"} & cases_in(folder, sub)
    # volumes equal the source, geometry kept, labels uint8 within the label map
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["numTraining"] == 3 and dj["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert dj["channel_names"] == {"0": "MRI"}
    for c in split.labeled:
        src = sitk.ReadImage(os.path.join(HIPPO, "images", c + ".nii.gz"))
        dst = sitk.ReadImage(os.path.join(folder, "imagesTr", c + "_0000.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(src), sitk.GetArrayFromImage(dst))
        assert dst.GetSpacing() == src.GetSpacing() and dst.GetPixelID() == src.GetPixelID()
        lab = sitk.ReadImage(os.path.join(folder, "labelsTr", c + ".nii.gz"))
        assert lab.GetPixelID() == sitk.sitkUInt8 and lab.GetSize() == src.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(lab))) <= {0, 1, 2}
    check_split_against_raw(folder, split, dj)
    assert sorted(unlabeled_cases_from_raw(folder, dj)) == sorted(split.unlabeled)
    # no standard split exists for Hippocampus
    assert load_standard_splits(folder) == {}


@needs_hippo
def test_plain_layout_full_and_float_label(tmp_path):
    folder, out = run_convert(["-i", HIPPO, "-o", str(tmp_path)])
    split = SemiSplit.load(folder)
    n_pairs = 208  # README: 208 image/label pairs (209 images incl. the unlabeled 118; 210 labels incl. 010, 281)
    pairs = len(split.labeled) + len(split.test) + len(split.unlabeled) - 1
    assert pairs == len(set(os.listdir(os.path.join(HIPPO, "images"))) & set(os.listdir(os.path.join(HIPPO, "labels"))))
    assert pairs == n_pairs
    assert len(split.labeled) == 8 and len(split.test) == round(0.2 * n_pairs)
    # hippocampus_003's label is stored as float32: converted to uint8 with identical values
    assert "note hippocampus_003: label stored as 32-bit float" in out
    src = sitk.ReadImage(os.path.join(HIPPO, "labels", "hippocampus_003.nii.gz"))
    assert src.GetPixelID() == sitk.sitkFloat32
    dst = [os.path.join(folder, s, "hippocampus_003.nii.gz") for s in ("labelsTr", "labelsWithheld", "labelsTs")]
    dst = [p for p in dst if os.path.exists(p)]
    assert len(dst) == 1
    d = sitk.ReadImage(dst[0])
    assert d.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(d), sitk.GetArrayFromImage(src).astype(np.uint8))


def test_split_is_seeded_and_nested():
    pairs = [f"c{i:03d}" for i in range(30)]
    a = hip.make_split(pairs, ["img_only"], 4, 5, seed=3)
    b = hip.make_split(list(reversed(pairs)), ["img_only"], 4, 5, seed=3)
    c = hip.make_split(pairs, ["img_only"], 8, 5, seed=3)
    d = hip.make_split(pairs, ["img_only"], 4, 5, seed=4)
    assert a.to_json() == b.to_json()  # input order does not matter
    assert a.test == c.test and set(a.labeled) < set(c.labeled)  # nested labeled sets, same test set
    assert a.labeled != d.labeled
    assert "img_only" in a.unlabeled and len(a.labeled + a.unlabeled + a.test) == 31
    small = hip.make_split(pairs, [], 2, 1, seed=3, max_cases=5)
    assert len(small.labeled + small.unlabeled + small.test) == 5
    with pytest.raises(ConversionError, match="only 5 image/label pairs"):
        hip.make_split(pairs, [], 5, 1, seed=3, max_cases=5)


# ------------------------------------------------------------------------------ MSD layout (synthetic)
def make_msd(root, n_train=5, n_test=2, listed_absent=("hippocampus_900",), float_label=True):
    rng = np.random.RandomState(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    training, test = [], []
    for i in range(n_train):
        c = f"hippocampus_{i + 1:03d}"
        img = rng.rand(6, 7, 5).astype(np.float32) * 100
        lab = rng.randint(0, 3, size=(6, 7, 5)).astype(np.float32 if (float_label and i == 0) else np.uint8)
        write_nii(os.path.join(root, "imagesTr", c + ".nii.gz"), img)
        write_nii(os.path.join(root, "labelsTr", c + ".nii.gz"), lab)
        training.append({"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"})
    for i in range(n_test):
        c = f"hippocampus_{i + 101:03d}"
        write_nii(os.path.join(root, "imagesTs", c + ".nii.gz"), rng.randint(0, 255, (6, 7, 5)).astype(np.uint8))
        test.append(f"./imagesTs/{c}.nii.gz")
    for c in listed_absent:
        training.append({"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"})
    # macOS resource-fork junk as found in the MSD tarball
    with open(os.path.join(root, "imagesTr", "._hippocampus_001.nii.gz"), "wb") as f:
        f.write(b"\x00junk")
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"name": "Hippocampus", "modality": {"0": "MRI"},
                   "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                   "numTraining": len(training), "numTest": len(test), "training": training, "test": test}, f)
    return root


def test_msd_layout(tmp_path):
    src = make_msd(str(tmp_path / "Task04_Hippocampus"))
    folder, out = run_convert(["-i", src, "-o", str(tmp_path / "raw"), "--labeled", "2", "--num-test", "1"])
    split = SemiSplit.load(folder)
    assert "skipped hippocampus_900: not found at" in out and "(withheld from this copy?)" in out
    assert "1 missing" in out
    # MSD imagesTs have no labels: image-only -> unlabeled
    assert {"hippocampus_101", "hippocampus_102"} <= set(split.unlabeled)
    assert not {"hippocampus_101", "hippocampus_102"} & cases_in(folder, "labelsWithheld")
    assert len(split.labeled) == 2 and len(split.test) == 1 and len(split.unlabeled) == 4
    assert cases_in(folder, "imagesTr") == set(split.labeled)
    assert cases_in(folder, "labelsWithheld") == set(split.unlabeled) - {"hippocampus_101", "hippocampus_102"}
    # the float label was cast; all labels are uint8
    for sub in ("labelsTr", "labelsWithheld", "labelsTs"):
        for f in os.listdir(os.path.join(folder, sub)):
            assert sitk.ReadImage(os.path.join(folder, sub, f)).GetPixelID() == sitk.sitkUInt8
    assert "note hippocampus_001: label stored as 32-bit float" in out


def test_refuses_to_overwrite(tmp_path):
    src = make_msd(str(tmp_path / "in"))
    raw = str(tmp_path / "raw")
    folder, _ = run_convert(["-i", src, "-o", raw, "--labeled", "2", "--num-test", "1"])
    marker = os.path.join(folder, "marker.txt")
    open(marker, "w").write("keep me")
    before = os.path.getmtime(os.path.join(folder, "dataset.json"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run_main(hip.convert, ["-i", src, "-o", raw, "--labeled", "3", "--num-test", "1"])
    assert rc == 1
    assert folder in err.getvalue() and "--overwrite" in err.getvalue()
    assert os.path.exists(marker)
    assert os.path.getmtime(os.path.join(folder, "dataset.json")) == before
    assert len(SemiSplit.load(folder).labeled) == 2
    folder2, _ = run_convert(["-i", src, "-o", raw, "--labeled", "3", "--num-test", "1", "--overwrite"])
    assert folder2 == folder and not os.path.exists(marker)
    assert len(SemiSplit.load(folder).labeled) == 3


def test_checks_name_the_case(tmp_path):
    w = RawDatasetWriter(str(tmp_path), 990, "Checks", {0: "MRI"}, {"background": 0, "a": 1})
    img = np.zeros((4, 5, 6), np.float32)
    with pytest.raises(ConversionError, match="case c1: label shape"):
        w.add_labeled("c1", img, np.zeros((4, 5, 7), np.uint8), spacing=(1, 1, 1))
    with pytest.raises(ConversionError, match=r"case c2: label values \[2\] are not in"):
        w.add_labeled("c2", img, np.full((4, 5, 6), 2, np.uint8), spacing=(1, 1, 1))
    with pytest.raises(ConversionError, match="case c3: label is stored as float32 with non-integral"):
        w.add_labeled("c3", img, np.full((4, 5, 6), 0.5, np.float32), spacing=(1, 1, 1))
    a = sitk.GetImageFromArray(img)
    b = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    b.SetSpacing((1.0, 1.0, 2.0))
    with pytest.raises(ConversionError, match="case c4: label spacing"):
        w.add_labeled("c4", a, b)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    from nnunet_semi.conversion.common import read_sitk
    with pytest.raises(ConversionError, match="case c5: cannot read .*broken.nii.gz"):
        read_sitk(str(bad), "c5")
    # a failed case leaves nothing behind; a correct one is written (into the temporary folder until
    # finish) with the spacing in x,y,z order
    w.add_labeled("ok", np.zeros((4, 5, 6), np.float32), np.ones((4, 5, 6), np.uint8), spacing=(0.5, 1, 2))
    assert os.listdir(os.path.join(w.staging, "imagesTr")) == ["ok_0000.nii.gz"]
    im = sitk.ReadImage(os.path.join(w.staging, "imagesTr", "ok_0000.nii.gz"))
    assert im.GetSize() == (4, 5, 6) and im.GetSpacing() == (0.5, 1.0, 2.0)
    # the split must match what was written; a failed finish removes the temporary folder, writes nothing
    with pytest.raises(ConversionError, match="group 'unlabeled'"):
        w.finish(SemiSplit(labeled=["ok"], unlabeled=["ghost"]))
    assert os.listdir(str(tmp_path)) == ["broken.nii.gz"]


def test_case_helpers(tmp_path, capsys):
    """The per-case machinery shared by the name-based converters (Synapse, MM-WHS, Pancreas-CT)."""
    from nnunet_semi.conversion.common import (find_input_folder, make_parser, nifti_path, parse_args, split_groups,
                                               warn_absent_labeled, write_cases)
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    (src / "lab").mkdir()
    # nifti_path: .nii.gz first, .nii when only that exists, else the .nii.gz name
    write_nii(str(src / "img" / "a.nii"), np.zeros((4, 5, 6), np.float32))
    assert nifti_path(str(src / "img"), "a") == str(src / "img" / "a.nii")
    assert nifti_path(str(src / "img"), "b") == str(src / "img" / "b.nii.gz")
    # find_input_folder: candidates relative to the root or absolute, the first folder wins
    assert find_input_folder(str(src), ["nope", "lab", "img"], "x") == str(src / "lab")
    assert find_input_folder("/elsewhere", [str(src / "img")], "x") == str(src / "img")
    with pytest.raises(ConversionError, match=r"^none of nope, nah under .*src \(first: .*src/nope\)$"):
        find_input_folder(str(src), ["nope", "nah"], "none of {candidates} under {root} (first: {path})")

    split = SemiSplit(labeled=["l1", "l2"], unlabeled=["u1", "u2"], test=["t1"], val=["v1"], setting="s")
    assert split_groups(split) == [("l1", "labeled"), ("l2", "labeled"), ("u1", "unlabeled"), ("u2", "unlabeled"),
                                   ("v1", "val"), ("t1", "test")]
    img = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # not constant: input images are checked
    for case in ("l1", "l2", "u1", "u2", "v1"):
        write_nii(str(src / "img" / f"{case}.nii.gz"), img)
    for case in ("l1", "u2", "t1"):
        write_nii(str(src / "lab" / f"{case}.nii.gz"), np.ones((4, 5, 6), np.uint8))
    w = RawDatasetWriter(str(tmp_path / "raw"), 989, "Helpers", {0: "MRI"}, {"background": 0, "a": 1})
    capsys.readouterr()
    written = write_cases(w, split, lambda c: (nifti_path(str(src / "img"), c), nifti_path(str(src / "lab"), c)))
    out = capsys.readouterr().out.splitlines()
    assert written == ["l1", "u1", "u2"]
    assert (w.labeled, w.unlabeled, w.withheld, w.val, w.test) == (["l1"], ["u1", "u2"], ["u2"], [], [])
    # a labeled / held-out case without label and a case without image: one 'skipped' line each
    assert [c for c, _ in w.missing] == ["l2", "v1", "t1"]
    assert f"skipped l2: not found at {src / 'lab' / 'l2.nii.gz'} (withheld from this copy?)" in out
    assert f"skipped t1: not found at {src / 'img' / 't1.nii.gz'} (withheld from this copy?)" in out
    assert f"note u1: no label at {src / 'lab' / 'u1.nii.gz'}; written as unlabeled without a withheld label" in out
    assert warn_absent_labeled(split, w.labeled) == ["l2"]
    assert capsys.readouterr().out == ("WARNING: 1 labeled case(s) of setting s are absent (l2); the labeled set is "
                                       "NOT the standard one.\n")
    assert warn_absent_labeled(split, ["l1", "l2"]) == [] and capsys.readouterr().out == ""
    # add_case dispatches by group
    w.add_case("v2", "val", img, np.zeros((4, 5, 6), np.uint8), spacing=(1, 1, 1))
    w.add_case("t2", "test", img, spacing=(1, 1, 1))
    assert w.val == ["v2"] and w.test == ["t2"] and os.path.isfile(os.path.join(w.staging, "labelsTs", "v2.nii.gz"))
    with pytest.raises(ValueError, match="group must be one of"):
        w.add_case("x", "train", img, spacing=(1, 1, 1))

    # make_parser(labeled=False): no --labeled in the help, args.labeled None, giving it is one parser error
    p = make_parser("demo", 1, labeled=False, labeled_error="--labeled is set by --ratio here")
    assert "--labeled" not in p.format_help()
    args = parse_args(p, ["-i", str(src), "-o", str(tmp_path)])
    assert args.labeled is None and not hasattr(args, "_labeled_error")
    with pytest.raises(SystemExit) as e:
        parse_args(p, ["-i", str(src), "-o", str(tmp_path), "--labeled", "3"])
    assert e.value.code == 2 and "--labeled is set by --ratio here" in capsys.readouterr().err
    assert parse_args(make_parser("demo", 1, 5), ["-i", str(src), "-o", str(tmp_path)]).labeled == 5


def test_msd_shape_mismatch_is_an_error(tmp_path):
    src = make_msd(str(tmp_path / "in"), n_train=3, n_test=0, listed_absent=())
    write_nii(os.path.join(src, "labelsTr", "hippocampus_002.nii.gz"), np.zeros((6, 7, 4), np.uint8))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run_main(hip.convert, ["-i", src, "-o", str(tmp_path / "raw"), "--labeled", "1", "--num-test", "0"])
    assert rc == 1 and "case hippocampus_002: label size" in err.getvalue()


def test_output_root_required(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    src = make_msd(str(tmp_path / "in"), n_train=2, n_test=0, listed_absent=())
    with pytest.raises(SystemExit) as e:
        hip.convert(["-i", src])
    assert e.value.code == 2
    assert "-o/--output-root" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "envraw"))
    folder, _ = run_convert(["-i", src, "--labeled", "1", "--num-test", "0"])
    assert folder.startswith(str(tmp_path / "envraw"))


# ------------------------------------------------------------------------------ nnU-Net accepts it
@pytest.mark.slow
@needs_hippo
def test_nnunet_plan_and_preprocess_accepts_dataset(tmp_path):
    raw, pre, res = (str(tmp_path / n) for n in ("raw", "pre", "res"))
    folder, _ = run_convert(["-i", HIPPO, "-o", raw, "-d", "991", "--max-cases", "8", "--labeled", "6",
                             "--num-test", "1"])
    env = dict(os.environ, nnUNet_raw=raw, nnUNet_preprocessed=pre, nnUNet_results=res, nnUNet_def_n_proc="1",
               OMP_NUM_THREADS="1")
    p = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "1",
                        "--verify_dataset_integrity"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    base = os.path.join(pre, "Dataset991_Hippocampus")
    fp = json.load(open(os.path.join(base, "dataset_fingerprint.json")))
    assert len(fp["spacings"]) == 6  # only the labeled cases are planned on
    gt = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(base, "gt_segmentations")))
    assert gt == sorted(SemiSplit.load(folder).labeled)
    plans = json.load(open(os.path.join(base, "nnUNetPlans.json")))
    assert "3d_fullres" in plans["configurations"]
