"""The domain-shift generator (nnunet_semi.conversion.domain_shift, nnUNetv2_semi_domain_shift) on a tiny synthetic
dataset and on real Hippocampus cases, and the benchmark's --eval-domain on its output (dry-run executor)."""
import filecmp
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import cases_in, shared_data_dir
from nnunet_semi.conversion import domain_shift as ds
from nnunet_semi.layout import SemiSplit, check_split_against_raw, load_case_metadata, unlabeled_cases_from_raw

HIPPO = os.path.join(shared_data_dir(), "hippocampus")
SHAPE_ZYX = (12, 16, 20)


# ------------------------------------------------------------------------------ helpers
def run(argv, capsys):
    """domain_shift.main(argv) -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        ds.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def make_input(root, n_labeled=3, n_unlabeled=2):
    """A synthetic plugin dataset Dataset990_Syn: labeled, unlabeled (withheld labels), one val and one test case."""
    from nnunet_semi.synthetic import make_synthetic_dataset
    folder = make_synthetic_dataset(str(root), 990, "Syn", n_labeled=n_labeled, n_unlabeled=n_unlabeled, n_test=2,
                                    shape=SHAPE_ZYX, seed=0)
    split = SemiSplit.load(folder)
    split.val, split.test = split.test[:1], split.test[1:]
    split.save(folder)
    return folder, split


def read(path):
    return sitk.ReadImage(path)


def arr(path):
    return sitk.GetArrayFromImage(read(path)).astype(np.float64)


def all_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def zscore(a):
    return (a - a.mean()) / a.std()


def contrast(image_path, label_path):
    """Mean z-scored intensity of label 1 minus that of the background."""
    z, lab = zscore(arr(image_path)), arr(label_path)
    return z[lab == 1].mean() - z[lab == 0].mean()


def correlation_back(source_path, shifted_path):
    """Pearson r between a source image and the shifted image resampled back onto the source grid."""
    src = read(source_path)
    back = sitk.Resample(read(shifted_path), src, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return float(np.corrcoef(sitk.GetArrayFromImage(src).ravel(), sitk.GetArrayFromImage(back).ravel())[0, 1])


def foreground_centre_mm(label_path):
    img = read(label_path)
    idx = np.argwhere(sitk.GetArrayFromImage(img) > 0)[:, ::-1].mean(axis=0)  # x, y, z
    return np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))


@pytest.fixture
def shifted(tmp_path, capsys):
    src, split = make_input(tmp_path / "raw")
    rc, out, err = run(["-i", src, "-o", 106, "--name", "SynShift", "--output-root", tmp_path / "raw"], capsys)
    assert rc == 0, err
    return src, split, str(tmp_path / "raw" / "Dataset106_SynShift"), out, err


# ------------------------------------------------------------------------------ layout, metadata, split
def test_layout_split_metadata_and_dataset_json(shifted):
    src, split_in, folder, out, err = shifted
    (v,), (t,) = split_in.val, split_in.test
    assert cases_in(folder, "imagesTr") == cases_in(folder, "labelsTr") == set(split_in.labeled)
    assert cases_in(folder, "imagesUnlabeled") == cases_in(folder, "labelsWithheld") == set(split_in.unlabeled)
    assert cases_in(folder, "imagesTs") == cases_in(folder, "labelsTs") == {v, t, v + "_src", t + "_src"}
    # no target-domain case where training or planning reads labels
    target = set(split_in.unlabeled) | {v, t}
    assert not target & (cases_in(folder, "imagesTr") | cases_in(folder, "labelsTr"))
    split = SemiSplit.load(folder)
    assert split.labeled == split_in.labeled and split.unlabeled == split_in.unlabeled
    assert split.val == [v, v + "_src"] and split.test == [t, t + "_src"]
    assert split.seed == 0 and "uda source->shifted" in split.setting
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    dj_in = json.load(open(os.path.join(src, "dataset.json")))
    assert dj["numTraining"] == 3 and dj["name"] == "Dataset106_SynShift"
    assert (dj["labels"], dj["channel_names"], dj["file_ending"]) == (dj_in["labels"], dj_in["channel_names"], ".nii.gz")
    check_split_against_raw(folder, split, dj)
    assert sorted(unlabeled_cases_from_raw(folder, dj)) == sorted(split_in.unlabeled)
    md = load_case_metadata(folder)
    assert md.target_domain == "shifted" and md.source_domains == ["source"]
    want = {**{c: "source" for c in split_in.labeled + [v + "_src", t + "_src"]}, **{c: "shifted" for c in target}}
    assert {c: md.domain_of(c) for c in md.cases} == want
    assert {md.get(c)["origin_dataset"] for c in md.cases} == {"Dataset990_Syn"}
    assert md.get(t + "_src")["extra"]["original_case"] == t and md.get(t)["extra"]["original_case"] == t
    params = md.extra["domain_shift"]["parameters"]
    assert params == ds.ShiftParameters().to_json() and params["spacing_factor"] == [1.0, 1.0, 2.0]
    # progress: one bar over the 9 cases, then the summary
    assert "9/9" in err and "domains: labeled 3 source + 0 shifted; unlabeled 0 source + 2 shifted" in out
    assert not [d for d in os.listdir(os.path.dirname(folder)) if d.startswith(".")]  # no partial folder left


def test_geometry_labels_and_intensities(shifted):
    src, split_in, folder, _, _ = shifted
    (v,), (t,) = split_in.val, split_in.test
    # source cases: unchanged copies (voxels and header)
    for case, sub, copy in [(c, "Tr", c) for c in split_in.labeled] + [(c, "Ts", c + "_src") for c in (v, t)]:
        a, b = read(f"{src}/images{sub}/{case}_0000.nii.gz"), read(f"{folder}/images{sub}/{copy}_0000.nii.gz")
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert (a.GetSpacing(), a.GetOrigin(), a.GetPixelID()) == (b.GetSpacing(), b.GetOrigin(), b.GetPixelID())
    # target cases: new spacing in the header, label on the image's grid, same label values, same anatomy
    pairs = [(f"{src}/imagesUnlabeled/{c}_0000.nii.gz", f"{src}/labelsWithheld/{c}.nii.gz",
              f"{folder}/imagesUnlabeled/{c}_0000.nii.gz", f"{folder}/labelsWithheld/{c}.nii.gz")
             for c in split_in.unlabeled]
    pairs += [(f"{src}/imagesTs/{c}_0000.nii.gz", f"{src}/labelsTs/{c}.nii.gz", f"{folder}/imagesTs/{c}_0000.nii.gz",
               f"{folder}/labelsTs/{c}.nii.gz") for c in (v, t)]
    for img_in, lab_in, img_out, lab_out in pairs:
        im, lab, im0 = read(img_out), read(lab_out), read(img_in)
        assert im.GetSpacing() == (1.0, 1.0, 2.0) and im.GetSize() == (20, 16, 6)
        assert lab.GetSize() == im.GetSize() and lab.GetSpacing() == im.GetSpacing()
        assert np.allclose(lab.GetOrigin(), im.GetOrigin()) and lab.GetDirection() == im.GetDirection()
        assert im.GetPixelID() == sitk.sitkFloat32 and lab.GetPixelID() == sitk.sitkUInt8
        # same field of view: the grid's centre is the input's centre (z origin moves by half a voxel)
        assert np.allclose(im.GetOrigin(), (0.0, 0.0, 0.5)) and im0.GetOrigin() == (0.0, 0.0, 0.0)
        assert set(np.unique(arr(lab_out))) == set(np.unique(arr(lab_in))) == {0, 1, 2}
        # nearest neighbour on 2 mm slices: the label's centre moves by less than half a new slice
        assert np.linalg.norm(foreground_centre_mm(lab_out) - foreground_centre_mm(lab_in)) < 1.0
    # the intensity distribution changed: the bright structure is dark now, voxels anti-correlated
    for c in (v, t):
        before = contrast(f"{folder}/imagesTs/{c}_src_0000.nii.gz", f"{folder}/labelsTs/{c}_src.nii.gz")
        after = contrast(f"{folder}/imagesTs/{c}_0000.nii.gz", f"{folder}/labelsTs/{c}.nii.gz")
        assert before > 2.5 and after < -1.5, (c, before, after)
        assert correlation_back(f"{folder}/imagesTs/{c}_src_0000.nii.gz", f"{folder}/imagesTs/{c}_0000.nii.gz") < -0.4


def test_deterministic_for_a_seed(tmp_path, capsys):
    src, _ = make_input(tmp_path / "raw")
    outs = {}
    for tag, seed in (("a", 3), ("b", 3), ("c", 4)):
        rc, _, err = run(["-i", src, "-o", 106, "--output-root", tmp_path / tag, "--seed", seed], capsys)
        assert rc == 0, err
        outs[tag] = str(tmp_path / tag / "Dataset106_SynShift")   # default name: input name + Shift
    files = all_files(outs["a"])
    assert files == all_files(outs["b"]) == all_files(outs["c"]) and len(files) == 21
    assert all(filecmp.cmp(os.path.join(outs["a"], f), os.path.join(outs["b"], f), shallow=False) for f in files)
    # another seed: other shifted images; the same labels (geometry does not depend on the seed), same source copies
    for f in files:
        a, c = os.path.join(outs["a"], f), os.path.join(outs["c"], f)
        if f.startswith(("imagesUnlabeled", "imagesTs")) and "_src_" not in f:
            assert np.abs(arr(a) - arr(c)).mean() > 0.01 * np.abs(arr(a)).mean(), f
        elif f.startswith(("labels", "imagesTr")) or "_src" in f:
            assert np.array_equal(arr(a), arr(c)), f
    ca, cc = (json.load(open(os.path.join(o, "case_metadata.json")))["extra"]["domain_shift"]["curves"]["0"]
              for o in (outs["a"], outs["c"]))
    assert ca[0] == cc[0] and ca[1] != cc[1]


def test_options_semidg_no_copies_spacing_and_identity(tmp_path, capsys):
    src, split_in = make_input(tmp_path / "raw")
    out = tmp_path / "out"
    rc, _, err = run(["-i", src, "-o", 107, "--name", "DG", "--output-root", out, "--setting", "semidg",
                      "--no-source-heldout", "--spacing", 2, 1, 1], capsys)
    assert rc == 0, err
    folder = str(out / "Dataset107_DG")
    md = load_case_metadata(folder)
    assert cases_in(folder, "imagesTs") == set(split_in.val + split_in.test)          # no _src copies
    for c in split_in.unlabeled:                                                      # unlabeled: unchanged source
        assert md.domain_of(c) == "source"
        assert np.array_equal(arr(f"{src}/imagesUnlabeled/{c}_0000.nii.gz"), arr(f"{folder}/imagesUnlabeled/{c}_0000.nii.gz"))
    for c in split_in.val + split_in.test:
        assert md.domain_of(c) == "shifted"
        im = read(f"{folder}/imagesTs/{c}_0000.nii.gz")
        assert im.GetSpacing() == (2.0, 1.0, 1.0) and im.GetSize() == (10, 16, 12)
    # every part switched off: the image is the input clipped to its 0.5/99.5 percentiles, nothing else
    rc, _, err = run(["-i", src, "-o", 108, "--name", "Id", "--output-root", out, "--curve", "none", "--no-invert",
                      "--bias-amplitude", 0, "--noise", "none", "--spacing-factor", 1, 1, 1], capsys)
    assert rc == 0, err
    for c in split_in.val + split_in.test:
        a = arr(f"{src}/imagesTs/{c}_0000.nii.gz")
        lo, hi = np.percentile(a, ds.PERCENTILES)
        b = arr(str(out / "Dataset108_Id" / "imagesTs" / f"{c}_0000.nii.gz"))
        assert np.allclose(b, np.clip(a, lo, hi), atol=1e-3 * (hi - lo))


def test_shift_parts():
    p = ds.ShiftParameters()
    x, y = ds.intensity_curve(p)
    assert len(x) == 6 and y[0] == 1.0 and y[-1] == 0.0 and np.all(np.diff(y) < 0)   # monotone, inverted
    assert np.abs(y - (1 - x)).max() > 0.1                                               # and not linear
    u = np.linspace(0, 1, 101)
    assert np.all(np.diff(ds.apply_curve(u, x, y)) <= 1e-12)
    xn, yn = ds.intensity_curve(ds.ShiftParameters(curve="non-monotone", invert=False, seed=1))
    assert np.any(np.diff(yn) > 0) and np.any(np.diff(yn) < 0)
    field = ds.bias_field((6, 8, 10), np.random.default_rng(0), 0.4, 2)
    assert np.isclose(max(field.max(), 1 / field.min()), 1.4) and field.min() >= 1 / 1.4 - 1e-9
    assert ds.bias_field((6, 8, 10), np.random.default_rng(0), 0.0, 2) is None
    for bad, option in ((dict(curve_strength=2), "--curve-strength"), (dict(spacing_factor=(1, 0, 1)), "--spacing-factor"),
                        (dict(noise="speckle"), "--noise"), (dict(seed=-1), "--seed")):
        with pytest.raises(ValueError, match=option):
            ds.ShiftParameters(**bad)


# ------------------------------------------------------------------------------ refusals
def test_existing_target_is_refused_and_kept(tmp_path, capsys):
    src, _ = make_input(tmp_path / "raw")
    root = tmp_path / "raw"
    target = root / "Dataset106_SynShift"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    rc, out, err = run(["-i", src, "-o", 106, "--name", "SynShift", "--output-root", root], capsys)
    assert rc == 1 and f"{target} exists and is not empty; nothing was written" in err and "--overwrite" in err
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "old"
    # another folder with the same id
    rc, _, err = run(["-i", src, "-o", 106, "--name", "Other", "--output-root", root], capsys)
    assert rc == 1 and f"{target} already uses dataset id 106" in err and "-o/--output-id" in err
    # the input itself
    rc, _, err = run(["-i", src, "-o", 990, "--name", "Syn", "--output-root", root], capsys)
    assert rc == 1 and "is the input dataset" in err
    assert sorted(os.listdir(root)) == ["Dataset106_SynShift", "Dataset990_Syn"]   # no partial folder
    # --overwrite replaces the old one once the new dataset is complete
    rc, _, err = run(["-i", src, "-o", 106, "--name", "SynShift", "--output-root", root, "--overwrite"], capsys)
    assert rc == 0, err
    assert not (target / "keep.txt").exists() and (target / "case_metadata.json").is_file()


def test_bad_input_is_named(tmp_path, capsys, monkeypatch):
    src, split = make_input(tmp_path / "raw")
    out = tmp_path / "out"

    def fails(folder, *want):
        rc, _, err = run(["-i", folder, "-o", 106, "--output-root", out], capsys)
        assert rc == 1, err
        for w in want:
            assert w in err, (w, err)
        assert not out.exists() or not os.listdir(out)   # nothing written, no partial folder

    fails(str(tmp_path / "missing"), f"{tmp_path / 'missing'} does not exist", "nnUNetv2_semi_convert_")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    fails("123", f"no Dataset123_* folder in {tmp_path / 'raw'}")
    bad = shutil.copytree(src, tmp_path / "bad" / "Dataset990_Syn")
    os.remove(bad / "splits_semi.json")
    fails(str(bad), f"{bad / 'splits_semi.json'} does not exist", "not a dataset of this plugin",
          "nnUNetv2_semi_convert_hippocampus")
    shutil.copy(os.path.join(src, "splits_semi.json"), bad)
    os.rename(bad / "dataset.json", bad / "dataset.json.bak")
    fails(str(bad), f"{bad / 'dataset.json'} does not exist")
    os.rename(bad / "dataset.json.bak", bad / "dataset.json")
    os.remove(bad / "imagesTs" / f"{split.test[0]}_0000.nii.gz")
    fails(str(bad), f"lists test case '{split.test[0]}'", str(bad / "imagesTs"))
    shutil.copy(os.path.join(src, "imagesTs", f"{split.test[0]}_0000.nii.gz"), bad / "imagesTs")
    broken = bad / "imagesUnlabeled" / f"{split.unlabeled[0]}_0000.nii.gz"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])                    # a truncated .nii.gz
    fails(str(bad), f"case {split.unlabeled[0]}: {broken}: the compressed file is truncated or corrupt")
    # an image case named like the unchanged copies
    shutil.copy(src + f"/imagesUnlabeled/{split.unlabeled[0]}_0000.nii.gz", broken)
    rc, _, err = run(["-i", src, "-o", 106, "--output-root", out, "--source-suffix", "_0001"], capsys)
    assert rc == 2 and "--source-suffix" in err


# ------------------------------------------------------------------------------ real Hippocampus cases
@pytest.mark.skipif(not os.path.isdir(os.path.join(HIPPO, "images")),
                    reason=f"shared Hippocampus data not found at {HIPPO} (set NNUNET_SEMI_SHARED_DATA)")
def test_real_hippocampus_cases(tmp_path, capsys):
    from nnunet_semi.conversion import hippocampus
    raw = tmp_path / "raw"
    with pytest.raises(SystemExit) as exc:     # 3 real pairs read in place: 1 labeled, 1 unlabeled, 1 test (+ 118)
        hippocampus.main([str(a) for a in ("-i", HIPPO, "-o", raw, "--max-cases", 3, "--labeled", 1, "--num-test", 1,
                                           "--seed", 7)])
    assert exc.value.code == 0
    src = raw / "Dataset104_Hippocampus"
    split_in = SemiSplit.load(str(src))
    capsys.readouterr()
    rc, _, err = run(["-i", src, "-o", 106, "--output-root", raw], capsys)
    assert rc == 0, err
    folder = raw / "Dataset106_HippocampusShift"
    md = load_case_metadata(str(folder))
    assert {md.get(c)["origin_dataset"] for c in md.cases} == {"Hippocampus"}
    assert "hippocampus_118" in split_in.unlabeled and md.domain_of("hippocampus_118") == "shifted"
    assert not any(os.path.exists(folder / sub / "hippocampus_118.nii.gz") for sub in ("labelsTr", "labelsWithheld",
                                                                                       "labelsTs"))
    (t,) = split_in.test
    src_img, img = read(str(folder / "imagesTs" / f"{t}_src_0000.nii.gz")), read(str(folder / "imagesTs" / f"{t}_0000.nii.gz"))
    lab0, lab = folder / "labelsTs" / f"{t}_src.nii.gz", folder / "labelsTs" / f"{t}.nii.gz"
    assert src_img.GetSpacing() == (1.0, 1.0, 1.0) and img.GetSpacing() == (1.0, 1.0, 2.0)
    assert img.GetSize()[:2] == src_img.GetSize()[:2] and img.GetSize()[2] == round(src_img.GetSize()[2] / 2)
    assert read(str(lab)).GetSize() == img.GetSize()
    assert set(np.unique(arr(str(lab)))) == set(np.unique(arr(str(lab0)))) == {0, 1, 2}
    assert np.linalg.norm(foreground_centre_mm(str(lab)) - foreground_centre_mm(str(lab0))) < 1.0
    # measured: r = -0.82 +- 0.03 over the 42 test cases of the full dataset
    r = correlation_back(str(folder / "imagesTs" / f"{t}_src_0000.nii.gz"), str(folder / "imagesTs" / f"{t}_0000.nii.gz"))
    assert r < -0.6, r


# ------------------------------------------------------------------------------ the benchmark's --eval-domain
def _bench(raw, pre, out, **kw):
    from nnunet_semi.benchmark import Benchmark, BenchmarkSettings, DryRunExecutor
    settings = BenchmarkSettings(dataset="106", out=str(out), trainers=["SupervisedBaselineTrainer"], seeds=[0],
                                 epochs=1, iters=1, raw=str(raw), preprocessed=str(pre), **kw)
    return Benchmark(settings, executor=DryRunExecutor())


def test_eval_domain_selects_the_domains_cases(shifted, tmp_path, capsys):
    from nnunet_semi.benchmark import KEY_SETTINGS, BenchmarkError, aggregate, results_markdown
    src, split_in, folder, _, _ = shifted
    raw, pre, out = os.path.dirname(folder), tmp_path / "pre", tmp_path / "bench"
    pre.mkdir()
    (v,), (t,) = split_in.val, split_in.test
    assert _bench(raw, pre, out).select_cases() == sorted([v, t, v + "_src", t + "_src"])
    assert _bench(raw, pre, out, eval_domain="source").select_cases() == sorted([v + "_src", t + "_src"])
    assert _bench(raw, pre, out, eval_domain="shifted").select_cases() == sorted([v, t])
    assert _bench(raw, pre, out, eval_domain="target", eval_group="test").select_cases() == [t]
    # the dry run predicts and evaluates only those cases; the domain is in the settings and the announcement
    bench = _bench(raw, pre, out, eval_domain="target")
    capsys.readouterr()
    assert bench.run() is None and not out.exists()
    printed = capsys.readouterr().out
    assert "note: --eval-domain target: 2 of 4 held-out case(s) have domain 'shifted'" in printed
    assert "2 held-out case(s) (all, domain shifted)" in printed
    assert any(c[0] == "nnUNetv2_predict" for c in bench.executor.commands)
    d = bench.settings_dict()
    assert (d["eval_domain"], d["evaluated_domain"], d["evaluated_cases"]) == ("target", "shifted", sorted([v, t]))
    assert "eval_domain" in KEY_SETTINGS
    # a folder of another domain is not resumed
    out.mkdir()
    json.dump(_bench(raw, pre, out, eval_domain="source").settings_dict(), open(out / "settings.json", "w"))
    bench.select_cases()
    with pytest.raises(BenchmarkError, match=r"eval_domain: 'source' there, 'target' now"):
        bench.check_resume_settings()
    # the report's header names the domain
    from nnunet_semi.evaluation.evaluate import summarize
    metrics = dict(Dice=0.5, Jaccard=1 / 3, HD95_mm=1.0, HD95_vox=1.0, ASD_mm=0.5, ASD_vox=0.5, ASSD_mm=0.5,
                   ASSD_vox=0.5, TP=1, FP=0, FN=0, TN=0, n_pred=1, n_ref=1)
    per_case = [{"case": c, "metrics": {"1": dict(metrics)}} for c in bench.cases]
    summ = {"metric_per_case": per_case, **summarize(per_case, ["1"]), "settings": {"labels": ["1"]}}
    md = results_markdown(aggregate({"SupervisedBaselineTrainer": {0: summ}}, "SupervisedBaselineTrainer"), "t", d)
    assert "- held-out cases: 2 (all, domain shifted (--eval-domain target))" in md
    # errors name case_metadata.json
    with pytest.raises(BenchmarkError, match=r"no held-out case of domain 'scanner3' in .*case_metadata\.json"):
        _bench(raw, pre, out, eval_domain="scanner3").select_cases()
    os.remove(os.path.join(folder, "case_metadata.json"))
    with pytest.raises(BenchmarkError, match=r"needs the per-case domains of .*Dataset106_SynShift/case_metadata\.json"):
        _bench(raw, pre, out, eval_domain="target").select_cases()
