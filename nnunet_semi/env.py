"""Making nnU-Net find the plugin's trainers.

nnU-Net (>= 2.8) looks for ``-tr NAME`` in its own trainer tree and then in the folders listed in
the environment variable ``nnUNet_extTrainer``. ``nnUNetv2_semi_env`` prints the line to add to your
shell profile; ``nnUNetv2_semi_env --check`` diagnoses the environment. ``nnUNetv2_semi_train`` and
``nnUNetv2_semi_predict`` are nnU-Net's own commands with the variable set for you.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

ENV_VAR = "nnUNet_extTrainer"


def trainers_folder() -> str:
    """The folder ``nnUNet_extTrainer`` must contain (the repository's ``trainers/``)."""
    import nnunet_semi.ext_trainers as ext
    return os.path.dirname(os.path.abspath(ext.__file__))


def ext_trainer_configured(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    folder = os.path.realpath(trainers_folder())
    return any(os.path.realpath(p) == folder for p in environ.get(ENV_VAR, "").split(os.pathsep) if p)


def ensure_ext_trainer(environ=None) -> None:
    """Append the trainers folder to ``nnUNet_extTrainer`` if it is not there (child processes, DDP
    workers and nnU-Net's spawn pools inherit it)."""
    environ = os.environ if environ is None else environ
    if not ext_trainer_configured(environ):
        current = environ.get(ENV_VAR, "")
        environ[ENV_VAR] = os.pathsep.join([p for p in current.split(os.pathsep) if p] + [trainers_folder()])


def missing_trainer_message() -> str:
    return (f"The environment variable {ENV_VAR} does not contain {trainers_folder()}, so nnUNetv2_train/"
            f"nnUNetv2_predict cannot find the nnunet-semi trainers ('Could not find requested nnunet trainer'). "
            f"Run:  export {ENV_VAR}={export_value()}  (or use nnUNetv2_semi_train / nnUNetv2_semi_predict).")


def export_value() -> str:
    current = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if not ext_trainer_configured():
        current.append(trainers_folder())
    return os.pathsep.join(current)


def check_environment() -> List[str]:
    problems = []
    if not ext_trainer_configured():
        problems.append(missing_trainer_message())
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            problems.append(f"{var} is not set (nnU-Net needs it; see nnU-Net's setting_up_paths.md).")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="nnUNetv2_semi_env",
                                description="Print the shell line that lets nnU-Net find the nnunet-semi trainers, "
                                            "or check the environment.")
    p.add_argument("--check", action="store_true", help="diagnose nnUNet_extTrainer and nnU-Net's path variables; "
                                                        "exit code 1 if something is missing")
    p.add_argument("--folder", action="store_true", help="print only the trainers folder")
    a = p.parse_args(argv)
    if a.folder:
        print(trainers_folder())
        return
    if a.check:
        problems = check_environment()
        print(f"trainers folder: {trainers_folder()}")
        print(f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r}")
        for pr in problems:
            print(f"PROBLEM: {pr}")
        if not problems:
            print("OK: nnUNetv2_train/nnUNetv2_predict -tr <plugin trainer> will work.")
        sys.exit(1 if problems else 0)
    print(f"export {ENV_VAR}={export_value()}")


def train_entry() -> None:
    """``nnUNetv2_train`` with nnUNet_extTrainer set."""
    ensure_ext_trainer()
    from nnunetv2.run.run_training import run_training_entry
    run_training_entry()


def predict_entry() -> None:
    """``nnUNetv2_predict`` with nnUNet_extTrainer set."""
    ensure_ext_trainer()
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    predict_entry_point()
