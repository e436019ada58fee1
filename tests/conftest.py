import glob
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterator, List

import pytest

from e2e_util import atime_changed, make_env, run, set_old_atime

DATASET_ID = 990
DATASET = "Dataset990_SemiSynthetic"


@dataclass
class Prepared:
    root: str
    env: Dict[str, str]
    raw: str
    pre: str
    res: str
    watched: List[str]        # withheld labels: must never be read
    control: str              # a copy in a watched folder of its own, read on purpose by the audit's positive
                              # control (test_end_to_end.py); the audit leaves that folder out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Iterator[Prepared]:
    """A synthetic 3D dataset (6 labeled, 6 unlabeled with withheld labels, 2 test) planned and
    preprocessed for 2d and 3d_fullres by nnU-Net's commands, and its unlabeled images preprocessed by
    the plugin, all under an audit of the withheld labels: after the last test that used this fixture,
    its finaliser fails the session if any process opened a withheld label (see withheld_reads)."""
    from nnunet_semi.synthetic import make_synthetic_dataset

    root = str(tmp_path_factory.mktemp("semi_e2e"))
    env = make_env(root, audit_patterns=["labelsWithheld"])
    raw = make_synthetic_dataset(env["nnUNet_raw"], DATASET_ID, "SemiSynthetic", n_labeled=6, n_unlabeled=6,
                                 n_test=2, shape=(32, 32, 32), seed=1)
    watched = sorted(glob.glob(os.path.join(raw, "labelsWithheld", "*")))
    assert watched
    control = os.path.join(root, "audit_control", "labelsWithheld", os.path.basename(watched[0]))
    os.makedirs(os.path.dirname(control))
    shutil.copy(watched[0], control)
    set_old_atime(watched + [control])
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1",
         "--verify_dataset_integrity"], env, log=os.path.join(root, "plan.log"))
    run(["nnUNetv2_preprocess_unlabeled", "-d", str(DATASET_ID), "-np", "1"], env,
        log=os.path.join(root, "preprocess_unlabeled.log"))
    p = Prepared(root, env, raw, os.path.join(env["nnUNet_preprocessed"], DATASET),
                 os.path.join(env["nnUNet_results"], DATASET), watched, control)
    yield p
    # the audit, once every test that used the dataset is done (whatever their order)
    reads = withheld_reads(p)
    if reads:
        pytest.fail(f"withheld labels were read during the tests that used the 'prepared' dataset (Python opens "
                    f"logged by the audit hook, then reads seen by access time): {reads}", pytrace=False)


def train(prepared: Prepared, trainer: str, config: str, epochs: int = 2, iters: int = 3, extra=(), **env) -> str:
    e = dict(prepared.env, nnUNet_semi_epochs=str(epochs), nnUNet_semi_iters=str(iters), nnUNet_semi_val_iters="1",
             **env)
    folder = os.path.join(prepared.res, f"{trainer}__nnUNetPlans__{config}", "fold_0")
    run(["nnUNetv2_train", str(DATASET_ID), config, "0", "-tr", trainer, "-device", "cpu", *extra], e,
        log=os.path.join(prepared.root, f"train_{trainer}_{config}{'_'.join(extra)}.log"))
    return folder


def predict(prepared: Prepared, trainer: str, config: str) -> str:
    out = os.path.join(prepared.root, f"pred_{trainer}_{config}")
    run(["nnUNetv2_predict", "-i", os.path.join(prepared.raw, "imagesTs"), "-o", out, "-d", str(DATASET_ID),
         "-c", config, "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
        prepared.env)
    return out


def audit_log(prepared: Prepared) -> List[str]:
    """Every path with a watched folder name that a Python process of the run opened (the audit hook's log)."""
    log = prepared.env["NNUNET_SEMI_AUDIT_LOG"]
    return open(log).read().split() if os.path.isfile(log) else []


def withheld_reads(prepared: Prepared) -> List[str]:
    """Withheld labels read so far: the audit hook's log (without the positive control's own folder) and the
    withheld labels whose access time changed (C++ readers such as SimpleITK are invisible to the hook)."""
    control_folder = os.path.dirname(prepared.control) + os.sep
    python_level = [p for p in audit_log(prepared) if not p.startswith(control_folder)]
    return python_level + atime_changed(prepared.watched)
