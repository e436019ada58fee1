"""Supervised reference: nnU-Net's own trainer, unchanged except for what every trainer of the plugin
adds (:class:`~nnunet_semi.training.plugin.PluginTrainerMixin`: the ``nnUNet_semi_*`` budget variables and
small-split handling), so benchmarks give it exactly the semi-supervised trainers' budget and labels."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semi.training.plugin import PluginTrainerMixin


class SupervisedBaselineTrainer(PluginTrainerMixin, nnUNetTrainer):
    benchmark_default = True   # the reference arm, always first in the benchmark
