"""The unlabeled stream of the paired labeled/unlabeled loader.

nnU-Net's own ``nnUNetDataLoader`` samples and crops unlabeled patches (random crops, no foreground
oversampling) and :class:`~nnunet_semi.data.views.MultiViewTransform` turns each into a weak view and
strong views. The augmenter runs in its own worker processes with explicit, distinct seeds per worker
and per DDP rank: nnU-Net starts its workers with ``seeds=None``, which leaves their torch RNG
streams identical (mirroring and every ``RandomTransform`` decision would repeat across workers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from nnunet_semi.layout import LayoutError, plans_identity, read_manifest, unlabeled_preprocessed_folder


def split_over_ranks(global_batch_size: int, world_size: int, rank: int) -> int:
    """nnU-Net's rule for the per-GPU share of a global batch (the first ranks get the remainder)."""
    if global_batch_size < world_size:
        raise ValueError(f"unlabeled batch size {global_batch_size} is smaller than the number of GPUs "
                         f"{world_size}; increase it")
    base = global_batch_size // world_size
    return base + (1 if rank < global_batch_size - base * world_size else 0)


def worker_seeds(num_workers: int, rank: int, base: Optional[int] = None) -> List[int]:
    """Distinct seeds for every worker of every rank. The base comes from the main process' numpy RNG
    (entropy-seeded, or ``nnUNet_semi_seed``) unless given."""
    if base is None:
        base = int(np.random.randint(0, 2 ** 31 - 1 - 100003 * 64))
    return [base + 100003 * rank + i for i in range(max(1, num_workers))]


def locate_unlabeled(preprocessed_dataset_folder_base: str, plans: dict, configuration: str,
                     data_identifier: str, dataset_name: str, labeled_identifiers: Sequence[str]) -> tuple:
    """(folder, identifiers) of the preprocessed unlabeled cases, with errors that name the fix."""
    folder = unlabeled_preprocessed_folder(preprocessed_dataset_folder_base, data_identifier)
    cmd = f"nnUNetv2_preprocess_unlabeled -d {dataset_name} -c {configuration}"
    if not os.path.isdir(folder):
        raise LayoutError(f"Unlabeled data of {dataset_name} ({configuration}) was never preprocessed: {folder} "
                          f"does not exist. Put the unlabeled images in $nnUNet_raw/{dataset_name}/imagesUnlabeled "
                          f"and run: {cmd}")
    manifest = read_manifest(preprocessed_dataset_folder_base, data_identifier)
    if manifest is not None and manifest.get("plans_identity") != plans_identity(plans, configuration):
        raise LayoutError(f"{folder} was preprocessed with other plans than the ones this training uses. "
                          f"Re-run: {cmd} --overwrite")
    files = set(os.listdir(folder))
    ids = sorted(f[: -len(".b2nd")] for f in files if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")
                 and f[: -len(".b2nd")] + ".pkl" in files)
    if manifest is not None:
        ids = [i for i in ids if i in set(manifest.get("cases", ids))]
    if not ids:
        raise LayoutError(f"{folder} holds no preprocessed unlabeled case. Run: {cmd}")
    clash = sorted(set(ids) & set(labeled_identifiers))
    if clash:
        raise LayoutError(f"case(s) {clash[:5]} are both labeled ({IMAGES_TR_HINT}) and unlabeled ({folder}). "
                          f"A case must be one or the other: remove it from imagesUnlabeled and re-run {cmd} "
                          f"--overwrite")
    return folder, ids


IMAGES_TR_HINT = "imagesTr/labelsTr"


@dataclass
class UnlabeledBatch:
    """One unlabeled batch on the training device."""
    weak: torch.Tensor                 # (B, C, *patch)
    strong: List[torch.Tensor]         # num_strong x (B, C, *patch), same geometry as weak
    valid: torch.Tensor                # (B, *patch) bool: inside the image (not padding)
    keys: Sequence[str]


def build_unlabeled_augmenter(dataset, batch_size: int, initial_patch_size, patch_size, label_manager,
                              transform, num_processes: int, rank: int, pin_memory: bool):
    """A background augmenter yielding unlabeled batches from nnU-Net's loader + ``transform``."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    dl = nnUNetDataLoader(dataset, batch_size, initial_patch_size, patch_size, label_manager,
                          oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                          transforms=transform, probabilistic_oversampling=False)
    # unlabeled cases have no class locations: always sample uniformly, also for ignore-label datasets
    dl.has_ignore = False
    if num_processes == 0:  # in-process: shares the main process' RNG streams, nothing to duplicate
        return SingleThreadedAugmenter(dl, None)
    return NonDetMultiThreadedAugmenter(data_loader=dl, transform=None, num_processes=num_processes,
                                        num_cached=max(3, num_processes), seeds=worker_seeds(num_processes, rank),
                                        pin_memory=pin_memory, wait_time=0.002)
