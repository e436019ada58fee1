"""Benchmark the plugin's trainers against nnU-Net's supervised reference with the same budget.

Every arm runs through nnU-Net's own commands (nnUNetv2_train / nnUNetv2_predict) on one converted
dataset, one configuration, the same epochs x iterations (``nnUNet_semi_*`` variables), several seeds
(each with its own nnUNet_results under the benchmark folder); the held-out cases are predicted from
``checkpoint_final.pth`` and evaluated with ``nnunet_semi.evaluation``. Output in the benchmark folder:
``results.md`` (mean ± std over seeds and cases per method and class, seed-level means, the paired
comparison against SupervisedBaselineTrainer), ``results.json``, ``benchmark.png`` and ``settings.json``.
Re-running the same command resumes an interrupted benchmark. See benchmarks/README.md for the protocols.

    export nnUNet_raw=... nnUNet_preprocessed=...
    python benchmarks/run_benchmark.py -d 104 -c 3d_fullres --plans-config -s 0 1 2 --epochs 16 --iters 25
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", help="dataset id or DatasetXXX_Name (converted, in $nnUNet_raw)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", "--fold", default="all",
                   help="fold (default 'all': train on all labeled cases; nnU-Net's per-epoch pseudo Dice and final "
                        "validation then run on training cases and are not used for anything)")
    p.add_argument("-tr", "--trainers", nargs="+", default=None,
                   help="trainers (default: SupervisedBaselineTrainer and every registered trainer that declares "
                        "benchmark_default = True, see --list-trainers); the first is listed first, the paired "
                        "comparison is always against SupervisedBaselineTrainer when it is in the list. TRAINER@NETWORK "
                        "(e.g. ReciprocalLearningTrainer@teacher) predicts with another network of TRAINER's run "
                        "(nnUNetv2_semi_export), sharing its training")
    p.add_argument("-s", "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per arm (nnUNet_semi_epochs, default 20)")
    p.add_argument("--iters", type=int, default=50, help="iterations per epoch (nnUNet_semi_iters, default 50)")
    p.add_argument("--val-iters", type=int, default=None,
                   help="nnU-Net's per-epoch validation iterations (nnUNet_semi_val_iters; default iters/10)")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint_latest every N epochs (resume granularity; default epochs/10)")
    p.add_argument("-o", "--out", default=None,
                   help="benchmark folder (default benchmarks/runs/<Dataset>_<config>_<epochs>x<iters>[_<group>]"
                        "[_<domain>])")
    p.add_argument("--eval-group", choices=("all", "val", "test"), default="all",
                   help="held-out cases to evaluate: every imagesTs case with a labelsTs reference (all, default), or "
                        "only the split's val or test group (splits_semi.json)")
    p.add_argument("--eval-domain", default=None, metavar="DOMAIN",
                   help="evaluate only the held-out cases whose case_metadata.json domain is DOMAIN ('target': the "
                        "file's target_domain), e.g. source or target of nnUNetv2_semi_domain_shift (default: every "
                        "domain)")
    p.add_argument("--plans-config", action="store_true",
                   help="add ONE smaller configuration <config>_cpu to the plans (inherits_from <config>: "
                        "features_per_stage x --cpu-features-scale, batch size --cpu-batch-size) and use it for every arm; "
                        "the preprocessed data are reused")
    p.add_argument("--cpu-features-scale", type=float, default=0.5, help="features_per_stage factor (default 0.5)")
    p.add_argument("--cpu-batch-size", type=int, default=None, help="batch size of <config>_cpu (default min(base, 2))")
    p.add_argument("--cpu-patch-size", type=int, nargs="+", default=None,
                   help="patch size of <config>_cpu (default: inherited); multiples of the network's total stride")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--disable_tta", action="store_true", help="predict without mirroring (nnUNetv2_predict --disable_tta)")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step size (default 0.5)")
    p.add_argument("--empty-policy", default="default", help="empty-mask policy of the metrics (default 'default')")
    p.add_argument("-np", "--num-processes", type=int, default=1,
                   help="processes for planning, preprocessing and evaluation (default 1)")
    p.add_argument("--n-proc-da", type=int, default=None,
                   help="nnUNet_n_proc_DA for training (default: yours; on CPU machines with <= 4 cores 0)")
    p.add_argument("--def-n-proc", type=int, default=None,
                   help="nnUNet_def_n_proc (default: yours; on CPU min(2, cores))")
    p.add_argument("--results-dir", default=None,
                   help="nnUNet_results of each seed, '{seed}' is replaced (default <out>/seed_{seed}/nnUNet_results); "
                        "without '{seed}' only one seed is allowed (e.g. to report on an existing demo folder)")
    p.add_argument("--raw", default=None, help="nnUNet_raw (default: the environment variable)")
    p.add_argument("--preprocessed", default=None, help="nnUNet_preprocessed (default: the environment variable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands (with what would be skipped/resumed), "
                                                          "run nothing")
    p.add_argument("--report-only", action="store_true", help="only evaluate finished runs and write the report")
    p.add_argument("--reevaluate", action="store_true", help="recompute the metrics even where cached")
    p.add_argument("--list-trainers", action="store_true",
                   help="list the registered trainers (and which are benchmark defaults) and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnunet_semi.benchmark import (Benchmark, BenchmarkError, BenchmarkSettings, DryRunExecutor, Executor,
                                       default_device, default_trainers, find_dataset, is_semi_supervised,
                                       registered_trainers, reset_clock, results_table)
    if args.list_trainers:
        reg = registered_trainers()
        defaults = set(default_trainers(reg))
        for name, cls in reg.items():
            kind = "semi-supervised" if is_semi_supervised(cls) else "supervised"
            print(f"{name:40s} {kind:16s} {'default' if name in defaults else ''}")
        return 0
    if not args.dataset:
        build_parser().error("-d/--dataset is required")
    reset_clock()
    try:
        raw = args.raw or os.environ.get("nnUNet_raw")
        pre = args.preprocessed or os.environ.get("nnUNet_preprocessed")
        out = args.out
        if out is None:
            name = find_dataset(args.dataset, [raw, pre])
            cfg = args.configuration + ("_cpu" if args.plans_config else "")
            out = os.path.join(HERE, "runs", f"{name}_{cfg}_{args.epochs}x{args.iters}"
                               + ("" if args.eval_group == "all" else f"_{args.eval_group}")
                               + (f"_{args.eval_domain}" if args.eval_domain else ""))
        settings = BenchmarkSettings(
            dataset=args.dataset, out=out, configuration=args.configuration, plans=args.plans, fold=args.fold,
            trainers=list(args.trainers or []), seeds=args.seeds, epochs=args.epochs, iters=args.iters,
            val_iters=args.val_iters, save_every=args.save_every, device=args.device or default_device(),
            eval_group=args.eval_group, eval_domain=args.eval_domain, disable_tta=args.disable_tta,
            step_size=args.step_size,
            plans_config=args.plans_config, cpu_features_scale=args.cpu_features_scale,
            cpu_batch_size=args.cpu_batch_size, cpu_patch_size=args.cpu_patch_size, empty_policy=args.empty_policy,
            num_processes=args.num_processes,
            n_proc_da=args.n_proc_da, def_n_proc=args.def_n_proc, raw=raw, preprocessed=pre,
            **({"results_template": os.path.abspath(args.results_dir)} if args.results_dir else {}))
        bench = Benchmark(settings, executor=DryRunExecutor() if args.dry_run else Executor())
        agg = bench.run(report_only=args.report_only, reevaluate=args.reevaluate)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if agg is not None:
        print()
        print(results_table(agg, classes=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
