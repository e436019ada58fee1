"""Converters whose data is not available here (Synapse, MM-WHS, M&Ms, Pancreas-CT), run on tiny
synthetic copies of the public download layouts built in tmp dirs."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from helpers import cases_in
from nnunet_semi.conversion import mmwhs, mnms, pancreas, synapse
from nnunet_semi.layout import SemiSplit, load_case_metadata, load_standard_splits

SHAPE_ZYX = (8, 16, 16)
SPACING = (0.8, 0.8, 2.5)  # x, y, z


# ------------------------------------------------------------------------------ helpers
def run(module, argv, capsys):
    """module.main(argv) -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def write_nii(path, arr_zyx, spacing=SPACING, direction=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, path)


def rand_image(rng, shape=SHAPE_ZYX):
    return rng.integers(-100, 300, size=shape).astype(np.int16)


def rand_label(rng, values, shape=SHAPE_ZYX):
    lab = np.zeros(shape, dtype=np.uint16)
    flat = lab.reshape(-1)
    for i, v in enumerate(values):  # every value present at least once, at known places
        flat[i * 7 + 3] = v
    return lab


def read_arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def check_layout(folder, split, has_label):
    """Folders follow the split; labels of unlabeled cases only in labelsWithheld, of val/test in labelsTs."""
    assert cases_in(folder, "imagesTr") == cases_in(folder, "labelsTr") == set(split.labeled)
    assert cases_in(folder, "imagesUnlabeled") == set(split.unlabeled)
    assert cases_in(folder, "labelsWithheld") == {c for c in split.unlabeled if has_label(c)}
    assert cases_in(folder, "imagesTs") == cases_in(folder, "labelsTs") == set(split.test) | set(split.val)
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["numTraining"] == len(split.labeled)
    return dj


# ------------------------------------------------------------------------------ Synapse
SYN_ALL = [f"{i:04d}" for i in list(range(1, 11)) + list(range(21, 41))]


def make_synapse(root, rng, skip=(), label_override=None):
    img_dir = os.path.join(root, "RawData", "Training", "img")
    lab_dir = os.path.join(root, "RawData", "Training", "label")
    for num in SYN_ALL:
        if num in skip:
            continue
        write_nii(os.path.join(img_dir, f"img{num}.nii.gz"), rand_image(rng))
        lab = rand_label(rng, range(14))
        if label_override and num in label_override:
            lab, spacing = label_override[num]
            write_nii(os.path.join(lab_dir, f"label{num}.nii.gz"), lab, spacing)
        else:
            write_nii(os.path.join(lab_dir, f"label{num}.nii.gz"), lab)
    return root


def test_synapse_split_layout_missing_and_overwrite(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = make_synapse(str(tmp_path / "src"), rng, skip={"0040"})
    out = tmp_path / "raw"
    code, stdout, _ = run(synapse, ["-i", src, "-o", out], capsys)
    assert code == 0
    folder = str(out / "Dataset029_Synapse")
    split = SemiSplit.load(folder)
    assert split.labeled == ["synapse_0009", "synapse_0021", "synapse_0025", "synapse_0034"]
    assert split.val == ["synapse_0001", "synapse_0007", "synapse_0023", "synapse_0030"]
    assert split.test == [f"synapse_{n}" for n in ("0008", "0027", "0029", "0033", "0037", "0039")]
    assert split.unlabeled == [f"synapse_{n}" for n in ("0002", "0003", "0004", "0005", "0006", "0010", "0022",
                                                         "0024", "0026", "0028", "0031", "0032", "0035", "0036",
                                                         "0038")]  # 0040 absent
    dj = check_layout(folder, split, lambda c: True)
    assert dj["labels"]["background"] == 0 and dj["labels"]["spleen"] == 1 and dj["labels"]["pancreas"] == 11
    assert dj["labels"]["left_adrenal_gland"] == 13 and len(dj["labels"]) == 14
    assert dj["channel_names"] == {"0": "CT"}
    # the absent case: one line, counted
    assert sum(ln.startswith("skipped synapse_0040: not found at") for ln in stdout.splitlines()) == 1
    assert "1 missing" in stdout
    # values and geometry kept
    src_lab = read_arr(os.path.join(src, "RawData/Training/label/label0009.nii.gz"))
    dst = sitk.ReadImage(os.path.join(folder, "labelsTr", "synapse_0009.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(dst), src_lab) and np.allclose(dst.GetSpacing(), SPACING)
    assert np.array_equal(read_arr(os.path.join(folder, "imagesTs", "synapse_0001_0000.nii.gz")),
                          read_arr(os.path.join(src, "RawData/Training/img/img0001.nii.gz")))
    std = load_standard_splits(folder)
    assert set(std) == {"4_labeled"} and std["4_labeled"].labeled == split.labeled
    # the dataset of origin of every case, nothing else
    md = load_case_metadata(folder)
    assert {c: md.get(c) for c in md.cases} == {c: {"origin_dataset": "Synapse"} for c in
                                                 split.labeled + split.unlabeled + split.val + split.test}

    # no overwrite without --overwrite; nothing touched
    before = os.path.getmtime(os.path.join(folder, "dataset.json"))
    code, _, err = run(synapse, ["-i", src, "-o", out], capsys)
    assert code == 1 and "--overwrite" in err and "Dataset029_Synapse" in err
    assert os.path.getmtime(os.path.join(folder, "dataset.json")) == before
    # with --overwrite, from another layout depth (-i at RawData/Training)
    code, _, _ = run(synapse, ["-i", os.path.join(src, "RawData", "Training"), "-o", out, "--overwrite"], capsys)
    assert code == 0 and SemiSplit.load(folder).labeled == split.labeled


@pytest.mark.parametrize("bad", ["shape", "value", "spacing"])
def test_synapse_bad_label_names_case(tmp_path, capsys, bad):
    rng = np.random.default_rng(1)
    if bad == "shape":
        override = {"0009": (np.zeros((8, 16, 15), np.uint8), SPACING)}
    elif bad == "value":
        override = {"0009": (rand_label(rng, [0, 3, 14]), SPACING)}
    else:
        override = {"0009": (np.zeros(SHAPE_ZYX, np.uint8), (0.8, 0.8, 5.0))}
    src = make_synapse(str(tmp_path / "src"), rng, label_override=override)
    code, _, err = run(synapse, ["-i", src, "-o", tmp_path / "raw"], capsys)
    assert code == 1
    assert "synapse_0009" in err
    assert {"shape": "differs from image size", "value": "[14]", "spacing": "spacing"}[bad] in err


# ------------------------------------------------------------------------------ MM-WHS
MMWHS_RAW = [0, 205, 420, 500, 550, 600, 820, 850]  # 550/600/850: other MM-WHS structures -> 0
PERMUTED = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)  # a non-identity (axis-permuting) direction


def make_mmwhs(root, rng, bad=None):
    for mod in ("ct", "mr"):
        for n in range(1001, 1021):
            stem = os.path.join(root, f"{mod}_train", f"{mod}_train_{n}")
            direction = PERMUTED if mod == "mr" else None
            write_nii(stem + "_image.nii.gz", rand_image(rng), direction=direction)
            lab = rand_label(rng, MMWHS_RAW)
            if bad and bad[0] == f"{mod}_train_{n}":
                if bad[1] == "value":
                    lab.reshape(-1)[1] = 7
                elif bad[1] == "shape":
                    lab = lab[:, :, :15]
            write_nii(stem + "_label.nii.gz", lab, direction=direction)
    return root


def test_mmwhs_ct2mr(tmp_path, capsys):
    rng = np.random.default_rng(2)
    src = make_mmwhs(str(tmp_path / "src"), rng)
    os.remove(os.path.join(src, "mr_train", "mr_train_1020_image.nii.gz"))
    out = tmp_path / "raw"
    code, stdout, _ = run(mmwhs, ["-i", src, "-o", out, "--setting", "ct2mr"], capsys)
    assert code == 0
    folder = str(out / "Dataset030_MMWHS_ct2mr")
    split = SemiSplit.load(folder)
    ct = lambda *ns: [f"ct_train_{n}" for n in ns]  # noqa: E731
    mr = lambda *ns: [f"mr_train_{n}" for n in ns]  # noqa: E731
    assert split.labeled == ct(1006, 1018, 1016, 1013, 1017, 1004, 1020, 1009, 1007, 1001, 1012, 1010, 1002, 1015,
                               1005, 1011)
    assert split.unlabeled == mr(1001, 1002, 1003, 1004, 1005, 1006, 1008, 1010, 1011, 1013, 1014, 1017)
    assert split.val == mr(1012, 1015, 1016) and split.test == mr(1007, 1009, 1018, 1019)
    assert sum(ln.startswith("skipped mr_train_1020: not found") for ln in stdout.splitlines()) == 1
    dj = check_layout(folder, split, lambda c: True)
    assert dj["labels"] == {"background": 0, "MYO": 1, "LAC": 2, "LVC": 3, "AA": 4}
    assert dj["channel_names"] == {"0": "zscore"}
    # the CT test cases are not used by ct2mr
    for sub in os.listdir(folder):
        if os.path.isdir(os.path.join(folder, sub)):
            assert not set(ct(1003, 1008, 1014, 1019)) & cases_in(folder, sub)
    # domains: case_metadata.json, no ad hoc domains.json
    assert not os.path.exists(os.path.join(folder, "domains.json"))
    md = load_case_metadata(folder)
    assert md.source_domains == ["CT"] and md.target_domain == "MR"
    assert {c for c in md.cases if md.domain_of(c) == "CT"} == set(split.labeled)
    assert {c for c in md.cases if md.domain_of(c) == "MR"} == set(split.unlabeled + split.val + split.test)
    assert md.get("mr_train_1001") == {"domain": "MR", "origin_dataset": "MMWHS"}
    assert "mr_train_1020" not in md and md.get("mr_train_1020") == {}  # absent from this copy
    # label remapping, also through the reorientation of the MR volumes (identity direction out)
    for case, sub in (("ct_train_1006", "labelsTr"), ("mr_train_1001", "labelsWithheld"), ("mr_train_1007", "labelsTs")):
        raw = sitk.ReadImage(os.path.join(src, case[:8], f"{case}_label.nii.gz"))
        out_lab = sitk.ReadImage(os.path.join(folder, sub, f"{case}.nii.gz"))
        assert out_lab.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        want = sitk.GetArrayFromImage(sitk.DICOMOrient(raw, "LPS"))
        got = sitk.GetArrayFromImage(out_lab)
        assert set(np.unique(got).tolist()) == {0, 1, 2, 3, 4}
        for code_, new in {205: 1, 420: 2, 500: 3, 820: 4, 550: 0, 600: 0, 850: 0}.items():
            assert np.all(got[want == code_] == new)
        img = sitk.ReadImage(os.path.join(folder, sub.replace("labels", "images").replace("Withheld", "Unlabeled"),
                                          f"{case}_0000.nii.gz"))
        assert img.GetSize() == out_lab.GetSize()
    # an MR volume stored with permuted axes comes out in the identity orientation
    assert sitk.ReadImage(os.path.join(folder, "imagesTs", "mr_train_1007_0000.nii.gz")).GetSize() != (16, 16, 8)
    std = load_standard_splits(folder)
    assert set(std) == {"ct2mr"}
    # refuses to overwrite
    code, _, err = run(mmwhs, ["-i", src, "-o", out, "--setting", "ct2mr"], capsys)
    assert code == 1 and "--overwrite" in err


def test_mmwhs_mr2ct_split(tmp_path, capsys):
    src = make_mmwhs(str(tmp_path / "src"), np.random.default_rng(3))
    code, _, _ = run(mmwhs, ["-i", src, "-o", tmp_path / "raw", "--setting", "mr2ct", "-d", 130, "--no-reorient"],
                     capsys)
    assert code == 0
    folder = str(tmp_path / "raw" / "Dataset130_MMWHS_mr2ct")
    split = SemiSplit.load(folder)
    assert split.labeled[:3] == ["mr_train_1010", "mr_train_1004", "mr_train_1011"] and len(split.labeled) == 16
    assert not {"mr_train_1007", "mr_train_1009", "mr_train_1018", "mr_train_1019"} & set(split.labeled)
    assert split.val == ["ct_train_1005", "ct_train_1011", "ct_train_1015"]
    assert split.test == ["ct_train_1003", "ct_train_1008", "ct_train_1014", "ct_train_1019"]
    assert len(split.unlabeled) == 13 and all(c.startswith("ct_") for c in split.unlabeled)
    check_layout(folder, split, lambda c: True)
    # --no-reorient keeps the stored (permuted) direction
    assert sitk.ReadImage(os.path.join(folder, "imagesTr", "mr_train_1010_0000.nii.gz")).GetDirection() == PERMUTED


@pytest.mark.parametrize("bad", ["value", "shape"])
def test_mmwhs_bad_label_names_case(tmp_path, capsys, bad):
    src = make_mmwhs(str(tmp_path / "src"), np.random.default_rng(4), bad=("ct_train_1018", bad))
    code, _, err = run(mmwhs, ["-i", src, "-o", tmp_path / "raw", "--setting", "ct2mr"], capsys)
    assert code == 1 and "ct_train_1018" in err
    assert ("[7]" in err and "--ignore-unknown-values" in err) if bad == "value" else "differs from image size" in err
    if bad == "value":  # GenericSSL's lenient rule: unknown values -> 0
        code, _, _ = run(mmwhs, ["-i", src, "-o", tmp_path / "raw2", "--setting", "ct2mr",
                                 "--ignore-unknown-values"], capsys)
        assert code == 0
        lab = read_arr(str(tmp_path / "raw2" / "Dataset030_MMWHS_ct2mr" / "labelsTr" / "ct_train_1018.nii.gz"))
        assert lab.max() == 4 and set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}


# ------------------------------------------------------------------------------ M&Ms
# vendor -> subjects (the GenericSSL toA_0.02 labeled picks J9L6N9, A5D0G0, I6N3P3 / E3F2U7 / H6P7T1 included)
MNMS_SUBJECTS = {"A": ["A0S9V9", "K4T7Y0"],
                 "B": ["A5D0G0", "I6N3P3", "J9L6N9", "A3B7E5", "M4P7Q6"],
                 "C": ["E3F2U7", "V4W8Z5"],
                 "D": ["H6P7T1", "I8N8Y1"]}
N_FRAMES = 6


def make_mnms(root, rng, bad=None):
    """OpenDataset layout: info CSV + Training/Labeled, Validation, Testing, Training/Unlabeled."""
    rows = []
    folders = ["Training/Labeled", "Validation", "Testing"]
    i = 0
    frames = {}
    for vendor, codes in MNMS_SUBJECTS.items():
        for code in codes:
            ed, es = (0, 3) if i % 2 == 0 else (1, 4)
            frames[code] = (ed, es)
            rows.append((code, vendor, {"A": 1, "B": 2, "C": 4, "D": 5}[vendor], ed, es))
            d = os.path.join(root, folders[i % 3], code)
            os.makedirs(d)
            x, y, z = 16, 16, 8
            img = rng.integers(0, 500, size=(x, y, z, N_FRAMES)).astype(np.int16)
            gt = np.zeros((x, y, z, N_FRAMES), np.uint8)
            for t in (ed, es):
                gt[4:8, 4:8, 2:5, t] = 1
                gt[8:10, 4:8, 2:5, t] = 2
                gt[10:12, 4:8, 2:5, t] = 3
            if bad and bad[0] == code:
                if bad[1] == "value":
                    gt[0, 0, 0, es] = 5
                elif bad[1] == "shape":
                    gt = gt[:, :15]
                elif bad[1] == "empty":
                    gt[..., ed] = 0
            aff = np.diag([1.25, 1.25, 10.0, 1.0])
            nib.save(nib.Nifti1Image(img, aff), os.path.join(d, f"{code}_sa.nii.gz"))
            nib.save(nib.Nifti1Image(gt, aff), os.path.join(d, f"{code}_sa_gt.nii.gz"))
            i += 1
    # an unannotated vendor-C subject, and a CSV subject absent from this copy
    os.makedirs(os.path.join(root, "Training", "Unlabeled", "Z0Z0Z0"))
    rows += [("Z0Z0Z0", "C", 4, 0, 5), ("Y1Y1Y1", "B", 2, 0, 9)]
    with open(os.path.join(root, mnms.INFO_CSV), "w") as f:
        f.write(",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight\n")
        for k, (code, vendor, centre, ed, es) in enumerate(rows):
            f.write(f"{k},{code},Name{vendor},{vendor},{centre},{ed},{es},50,NOR,M,170,70\n")
    return root, frames


def test_mnms_genericssl_split_frames_and_domains(tmp_path, capsys):
    rng = np.random.default_rng(5)
    src, frames = make_mnms(str(tmp_path / "OpenDataset"), rng)
    out = tmp_path / "raw"
    # -i at the parent of OpenDataset/
    code, stdout, _ = run(mnms, ["-i", tmp_path, "-o", out, "--target", "A"], capsys)
    assert code == 0
    folder = str(out / "Dataset031_MNMs_toA")
    split = SemiSplit.load(folder)
    both = lambda *codes: [f"{c}_{p}" for c in codes for p in ("ED", "ES")]  # noqa: E731
    assert split.setting == "toA_0.02" and split.seed is None
    assert split.labeled == both("A5D0G0", "I6N3P3", "J9L6N9", "E3F2U7", "H6P7T1")
    assert split.unlabeled == both("A3B7E5", "M4P7Q6", "V4W8Z5", "I8N8Y1")
    assert split.test == both("A0S9V9", "K4T7Y0") and split.val == []
    dj = check_layout(folder, split, lambda c: True)
    assert dj["labels"] == {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
    # absent subject: one line, counted; unannotated subject noted, not converted
    assert sum(ln.startswith("skipped Y1Y1Y1: not found") for ln in stdout.splitlines()) == 1
    assert "1 missing" in stdout and "1 subject(s) in Training/Unlabeled" in stdout
    assert not any("Z0Z0Z0" in c for sub in ("imagesTr", "imagesUnlabeled", "imagesTs") for c in cases_in(folder, sub))
    # ED/ES frames extracted as 3D cases with the 4D file's spatial geometry
    for code in ("A5D0G0", "K4T7Y0"):
        d = next(os.path.join(src, f, code) for f in ("Training/Labeled", "Validation", "Testing")
                 if os.path.isdir(os.path.join(src, f, code)))
        img4 = np.asarray(nib.load(os.path.join(d, f"{code}_sa.nii.gz")).dataobj)
        for phase, t in zip(("ED", "ES"), frames[code]):
            sub = "imagesTr" if code == "A5D0G0" else "imagesTs"
            out_img = sitk.ReadImage(os.path.join(folder, sub, f"{code}_{phase}_0000.nii.gz"))
            assert np.array_equal(sitk.GetArrayFromImage(out_img), img4[..., t].transpose(2, 1, 0))
            assert np.allclose(out_img.GetSpacing(), (1.25, 1.25, 10.0))
            lab = read_arr(os.path.join(folder, sub.replace("images", "labels"), f"{code}_{phase}.nii.gz"))
            assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}
    # case_metadata.json: vendor (the domain) and centre per case, no ad hoc domains.json
    assert not os.path.exists(os.path.join(folder, "domains.json"))
    md = load_case_metadata(folder)
    assert md.target_domain == "A" and md.source_domains == ["B", "C", "D"]
    assert md.get("E3F2U7_ES") == {"domain": "C", "vendor": "C", "centre": 4, "origin_dataset": "MNMs"}
    assert md.get("H6P7T1_ED")["centre"] == 5
    assert {c for c in md.cases if md.domain_of(c) == "A"} == set(split.test)
    assert set(md.cases) == set(split.labeled + split.unlabeled + split.test)
    # standard splits: GenericSSL's picks for both ratios (restricted to the subjects present)
    std = load_standard_splits(folder)
    assert set(std) == {"toA_0.02", "toA_0.05"}
    assert std["toA_0.02"].labeled == split.labeled
    assert std["toA_0.05"].labeled == both("A3B7E5", "A5D0G0", "I6N3P3", "J9L6N9", "E3F2U7", "H6P7T1")
    code, _, err = run(mnms, ["-i", src, "-o", out, "--target", "A"], capsys)
    assert code == 1 and "--overwrite" in err


def test_mnms_seeded_selection(tmp_path, capsys):
    src, _ = make_mnms(str(tmp_path / "OpenDataset"), np.random.default_rng(6))
    splits = []
    for k in range(2):
        code, _, _ = run(mnms, ["-i", src, "-o", tmp_path / f"raw{k}", "--target", "B", "--ratio", "0.05",
                                "--seed", 11], capsys)
        assert code == 0
        splits.append(SemiSplit.load(str(tmp_path / f"raw{k}" / "Dataset031_MNMs_toB")))
    s = splits[0]
    assert s.labeled == splits[1].labeled and s.seed == 11 and s.setting == "toB_0.05_seed11"
    # ceil(0.05 * n) = 1 subject (2 frames) from each of A (2 present), C (2), D (2)
    vendor = {c: v for v, cs in MNMS_SUBJECTS.items() for c in cs}
    subj = sorted({c.rsplit("_", 1)[0] for c in s.labeled})
    assert sorted(vendor[c] for c in subj) == ["A", "C", "D"] and len(s.labeled) == 6
    assert s.test == [f"{c}_{p}" for c in sorted(MNMS_SUBJECTS["B"]) for p in ("ED", "ES")]
    assert len(s.unlabeled) == 2 * (6 - 3)


@pytest.mark.parametrize("bad,expect", [("value", "[5]"), ("shape", "differs from image size"),
                                        ("empty", "ground truth is empty")])
def test_mnms_bad_input_names_case(tmp_path, capsys, bad, expect):
    src, _ = make_mnms(str(tmp_path / "OpenDataset"), np.random.default_rng(7), bad=("J9L6N9", bad))
    code, _, err = run(mnms, ["-i", src, "-o", tmp_path / "raw", "--target", "A"], capsys)
    assert code == 1 and "J9L6N9" in err and expect in err


# ------------------------------------------------------------------------------ Pancreas-CT
def make_pancreas(root, rng, numbers, img_dir="Pancreas-CT/data", lab_dir="TCIA_pancreas_labels-02-05-2017",
                  img_pat="PANCREAS_{n:04d}.nii.gz", lab_pat="label{n:04d}.nii.gz", bad=None):
    for n in numbers:
        write_nii(os.path.join(root, img_dir, img_pat.format(n=n)), rand_image(rng))
        lab, spacing = rand_label(rng, [0, 1]), SPACING
        if bad and bad[0] == n:
            if bad[1] == "value":
                lab.reshape(-1)[0] = 2
            else:
                spacing = (0.8, 0.8, 1.0)
        write_nii(os.path.join(root, lab_dir, lab_pat.format(n=n)), lab, spacing)
    return root


TCIA_NUMBERS = [n for n in range(1, 83) if n not in (25, 70)]


def test_pancreas_rlsss_split_with_tcia_duplicates_absent(tmp_path, capsys):
    src = make_pancreas(str(tmp_path / "src"), np.random.default_rng(8), TCIA_NUMBERS)
    out = tmp_path / "raw"
    code, stdout, _ = run(pancreas, ["-i", src, "-o", out], capsys)
    assert code == 0
    folder = str(out / "Dataset032_PancreasCT")
    split = SemiSplit.load(folder)
    p = lambda *ns: [f"pancreas_{n:04d}" for n in ns]  # noqa: E731
    assert split.labeled == p(14, 9, 2, 12, 40, 65, 11, 34, 26, 17)  # the RLSSS 12 without 0025/0070
    assert split.test == p(38, 63, 15, 31, 60, 46, 36, 16, 76, 50, 45, 82, 80, 39, 19, 56, 13, 79, 72, 74)
    assert len(split.unlabeled) == 50 and split.unlabeled[:3] == p(44, 33, 23) and split.unlabeled[-1] == p(62)[0]
    assert set(split.labeled + split.unlabeled + split.test) == set(p(*TCIA_NUMBERS))
    dj = check_layout(folder, split, lambda c: True)
    assert dj["labels"] == {"background": 0, "pancreas": 1} and dj["channel_names"] == {"0": "CT"}
    for n in (25, 70):
        assert sum(ln.startswith(f"skipped pancreas_{n:04d}: not found") for ln in stdout.splitlines()) == 1
    assert "2 missing" in stdout and "WARNING: 2 labeled case(s)" in stdout
    std = load_standard_splits(folder)
    assert set(std) == {"12_labeled"} and std["12_labeled"].labeled == split.labeled
    assert load_case_metadata(folder).get("pancreas_0044") == {"origin_dataset": "PancreasCT"}
    assert np.array_equal(read_arr(os.path.join(folder, "labelsWithheld", "pancreas_0044.nii.gz")),
                          read_arr(os.path.join(src, "TCIA_pancreas_labels-02-05-2017", "label0044.nii.gz")))
    code, _, err = run(pancreas, ["-i", src, "-o", out], capsys)
    assert code == 1 and "--overwrite" in err


def test_pancreas_custom_layout_and_versemi(tmp_path, capsys):
    src = make_pancreas(str(tmp_path / "src"), np.random.default_rng(9), TCIA_NUMBERS, img_dir="img",
                        lab_dir="lab", img_pat="img{n:04d}.nii.gz", lab_pat="seg{n:04d}.nii.gz")
    code, _, _ = run(pancreas, ["-i", src, "-o", tmp_path / "raw", "--protocol", "versemi", "--labeled", 6,
                                "--images-dir", "img", "--labels-dir", "lab", "--image-pattern", "img{n:04d}.nii.gz",
                                "--label-pattern", "seg{n:04d}.nii.gz"], capsys)
    assert code == 0
    folder = str(tmp_path / "raw" / "Dataset032_PancreasCT")
    split = SemiSplit.load(folder)
    assert split.labeled == [f"pancreas_{n:04d}" for n in range(1, 7)] and len(split.unlabeled) == 56
    assert split.test == [f"pancreas_{n:04d}" for n in range(64, 83) if n != 70]
    check_layout(folder, split, lambda c: True)
    assert set(load_standard_splits(folder)) == {"6_labeled", "12_labeled"}


@pytest.mark.parametrize("bad,expect", [("value", "[2]"), ("spacing", "spacing")])
def test_pancreas_bad_label_names_case(tmp_path, capsys, bad, expect):
    src = make_pancreas(str(tmp_path / "src"), np.random.default_rng(10), [14, 9, 2], bad=(9, bad))
    code, _, err = run(pancreas, ["-i", src, "-o", tmp_path / "raw"], capsys)
    assert code == 1 and "pancreas_0009" in err and expect in err


# ------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("module", [synapse, mmwhs, mnms, pancreas])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--overwrite" in out and "--dataset-id" in out and "Accepted input" in out


def test_mnms_refuses_labeled(tmp_path, capsys):
    code, _, err = run(mnms, ["-i", tmp_path, "-o", tmp_path / "raw", "--target", "A", "--labeled", 3], capsys)
    assert code == 2 and "--labeled does not apply to M&Ms: the labeled subjects are set by --ratio (and --seed)" in err
    assert not os.path.exists(tmp_path / "raw")
