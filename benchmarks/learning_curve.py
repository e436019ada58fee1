"""Learning curve of one trainer from several benchmark folders that differ only in their budget.

    python benchmarks/learning_curve.py runs/curve_104_2d_*x50_val -o curve_104 [--trainer SupervisedBaselineTrainer]
        [--arms MeanTeacherTrainer CrossMatchTrainer]

Reads each folder's ``settings.json`` (budget = epochs x iterations) and ``results.json`` (mean Dice over
the evaluated cases, per seed), and writes ``<out>.md`` (one row per budget: mean Dice per seed and over
seeds, the gain over the previous budget over the seeds both have, training wall time) and ``<out>.png`` (Dice against iterations,
log2 axis). It names the first budget whose doubling gains less than ``--threshold`` points (1 by default),
the benchmark rules' "converged" budget. Folders must share the dataset, configuration, plans and
evaluated cases; a mismatch is an error that names the folder.

``--arms`` adds other trainers recorded in the same folders (semi-supervised arms): a second table with each
arm's mean Dice per budget and its difference from ``--trainer`` over the seeds both have, and the arms as
dashed lines on the plot, so that whether a method's gain grows or shrinks with the budget can be seen. A
folder without an arm is skipped for that arm. A point whose mean has fewer seeds than the curve's best-covered
budget is labelled with its number of seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

COMPARED = ("dataset", "configuration", "plans", "eval_group", "plans_config")


def load_point(folder: str, trainer: str, required: bool = True) -> Optional[dict]:
    try:
        with open(os.path.join(folder, "settings.json")) as f:
            settings = json.load(f)
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {folder}: no readable settings.json/results.json ({e}); run the benchmark's "
                         f"--report-only there first")
    seeds = results.get("seed_level", {}).get(trainer, {}).get("per_seed", {})
    if not seeds:
        if not required:
            return None
        raise SystemExit(f"error: {folder}: no finished {trainer} run in results.json")
    train_s = [r["train_s"] for r in results.get("runs", {}).values()
               if r.get("trainer") == trainer and r.get("train_s") is not None]
    return {"folder": folder, "iterations": int(settings["epochs"]) * int(settings["iters"]),
            "epochs": int(settings["epochs"]), "iters": int(settings["iters"]),
            "dice": {int(s): 100.0 * v["Dice"] for s, v in seeds.items()},
            "train_s": train_s, "cases": settings.get("evaluated_cases"),
            "key": {k: settings.get(k) for k in COMPARED}}


def seed_gain(q: dict, p: dict) -> Tuple[Optional[float], List[int]]:
    """Mean Dice of ``q`` minus that of ``p`` over the seeds both have (None if none), and those seeds: every
    comparison here (a doubling of the budget, an arm against supervised) pairs seeds this way."""
    common = sorted(set(p["dice"]) & set(q["dice"]))
    if not common:
        return None, common
    return sum(q["dice"][s] - p["dice"][s] for s in common) / len(common), common


def converged_budget(points: List[dict], threshold: float) -> Optional[int]:
    """The first budget b such that the budget 2b exists and its mean Dice (over the seeds both have) is less
    than ``threshold`` points above b's."""
    by_iters = {p["iterations"]: p for p in points}
    for p in sorted(points, key=lambda q: q["iterations"]):
        q = by_iters.get(2 * p["iterations"])
        if q is None:
            continue
        gain, _ = seed_gain(q, p)
        if gain is not None and gain < threshold:
            return p["iterations"]
    return None


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def table(points: List[dict], trainer: str, threshold: float) -> str:
    from nnunet_semi.reporting import markdown_rows
    seeds = sorted({s for p in points for s in p["dice"]})
    head = ["iterations", "epochs x iters"] + [f"seed {s}" for s in seeds] + ["mean", "gain vs previous", "train time"]
    rows, prev = [], None
    for p in points:
        m = mean(p["dice"].values())
        gain = ""
        if prev is not None:    # over the seeds both budgets have, as converged_budget compares them
            g, common = seed_gain(p, prev)
            if g is not None:
                gain = f"{g:+.2f}"
                if len(common) < max(len(p["dice"]), len(prev["dice"])):
                    gain += f" (seed{'s' if len(common) > 1 else ''} {', '.join(map(str, common))})"
        t = f"{mean(p['train_s']) / 60:.1f} min" if p["train_s"] else "–"
        cells = [str(p["iterations"]), f"{p['epochs']} x {p['iters']}"]
        cells += [f"{p['dice'][s]:.2f}" if s in p["dice"] else "–" for s in seeds]
        rows.append(cells + [f"{m:.2f}", gain, t])
        prev = p
    lines = markdown_rows(head, rows).split("\n")
    conv = converged_budget(points, threshold)
    key = points[0]["key"]
    lines.insert(0, f"{trainer}, {key['dataset']} {key['configuration']} ({key['plans']}), evaluated on "
                    f"{len(points[0]['cases'] or [])} cases ({key['eval_group']}); mean Dice (%) over cases.\n")
    lines.append("")
    lines.append(f"Converged budget (doubling gains < {threshold:g} point): "
                 + (f"**{conv} iterations**." if conv else "not reached by these budgets."))
    return "\n".join(lines) + "\n"


def arms_table(points: List[dict], arms: dict, trainer: str) -> str:
    """One row per (budget, arm): the arm's seeds, mean, and mean difference from ``trainer`` over the seeds
    both have at that budget (seed-level means, so the pairs are seeds)."""
    from nnunet_semi.reporting import markdown_rows
    by_iters = {p["iterations"]: p for p in points}
    rows = []
    for arm, arm_points in arms.items():
        for q in arm_points:
            d, common = seed_gain(q, by_iters[q["iterations"]])
            t = f"{mean(q['train_s']) / 60:.1f} min" if q["train_s"] else "–"
            rows.append([str(q["iterations"]), arm, ", ".join(f"{q['dice'][s]:.2f}" for s in sorted(q["dice"])),
                         f"{mean(q['dice'].values()):.2f}",
                         f"{d:+.2f} ({len(common)} seed{'s' if len(common) != 1 else ''})" if d is not None else "–",
                         t])
    head = ["iterations", "arm", "per seed", "mean", f"Δ vs {trainer} (same seeds)", "train time"]
    return markdown_rows(head, rows) + "\n"


def plot(points: List[dict], trainer: str, path: str, arms: Optional[dict] = None) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["iterations"] for p in points]
    for s in sorted({s for p in points for s in p["dice"]}):
        pts = [(p["iterations"], p["dice"][s]) for p in points if s in p["dice"]]
        ax.plot(*zip(*pts), marker="o", alpha=0.5, label=f"seed {s}")
    ax.plot(x, [mean(p["dice"].values()) for p in points], marker="s", color="black", lw=2,
            label=f"{trainer} (mean)" if arms else "mean")
    for arm, arm_points in (arms or {}).items():
        ax.plot([q["iterations"] for q in arm_points], [mean(q["dice"].values()) for q in arm_points],
                marker="^", ls="--", lw=2, label=f"{arm} (mean)")
    # a mean over fewer seeds than the curve's most is not comparable at a glance: say how many it has
    most = max(len(p["dice"]) for p in points)
    for q in list(points) + [q for arm_points in (arms or {}).values() for q in arm_points]:
        if len(q["dice"]) < most:
            ax.annotate(f"{len(q['dice'])} seed" + ("s" if len(q["dice"]) > 1 else ""),
                        (q["iterations"], mean(q["dice"].values())), textcoords="offset points", xytext=(4, -9),
                        fontsize=6, alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("training iterations")
    ax.set_ylabel("mean Dice (%)")
    ax.set_title(f"{trainer}: learning curve" + (" and semi-supervised arms" if arms else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="benchmark folders, one per budget")
    p.add_argument("-o", "--out", required=True, help="output prefix: writes <out>.md and <out>.png")
    p.add_argument("--trainer", default="SupervisedBaselineTrainer")
    p.add_argument("--threshold", type=float, default=1.0, help="Dice points a doubling must gain (default 1)")
    p.add_argument("--arms", nargs="+", default=[], metavar="TRAINER",
                   help="other trainers recorded in the same folders, compared with --trainer at each budget")
    args = p.parse_args(argv)
    points = sorted((load_point(f, args.trainer) for f in args.folders), key=lambda q: q["iterations"])
    for q in points[1:]:
        if q["key"] != points[0]["key"] or q["cases"] != points[0]["cases"]:
            raise SystemExit(f"error: {q['folder']} differs from {points[0]['folder']} in "
                             f"{[k for k in COMPARED if q['key'][k] != points[0]['key'][k]] or 'evaluated cases'}; "
                             f"a learning curve compares budgets only")
    if len({q["iterations"] for q in points}) != len(points):
        raise SystemExit("error: two folders have the same budget")
    md = table(points, args.trainer, args.threshold)
    arms = {}
    for arm in args.arms:
        arm_points = [q for q in (load_point(p_["folder"], arm, required=False) for p_ in points) if q is not None]
        if not arm_points:
            raise SystemExit(f"error: no folder has a finished {arm} run; folders: {[p_['folder'] for p_ in points]}")
        arms[arm] = arm_points
    if arms:
        md += f"\nOther arms at the budgets where they ran:\n\n{arms_table(points, arms, args.trainer)}"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    plot(points, args.trainer, args.out + ".png", arms)
    print(md)
    print(f"wrote {args.out}.md and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
