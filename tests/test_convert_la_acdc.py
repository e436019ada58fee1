"""LA and ACDC converters on the real shared data (read in place) and on tiny synthetic copies of the
original challenge layouts."""
import contextlib
import io
import json
import os

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from helpers import cases_in, shared_data_dir
from nnunet_semi.conversion import acdc, la
from nnunet_semi.conversion.common import run_main
from nnunet_semi.layout import SemiSplit, check_split_against_raw, load_standard_splits

SHARED = shared_data_dir()
LA_DIR = os.path.join(SHARED, "la")
LA_CASES = os.path.join(LA_DIR, "2018LA_Seg_Training Set")
ACDC_DIR = os.path.join(SHARED, "acdc")

needs_la = pytest.mark.skipif(not os.path.isdir(LA_CASES), reason=f"shared LA data not found at {LA_DIR} "
                                                                  f"(set NNUNET_SEMI_SHARED_DATA)")
needs_acdc = pytest.mark.skipif(not os.path.isdir(os.path.join(ACDC_DIR, "data")),
                                reason=f"shared ACDC data not found at {ACDC_DIR} (set NNUNET_SEMI_SHARED_DATA)")


def capture(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_main(fn, argv)
    return rc, out.getvalue(), err.getvalue()


def read_list(path):
    return [x.strip() for x in open(path) if x.strip()]


def check_withheld_labels(folder, split):
    """Labels of unlabeled cases only in labelsWithheld; labelsTr only for labeled; labelsTs for held out."""
    assert cases_in(folder, "imagesTr") == cases_in(folder, "labelsTr") == set(split.labeled)
    assert cases_in(folder, "imagesUnlabeled") == set(split.unlabeled)
    assert cases_in(folder, "labelsWithheld") <= set(split.unlabeled)
    assert cases_in(folder, "imagesTs") == cases_in(folder, "labelsTs") == set(split.test) | set(split.val)
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["numTraining"] == len(split.labeled)
    check_split_against_raw(folder, split, dj)  # the plugin's own layout check accepts it


# ============================================================================== LA (shared, h5)
@pytest.fixture(scope="module")
def la_converted(tmp_path_factory):
    if not os.path.isdir(LA_CASES):
        pytest.skip(f"shared LA data not found at {LA_DIR}")
    root = str(tmp_path_factory.mktemp("la_raw"))
    rc, out, err = capture(la.convert, ["-i", LA_DIR, "-o", root])
    assert rc == 0, err
    return os.path.join(root, "Dataset028_LeftAtrium"), out, root


@needs_la
def test_la_split_equals_standard_lists(la_converted):
    folder, out, _ = la_converted
    train, test = read_list(os.path.join(LA_DIR, "train.list")), read_list(os.path.join(LA_DIR, "test.list"))
    assert tuple(train) == la.TRAIN_IDS and tuple(test) == la.TEST_IDS  # embedded lists are the canonical ones
    present = sorted(d for d in os.listdir(LA_CASES) if os.path.isdir(os.path.join(LA_CASES, d)))
    assert present == train[:24]
    split = SemiSplit.load(folder)
    assert split.labeled == train[:8]
    assert split.unlabeled == train[8:24]
    assert split.test == [] and split.val == []
    std = load_standard_splits(folder)
    assert sorted(std) == ["16_labeled", "4_labeled", "8_labeled"]
    for n in (4, 8, 16):
        assert std[f"{n}_labeled"].labeled == train[:n]
        assert std[f"{n}_labeled"].unlabeled == train[n:24]
        assert std[f"{n}_labeled"].test == []
    check_withheld_labels(folder, split)
    assert cases_in(folder, "labelsWithheld") == set(train[8:24])


@needs_la
def test_la_absent_cases_reported_and_counted(la_converted):
    _, out, _ = la_converted
    train, test = read_list(os.path.join(LA_DIR, "train.list")), read_list(os.path.join(LA_DIR, "test.list"))
    skipped = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 56 + 20
    assert {line.split()[1].rstrip(":") for line in skipped} == set(train[24:]) | set(test)
    assert all(line.endswith("(withheld from this copy?)") and " not found at " in line for line in skipped)
    assert "76 missing" in out


@needs_la
def test_la_volumes_match_h5(la_converted):
    folder, _, _ = la_converted
    for case, sub, lsub in [("06SR5RBREL16DQ6M8LWS", "imagesTr", "labelsTr"),
                            ("5BHTH9RHH3PQT913I59W", "imagesUnlabeled", "labelsWithheld")]:
        with h5py.File(os.path.join(LA_CASES, case, "mri_norm2.h5"), "r") as f:
            image, label = f["image"][()], f["label"][()]
        im = sitk.ReadImage(os.path.join(folder, sub, case + "_0000.nii.gz"))
        lb = sitk.ReadImage(os.path.join(folder, lsub, case + ".nii.gz"))
        assert im.GetSize() == image.shape  # h5 axes are x, y, z
        assert np.allclose(im.GetSpacing(), (0.625, 0.625, 0.625))
        assert np.array_equal(sitk.GetArrayFromImage(im).transpose(2, 1, 0), image)
        assert np.array_equal(sitk.GetArrayFromImage(lb).transpose(2, 1, 0), label)
        assert set(np.unique(sitk.GetArrayFromImage(lb))) == {0, 1}
        assert lb.GetPixelID() == sitk.sitkUInt8


@needs_la
def test_la_refuses_overwrite(la_converted):
    folder, _, root = la_converted
    stamp = os.path.getmtime(os.path.join(folder, "splits_semi.json"))
    files_before = sorted(os.listdir(os.path.join(folder, "imagesTr")))
    rc, out, err = capture(la.convert, ["-i", LA_DIR, "-o", root, "--labeled", "4"])
    assert rc == 1
    assert folder in err and "--overwrite" in err
    assert os.path.getmtime(os.path.join(folder, "splits_semi.json")) == stamp
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == files_before
    assert len(SemiSplit.load(folder).labeled) == 8


# ============================================================================== LA (synthetic nrrd)
def _write_nrrd_case(folder, shape_xyz, seed, space="left-posterior-superior"):
    import nrrd
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    hdr = {"space": space, "space directions": np.diag([0.625, 0.625, 1.25]),
           "space origin": np.array([10.0, 20.0, 30.0])}
    img = rng.randint(0, 255, size=shape_xyz).astype(np.uint8)
    lab = np.where(rng.rand(*shape_xyz) > 0.7, 255, 0).astype(np.uint8)
    nrrd.write(os.path.join(folder, "lgemri.nrrd"), img, dict(hdr))
    nrrd.write(os.path.join(folder, "laendo.nrrd"), lab, dict(hdr))
    return img, lab


def test_la_nrrd_layout_without_lists(tmp_path):
    src = tmp_path / "2018 Atrial Segmentation Challenge"
    ids_train = la.TRAIN_IDS[:3]
    arrays = {}
    for i, c in enumerate(ids_train):
        arrays[c] = _write_nrrd_case(str(src / "Training Set" / c), (6, 5, 4), i)
    arrays[la.TEST_IDS[0]] = _write_nrrd_case(str(src / "Testing Set" / la.TEST_IDS[0]), (6, 5, 4), 9,
                                               space="right-anterior-superior")
    rc, out, err = capture(la.convert, ["-i", str(src), "-o", str(tmp_path / "raw"), "--labeled", "2"])
    assert rc == 0, err
    assert "canonical UA-MT lists" in out
    folder = str(tmp_path / "raw" / "Dataset028_LeftAtrium")
    split = SemiSplit.load(folder)
    assert split.labeled == list(ids_train[:2]) and split.unlabeled == [ids_train[2]]
    assert split.test == [la.TEST_IDS[0]]
    assert "96 missing" in out  # 77 train + 19 test listed cases are absent
    check_withheld_labels(folder, split)
    im = sitk.ReadImage(os.path.join(folder, "imagesTr", ids_train[0] + "_0000.nii.gz"))
    lb = sitk.ReadImage(os.path.join(folder, "labelsTr", ids_train[0] + ".nii.gz"))
    assert np.allclose(im.GetSpacing(), (0.625, 0.625, 1.25)) and np.allclose(im.GetOrigin(), (10, 20, 30))
    img, lab = arrays[ids_train[0]]
    assert np.array_equal(sitk.GetArrayFromImage(im).transpose(2, 1, 0), img)
    assert np.array_equal(sitk.GetArrayFromImage(lb).transpose(2, 1, 0), (lab == 255).astype(np.uint8))
    # RAS header -> ITK LPS: first two axes and origin components flip sign
    ts = sitk.ReadImage(os.path.join(folder, "imagesTs", la.TEST_IDS[0] + "_0000.nii.gz"))
    assert np.allclose(ts.GetOrigin(), (-10, -20, 30))
    assert np.allclose(ts.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert sorted(load_standard_splits(folder)["4_labeled"].labeled) == sorted(ids_train)


# ============================================================================== ACDC (shared, h5)
@pytest.fixture(scope="module")
def acdc_converted(tmp_path_factory):
    if not os.path.isdir(os.path.join(ACDC_DIR, "data")):
        pytest.skip(f"shared ACDC data not found at {ACDC_DIR}")
    root = str(tmp_path_factory.mktemp("acdc_raw"))
    rc, out, err = capture(acdc.convert, ["-i", ACDC_DIR, "-o", root])
    assert rc == 0, err
    return os.path.join(root, "Dataset027_ACDC"), out, root


@needs_acdc
def test_acdc_split_is_patient_level_standard(acdc_converted):
    folder, out, _ = acdc_converted
    train = read_list(os.path.join(ACDC_DIR, "train.list"))
    val = read_list(os.path.join(ACDC_DIR, "val.list"))
    patients = list(dict.fromkeys(c[:10] for c in train))
    assert [p[7:] for p in patients] == list(acdc.TRAIN_PATIENTS)
    assert list(dict.fromkeys(c[7:10] for c in val)) == list(acdc.VAL_PATIENTS)
    split = SemiSplit.load(folder)
    first3 = {"patient099", "patient038", "patient050"}
    assert set(patients[:3]) == first3
    assert split.labeled == [c for c in train if c[:10] in first3] and len(split.labeled) == 6
    assert split.unlabeled == [c for c in train if c[:10] not in first3] and len(split.unlabeled) == 134
    assert split.val == val and split.test == []
    std = load_standard_splits(folder)
    assert sorted(std) == ["3_labeled", "7_labeled"]
    first7 = first3 | {"patient100", "patient058", "patient021", "patient049"}
    assert std["7_labeled"].labeled == [c for c in train if c[:10] in first7]
    assert std["7_labeled"].unlabeled == [c for c in train if c[:10] not in first7]
    assert std["3_labeled"].to_json()["labeled"] == split.labeled
    for s in std.values():
        assert s.val == val and s.test == []
        # a patient's two frames are never split across groups
        lab_p = {c[:10] for c in s.labeled}
        assert not lab_p & {c[:10] for c in s.unlabeled}
    check_withheld_labels(folder, split)
    assert cases_in(folder, "labelsWithheld") == set(split.unlabeled)


@needs_acdc
def test_acdc_absent_test_volumes_reported(acdc_converted):
    _, out, _ = acdc_converted
    test = read_list(os.path.join(ACDC_DIR, "test.list"))
    skipped = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert {line.split()[1].rstrip(":") for line in skipped} == set(test) and len(skipped) == 40
    assert all(line.endswith("(withheld from this copy?)") for line in skipped)
    assert "40 missing" in out


@needs_acdc
def test_acdc_volumes_slices_and_spacing(acdc_converted):
    folder, _, _ = acdc_converted
    # a training volume rebuilt from its slices: slice_K is z index K-1
    case = "patient099_frame01"
    im = sitk.ReadImage(os.path.join(folder, "imagesTr", case + "_0000.nii.gz"))
    lb = sitk.ReadImage(os.path.join(folder, "labelsTr", case + ".nii.gz"))
    arr, larr = sitk.GetArrayFromImage(im), sitk.GetArrayFromImage(lb)
    n = len([f for f in os.listdir(os.path.join(ACDC_DIR, "data")) if f.startswith(case + "_slice_")])
    assert arr.shape[0] == n == 16
    for k in (1, 7, n):
        with h5py.File(os.path.join(ACDC_DIR, "data", f"{case}_slice_{k}.h5"), "r") as f:
            assert np.array_equal(arr[k - 1], f["image"][()])
            assert np.array_equal(larr[k - 1], f["label"][()])
    assert np.allclose(im.GetSpacing(), acdc.H5_SPACING) and acdc.H5_SPACING == (1.5625, 1.5625, 10.0)
    # SSL4MIS slice counts (both frames): 099:32, 038:16, 050:20
    for p, cnt in (("099", 32), ("038", 16), ("050", 20)):
        z = sum(sitk.ReadImage(os.path.join(folder, "imagesTr", f"patient{p}_frame0{f}_0000.nii.gz")).GetSize()[2]
                for f in (1, 2))
        assert z == cnt
    # a validation volume equals its h5 (axes z, y, x)
    case = "patient028_frame01"
    with h5py.File(os.path.join(ACDC_DIR, "data", case + ".h5"), "r") as f:
        image, label = f["image"][()], f["label"][()]
    im = sitk.ReadImage(os.path.join(folder, "imagesTs", case + "_0000.nii.gz"))
    lb = sitk.ReadImage(os.path.join(folder, "labelsTs", case + ".nii.gz"))
    assert im.GetSize() == image.shape[::-1]
    assert np.array_equal(sitk.GetArrayFromImage(im), image)
    assert np.array_equal(sitk.GetArrayFromImage(lb), label)
    assert set(np.unique(sitk.GetArrayFromImage(lb))) == {0, 1, 2, 3}
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3} and dj["numTraining"] == 6


@needs_acdc
def test_acdc_refuses_overwrite(acdc_converted):
    folder, _, root = acdc_converted
    stamp = os.path.getmtime(os.path.join(folder, "dataset.json"))
    rc, _, err = capture(acdc.convert, ["-i", ACDC_DIR, "-o", root, "--labeled", "7"])
    assert rc == 1 and folder in err and "--overwrite" in err
    assert os.path.getmtime(os.path.join(folder, "dataset.json")) == stamp
    assert len(SemiSplit.load(folder).labeled) == 6


# ============================================================================== ACDC (synthetic NIfTI)
def _write_patient(root, p, ed, es, nz, spacing=(1.4, 1.4, 10.0)):
    d = os.path.join(root, "training", f"patient{p}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "Info.cfg"), "w") as f:
        f.write(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: 30\nWeight: 70.0\n")
    rng = np.random.RandomState(int(p))
    out = {}
    for fr in (ed, es):
        img = sitk.GetImageFromArray(rng.randint(0, 500, (nz, 9, 8)).astype(np.int16))
        img.SetSpacing(spacing)
        gt = sitk.GetImageFromArray(rng.randint(0, 4, (nz, 9, 8)).astype(np.uint8))
        gt.SetSpacing(spacing)
        sitk.WriteImage(img, os.path.join(d, f"patient{p}_frame{fr:02d}.nii.gz"))
        sitk.WriteImage(gt, os.path.join(d, f"patient{p}_frame{fr:02d}_gt.nii.gz"))
        out[fr] = (sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(gt))
    return out


def test_acdc_nifti_layout(tmp_path):
    src = str(tmp_path / "ACDC")
    v099 = _write_patient(src, "099", 1, 12, 16)  # 16 + 16 = 32 slices, as SSL4MIS counts
    _write_patient(src, "020", 1, 9, 7)
    _write_patient(src, "028", 1, 11, 6)  # a val patient
    rc, out, err = capture(acdc.convert, ["-i", src, "-o", str(tmp_path / "raw"), "--labeled", "1"])
    assert rc == 0, err
    assert "canonical SSL4MIS patient lists" in out
    folder = str(tmp_path / "raw" / "Dataset027_ACDC")
    split = SemiSplit.load(folder)
    assert split.labeled == ["patient099_frame01", "patient099_frame02"]
    assert split.unlabeled == ["patient020_frame01", "patient020_frame02"]
    assert split.val == ["patient028_frame01", "patient028_frame02"] and split.test == []
    assert "194 missing" in out  # 200 listed volumes, 6 present
    check_withheld_labels(folder, split)
    # frame01 = ED (frame 1), frame02 = ES (frame 12); real spacing kept
    es = sitk.ReadImage(os.path.join(folder, "imagesTr", "patient099_frame02_0000.nii.gz"))
    assert np.allclose(es.GetSpacing(), (1.4, 1.4, 10.0))
    assert np.array_equal(sitk.GetArrayFromImage(es), v099[12][0])
    gt = sitk.ReadImage(os.path.join(folder, "labelsTr", "patient099_frame02.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(gt), v099[12][1])


def test_acdc_nifti_slice_count_check(tmp_path):
    src = str(tmp_path / "ACDC")
    _write_patient(src, "099", 1, 12, 5)  # 10 slices, SSL4MIS counts 32 for patient099
    rc, _, err = capture(acdc.convert, ["-i", src, "-o", str(tmp_path / "raw"), "--labeled", "1"])
    assert rc == 1 and "patient099: 10 slices over both frames" in err


def test_absent_labeled_cases_warn(tmp_path):
    """Both converters run on the shared per-case loop: an absent listed case is skipped with one line, an
    absent labeled one also gives the shared WARNING, and the split lists only the cases written."""
    la_src = tmp_path / "la"
    for i, c in enumerate(la.TRAIN_IDS[:3]):
        _write_nrrd_case(str(la_src / c), (6, 5, 4), i)
    rc, out, err = capture(la.convert, ["-i", str(la_src), "-o", str(tmp_path / "raw"), "--labeled", "4"])
    assert rc == 0, err
    assert f"WARNING: 1 labeled case(s) of setting 4_labeled are absent ({la.TRAIN_IDS[3]})" in out
    assert SemiSplit.load(str(tmp_path / "raw" / "Dataset028_LeftAtrium")).labeled == list(la.TRAIN_IDS[:3])
    acdc_src = str(tmp_path / "ACDC")
    _write_patient(acdc_src, "099", 1, 12, 16)
    rc, out, err = capture(acdc.convert, ["-i", acdc_src, "-o", str(tmp_path / "raw"), "--labeled", "2"])
    assert rc == 0, err
    assert ("WARNING: 2 labeled case(s) of setting 2_labeled are absent (patient038_frame01, patient038_frame02)"
            in out)
    split = SemiSplit.load(str(tmp_path / "raw" / "Dataset027_ACDC"))
    assert split.labeled == ["patient099_frame01", "patient099_frame02"] and split.unlabeled == []
