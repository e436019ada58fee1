"""Bad input images that SimpleITK reads without a word (a truncated or corrupt .nii.gz, NaN/inf voxels,
a constant image) are refused, naming the file, by nnUNetv2_preprocess_unlabeled before anything is
written and by the converters; a converter that fails with --overwrite keeps the old dataset. Fast: tiny
generated files, no nnU-Net run."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import files_under
from nnunet_semi.conversion import hippocampus as hip
from nnunet_semi.conversion.common import run_main
from nnunet_semi.data.unlabeled import check_unlabeled_cases, preprocess_unlabeled_entry
from nnunet_semi.image_checks import read_image
from nnunet_semi.layout import SemiSplit

BAD = {"truncated": "truncated or corrupt", "corrupt": "truncated or corrupt",
       "nan": "voxels are NaN or infinite", "inf": "voxels are NaN or infinite",
       "constant": "every voxel has the value 7.0"}


def write_image(path, how="ok", shape=(32, 32, 32), seed=0):
    """A random float32 image (128 KB of voxels; ~120 KB as .nii.gz), spoilt as ``how`` says:
    truncated to its first 300 bytes, one byte flipped half-way, one NaN / inf voxel, or constant."""
    arr = np.random.default_rng(seed).random(shape).astype(np.float32) * 100
    if how in ("nan", "inf"):
        arr[1, 2, 3] = np.nan if how == "nan" else np.inf
    elif how == "constant":
        arr[:] = 7
    sitk.WriteImage(sitk.GetImageFromArray(arr), path)
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[:min(300, len(data) // 2)]
    elif how == "corrupt":
        data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_gzip_is_detected(tmp_path, how):
    path = write_image(str(tmp_path / "x.nii.gz"), how)
    if how == "truncated":  # why the check decompresses itself: SimpleITK reads it without error, as zeros
        assert np.count_nonzero(sitk.GetArrayViewFromImage(sitk.ReadImage(path))) < 100
    with pytest.raises(ValueError, match=f"{path}: the compressed file is truncated or corrupt"):
        read_image(path)


def test_read_image_reads_the_file_once(tmp_path, monkeypatch):
    path = write_image(str(tmp_path / "x.nii.gz"))
    read = []
    real = sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage", lambda p, *a: read.append(p) or real(p, *a))
    img = read_image(path)
    assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(real(path)))
    # SimpleITK reads the copy that gzip decompressed (and checked), never the file itself
    assert len(read) == 1 and read[0] != path and read[0].endswith("x.nii") and not os.path.exists(read[0])


# ------------------------------------------------------------------------------ unlabeled preprocessing
def make_unlabeled_dataset(root, bad_how):
    """Raw and preprocessed folders of Dataset905_Checks as nnUNetv2_preprocess_unlabeled finds them:
    one labeled image, two good unlabeled ones and unlabeled 'bad' spoilt as ``bad_how``."""
    raw = os.path.join(root, "raw", "Dataset905_Checks")
    pre = os.path.join(root, "pre", "Dataset905_Checks")
    for d in ("imagesTr", "imagesUnlabeled"):
        os.makedirs(os.path.join(raw, d))
    os.makedirs(pre)
    dj = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1}, "numTraining": 1,
          "file_ending": ".nii.gz"}
    for folder in (raw, pre):
        json.dump(dj, open(os.path.join(folder, "dataset.json"), "w"))
    json.dump({"format": 1, "cases": {}}, open(os.path.join(raw, "case_metadata.json"), "w"))
    # reading stops at the bad image: the configuration is never looked up
    json.dump({"image_reader_writer": "SimpleITKIO", "configurations": {}},
              open(os.path.join(pre, "nnUNetPlans.json"), "w"))
    write_image(os.path.join(raw, "imagesTr", "l1_0000.nii.gz"))
    for i, case in enumerate(("a", "bad", "c")):
        write_image(os.path.join(raw, "imagesUnlabeled", f"{case}_0000.nii.gz"),
                    bad_how if case == "bad" else "ok", seed=i + 1)
    return raw, pre, dj


@pytest.mark.parametrize("how", sorted(BAD))
def test_preprocess_unlabeled_refuses_bad_image(tmp_path, monkeypatch, capsys, how):
    raw, pre, _ = make_unlabeled_dataset(str(tmp_path), how)
    monkeypatch.setenv("nnUNet_raw", os.path.dirname(raw))
    monkeypatch.setenv("nnUNet_preprocessed", os.path.dirname(pre))
    with pytest.raises(SystemExit) as e:
        preprocess_unlabeled_entry(["-d", "Dataset905_Checks", "-c", "3d_fullres", "-np", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    bad = os.path.join(raw, "imagesUnlabeled", "bad_0000.nii.gz")
    assert f"ERROR: {bad}: unlabeled case 'bad': " in err and BAD[how] in err
    assert "Or remove the case from imagesUnlabeled/" in err
    assert sorted(os.listdir(pre)) == ["dataset.json", "nnUNetPlans.json"]  # nothing written, not even metadata


def test_good_unlabeled_images_pass(tmp_path):
    raw, _, dj = make_unlabeled_dataset(str(tmp_path), "ok")
    cases = {c: [os.path.join(raw, "imagesUnlabeled", f"{c}_0000.nii.gz")] for c in ("a", "bad", "c")}
    check_unlabeled_cases(cases, raw, dj, reader_cls=None)


# ------------------------------------------------------------------------------ converters
def make_plain_hippocampus(root, bad_case=None, how="ok"):
    """The plain layout of the Hippocampus converter: images/ + labels/ of 5 cases (hippocampus_005's
    label all background, which is fine for a label); image ``bad_case`` spoilt as ``how``."""
    for d in ("images", "labels"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(1, 6):
        case = f"hippocampus_{i:03d}"
        write_image(os.path.join(root, "images", case + ".nii.gz"), how if case == bad_case else "ok",
                    shape=(6, 7, 5), seed=i)
        lab = np.random.default_rng(i).integers(0, 3, (6, 7, 5)).astype(np.uint8) * (i != 5)
        sitk.WriteImage(sitk.GetImageFromArray(lab), os.path.join(root, "labels", case + ".nii.gz"))
    return root


def convert(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run_main(hip.convert, argv)
    return rc, err.getvalue()


@pytest.mark.parametrize("how", sorted(BAD))
def test_converter_refuses_bad_image(tmp_path, how):
    src = make_plain_hippocampus(str(tmp_path / "in"), "hippocampus_003", how)
    rc, err = convert(["-i", src, "-o", str(tmp_path / "raw"), "--labeled", "2", "--num-test", "1"])
    bad = os.path.join(src, "images", "hippocampus_003.nii.gz")
    assert rc == 1 and f"error: case hippocampus_003: {bad}: " in err and BAD[how] in err
    assert os.listdir(str(tmp_path / "raw")) == []  # the temporary folder is gone


def test_failed_overwrite_keeps_the_old_dataset(tmp_path):
    src = make_plain_hippocampus(str(tmp_path / "in"))
    raw = str(tmp_path / "raw")
    argv = ["-i", src, "-o", raw, "--num-test", "1", "--overwrite"]
    assert convert(argv + ["--labeled", "2"])[0] == 0
    folder = os.path.join(raw, "Dataset104_Hippocampus")
    before = files_under(folder)
    # a bad case half-way through the conversion: earlier cases were already written (to the temporary folder)
    write_image(os.path.join(src, "images", "hippocampus_003.nii.gz"), "truncated", shape=(6, 7, 5))
    rc, err = convert(argv + ["--labeled", "3"])
    assert rc == 1 and "case hippocampus_003" in err and "truncated or corrupt" in err
    assert files_under(folder) == before  # byte-identical
    assert os.listdir(raw) == ["Dataset104_Hippocampus"]  # and no temporary folder left
    # repaired, --overwrite replaces it
    write_image(os.path.join(src, "images", "hippocampus_003.nii.gz"), shape=(6, 7, 5), seed=3)
    assert convert(argv + ["--labeled", "3"])[0] == 0
    assert len(SemiSplit.load(folder).labeled) == 3 and os.listdir(raw) == ["Dataset104_Hippocampus"]
