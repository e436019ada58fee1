"""Supervised reference: nnU-Net's own trainer, unchanged except that it honours the plugin's
``nnUNet_semi_*`` budget variables, so benchmarks give it exactly the SSL trainers' budget."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semi.training.budget import apply_budget_overrides


class SupervisedBaselineTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_overrides(self)
