"""Benchmark harness: every arm through nnU-Net's own commands, with the same budget, several seeds,
held-out evaluation from the final checkpoint, and a report with the paired comparison against the
supervised arm. Used by ``benchmarks/run_benchmark.py`` and by the demo (:mod:`nnunet_semi.demo`).

Modules: :mod:`~nnunet_semi.benchmark.commands` (running nnU-Net's commands, progress lines),
:mod:`~nnunet_semi.benchmark.trainers` (the registry and the default trainers),
:mod:`~nnunet_semi.benchmark.plans_variant` (``--plans-config``), :mod:`~nnunet_semi.benchmark.settings`,
:mod:`~nnunet_semi.benchmark.executor` (the real executor and the dry run),
:mod:`~nnunet_semi.benchmark.orchestration` (:class:`Benchmark`), :mod:`~nnunet_semi.benchmark.aggregate` and
:mod:`~nnunet_semi.benchmark.report` (``results.md``, ``benchmark.png``), :mod:`~nnunet_semi.benchmark.records`
(the committed records of benchmark folders, merged over sessions; ``benchmarks/record.py``).

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

from nnunet_semi.benchmark.aggregate import PSEUDO_DICE_MILESTONE, aggregate, curve_milestones, run_curves
from nnunet_semi.benchmark.commands import (BenchmarkError, CommandError, EpochProgress, nnunet_env, reset_clock,
                                            run_command, say, shell_line)
from nnunet_semi.benchmark.executor import DryRunExecutor, Executor
from nnunet_semi.benchmark.orchestration import STAGES, Benchmark, benchmark_outputs
from nnunet_semi.benchmark.plans_variant import add_cpu_configuration, cpu_configuration_entry, resolve_configuration
from nnunet_semi.benchmark.report import plot_benchmark, results_markdown, results_table
from nnunet_semi.benchmark.settings import CHECKPOINT, EVAL_GROUPS, KEY_SETTINGS, BenchmarkSettings, default_device, \
    find_dataset
from nnunet_semi.benchmark.trainers import (BASELINE, check_trainers, default_trainers, is_benchmark_default,
                                            is_semi_supervised, registered_trainers)

__all__ = [
    "PSEUDO_DICE_MILESTONE", "aggregate", "curve_milestones", "run_curves", "BenchmarkError", "CommandError",
    "EpochProgress", "nnunet_env", "reset_clock", "run_command", "say", "shell_line", "DryRunExecutor", "Executor",
    "STAGES", "Benchmark", "benchmark_outputs", "add_cpu_configuration", "cpu_configuration_entry",
    "resolve_configuration", "plot_benchmark", "results_markdown", "results_table", "CHECKPOINT", "EVAL_GROUPS",
    "KEY_SETTINGS", "BenchmarkSettings", "default_device", "find_dataset", "BASELINE", "check_trainers",
    "default_trainers", "is_benchmark_default", "is_semi_supervised", "registered_trainers",
]
