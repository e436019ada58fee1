"""The trainers a benchmark may run: those re-exported by ``trainers/nnunet_semi_trainers.py`` (the module
nnU-Net's ``nnUNet_extTrainer`` discovery reads), and the default list, which the trainers declare themselves
(``benchmark_default = True`` in the class's own body, :meth:`PluginTrainerMixin.is_benchmark_default`)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from nnunet_semi.benchmark.commands import BenchmarkError

BASELINE = "SupervisedBaselineTrainer"


def registered_trainers() -> Dict[str, type]:
    """name -> class of every trainer re-exported by ``trainers/nnunet_semi_trainers.py``, in the module's order."""
    import importlib

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    mod = importlib.import_module("nnunet_semi.ext_trainers.nnunet_semi_trainers")
    return {name: obj for name, obj in vars(mod).items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__name__ == name}


def is_semi_supervised(cls: type) -> bool:
    from nnunet_semi.training.base import SemiSupervisedTrainer
    return issubclass(cls, SemiSupervisedTrainer)


def is_benchmark_default(cls: type) -> bool:
    """Whether ``cls`` itself declares ``benchmark_default = True`` (a subclass does not inherit it)."""
    check = getattr(cls, "is_benchmark_default", None)
    return bool(check()) if callable(check) else False


def default_trainers(registered: Optional[Mapping[str, type]] = None) -> List[str]:
    """The supervised reference, then every registered trainer that declares itself a benchmark default, in the
    registry's order (variants such as ``MeanTeacherTrainer_confCE`` do not)."""
    registered = registered_trainers() if registered is None else registered
    return [BASELINE] + [n for n, c in registered.items() if n != BASELINE and is_benchmark_default(c)]


#: ``TRAINER@NETWORK``: an arm that predicts with another network of TRAINER's run (``nnUNetv2_semi_export``),
#: e.g. ``ReciprocalLearningTrainer@teacher``; it shares TRAINER's training (trained once, by whichever arm
#: comes first)
ARM_SEP = "@"


def split_arm(name: str) -> Tuple[str, Optional[str]]:
    """``'RL@teacher'`` -> ``('RL', 'teacher')``; ``'RL'`` -> ``('RL', None)``."""
    trainer, sep, network = name.partition(ARM_SEP)
    return trainer, (network if sep else None)


def check_trainers(names: Sequence[str], registered: Mapping[str, type]) -> None:
    bad_arms = [n for n in names if split_arm(n)[1] is not None and
                (not split_arm(n)[1] or split_arm(n)[0] not in registered or
                 not is_semi_supervised(registered[split_arm(n)[0]]))]
    if bad_arms:
        raise BenchmarkError(
            f"arm(s) {bad_arms}: TRAINER{ARM_SEP}NETWORK needs a registered semi-supervised trainer and a network "
            f"name (e.g. ReciprocalLearningTrainer{ARM_SEP}teacher; nnUNetv2_semi_export --list shows a run's "
            f"networks)")
    unknown = [n for n in names if split_arm(n)[0] not in registered]
    if unknown:
        raise BenchmarkError(
            f"trainer(s) {unknown} are not registered in trainers/nnunet_semi_trainers.py (registered: "
            f"{', '.join(registered)}). Only the plugin's trainers honour the nnUNet_semi_* budget variables, so "
            f"another trainer would not get the same budget; use {BASELINE} for nnU-Net's supervised reference.")
    if len(set(names)) != len(names):
        raise BenchmarkError(f"trainer list has duplicates: {list(names)}")
    if BASELINE in names:   # an arm that starts from the supervised run of its seed needs it trained before itself
        early = [n for n in names[:list(names).index(BASELINE)] if needs_supervised_run(registered[split_arm(n)[0]])]
        if early:
            raise BenchmarkError(
                f"arm(s) {early} start from the {BASELINE} run of the same seed, which comes after them in the "
                f"trainer list; list {BASELINE} first (each seed trains its arms in the order given)")


def needs_supervised_run(cls: type) -> bool:
    """Whether ``cls`` starts from the supervised run of the same dataset / plans / configuration / fold
    (e.g. ``ReciprocalLearningTrainer``, whose teacher starts there)."""
    check = getattr(cls, "needs_supervised_run", None)
    return bool(check()) if callable(check) else False
