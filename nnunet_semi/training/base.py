"""The semi-supervised base trainer: nnU-Net's trainer plus an unlabeled stream.

A method is a small subclass that sets class attributes and implements hooks: :meth:`compute_loss`
(one loss, one optimizer step: the default :meth:`method_step`), or :meth:`method_step` itself for methods
that step several optimizers (with :meth:`backward`, :meth:`step_optimizer` and one
:meth:`update_grad_scaler` per iteration); :meth:`build_auxiliary_modules` for extra networks or decoders
(:mod:`nnunet_semi.training.auxiliary`); :meth:`export_module` for what nnUNetv2_predict loads. The base
provides everything methods share:

- the unlabeled loader (own worker processes, distinct seeds per worker and DDP rank) giving a weak
  view with nnU-Net's geometry and ``num_strong_views`` strong, pixel-aligned views
  (:class:`~nnunet_semi.data.loader.UnlabeledBatch`), ``unlabeled_batches_per_step`` batches per step
  (a second one is a CutMix source);
- labeled and unlabeled batch sizes (global, split over DDP ranks by nnU-Net's rule);
- the unsupervised weight (:meth:`unsup_weight_now`): exactly 0 during a supervised warm-up (at least
  ``warmup_iters`` iterations and, if ``warmup_pseudo_dice`` is set, until nnU-Net's EMA pseudo Dice
  reaches it), then a ramp-up over ``rampup_iters`` iterations (or ``rampup_fraction`` of the run); the
  step at which the gate opened is checkpoint state, so ``--c`` continues the same schedule. While the gate
  is closed no unlabeled batch is drawn and the step is supervised only (:meth:`supervised_loss`; the
  methods that override :meth:`method_step` get ``unlabeled == []``), unless ``warmup_draws_unlabeled``;
- named auxiliary modules (moved to the device, DDP-wrapped when trainable, train/eval modes, their LR
  schedules, EMA of one or several sources updated identically on every rank from DDP-synchronised
  weights, saved and restored by ``--c``); ``use_ema_teacher`` declares Mean Teacher's one, ``'teacher'``;
- the exported network (``export_network``: ``'student'`` or the name of an auxiliary module), used by
  nnU-Net's validation and written as ``network_weights``;
- AMP, gradient clipping and the optimiser step as nnU-Net does them, with the gradient norm before
  clipping and the fraction of clipped steps logged (``grad_norm``, ``clip_ratio``);
- per-epoch logging of every term ``compute_loss`` returns, drawn as a fourth panel of progress.png and
  written, with the unlabeled data wait, to the progress file (:mod:`nnunet_semi.training.progress_file`);
- per-case metadata (domain, task, ...; :class:`~nnunet_semi.layout.CaseMetadata`) by case key:
  :meth:`metadata_of` for ``self.labeled_keys`` (the current labeled batch) and ``UnlabeledBatch.keys``;
- checkpoints written atomically, with the extra state (auxiliary modules with their optimizers and
  schedules, the student when another module is exported, RNG states, method state) under the key
  ``'nnunet_semi'``, restored by ``--c``/``--val``.

``self.network`` stays the architecture of ``build_network_architecture``, so stock
``nnUNetv2_predict`` loads the exported weights. Hyper-parameters are class attributes; a variant is
a three-line subclass. Training length can be set with the ``nnUNet_semi_*`` environment variables
(:mod:`nnunet_semi.training.budget`).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunet_semi.data.loader import UnlabeledBatch, build_unlabeled_augmenter, locate_unlabeled, split_over_ranks
from nnunet_semi.data.views import MultiViewTransform, split_views, strong_view_transform, weak_view_transform
from nnunet_semi.ema import copy_weights, ema_decay_at, unwrap
from nnunet_semi.env import ext_trainer_configured, missing_trainer_message
from nnunet_semi.layout import CaseMetadata, find_case_metadata
from nnunet_semi.perturbations import cutmix_box_masks
from nnunet_semi.schedules import ramp
from nnunet_semi.training.auxiliary import (AuxiliaryModule, ema_update_from, load_module_state, module_state,
                                            resolve)
from nnunet_semi.training.budget import apply_schedule_overrides
from nnunet_semi.training.checkpoint import atomic_torch_save, rng_state, set_rng_state
from nnunet_semi.training.plugin import PluginTrainerMixin
from nnunet_semi.training.progress import SemiLocalLogger
from nnunet_semi.training.supervised_init import load_supervised_checkpoint, supervised_run_checkpoint

CHECKPOINT_KEY = "nnunet_semi"
NNUNET_LOGGED = {"loss"}
#: class attributes of the plugin's trainers that are not training hyper-parameters
NOT_HPARAMS = {"benchmark_default"}


def hparam_names(cls: type) -> List[str]:
    """The semi-supervised hyper-parameters of a trainer class: the public scalar class attributes of its
    plugin classes (what ``semi_hparams`` saves in every checkpoint)."""
    names: List[str] = []
    for c in reversed(cls.__mro__):
        if c.__module__.startswith("nnunet_semi"):
            for k, v in vars(c).items():
                if not k.startswith("_") and k not in NOT_HPARAMS and k not in names and \
                        isinstance(v, (int, float, str, bool, tuple, type(None))):
                    names.append(k)
    return names


def class_hparams(cls: type) -> dict:
    """The hyper-parameters a new run of ``cls`` trains with, before environment overrides."""
    return {k: getattr(cls, k) for k in hparam_names(cls)}


def _inner_loader(augmenter):
    """nnU-Net's DataLoader inside a (NonDet)MultiThreaded or SingleThreaded augmenter."""
    for attr in ("generator", "data_loader"):
        if hasattr(augmenter, attr):
            return getattr(augmenter, attr)
    raise RuntimeError(f"cannot find the data loader inside {type(augmenter).__name__}")


class SemiSupervisedTrainer(PluginTrainerMixin, nnUNetTrainer):
    """Base class of the semi-supervised trainers (not a method by itself: ``compute_loss`` is the
    hook a method implements)."""

    # ---- unlabeled stream -------------------------------------------------------------------
    #: global unlabeled batch size (split over DDP ranks); None = the plans' labeled batch size
    unlabeled_batch_size: Optional[int] = None
    #: global labeled batch size; None = the plans' batch size
    labeled_batch_size: Optional[int] = None
    #: strong views per unlabeled patch (image-only perturbations of the weak view)
    num_strong_views: int = 1
    #: probability of each strong perturbation (brightness, contrast, gamma, blur, noise)
    strong_aug_p: float = 0.5
    #: unlabeled batches drawn per step (2 gives a CutMix source batch)
    unlabeled_batches_per_step: int = 1
    #: CutMix boxes of the methods that mix unlabeled views (:meth:`cutmix_boxes`): probability that a sample
    #: gets a box (0: none), box area as a fraction of the patch, and the least side ratio
    cutmix_p: float = 0.0
    cutmix_area: tuple = (0.02, 0.4)
    cutmix_ratio_min: float = 0.3
    #: unlabeled loader worker processes; None = half of nnU-Net's nnUNet_n_proc_DA (0 = in-process)
    unlabeled_num_processes: Optional[int] = None
    # ---- unsupervised weight ----------------------------------------------------------------
    #: final weight of the unsupervised loss
    unsup_weight: float = 1.0
    #: ramp-up shape: 'sigmoid' (exp(-5(1-t)^2)), 'linear' or 'none'
    rampup: str = "sigmoid"
    #: ramp-up length as a fraction of all training iterations (0 = no ramp-up); used when rampup_iters is None
    rampup_fraction: float = 0.0
    #: ramp-up length in iterations after the warm-up gate opens (None = rampup_fraction x all iterations)
    rampup_iters: Optional[int] = None
    #: supervised warm-up: the unsupervised weight is exactly 0 for at least this many iterations
    warmup_iters: int = 0
    #: ... and, if set, until nnU-Net's EMA pseudo Dice (ema_fg_dice, updated after each epoch) reaches this
    warmup_pseudo_dice: Optional[float] = None
    #: ``warmup_iters`` capped at this fraction of all iterations (None: no cap), so that a run much shorter
    #: than the recipe's warm-up (a demo, a smoke test) still gets past it
    warmup_max_fraction: Optional[float] = None
    #: while the warm-up gate is closed (unsupervised weight exactly 0): False = no unlabeled batch is drawn and
    #: the step is :meth:`supervised_loss` (no pass on unlabeled data whose loss has weight 0; a warm-up step
    #: costs a supervised one); True = the batches are drawn and the method's step runs at weight 0 (the plugin
    #: up to stop 26: the same gradients, other data draws, and the unlabeled terms logged during the warm-up)
    warmup_draws_unlabeled: bool = False
    #: gradient-norm clipping threshold (nnU-Net's 12)
    grad_clip: float = 12.0
    #: where the student (``self.network``) starts: 'random' (nnU-Net's initialisation) or 'supervised_run' (the
    #: final weights of the supervised run of the same dataset, plans, configuration and fold in nnUNet_results,
    #: :func:`~nnunet_semi.training.supervised_init.supervised_run_checkpoint`); an EMA teacher copies it
    network_init: str = "random"
    # ---- EMA teacher ------------------------------------------------------------------------
    use_ema_teacher: bool = False
    ema_decay: float = 0.99
    #: which weights nnUNetv2_predict and nnU-Net's validation use: 'student' or an auxiliary module's name
    export_network: str = "student"
    #: networks besides the student and whole-network auxiliary modules that ``nnUNetv2_semi_export`` can
    #: write after training: name -> (auxiliary module, its parameter prefix, the student's parameter prefix it
    #: replaces), e.g. a decoder that shares the student's encoder (:mod:`nnunet_semi.training.export`)
    partial_exports: Dict[str, Tuple[str, str, str]] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = SemiLocalLogger(self.logger.local_logger.verbose)
        if self.labeled_batch_size is not None:
            self.configuration_manager.configuration["batch_size"] = int(self.labeled_batch_size)
        #: the method's auxiliary modules by name (built in initialize)
        self.aux: Dict[str, AuxiliaryModule] = {}
        self._grad_norms: Dict[str, torch.Tensor] = {}
        #: per-case metadata of the dataset (empty when it has no case_metadata.json) and the current keys
        self.case_metadata = CaseMetadata()
        self.labeled_keys: List[str] = []
        self.dataloader_unlabeled = None
        self.unlabeled_identifiers: List[str] = []
        self.batch_size_unlabeled: Optional[int] = None
        self._iter_in_epoch = 0
        self._unlabeled_wait = 0.0
        #: global step at which the warm-up gate opened (None: still closed)
        self.unsup_gate_step: Optional[int] = None
        #: the checkpoint the student started from (None: nnU-Net's random initialisation; ``network_init``)
        self.network_init_checkpoint: Optional[str] = None
        #: the refusal of a missing supervised run, held back while this run's own checkpoint may restore it
        #: (``--c`` / ``--val``; :meth:`supervised_run_path`); raised by :meth:`on_train_start` if none was loaded
        self._supervised_run_missing: Optional[str] = None
        apply_schedule_overrides(self)
        if self.warmup_iters < 0:
            raise ValueError(f"{type(self).__name__}.warmup_iters must be >= 0")
        if not ext_trainer_configured():
            self.print_to_log_file("WARNING: " + missing_trainer_message())

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    def initialize(self):
        if self.label_manager.has_regions:
            raise NotImplementedError(f"{type(self).__name__}: region-based training is not supported by the "
                                      f"semi-supervised trainers (softmax pseudo-labels)")
        if self.is_cascaded:
            raise NotImplementedError(f"{type(self).__name__}: cascade configurations are not supported")
        super().initialize()
        world, rank = (dist.get_world_size(), dist.get_rank()) if self.is_ddp else (1, 0)
        global_u = self.unlabeled_batch_size or self.configuration_manager.batch_size
        self.batch_size_unlabeled = split_over_ranks(int(global_u), world, rank)
        self.case_metadata = find_case_metadata(self.preprocessed_dataset_folder_base) or CaseMetadata()
        self.init_network()
        self.aux = dict(self.build_auxiliary_modules())
        self.setup_auxiliary_modules()
        if self.export_network != "student" and self.export_network not in self.aux:
            raise ValueError(f"{type(self).__name__}.export_network = {self.export_network!r}: no such auxiliary "
                             f"module (use 'student' or one of {sorted(self.aux)})")
        self.print_to_log_file(f"nnunet_semi: labeled batch {self.batch_size}, unlabeled batch "
                               f"{self.batch_size_unlabeled} x {self.unlabeled_batches_per_step} per step and rank; "
                               f"hyper-parameters {self.semi_hparams()}")

    @classmethod
    def needs_supervised_run(cls) -> bool:
        """Whether a run starts from the supervised run beside it in nnUNet_results (the benchmark trains that
        run first)."""
        return cls.network_init == "supervised_run"

    def init_network(self) -> None:
        """``network_init = 'supervised_run'``: the student starts from the supervised run's final weights (before
        the auxiliary modules are built, so an EMA teacher starts there too; ``--c`` then restores the run's own)."""
        if self.network_init not in ("random", "supervised_run"):
            raise ValueError(f"{type(self).__name__}.network_init must be 'random' or 'supervised_run'")
        if self.network_init == "random":
            return
        plain = next((c.__name__ for c in type(self).__mro__[1:] if getattr(c, "network_init", None) == "random"),
                     None)
        path = self.supervised_run_path(f"or use {plain} (nnU-Net's random initialisation)" if plain else "")
        if path is None:        # this run's own checkpoint will be loaded instead (--c / --val)
            return
        self.load_supervised_run(self.network, path)
        self.network_init_checkpoint = path
        self.print_to_log_file(f"nnunet_semi: the network starts from the supervised run {path}")

    def supervised_run_path(self, alternative: str = "") -> Optional[str]:
        """``checkpoint_final.pth`` of the supervised run of this run's dataset, plans, configuration and fold in
        nnUNet_results (for any network a method starts there); refused with the paths looked at, the command
        that trains it and ``alternative``.

        Only a new training needs it: where it is gone but this run has a checkpoint of its own (what ``--c`` and
        ``--val`` load), None is returned, the caller keeps its fresh weights, and the refusal waits. Loading a
        checkpoint (:meth:`load_checkpoint`) clears it; a training that starts without one is refused by
        :meth:`on_train_start` with the same message."""
        try:
            return supervised_run_checkpoint(self.output_folder, self.plans_manager.plans_name,
                                             self.configuration_name, type(self).__name__, alternative)
        except RuntimeError as e:
            own = [f for f in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
                   if os.path.isfile(os.path.join(self.output_folder, f))]
            if not own:
                raise
            self._supervised_run_missing = str(e)
            self.print_to_log_file(f"nnunet_semi: {e} This run's own {own[0]} is in {self.output_folder}: continuing "
                                   f"it (--c) or validating it (--val) restores its weights from there; a new "
                                   f"training is refused.")
            return None

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self._supervised_run_missing is not None:     # a new training, not --c: it needs the supervised run
            raise RuntimeError(self._supervised_run_missing)
        super().on_train_start()

    def load_supervised_run(self, module: nn.Module, path: str, fix: Optional[str] = None,
                            given_by: str = "") -> None:
        """Load a supervised ``checkpoint_final.pth`` of these plans / configuration / dataset into ``module``
        (:func:`~nnunet_semi.training.supervised_init.load_supervised_checkpoint`)."""
        plans, cfg, dataset = self.plans_manager.plans_name, self.configuration_name, self.plans_manager.dataset_name
        fold = os.path.basename(self.output_folder)[len("fold_"):]
        load_supervised_checkpoint(module, path, plans, cfg, dataset, self.device,
                                   fix or f"train the supervised run with nnUNetv2_train {dataset} {cfg} {fold} "
                                          f"-p {plans}", given_by)

    # ------------------------------------------------------------------------------------------
    # auxiliary modules
    # ------------------------------------------------------------------------------------------
    def build_plain_network(self) -> nn.Module:
        """A new network of ``build_network_architecture`` for these plans (on the device)."""
        return self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)

    def build_auxiliary_modules(self) -> Dict[str, AuxiliaryModule]:
        """The method's extra networks or decoders. Default: with ``use_ema_teacher``, ``'teacher'``, an EMA
        of the student (a copy of its initial weights, no gradients, deep supervision off)."""
        if not self.use_ema_teacher:
            return {}
        teacher = self.build_plain_network()
        copy_weights(teacher, self.network)
        teacher.requires_grad_(False)
        self._set_ds(teacher, False)
        return {"teacher": AuxiliaryModule(teacher, ema_sources=("network",), ema_decay=self.ema_decay)}

    def setup_auxiliary_modules(self) -> None:
        """Device, gradients, modes and (for the trainable ones under DDP) nnU-Net's DDP wrapping, as
        nnU-Net does it for ``self.network`` (SyncBatchNorm, ``device_ids`` on CUDA)."""
        for name, a in self.aux.items():
            a.module.to(self.device)
            if not a.trainable:
                a.module.requires_grad_(False)
            for src in a.ema_sources:
                resolve(src, self.network, self.aux)   # a wrong name fails here, not at the first step
            if a.trainable and self.is_ddp:
                from torch.nn.parallel import DistributedDataParallel as DDP
                a.module = nn.SyncBatchNorm.convert_sync_batchnorm(a.module)
                a.wrapped = DDP(a.module, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
            else:
                a.wrapped = a.module
            a.module.train(a.wants_train_mode)

    @property
    def teacher(self) -> Optional[nn.Module]:
        """Mean Teacher's EMA teacher (the auxiliary module ``'teacher'``), or None."""
        a = self.__dict__.get("aux", {}).get("teacher")
        return a.module if a is not None else None

    def ema_rules(self) -> List[Tuple[str, Tuple[str, ...], float, bool, Tuple[str, ...]]]:
        """``(target, sources, decay, warmup, exclude)`` of every EMA update after an iteration, as module
        paths (:func:`~nnunet_semi.training.auxiliary.resolve`), ``exclude`` parameter-name prefixes left out.
        Default: the auxiliary modules with ``ema_sources``. A method whose EMA target is part of the trained
        network (A&D: the prediction decoder ``'network.decoder'``, also trained by SGD, from two auxiliary
        decoders, its ``'encoder.'`` reference excluded) adds a rule here."""
        return [(name, tuple(a.ema_sources), a.ema_decay, a.ema_warmup, ()) for name, a in self.aux.items()
                if a.ema_sources]

    def update_ema_modules(self) -> None:
        """Every :meth:`ema_rules` update, from the current (DDP-synchronised) weights."""
        for target, sources, decay, warmup, exclude in self.ema_rules():
            d = ema_decay_at(self.global_step, decay) if warmup else decay
            ema_update_from(resolve(target, self.network, self.aux),
                            [resolve(src, self.network, self.aux) for src in sources], d, exclude)

    @staticmethod
    def _set_ds(module: nn.Module, enabled: bool) -> None:
        mod = unwrap(module)
        if hasattr(mod, "decoder") and hasattr(mod.decoder, "deep_supervision"):
            mod.decoder.deep_supervision = enabled

    def semi_hparams(self) -> dict:
        """Every semi-supervised hyper-parameter (class attributes of the plugin's classes), as this trainer
        uses them (environment overrides included)."""
        return {k: getattr(self, k) for k in hparam_names(type(self))}

    def strong_views_must_align(self) -> bool:
        """Whether the method's strong views must stay pixel-aligned with the weak view: True where a prediction
        of the weak view (a teacher's, a pseudo-label) is the target on a strong view, as in Mean Teacher,
        CrossMatch and Reciprocal Learning. A method whose targets come from the strong view itself returns False
        (A&D with ``pseudo_label_view = 'same'``)."""
        return True

    def get_strong_transform(self, do_dummy_2d_data_aug: bool):
        """The image-only strong perturbation: the plugin's intensity view, or SVDA with ``augmentation =
        'svda'`` (override for a method's own strong augmentation). SVDA's rotation and zoom would move the
        image away from the weak view's targets and validity mask, so where :meth:`strong_views_must_align` the
        SVDA strong view draws ``svda_sample_num`` of its four intensity operations only (at most four)."""
        if self.augmentation == "svda":
            from nnunet_semi.data.svda import svda_strong_view_transform, SVDA_INTENSITY_OPS
            ndim = len(self.configuration_manager.patch_size)
            ops, sample_num = None, self.svda_sample_num
            if self.strong_views_must_align():
                ops, sample_num = SVDA_INTENSITY_OPS, min(sample_num, len(SVDA_INTENSITY_OPS))
            return svda_strong_view_transform("2d" if ndim == 2 else "3d", sample_num=sample_num, p=self.svda_p,
                                              ignore_axes=(0,) if do_dummy_2d_data_aug else None, ops=ops)
        return strong_view_transform(self.strong_aug_p, ignore_axes=(0,) if do_dummy_2d_data_aug else None)

    def get_dataloaders(self):
        dl_tr, dl_val = super().get_dataloaders()
        self.dataloader_unlabeled = self.build_unlabeled_dataloader(_inner_loader(dl_tr))
        _ = next(self.dataloader_unlabeled)
        return dl_tr, dl_val

    def build_unlabeled_dataloader(self, labeled_loader):
        """Unlabeled augmenter with the labeled loader's patch sizes and nnU-Net's geometric transforms."""
        folder, ids = locate_unlabeled(self.preprocessed_dataset_folder_base, self.plans_manager.plans,
                                       self.configuration_name, self.configuration_manager.data_identifier,
                                       self.plans_manager.dataset_name, labeled_loader.indices)
        self.unlabeled_identifiers = ids
        dataset = self.dataset_class(folder, ids)
        initial, final = labeled_loader.patch_size, labeled_loader.final_patch_size
        if labeled_loader.patch_size_was_2d:
            initial, final = initial[1:], final[1:]
        do_dummy_2d = any(type(t).__name__ == "Convert3DTo2DTransform"
                          for t in getattr(labeled_loader.transforms, "transforms", []))
        transform = MultiViewTransform(weak_view_transform(labeled_loader.transforms),
                                       self.get_strong_transform(do_dummy_2d), self.num_strong_views)
        n = self.unlabeled_num_processes
        if n is None:
            allowed = get_allowed_n_proc_DA()
            n = 0 if allowed == 0 else max(1, allowed // 2)
        self.print_to_log_file(f"nnunet_semi: {len(ids)} unlabeled cases from {folder}, {n} worker(s)")
        return build_unlabeled_augmenter(dataset, self.batch_size_unlabeled, initial, final, self.label_manager,
                                         transform, n, self.local_rank, self.device.type == "cuda")

    # ------------------------------------------------------------------------------------------
    # training step
    # ------------------------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return self.current_epoch * self.num_iterations_per_epoch + self._iter_in_epoch

    @property
    def total_steps(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def rampup_length(self) -> float:
        """Ramp-up length in iterations, counted from the step at which the warm-up gate opens."""
        if self.rampup_iters is not None:
            return float(self.rampup_iters)
        return self.rampup_fraction * self.total_steps

    def pseudo_dice_now(self) -> Optional[float]:
        """nnU-Net's EMA pseudo Dice after the last finished epoch (None before the first)."""
        values = self.logger.get_value("ema_fg_dice", step=None)   # nnU-Net's MetaLogger (or LocalLogger)
        return float(values[-1]) if values else None

    def warmup_length(self) -> int:
        """Iterations before the warm-up gate may open: ``warmup_iters``, at most ``warmup_max_fraction`` of
        all iterations when that is set."""
        n = int(self.warmup_iters)
        if self.warmup_max_fraction is not None:
            n = min(n, int(round(self.warmup_max_fraction * self.total_steps)))
        return n

    def update_unsup_gate(self) -> None:
        """Open the warm-up gate at the first step with at least :meth:`warmup_length` iterations done and,
        when ``warmup_pseudo_dice`` is set, nnU-Net's EMA pseudo Dice at or above it. It never closes again."""
        if self.unsup_gate_step is not None or self.global_step < self.warmup_length():
            return
        dice = self.pseudo_dice_now()
        if self.warmup_pseudo_dice is not None and (dice is None or not dice >= self.warmup_pseudo_dice):
            return
        self.unsup_gate_step = self.global_step
        if self.warmup_length() or self.warmup_pseudo_dice is not None:
            self.print_to_log_file(f"nnunet_semi: supervised warm-up over, unsupervised terms ramp in from step "
                                   f"{self.global_step}" + (f" (EMA pseudo Dice {dice:.3f})" if dice is not None
                                                            else ""))

    def rampup_factor(self) -> float:
        """0 while the warm-up gate is closed, then the ramp-up from the step it opened."""
        if self.unsup_gate_step is None:
            return 0.0
        return ramp(self.rampup, self.global_step - self.unsup_gate_step, self.rampup_length())

    def unsup_weight_now(self) -> float:
        return self.unsup_weight * self.rampup_factor()

    def autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def metadata_of(self, keys) -> List[dict]:
        """The per-case metadata (``{}`` where there is none) of nnU-Net case keys, e.g. ``self.labeled_keys``
        or ``UnlabeledBatch.keys``."""
        return [self.case_metadata.get(str(k)) for k in keys]

    def next_unlabeled(self) -> UnlabeledBatch:
        t0 = time.perf_counter()
        b = next(self.dataloader_unlabeled)
        self._unlabeled_wait += time.perf_counter() - t0
        views = split_views(b["data"].to(self.device, non_blocking=True), self.num_input_channels)
        valid = b["target"].to(self.device, non_blocking=True)[:, 0] > 0
        return UnlabeledBatch(weak=views[0], strong=views[1:], valid=valid, keys=b["keys"])

    def cutmix_boxes(self, batch_size: int, spatial_shape) -> torch.Tensor:
        """(B, *spatial) bool CutMix boxes of ``cutmix_p`` / ``cutmix_area`` / ``cutmix_ratio_min``, drawn on the
        host (which samples got one is known without a device sync)."""
        return cutmix_box_masks(batch_size, spatial_shape, self.cutmix_p, self.cutmix_area, self.cutmix_ratio_min)

    def joint_forward(self, labeled: torch.Tensor, *unlabeled: torch.Tensor):
        """One student forward on [labeled; unlabeled_1; ...] (cheaper than separate passes; identical with
        instance norm). Returns the labeled output (a deep-supervision list when enabled) and the
        full-resolution output of each unlabeled part."""
        sizes = [labeled.shape[0]] + [u.shape[0] for u in unlabeled]
        out = self.network(torch.cat([labeled, *unlabeled], 0))
        if isinstance(out, (list, tuple)):
            parts = [o.split(sizes) for o in out]
            return [p[0] for p in parts], list(parts[0][1:])
        parts = out.split(sizes)
        return parts[0], list(parts[1:])

    def compute_loss(self, data: torch.Tensor, target: Union[torch.Tensor, List[torch.Tensor]],
                     unlabeled: List[UnlabeledBatch]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The method: total loss and a dict of scalar terms to log (e.g. loss_sup, loss_unsup,
        pl_confidence, mask_ratio). Runs under autocast on CUDA."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss")

    def trainable_parameters(self):
        return self.network.parameters()

    def nnunet_optimizer(self, parameters):
        """nnU-Net's optimizer and schedule (SGD 0.99 Nesterov from ``initial_lr``, poly over ``num_epochs``) for
        any parameters: the network's, or an auxiliary module's of a method that trains several."""
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        opt = torch.optim.SGD(parameters, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                              nesterov=True)
        return opt, PolyLRScheduler(opt, self.initial_lr, self.num_epochs)

    def all_reduce_gradients(self, parameters) -> None:
        """Average the gradients of ``parameters`` over DDP ranks, for a method whose forward calls nnU-Net's
        modules directly instead of through the DDP wrapper (A&D: three paths through one encoder). A parameter
        without a gradient counts as zero. One flat all-reduce; nothing without DDP."""
        if not self.is_ddp:
            return
        params = list(parameters)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward()``, through nnU-Net's grad scaler when there is one (CUDA AMP)."""
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward(**kwargs)

    def step_optimizer(self, optimizer: torch.optim.Optimizer, parameters, clip: Optional[float] = None,
                       name: str = "network") -> torch.Tensor:
        """Unscale (AMP), clip the gradient norm to ``clip`` (default ``grad_clip``, nnU-Net's 12) and step one
        optimizer, as nnU-Net does. The norm before clipping is kept (a tensor, no sync) and logged as
        ``grad_norm`` (``grad_norm_<name>`` for another optimizer than the network's). Call
        :meth:`update_grad_scaler` once per iteration after the last optimizer step."""
        parameters = list(parameters)
        clip = self.grad_clip if clip is None else clip
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip is not None else float("inf"))
        if self.grad_scaler is not None:
            self.grad_scaler.step(optimizer)
        else:
            optimizer.step()
        self._grad_norms[name] = norm
        return norm

    def update_grad_scaler(self) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.update()

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, then :meth:`step_optimizer` of nnU-Net's optimizer and the scaler update (one loss, one
        optimizer: what the default :meth:`method_step` does)."""
        self.backward(loss)
        self.step_optimizer(self.optimizer, self.trainable_parameters())
        self.update_grad_scaler()

    @property
    def _grad_norm(self) -> Optional[torch.Tensor]:
        return self._grad_norms.get("network")

    def method_step(self, data: torch.Tensor, target: Union[torch.Tensor, List[torch.Tensor]],
                    unlabeled: List[UnlabeledBatch]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One training iteration of the method, optimizer steps included; returns the loss to report as
        nnU-Net's train loss and the terms to log. Default: :meth:`compute_loss` under autocast, then
        :meth:`optimizer_step`; :meth:`supervised_loss` instead while the warm-up gate is closed and no unlabeled
        batch was drawn (``unlabeled == []``). A method with several optimizers overrides this."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, terms = self.compute_loss(data, target, unlabeled) if unlabeled or \
                not self.unlabeled_batches_per_step else self.supervised_loss(data, target)
        self.optimizer_step(loss)
        return loss, terms

    def supervised_loss(self, data: torch.Tensor, target: Union[torch.Tensor, List[torch.Tensor]]
                        ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of a warm-up step without unlabeled batches (the gate is closed, so :meth:`compute_loss`'s
        unsupervised terms would have weight 0): nnU-Net's loss of the student on the labeled batch. A method
        whose total scales the supervised term (CrossMatch) overrides it to give the same total."""
        loss = self.loss(self.network(data), target)
        return loss, {"loss_sup": loss.detach()}

    def draws_unlabeled(self) -> bool:
        """Whether this step draws its unlabeled batches: always once the warm-up gate is open (and with
        ``warmup_draws_unlabeled``), never before (the unsupervised weight is exactly 0 there)."""
        return self.unlabeled_batches_per_step > 0 and (self.warmup_draws_unlabeled or
                                                        self.unsup_gate_step is not None)

    def after_optimizer_step(self) -> None:
        self.update_ema_modules()

    def train_step(self, batch: dict) -> dict:
        self.labeled_keys = [str(k) for k in batch.get("keys", [])]
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.update_unsup_gate()
        unlabeled = [self.next_unlabeled() for _ in range(self.unlabeled_batches_per_step)] \
            if self.draws_unlabeled() else []
        self._grad_norms = {}
        loss, terms = self.method_step(data, target, unlabeled)
        self.after_optimizer_step()
        out = {"loss": loss.detach().cpu().numpy(), "unsup_weight_factor": self.rampup_factor()}
        terms = {**terms, **self._grad_norm_terms()}
        out.update(self._terms_to_floats(terms))
        self._iter_in_epoch += 1
        return out

    def _grad_norm_terms(self) -> Dict[str, torch.Tensor]:
        """grad_norm / clip_ratio per optimizer stepped this iteration; a non-finite norm (an AMP overflow
        step) is logged as NaN, not as clipped."""
        out = {}
        for name, norm in self._grad_norms.items():
            suffix = "" if name == "network" else f"_{name}"
            clip = self.grad_clip if name == "network" else self.aux[name].grad_clip
            norm = norm.detach().float()
            finite = torch.isfinite(norm)
            out["grad_norm" + suffix] = torch.where(finite, norm, torch.nan)
            if clip is not None:
                out["clip_ratio" + suffix] = torch.where(finite, (norm > clip).float(), torch.nan)
        return out

    def _terms_to_floats(self, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Logged terms as floats with ONE device-to-host transfer (one sync per step on GPU, not one
        per term)."""
        tensors = {k: v for k, v in terms.items() if torch.is_tensor(v)}
        out = {k: float(v) for k, v in terms.items() if not torch.is_tensor(v)}
        if tensors:
            stacked = torch.stack([v.detach().float().reshape(()).to(self.device) for v in tensors.values()])
            out.update(zip(tensors.keys(), stacked.cpu().tolist()))
        return out

    # ------------------------------------------------------------------------------------------
    # epochs and logging
    # ------------------------------------------------------------------------------------------
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._iter_in_epoch = 0
        self._unlabeled_wait = 0.0
        for name, a in self.aux.items():
            a.module.train(a.wants_train_mode)
            if a.lr_scheduler is not None:
                a.lr_scheduler.step(self.current_epoch)
                if a.optimizer is not None:
                    self.print_to_log_file(f"nnunet_semi: {name} learning rate "
                                           f"{a.optimizer.param_groups[0]['lr']:.5f}")

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        # the union of the iterations' terms (a method may log different terms in different phases)
        keys = list(dict.fromkeys(k for o in train_outputs for k in o if k not in NNUNET_LOGGED))
        for k in keys:
            values = [float(o[k]) for o in train_outputs if k in o]
            value = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.nanmean(gathered))
            self.logger.local_logger.register(k)
            self.logger.log(k, value, self.current_epoch)
        if keys:
            self.print_to_log_file("semi: " + ", ".join(
                f"{k} {self.logger.get_value(k, step=-1):.4f}" for k in keys))
        epoch_time = time.time() - self.logger.get_value("epoch_start_timestamps", step=-1)
        self.print_to_log_file(f"unlabeled data wait: {self._unlabeled_wait:.2f} s "
                               f"({100 * self._unlabeled_wait / max(epoch_time, 1e-9):.1f}% of the training epoch)")

    def progress_extras(self) -> dict:
        """The progress file's ``unlabeled_wait_s``: this epoch's wait for unlabeled batches."""
        return {"unlabeled_wait_s": self._unlabeled_wait}

    def on_train_end(self):
        super().on_train_end()
        aug = self.dataloader_unlabeled
        if aug is not None and hasattr(aug, "_finish"):
            aug._finish()
        self.dataloader_unlabeled = None

    # ------------------------------------------------------------------------------------------
    # validation and export with the chosen network
    # ------------------------------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        """The network whose weights become ``network_weights`` (what stock nnUNetv2_predict loads, so it
        must be the architecture of ``build_network_architecture``) and that nnU-Net's validation uses:
        the student, or the auxiliary module named by ``export_network``. A method that exports a composed
        network overrides this."""
        if self.export_network == "student" or self.export_network not in self.aux:
            return unwrap(self.network)
        return self.aux[self.export_network].module

    @contextmanager
    def exported_network(self):
        """Temporarily make ``self.network`` the network that is exported."""
        exported = self.export_module()
        if exported is unwrap(self.network):
            yield
            return
        student = self.network
        was_training = exported.training
        ds = unwrap(student).decoder.deep_supervision if hasattr(unwrap(student), "decoder") else False
        old_ds = exported.decoder.deep_supervision if hasattr(exported, "decoder") else None
        self.network = exported
        self._set_ds(exported, ds)
        try:
            yield
        finally:
            self.network = student
            if old_ds is not None:
                self._set_ds(exported, old_ds)
            exported.train(was_training)

    def validation_step(self, batch: dict) -> dict:
        with self.exported_network():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self.exported_network():
            return super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def semi_state_dict(self) -> dict:
        """Extra checkpoint state (tensors, dicts and primitives only). Methods extend it."""
        state = {"format": 2, "export_network": self.export_network, "rng": rng_state(),
                 "hparams": self.semi_hparams(), "unsup_gate_step": self.unsup_gate_step,
                 "aux": {name: module_state(a) for name, a in self.aux.items()},
                 "network_init_checkpoint": self.network_init_checkpoint}
        if self.export_module() is not unwrap(self.network):
            state["student_weights"] = unwrap(self.network).state_dict()
        return state

    def load_semi_state_dict(self, state: dict) -> None:
        if state.get("student_weights") is not None:
            unwrap(self.network).load_state_dict(state["student_weights"])
        saved = dict(state.get("aux") or {})
        if state.get("teacher_weights") is not None and "teacher" not in saved:   # format 1 (plugin 0.1)
            saved["teacher"] = {"weights": state["teacher_weights"]}
        for name, a in self.aux.items():
            if name in saved:
                load_module_state(a, saved[name], name)
            elif a.ema_sources == ("network",):
                copy_weights(a.module, self.network)   # e.g. a supervised checkpoint: the teacher starts there
            else:
                self.print_to_log_file(f"nnunet_semi: the checkpoint holds no state of '{name}'; it keeps its "
                                       f"initial weights")
        self.network_init_checkpoint = state.get("network_init_checkpoint", self.network_init_checkpoint)
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        # a checkpoint without the key predates the warm-up gate: its schedule started at step 0
        self.unsup_gate_step = state.get("unsup_gate_step", 0 if "hparams" in state else None)

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.export_module().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: self.semi_state_dict(),
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError("load_checkpoint takes the checkpoint's file name")
        super().load_checkpoint(filename_or_checkpoint)
        self._supervised_run_missing = None      # the run's own weights replace those it would have started from
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            self.print_to_log_file(f"{filename_or_checkpoint} holds no '{CHECKPOINT_KEY}' state (not written by a "
                                   f"semi-supervised trainer): auxiliary modules and method state start from "
                                   f"the student")
            state = {}
        self.load_semi_state_dict(state)
