"""Helpers shared by the test files: where the shared data lies, the cases of a raw-data folder, tiny nnU-Net
networks and batches, and :func:`make_trainer`, which builds a real plugin trainer on tiny in-memory plans.

Heavy imports (torch, nnU-Net) happen inside the functions, so the converter tests that only need the paths
stay light."""
from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from typing import Optional, Set

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

#: output classes of the tiny networks (background + 2)
NUM_CLASSES = 3
#: edge length of the tiny networks' patches (2D: 16 x 16, 3D: 16 x 16 x 16)
PATCH = 16
#: parameter-name prefix of nnU-Net's lowest-resolution deep-supervision head. nnU-Net's loss gives that output
#: weight 0 outside DDP (1e-6 under DDP), so without DDP it gets no gradient, as in stock nnU-Net
LOWEST_DS_HEAD = "decoder.seg_layers.0."


def is_lowest_ds_head(name: str) -> bool:
    """Whether a parameter name (relative to a network or an auxiliary module) is in the lowest
    deep-supervision head of a decoder built like nnU-Net's (``decoder.``, A&D's ``decoder_xi.`` ...)."""
    return re.match(r"^[^.]*decoder[^.]*\.seg_layers\.0\.", name) is not None


# ----------------------------------------------------------------------------------------------
# data on disk
# ----------------------------------------------------------------------------------------------
def shared_data_dir() -> str:
    """../shared/data beside the repository (or $NNUNET_SEMI_SHARED_DATA)."""
    return os.environ.get("NNUNET_SEMI_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))


def files_under(root: str) -> dict:
    """{relative path: bytes} of every file under ``root`` (to check that a refusal changed nothing)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def cases_in(folder: str, sub: str) -> Set[str]:
    """The case names in ``folder/sub`` (``CASE_0000.nii.gz`` and ``CASE.nii.gz`` give ``CASE``); an absent
    folder has none."""
    d = os.path.join(folder, sub)
    if not os.path.isdir(d):
        return set()
    return {re.sub(r"(_0000)?\.nii\.gz$", "", f) for f in os.listdir(d)}


# ----------------------------------------------------------------------------------------------
# tiny networks and batches
# ----------------------------------------------------------------------------------------------
def arch(ndim: int, resenc: bool, features=(4, 8, 16)) -> dict:
    """The ``architecture`` entry of nnU-Net plans for a tiny PlainConvUNet or ResidualEncoderUNet."""
    n = len(features)
    conv = "torch.nn.modules.conv.Conv%dd" % ndim
    norm = "torch.nn.modules.instancenorm.InstanceNorm%dd" % ndim
    kwargs = {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
              "kernel_sizes": [[3] * ndim] * n, "strides": [[1] * ndim] + [[2] * ndim] * (n - 1),
              "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True, "norm_op": norm,
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if resenc:
        kwargs["n_blocks_per_stage"] = [1] * n
        name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    else:
        kwargs["n_conv_per_stage"] = [1] * n
        name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    return {"network_class_name": name, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def config_manager(ndim: int, resenc: bool):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    return ConfigurationManager({"architecture": arch(ndim, resenc), "patch_size": [PATCH] * ndim})


def build(cls, ndim: int, resenc: bool, deep_supervision: bool, in_ch: int = 1, seed: int = 0):
    """``cls.build_network_architecture`` of the tiny plans, initialised from ``torch.manual_seed(seed)``."""
    import torch
    torch.manual_seed(seed)
    return cls.build_network_architecture(None, config_manager(ndim, resenc), in_ch, NUM_CLASSES, deep_supervision)


def unlabeled(b: int, shape, low: float = -1.0, high: float = 1.0, views: int = 2):
    """An UnlabeledBatch of uniform noise in [low, high] (global torch RNG), every voxel inside the image."""
    import torch
    from nnunet_semi.data.loader import UnlabeledBatch
    r = lambda: low + (high - low) * torch.rand((b, 1) + tuple(shape))
    return UnlabeledBatch(weak=r(), strong=[r() for _ in range(views)],
                          valid=torch.ones((b,) + tuple(shape), dtype=torch.bool), keys=[f"u{i}" for i in range(b)])


def ds_targets(outputs, target):
    """A label (B, 1, *spatial) as nnU-Net's deep-supervision targets: nearest-neighbour to every output."""
    import torch
    return [torch.nn.functional.interpolate(target.float(), size=o.shape[2:], mode="nearest") for o in outputs]


# ----------------------------------------------------------------------------------------------
# real trainers on tiny plans
# ----------------------------------------------------------------------------------------------
DATASET_NAME = "Dataset999_Tiny"
_scratch: Optional[str] = None


def tiny_plans(resenc: bool = False, batch_size: int = 2) -> dict:
    """nnU-Net plans (as nnUNetv2_train hands them to a trainer) with a '2d' and a '3d_fullres' configuration of
    the tiny architecture, patch 16, batch dice off."""
    def configuration(ndim: int, name: str) -> dict:
        return {"data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": batch_size, "patch_size": [PATCH] * ndim, "median_image_size_in_voxels": [PATCH] * ndim,
                "spacing": [1.0] * ndim, "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": arch(ndim, resenc), "batch_dice": False}
    return {"dataset_name": DATASET_NAME, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": [PATCH] * 3, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"2d": configuration(2, "2d"), "3d_fullres": configuration(3, "3d_fullres")},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {
                "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                      "percentile_99_5": 1.0, "std": 1.0}},
            "continue_training": False}   # what nnUNetv2_train adds (nnU-Net >= 2.8 pops it)


def tiny_dataset_json(num_classes: int = NUM_CLASSES) -> dict:
    labels = {"background": 0, **{f"class{c}": c for c in range(1, num_classes)}}
    return {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"}


def _new_root() -> str:
    """A fresh folder for one trainer's nnUNet_raw/_preprocessed/_results, under one per process that is removed
    at exit."""
    global _scratch
    if _scratch is None:
        _scratch = tempfile.mkdtemp(prefix="nnunet_semi_test_trainers_")
        atexit.register(shutil.rmtree, _scratch, True)
    return tempfile.mkdtemp(dir=_scratch)


def make_trainer(cls, *, ndim: int = 2, resenc: bool = False, num_classes: int = NUM_CLASSES,
                 deep_supervision: bool = True, epochs: int = 10, iters: int = 10, seed: int = 0,
                 root: Optional[str] = None, supervised_run: bool = True, **class_attrs):
    """A real trainer of ``cls`` (any plugin trainer class, the supervised reference included) on the CPU, built as
    nnUNetv2_train builds it: its ``__init__`` with tiny in-memory plans (:func:`tiny_plans`, configuration '2d' or
    '3d_fullres' for ``ndim``), a minimal dataset.json with ``num_classes`` labels and fold 0, then ``initialize()``
    (nnU-Net's network from ``build_network_architecture``, ``configure_optimizers``, ``_build_loss``, and the base's
    ``build_auxiliary_modules`` + ``setup_auxiliary_modules``, plus whatever the method's ``initialize`` adds).
    No data is loaded and no data loader is built.

    - ``class_attrs`` override class attributes (hyper-parameters): the trainer is of a subclass of ``cls`` with
      the same name that sets them, so ``__init__`` and ``initialize()`` see them, as a variant in a user's file
      would. Instance state (``network``, ``loss``, ``is_ddp``, ...) is set on the returned trainer.
    - ``epochs`` x ``iters`` is the training length (``num_epochs``, ``num_iterations_per_epoch``) that the
      schedules see; :func:`goto_step` moves the trainer to an iteration.
    - The network (and any auxiliary network built from the same RNG stream) is initialised from
      ``torch.manual_seed(seed)``; the caller's torch RNG state is left as it was.
    - nnUNet_raw/_preprocessed/_results point to ``root`` (default: a fresh temporary folder) while the trainer
      is built, with every ``nnUNet_semi_*`` variable of the caller's environment unset (budget, schedule,
      seed, teacher checkpoint) and the CPU allocator tuning off; the environment is restored afterwards.

    - A class that starts from the supervised run beside it (``needs_supervised_run``, e.g. Reciprocal Learning's
      teacher) finds a stand-in there with ``supervised_run`` (default): a freshly initialised network of the plans
      (seed ``seed + 1000``, so it differs from the student), written by
      :func:`nnunet_semi.training.supervised_init.stand_in_supervised_run`. ``supervised_run=False``: none, as on
      a machine that has not trained it.

    Build it before ``torch.distributed`` is initialised: nnU-Net's ``__init__`` moves a trainer of an
    initialised process group to CUDA.
    """
    from unittest import mock

    import torch
    import torch.distributed as dist

    from nnunet_semi.training.supervised_init import stand_in_supervised_run

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("make_trainer: build the trainer before init_process_group (nnU-Net's __init__ would "
                           "move it to CUDA), then set is_ddp/local_rank and wrap its networks")
    if class_attrs:
        unknown = sorted(k for k in class_attrs if not hasattr(cls, k))
        if unknown:
            raise TypeError(f"make_trainer: {cls.__name__} has no class attribute(s) {unknown}; set instance "
                            f"attributes on the trainer it returns")
        cls = type(cls.__name__, (cls,), dict(class_attrs))
    root = _new_root() if root is None else root
    paths = {k: os.path.join(root, d) for k, d in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"),
                                                   ("nnUNet_results", "res"))}
    configuration = "2d" if ndim == 2 else "3d_fullres"
    plans = tiny_plans(resenc)
    # initialize() infers nnU-Net's dataset class from the file endings in the preprocessed folder
    data_folder = os.path.join(paths["nnUNet_preprocessed"], DATASET_NAME,
                               plans["configurations"][configuration]["data_identifier"])
    os.makedirs(data_folder, exist_ok=True)
    open(os.path.join(data_folder, "tiny_000.npz"), "w").close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_semi_")}
    env.update(paths, nnUNet_semi_cpu_malloc="0")
    with mock.patch.dict(os.environ, env, clear=True), torch.random.fork_rng(devices=[]):
        trainer = cls(plans, configuration, 0, tiny_dataset_json(num_classes), torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iters
        trainer.enable_deep_supervision = deep_supervision
        if supervised_run and getattr(cls, "needs_supervised_run", lambda: False)():   # not on the reference
            stand_in_supervised_run(trainer, seed=seed + 1000)
        torch.manual_seed(seed)
        trainer.initialize()
    return trainer


def goto_step(trainer, step: int):
    """Put ``trainer`` at global iteration ``step`` of its run (epoch and iteration within it), as its training
    loop would be there."""
    trainer.current_epoch, trainer._iter_in_epoch = divmod(int(step), trainer.num_iterations_per_epoch)
    return trainer


# ----------------------------------------------------------------------------------------------
# two-rank gloo DDP
# ----------------------------------------------------------------------------------------------
def flat_parameters(modules: dict) -> dict:
    """{name: all parameters of the module, flattened and concatenated}."""
    import torch
    return {name: torch.cat([p.detach().flatten() for p in m.parameters()]) for name, m in modules.items()}


def run_two_ranks(worker, out_dir) -> list:
    """Run ``worker(rank, world, init_file, out_dir)`` on two gloo ranks (skips the test where gloo is
    unavailable); each rank saves what it wants compared to ``out_dir/rank<r>.pth``. Returns the two loaded
    objects."""
    import pytest
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(out_dir)
    mp.spawn(worker, args=(2, os.path.join(out_dir, "pg"), out_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pth")) for r in (0, 1)]
