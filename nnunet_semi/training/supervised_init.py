"""Starting a network of a semi-supervised run from a supervised nnU-Net run of the same labels.

The released Reciprocal Learning code starts its teacher from a supervised model, and a user of this plugin has one
already: the ``nnUNetv2_train`` run of the same dataset, plans, configuration and fold in ``nnUNet_results``.
:func:`supervised_run_checkpoint` finds its ``checkpoint_final.pth`` beside the semi-supervised run's output folder;
:func:`load_supervised_checkpoint` loads it into a network of the same architecture, refusing a checkpoint of other
plans, configuration, dataset or architecture with a message that names the file and the fix.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nnunet_semi.ema import unwrap

#: the supervised runs looked for, in this order: the benchmark's reference, then nnU-Net's own trainer
SUPERVISED_RUN_TRAINERS = ("SupervisedBaselineTrainer", "nnUNetTrainer")


def supervised_run_checkpoint(output_folder: str, plans_name: str, configuration: str, trainer_name: str,
                              alternative: str = "") -> str:
    """The ``checkpoint_final.pth`` of the supervised run beside this run's ``output_folder``
    (``<nnUNet_results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>``): the same dataset, plans,
    configuration and fold, trained by one of :data:`SUPERVISED_RUN_TRAINERS` (the first found). None found: a
    RuntimeError with the paths looked at, the command that trains it, and ``alternative`` (what else to do)."""
    output_folder = os.path.abspath(output_folder)
    dataset_dir, fold_dir = os.path.dirname(os.path.dirname(output_folder)), os.path.basename(output_folder)
    looked = [os.path.join(dataset_dir, f"{t}__{plans_name}__{configuration}", fold_dir, "checkpoint_final.pth")
              for t in SUPERVISED_RUN_TRAINERS]
    for path in looked:
        if os.path.isfile(path):
            return path
    dataset, fold = os.path.basename(dataset_dir), fold_dir[len("fold_"):]
    raise RuntimeError(
        f"{trainer_name} starts from the supervised nnU-Net run of {dataset} (plans {plans_name}, configuration "
        f"{configuration}, fold {fold}), and there is none with a final checkpoint: looked for {' and '.join(looked)}. "
        f"Train it first (nnUNetv2_train {dataset} {configuration} {fold} -p {plans_name})"
        + (f", {alternative}" if alternative else "") + ".")


def load_supervised_checkpoint(network: nn.Module, path: str, plans_name: str, configuration: str,
                               dataset_name: str, device: torch.device, fix: str, given_by: str = "") -> None:
    """Load an nnU-Net ``checkpoint_final.pth`` into ``network``; one of other plans, configuration, dataset or
    architecture is refused with a message that names the file (and ``given_by``, the variable that named it) and
    ends with ``fix``."""
    if not os.path.isfile(path):
        raise RuntimeError(f"{given_by + '=' if given_by else ''}{path}: no such file; {fix}")
    ck = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(ck, dict) or "network_weights" not in ck:
        raise RuntimeError(f"{path} is not an nnU-Net checkpoint (no 'network_weights'); {fix}")
    init = ck.get("init_args") or {}
    plans = init.get("plans") or {}
    found = (plans.get("plans_name"), init.get("configuration"), plans.get("dataset_name"))
    if found != (plans_name, configuration, dataset_name):
        raise RuntimeError(f"{path} was trained with plans {found[0]}, configuration {found[1]} on {found[2]}; this "
                           f"run uses plans {plans_name}, configuration {configuration} on {dataset_name}. {fix}")
    try:
        unwrap(network).load_state_dict(ck["network_weights"])
    except RuntimeError as e:
        raise RuntimeError(f"{path}: its network does not match this run's architecture ({str(e)[:300]}). {fix}") \
            from None


def write_supervised_checkpoint(path: str, network: nn.Module, plans: dict, configuration: str,
                                trainer_name: str = SUPERVISED_RUN_TRAINERS[0]) -> str:
    """Write ``network``'s weights as a minimal ``checkpoint_final.pth`` of a supervised run of ``plans`` (its
    ``plans_name`` and ``dataset_name``) and ``configuration``: the keys :func:`load_supervised_checkpoint` reads
    (``network_weights``, ``init_args``, ``trainer_name``). Returns ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"network_weights": unwrap(network).state_dict(), "trainer_name": trainer_name,
                "init_args": {"plans": plans, "configuration": configuration}}, path)
    return path


def stand_in_supervised_run(trainer, seed: int = 12345) -> str:
    """Give ``trainer`` (built, not yet initialised) a supervised run to start from where the weights do not matter
    (step timing, tests of the training step): a freshly initialised network of its plans (``seed``), written where
    :func:`supervised_run_checkpoint` looks beside ``trainer.output_folder``. Returns its path. Never a substitute
    for the real run in a result: the weights are random. Where a supervised run is there already, it is left as it is
    and its path returned."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    pm, cm = trainer.plans_manager, trainer.configuration_manager
    folder = os.path.abspath(trainer.output_folder)
    try:
        return supervised_run_checkpoint(folder, pm.plans_name, trainer.configuration_name, type(trainer).__name__)
    except RuntimeError:
        pass
    path = os.path.join(os.path.dirname(os.path.dirname(folder)),
                        f"{SUPERVISED_RUN_TRAINERS[0]}__{pm.plans_name}__{trainer.configuration_name}",
                        os.path.basename(folder), "checkpoint_final.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = type(trainer).build_network_architecture(
            pm, cm, determine_num_input_channels(pm, cm, trainer.dataset_json),
            trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision)
    return write_supervised_checkpoint(path, net, pm.plans, trainer.configuration_name)
