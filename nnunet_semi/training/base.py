"""The semi-supervised base trainer: nnU-Net's trainer plus an unlabeled stream.

A method is a small subclass that sets class attributes and implements one hook,
:meth:`SemiSupervisedTrainer.compute_loss`. The base provides everything methods share:

- the unlabeled loader (own worker processes, distinct seeds per worker and DDP rank) giving a weak
  view with nnU-Net's geometry and ``num_strong_views`` strong, pixel-aligned views
  (:class:`~nnunet_semi.data.loader.UnlabeledBatch`), ``unlabeled_batches_per_step`` batches per step
  (a second one is a CutMix source);
- labeled and unlabeled batch sizes (global, split over DDP ranks by nnU-Net's rule);
- the unsupervised weight (:meth:`unsup_weight_now`): exactly 0 during a supervised warm-up (at least
  ``warmup_iters`` iterations and, if ``warmup_pseudo_dice`` is set, until nnU-Net's EMA pseudo Dice
  reaches it), then a ramp-up over ``rampup_iters`` iterations (or ``rampup_fraction`` of the run); the
  step at which the gate opened is checkpoint state, so ``--c`` continues the same schedule;
- an optional EMA teacher (``use_ema_teacher``), updated identically on every rank from the
  DDP-synchronised student, validated/exported instead of the student if ``export_network='teacher'``;
- AMP, gradient clipping and the optimiser step as nnU-Net does them, with the gradient norm before
  clipping and the fraction of clipped steps logged (``grad_norm``, ``clip_ratio``);
- per-epoch logging of every term ``compute_loss`` returns, drawn as a fourth panel of progress.png;
- checkpoints written atomically, with the extra state (teacher, student when the teacher is
  exported, RNG states, method state) under the key ``'nnunet_semi'``, restored by ``--c``/``--val``.

``self.network`` stays the architecture of ``build_network_architecture``, so stock
``nnUNetv2_predict`` loads the exported weights. Hyper-parameters are class attributes; a variant is
a three-line subclass. Training length can be set with the ``nnUNet_semi_*`` environment variables
(:mod:`nnunet_semi.training.budget`).
"""
from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunet_semi.data.loader import UnlabeledBatch, build_unlabeled_augmenter, locate_unlabeled, split_over_ranks
from nnunet_semi.data.views import MultiViewTransform, split_views, strong_view_transform, weak_view_transform
from nnunet_semi.ema import copy_weights, ema_decay_at, ema_update, unwrap
from nnunet_semi.env import ext_trainer_configured, missing_trainer_message
from nnunet_semi.schedules import ramp
from nnunet_semi.training.budget import apply_schedule_overrides
from nnunet_semi.training.plugin import PluginTrainerMixin
from nnunet_semi.training.progress import SemiLocalLogger

CHECKPOINT_KEY = "nnunet_semi"
NNUNET_LOGGED = {"loss"}


def atomic_torch_save(obj, filename: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``filename``: a
    kill during saving leaves the previous checkpoint intact, never a truncated one."""
    tmp = f"{filename}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # different number of GPUs than when saved
            pass


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
    #: gradient-norm clipping threshold (nnU-Net's 12)
    grad_clip: float = 12.0
    # ---- EMA teacher ------------------------------------------------------------------------
    use_ema_teacher: bool = False
    ema_decay: float = 0.99
    #: which weights nnUNetv2_predict and nnU-Net's validation use: 'student' or 'teacher'
    export_network: str = "student"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = SemiLocalLogger(self.logger.local_logger.verbose)
        if self.labeled_batch_size is not None:
            self.configuration_manager.configuration["batch_size"] = int(self.labeled_batch_size)
        if self.export_network not in ("student", "teacher"):
            raise ValueError(f"{type(self).__name__}.export_network must be 'student' or 'teacher'")
        if self.export_network == "teacher" and not self.use_ema_teacher:
            raise ValueError(f"{type(self).__name__} exports the teacher but has use_ema_teacher = False")
        self.teacher: Optional[nn.Module] = None
        self.dataloader_unlabeled = None
        self.unlabeled_identifiers: List[str] = []
        self.batch_size_unlabeled: Optional[int] = None
        self._iter_in_epoch = 0
        self._unlabeled_wait = 0.0
        #: global step at which the warm-up gate opened (None: still closed)
        self.unsup_gate_step: Optional[int] = None
        self._grad_norm: Optional[torch.Tensor] = None
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
        if self.use_ema_teacher:
            self.teacher = self.build_network_architecture(
                self.plans_manager, self.configuration_manager, self.num_input_channels,
                self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
            copy_weights(self.teacher, self.network)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self._set_ds(self.teacher, False)
        self.print_to_log_file(f"nnunet_semi: labeled batch {self.batch_size}, unlabeled batch "
                               f"{self.batch_size_unlabeled} x {self.unlabeled_batches_per_step} per step and rank; "
                               f"hyper-parameters {self.semi_hparams()}")

    @staticmethod
    def _set_ds(module: nn.Module, enabled: bool) -> None:
        mod = unwrap(module)
        if hasattr(mod, "decoder") and hasattr(mod.decoder, "deep_supervision"):
            mod.decoder.deep_supervision = enabled

    def semi_hparams(self) -> dict:
        """Every semi-supervised hyper-parameter (class attributes of the plugin's classes)."""
        out = {}
        for cls in reversed(type(self).__mro__):
            if cls.__module__.startswith("nnunet_semi"):
                for k, v in vars(cls).items():
                    if not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple, type(None))):
                        out[k] = getattr(self, k)
        return out

    def get_strong_transform(self, do_dummy_2d_data_aug: bool):
        """The image-only strong perturbation (override for a method's own strong augmentation)."""
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

    def update_unsup_gate(self) -> None:
        """Open the warm-up gate at the first step with at least ``warmup_iters`` iterations done and, when
        ``warmup_pseudo_dice`` is set, nnU-Net's EMA pseudo Dice at or above it. It never closes again."""
        if self.unsup_gate_step is not None or self.global_step < self.warmup_iters:
            return
        dice = self.pseudo_dice_now()
        if self.warmup_pseudo_dice is not None and (dice is None or not dice >= self.warmup_pseudo_dice):
            return
        self.unsup_gate_step = self.global_step
        if self.warmup_iters or self.warmup_pseudo_dice is not None:
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

    def next_unlabeled(self) -> UnlabeledBatch:
        t0 = time.perf_counter()
        b = next(self.dataloader_unlabeled)
        self._unlabeled_wait += time.perf_counter() - t0
        views = split_views(b["data"].to(self.device, non_blocking=True), self.num_input_channels)
        valid = b["target"].to(self.device, non_blocking=True)[:, 0] > 0
        return UnlabeledBatch(weak=views[0], strong=views[1:], valid=valid, keys=b["keys"])

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

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, unscale, clip the gradient norm to ``grad_clip`` (nnU-Net's 12) and step, as nnU-Net
        does. The norm before clipping is kept (a tensor, no sync) for the step's logged terms."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.grad_clip)
            self.optimizer.step()

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.network, ema_decay_at(self.global_step, self.ema_decay))

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        unlabeled = [self.next_unlabeled() for _ in range(self.unlabeled_batches_per_step)]
        self.update_unsup_gate()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, terms = self.compute_loss(data, target, unlabeled)
        self._grad_norm = None
        self.optimizer_step(loss)
        self.after_optimizer_step()
        out = {"loss": loss.detach().cpu().numpy(), "unsup_weight_factor": self.rampup_factor()}
        if self._grad_norm is not None:  # a non-finite norm (AMP overflow step) is logged as NaN, not as clipped
            norm = self._grad_norm.detach().float()
            finite = torch.isfinite(norm)
            terms = {**terms, "grad_norm": torch.where(finite, norm, torch.nan),
                     "clip_ratio": torch.where(finite, (norm > self.grad_clip).float(), torch.nan)}
        out.update(self._terms_to_floats(terms))
        self._iter_in_epoch += 1
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
        if self.teacher is not None:
            self.teacher.eval()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        keys = [k for k in train_outputs[0] if k not in NNUNET_LOGGED] if train_outputs else []
        for k in keys:
            value = float(np.nanmean([float(o[k]) for o in train_outputs]))
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

    def on_train_end(self):
        super().on_train_end()
        aug = self.dataloader_unlabeled
        if aug is not None and hasattr(aug, "_finish"):
            aug._finish()
        self.dataloader_unlabeled = None

    # ------------------------------------------------------------------------------------------
    # validation and export with the chosen network
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def exported_network(self):
        """Temporarily make ``self.network`` the network that is exported (teacher or student)."""
        if self.export_network != "teacher" or self.teacher is None:
            yield
            return
        student = self.network
        self.network = self.teacher
        ds = unwrap(student).decoder.deep_supervision if hasattr(unwrap(student), "decoder") else False
        self._set_ds(self.teacher, ds)
        try:
            yield
        finally:
            self.network = student
            self._set_ds(self.teacher, False)
            self.teacher.eval()

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
        state = {"format": 1, "export_network": self.export_network, "rng": rng_state(),
                 "hparams": self.semi_hparams(), "unsup_gate_step": self.unsup_gate_step}
        if self.teacher is not None:
            state["teacher_weights"] = self.teacher.state_dict()
            if self.export_network == "teacher":
                state["student_weights"] = unwrap(self.network).state_dict()
        return state

    def load_semi_state_dict(self, state: dict) -> None:
        if state.get("student_weights") is not None:
            unwrap(self.network).load_state_dict(state["student_weights"])
        if self.teacher is not None:
            if state.get("teacher_weights") is not None:
                self.teacher.load_state_dict(state["teacher_weights"])
            else:
                copy_weights(self.teacher, self.network)
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
        student = unwrap(self.network)
        exported = self.teacher if (self.export_network == "teacher" and self.teacher is not None) else student
        checkpoint = {
            "network_weights": exported.state_dict(),
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
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            self.print_to_log_file(f"{filename_or_checkpoint} holds no '{CHECKPOINT_KEY}' state (not written by a "
                                   f"semi-supervised trainer): teacher and method state start from the student")
            state = {}
        self.load_semi_state_dict(state)
