"""What every trainer of the plugin adds to nnU-Net's, the supervised reference included, so all arms of
a comparison behave alike: the ``nnUNet_semi_*`` budget/seed variables, a cross-validation split
that works with the few labeled cases semi-supervised settings have, on the CPU glibc's allocator
told to reuse freed tensor memory (see :mod:`nnunet_semi.cpu_malloc`), and an opt-in skip of the
validation nnU-Net runs after training (``nnUNet_semi_skip_final_validation=1``, for benchmarks and
demos that evaluate held-out cases themselves; ``nnUNetv2_train ... --val`` still runs it), the
machine-readable progress file beside nnU-Net's training log (:mod:`nnunet_semi.training.progress_file`),
and the choice of the training augmentation (``augmentation``: nnU-Net's, or A&D's SVDA,
:mod:`nnunet_semi.data.svda`), so that any trainer, the supervised reference included, can train with either."""
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, save_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_semi.cpu_malloc import ENV_VAR as MALLOC_ENV_VAR, tune_cpu_malloc
from nnunet_semi.training.budget import SKIP_FINAL_VALIDATION_VAR, apply_budget_overrides, env_flag
from nnunet_semi.training.progress_file import FINAL_VALIDATION_SKIPPED, PROGRESS_FILE, ProgressFileWriter


class PluginTrainerMixin:
    #: whether the benchmark (benchmarks/run_benchmark.py) runs this trainer by default. Only a class that sets
    #: it itself counts (:meth:`is_benchmark_default`): a variant subclass does not inherit True.
    benchmark_default: bool = False
    #: the labeled stream's training augmentation: 'nnunet' (nnU-Net's ``get_training_transforms``) or 'svda'
    #: (A&D's strong augmentation: ``svda_sample_num`` of 6 operations, each with probability ``svda_p``, no
    #: mirroring; semi-supervised trainers also take it as their strong unlabeled view)
    augmentation: str = "nnunet"
    svda_sample_num: int = 3
    svda_p: float = 0.7
    _AUGMENTATIONS = ("nnunet", "svda")

    @classmethod
    def is_benchmark_default(cls) -> bool:
        return bool(cls.__dict__.get("benchmark_default", False))

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.augmentation not in self._AUGMENTATIONS:
            raise ValueError(f"{type(self).__name__}.augmentation = {self.augmentation!r}: use one of "
                             f"{self._AUGMENTATIONS} (a class attribute: set it in the trainer variant's class body)")
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_overrides(self)
        if self.device.type == "cpu" and tune_cpu_malloc():
            self.print_to_log_file(f"CPU training: glibc malloc set to reuse freed tensor memory (no mmap, no "
                                   f"trim; {MALLOC_ENV_VAR}=0 switches this off)")

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        """nnU-Net's training transforms, or SVDA's in their place (``augmentation = 'svda'``)."""
        if self.augmentation != "svda":
            return super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                                   do_dummy_2d_data_aug, use_mask_for_norm, is_cascaded,
                                                   foreground_labels, regions, ignore_label)
        from nnunet_semi.data.svda import svda_training_transforms
        self.print_to_log_file(f"training augmentation: SVDA ({self.svda_sample_num} of 6 operations, p {self.svda_p} "
                               f"each, no mirroring) in place of nnU-Net's")
        return svda_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                        do_dummy_2d_data_aug, use_mask_for_norm, is_cascaded, foreground_labels,
                                        regions, ignore_label, sample_num=self.svda_sample_num, p=self.svda_p)

    def on_train_start(self):
        super().on_train_start()
        # the process that writes nnU-Net's log writes the progress file; a new or resumed training first cuts
        # it back to the epochs before its first one (see progress_file)
        self._progress_file = ProgressFileWriter(join(self.output_folder, PROGRESS_FILE)) \
            if self.local_rank == 0 else None
        if self._progress_file is not None:
            self._progress_file.restart(self.logger.get_checkpoint(), self.current_epoch)

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()
        progress = getattr(self, "_progress_file", None)
        if progress is not None:
            progress.epoch(self.logger.get_checkpoint(), epoch, **self.progress_extras())

    def progress_extras(self) -> dict:
        """Per-epoch values of the progress file that nnU-Net's logger does not hold."""
        return {}

    def on_train_end(self):
        super().on_train_end()
        self._semi_just_trained = True

    def perform_actual_validation(self, save_probabilities: bool = False):
        if getattr(self, "_semi_just_trained", False) and env_flag(SKIP_FINAL_VALIDATION_VAR):
            progress = getattr(self, "_progress_file", None)
            if progress is not None:
                progress.event(FINAL_VALIDATION_SKIPPED)
            self.print_to_log_file(f"{SKIP_FINAL_VALIDATION_VAR}=1: nnU-Net's validation after training is skipped. "
                                   f"Run it later with: nnUNetv2_train {self.plans_manager.dataset_name} "
                                   f"{self.configuration_name} {self.fold} -tr {type(self).__name__} "
                                   f"-p {self.plans_manager.plans_name} --val")
            return
        return super().perform_actual_validation(save_probabilities)

    def do_split(self):
        """nnU-Net's split, except that with fewer than 5 labeled cases (nnU-Net's 5-fold split fails
        there) an n-fold split is written; a single labeled case needs fold ``all``."""
        if self.fold != "all":
            splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
            if not isfile(splits_file):
                if self.dataset_class is None:
                    self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
                ids = sorted(self.dataset_class.get_identifiers(self.preprocessed_dataset_folder))
                if len(ids) < 2:
                    raise RuntimeError(
                        f"{self.preprocessed_dataset_folder} has {len(ids)} labeled case(s): no cross-validation "
                        f"split is possible. Train on every labeled case with fold 'all': nnUNetv2_train "
                        f"{self.plans_manager.dataset_name} {self.configuration_name} all -tr {type(self).__name__}")
                if len(ids) < 5:
                    save_json(generate_crossval_split(ids, seed=12345, n_splits=len(ids)), splits_file)
                    self.print_to_log_file(
                        f"Only {len(ids)} labeled cases: wrote a {len(ids)}-fold split to {splits_file} (nnU-Net's "
                        f"5-fold split needs 5). Use fold 'all' to train on every labeled case.")
        return super().do_split()
