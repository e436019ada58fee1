"""Supervised reference: nnU-Net's own trainer, unchanged except for what every trainer of the plugin
adds (:class:`~nnunet_semi.training.plugin.PluginTrainerMixin`: the ``nnUNet_semi_*`` budget variables and
small-split handling), so benchmarks give it exactly the semi-supervised trainers' budget and labels."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semi.training.plugin import PluginTrainerMixin


class SupervisedBaselineTrainer(PluginTrainerMixin, nnUNetTrainer):
    benchmark_default = True   # the reference arm, always first in the benchmark


class SupervisedBaselineTrainer_svda(SupervisedBaselineTrainer):
    """The supervised reference trained with A&D's SVDA (3 of 6 operations, p 0.7, no mirroring) in place of
    nnU-Net's augmentation: it tells what a semi-supervised recipe with SVDA (``AggregatingDecouplingTrainer_svda``)
    owes to the augmentation alone. Not the nnU-Net users run: the benchmark's reference stays
    ``SupervisedBaselineTrainer``."""
    augmentation = "svda"
