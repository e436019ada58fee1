"""What the benchmark report aggregates: the per-case metrics of every (seed, case) per method, the seed-level
means, the paired comparison against the baseline, and each run's per-epoch curves (from the trainer's progress
file, or from the checkpoint's logging for runs made before trainers wrote one)."""
from __future__ import annotations

import math
import os
from typing import Dict, Mapping, Optional

import numpy as np

from nnunet_semi.reporting import mean_std
from nnunet_semi.training.progress_file import PROGRESS_FILE, TIMESTAMP_KEYS, curves_from_progress

#: pseudo-Dice level whose first epoch the report lists per run (leaving nnU-Net's all-background phase)
PSEUDO_DICE_MILESTONE = 0.5
#: the project's target for a semi-supervised arm (benchmarks/README.md): its mean Dice over TARGET_SEEDS seeds at
#: least TARGET_MEAN_GAIN points above the baseline's, and no seed more than -TARGET_WORST_SEED points below the
#: baseline run of the same seed
TARGET_MEAN_GAIN, TARGET_WORST_SEED, TARGET_SEEDS = 1.5, -1.0, 3


def _paired(a: Mapping[str, float], b: Mapping[str, float], metric: str) -> dict:
    """:func:`~nnunet_semi.evaluation.evaluate.paired_difference` of ``b - a`` with the number of pairs where b is
    better / worse / equal (higher Dice or Jaccard, lower distances)."""
    from nnunet_semi.evaluation.evaluate import paired_difference
    pd = paired_difference(a, b)
    common = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    better = (lambda x, y: y > x) if metric in ("Dice", "Jaccard") else (lambda x, y: y < x)
    pd["wins"] = sum(1 for k in common if better(a[k], b[k]))
    pd["losses"] = sum(1 for k in common if better(b[k], a[k]))
    pd["ties"] = len(common) - pd["wins"] - pd["losses"]
    return pd


def per_seed_comparison(values: Mapping, methods, baseline: str, seeds_of: Mapping[str, list]) -> dict:
    """Per method and seed the paired difference of the mean Dice (classes averaged per case) against the
    baseline's run of the same seed, and the target verdict over the seeds both have (:data:`TARGET_MEAN_GAIN`)."""
    from nnunet_semi.evaluation.evaluate import FOREGROUND
    out = {}
    for m in methods:
        if m == baseline:
            continue
        per_seed = {}
        for seed in seeds_of[m]:
            if seed not in seeds_of[baseline]:
                continue
            prefix = f"seed_{seed}/"
            a = {k: v for k, v in values[baseline][FOREGROUND]["Dice"].items() if k.startswith(prefix)}
            b = {k: v for k, v in values[m][FOREGROUND]["Dice"].items() if k.startswith(prefix)}
            per_seed[seed] = _paired(a, b, "Dice")
        deltas = [100.0 * d["mean_diff"] for d in per_seed.values() if math.isfinite(d["mean_diff"])]
        mean_gain = sum(deltas) / len(deltas) if deltas else float("nan")
        worst = min(deltas) if deltas else float("nan")
        if len(deltas) < TARGET_SEEDS:
            verdict = f"open ({len(deltas)} of {TARGET_SEEDS} seeds)"
        else:
            verdict = "met" if mean_gain >= TARGET_MEAN_GAIN and worst >= TARGET_WORST_SEED else "missed"
        out[m] = {"per_seed": per_seed, "mean_gain_points": mean_gain, "worst_seed_points": worst,
                  "n_seeds": len(deltas), "target": verdict}
    return out


def curves_from_checkpoint(checkpoint: str) -> dict:
    """Per-epoch curves from a checkpoint's nnU-Net ``logging`` (the form of
    :func:`~nnunet_semi.training.progress_file.curves_from_progress`)."""
    import torch
    logging = torch.load(checkpoint, map_location="cpu", weights_only=False).get("logging", {})
    curves = {}
    for k, v in logging.items():
        if k in TIMESTAMP_KEYS:
            continue
        try:
            curves[k] = [[float(x) for x in e] if isinstance(e, (list, tuple, np.ndarray)) else float(e) for e in v]
        except (TypeError, ValueError):
            continue
    ts, te = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
    curves["epoch_time_s"] = [float(b) - float(a) for a, b in zip(ts, te)]
    return curves


def run_curves(model_dir: str, checkpoint: str, n_epochs: Optional[int] = None) -> dict:
    """A finished run's curves: from its progress file when that holds every epoch, else from ``checkpoint``."""
    curves = curves_from_progress(os.path.join(model_dir, PROGRESS_FILE), n_epochs)
    return curves if curves is not None else curves_from_checkpoint(os.path.join(model_dir, checkpoint))


def curve_milestones(curves: Mapping[str, list], threshold: float = PSEUDO_DICE_MILESTONE) -> dict:
    """From one run's nnU-Net logging: the first epoch (1-based) whose pseudo Dice (``mean_fg_dice``, nnU-Net's
    per-epoch validation patches) reaches ``threshold``, and the last epoch's pseudo Dice. A run that leaves
    nnU-Net's early all-background phase late has little budget left; these show when that happened."""
    dice = [float(x) for x in curves.get("mean_fg_dice", []) if x is not None]
    first = next((i + 1 for i, x in enumerate(dice) if np.isfinite(x) and x >= threshold), None)
    return {"pseudo_dice_first_epoch": first, "pseudo_dice_last": dice[-1] if dice else None}


def aggregate(summaries: Mapping[str, Mapping[int, dict]], baseline: str) -> dict:
    """Pool the per-case metrics of every (seed, case) per method; seed-level means; paired differences
    against ``baseline`` on the (seed, case) pairs both have.

    ``summaries``: method -> seed -> :func:`nnunet_semi.evaluation.evaluate_folder` result."""
    from nnunet_semi.evaluation.evaluate import FOREGROUND, PAIRED_METRICS, per_case_foreground
    from nnunet_semi.evaluation.metrics import METRICS
    methods = list(summaries)
    first = next(iter(next(iter(summaries.values())).values()))
    keys = list(first["settings"]["labels"])
    names = {k: first.get("label_names", {}).get(k, k) for k in keys}
    names[FOREGROUND] = "Mean"
    values: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = {}
    for m in methods:
        values[m] = {}
        for key in keys + [FOREGROUND]:
            values[m][key] = {}
            for metric in METRICS:
                d = {}
                for seed, summ in summaries[m].items():
                    for c in summ["metric_per_case"]:
                        v = per_case_foreground(c["metrics"], metric) if key == FOREGROUND else c["metrics"][key][metric]
                        d[f"seed_{seed}/{c['case']}"] = float(v)
                values[m][key][metric] = d
    stats = {m: {key: {metric: mean_std(values[m][key][metric].values()) for metric in METRICS}
                 for key in keys + [FOREGROUND]} for m in methods}
    seed_level = {}
    for m in methods:
        per_seed = {}
        for seed in summaries[m]:
            prefix = f"seed_{seed}/"
            per_seed[seed] = {metric: mean_std([v for k, v in values[m][FOREGROUND][metric].items()
                                                if k.startswith(prefix)])["mean"] for metric in METRICS}
        seed_level[m] = {"per_seed": per_seed,
                         "over_seeds": {metric: mean_std([p[metric] for p in per_seed.values()]) for metric in METRICS}}
    paired = {m: {key: {metric: _paired(values[baseline][key][metric], values[m][key][metric], metric)
                        for metric in PAIRED_METRICS} for key in keys + [FOREGROUND]}
              for m in methods if m != baseline}
    seeds_of = {m: sorted(summaries[m]) for m in methods}
    n_cases = {m: {seed: len(summ["metric_per_case"]) for seed, summ in summaries[m].items()} for m in methods}
    empty = {m: {key: {kind: sum(summ["empty_counts"][key][kind] for summ in summaries[m].values())
                       for kind in ("n_empty_pred", "n_empty_ref", "n_both_empty")} for key in keys}
             for m in methods}
    return {"methods": methods, "baseline": baseline, "label_keys": keys, "label_names": names, "stats": stats,
            "seed_level": seed_level, "paired": paired, "values": values, "n_cases": n_cases, "empty_counts": empty,
            "seeds": seeds_of, "per_seed_paired": per_seed_comparison(values, methods, baseline, seeds_of)}
