"""A benchmark's settings (:class:`BenchmarkSettings`, the key settings a folder is tied to), the dataset it runs
on, and the provenance its ``settings.json`` records (commit, machine)."""
from __future__ import annotations

import multiprocessing
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from nnunet_semi.benchmark.commands import BenchmarkError

CHECKPOINT = "checkpoint_final.pth"
EVAL_GROUPS = ("all", "val", "test")
#: settings that must not change when a benchmark folder is resumed
KEY_SETTINGS = ("dataset", "configuration", "plans", "fold", "epochs", "iters", "val_iters", "device",
                "plans_config", "cpu_features_scale", "cpu_batch_size", "cpu_patch_size", "eval_group", "eval_domain",
                "disable_tta", "step_size")


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
    #: evaluate only the held-out cases of this case_metadata.json domain ("target": its target_domain)
    eval_domain: Optional[str] = None
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
        if self.eval_domain is not None and not str(self.eval_domain).strip():
            raise BenchmarkError("eval domain must be a domain of case_metadata.json (or 'target'), not empty")
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


def archived_commit(repo: str) -> Optional[str]:
    """The commit a ``git archive`` copy of the code was made from: ``nnunet_semi/COMMIT`` holds ``$Format:%H$``,
    which git substitutes on archiving (``.gitattributes``: export-subst). None in a checkout or without the file."""
    try:
        with open(os.path.join(repo, "nnunet_semi", "COMMIT")) as f:
            text = f.read().strip()
    except OSError:
        return None
    return text if text and not text.startswith("$Format") else None


def git_commit(repo: Optional[str] = None) -> str:
    """HEAD of the code's checkout (``-dirty`` with uncommitted changes to tracked files), the commit of a ``git
    archive`` copy (:func:`archived_commit`), or ``'unknown'``."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return archived_commit(repo) or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=10)
        return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return archived_commit(repo) or "unknown"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: what a run's numbers may depend on beyond its seed and settings: the same seed and code gave supervised runs 0.2-0.6
#: Dice points apart on two machines (benchmarks/RESULTS.md)
ENVIRONMENT_KEYS = ("commit", "torch", "nnunetv2", "cpu_model", "platform")


def run_environment(device: str) -> dict:
    """The :data:`ENVIRONMENT_KEYS` of this process: the code's commit, torch, nnU-Net, CPU and platform."""
    m = machine_info(device)
    env = {"commit": git_commit(), **{k: m.get(k) for k in ENVIRONMENT_KEYS if k != "commit"}}
    if m.get("gpu"):
        env["gpu"] = m["gpu"]
    return env


def machine_info(device: str) -> dict:
    info = {"cpu_count": multiprocessing.cpu_count(), "cpu_model": cpu_model(), "platform": platform.platform(),
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
