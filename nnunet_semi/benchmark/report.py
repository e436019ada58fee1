"""The benchmark report: ``results.md`` (metrics per method and class, seed-level means, the paired comparison
against the baseline, the runs) and ``benchmark.png`` (held-out Dice per case, training curves). Which logged
terms are ratios or thresholds, or on a scale of their own, is declared once in
:mod:`nnunet_semi.training.progress` (``axis_of``), which draws progress.png too."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Optional

import numpy as np

from nnunet_semi.benchmark.aggregate import (PSEUDO_DICE_MILESTONE, TARGET_MEAN_GAIN, TARGET_SEEDS, TARGET_WORST_SEED,
                                             aggregate, curve_milestones)
from nnunet_semi.benchmark.commands import BenchmarkError, say
from nnunet_semi.benchmark.settings import CHECKPOINT
from nnunet_semi.benchmark.trainers import BASELINE, split_arm
from nnunet_semi.evaluation.evaluate import FOREGROUND, save_json
from nnunet_semi.reporting import fmt_seconds, format_difference, format_mean_std, format_p, markdown_rows
from nnunet_semi.training.progress import NNUNET_KEYS, axis_of
from nnunet_semi.training.progress_file import RECORD_KEYS

#: the metrics table's columns after Method and Class: (metric, scale)
PLOT_FILE = "benchmark.png"
TABLE_METRICS = (("Dice", 100), ("Jaccard", 100), ("HD95_mm", 1), ("ASD_mm", 1), ("HD95_vox", 1), ("ASD_vox", 1))


def _row_name(agg: dict, key: str) -> str:
    return agg["label_names"][key] if key == FOREGROUND else f"{agg['label_names'][key]} ({key})"


def results_table(agg: dict, classes: bool = True, digits: int = 2) -> str:
    """| Method | Class | Dice (%) | Jaccard (%) | 95HD (mm) | ASD (mm) | 95HD (voxel) | ASD (voxel) | n |;
    ``mean ± std`` over seeds x cases; per class (if ``classes``) and the Mean row."""
    header = ["Method", "Class", "Dice (%)", "Jaccard (%)", "95HD (mm)", "ASD (mm)", "95HD (voxel)", "ASD (voxel)", "n"]
    keys = (list(agg["label_keys"]) if classes else []) + [FOREGROUND]
    rows = []
    for m in agg["methods"]:
        for key in keys:
            st = agg["stats"][m][key]
            rows.append([m, _row_name(agg, key)] + [format_mean_std(st[metric], scale, digits)
                                                   for metric, scale in TABLE_METRICS] + [str(st["Dice"]["n"])])
    return markdown_rows(header, rows) + "\n"


def results_markdown(agg: dict, title: str, settings: Optional[dict] = None, digits: int = 2) -> str:
    out = [f"# Benchmark: {title}", ""]
    if settings:
        domain = (f", domain {settings.get('evaluated_domain')} (--eval-domain {settings.get('eval_domain')})"
                  if settings.get("eval_domain") is not None else "")
        out += [f"- held-out cases: {settings.get('n_evaluated_cases')} ({settings.get('eval_group')}{domain}), "
                f"predicted from "
                f"`{CHECKPOINT}` with nnUNetv2_predict (TTA {'off' if settings.get('disable_tta') else 'on'}, step size "
                f"{settings.get('step_size')})",
                f"- budget per arm: {settings.get('epochs')} epochs x {settings.get('iters')} iterations = "
                f"{settings.get('iterations_total')} iterations (nnUNet_semi_* variables), device "
                f"{settings.get('device')}, fold {settings.get('fold')}",
                f"- git commit {settings.get('git_commit')}; machine: {settings.get('machine', {}).get('cpu_count')} CPUs, "
                f"torch {settings.get('machine', {}).get('torch')}",
                ""]
        if settings.get("plans_config_change"):
            ch = settings["plans_config_change"]
            out += [f"- configuration `{ch['name']}` inherits from `{ch['inherits_from']}`: " + "; ".join(
                f"`{k}` {v['from']} → {v['to']}" for k, v in ch["changes"].items()), ""]
    out += ["## Metrics (mean ± std over seeds × held-out cases)", "", results_table(agg, True, digits)]
    notes = ["Dice/Jaccard in %; distances in mm (image spacing) and in voxels (as the SSL papers report); ASD = "
             "prediction → reference surface. Mean row: classes averaged within each case first. n = number of "
             "(seed, case) values."]
    for m in agg["methods"]:
        for key, e in agg["empty_counts"][m].items():
            if any(e.values()):
                notes.append(f"{m}, {agg['label_names'][key]}: {e['n_empty_pred']} empty prediction(s), "
                             f"{e['n_empty_ref']} empty reference(s), {e['n_both_empty']} both empty (distances "
                             f"left out).")
    out += notes + [""]
    seeds = sorted({s for m in agg["methods"] for s in agg["seeds"][m]})
    out += ["## Seed-level mean Dice (%)", "",
            "Mean over the held-out cases per seed; last column mean ± std over seeds (the run-to-run spread).", ""]
    rows = []
    for m in agg["methods"]:
        per = agg["seed_level"][m]["per_seed"]
        row = [m] + [(f"{100 * per[s]['Dice']:.{digits}f}" if s in per and math.isfinite(per[s]["Dice"]) else "–")
                     for s in seeds]
        row.append(format_mean_std(agg["seed_level"][m]["over_seeds"]["Dice"], 100, digits))
        rows.append(row)
    out += [markdown_rows(["Method"] + [f"seed {s}" for s in seeds] + ["over seeds"], rows), ""]
    if agg["paired"]:
        base = agg["baseline"]
        out += [f"## Paired comparison against {base} (method − {base}, per seed and case)", "",
                "Same seed and case in both arms. p: two-sided Wilcoxon signed-rank test over the pairs (n ≥ 5; pairs "
                "of one case under different seeds are not independent, so read p as a rough guide). W/T/L: pairs "
                "where the method is better / equal / worse.", ""]
        header = ["Method", "Class", "n", "ΔDice (%)", "p (Dice)", "W/T/L (Dice)", "Δ95HD (mm)", "p (95HD)",
                  "ΔASD (mm)"]
        rows = []
        for m, per_key in agg["paired"].items():
            for key in list(agg["label_keys"]) + [FOREGROUND]:
                d, h, a = per_key[key]["Dice"], per_key[key]["HD95_mm"], per_key[key]["ASD_mm"]
                rows.append([m, _row_name(agg, key), str(d["n"]), format_difference(d, 100, digits),
                             format_p(d["p_value"]), f"{d['wins']}/{d['ties']}/{d['losses']}",
                             format_difference(h, 1, digits), format_p(h["p_value"]), format_difference(a, 1, digits)])
        out += [markdown_rows(header, rows), ""]
        out += per_seed_markdown(agg, digits)
    runs = agg.get("runs") or {}
    if runs:
        out += ["## Runs", "",
                f"Pseudo Dice: nnU-Net's per-epoch Dice on patches of its validation split (with fold 'all': the "
                f"labeled training cases), never the held-out cases; 'from epoch' = the first epoch at which it reached "
                f"{PSEUDO_DICE_MILESTONE:g} (a late epoch means a run stayed long in the all-background phase).", ""]
        header = ["Method", "seed", "train time", "predict time", "resumed",
                  f"pseudo Dice ≥ {PSEUDO_DICE_MILESTONE:g} from epoch", "last pseudo Dice"]
        order = {m: i for i, m in enumerate(agg["methods"])}
        seeds_of = agg["seeds"]
        shown = [r for r in runs.values() if r["trainer"] in order and r["seed"] in seeds_of[r["trainer"]]]
        rows = [[rec["trainer"], str(rec["seed"]),
                 fmt_seconds(rec["train_s"]) if "train_s" in rec else
                 (f"{split_arm(rec['trainer'])[0]}'s" if split_arm(rec["trainer"])[1] is not None else "–"),
                 fmt_seconds(rec["predict_s"]) if "predict_s" in rec else "–",
                 "yes" if rec.get("resumed") else "no",
                 str(rec["pseudo_dice_first_epoch"]) if rec.get("pseudo_dice_first_epoch") else "–",
                 format(rec["pseudo_dice_last"], ".3f") if rec.get("pseudo_dice_last") is not None else "–"]
                for rec in sorted(shown, key=lambda r: (order[r["trainer"]], r["seed"]))]
        out += [markdown_rows(header, rows), ""]
    if agg.get("missing_runs"):
        out += [f"Missing (not finished, not in the tables): {', '.join(agg['missing_runs'])}", ""]
    return "\n".join(out)


def per_seed_markdown(agg: dict, digits: int = 2) -> List[str]:
    """The per-seed comparison (:func:`~nnunet_semi.benchmark.aggregate.per_seed_comparison`): each seed's mean
    Dice of both arms, their paired difference over that seed's cases, and the target verdict per method."""
    comp = agg.get("per_seed_paired") or {}
    if not comp:
        return []
    base = agg["baseline"]
    out = [f"## Per seed against {base}", "",
           f"Mean Dice (%) of each seed's run, and the method's paired difference from {base}'s run of the same seed "
           f"over that seed's cases (W/L: cases better / worse; p: Wilcoxon). Target: the mean of the per-seed "
           f"differences over {TARGET_SEEDS} seeds at least +{TARGET_MEAN_GAIN:g} points, and no seed below "
           f"{TARGET_WORST_SEED:+g}.", ""]
    runs = agg.get("runs") or {}
    rows = []
    for m, c in comp.items():
        for seed, d in c["per_seed"].items():
            b, x = agg["seed_level"][base]["per_seed"][seed]["Dice"], agg["seed_level"][m]["per_seed"][seed]["Dice"]
            env = environment_difference(runs.get(f"{split_arm(base)[0]}/seed_{seed}", {}),
                                         runs.get(f"{split_arm(m)[0]}/seed_{seed}", {}))
            rows.append([m, str(seed), f"{100 * b:.{digits}f}", f"{100 * x:.{digits}f}",
                         f"{100 * d['mean_diff']:+.{digits}f}", f"{d['wins']}/{d['losses']}", format_p(d["p_value"]),
                         env])
        if c["per_seed"]:
            rows.append([m, "mean", "", "", f"{c['mean_gain_points']:+.{digits}f}",
                         f"worst seed {c['worst_seed_points']:+.{digits}f}", f"target: {c['target']}", ""])
    return out + [markdown_rows(["Method", "seed", base, "method", "ΔDice", "W/L", "p", "trained in"], rows), ""]


def environment_difference(a: Mapping, b: Mapping) -> str:
    """How the training environments of two runs (``runs.json`` records, ``environments``) compare: ``'same
    environment'``, what differs (``'differs: torch 2.14.1 / 2.15.0'``; a run resumed elsewhere has several), or
    ``'not recorded'`` for runs of harness versions that did not record it."""
    ea, eb = a.get("environments"), b.get("environments")
    if not ea or not eb:
        return "not recorded"
    if ea == eb and len(ea) == 1:
        return "same environment"
    if len(ea) > 1 or len(eb) > 1:
        return "differs: resumed in another environment"
    keys = [k for k in dict.fromkeys(list(ea[0]) + list(eb[0])) if ea[0].get(k) != eb[0].get(k)]
    return "differs: " + "; ".join(f"{k} {ea[0].get(k)} / {eb[0].get(k)}" for k in keys)


def write_report(bench, reevaluate: bool = False) -> dict:
    """The report of a benchmark folder (``bench``: :class:`~nnunet_semi.benchmark.orchestration.Benchmark`):
    evaluates every finished run it covers (cached), aggregates, and writes ``results.md``, ``results.json`` and
    ``benchmark.png``. Returns the aggregate with ``markdown``, ``curves`` and ``report_files`` added."""
    s = bench.s
    trainers, seeds = bench.report_scope()
    say(f"evaluate: trainers {', '.join(trainers)}; seeds {seeds} (every run recorded in this folder)")
    summaries: Dict[str, Dict[int, dict]] = {}
    curves: Dict[str, Dict[int, dict]] = {}
    missing = []
    for trainer in trainers:
        for seed in seeds:
            summ = bench.evaluate(trainer, seed, force=reevaluate)
            if summ is None:
                missing.append(f"{trainer}/seed {seed}")
                continue
            summaries.setdefault(trainer, {})[seed] = summ
            c = bench.save_curves(trainer, seed)
            if c:
                curves.setdefault(trainer, {})[seed] = c
    if not summaries:
        raise BenchmarkError(f"no finished run to report in {s.out}" + (f" (missing: {missing})" if missing else ""))
    runs = bench.run_records()
    agg = aggregate(summaries, baseline=BASELINE if BASELINE in summaries else next(iter(summaries)))
    agg["missing_runs"] = missing
    for trainer, per_seed in curves.items():
        for seed, c in per_seed.items():
            key = f"{trainer}/seed_{seed}"
            runs[key] = {"trainer": trainer, "seed": seed, **runs.get(key, {}), **curve_milestones(c)}
    agg["runs"] = runs
    title = (f"{bench.dataset_name}, configuration {s.effective_configuration}, fold {s.fold}, "
             f"{s.epochs} epochs x {s.iters} iterations, seeds {seeds}")
    if s.empty_policy != "default":
        title += f", empty-mask policy '{s.empty_policy}'"
    md_file, json_file, plot_file, settings_file = files = bench.report_files()
    md = results_markdown(agg, title, bench.settings_dict())
    with open(md_file, "w") as f:
        f.write(md)
    save_json(agg, json_file)
    plot_benchmark(agg, curves, plot_file, title)
    agg["markdown"] = md
    agg["curves"] = curves
    agg["report_files"] = files
    say(f"wrote {md_file}, " + ", ".join(os.path.basename(f) for f in (json_file, plot_file, settings_file)))
    return agg


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot_benchmark(agg: dict, curves: Mapping[str, Mapping[int, dict]], output_file: str, title: str = "") -> None:
    """Per-method Dice spread (box + points per seed and case) and the training curves of each run."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    methods = agg["methods"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {m: colors[i % len(colors)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    ax = axes[0, 0]
    data, seeds_of = [], []
    for m in methods:
        d = agg["values"][m][FOREGROUND]["Dice"]
        keys = [k for k in d if math.isfinite(d[k])]
        data.append([100 * d[k] for k in keys])
        seeds_of.append([k.split("/")[0] for k in keys])
    ax.boxplot([x if x else [float("nan")] for x in data], showfliers=False)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=15, fontsize=8)
    all_seeds = sorted({s for ss in seeds_of for s in ss})
    markers = "o^sDvP*X"
    rng = np.random.default_rng(0)
    for i, (vals, ss) in enumerate(zip(data, seeds_of)):
        for j, sd in enumerate(all_seeds):
            y = [v for v, s in zip(vals, ss) if s == sd]
            x = i + 1 + rng.uniform(-0.15, 0.15, len(y))
            ax.scatter(x, y, s=16, alpha=0.75, color=color[methods[i]], marker=markers[j % len(markers)])
    ax.set_ylabel("Dice (%), mean over classes per case")
    ax.set_title("held-out Dice per case (box: all seeds x cases; marker: seed)")
    if all_seeds:
        from matplotlib.lines import Line2D
        ax.legend(handles=[Line2D([], [], ls="", marker=markers[j % len(markers)], color="0.4",
                                  label=sd.replace("_", " ")) for j, sd in enumerate(all_seeds)],
                  fontsize=7, loc="best")

    def draw(ax, key_filter, ylabel, panel_title):
        any_line = False
        styles = ["-", "--", ":", "-."]
        style_of: Dict[str, str] = {}
        for m in methods:
            for k, (seed, c) in enumerate(sorted(curves.get(m, {}).items())):
                for key in [x for x in c if key_filter(x)]:
                    y = np.asarray(c[key], dtype=float)
                    if y.ndim != 1 or not np.isfinite(y).any():
                        continue
                    ls = style_of.setdefault(key, styles[len(style_of) % len(styles)])
                    ax.plot(np.arange(1, len(y) + 1), y, color=color[m], ls=ls, alpha=0.85 if k == 0 else 0.45,
                            label=f"{m}: {key}" if k == 0 else None, linewidth=1.4,
                            marker="o" if len(y) <= 25 else None, markersize=3)
                    any_line = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        if any_line:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)

    draw(axes[0, 1], lambda k: k == "train_losses", "train loss", "training loss (total; SSL terms included)")
    draw(axes[0, 2], lambda k: k in ("mean_fg_dice", "ema_fg_dice"), "pseudo Dice",
         "pseudo Dice (nnU-Net's per-epoch validation patches)")
    draw(axes[1, 0], lambda k: k == "val_losses", "validation loss", "validation loss (nnU-Net)")
    draw(axes[1, 1], lambda k: k not in NNUNET_KEYS and k not in RECORD_KEYS and axis_of(k) == "loss",
         "loss term", "semi-supervised loss terms")
    draw(axes[1, 2], lambda k: k not in RECORD_KEYS and axis_of(k) == "ratio", "value in [0, 1]",
         "pseudo-label confidence / mask ratio / ramp-up / threshold")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    fig.savefig(output_file, dpi=80)
    plt.close(fig)
