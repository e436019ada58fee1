"""The benchmark itself (:class:`Benchmark`): from the settings and the state of the benchmark folder it decides
what each (trainer, seed) run needs (skip, predict, resume with ``--c``, train), builds nnU-Net's commands and
hands every step with an effect to its executor (:mod:`nnunet_semi.benchmark.executor`: the real one, or the
dry run's). It also owns the list of what it writes into the folder (:func:`benchmark_outputs`)."""
from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from nnunet_semi.benchmark.aggregate import run_curves
from nnunet_semi.benchmark.commands import BenchmarkError, EpochProgress, nnunet_env, say, shell_line
from nnunet_semi.benchmark.executor import Executor, link_files, remove_folders
from nnunet_semi.benchmark.plans_variant import add_cpu_configuration, resolve_configuration, write_configuration
from nnunet_semi.benchmark.report import PLOT_FILE, write_report
from nnunet_semi.benchmark.settings import (CHECKPOINT, EVAL_GROUPS, KEY_SETTINGS, BenchmarkSettings, dataset_id_of,
                                            find_dataset, git_commit, machine_info,
                                            run_environment)
from nnunet_semi.benchmark.trainers import (check_trainers, default_trainers, is_semi_supervised, registered_trainers,
                                          split_arm)
from nnunet_semi.reporting import fmt_seconds
from nnunet_semi.training.progress_file import PROGRESS_FILE

#: the stages :meth:`Benchmark.run` announces to its ``on_stage`` callback, in order ("preprocess" and "runs"
#: only when it trains)
STAGES = ("start", "preprocess", "runs", "report")
#: what a run's status makes the benchmark say (and do)
STATUS_MESSAGES = {"done": "skip (checkpoint_final and predictions exist)",
                   "predict": "skip training (checkpoint_final exists); predict",
                   "resume": "resume training from checkpoint_latest (--c)",
                   "train": "train"}
SETTINGS_FILE, RUNS_FILE = "settings.json", "runs.json"


def report_stem(empty_policy: str) -> str:
    return "results" if empty_policy == "default" else f"results_{empty_policy}"


def benchmark_outputs(out: str) -> List[str]:
    """Every entry a benchmark may write directly in its folder ``out`` (seed folders: those that exist)."""
    from nnunet_semi.evaluation.metrics import EMPTY_POLICIES
    names = [SETTINGS_FILE, RUNS_FILE, PLOT_FILE, "logs"] + [f"inputs_{g}" for g in EVAL_GROUPS]
    names += [report_stem(p) + ext for p in EMPTY_POLICIES for ext in (".md", ".json")]
    seeds = sorted(n for n in os.listdir(out) if n.startswith("seed_") and os.path.isdir(os.path.join(out, n))) \
        if os.path.isdir(out) else []
    return [os.path.join(out, n) for n in names + seeds]


def announce(stage: str, bench: "Benchmark") -> None:
    """The default ``on_stage`` of :meth:`Benchmark.run`: one line saying what the benchmark covers."""
    if stage == "start":
        s = bench.s
        say(f"benchmark {bench.dataset_name}, configuration {s.effective_configuration}, fold {s.fold}, device "
            f"{s.device}: trainers {', '.join(s.trainers)}; seeds {s.seeds}; budget {s.epochs} epochs x {s.iters} "
            f"iterations (val {s.val_iters}); {len(bench.cases)} held-out case(s) ({s.eval_group}"
            + (f", domain {bench.domain}" if bench.domain is not None else "") + f"); out {s.out}")


class Benchmark:
    """``executor``: :class:`~nnunet_semi.benchmark.executor.Executor` (default) or its dry run.
    ``train_env``: variables added to the environment of every training (the demo's warm-up schedule)."""

    def __init__(self, settings: BenchmarkSettings, executor: Optional[Executor] = None,
                 train_env: Optional[Mapping[str, str]] = None):
        self.s = settings
        self.executor = executor if executor is not None else Executor()
        self.train_env = dict(train_env or {})
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
        #: the domain of the evaluated cases (``--eval-domain``, ``target`` resolved), or None
        self.domain: Optional[str] = None
        self.file_ending = ".nii.gz"

    @functools.cached_property
    def environment(self) -> dict:
        """What this process trains with beyond the settings (commit, torch, CPU, ...), recorded per run in
        ``runs.json`` so that the report can tell the pairs of one seed trained in different environments."""
        return run_environment(self.s.device)

    # ---- environment and paths -------------------------------------------------------------
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
        env.update(self.train_env)
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
        """The run's fold folder (an arm ``TRAINER@NETWORK`` shares TRAINER's)."""
        return os.path.join(self.s.results_dir(seed), self.dataset_name,
                            f"{split_arm(trainer)[0]}__{self.s.plans}__{self.s.effective_configuration}",
                            f"fold_{self.s.fold}")

    @staticmethod
    def checkpoint_name(trainer: str) -> str:
        """What nnUNetv2_predict loads (``-chk``): checkpoint_final.pth, or for an arm ``TRAINER@NETWORK`` the
        checkpoint nnUNetv2_semi_export writes beside it."""
        network = split_arm(trainer)[1]
        return CHECKPOINT if network is None else f"{os.path.splitext(CHECKPOINT)[0]}_{network}.pth"

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

    def report_files(self) -> List[str]:
        stem = report_stem(self.s.empty_policy)
        return [os.path.join(self.s.out, x) for x in (stem + ".md", stem + ".json", PLOT_FILE, SETTINGS_FILE)]

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
        if self.s.eval_domain is not None:
            labeled = self._domain_cases(labeled)
        self.cases = labeled
        self._images = images
        return labeled

    def _domain_cases(self, cases: List[str]) -> List[str]:
        """``cases`` whose case_metadata.json ``domain`` is ``--eval-domain`` (``target``: the file's
        ``target_domain``); the domain, resolved, is kept in :attr:`domain`."""
        from nnunet_semi.layout import LayoutError, case_metadata_file, load_case_metadata
        asked, path = self.s.eval_domain, case_metadata_file(self.raw_folder)
        try:
            md = load_case_metadata(self.raw_folder)
        except LayoutError as e:
            raise BenchmarkError(str(e)) from e
        if md is None:
            raise BenchmarkError(f"--eval-domain {asked} needs the per-case domains of {path}, which does not exist. "
                                 f"Write it (CaseMetadata in nnunet_semi/layout.py; the MM-WHS, M&Ms and domain-shift "
                                 f"converters do) or leave out --eval-domain")
        domains = sorted({str(e["domain"]) for e in md.cases.values() if "domain" in e})
        domain = md.target_domain if asked == "target" and md.target_domain is not None else asked
        if asked == "target" and md.target_domain is None and "target" not in domains:
            raise BenchmarkError(f"--eval-domain target: {path} names no target_domain; pass one of its domains "
                                 f"{domains} instead")
        kept = [c for c in cases if md.domain_of(c) == domain]
        if not kept:
            held_out = sorted({str(md.domain_of(c)) for c in cases})
            raise BenchmarkError(f"--eval-domain {asked}: no held-out case of domain '{domain}' in {path} (the "
                                 f"{len(cases)} held-out case(s) have domain(s) {held_out}; the file's domains: "
                                 f"{domains})")
        say(f"note: --eval-domain {asked}: {len(kept)} of {len(cases)} held-out case(s) have domain '{domain}' "
            f"({path})")
        self.domain = domain
        return kept

    def build_inputs(self) -> str:
        """``<out>/inputs_<group>``: symlinks to the held-out images, nnUNetv2_predict's input folder."""
        folder = self.inputs_dir()
        self.executor.apply(link_files, folder, [src for c in self.cases for src in self._images[c]])
        return folder

    def _needs_unlabeled(self) -> bool:
        return any(is_semi_supervised(self.registered[split_arm(t)[0]]) for t in self.s.trainers)

    def _unlabeled_command(self, n: str) -> List[str]:
        s = self.s
        return ["nnUNetv2_preprocess_unlabeled", "-d", str(self.dataset_id), "-c", s.effective_configuration,
                "-plans_name", s.plans, "-np", n]

    def ensure_preprocessed(self) -> None:
        """Plan/preprocess the labeled data and the unlabeled images where that was not done yet."""
        s = self.s
        n = str(max(1, s.num_processes))
        env = self.env()
        if not os.path.isfile(self.plans_file):
            if s.plans != "nnUNetPlans":
                raise BenchmarkError(f"{self.plans_file} does not exist; create the plans '{s.plans}' first")
            say(f"plan and preprocess {self.dataset_name} ({s.configuration})")
            self.executor.run(["nnUNetv2_plan_and_preprocess", "-d", str(self.dataset_id), "-c", s.configuration,
                               "-np", n, "-npfp", n] + (["--verify_dataset_integrity"] if s.verify_integrity else []),
                              env, os.path.join(s.out, "logs", "plan_and_preprocess.log"), creates=self.plans_file)
            if not os.path.isfile(self.plans_file):
                # nothing was planned (a dry run; a real planning that writes no plans fails above): the next
                # steps depend on the plans, so they can only be listed
                if s.plans_config:
                    say(f"(dry run) then add configuration {s.configuration}_cpu (inherits_from {s.configuration}, "
                        f"features x{s.cpu_features_scale}, batch {s.cpu_batch_size or 'min(base, 2)'}"
                        + (f", patch {s.cpu_patch_size}" if s.cpu_patch_size else "") + f") to {self.plans_file}")
                if self._needs_unlabeled():
                    self.executor.run(self._unlabeled_command(n), env,
                                      os.path.join(s.out, "logs", "preprocess_unlabeled.log"))
                return
        with open(self.plans_file) as f:
            plans = json.load(f)
        base = resolve_configuration(plans, s.configuration)
        data_folder = os.path.join(self.pre_folder, base["data_identifier"])
        if not os.path.isdir(data_folder) or not any(x.endswith(".pkl") for x in os.listdir(data_folder)):
            say(f"preprocess {self.dataset_name} ({s.configuration})")
            self.executor.run(["nnUNetv2_preprocess", "-d", str(self.dataset_id), "-c", s.configuration,
                               "-plans_name", s.plans, "-np", n], env, os.path.join(s.out, "logs", "preprocess.log"))
        if s.plans_config:
            change = add_cpu_configuration(self.plans_file, s.configuration, s.cpu_features_scale, s.cpu_batch_size,
                                           write=False, patch_size=s.cpu_patch_size)
            if change["status"] == "would be added":
                change["status"] = self.executor.apply(write_configuration, self.plans_file, change["name"],
                                                       change["entry"]) or change["status"]
            self.plans_change = change
            say(f"configuration {change['name']} ({change['status']}): inherits_from {s.configuration}; "
                + "; ".join(f"{k.split('.')[-1]} {v['from']} -> {v['to']}" for k, v in change["changes"].items()))
        if self._needs_unlabeled():
            self.ensure_unlabeled(base["data_identifier"], env, n)

    def ensure_unlabeled(self, data_identifier: str, env, n: str) -> None:
        from nnunet_semi.layout import plans_identity, read_manifest
        cfg = self.s.effective_configuration
        cmd = self._unlabeled_command(n)
        manifest = read_manifest(self.pre_folder, data_identifier)
        if manifest is None:
            say(f"preprocess the unlabeled images of {self.dataset_name} ({cfg})")
            self.executor.run(cmd, env, os.path.join(self.s.out, "logs", "preprocess_unlabeled.log"))
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
        d["evaluated_domain"] = self.domain
        d["n_evaluated_cases"] = len(self.cases)
        d["file_ending"] = self.file_ending
        classes = {t: self.registered[split_arm(t)[0]] for t in s.trainers}
        d["trainer_classes"] = {t: f"{c.__module__}.{c.__qualname__}" for t, c in classes.items()}
        d["exported_networks"] = {t: split_arm(t)[1] for t in s.trainers if split_arm(t)[1] is not None}
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

    def _read_settings_file(self) -> Optional[dict]:
        path = os.path.join(self.s.out, SETTINGS_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def check_resume_settings(self) -> None:
        old = self._read_settings_file()
        if old is None:
            return
        new = self.settings_dict()
        diff = {k: (old.get(k), new.get(k)) for k in KEY_SETTINGS if old.get(k) != new.get(k)}
        if diff:
            raise BenchmarkError(
                f"{self.s.out} holds a benchmark with other settings: "
                + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                + ". Use another --out folder (or delete that one) to start a new benchmark.")

    def write_settings(self) -> None:
        self.executor.apply(self._write_settings)

    def _write_settings(self) -> None:
        d = self.settings_dict()
        old = self._read_settings_file()
        if old is not None:
            d["first_started"] = old.get("first_started", old.get("started"))
            d["trainers"], d["seeds"] = self.report_scope()
        d["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
        d.setdefault("first_started", d["started"])
        with open(os.path.join(self.s.out, SETTINGS_FILE), "w") as f:
            json.dump(d, f, indent=2)

    # ---- runs ------------------------------------------------------------------------------
    def predictions_complete(self, trainer: str, seed: int) -> bool:
        folder = self.pred_dir(trainer, seed)
        return os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, c + self.file_ending))
                                             for c in self.cases)

    def check_recipe(self, trainer: str, seed: int) -> None:
        """Refuse a recorded run (checkpoint_final or checkpoint_latest) whose stored hyper-parameters differ
        from the trainer's current ones (e.g. a default changed since): its results would be reported as a recipe
        it did not train with, and resuming would mix two recipes. The warm-up schedule attributes, which the
        environment may set per run, are not compared."""
        cls = self.registered[split_arm(trainer)[0]]
        if not is_semi_supervised(cls):
            return
        from nnunet_semi.training.base import CHECKPOINT_KEY, class_hparams
        from nnunet_semi.training.budget import SCHEDULE_ATTRS
        md = self.model_dir(trainer, seed)
        path = next((os.path.join(md, c) for c in (CHECKPOINT, "checkpoint_latest.pth")
                     if os.path.isfile(os.path.join(md, c))), None)
        if path is None:
            return
        import torch
        try:
            stored = (torch.load(path, map_location="cpu", weights_only=False).get(CHECKPOINT_KEY) or {}).get("hparams")
        except Exception:   # unreadable here: nnU-Net reports it when it loads the file
            return
        if not stored:
            return
        # the warm-up schedule can be set per run from the environment (nnUNet_semi_warmup_iters ..., e.g. by the
        # demo), like the budget: a run-level setting, not part of the recipe compared here
        overridden = SCHEDULE_ATTRS
        want = class_hparams(cls)
        diff = {k: (stored[k], want[k]) for k in stored if k in want and k not in overridden and
                (list(stored[k]) if isinstance(stored[k], tuple) else stored[k]) !=
                (list(want[k]) if isinstance(want[k], tuple) else want[k])}
        if diff:
            shown = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in list(diff.items())[:6])
            raise BenchmarkError(
                f"{path} was trained with other hyper-parameters than {split_arm(trainer)[0]} has now: {shown}. Its "
                f"results would be reported as the current recipe. Move {os.path.dirname(md)} away (or use another "
                f"--results-dir) to train it again, or run the variant it was trained as.")

    def run_status(self, trainer: str, seed: int) -> str:
        md = self.model_dir(trainer, seed)
        if os.path.isfile(os.path.join(md, CHECKPOINT)):
            return "done" if self.predictions_complete(trainer, seed) else "predict"
        if os.path.isfile(os.path.join(md, "checkpoint_latest.pth")):
            return "resume"
        return "train"

    def train(self, trainer: str, seed: int, resume: bool) -> Optional[float]:
        s = self.s
        trainer = split_arm(trainer)[0]
        cmd = ["nnUNetv2_train", str(self.dataset_id), s.effective_configuration, s.fold, "-tr", trainer, "-p", s.plans,
               "-device", s.device] + (["--c"] if resume else [])
        progress = EpochProgress(f"{trainer} seed {seed}", s.epochs,
                                 os.path.join(self.model_dir(trainer, seed), PROGRESS_FILE))
        return self.executor.run(cmd, self.env(seed, trainer_env=True), self.log_file("train", trainer, seed),
                                 progress, self.echo_env(seed, trainer_env=True))

    def predict(self, trainer: str, seed: int) -> Optional[float]:
        """nnUNetv2_predict into ``<trainer>.tmp``, renamed to the predictions folder when it succeeded."""
        s = self.s
        final = self.pred_dir(trainer, seed)
        tmp = final + ".tmp"
        self.executor.apply(remove_folders, tmp, final)
        # on CPU: -npp 0 -nps 0 = nnU-Net's sequential prediction in one process (no spawned workers, which
        # each import torch and nnU-Net: on small machines that start-up dominates the run)
        npp = "0" if s.device == "cpu" else "3"
        base, network = split_arm(trainer)
        if network is not None:   # re-exported before every prediction: the run may have been trained again
            from nnunet_semi.training.export import export_checkpoint
            self.executor.apply(export_checkpoint, os.path.join(self.model_dir(trainer, seed), CHECKPOINT), network,
                                os.path.join(self.model_dir(trainer, seed), self.checkpoint_name(trainer)))
        cmd = ["nnUNetv2_predict", "-i", self.inputs_dir(), "-o", tmp, "-d", str(self.dataset_id),
               "-c", s.effective_configuration, "-p", s.plans, "-tr", base, "-f", s.fold,
               "-chk", self.checkpoint_name(trainer),
               "-device", s.device, "-step_size", str(s.step_size), "-npp", npp, "-nps", npp]
        if s.disable_tta:
            cmd.append("--disable_tta")
        t = self.executor.run(cmd, self.env(seed), self.log_file("predict", trainer, seed), echo=self.echo_env(seed))
        self.executor.apply(os.replace, tmp, final)
        return t

    def save_curves(self, trainer: str, seed: int) -> Optional[dict]:
        """A finished run's per-epoch curves, cached in ``seed_<s>/curves/<trainer>.json``."""
        md = self.model_dir(trainer, seed)
        ckpt, progress = os.path.join(md, CHECKPOINT), os.path.join(md, PROGRESS_FILE)
        out = self.curves_file(trainer, seed)
        if os.path.isfile(out) and os.path.isfile(ckpt) and os.path.getmtime(out) >= max(
                os.path.getmtime(p) for p in (ckpt, progress) if os.path.isfile(p)):
            with open(out) as f:
                return json.load(f)
        if not os.path.isfile(ckpt):
            return None
        curves = run_curves(md, CHECKPOINT, self.s.epochs)
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
        return evaluate_folder(os.path.join(self.raw_folder, "labelsTs"), pred,
                               dataset_json=os.path.join(self.raw_folder, "dataset.json"), case_ids=self.cases,
                               num_processes=self.s.num_processes, empty_policy=self.s.empty_policy,
                               output_file=out, progress=False)

    def run(self, report_only: bool = False, reevaluate: bool = False,
            on_stage: Optional[Callable[[str, "Benchmark"], None]] = None) -> Optional[dict]:
        """The whole benchmark: cases, preprocessing, every run, the report (the report alone with
        ``report_only``). ``on_stage(stage, self)`` is called as each of :data:`STAGES` begins (default:
        :func:`announce`). Returns the aggregated results (None from a dry run)."""
        stage = on_stage or announce
        self.executor.apply(os.makedirs, self.s.out, exist_ok=True)
        self.select_cases()
        stage("start", self)
        if not report_only:
            stage("preprocess", self)
        self.check_resume_settings()
        if not report_only:
            self.ensure_preprocessed()
            self.write_settings()
            self.build_inputs()
            stage("runs", self)
            self.run_all()
        stage("report", self)
        return self.executor.apply(self.report, reevaluate)

    def run_records(self) -> Dict[str, dict]:
        """``<out>/runs.json``: per ``<trainer>/seed_<s>``, the wall times of its training and prediction."""
        path = os.path.join(self.s.out, RUNS_FILE)
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def _record(self, trainer: str, seed: int, add: Optional[Mapping[str, float]] = None, **values) -> None:
        """Update ``<out>/runs.json`` (``add`` accumulates, e.g. the training time over resumed trainings)."""
        path = os.path.join(self.s.out, RUNS_FILE)
        records = self.run_records()
        rec = records.setdefault(f"{trainer}/seed_{seed}", {"trainer": trainer, "seed": seed})
        for k, v in (add or {}).items():
            rec[k] = round(rec.get(k, 0.0) + v, 1)
        rec.update(values)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=2)
        os.replace(tmp, path)

    def _trained(self, tag: str, trainer: str, seed: int, seconds: float, resumed: bool) -> None:
        if resumed:
            self._record(trainer, seed, add={"train_s": seconds}, resumed=True)
        else:
            self._record(trainer, seed, train_s=round(seconds, 1), resumed=False)
        rec = self.run_records().get(f"{trainer}/seed_{seed}", {})
        envs = [e for e in rec.get("environments", []) if e != self.environment] + [self.environment]
        self._record(trainer, seed, trained_at=time.strftime("%Y-%m-%d %H:%M:%S"), environments=envs)
        say(f"{tag}: trained in {fmt_seconds(seconds)}")

    def _predicted(self, tag: str, trainer: str, seed: int, seconds: float) -> None:
        self._record(trainer, seed, predict_s=round(seconds, 1))
        say(f"{tag}: predicted {len(self.cases)} case(s) in {fmt_seconds(seconds)}")

    def run_all(self) -> None:
        """Every (trainer, seed) run, each as far as its status needs (see :data:`STATUS_MESSAGES`)."""
        s = self.s
        total = len(s.seeds) * len(s.trainers)
        runs = [(trainer, seed) for seed in s.seeds for trainer in s.trainers]
        for trainer, seed in runs:   # before anything runs: a recorded run of another recipe stops the benchmark
            self.check_recipe(trainer, seed)
        for i, (trainer, seed) in enumerate(runs, 1):
            tag = f"({i}/{total}) {trainer} seed {seed}"
            status = self.run_status(trainer, seed)
            say(f"{tag}: {STATUS_MESSAGES[status]}")
            if status in ("train", "resume"):
                t = self.train(trainer, seed, resume=status == "resume")
                self.executor.apply(self._trained, tag, trainer, seed, t, status == "resume")
            if status != "done":
                t = self.predict(trainer, seed)
                self.executor.apply(self._predicted, tag, trainer, seed, t)
            self.executor.apply(self.save_curves, trainer, seed)

    # ---- report ----------------------------------------------------------------------------
    def report_scope(self) -> Tuple[List[str], List[int]]:
        """The trainers and seeds the report covers: every one recorded in ``<out>/settings.json`` (the union
        over all invocations on this folder) plus those of this call, so that a call with ``-s 1`` or one
        ``-tr`` does not shrink ``results.md`` to its own runs."""
        trainers, seeds = list(self.s.trainers), list(self.s.seeds)
        old = self._read_settings_file()
        if old is not None:
            trainers = list(dict.fromkeys(list(old.get("trainers", [])) + trainers))
            seeds = sorted(set(old.get("seeds", [])) | set(seeds))
        return trainers, seeds

    def report(self, reevaluate: bool = False) -> dict:
        """Evaluate every finished run of :meth:`report_scope` and write the report (:func:`write_report`)."""
        return write_report(self, reevaluate)
