"""Step-time benchmark: semi-supervised trainers against nnU-Net's supervised step.

Every trainer is built on the same preprocessed dataset, configuration, patch and labeled batch size
(the plans'), and their training steps are interleaved in one process (round robin, ``--block`` steps
per trainer and round), so machine noise hits all of them alike. Per trainer it reports the median
step time, the ratio to the first trainer (the supervised reference), the time spent waiting for data
(labeled + unlabeled batches) as a share of the step, and peak memory (CUDA: max allocated; CPU:
sampled peak RSS of the process while that trainer's steps ran).

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python benchmarks/step_time.py -d 104 -c 3d_fullres -tr nnUNetTrainer MeanTeacherTrainer CrossMatchTrainer \
        -device cpu --rounds 4 --block 3

Requires planned + preprocessed labeled data and ``nnUNetv2_preprocess_unlabeled`` output. Timings
include the optimizer step and, for EMA trainers, the teacher update; the first ``--warmup`` steps of
each trainer are not counted. The steps are those of the run after its supervised warm-up: the warm-up gate is
open from step 0 (``nnUNet_semi_warmup_iters=0``, ``nnUNet_semi_warmup_pseudo_dice=none``, unless set), since
a method may skip its unsupervised passes while the gate is closed (A&D skips its sampler; Reciprocal Learning
trains its teacher alone).

``--preload K`` measures the computation alone: each trainer draws K labeled batches (and the
unlabeled batches those steps need) up front, its loader workers are stopped, and the timed steps
cycle through the drawn batches. That is the ratio of the passes, the one a GPU machine sees when its
loader workers keep up (data wait ~0). Without ``--preload`` the loader workers run during the steps;
on a machine with few cores they compete with the step's own computation.

On the CPU the whole process uses :func:`nnunet_semi.cpu_malloc.tune_cpu_malloc` (what every plugin
trainer does on the CPU), so nnU-Net's own trainer is measured with the same allocator settings;
``--no-malloc-tuning`` measures glibc's defaults for all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class PeakSampler:
    def __init__(self, period=0.01):
        self.period, self.peak, self._stop = period, 0.0, threading.Event()

    def __enter__(self):
        self.peak = _rss_mb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def build(trainer_name: str, dataset: str, configuration: str, device):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    name = maybe_convert_to_dataset_name(dataset)
    pre = os.path.join(nnUNet_preprocessed, name)
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    cls = recursive_find_trainer_class_by_name(trainer_name)
    t = cls(plans=plans, configuration=configuration, fold=0, dataset_json=load_json(os.path.join(pre, "dataset.json")),
            device=device)
    if getattr(cls, "needs_supervised_run", lambda: False)():
        stand_in_for_supervised_run(t)
    t.initialize()
    t.dataloader_train, t.dataloader_val = t.get_dataloaders()
    t.set_deep_supervision_enabled(t.enable_deep_supervision)
    t.on_train_epoch_start()
    return t


def stand_in_for_supervised_run(t) -> None:
    """A trainer that starts from the supervised run beside it (Reciprocal Learning's teacher) and finds none in
    nnUNet_results is pointed at a temporary results folder whose supervised run is a freshly initialised network
    of the plans: a step costs the same whatever those weights are, and the user's nnUNet_results is not written."""
    import tempfile

    from nnunet_semi.training.supervised_init import stand_in_supervised_run, supervised_run_checkpoint
    try:
        supervised_run_checkpoint(t.output_folder, t.plans_manager.plans_name, t.configuration_name, type(t).__name__)
        return
    except RuntimeError:
        pass
    folder = os.path.abspath(t.output_folder)
    tmp = tempfile.mkdtemp(prefix="step_time_results_")
    t.output_folder = os.path.join(tmp, *folder.split(os.sep)[-3:])
    path = stand_in_supervised_run(t)
    print(f"{type(t).__name__}: no supervised run in nnUNet_results; a freshly initialised network stands in "
          f"({path})", flush=True)


class _Cycle:
    """An endless iterator over a fixed list of batches (``--preload``)."""

    def __init__(self, items):
        self.items, self.i = list(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def preload(t, k: int) -> None:
    """Replace the trainer's loaders by ``k`` pre-drawn steps' worth of batches and stop its workers."""
    labeled = [next(t.dataloader_train) for _ in range(k)]
    unl = getattr(t, "dataloader_unlabeled", None)
    if unl is not None:
        per_step = getattr(t, "unlabeled_batches_per_step", 1)
        drawn = [next(unl) for _ in range(k * per_step)]
    for dl in (t.dataloader_train, t.dataloader_val, unl):
        if dl is not None and hasattr(dl, "_finish"):
            dl._finish()
    t.dataloader_train, t.dataloader_val = _Cycle(labeled), None
    if unl is not None:
        t.dataloader_unlabeled = _Cycle(drawn)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", required=True)
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("-tr", nargs="+", default=["nnUNetTrainer", "MeanTeacherTrainer", "CrossMatchTrainer"],
                   help="trainers; the first is the reference")
    p.add_argument("-device", default="cuda")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--block", type=int, default=3, help="consecutive steps of one trainer per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preload", type=int, default=0, metavar="K",
                   help="time the computation alone: K pre-drawn batches per trainer, loader workers stopped")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="CPU: keep glibc's default allocator settings (see nnunet_semi/cpu_malloc.py)")
    p.add_argument("-o", help="write the results as JSON here")
    a = p.parse_args(argv)

    from nnunet_semi.env import ensure_ext_trainer
    ensure_ext_trainer()
    os.environ.setdefault("nnUNet_semi_warmup_iters", "0")          # steady-state steps: the gate is open
    os.environ.setdefault("nnUNet_semi_warmup_pseudo_dice", "none")
    import torch
    device = torch.device(a.device)
    malloc_tuned = False
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
        if a.no_malloc_tuning:
            os.environ["nnUNet_semi_cpu_malloc"] = "0"  # the plugin trainers must not apply it either
        else:
            from nnunet_semi.cpu_malloc import tune_cpu_malloc
            malloc_tuned = tune_cpu_malloc()
    trainers = {}
    for name in a.tr:
        print(f"building {name} ...", flush=True)
        trainers[name] = build(name, a.d, a.c, device)
        if a.preload:
            print(f"drawing {a.preload} steps' batches for {name} ...", flush=True)
            preload(trainers[name], a.preload)
    stats = {n: {"steps": [], "wait": [], "peak_mb": 0.0} for n in trainers}
    for n, t in trainers.items():  # warm-up (first steps allocate and tune kernels)
        for _ in range(a.warmup):
            t.train_step(next(t.dataloader_train))
    for r in range(a.rounds):
        for n, t in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with PeakSampler() as ps:
                for _ in range(a.block):
                    u0 = getattr(t, "_unlabeled_wait", 0.0)
                    t0 = time.perf_counter()
                    batch = next(t.dataloader_train)
                    t1 = time.perf_counter()
                    t.train_step(batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    stats[n]["steps"].append(t2 - t0)
                    stats[n]["wait"].append((t1 - t0) + getattr(t, "_unlabeled_wait", 0.0) - u0)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else ps.peak
            stats[n]["peak_mb"] = max(stats[n]["peak_mb"], peak)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{n} {statistics.median(s['steps']):.2f}s" for n, s in stats.items()), flush=True)
    ref = statistics.median(stats[a.tr[0]]["steps"])
    t0 = trainers[a.tr[0]]
    rows = []
    for n, s in stats.items():
        med = statistics.median(s["steps"])
        rows.append({"trainer": n, "median_step_s": med, "ratio": med / ref,
                     "data_wait_pct": 100 * sum(s["wait"]) / sum(s["steps"]), "peak_mem_mb": s["peak_mb"],
                     "n_steps": len(s["steps"])})
    info = {"dataset": a.d, "configuration": a.c, "device": str(device),
            "patch_size": list(t0.configuration_manager.patch_size), "labeled_batch": t0.batch_size,
            "unlabeled_batch": {n: getattr(t, "batch_size_unlabeled", None) for n, t in trainers.items()},
            "torch_threads": torch.get_num_threads(), "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
            "preload": a.preload, "cpu_malloc_tuned": malloc_tuned,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
                       + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")}
    mem = "peak GPU MiB (max allocated)" if device.type == "cuda" else "peak RSS MiB (sampled, process)"
    print(f"\n{a.c}, patch {info['patch_size']}, labeled batch {info['labeled_batch']}, {info['device']}, "
          f"{info['machine']}" + (f", computation only ({a.preload} pre-drawn batches)" if a.preload else "")
          + (", glibc malloc tuned" if malloc_tuned else ""))
    print(f"| trainer | median step (s) | x {a.tr[0]} | data wait (% of step) | {mem} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['median_step_s']:.3f} | {r['ratio']:.2f} | {r['data_wait_pct']:.1f} | "
              f"{r['peak_mem_mb']:.0f} |")
    if a.o:
        with open(a.o, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
    for t in trainers.values():
        for dl in (t.dataloader_train, t.dataloader_val, getattr(t, "dataloader_unlabeled", None)):
            if dl is not None and hasattr(dl, "_finish"):
                dl._finish()
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
