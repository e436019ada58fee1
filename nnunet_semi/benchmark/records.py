"""Benchmark records: the small part of a benchmark folder that is worth keeping in the repository.

A benchmark folder (``run_benchmark.py -o <out>``) holds gigabytes of checkpoints and predictions on the machine
that ran it, and is lost with that machine. Its results are small: ``settings.json``, ``runs.json`` (wall times)
and one evaluation per (arm, seed), ``seed_<s>/eval/<arm>.json`` (every metric of every evaluated case). A
*record* (``benchmarks/records/<name>/``) keeps exactly these files, and rebuilds ``results.json`` /
``results.md`` from them with the harness's own aggregation, so that

- seeds trained in different sessions (on different machines) can be paired and reported together: recording a
  folder into an existing record adds its runs and keeps the record's others;
- RESULTS.md's numbers and per-case pairs can be re-derived (and re-checked) from the repository alone;
- ``benchmarks/learning_curve.py`` reads records as it reads benchmark folders.

Nothing recorded is lost on bad input: a folder of other key settings (budget, configuration, plans, evaluated
cases, ...) is refused with both files named, and an (arm, seed) whose evaluation differs from the recorded one
is refused unless ``replace`` is given; the record is written into a temporary folder next to it and swapped in
only when complete.

An arm trained in its own folder under a setting the harness does not name (e.g. Reciprocal Learning with
``nnUNet_semi_teacher_checkpoint`` set to the same seed's supervised checkpoint) is recorded beside the other arms
under a new name (``rename={'ReciprocalLearningTrainer': 'ReciprocalLearningTrainer_fromSupervised'}``; its
``@teacher`` arm follows it) with a ``note`` saying what differs; the record's settings and report keep, per renamed
arm, its folder, its arm there and the note, so the paired comparison against supervised of the same seed is made
on the record.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from nnunet_semi.benchmark.settings import KEY_SETTINGS
from nnunet_semi.benchmark.trainers import ARM_SEP, BASELINE

#: the settings a record and a folder recorded into it must share (the harness's resume keys, plus the cases)
RECORD_KEYS = KEY_SETTINGS + ("evaluated_cases",)
SETTINGS_FILE, RUNS_FILE = "settings.json", "runs.json"
_SEED_DIR = re.compile(r"^seed_(\d+)$")


class RecordError(RuntimeError):
    pass


@dataclass
class RecordChanges:
    """What :func:`record_folder` did, per ``'<arm>/seed_<s>'``."""
    record: str
    added: List[str] = field(default_factory=list)
    replaced: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)      # in the record only (e.g. trained in an earlier session)

    def lines(self) -> List[str]:
        out = [f"record {self.record}"]
        for what in ("added", "replaced", "unchanged", "kept"):
            runs = getattr(self, what)
            if runs:
                out.append(f"  {what + ':':10s} {', '.join(runs)}")
        return out


def _read_json(path: str, fix: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not readable as JSON ({e}); {fix}") from None


def evaluations(folder: str) -> Dict[Tuple[str, int], str]:
    """``(arm, seed) -> seed_<s>/eval/<arm>.json`` of a benchmark folder or a record."""
    found = {}
    if not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        m = _SEED_DIR.match(name)
        ev = os.path.join(folder, name, "eval")
        if not m or not os.path.isdir(ev):
            continue
        for f in sorted(os.listdir(ev)):
            if f.endswith(".json"):
                found[(f[:-len(".json")], int(m.group(1)))] = os.path.join(ev, f)
    return found


def _run_key(arm: str, seed: int) -> str:
    return f"{arm}/seed_{seed}"


def _rename_run(key: str, rename: Dict[str, str]) -> str:
    arm, sep, seed = key.rpartition("/")
    return f"{rename.get(arm, arm)}{sep}{seed}" if sep else key


def _renamed_entry(run: dict, rename: Dict[str, str]) -> dict:
    if isinstance(run, dict) and run.get("trainer") in rename:
        return {**run, "trainer": rename[run["trainer"]], "arm_in_folder": run["trainer"]}
    return run


def _same_evaluation(a: dict, b: dict) -> bool:
    return a.get("metric_per_case") == b.get("metric_per_case") and \
        a.get("settings", {}).get("empty_policy") == b.get("settings", {}).get("empty_policy")


def _check_settings(new: dict, new_file: str, old: dict, old_file: str) -> None:
    diff = {k: (old.get(k), new.get(k)) for k in RECORD_KEYS if old.get(k) != new.get(k)}
    if diff:
        shown = "; ".join(f"{k}: {'(list)' if isinstance(o, list) else o} in the record, "
                          f"{'(list)' if isinstance(n, list) else n} in the folder" for k, (o, n) in diff.items())
        raise RecordError(f"{new_file} differs from the record {old_file} in {shown}. Record it under another name "
                          f"(--name), or into another records folder; nothing was written.")


_ARM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(@[A-Za-z0-9_]+)?$")


def _check_rename(rename: Dict[str, str], found: Dict[Tuple[str, int], str], folder: str) -> None:
    arms = sorted({a for a, _ in found})
    missing = [a for a in rename if a not in arms]
    if missing:
        raise RecordError(f"{folder} has no evaluated arm {', '.join(missing)} to rename (it has {', '.join(arms)}); "
                          f"nothing was written.")
    bad = [n for n in rename.values() if not _ARM_NAME.match(n)]
    if bad:
        raise RecordError(f"arm name(s) {', '.join(map(repr, bad))}: use letters, digits and _ . + - (and one "
                          f"@export suffix); nothing was written.")
    targets = [rename.get(a, a) for a in arms]
    if len(set(targets)) != len(targets):
        raise RecordError(f"renaming {rename} gives two arms of {folder} the same name; nothing was written.")


def _merged_settings(new: dict, old: Optional[dict], arms: List[str], seeds: List[int]) -> dict:
    d = dict(new)
    d["renamed_arms"] = {**(old or {}).get("renamed_arms", {}), **new.get("renamed_arms", {})}
    if not d["renamed_arms"]:
        del d["renamed_arms"]
    order = list((old or {}).get("trainers", [])) + list(new.get("trainers", []))
    d["trainers"] = [t for t in dict.fromkeys(order) if t in arms] + sorted(set(arms) - set(order))
    d["seeds"] = seeds
    starts = [x for x in ((old or {}).get("first_started"), new.get("first_started")) if x]
    d["first_started"] = min(starts) if starts else None
    commits = list((old or {}).get("git_commits") or []) + [new.get("git_commit")]
    d["git_commits"] = [c for c in dict.fromkeys(commits) if c and c != "unknown"]
    return d


def rebuild_report(record: str) -> dict:
    """``results.json`` and ``results.md`` of a record, from its evaluations (the harness's aggregate and tables).
    Returns the aggregate."""
    from nnunet_semi.benchmark.aggregate import aggregate
    from nnunet_semi.benchmark.report import results_markdown
    from nnunet_semi.evaluation.evaluate import save_json
    settings_file = os.path.join(record, SETTINGS_FILE)
    settings = _read_json(settings_file, "record the benchmark folder again")
    found = evaluations(record)
    if not found:
        raise RecordError(f"{record}: no evaluation (seed_<s>/eval/<arm>.json) to report")
    arms = [t for t in settings.get("trainers", []) if any(a == t for a, _ in found)]
    arms += sorted({a for a, _ in found} - set(arms))
    summaries: Dict[str, Dict[int, dict]] = {}
    for arm in arms:
        for (a, seed), path in sorted(found.items(), key=lambda kv: kv[0][1]):
            if a == arm:
                summaries.setdefault(arm, {})[seed] = _read_json(path, "record the benchmark folder again")
    agg = aggregate(summaries, baseline=BASELINE if BASELINE in summaries else arms[0])
    runs_file = os.path.join(record, RUNS_FILE)
    agg["runs"] = _read_json(runs_file, "record the benchmark folder again") if os.path.isfile(runs_file) else {}
    agg["missing_runs"] = []
    seeds = sorted({s for _, s in found})
    title = (f"{settings.get('dataset')}, configuration {settings.get('effective_configuration')}, fold "
             f"{settings.get('fold')}, {settings.get('epochs')} epochs x {settings.get('iters')} iterations, seeds "
             f"{seeds} (record)")
    md = results_markdown(agg, title, settings)
    commits = settings.get("git_commits") or []
    md += (f"\nRecorded from benchmark folders run at commit(s) {', '.join(commits) if commits else 'unknown'}; "
           f"rebuilt by `benchmarks/record.py` from the evaluations in this folder.\n")
    renamed = settings.get("renamed_arms") or {}
    if renamed:
        md += "\nArms recorded under another name than in their benchmark folder:\n\n" + "".join(
            f"- `{new}`: arm `{r.get('arm')}` of the folder `{r.get('folder')}`"
            + (f"; {r['note']}" if r.get("note") else "") + "\n" for new, r in sorted(renamed.items()))
    with open(os.path.join(record, "results.md"), "w") as f:
        f.write(md)
    # the per-case values are the evaluations' own (seed_<s>/eval); not written twice
    save_json({k: v for k, v in agg.items() if k != "values"}, os.path.join(record, "results.json"))
    return agg


def record_folder(folder: str, records_root: str, name: Optional[str] = None, replace: bool = False,
                  commit: Optional[str] = None, rename: Optional[Dict[str, str]] = None,
                  note: Optional[str] = None) -> RecordChanges:
    """Record the benchmark folder ``folder`` into ``<records_root>/<name>`` (default: the folder's name), merged
    with what is recorded there already. ``commit`` names the code the folder's runs were trained with when its
    settings.json says 'unknown' (a frozen copy of the code outside git). ``rename`` maps arms of the folder to
    the names they get in the record, their ``ARM@export`` arms following them (``note``: what the renamed arms did
    differently, kept with them)."""
    folder = os.path.abspath(folder)
    settings_file = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isfile(settings_file):
        raise RecordError(f"{settings_file} does not exist: {folder} is not a benchmark folder (run_benchmark.py -o "
                          f"writes it)")
    settings = _read_json(settings_file, "re-run the benchmark's command there (it rewrites the file)")
    if commit:
        settings["git_commit"] = commit
    new_evals = evaluations(folder)
    if not new_evals:
        raise RecordError(f"{folder} has no evaluated run (seed_<s>/eval/<arm>.json); run the benchmark (or its "
                          f"--report-only) there first")
    rename = dict(rename or {})
    for arm, _ in new_evals:    # an export arm (ARM@teacher) follows its renamed arm unless named itself
        base, sep, export = arm.partition(ARM_SEP)
        if sep and base in rename and arm not in rename:
            rename[arm] = f"{rename[base]}{ARM_SEP}{export}"
    if rename:
        _check_rename(rename, new_evals, folder)
        new_evals = {(rename.get(a, a), s): p for (a, s), p in new_evals.items()}
        settings["trainers"] = [rename.get(t, t) for t in settings.get("trainers", [])]
        settings["renamed_arms"] = {new: {"arm": old, "folder": os.path.basename(folder.rstrip(os.sep)),
                                          **({"note": note} if note else {})} for old, new in rename.items()}
    elif note:
        raise RecordError("a note is kept with renamed arms only: give --rename OLD=NEW as well")
    name = name or os.path.basename(folder.rstrip(os.sep))
    dest = os.path.join(os.path.abspath(records_root), name)
    changes = RecordChanges(record=dest)
    old_settings = None
    if os.path.isdir(dest):
        old_file = os.path.join(dest, SETTINGS_FILE)
        old_settings = _read_json(old_file, f"remove {dest} or record under another name (--name)")
        _check_settings(settings, settings_file, old_settings, old_file)
    old_evals = evaluations(dest)
    differing = []
    for key, path in new_evals.items():
        if key in old_evals and not _same_evaluation(_read_json(path, "re-run the benchmark's --report-only there"),
                                                     _read_json(old_evals[key], f"remove {old_evals[key]}")):
            differing.append(_run_key(*key))
    if differing and not replace:
        raise RecordError(f"{dest} records other results for {', '.join(differing)} than {folder} (a re-run?). Pass "
                          f"--replace to take the folder's, or record it under another name (--name); nothing was "
                          f"written.")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}.", dir=os.path.dirname(dest))
    os.chmod(stage, 0o755)    # mkdtemp's 0700 would be the record's mode
    try:
        merged = dict(old_evals)
        for key, path in new_evals.items():
            run = _run_key(*key)
            (changes.replaced if run in differing else changes.unchanged if key in old_evals else changes.added).append(run)
            merged[key] = path
        changes.kept = [_run_key(*k) for k in old_evals if k not in new_evals]
        for (arm, seed), path in merged.items():
            out = os.path.join(stage, f"seed_{seed}", "eval", arm + ".json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copyfile(path, out)
        runs = {}
        for src in (os.path.join(dest, RUNS_FILE), os.path.join(folder, RUNS_FILE)):
            if os.path.isfile(src):
                these = _read_json(src, "re-run the benchmark's command there")
                if src.startswith(folder + os.sep) and rename:
                    these = {_rename_run(k, rename): _renamed_entry(v, rename) for k, v in these.items()}
                runs.update(these)
        recorded = {_run_key(*k) for k in merged}
        runs = {k: v for k, v in runs.items() if k in recorded}   # not a run without an evaluation
        with open(os.path.join(stage, RUNS_FILE), "w") as f:
            json.dump(runs, f, indent=2)
        arms = list(dict.fromkeys(a for a, _ in merged))
        merged_settings = _merged_settings(settings, old_settings, arms, sorted({s for _, s in merged}))
        with open(os.path.join(stage, SETTINGS_FILE), "w") as f:
            json.dump(merged_settings, f, indent=2)
        rebuild_report(stage)
        if os.path.isdir(dest):
            trash = dest + ".replaced"
            os.replace(dest, trash)
            os.replace(stage, dest)
            shutil.rmtree(trash)
        else:
            os.replace(stage, dest)
    finally:
        if os.path.isdir(stage):
            shutil.rmtree(stage)
    return changes
