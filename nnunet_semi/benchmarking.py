"""Benchmark harness: every arm through nnU-Net's own commands, with the same budget, several seeds,
held-out evaluation from the final checkpoint, and a report with the paired comparison against the
supervised arm. Used by ``benchmarks/run_benchmark.py`` and by the demo (:mod:`nnunet_semi.demo`).

What one benchmark does (``<out>`` is the benchmark folder)::

    plan + preprocess the labeled data (only if missing)      nnUNetv2_plan_and_preprocess -c <config>
    preprocess the unlabeled images (only if missing)         nnUNetv2_preprocess_unlabeled -c <config>
    optional: add ONE smaller configuration to the plans       <config>_cpu, inherits_from <config>
    for seed in seeds, for trainer in trainers:
        train  (nnUNet_semi_epochs/iters/val_iters/save_every/seed; nnUNet_results=<out>/seed_<s>/nnUNet_results)
               nnUNetv2_train <id> <config> <fold> -tr <trainer> -p <plans> -device <dev> [--c]
        predict the held-out cases from checkpoint_final.pth (never checkpoint_best)
               nnUNetv2_predict -i <out>/inputs_<group> -o <out>/seed_<s>/predictions/<trainer> -f <fold>
                                -chk checkpoint_final.pth ...
        evaluate (nnunet_semi.evaluation.evaluate_folder) -> <out>/seed_<s>/eval/<trainer>.json
    report: <out>/results.md, results.json, benchmark.png, settings.json

Resuming: a (trainer, seed) run whose checkpoint_final and complete predictions exist is skipped;
a run with checkpoint_final but missing/incomplete predictions is only predicted; a run with a
checkpoint_latest is continued with ``--c``; evaluation is cached and redone when the predictions
are newer. Predictions are written to a temporary folder and renamed when nnUNetv2_predict
succeeded, so a killed prediction never looks complete.
"""
from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# logged per-epoch keys of the semi-supervised trainers that are ratios/thresholds, or on a scale of their own
from nnunet_semi.training.progress import OWN_SCALE_KEYS as OWN_SCALE_TERMS, RATIO_KEYS as RATIO_TERMS

BASELINE = "SupervisedBaselineTrainer"
#: pseudo-Dice level whose first epoch the report lists per run (leaving nnU-Net's all-background phase)
PSEUDO_DICE_MILESTONE = 0.5
CHECKPOINT = "checkpoint_final.pth"
EVAL_GROUPS = ("all", "val", "test")
#: settings that must not change when a benchmark folder is resumed
KEY_SETTINGS = ("dataset", "configuration", "plans", "fold", "epochs", "iters", "val_iters", "device",
                "plans_config", "cpu_features_scale", "cpu_batch_size", "cpu_patch_size", "eval_group", "disable_tta",
                "step_size")
NNUNET_LOG_KEYS = ('mean_fg_dice', 'ema_fg_dice', 'dice_per_class_or_region', 'train_losses', 'val_losses', 'lrs',
                   'epoch_start_timestamps', 'epoch_end_timestamps')


class BenchmarkError(RuntimeError):
    """A problem the user can fix; the message says how."""


class CommandError(BenchmarkError):
    pass


# --------------------------------------------------------------------------------------------
# progress output
# --------------------------------------------------------------------------------------------
_T0 = [time.time()]


def reset_clock() -> None:
    _T0[0] = time.time()


def elapsed() -> str:
    s = int(time.time() - _T0[0])
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def say(msg: str = "") -> None:
    print(f"[{elapsed()}] {msg}", flush=True)


def fmt_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


_NUM_RE = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|(?<![\w.])nan\b")
_TS_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?: ?")


def _numbers(text: str) -> List[float]:
    return [float(x) for x in _NUM_RE.findall(text)]


class EpochProgress:
    """Turns nnU-Net's training log lines into one progress line per epoch."""

    def __init__(self, label: str, total_epochs: Optional[int] = None):
        self.label, self.total = label, total_epochs
        self.epoch: Optional[int] = None
        self.values: Dict[str, object] = {}
        self.t_start = time.time()

    def feed(self, line: str) -> Optional[str]:
        text = _TS_RE.sub("", line.strip())
        if not text:
            return None
        m = re.match(r"^Epoch (\d+)$", text)
        if m:
            self.epoch, self.values = int(m.group(1)), {}
            return None
        for key in ("train_loss", "val_loss"):
            if text.startswith(key + " "):
                nums = _numbers(text[len(key):])
                self.values[key] = nums[0] if nums else float("nan")
                return None
        if text.startswith("Pseudo dice"):
            self.values["dice"] = _numbers(text[len("Pseudo dice"):])
            return None
        if text.startswith("semi: "):
            for part in text[len("semi: "):].split(","):
                bits = part.split()
                if len(bits) == 2:
                    try:
                        self.values[bits[0]] = float(bits[1])
                    except ValueError:
                        pass
            return None
        m = re.match(r"^Epoch time: ([-+\d.eE]+) s", text)
        if m and self.epoch is not None:
            total = f"/{self.total}" if self.total else ""
            parts = [f"epoch {self.epoch + 1}{total}"]
            if "train_loss" in self.values:
                parts.append(f"train_loss {self.values['train_loss']:.4f}")
            unsup = [k for k in self.values if k == "loss_unsup"] or \
                [k for k in self.values if k.startswith("loss_") and k != "loss_sup"]
            if unsup:
                parts.append(f"{unsup[0]} {self.values[unsup[0]]:.4f}")
            dice = self.values.get("dice")
            if dice:
                parts.append(f"pseudo Dice {np.nanmean(dice):.3f}")
            parts.append(f"{float(m.group(1)):.1f} s/epoch")
            return f"    {self.label}: " + ", ".join(parts)
        if text.startswith("Training done."):
            return f"    {self.label}: training done ({fmt_seconds(time.time() - self.t_start)})"
        if "validation after training is skipped" in text:
            return f"    {self.label}: nnU-Net's validation after training skipped (nnUNet_semi_skip_final_validation)"
        if text.startswith("Mean Validation Dice"):
            nums = _numbers(text[len("Mean Validation Dice"):])
            return f"    {self.label}: nnU-Net's final validation Dice (training fold) " + \
                (f"{nums[0]:.3f}" if nums else "?")
        return None


def shell_line(cmd: Sequence[str], env_changes: Optional[Mapping[str, str]] = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (env_changes or {}).items())
    return (prefix + " " if prefix else "") + shlex.join([str(c) for c in cmd])


def run_command(cmd: Sequence[str], env: Mapping[str, str], log_file: str, progress: Optional[EpochProgress] = None,
                echo: Optional[Mapping[str, str]] = None, quiet: bool = False) -> float:
    """Run ``cmd`` with ``env``, all output to ``log_file``; with ``progress``, print one line per epoch.
    Returns the wall time. Raises :class:`CommandError` (with the log's tail) on a non-zero exit. An
    interrupt (Ctrl-C) terminates the child first, so a training leaves its last checkpoint behind."""
    cmd = [str(c) for c in cmd]
    if not quiet:
        say("$ " + shell_line(cmd, echo))
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    t0 = time.time()
    tail: deque = deque(maxlen=60)
    with open(log_file, "w", buffering=1) as log:  # line-buffered: the log can be followed with tail -f
        try:
            proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, errors="replace")
        except FileNotFoundError as e:
            raise CommandError(f"cannot run {cmd[0]}: {e}. Is the plugin installed (pip install -e .) and its "
                               f"console scripts on PATH?") from e
        try:
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if progress is not None:
                    msg = progress.feed(line)
                    if msg:
                        print(f"[{elapsed()}] {msg}", flush=True)
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        raise CommandError(f"command failed with exit code {rc}: {shell_line(cmd)}\nlog: {log_file}\n--- last lines "
                           f"---\n{''.join(tail)}")
    return time.time() - t0


# --------------------------------------------------------------------------------------------
# trainers, datasets, environment
# --------------------------------------------------------------------------------------------
def registered_trainers() -> Dict[str, type]:
    """name -> class of every trainer re-exported by ``trainers/nnunet_semi_trainers.py`` (the module
    nnU-Net's ``nnUNet_extTrainer`` discovery reads), in the module's order."""
    import importlib

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    mod = importlib.import_module("nnunet_semi.ext_trainers.nnunet_semi_trainers")
    return {name: obj for name, obj in vars(mod).items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__name__ == name}


def is_semi_supervised(cls: type) -> bool:
    from nnunet_semi.training.base import SemiSupervisedTrainer
    return issubclass(cls, SemiSupervisedTrainer)


def default_trainers(registered: Optional[Mapping[str, type]] = None) -> List[str]:
    """The supervised reference, then every registered semi-supervised trainer whose name has no '_'
    (variants such as ``MeanTeacherTrainer_confCE`` are left out)."""
    registered = registered_trainers() if registered is None else registered
    semi = [n for n, c in registered.items() if "_" not in n and is_semi_supervised(c)]
    return [BASELINE] + semi


def check_trainers(names: Sequence[str], registered: Mapping[str, type]) -> None:
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise BenchmarkError(
            f"trainer(s) {unknown} are not registered in trainers/nnunet_semi_trainers.py (registered: "
            f"{', '.join(registered)}). Only the plugin's trainers honour the nnUNet_semi_* budget variables, so "
            f"another trainer would not get the same budget; use {BASELINE} for nnU-Net's supervised reference.")
    if len(set(names)) != len(names):
        raise BenchmarkError(f"trainer list has duplicates: {list(names)}")


def find_dataset(dataset: str, roots: Sequence[Optional[str]]) -> str:
    """``DatasetXXX_Name`` for an id or a name, looked up in the given nnU-Net folders."""
    if str(dataset).startswith("Dataset"):
        return str(dataset)
    try:
        did = int(dataset)
    except ValueError:
        raise BenchmarkError(f"dataset '{dataset}': give an integer id or a DatasetXXX_Name folder name") from None
    prefix = f"Dataset{did:03d}_"
    found = set()
    for r in roots:
        if r and os.path.isdir(r):
            found.update(d for d in os.listdir(r) if d.startswith(prefix) and os.path.isdir(os.path.join(r, d)))
    if not found:
        raise BenchmarkError(f"no {prefix}* folder in {', '.join(r for r in roots if r)}; convert the dataset first "
                             f"(e.g. nnUNetv2_semi_convert_hippocampus -d {did} ...)")
    if len(found) > 1:
        raise BenchmarkError(f"several folders for dataset id {did}: {sorted(found)}; pass the full name")
    return found.pop()


def dataset_id_of(name: str) -> int:
    m = re.match(r"^Dataset(\d+)_", name)
    if not m:
        raise BenchmarkError(f"'{name}' is not a DatasetXXX_Name folder name")
    return int(m.group(1))


def default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def nnunet_env(raw: str, preprocessed: str, results: str, device: str = "cpu", n_proc_da: Optional[int] = None,
               def_n_proc: Optional[int] = None, base: Optional[Mapping[str, str]] = None,
               training: bool = False) -> Dict[str, str]:
    """Environment for nnU-Net's commands: paths, the plugin's trainers folder on nnUNet_extTrainer, and on
    small CPU machines (when the user has not set them) at most 2 worker processes (nnUNet_def_n_proc also
    caps the threads nnUNetv2_predict uses) and, for training only, in-process augmentation
    (nnUNet_n_proc_DA=0: DA workers compete with torch's threads on few cores; planning must not get 0, it
    calls torch.set_num_threads with it)."""
    from nnunet_semi.env import ensure_ext_trainer
    env = dict(os.environ if base is None else base)
    env.update(nnUNet_raw=raw, nnUNet_preprocessed=preprocessed, nnUNet_results=results, PYTHONUNBUFFERED="1")
    ensure_ext_trainer(env)
    ncpu = multiprocessing.cpu_count()
    if training:
        if n_proc_da is not None:
            env["nnUNet_n_proc_DA"] = str(n_proc_da)
        elif "nnUNet_n_proc_DA" not in env and device == "cpu" and ncpu <= 4:
            env["nnUNet_n_proc_DA"] = "0"
    if def_n_proc is not None:
        env["nnUNet_def_n_proc"] = str(def_n_proc)
    elif "nnUNet_def_n_proc" not in env and device == "cpu":
        # training: sizes the spawn pools of nnU-Net's final validation (each worker imports torch);
        # elsewhere it also caps nnUNetv2_predict's torch threads, so keep it at the core count there
        env["nnUNet_def_n_proc"] = "1" if training and ncpu <= 4 else str(max(1, min(ncpu, 2)))
    return env


def git_commit(repo: Optional[str] = None) -> str:
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=10)
        return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: str) -> dict:
    info = {"cpu_count": multiprocessing.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "device": device}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # pragma: no cover
        info["torch"] = f"unavailable ({e})"
    try:
        from importlib.metadata import version
        info["nnunetv2"] = version("nnunetv2")
    except Exception:
        info["nnunetv2"] = "unknown"
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------------------------
# the smaller CPU configuration (inherits_from)
# --------------------------------------------------------------------------------------------
def resolve_configuration(plans: dict, name: str, _seen: Tuple[str, ...] = ()) -> dict:
    """A configuration with nnU-Net's ``inherits_from`` resolved (same rule as PlansManager)."""
    if name not in plans["configurations"]:
        raise BenchmarkError(f"configuration '{name}' is not in the plans (available: "
                             f"{', '.join(plans['configurations'])})")
    cfg = copy.deepcopy(plans["configurations"][name])
    parent = cfg.get("inherits_from")
    if parent is not None:
        if parent in _seen:
            raise BenchmarkError(f"circular inherits_from in the plans: {_seen + (name,)}")
        base = resolve_configuration(plans, parent, _seen + (name,))
        base.update(cfg)
        cfg = base
    return cfg


def cpu_configuration_entry(plans: dict, base: str, features_scale: float = 0.5,
                            batch_size: Optional[int] = None,
                            patch_size: Optional[Sequence[int]] = None) -> Tuple[dict, dict]:
    """The plans entry of ``<base>_cpu`` and a description of the change.

    ``<base>_cpu`` = ``{"inherits_from": base, "batch_size": B, "architecture": A}`` where A is the base
    architecture with ``arch_kwargs.features_per_stage`` multiplied by ``features_scale`` (rounded, at
    least 4) and B = ``batch_size`` or min(base batch size, 2). ``patch_size`` (optional) replaces the
    patch (training patches and the sliding window alike); each axis must be a multiple of the
    network's total stride on that axis. Everything else (spacing, normalisation, data_identifier,
    hence the preprocessed data) is inherited unchanged."""
    parent = resolve_configuration(plans, base)
    if "architecture" not in parent or "features_per_stage" not in parent["architecture"].get("arch_kwargs", {}):
        raise BenchmarkError(f"configuration '{base}' has no architecture.arch_kwargs.features_per_stage "
                             f"(plans of nnU-Net < 2.5?); cannot derive a smaller configuration")
    if not 0 < features_scale <= 1:
        raise BenchmarkError("--cpu-features-scale must be in (0, 1]")
    arch = copy.deepcopy(parent["architecture"])
    old_features = list(arch["arch_kwargs"]["features_per_stage"])
    new_features = [max(4, int(round(f * features_scale))) for f in old_features]
    arch["arch_kwargs"]["features_per_stage"] = new_features
    old_bs = int(parent["batch_size"])
    new_bs = int(batch_size) if batch_size else min(old_bs, 2)
    if new_bs < 1:
        raise BenchmarkError("--cpu-batch-size must be >= 1")
    entry = {"inherits_from": base, "batch_size": new_bs, "architecture": arch}
    changes = {"architecture.arch_kwargs.features_per_stage": {"from": old_features, "to": new_features},
               "batch_size": {"from": old_bs, "to": new_bs}}
    if patch_size:
        old_patch = [int(v) for v in parent["patch_size"]]
        new_patch = [int(v) for v in patch_size]
        if len(new_patch) != len(old_patch):
            raise BenchmarkError(f"--cpu-patch-size needs {len(old_patch)} values for '{base}' (its patch is "
                                 f"{old_patch}), got {new_patch}")
        total = [1] * len(old_patch)
        for stride in arch["arch_kwargs"].get("strides", []):
            stride = [stride] * len(total) if isinstance(stride, int) else stride
            total = [t * int(v) for t, v in zip(total, stride)]
        bad = [(p, t) for p, t in zip(new_patch, total) if p < t or p % t]
        if bad:
            raise BenchmarkError(f"--cpu-patch-size {new_patch}: each axis must be a multiple of the network's total "
                                 f"stride {total} (the base patch is {old_patch})")
        entry["patch_size"] = new_patch
        changes["patch_size"] = {"from": old_patch, "to": new_patch}
    change = {"name": f"{base}_cpu", "inherits_from": base, "changes": changes,
              "inherited_unchanged": "everything else, incl. " + ("" if patch_size else "patch_size, ")
                                     + "spacing, normalization, data_identifier "
                                     f"('{parent.get('data_identifier')}': the preprocessed data are reused)",
              "features_scale": features_scale}
    return entry, change


def add_cpu_configuration(plans_file: str, base: str, features_scale: float = 0.5, batch_size: Optional[int] = None,
                          write: bool = True, patch_size: Optional[Sequence[int]] = None) -> dict:
    """Add ``<base>_cpu`` (see :func:`cpu_configuration_entry`) to a plans JSON. Idempotent; refuses to
    replace a different existing definition. Returns the change description."""
    with open(plans_file) as f:
        plans = json.load(f)
    entry, change = cpu_configuration_entry(plans, base, features_scale, batch_size, patch_size)
    name = change["name"]
    existing = plans["configurations"].get(name)
    if existing is not None:
        if existing != entry:
            raise BenchmarkError(f"{plans_file} already has a configuration '{name}' that differs from the one "
                                 f"requested ({json.dumps(existing)[:300]}...). Remove it from the plans or use the same "
                                 f"--cpu-features-scale/--cpu-batch-size/--cpu-patch-size as before.")
        change["status"] = "already present"
    elif write:
        plans["configurations"][name] = entry
        tmp = plans_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(plans, f, indent=4, sort_keys=False)
        os.replace(tmp, plans_file)
        change["status"] = "added"
    else:
        change["status"] = "would be added"
    change["plans_file"] = os.path.abspath(plans_file)
    change["entry"] = entry
    return change


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass
class BenchmarkSettings:
    dataset: str
    out: str
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    fold: str = "all"
    trainers: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0])
    epochs: int = 20
    iters: int = 50
    val_iters: Optional[int] = None
    save_every: Optional[int] = None
    device: str = "cpu"
    eval_group: str = "all"
    disable_tta: bool = False
    step_size: float = 0.5
    plans_config: bool = False
    cpu_features_scale: float = 0.5
    cpu_batch_size: Optional[int] = None
    cpu_patch_size: Optional[List[int]] = None
    empty_policy: str = "default"
    #: nnUNetv2_plan_and_preprocess --verify_dataset_integrity when the harness plans the dataset
    verify_integrity: bool = True
    num_processes: int = 1
    n_proc_da: Optional[int] = None
    def_n_proc: Optional[int] = None
    raw: Optional[str] = None
    preprocessed: Optional[str] = None
    #: nnUNet_results of a seed; "{out}" and "{seed}" are filled in
    results_template: str = "{out}/seed_{seed}/nnUNet_results"

    def __post_init__(self):
        self.out = os.path.abspath(self.out)
        self.seeds = [int(s) for s in self.seeds]
        if len(self.seeds) != len(set(self.seeds)):
            raise BenchmarkError(f"duplicate seeds: {self.seeds}")
        if "{seed}" not in self.results_template and len(self.seeds) > 1:
            raise BenchmarkError(f"the nnUNet_results folder '{self.results_template}' has no {{seed}} placeholder, "
                                 f"so several seeds would overwrite each other's models")
        if self.val_iters is None:
            self.val_iters = max(1, self.iters // 10)
        if self.save_every is None:
            self.save_every = max(1, min(50, self.epochs // 10 or 1))
        if self.eval_group not in EVAL_GROUPS:
            raise BenchmarkError(f"eval group must be one of {EVAL_GROUPS}")
        for name in ("epochs", "iters", "val_iters", "save_every"):
            if int(getattr(self, name)) < 1:
                raise BenchmarkError(f"{name} must be >= 1")
        if not self.seeds:
            raise BenchmarkError("at least one seed is needed")
        self.raw = self.raw or os.environ.get("nnUNet_raw")
        self.preprocessed = self.preprocessed or os.environ.get("nnUNet_preprocessed")
        if not self.raw or not self.preprocessed:
            raise BenchmarkError("nnUNet_raw and nnUNet_preprocessed must be set (environment variables, or --raw/"
                                 "--preprocessed); the benchmark's nnUNet_results go into the benchmark folder")

    @property
    def effective_configuration(self) -> str:
        return f"{self.configuration}_cpu" if self.plans_config else self.configuration

    def results_dir(self, seed: int) -> str:
        return self.results_template.format(out=self.out, seed=seed)

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.out, f"seed_{seed}")


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
class Benchmark:
    def __init__(self, settings: BenchmarkSettings, dry_run: bool = False, verbose_commands: bool = True):
        self.s = settings
        self.dry_run = dry_run
        self.verbose_commands = verbose_commands
        self.dataset_name = find_dataset(settings.dataset, [settings.raw, settings.preprocessed])
        self.dataset_id = dataset_id_of(self.dataset_name)
        self.raw_folder = os.path.join(settings.raw, self.dataset_name)
        self.pre_folder = os.path.join(settings.preprocessed, self.dataset_name)
        self.plans_file = os.path.join(self.pre_folder, settings.plans + ".json")
        self.registered = registered_trainers()
        if not settings.trainers:
            settings.trainers = default_trainers(self.registered)
        check_trainers(settings.trainers, self.registered)
        self.plans_change: Optional[dict] = None
        self.cases: List[str] = []
        self.file_ending = ".nii.gz"
        self.run_records: Dict[str, dict] = {}

    # ---- helpers ---------------------------------------------------------------------------
    def env(self, seed: Optional[int] = None, trainer_env: bool = False) -> Dict[str, str]:
        s = self.s
        results = s.results_dir(seed if seed is not None else s.seeds[0])
        env = nnunet_env(s.raw, s.preprocessed, results, s.device, s.n_proc_da, s.def_n_proc, training=trainer_env)
        if trainer_env:
            env.update(self.budget_env(seed))
        return env

    def budget_env(self, seed: Optional[int]) -> Dict[str, str]:
        s = self.s
        # nnU-Net's validation after training is not used (held-out cases are predicted from checkpoint_final)
        env = {"nnUNet_semi_epochs": str(s.epochs), "nnUNet_semi_iters": str(s.iters),
               "nnUNet_semi_val_iters": str(s.val_iters), "nnUNet_semi_save_every": str(s.save_every),
               "nnUNet_semi_skip_final_validation": "1"}
        if seed is not None:
            env["nnUNet_semi_seed"] = str(seed)
        return env

    def echo_env(self, seed: Optional[int] = None, trainer_env: bool = False) -> Dict[str, str]:
        """The variables printed in front of a command (what differs from the user's shell)."""
        out = {"nnUNet_results": self.s.results_dir(seed if seed is not None else self.s.seeds[0])}
        env = self.env(seed, trainer_env)
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
            if env.get(k) != os.environ.get(k):
                out[k] = env[k]
        if trainer_env:
            out.update(self.budget_env(seed))
        return out

    def model_dir(self, trainer: str, seed: int) -> str:
        return os.path.join(self.s.results_dir(seed), self.dataset_name,
                            f"{trainer}__{self.s.plans}__{self.s.effective_configuration}", f"fold_{self.s.fold}")

    def pred_dir(self, trainer: str, seed: int) -> str:
        return os.path.join(self.s.seed_dir(seed), "predictions", trainer)

    def eval_file(self, trainer: str, seed: int) -> str:
        return os.path.join(self.s.seed_dir(seed), "eval", trainer + ".json")

    def curves_file(self, trainer: str, seed: int) -> str:
        return os.path.join(self.s.seed_dir(seed), "curves", trainer + ".json")

    def log_file(self, what: str, trainer: str, seed: int) -> str:
        return os.path.join(self.s.seed_dir(seed), "logs", f"{what}_{trainer}.log")

    def inputs_dir(self) -> str:
        return os.path.join(self.s.out, f"inputs_{self.s.eval_group}")

    def _run(self, cmd, env, log, progress=None, echo=None) -> float:
        if self.dry_run:
            print(shell_line(cmd, echo), flush=True)
            return 0.0
        return run_command(cmd, env, log, progress, echo, quiet=not self.verbose_commands)

    # ---- preparation -----------------------------------------------------------------------
    def _dataset_json(self) -> dict:
        path = os.path.join(self.raw_folder, "dataset.json")
        if not os.path.isfile(path):
            raise BenchmarkError(f"{path} does not exist: the raw dataset is needed for the held-out images and "
                                 f"labels (imagesTs/labelsTs)")
        with open(path) as f:
            return json.load(f)

    def select_cases(self) -> List[str]:
        """Held-out cases with a reference in labelsTs, restricted to the split's group if asked."""
        from nnunet_semi.layout import IMAGES_TS, LABELS_TS, SemiSplit, find_image_cases
        dj = self._dataset_json()
        self.file_ending = dj["file_ending"]
        images = find_image_cases(os.path.join(self.raw_folder, IMAGES_TS), dj["file_ending"], len(dj["channel_names"]))
        labeled = [c for c in sorted(images)
                   if os.path.isfile(os.path.join(self.raw_folder, LABELS_TS, c + dj["file_ending"]))]
        no_ref = sorted(set(images) - set(labeled))
        if no_ref:
            say(f"note: {len(no_ref)} imagesTs case(s) have no labelsTs reference and are not evaluated: "
                f"{no_ref[:5]}{' ...' if len(no_ref) > 5 else ''}")
        if self.s.eval_group != "all":
            split = SemiSplit.load(self.raw_folder)
            if split is None:
                raise BenchmarkError(f"--eval-group {self.s.eval_group} needs {self.raw_folder}/splits_semi.json")
            group = getattr(split, self.s.eval_group)
            absent = [c for c in group if c not in labeled]
            if absent:
                say(f"note: {len(absent)} case(s) of the split's '{self.s.eval_group}' group are not in imagesTs/"
                    f"labelsTs and are skipped: {absent[:5]}{' ...' if len(absent) > 5 else ''}")
            labeled = [c for c in labeled if c in set(group)]
        if not labeled:
            raise BenchmarkError(f"no held-out case to evaluate in {self.raw_folder}/imagesTs with a reference in "
                                 f"labelsTs (group '{self.s.eval_group}')")
        self.cases = labeled
        self._images = images
        return labeled

    def build_inputs(self) -> str:
        folder = self.inputs_dir()
        if self.dry_run:
            return folder
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder)
        for c in self.cases:
            for src in self._images[c]:
                dst = os.path.join(folder, os.path.basename(src))
                try:
                    os.symlink(os.path.abspath(src), dst)
                except OSError:
                    shutil.copy2(src, dst)
        return folder

    def ensure_preprocessed(self) -> None:
        """Plan/preprocess the labeled data and the unlabeled images where that was not done yet."""
        s = self.s
        n = str(max(1, s.num_processes))
        env = self.env()
        if not os.path.isfile(self.plans_file):
            if s.plans != "nnUNetPlans":
                raise BenchmarkError(f"{self.plans_file} does not exist; create the plans '{s.plans}' first")
            say(f"plan and preprocess {self.dataset_name} ({s.configuration})")
            self._run(["nnUNetv2_plan_and_preprocess", "-d", str(self.dataset_id), "-c", s.configuration, "-np", n,
                       "-npfp", n] + (["--verify_dataset_integrity"] if s.verify_integrity else []), env,
                      os.path.join(s.out, "logs", "plan_and_preprocess.log"))
            if self.dry_run:
                return self._dry_run_rest()
        with open(self.plans_file) as f:
            plans = json.load(f)
        base = resolve_configuration(plans, s.configuration)
        data_folder = os.path.join(self.pre_folder, base["data_identifier"])
        if not os.path.isdir(data_folder) or not any(x.endswith(".pkl") for x in os.listdir(data_folder)):
            say(f"preprocess {self.dataset_name} ({s.configuration})")
            self._run(["nnUNetv2_preprocess", "-d", str(self.dataset_id), "-c", s.configuration, "-plans_name", s.plans,
                       "-np", n], env, os.path.join(s.out, "logs", "preprocess.log"))
        if s.plans_config:
            self.plans_change = add_cpu_configuration(self.plans_file, s.configuration, s.cpu_features_scale,
                                                      s.cpu_batch_size, write=not self.dry_run,
                                                      patch_size=s.cpu_patch_size)
            ch = self.plans_change["changes"]
            say(f"configuration {self.plans_change['name']} ({self.plans_change['status']}): inherits_from "
                f"{s.configuration}; " + "; ".join(f"{k.split('.')[-1]} {v['from']} -> {v['to']}" for k, v in ch.items()))
        if any(is_semi_supervised(self.registered[t]) for t in s.trainers):
            self.ensure_unlabeled(base["data_identifier"], env, n)

    def _dry_run_rest(self) -> None:
        s = self.s
        if s.plans_config:
            say(f"(dry run) then add configuration {s.configuration}_cpu (inherits_from {s.configuration}, "
                f"features x{s.cpu_features_scale}, batch {s.cpu_batch_size or 'min(base, 2)'}"
                + (f", patch {s.cpu_patch_size}" if s.cpu_patch_size else "") + f") to {self.plans_file}")
        if any(is_semi_supervised(self.registered[t]) for t in s.trainers):
            print(shell_line(["nnUNetv2_preprocess_unlabeled", "-d", str(self.dataset_id), "-c",
                              s.effective_configuration, "-plans_name", s.plans, "-np", str(max(1, s.num_processes))]))

    def ensure_unlabeled(self, data_identifier: str, env, n: str) -> None:
        from nnunet_semi.layout import plans_identity, read_manifest
        s = self.s
        cfg = s.effective_configuration
        cmd = ["nnUNetv2_preprocess_unlabeled", "-d", str(self.dataset_id), "-c", cfg, "-plans_name", s.plans, "-np", n]
        log = os.path.join(s.out, "logs", "preprocess_unlabeled.log")
        manifest = read_manifest(self.pre_folder, data_identifier)
        if manifest is None:
            say(f"preprocess the unlabeled images of {self.dataset_name} ({cfg})")
            self._run(cmd, env, log)
            return
        with open(self.plans_file) as f:
            plans = json.load(f)
        if cfg not in plans["configurations"]:  # dry run: the _cpu configuration is not written yet
            say(f"(dry run) the unlabeled data in {data_identifier}_unlabeled will be checked against {cfg} (a _cpu "
                f"configuration shares its parent's plans identity: same preprocessing)")
            return
        if manifest.get("plans_identity") == plans_identity(plans, cfg):
            return
        raise BenchmarkError(f"the unlabeled data in {self.pre_folder}/{data_identifier}_unlabeled were preprocessed "
                             f"with other plans than {self.plans_file} ({cfg}). Re-run: {shell_line(cmd)} --overwrite")

    # ---- settings.json ---------------------------------------------------------------------
    def settings_dict(self) -> dict:
        s = self.s
        d = asdict(s)
        d["dataset"] = self.dataset_name
        d["dataset_id"] = self.dataset_id
        d["effective_configuration"] = s.effective_configuration
        d["iterations_total"] = s.epochs * s.iters
        d["budget_env"] = self.budget_env(None)
        d["checkpoint"] = CHECKPOINT
        d["plans_config_change"] = self.plans_change
        d["evaluated_cases"] = list(self.cases)
        d["n_evaluated_cases"] = len(self.cases)
        d["file_ending"] = self.file_ending
        d["trainer_classes"] = {t: f"{self.registered[t].__module__}.{self.registered[t].__qualname__}"
                                for t in s.trainers}
        env = self.env(trainer_env=True)
        d["nnunet_env"] = {k: env.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_n_proc_DA",
                                                   "nnUNet_def_n_proc", "nnUNet_extTrainer", "OMP_NUM_THREADS")}
        d["git_commit"] = git_commit()
        d["machine"] = machine_info(s.device)
        d["command_line"] = " ".join(shlex.quote(a) for a in sys.argv)
        d["protocol_notes"] = (
            f"fold '{s.fold}': " + ("nnU-Net trains on all labeled cases (its per-epoch pseudo Dice and final "
                                    "validation then run on training cases and are not used here)" if s.fold == "all"
                                    else "nnU-Net's split of the labeled cases")
            + f"; every arm gets {s.epochs} epochs x {s.iters} iterations via nnUNet_semi_*; predictions from "
              f"{CHECKPOINT} (no checkpoint selection on held-out data); metrics by nnunet_semi.evaluation "
              f"(empty policy '{s.empty_policy}'); mean ± std (ddof 0) over seeds x cases")
        return d

    def check_resume_settings(self) -> None:
        path = os.path.join(self.s.out, "settings.json")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            old = json.load(f)
        new = self.settings_dict()
        diff = {k: (old.get(k), new.get(k)) for k in KEY_SETTINGS if old.get(k) != new.get(k)}
        if diff:
            raise BenchmarkError(
                f"{self.s.out} holds a benchmark with other settings: "
                + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                + ". Use another --out folder (or delete that one) to start a new benchmark.")

    def write_settings(self) -> None:
        if self.dry_run:
            return
        d = self.settings_dict()
        path = os.path.join(self.s.out, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            d["first_started"] = old.get("first_started", old.get("started"))
            d["trainers"], d["seeds"] = self.report_scope()
        d["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        d.setdefault("first_started", d["started"])
        with open(path, "w") as f:
            json.dump(d, f, indent=2)

    # ---- runs ------------------------------------------------------------------------------
    def predictions_complete(self, trainer: str, seed: int) -> bool:
        folder = self.pred_dir(trainer, seed)
        return os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, c + self.file_ending))
                                             for c in self.cases)

    def run_status(self, trainer: str, seed: int) -> str:
        md = self.model_dir(trainer, seed)
        if os.path.isfile(os.path.join(md, CHECKPOINT)):
            return "done" if self.predictions_complete(trainer, seed) else "predict"
        if os.path.isfile(os.path.join(md, "checkpoint_latest.pth")):
            return "resume"
        return "train"

    def train(self, trainer: str, seed: int, resume: bool) -> float:
        s = self.s
        cmd = ["nnUNetv2_train", str(self.dataset_id), s.effective_configuration, s.fold, "-tr", trainer, "-p", s.plans,
               "-device", s.device] + (["--c"] if resume else [])
        label = f"{trainer} seed {seed}"
        return self._run(cmd, self.env(seed, trainer_env=True), self.log_file("train", trainer, seed),
                         EpochProgress(label, s.epochs), self.echo_env(seed, trainer_env=True))

    def predict(self, trainer: str, seed: int) -> float:
        s = self.s
        final = self.pred_dir(trainer, seed)
        tmp = final + ".tmp"
        if not self.dry_run:
            for p in (tmp, final):
                if os.path.isdir(p):
                    shutil.rmtree(p)
        # on CPU: -npp 0 -nps 0 = nnU-Net's sequential prediction in one process (no spawned workers, which
        # each import torch and nnU-Net: on small machines that start-up dominates the run)
        npp = "0" if s.device == "cpu" else "3"
        cmd = ["nnUNetv2_predict", "-i", self.inputs_dir(), "-o", tmp if not self.dry_run else final,
               "-d", str(self.dataset_id), "-c", s.effective_configuration, "-p", s.plans, "-tr", trainer, "-f", s.fold,
               "-chk", CHECKPOINT, "-device", s.device, "-step_size", str(s.step_size), "-npp", npp, "-nps", npp]
        if s.disable_tta:
            cmd.append("--disable_tta")
        t = self._run(cmd, self.env(seed), self.log_file("predict", trainer, seed), echo=self.echo_env(seed))
        if not self.dry_run:
            os.replace(tmp, final)
        return t

    def save_curves(self, trainer: str, seed: int) -> Optional[dict]:
        ckpt = os.path.join(self.model_dir(trainer, seed), CHECKPOINT)
        out = self.curves_file(trainer, seed)
        if os.path.isfile(out) and os.path.isfile(ckpt) and os.path.getmtime(out) >= os.path.getmtime(ckpt):
            with open(out) as f:
                return json.load(f)
        if not os.path.isfile(ckpt):
            return None
        import torch
        logging = torch.load(ckpt, map_location="cpu", weights_only=False).get("logging", {})
        curves = {}
        for k, v in logging.items():
            if k in ("epoch_start_timestamps", "epoch_end_timestamps"):
                continue
            try:
                curves[k] = [[float(x) for x in e] if isinstance(e, (list, tuple, np.ndarray)) else float(e) for e in v]
            except (TypeError, ValueError):
                continue
        ts, te = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
        curves["epoch_time_s"] = [float(b) - float(a) for a, b in zip(ts, te)]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(curves, f)
        return curves

    def evaluate(self, trainer: str, seed: int, force: bool = False) -> Optional[dict]:
        from nnunet_semi.evaluation.evaluate import evaluate_folder
        pred = self.pred_dir(trainer, seed)
        out = self.eval_file(trainer, seed)
        if not self.predictions_complete(trainer, seed):
            return None
        newest = max(os.path.getmtime(os.path.join(pred, c + self.file_ending)) for c in self.cases)
        if not force and os.path.isfile(out) and os.path.getmtime(out) >= newest:
            with open(out) as f:
                summary = json.load(f)
            if sorted(c["case"] for c in summary["metric_per_case"]) == sorted(self.cases) and \
                    summary["settings"].get("empty_policy") == self.s.empty_policy:
                return summary
        summary = evaluate_folder(os.path.join(self.raw_folder, "labelsTs"), pred,
                                  dataset_json=os.path.join(self.raw_folder, "dataset.json"), case_ids=self.cases,
                                  num_processes=self.s.num_processes, empty_policy=self.s.empty_policy,
                                  output_file=out, progress=False)
        return summary

    def run(self, report_only: bool = False, reevaluate: bool = False) -> Optional[dict]:
        s = self.s
        if not self.dry_run:
            os.makedirs(s.out, exist_ok=True)
        self.select_cases()
        say(f"benchmark {self.dataset_name}, configuration {s.effective_configuration}, fold {s.fold}, device "
            f"{s.device}: trainers {', '.join(s.trainers)}; seeds {s.seeds}; budget {s.epochs} epochs x {s.iters} "
            f"iterations (val {s.val_iters}); {len(self.cases)} held-out case(s) ({s.eval_group}); out {s.out}")
        self.check_resume_settings()
        if not report_only:
            self.ensure_preprocessed()
            if self.dry_run and not os.path.isfile(self.plans_file):
                self.run_all_dry()
                return None
            self.write_settings()
            self.build_inputs()
            self.run_all()
        if self.dry_run:
            return None
        return self.report(reevaluate)

    def run_all_dry(self) -> None:
        for seed in self.s.seeds:
            for trainer in self.s.trainers:
                self.train(trainer, seed, resume=False)
                self.predict(trainer, seed)

    def _record(self, trainer: str, seed: int, add: Optional[Mapping[str, float]] = None, **values) -> None:
        """Update ``<out>/runs.json`` (wall times per run; ``add`` accumulates, e.g. over resumed trainings)."""
        path = os.path.join(self.s.out, "runs.json")
        records = {}
        if os.path.isfile(path):
            with open(path) as f:
                records = json.load(f)
        rec = records.setdefault(f"{trainer}/seed_{seed}", {"trainer": trainer, "seed": seed})
        for k, v in (add or {}).items():
            rec[k] = round(rec.get(k, 0.0) + v, 1)
        rec.update(values)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=2)
        os.replace(tmp, path)

    def run_all(self) -> None:
        s = self.s
        total = len(s.seeds) * len(s.trainers)
        i = 0
        for seed in s.seeds:
            for trainer in s.trainers:
                i += 1
                tag = f"({i}/{total}) {trainer} seed {seed}"
                status = self.run_status(trainer, seed)
                if self.dry_run:
                    say(f"{tag}: {status}")
                    if status in ("train", "resume"):
                        self.train(trainer, seed, resume=status == "resume")
                    if status != "done":
                        self.predict(trainer, seed)
                    continue
                if status == "done":
                    say(f"{tag}: skip (checkpoint_final and predictions exist)")
                    self.save_curves(trainer, seed)
                    continue
                if status in ("train", "resume"):
                    say(f"{tag}: {'resume training from checkpoint_latest (--c)' if status == 'resume' else 'train'}")
                    t = self.train(trainer, seed, resume=status == "resume")
                    if status == "train":
                        self._record(trainer, seed, train_s=round(t, 1), resumed=False)
                    else:
                        self._record(trainer, seed, add={"train_s": t}, resumed=True)
                    self._record(trainer, seed, trained_at=time.strftime("%Y-%m-%d %H:%M:%S"))
                    say(f"{tag}: trained in {fmt_seconds(t)}")
                else:
                    say(f"{tag}: skip training (checkpoint_final exists); predict")
                t = self.predict(trainer, seed)
                self._record(trainer, seed, predict_s=round(t, 1))
                say(f"{tag}: predicted {len(self.cases)} case(s) in {fmt_seconds(t)}")
                self.save_curves(trainer, seed)

    # ---- report ----------------------------------------------------------------------------
    def report_scope(self) -> Tuple[List[str], List[int]]:
        """The trainers and seeds the report covers: every one recorded in ``<out>/settings.json`` (the union
        over all invocations on this folder) plus those of this call, so that a call with ``-s 1`` or one
        ``-tr`` does not shrink ``results.md`` to its own runs."""
        trainers, seeds = list(self.s.trainers), list(self.s.seeds)
        path = os.path.join(self.s.out, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            trainers = list(dict.fromkeys(list(old.get("trainers", [])) + trainers))
            seeds = sorted(set(old.get("seeds", [])) | set(seeds))
        return trainers, seeds

    def report(self, reevaluate: bool = False) -> dict:
        s = self.s
        trainers, seeds = self.report_scope()
        say(f"evaluate: trainers {', '.join(trainers)}; seeds {seeds} (every run recorded in this folder)")
        summaries: Dict[str, Dict[int, dict]] = {}
        curves: Dict[str, Dict[int, dict]] = {}
        missing = []
        for trainer in trainers:
            for seed in seeds:
                summ = self.evaluate(trainer, seed, force=reevaluate)
                if summ is None:
                    missing.append(f"{trainer}/seed {seed}")
                    continue
                summaries.setdefault(trainer, {})[seed] = summ
                c = self.save_curves(trainer, seed)
                if c:
                    curves.setdefault(trainer, {})[seed] = c
        if not summaries:
            raise BenchmarkError(f"no finished run to report in {s.out}" + (f" (missing: {missing})" if missing else ""))
        runs = {}
        path = os.path.join(s.out, "runs.json")
        if os.path.isfile(path):
            with open(path) as f:
                runs = json.load(f)
        agg = aggregate(summaries, baseline=BASELINE if BASELINE in summaries else next(iter(summaries)))
        agg["missing_runs"] = missing
        for trainer, per_seed in curves.items():
            for seed, c in per_seed.items():
                key = f"{trainer}/seed_{seed}"
                runs[key] = {"trainer": trainer, "seed": seed, **runs.get(key, {}), **curve_milestones(c)}
        agg["runs"] = runs
        title = (f"{self.dataset_name}, configuration {s.effective_configuration}, fold {s.fold}, "
                 f"{s.epochs} epochs x {s.iters} iterations, seeds {seeds}")
        if s.empty_policy != "default":
            title += f", empty-mask policy '{s.empty_policy}'"
        md = results_markdown(agg, title, self.settings_dict())
        stem = "results" if s.empty_policy == "default" else f"results_{s.empty_policy}"
        with open(os.path.join(s.out, stem + ".md"), "w") as f:
            f.write(md)
        from nnunet_semi.evaluation.evaluate import save_json
        save_json(agg, os.path.join(s.out, stem + ".json"))
        plot_benchmark(agg, curves, os.path.join(s.out, "benchmark.png"), title)
        agg["markdown"] = md
        agg["curves"] = curves
        agg["report_files"] = [os.path.join(s.out, x) for x in (stem + ".md", stem + ".json", "benchmark.png",
                                                                "settings.json")]
        say(f"wrote {os.path.join(s.out, stem + '.md')}, {stem}.json, benchmark.png, settings.json")
        return agg


def curve_milestones(curves: Mapping[str, list], threshold: float = PSEUDO_DICE_MILESTONE) -> dict:
    """From one run's nnU-Net logging: the first epoch (1-based) whose pseudo Dice (``mean_fg_dice``, nnU-Net's
    per-epoch validation patches) reaches ``threshold``, and the last epoch's pseudo Dice. A run that leaves
    nnU-Net's early all-background phase late has little budget left; these show when that happened."""
    dice = [float(x) for x in curves.get("mean_fg_dice", []) if x is not None]
    first = next((i + 1 for i, x in enumerate(dice) if np.isfinite(x) and x >= threshold), None)
    return {"pseudo_dice_first_epoch": first, "pseudo_dice_last": dice[-1] if dice else None}


# --------------------------------------------------------------------------------------------
# aggregation over seeds and cases
# --------------------------------------------------------------------------------------------
def _finite(values) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def mean_std(values) -> dict:
    v = _finite(values)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def aggregate(summaries: Mapping[str, Mapping[int, dict]], baseline: str) -> dict:
    """Pool the per-case metrics of every (seed, case) per method; seed-level means; paired differences
    against ``baseline`` on the (seed, case) pairs both have.

    ``summaries``: method -> seed -> :func:`nnunet_semi.evaluation.evaluate_folder` result."""
    from nnunet_semi.evaluation.evaluate import FOREGROUND, PAIRED_METRICS, paired_difference, per_case_foreground
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
    paired = {}
    for m in methods:
        if m == baseline:
            continue
        paired[m] = {}
        for key in keys + [FOREGROUND]:
            paired[m][key] = {}
            for metric in PAIRED_METRICS:
                a, b = values[baseline][key][metric], values[m][key][metric]
                pd = paired_difference(a, b)
                common = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
                better = (lambda x, y: y > x) if metric in ("Dice", "Jaccard") else (lambda x, y: y < x)
                pd["wins"] = sum(1 for k in common if better(a[k], b[k]))
                pd["losses"] = sum(1 for k in common if better(b[k], a[k]))
                pd["ties"] = len(common) - pd["wins"] - pd["losses"]
                paired[m][key][metric] = pd
    n_cases = {m: {seed: len(summ["metric_per_case"]) for seed, summ in summaries[m].items()} for m in methods}
    empty = {m: {key: {kind: sum(summ["empty_counts"][key][kind] for summ in summaries[m].values())
                       for kind in ("n_empty_pred", "n_empty_ref", "n_both_empty")} for key in keys}
             for m in methods}
    return {"methods": methods, "baseline": baseline, "label_keys": keys, "label_names": names, "stats": stats,
            "seed_level": seed_level, "paired": paired, "values": values, "n_cases": n_cases, "empty_counts": empty,
            "seeds": {m: sorted(summaries[m]) for m in methods}}


def _fmt(stat: Mapping, scale: float = 1.0, digits: int = 2) -> str:
    from nnunet_semi.evaluation.evaluate import format_mean_std
    return format_mean_std(stat, scale, digits)


def _fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def results_table(agg: dict, classes: bool = True, digits: int = 2) -> str:
    """| Method | Class | Dice (%) | Jaccard (%) | 95HD (mm) | ASD (mm) | 95HD (voxel) | ASD (voxel) | n |;
    ``mean ± std`` over seeds x cases; per class (if ``classes``) and the Mean row."""
    from nnunet_semi.evaluation.evaluate import FOREGROUND
    header = ["Method", "Class", "Dice (%)", "Jaccard (%)", "95HD (mm)", "ASD (mm)", "95HD (voxel)", "ASD (voxel)", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = (list(agg["label_keys"]) if classes else []) + [FOREGROUND]
    for m in agg["methods"]:
        for key in keys:
            st = agg["stats"][m][key]
            lines.append("| " + " | ".join([
                m, agg["label_names"][key] if key == FOREGROUND else f"{agg['label_names'][key]} ({key})",
                _fmt(st["Dice"], 100, digits), _fmt(st["Jaccard"], 100, digits), _fmt(st["HD95_mm"], 1, digits),
                _fmt(st["ASD_mm"], 1, digits), _fmt(st["HD95_vox"], 1, digits), _fmt(st["ASD_vox"], 1, digits),
                str(st["Dice"]["n"])]) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(agg: dict, title: str, settings: Optional[dict] = None, digits: int = 2) -> str:
    from nnunet_semi.evaluation.evaluate import FOREGROUND
    out = [f"# Benchmark: {title}", ""]
    if settings:
        out += [f"- held-out cases: {settings.get('n_evaluated_cases')} ({settings.get('eval_group')}), predicted from "
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
    header = ["Method"] + [f"seed {s}" for s in seeds] + ["over seeds"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in agg["methods"]:
        per = agg["seed_level"][m]["per_seed"]
        row = [m] + [(f"{100 * per[s]['Dice']:.{digits}f}" if s in per and math.isfinite(per[s]["Dice"]) else "–")
                     for s in seeds]
        row.append(_fmt(agg["seed_level"][m]["over_seeds"]["Dice"], 100, digits))
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    if agg["paired"]:
        base = agg["baseline"]
        out += [f"## Paired comparison against {base} (method − {base}, per seed and case)", "",
                "Same seed and case in both arms. p: two-sided Wilcoxon signed-rank test over the pairs (n ≥ 5; pairs "
                "of one case under different seeds are not independent, so read p as a rough guide). W/T/L: pairs "
                "where the method is better / equal / worse.", ""]
        header = ["Method", "Class", "n", "ΔDice (%)", "p (Dice)", "W/T/L (Dice)", "Δ95HD (mm)", "p (95HD)",
                  "ΔASD (mm)"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m, per_key in agg["paired"].items():
            for key in list(agg["label_keys"]) + [FOREGROUND]:
                d, h, a = per_key[key]["Dice"], per_key[key]["HD95_mm"], per_key[key]["ASD_mm"]
                name = agg["label_names"][key] if key == FOREGROUND else f"{agg['label_names'][key]} ({key})"
                out.append("| " + " | ".join([
                    m, name, str(d["n"]),
                    _fmt({"mean": d["mean_diff"], "std": d["std_diff"], "n": d["n"]}, 100, digits), _fmt_p(d["p_value"]),
                    f"{d['wins']}/{d['ties']}/{d['losses']}",
                    _fmt({"mean": h["mean_diff"], "std": h["std_diff"], "n": h["n"]}, 1, digits), _fmt_p(h["p_value"]),
                    _fmt({"mean": a["mean_diff"], "std": a["std_diff"], "n": a["n"]}, 1, digits)]) + " |")
        out.append("")
    runs = agg.get("runs") or {}
    if runs:
        out += ["## Runs", "",
                f"Pseudo Dice: nnU-Net's per-epoch Dice on patches of its validation split (with fold 'all': the "
                f"labeled training cases), never the held-out cases; 'from epoch' = the first epoch at which it reached "
                f"{PSEUDO_DICE_MILESTONE:g} (a late epoch means a run stayed long in the all-background phase).", "",
                f"| Method | seed | train time | predict time | resumed | pseudo Dice ≥ {PSEUDO_DICE_MILESTONE:g} from "
                f"epoch | last pseudo Dice |", "|---|---|---|---|---|---|---|"]
        order = {m: i for i, m in enumerate(agg["methods"])}
        seeds_of = agg["seeds"]
        shown = [r for r in runs.values() if r["trainer"] in order and r["seed"] in seeds_of[r["trainer"]]]
        for rec in sorted(shown, key=lambda r: (order[r["trainer"]], r["seed"])):
            out.append(f"| {rec['trainer']} | {rec['seed']} | "
                       f"{fmt_seconds(rec['train_s']) if 'train_s' in rec else '–'} | "
                       f"{fmt_seconds(rec['predict_s']) if 'predict_s' in rec else '–'} | "
                       f"{'yes' if rec.get('resumed') else 'no'} | "
                       f"{rec['pseudo_dice_first_epoch'] if rec.get('pseudo_dice_first_epoch') else '–'} | "
                       f"{format(rec['pseudo_dice_last'], '.3f') if rec.get('pseudo_dice_last') is not None else '–'} |")
        out.append("")
    if agg.get("missing_runs"):
        out += [f"Missing (not finished, not in the tables): {', '.join(agg['missing_runs'])}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot_benchmark(agg: dict, curves: Mapping[str, Mapping[int, dict]], output_file: str, title: str = "") -> None:
    """Per-method Dice spread (box + points per seed and case) and the training curves of each run."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from nnunet_semi.evaluation.evaluate import FOREGROUND

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
    draw(axes[1, 1], lambda k: (k not in NNUNET_LOG_KEYS and k not in RATIO_TERMS and k not in OWN_SCALE_TERMS
                                and k != "epoch_time_s"),
         "loss term", "semi-supervised loss terms")
    draw(axes[1, 2], lambda k: k in RATIO_TERMS, "value in [0, 1]",
         "pseudo-label confidence / mask ratio / ramp-up / threshold")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    fig.savefig(output_file, dpi=80)
    plt.close(fig)
