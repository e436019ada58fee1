"""The demo's default data setting and training schedule (fast, CPU, no training).

- ``make_synthetic_dataset(setting="narrow_labeled")``: the labeled cases lie in a narrow range of size,
  contrast, noise and bias field, the unlabeled and held-out cases span the full range. Checked on
  statistics measured from the written images and labels, not on the generator's own parameters.
- The generator is deterministic for a seed, and its default ("iid") is the old generator, case for case.
- The demo passes its warm-up schedule (nnUNet_semi_warmup_iters / _warmup_pseudo_dice / _rampup_iters,
  scaled to its budget) to its trainings; the benchmark harness itself does not.
"""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_semi.layout import IMAGES_TR, IMAGES_TS, IMAGES_UNLABELED, LABELS_TR, LABELS_TS, LABELS_WITHHELD
from nnunet_semi.synthetic import CASES_FILE, FULL, NARROW, make_synthetic_dataset, synthetic_case

SHAPE = (24, 24, 24)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float64)


def _cases(folder, images, labels):
    d = os.path.join(folder, images)
    for f in sorted(os.listdir(d)):
        case = f[: -len("_0000.nii.gz")]
        yield case, _read(os.path.join(d, f)), _read(os.path.join(folder, labels, case + ".nii.gz")).astype(int)


def measure(img, seg):
    """Statistics of one case, measured from its image and label only:

    - ``fg_fraction``: share of voxels with a label > 0; ``extent``: largest bounding-box side of the label (voxels)
    - ``contrast``: median shell intensity / median background intensity - 1
    - ``noise``: background noise sd (from differences of neighbouring background voxels) / median background
    - ``bias``: largest relative deviation of a linear fit of the background intensities over the image
    """
    fg = seg > 0
    idx = np.argwhere(fg)
    extent = int((idx.max(0) - idx.min(0) + 1).max())
    bg = ~fg
    bg_level = float(np.median(img[bg]))
    contrast = float(np.median(img[seg == 1])) / bg_level - 1
    pair = bg[:, :, 1:] & bg[:, :, :-1]
    noise = float(np.std((img[:, :, 1:] - img[:, :, :-1])[pair]) / np.sqrt(2)) / bg_level
    coords = np.argwhere(bg).astype(np.float64)
    design = np.c_[np.ones(len(coords)), coords]
    coef, *_ = np.linalg.lstsq(design, img[bg], rcond=None)
    corners = np.array([[1, z, y, x] for z in (0, SHAPE[0] - 1) for y in (0, SHAPE[1] - 1) for x in (0, SHAPE[2] - 1)])
    mean_fit = design.mean(0) @ coef
    bias = float(np.abs(corners @ coef - mean_fit).max() / mean_fit)
    return {"fg_fraction": float(fg.mean()), "extent": extent, "contrast": contrast, "noise": noise, "bias": bias}


@pytest.fixture(scope="module")
def narrow_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    folder = make_synthetic_dataset(root, 991, "SemiDemo", n_labeled=6, n_unlabeled=16, n_test=8, shape=SHAPE, seed=0,
                                    setting="narrow_labeled")
    groups = {"labeled": list(_cases(folder, IMAGES_TR, LABELS_TR)),
              "unlabeled": list(_cases(folder, IMAGES_UNLABELED, LABELS_WITHHELD)),
              "test": list(_cases(folder, IMAGES_TS, LABELS_TS))}
    stats = {g: {c: measure(img, seg) for c, img, seg in cases} for g, cases in groups.items()}
    return folder, groups, stats


def test_narrow_range_lies_inside_the_full_range():
    for name in ("radius", "center", "shell_contrast", "core_level", "noise", "bias"):
        (nlo, nhi), (flo, fhi) = getattr(NARROW, name), getattr(FULL, name)
        assert flo <= nlo <= nhi <= fhi, name
        assert fhi - flo > nhi - nlo, name   # the full range is wider in every respect


def test_labeled_cases_are_narrow_unlabeled_and_test_span_the_full_range(narrow_dataset):
    folder, groups, stats = narrow_dataset
    assert [len(groups[g]) for g in ("labeled", "unlabeled", "test")] == [6, 16, 8]
    lab = stats["labeled"].values()
    rest = [s for g in ("unlabeled", "test") for s in stats[g].values()]
    # labeled: small objects, high contrast, little noise, (almost) no bias field
    assert max(s["fg_fraction"] for s in lab) < 0.04
    assert max(s["extent"] for s in lab) <= 11
    assert min(s["contrast"] for s in lab) > 2.3
    assert max(s["noise"] for s in lab) < 0.15
    assert max(s["bias"] for s in lab) < 0.1
    # unlabeled and test: the full range, well beyond the labeled cases in each respect, in both groups
    for g in ("unlabeled", "test"):
        st = list(stats[g].values())
        assert max(s["fg_fraction"] for s in st) > 2 * max(s["fg_fraction"] for s in lab), g
        assert max(s["extent"] for s in st) >= 14, g
        assert min(s["contrast"] for s in st) < 1.8, g
        assert max(s["noise"] for s in st) > 0.2, g
        assert max(s["bias"] for s in st) > 0.25, g
    # ... and they still cover the labeled range (small objects, high contrast occur there too)
    assert min(s["fg_fraction"] for s in rest) < 0.04
    assert max(s["contrast"] for s in rest) > 2.3
    # and at least half of them lie outside the labeled range in some respect
    outside = [s for s in rest if s["fg_fraction"] >= 0.04 or s["contrast"] <= 2.3 or s["noise"] >= 0.15
               or s["bias"] >= 0.1]
    assert len(outside) >= len(rest) / 2
    # the recorded parameters say the same
    params = json.load(open(os.path.join(folder, CASES_FILE)))
    assert params["setting"] == "narrow_labeled" and params["seed"] == 0
    for case, p in params["cases"].items():
        r = NARROW if p["group"] == "labeled" else FULL
        assert r.noise[0] <= p["noise"] <= r.noise[1] and r.bias[0] <= p["bias"] <= r.bias[1], case
        assert case in stats[p["group"]]
    split = json.load(open(os.path.join(folder, "splits_semi.json")))
    assert sorted(split["labeled"]) == sorted(stats["labeled"]) and sorted(split["test"]) == sorted(stats["test"])


def test_every_case_is_segmentable(narrow_dataset):
    """Each case has both classes, the core inside the shell, and a measurable contrast against the noise."""
    _, groups, stats = narrow_dataset
    for g, cases in groups.items():
        for case, img, seg in cases:
            assert (seg == 1).sum() > 20 and (seg == 2).sum() > 5, case
            s = stats[g][case]
            assert s["contrast"] / s["noise"] > 2, (case, s)


def _arrays(folder):
    out = {}
    for sub in (IMAGES_TR, LABELS_TR, IMAGES_UNLABELED, LABELS_WITHHELD, IMAGES_TS, LABELS_TS):
        for f in sorted(os.listdir(os.path.join(folder, sub))):
            out[f"{sub}/{f}"] = _read(os.path.join(folder, sub, f))
    return out


def test_generator_is_deterministic_for_a_seed(tmp_path):
    kw = dict(n_labeled=2, n_unlabeled=3, n_test=2, shape=(16, 16, 16), setting="narrow_labeled")
    a = make_synthetic_dataset(str(tmp_path / "a"), 991, "X", seed=3, **kw)
    b = make_synthetic_dataset(str(tmp_path / "b"), 991, "X", seed=3, **kw)
    c = make_synthetic_dataset(str(tmp_path / "c"), 991, "X", seed=4, **kw)
    A, B, C = _arrays(a), _arrays(b), _arrays(c)
    assert A.keys() == B.keys() == C.keys()
    assert all(np.array_equal(A[k], B[k]) for k in A)
    assert not all(np.array_equal(A[k], C[k]) for k in A)
    assert open(os.path.join(a, CASES_FILE)).read() == open(os.path.join(b, CASES_FILE)).read()


def test_default_setting_is_the_old_generator(tmp_path):
    folder = make_synthetic_dataset(str(tmp_path), 990, "X", n_labeled=2, n_unlabeled=1, n_test=1, shape=(12, 12, 12),
                                    seed=5)
    assert not os.path.exists(os.path.join(folder, CASES_FILE))
    rng = np.random.default_rng(5)
    for i, (sub, name) in enumerate([(IMAGES_TR, "case_000_0000"), (IMAGES_TR, "case_001_0000"),
                                     (IMAGES_UNLABELED, "case_002_0000"), (IMAGES_TS, "case_003_0000")]):
        img, _ = synthetic_case(rng, (12, 12, 12))
        assert np.allclose(_read(os.path.join(folder, sub, name + ".nii.gz")), img), name
    with pytest.raises(ValueError, match="unknown synthetic setting"):
        make_synthetic_dataset(str(tmp_path), 990, "Y", setting="wide")


# ------------------------------------------------------------------------------ the demo's schedule
def test_schedule_env_is_scaled_to_the_budget_and_parsed_by_the_trainers(monkeypatch):
    from nnunet_semi.demo import DEFAULT, QUICK, schedule_env
    from nnunet_semi.training.budget import apply_schedule_overrides
    env = schedule_env(DEFAULT["epochs"], DEFAULT["iters"])
    total = DEFAULT["epochs"] * DEFAULT["iters"]
    assert env == {"nnUNet_semi_warmup_iters": str(total // 4), "nnUNet_semi_warmup_pseudo_dice": "none",
                   "nnUNet_semi_rampup_iters": str(total // 4)}
    assert int(env["nnUNet_semi_warmup_iters"]) + int(env["nnUNet_semi_rampup_iters"]) < total
    assert schedule_env(QUICK["epochs"], QUICK["iters"])["nnUNet_semi_warmup_iters"] == "0"

    class Trainer:   # the attributes the semi-supervised trainers' defaults would hold
        warmup_iters, warmup_pseudo_dice, rampup_iters = 250, 0.5, 500
        logged = []

        def print_to_log_file(self, *a):
            self.logged.append(" ".join(map(str, a)))

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = Trainer()
    assert apply_schedule_overrides(t) == {"warmup_iters": total // 4, "warmup_pseudo_dice": None,
                                           "rampup_iters": total // 4}
    assert (t.warmup_iters, t.warmup_pseudo_dice, t.rampup_iters) == (total // 4, None, total // 4)


def test_demo_passes_the_schedule_to_its_trainings(tmp_path, monkeypatch, capsys):
    """The demo's own main(), up to the trainings: the environment of each nnUNetv2_train has the schedule
    variables (and settings.json records them); the benchmark harness' own budget has none of them."""
    from nnunet_semi import benchmark
    from nnunet_semi.demo import main, schedule_env
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(tmp_path / "unused"))   # main() sets them; restored after the test
    for k in ("nnUNet_semi_warmup_iters", "nnUNet_semi_warmup_pseudo_dice", "nnUNet_semi_rampup_iters"):
        monkeypatch.delenv(k, raising=False)
    seen = {}

    def fake_run_all(self):
        for t in self.s.trainers:
            seen[t] = (self.env(0, trainer_env=True), self.echo_env(0, trainer_env=True))
        raise benchmark.BenchmarkError("stop after recording the training environment")

    monkeypatch.setattr(benchmark.Benchmark, "ensure_preprocessed", lambda self: None)
    monkeypatch.setattr(benchmark.Benchmark, "run_all", fake_run_all)
    out = tmp_path / "demo"
    rc = main(["--out", str(out), "--epochs", "4", "--iters", "10", "-tr", "MeanTeacherTrainer"])
    assert rc == 1 and "stop after recording" in capsys.readouterr().err
    want = schedule_env(4, 10)
    assert want == {"nnUNet_semi_warmup_iters": "10", "nnUNet_semi_warmup_pseudo_dice": "none",
                    "nnUNet_semi_rampup_iters": "10"}
    assert sorted(seen) == ["MeanTeacherTrainer", "SupervisedBaselineTrainer"]
    for trainer, (env, echo) in seen.items():
        assert {k: env[k] for k in want} == want, trainer
        assert {k: echo[k] for k in want} == want, trainer   # printed in front of the command
        assert env["nnUNet_semi_epochs"] == "4" and env["nnUNet_semi_iters"] == "10"
    settings = json.load(open(out / "settings.json"))
    assert {k: settings["budget_env"][k] for k in want} == want
    demo_settings = json.load(open(out / "demo_settings.json"))
    assert demo_settings["schedule"] == want and demo_settings["synthetic_setting"] == "narrow_labeled"
    raw = out / "nnUNet_raw" / "Dataset991_SemiDemo"
    assert (raw / CASES_FILE).is_file()

    # the benchmark harness keeps the trainers' class defaults
    s = benchmark.BenchmarkSettings(dataset="991", out=str(tmp_path / "bench"), trainers=["MeanTeacherTrainer"],
                                    raw=str(out / "nnUNet_raw"), preprocessed=str(tmp_path / "pre"))
    plain = benchmark.Benchmark(s)
    assert not set(want) & set(plain.budget_env(0)) and not set(want) & set(plain.env(0, trainer_env=True))
