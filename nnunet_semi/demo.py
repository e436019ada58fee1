"""End-to-end demo: semi-supervised nnU-Net trainers against nnU-Net's supervised reference on CPU.

``nnUNetv2_semi_demo`` (or ``./demo.sh``, or ``python -m nnunet_semi.demo``) runs the whole job
through nnU-Net's own commands, in a work folder with its own nnUNet_raw/preprocessed/results:

1. data: a small synthetic 3D dataset generated on the spot (:func:`nnunet_semi.synthetic.make_synthetic_dataset`;
   no download), or MSD Hippocampus converted by the project's converter (``--hippocampus DIR``:
   a seeded subset of ``--max-cases`` image/label pairs, ``--labeled`` of them labeled, 20% held out).
   The synthetic default is the ``narrow_labeled`` setting: the labeled cases come from a narrow range of
   size and appearance (one "scanner"), the unlabeled and held-out cases from the full range, so the
   unlabeled images carry what the labeled ones lack (``--synthetic-setting iid``: every case alike, where
   supervised nnU-Net is already near-perfect);
2. nnUNetv2_plan_and_preprocess (3d_fullres only) and nnUNetv2_preprocess_unlabeled;
3. nnUNetv2_train for SupervisedBaselineTrainer (nnU-Net's trainer with the same budget) and the
   semi-supervised trainers (default MeanTeacherTrainer and CrossMatchTrainer when registered), all with
   the same epochs x iterations, seed and fold ``all``. The semi-supervised trainers' warm-up schedule is
   scaled to this short budget (:func:`schedule_env`: ``nnUNet_semi_warmup_iters`` and
   ``nnUNet_semi_rampup_iters`` a quarter of the iterations each, ``nnUNet_semi_warmup_pseudo_dice=none``);
   their class defaults (250 + 500 iterations, pseudo-Dice gate 0.5) would keep the unsupervised terms at 0
   for the whole demo;
4. nnUNetv2_predict of the held-out imagesTs from checkpoint_final.pth;
5. evaluation against labelsTs (Dice, Jaccard, HD95, ASD) with a table on screen and in results.md;
6. ``demo_overview.png``: slices of a few held-out cases (image, reference, each method's prediction)
   and a bar chart of Dice per method.

``--quick`` is a smoke test (tiny volumes, 2 trainers, 1 epoch x 2 iterations, no TTA; no warm-up, so the
unsupervised terms act from the first step): the numbers mean nothing, the pipeline is exercised end to
end. Re-running the same command in the same folder reuses what is finished (data, preprocessing, trained
models, predictions).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

#: default mode: synthetic data (narrow-range labeled, full-range unlabeled and held-out cases) and a budget
#: sized for a 2-core CPU
DEFAULT = dict(shape=(24, 24, 24), n_labeled=4, n_unlabeled=16, n_test=8, epochs=8, iters=12, disable_tta=False,
               setting="narrow_labeled")
#: --quick: a minute or two, for the tests
QUICK = dict(shape=(16, 16, 16), n_labeled=2, n_unlabeled=2, n_test=2, epochs=1, iters=2, disable_tta=True,
             setting="narrow_labeled")
#: --hippocampus: a seeded subset of the real data and the smaller _cpu configuration
HIPPOCAMPUS = dict(max_cases=40, labeled=4, epochs=5, iters=12, quick_max_cases=12)
SYNTHETIC_ID, SYNTHETIC_NAME = 991, "SemiDemo"
HIPPOCAMPUS_ID = 104
DEMO_SSL_TRAINERS = ("MeanTeacherTrainer", "CrossMatchTrainer")
QUICK_SSL_TRAINERS = ("MeanTeacherTrainer",)
SETTINGS_FILE = "demo_settings.json"
PICTURE = "demo_overview.png"


def schedule_env(epochs: int, iters: int) -> Dict[str, str]:
    """The semi-supervised trainers' warm-up schedule scaled to the demo's budget: supervised-only for the first
    quarter of the iterations (no pseudo-Dice gate, so the time is fixed), then a sigmoid ramp-up over the next
    quarter. The class defaults (250 + 500 iterations, gate 0.5) are sized for nnU-Net's 250000 iterations."""
    quarter = (int(epochs) * int(iters)) // 4
    return {"nnUNet_semi_warmup_iters": str(quarter), "nnUNet_semi_warmup_pseudo_dice": "none",
            "nnUNet_semi_rampup_iters": str(quarter)}


def summarize_synthetic(folder: str) -> List[str]:
    """One line per group (labeled / unlabeled / test) with the ranges of the cases' drawn parameters, from
    the ``synthetic_cases.json`` of a ``narrow_labeled`` dataset (empty if there is none)."""
    from nnunet_semi.synthetic import CASES_FILE
    path = os.path.join(folder, CASES_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        cases = json.load(f)["cases"]
    lines = []
    for group in ("labeled", "unlabeled", "test"):
        ps = [p for p in cases.values() if p["group"] == group]
        if not ps:
            continue

        def rng(values, fmt="{:.2f}"):
            return f"{fmt.format(min(values))}-{fmt.format(max(values))}"
        lines.append(f"{group} ({len(ps)}): semi-axes {rng([r for p in ps for r in p['radius']], '{:.1f}')} voxels, "
                     f"shell contrast {rng([p['shell_contrast'] for p in ps])} x background, "
                     f"noise {rng([p['noise'] for p in ps])}, bias field ±{rng([p['bias'] for p in ps])}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_semi_demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run semi-supervised nnU-Net trainers and nnU-Net's supervised reference end to end on CPU "
                    "(generate/convert, plan and preprocess, train with the same budget, predict the held-out cases, "
                    "evaluate, draw demo_overview.png).",
        epilog="examples:\n  nnUNetv2_semi_demo                       # synthetic data, about 4 min on 2 CPU cores\n"
               "  nnUNetv2_semi_demo --quick               # smoke test, a minute or two\n"
               "  nnUNetv2_semi_demo --hippocampus ../shared/data/hippocampus --labeled 4 --max-cases 40")
    p.add_argument("--out", default="./nnunet_semi_demo",
                   help="work folder (default ./nnunet_semi_demo); holds its own nnUNet_raw, nnUNet_preprocessed, "
                        "nnUNet_results, predictions, results.md and demo_overview.png")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test mode: 16^3 synthetic volumes (2 labeled, 2 unlabeled, 2 test) or a 12-case "
                        "Hippocampus subset, SupervisedBaselineTrainer + MeanTeacherTrainer, 1 epoch x 2 iterations, "
                        "no TTA")
    p.add_argument("--hippocampus", metavar="DIR", default=None,
                   help="use MSD Hippocampus from DIR (e.g. ../shared/data/hippocampus) via the project's converter "
                        "instead of synthetic data")
    p.add_argument("--synthetic-setting", dest="synthetic_setting", default=None, choices=("narrow_labeled", "iid"),
                   help="synthetic data: 'narrow_labeled' (default: labeled cases from a narrow range of size and "
                        "appearance, unlabeled and held-out cases from the full range) or 'iid' (every case alike)")
    p.add_argument("--labeled", type=int, default=None,
                   help=f"labeled cases (synthetic default {DEFAULT['n_labeled']}, hippocampus {HIPPOCAMPUS['labeled']})")
    p.add_argument("--max-cases", type=int, default=None,
                   help=f"hippocampus: seeded subset of image/label pairs (default {HIPPOCAMPUS['max_cases']}, --quick "
                        f"{HIPPOCAMPUS['quick_max_cases']}; 20%% held out, --labeled labeled, the rest unlabeled)")
    p.add_argument("-tr", "--trainers", nargs="+", default=None,
                   help="semi-supervised trainers to run besides SupervisedBaselineTrainer (default: "
                        "MeanTeacherTrainer and CrossMatchTrainer if registered; --quick: MeanTeacherTrainer)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trainer (overrides the mode's budget)")
    p.add_argument("--iters", type=int, default=None, help="iterations per epoch (overrides the mode's budget)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("--plans-config", dest="plans_config", action="store_true", default=None,
                   help="train the smaller <configuration>_cpu configuration (see benchmarks/README.md; default on "
                        "for --hippocampus, off for the synthetic data)")
    p.add_argument("--no-plans-config", dest="plans_config", action="store_false",
                   help="train the configuration as nnU-Net planned it")
    p.add_argument("--disable_tta", action="store_true", help="predict without mirroring (always off in --quick)")
    p.add_argument("--seed", type=int, default=0, help="training seed (nnUNet_semi_seed, default 0)")
    p.add_argument("-d", "--dataset-id", type=int, default=None,
                   help=f"dataset id (default {SYNTHETIC_ID} synthetic, {HIPPOCAMPUS_ID} hippocampus)")
    p.add_argument("--use-nnunet-paths", action="store_true",
                   help="use your nnUNet_raw / nnUNet_preprocessed / nnUNet_results instead of folders inside --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch: delete what an earlier demo wrote in --out (not allowed with "
                        "--use-nnunet-paths)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="training device (default cpu)")
    return p


# --------------------------------------------------------------------------------------------
# picture
# --------------------------------------------------------------------------------------------
def _read(path: str):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def draw_overview(raw_folder: str, cases: Sequence[str], predictions: Dict[str, str], agg: dict, output_file: str,
                  file_ending: str = ".nii.gz", max_cases: int = 3, title: str = "") -> str:
    """Slices of up to ``max_cases`` held-out cases (image, reference, each method's prediction overlaid)
    and a bar chart of Dice per method (classes and mean, ± std over cases)."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    from nnunet_semi.evaluation.evaluate import FOREGROUND
    methods = list(predictions)
    shown = list(cases)[:max_cases]
    ncols = 2 + len(methods)
    fig = plt.figure(figsize=(2.6 * max(ncols, 4), 2.6 * len(shown) + 3.6))
    gs = fig.add_gridspec(len(shown) + 1, ncols, height_ratios=[1] * len(shown) + [1.35])
    palette = ListedColormap(["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"])

    def overlay(ax, img, seg, name):
        ax.imshow(img, cmap="gray", vmin=np.percentile(img, 1), vmax=np.percentile(img, 99), interpolation="nearest")
        if seg is not None:
            masked = np.ma.masked_where(seg == 0, (seg.astype(int) - 1) % palette.N)
            ax.imshow(masked, cmap=palette, vmin=0, vmax=palette.N - 1, alpha=0.5, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])

    for r, case in enumerate(shown):
        ref = _read(os.path.join(raw_folder, "labelsTs", case + file_ending))
        img = _read(os.path.join(raw_folder, "imagesTs", f"{case}_0000{file_ending}"))
        if img.ndim == 4:
            img = img[..., 0]
        if ref.ndim == 2:
            ref, img = ref[None], img[None]
        z = int(np.argmax((ref > 0).reshape(ref.shape[0], -1).sum(1)))
        overlay(fig.add_subplot(gs[r, 0]), img[z], None, f"{case}\nimage (slice {z})")
        overlay(fig.add_subplot(gs[r, 1]), img[z], ref[z], "reference")
        for c, m in enumerate(methods):
            pred = _read(os.path.join(predictions[m], case + file_ending))
            if pred.ndim == 2:
                pred = pred[None]
            d = agg["values"][m][FOREGROUND]["Dice"]
            dice = [v for k, v in d.items() if k.endswith("/" + case)]
            overlay(fig.add_subplot(gs[r, 2 + c]), img[z], pred[z],
                    f"{m}\nDice {100 * dice[0]:.1f}%" if dice else m)

    ax = fig.add_subplot(gs[len(shown), :])
    keys = list(agg["label_keys"]) + [FOREGROUND]
    width = 0.8 / max(1, len(methods))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        means = [100 * agg["stats"][m][k]["Dice"]["mean"] for k in keys]
        stds = [100 * agg["stats"][m][k]["Dice"]["std"] for k in keys]
        x = np.arange(len(keys)) + (i - (len(methods) - 1) / 2) * width
        bars = ax.bar(x, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=3, label=m,
                      color=colors[i % len(colors)])
        for b, v in zip(bars, means):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, 1.5, f"{v:.1f}", ha="center", va="bottom", fontsize=7,
                        color="white" if v > 12 else "black", rotation=90)
    ax.set_xticks(np.arange(len(keys)), [agg["label_names"][k] for k in keys])
    ax.set_ylabel("Dice (%) on held-out cases")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Dice per method (mean ± std over held-out cases)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output_file, dpi=90)
    plt.close(fig)
    return output_file


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
class Stages:
    def __init__(self, total: int):
        self.total, self.i, self.times, self._t = total, 0, {}, None
        self._name = None

    def next(self, name: str) -> None:
        from nnunet_semi.benchmark import say
        self.close()
        self.i += 1
        self._name, self._t = name, time.time()
        say(f"== stage {self.i}/{self.total}: {name}")

    def close(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.time() - self._t, 1)
            self._name = None


def _demo_paths(args, out: str) -> Dict[str, str]:
    if args.use_nnunet_paths:
        missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
        if missing:
            raise SystemExit(f"error: --use-nnunet-paths needs {', '.join(missing)} to be set")
        return {v: os.path.abspath(os.environ[v]) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    return {"nnUNet_raw": os.path.join(out, "nnUNet_raw"), "nnUNet_preprocessed": os.path.join(out, "nnUNet_preprocessed"),
            "nnUNet_results": os.path.join(out, "nnUNet_results")}


def _clean(out: str) -> None:
    """Delete what a demo writes into its work folder (only those entries): its own files and the benchmark
    harness' (:func:`nnunet_semi.benchmark.benchmark_outputs`)."""
    from nnunet_semi.benchmark import benchmark_outputs
    own = [os.path.join(out, name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                                "demo_timings.json", SETTINGS_FILE, PICTURE)]
    for path in own + benchmark_outputs(out):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(args.out)
    quick = args.quick
    mode = "quick" if quick else ("hippocampus" if args.hippocampus else "default")
    base = dict(QUICK if quick else DEFAULT)
    if args.hippocampus and not quick:
        base.update(epochs=HIPPOCAMPUS["epochs"], iters=HIPPOCAMPUS["iters"])
    epochs = args.epochs or base["epochs"]
    iters = args.iters or base["iters"]
    disable_tta = args.disable_tta or base["disable_tta"]
    synthetic_setting = None if args.hippocampus else (args.synthetic_setting or base["setting"])
    schedule = schedule_env(epochs, iters)
    plans_config = args.plans_config if args.plans_config is not None else bool(args.hippocampus)
    max_cases = args.max_cases or (HIPPOCAMPUS["quick_max_cases"] if quick else HIPPOCAMPUS["max_cases"])
    dataset_id = args.dataset_id or (HIPPOCAMPUS_ID if args.hippocampus else SYNTHETIC_ID)
    if args.overwrite and args.use_nnunet_paths:
        print("error: --overwrite is not allowed with --use-nnunet-paths (delete the demo dataset yourself)",
              file=sys.stderr)
        return 2
    if args.hippocampus and not os.path.isdir(args.hippocampus):
        print(f"error: --hippocampus {args.hippocampus} is not a folder", file=sys.stderr)
        return 2

    paths = _demo_paths(args, out)
    os.environ.update(paths)  # before nnU-Net is imported in this process (it reads them at import time)
    from nnunet_semi.benchmark import (BASELINE, Benchmark, BenchmarkError, BenchmarkSettings, registered_trainers,
                                       reset_clock, results_table, say)
    from nnunet_semi.reporting import fmt_seconds
    reset_clock()

    registered = registered_trainers()
    if args.trainers:
        ssl = list(args.trainers)
    else:
        ssl = [t for t in (QUICK_SSL_TRAINERS if quick else DEMO_SSL_TRAINERS) if t in registered]
    trainers = [BASELINE] + [t for t in ssl if t != BASELINE]

    demo_settings = {"mode": mode, "hippocampus": os.path.abspath(args.hippocampus) if args.hippocampus else None,
                     "labeled": args.labeled, "max_cases": max_cases if args.hippocampus else None,
                     "dataset_id": dataset_id, "synthetic_setting": synthetic_setting, "schedule": schedule,
                     "configuration": args.configuration, "plans_config": plans_config, "epochs": epochs,
                     "iters": iters, "seed": args.seed, "disable_tta": disable_tta, "device": args.device,
                     "paths": paths}
    if args.overwrite:
        _clean(out)
    os.makedirs(out, exist_ok=True)
    sfile = os.path.join(out, SETTINGS_FILE)
    if os.path.isfile(sfile):
        with open(sfile) as f:
            old = json.load(f)
        if old != demo_settings:
            diff = [k for k in demo_settings if old.get(k) != demo_settings[k]]
            print(f"error: {out} holds a demo run with other settings ({', '.join(diff)}). Use another --out or add "
                  f"--overwrite to start over.", file=sys.stderr)
            return 2
        say(f"continuing the demo in {out} (finished steps are reused; --overwrite starts over)")
    with open(sfile, "w") as f:
        json.dump(demo_settings, f, indent=2)

    stages = Stages(5)
    say(f"nnunet-semi demo ({mode} mode): trainers {', '.join(trainers)}; {epochs} epochs x {iters} iterations "
        f"each on {args.device}; work folder {out}")
    say("warm-up schedule of the semi-supervised trainers, scaled to this budget: "
        + " ".join(f"{k}={v}" for k, v in schedule.items()))
    try:
        # 1. data ------------------------------------------------------------------------------
        stages.next("data")
        raw_root = paths["nnUNet_raw"]
        os.makedirs(raw_root, exist_ok=True)
        existing = [d for d in os.listdir(raw_root) if d.startswith(f"Dataset{dataset_id:03d}_")]
        if existing:
            say(f"reuse {os.path.join(raw_root, existing[0])}")
        elif args.hippocampus:
            from nnunet_semi.conversion.hippocampus import main as convert_hippocampus
            argv_conv = ["-i", args.hippocampus, "-o", raw_root, "-d", str(dataset_id),
                         "--labeled", str(args.labeled or HIPPOCAMPUS["labeled"]),
                         "--max-cases", str(max_cases)]
            say("convert: nnUNetv2_semi_convert_hippocampus " + " ".join(argv_conv))
            try:
                convert_hippocampus(argv_conv)
            except SystemExit as e:
                if e.code not in (0, None):
                    raise BenchmarkError(f"the Hippocampus conversion failed (exit code {e.code})") from None
        else:
            from nnunet_semi.synthetic import make_synthetic_dataset
            n_lab = args.labeled or base["n_labeled"]
            folder = make_synthetic_dataset(raw_root, dataset_id, SYNTHETIC_NAME, n_labeled=n_lab,
                                            n_unlabeled=base["n_unlabeled"], n_test=base["n_test"],
                                            shape=base["shape"], seed=args.seed, setting=synthetic_setting)
            say(f"generated {folder} (setting {synthetic_setting}): {n_lab} labeled, {base['n_unlabeled']} unlabeled "
                f"(labels withheld), {base['n_test']} held-out cases of {'x'.join(map(str, base['shape']))} voxels")
            for line in summarize_synthetic(folder):
                say("  " + line)

        settings = BenchmarkSettings(
            dataset=str(dataset_id), out=out, configuration=args.configuration, trainers=trainers, seeds=[args.seed],
            epochs=epochs, iters=iters, val_iters=1 if quick else None, device=args.device, disable_tta=disable_tta,
            plans_config=plans_config, verify_integrity=not quick, raw=paths["nnUNet_raw"],
            preprocessed=paths["nnUNet_preprocessed"], results_template=paths["nnUNet_results"])
        # the harness with the demo's warm-up schedule in its trainings' environment (the benchmark itself keeps
        # the trainers' class defaults)
        bench = Benchmark(settings, train_env=schedule)

        def on_stage(stage: str, bench: Benchmark) -> None:
            if stage == "preprocess":   # 2. + 3. labeled, then unlabeled preprocessing
                stages.next("plan and preprocess (labeled with nnU-Net, then the unlabeled images)")
            elif stage == "runs":       # 4. train + predict
                stages.next(f"train {len(trainers)} trainer(s) with the same budget and predict the "
                            f"{len(bench.cases)} held-out case(s) from checkpoint_final")
            elif stage == "report":     # 5. evaluate
                stages.next("evaluate against labelsTs")

        agg = bench.run(on_stage=on_stage)
        print()
        print(f"Held-out Dice / Jaccard / HD95 / ASD per method ({len(bench.cases)} cases, mean ± std over cases):")
        print(results_table(agg, classes=True))
        if agg["paired"]:
            from nnunet_semi.evaluation.evaluate import FOREGROUND
            for m, per in agg["paired"].items():
                d = per[FOREGROUND]["Dice"]
                print(f"  {m} − {BASELINE}: ΔDice {100 * d['mean_diff']:+.2f} points "
                      f"(better on {d['wins']}, worse on {d['losses']} of {d['n']} cases)")
        if quick:
            print("  (--quick: a 2-iteration smoke test; these numbers say nothing about the methods)")
        print()

        # 6. picture ---------------------------------------------------------------------------
        stages.next("picture")
        preds = {t: bench.pred_dir(t, args.seed) for t in trainers if t in agg["methods"]}
        picture = draw_overview(bench.raw_folder, bench.cases, preds, agg, os.path.join(out, PICTURE),
                                bench.file_ending, title=f"{bench.dataset_name}"
                                                         f"{f' ({synthetic_setting})' if synthetic_setting else ''}: "
                                                         f"{epochs} epochs x {iters} iterations "
                                                         f"per method, {args.configuration}"
                                                         f"{'_cpu' if plans_config else ''}, seed {args.seed}")
        stages.close()
    except BenchmarkError as e:
        stages.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue", file=sys.stderr)
        return 130
    total = time.time() - t_start
    timing = {"stages_s": stages.times, "total_s": round(total, 1)}
    with open(os.path.join(out, "demo_timings.json"), "w") as f:
        json.dump(timing, f, indent=2)
    say("stage times: " + ", ".join(f"{k.split(' (')[0]} {fmt_seconds(v)}" for k, v in stages.times.items()))
    say(f"done in {fmt_seconds(total)}. Results: {os.path.join(out, 'results.md')}; picture: {picture}; "
        f"training curves: {os.path.join(out, 'benchmark.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
