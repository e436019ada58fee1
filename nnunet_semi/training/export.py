"""``nnUNetv2_semi_export``: write another network of a finished run as a checkpoint that stock
``nnUNetv2_predict`` loads with ``-chk``, without training again.

A semi-supervised run holds several networks: the student (``network_weights``, or the checkpoint's
``student_weights`` when another one was exported), auxiliary modules that are whole networks of the plans
(Mean Teacher's EMA teacher, Reciprocal Learning's trainable teacher), and decoders that share the student's
encoder (A&D's difficulty-aware decoder D_psi, declared by the method in ``partial_exports``). Which one
predicts best is a measured question (e.g. Reciprocal Learning exports the student as released, and its
teacher scored higher on our validation group; benchmarks/RESULTS.md), so any of them can be exported after
training::

    nnUNetv2_semi_export -d 27 -c 3d_fullres -tr ReciprocalLearningTrainer -f 0 --list
    nnUNetv2_semi_export -d 27 -c 3d_fullres -tr ReciprocalLearningTrainer -f 0 -n teacher
    nnUNetv2_predict -i ... -o ... -d 27 -c 3d_fullres -tr ReciprocalLearningTrainer -f 0 \\
        -chk checkpoint_final_teacher.pth

The new file is the source checkpoint with ``network_weights`` replaced (the plans' architecture, loaded with
``strict=True``), the student kept as ``student_weights`` and the rest unchanged; the source checkpoint is never
modified.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

CHECKPOINT_KEY = "nnunet_semi"
STUDENT = "student"


class ExportError(RuntimeError):
    """A checkpoint or network name that cannot be exported; the message names the file and the fix."""


def student_weights(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    semi = checkpoint.get(CHECKPOINT_KEY) or {}
    if semi.get("student_weights") is not None:
        return semi["student_weights"]
    exported = semi.get("export_network", STUDENT)
    if exported != STUDENT:
        raise ExportError(f"the checkpoint exports '{exported}' but holds no student weights")
    return checkpoint["network_weights"]


def _aux_weights(checkpoint: Mapping) -> Dict[str, Mapping[str, torch.Tensor]]:
    semi = checkpoint.get(CHECKPOINT_KEY) or {}
    weights = {name: state["weights"] for name, state in (semi.get("aux") or {}).items()
               if state.get("weights") is not None}
    if semi.get("teacher_weights") is not None and "teacher" not in weights:   # format 1 (plugin 0.1)
        weights["teacher"] = semi["teacher_weights"]
    return weights


def export_choices(checkpoint: Mapping, partial_exports: Optional[Mapping[str, Tuple[str, str, str]]] = None
                   ) -> Dict[str, str]:
    """name -> what it is, for every network of ``checkpoint`` that can become ``network_weights``."""
    keys = set(checkpoint["network_weights"])
    choices = {STUDENT: "the student network (network_weights of a run that exports the student)"}
    aux = _aux_weights(checkpoint)
    for name, weights in aux.items():
        if set(weights) == keys:
            choices[name] = f"auxiliary module '{name}' (a whole network of the plans)"
    for name, (module, src_prefix, dst_prefix) in (partial_exports or {}).items():
        if module in aux:
            choices[name] = (f"the student's encoder with '{module}.{src_prefix.rstrip('.')}' in place of "
                             f"'{dst_prefix.rstrip('.')}'")
    return choices


def exported_weights(checkpoint: Mapping, network: str,
                     partial_exports: Optional[Mapping[str, Tuple[str, str, str]]] = None
                     ) -> "OrderedDict[str, torch.Tensor]":
    """The ``network_weights`` that make ``network`` the exported one (same keys as the checkpoint's)."""
    choices = export_choices(checkpoint, partial_exports)
    if network not in choices:
        raise ExportError(f"no network '{network}' in this checkpoint; choose one of: {', '.join(choices)}")
    keys = list(checkpoint["network_weights"])
    student = student_weights(checkpoint)
    if network == STUDENT:
        return OrderedDict((k, student[k]) for k in keys)
    aux = _aux_weights(checkpoint)
    if network in aux and set(aux[network]) == set(keys):
        return OrderedDict((k, aux[network][k]) for k in keys)
    module, src_prefix, dst_prefix = partial_exports[network]
    source = aux[module]
    out, replaced = OrderedDict(), set()
    for k in keys:
        mapped = src_prefix + k[len(dst_prefix):] if k.startswith(dst_prefix) else None
        if mapped is not None and mapped in source:
            if source[mapped].shape != student[k].shape:
                raise ExportError(f"'{module}.{mapped}' has shape {tuple(source[mapped].shape)}, the network's "
                                  f"'{k}' {tuple(student[k].shape)}")
            out[k] = source[mapped]
            replaced.add(mapped)
        else:
            out[k] = student[k]
    left = sorted(k for k in source if k.startswith(src_prefix) and k not in replaced)
    if not replaced or left:
        raise ExportError(f"'{module}.{src_prefix}' does not match the network's '{dst_prefix}' "
                          f"(unmatched: {left[:3] or 'all'})")
    return out


def trainer_class(name: str):
    """The trainer class of a checkpoint's ``trainer_name``: the plugin's, else nnU-Net's lookup (its own tree and
    ``nnUNet_extTrainer``); None when it is found nowhere."""
    import contextlib
    import importlib
    import io
    cls = getattr(importlib.import_module("nnunet_semi.ext_trainers.nnunet_semi_trainers"), name, None)
    if isinstance(cls, type):
        return cls
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        return None


def partial_exports_of(checkpoint: Mapping) -> Mapping[str, Tuple[str, str, str]]:
    """The ``partial_exports`` its trainer declares (none when the trainer is gone: whole networks can still be
    exported)."""
    cls = trainer_class(checkpoint.get("trainer_name", ""))
    return getattr(cls, "partial_exports", {}) or {}


def export_checkpoint(source: str, network: str, output: Optional[str] = None) -> str:
    """Write ``source`` with ``network`` as ``network_weights`` to ``output`` (default: next to it, named
    ``<stem>_<network>.pth``); returns the path written."""
    from nnunet_semi.training.checkpoint import atomic_torch_save
    if not os.path.isfile(source):
        raise ExportError(f"{source} does not exist: train first (nnUNetv2_train ... -tr TRAINER), or pass the "
                          f"checkpoint with --checkpoint")
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    if CHECKPOINT_KEY not in checkpoint:
        raise ExportError(f"{source} was not written by a nnunet_semi trainer: it holds one network only")
    try:
        weights = exported_weights(checkpoint, network, partial_exports_of(checkpoint))
    except ExportError as e:
        raise ExportError(f"{source}: {e}") from None
    if output is None:
        stem, ext = os.path.splitext(source)
        output = f"{stem}_{network}{ext}"
    if os.path.abspath(output) == os.path.abspath(source):
        raise ExportError(f"refusing to overwrite the source checkpoint {source}: choose another output name")
    semi = dict(checkpoint[CHECKPOINT_KEY])
    semi["student_weights"] = student_weights(checkpoint)
    semi["export_network"] = network
    semi["exported_from"] = os.path.basename(source)
    checkpoint = dict(checkpoint, network_weights=weights)
    checkpoint[CHECKPOINT_KEY] = semi
    atomic_torch_save(checkpoint, output)
    return output


def _model_checkpoints(args) -> List[str]:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    if args.checkpoint:
        return list(args.checkpoint)
    missing = [f for f, v in (("-d", args.d), ("-c", args.c), ("-tr", args.tr)) if v is None]
    if missing:
        raise ExportError(f"give {' '.join(missing)} (the run's dataset, configuration and trainer, as for "
                          f"nnUNetv2_predict) or --checkpoint PATH")
    try:
        dataset = maybe_convert_to_dataset_name(args.d)
    except RuntimeError as e:
        raise ExportError(str(e)) from None
    folder = get_output_folder(dataset, args.tr, args.p, args.c)
    if not os.path.isdir(folder):
        raise ExportError(f"{folder} does not exist: no {args.tr} run of {dataset} {args.c} with plans {args.p} "
                          f"under nnUNet_results ({os.environ.get('nnUNet_results')})")
    folds = args.f or sorted(d[len("fold_"):] for d in os.listdir(folder) if d.startswith("fold_")
                             and os.path.isfile(os.path.join(folder, d, args.chk)))
    if not folds:
        raise ExportError(f"no fold_*/{args.chk} in {folder}: the run has not finished (use -chk "
                          f"checkpoint_latest.pth for an unfinished one)")
    return [os.path.join(folder, f"fold_{f}", args.chk) for f in folds]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: exits with 0, or 1 after one 'error: ...' line."""
    p = argparse.ArgumentParser(prog="nnUNetv2_semi_export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", help="dataset name or id")
    p.add_argument("-c", help="configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-tr", help="trainer of the run, e.g. ReciprocalLearningTrainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-f", nargs="+", help="folds (default: every fold with the checkpoint)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="source checkpoint name (default checkpoint_final.pth)")
    p.add_argument("--checkpoint", nargs="+", help="source checkpoint file(s) instead of -d/-c/-tr/-p/-f/-chk")
    p.add_argument("-n", "--network", help="network to export (see --list)")
    p.add_argument("--list", action="store_true", help="list the networks each checkpoint can export")
    args = p.parse_args(argv)
    try:
        sources = _model_checkpoints(args)
        if args.list or not args.network:
            for src in sources:
                if not os.path.isfile(src):
                    raise ExportError(f"{src} does not exist")
                ckpt = torch.load(src, map_location="cpu", weights_only=False)
                if CHECKPOINT_KEY not in ckpt:
                    raise ExportError(f"{src} was not written by a nnunet_semi trainer: it holds one network only")
                exported = ckpt[CHECKPOINT_KEY].get("export_network", STUDENT)
                print(f"{src} (exports '{exported}'):")
                for name, what in export_choices(ckpt, partial_exports_of(ckpt)).items():
                    print(f"  {name:10s} {what}")
            if not args.list:
                raise ExportError("give the network to export with -n NAME (one of those listed above)")
            return
        for src in sources:
            out = export_checkpoint(src, args.network)
            print(f"wrote {out} ('{args.network}' as network_weights)")
        print(f"predict with: nnUNetv2_predict ... -chk {os.path.basename(out)}")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
