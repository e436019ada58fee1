"""network_init = 'supervised_run' (base trainer; MeanTeacherTrainer_fromSupervised): the student, and the EMA
teacher copied from it, start from the final weights of the supervised run of the same dataset, plans,
configuration and fold in nnUNet_results; without one the run is refused with the paths looked at; --c restores
the run's own weights, not the supervised ones."""
import os

import pytest
import torch

from helpers import make_trainer
from nnunet_semi.methods.mean_teacher import MeanTeacherTrainer, MeanTeacherTrainer_fromSupervised


def supervised_checkpoint(trainer, root, trainer_name="nnUNetTrainer"):
    """A supervised run's checkpoint_final.pth beside ``trainer``'s output folder, holding ``trainer``'s weights."""
    out = os.path.abspath(trainer.output_folder)
    dataset_dir, fold = os.path.dirname(os.path.dirname(out)), os.path.basename(out)
    folder = os.path.join(dataset_dir, f"{trainer_name}__{trainer.plans_manager.plans_name}__2d", fold)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "checkpoint_final.pth")
    plans = {"plans_name": trainer.plans_manager.plans_name, "dataset_name": trainer.plans_manager.dataset_name}
    torch.save({"network_weights": trainer.network.state_dict(), "init_args": {"plans": plans, "configuration": "2d"}},
               path)
    return path


def test_student_and_teacher_start_from_the_supervised_run(tmp_path):
    root = str(tmp_path)
    sup = make_trainer(MeanTeacherTrainer, seed=7, root=root)          # stands for the supervised run's network
    path = supervised_checkpoint(sup, root)
    want = {k: v.clone() for k, v in sup.network.state_dict().items()}
    t = make_trainer(MeanTeacherTrainer_fromSupervised, seed=0, root=root)
    assert t.network_init_checkpoint == path
    assert all(torch.equal(v, want[k]) for k, v in t.network.state_dict().items())
    assert all(torch.equal(v, want[k]) for k, v in t.teacher.state_dict().items())
    plain = make_trainer(MeanTeacherTrainer, seed=0, root=root)        # the default keeps nnU-Net's initialisation
    assert plain.network_init_checkpoint is None
    assert any(not torch.equal(v, want[k]) for k, v in plain.network.state_dict().items())
    assert t.semi_state_dict()["network_init_checkpoint"] == path
    assert MeanTeacherTrainer_fromSupervised.needs_supervised_run() and not MeanTeacherTrainer.needs_supervised_run()
    # --c: the run's own weights come back, not the supervised run's
    ck = str(tmp_path / "run.pth")
    with torch.no_grad():
        for p in t.network.parameters():
            p.add_(1.0)
    t.save_checkpoint(ck)
    again = make_trainer(MeanTeacherTrainer_fromSupervised, seed=0, root=root)
    again.load_checkpoint(ck)
    assert all(torch.equal(v, t.network.state_dict()[k]) for k, v in again.network.state_dict().items())
    assert again.network_init_checkpoint == path


def test_without_a_supervised_run_it_is_refused_with_the_paths_looked_at(tmp_path):
    with pytest.raises(RuntimeError) as e:
        make_trainer(MeanTeacherTrainer_fromSupervised, root=str(tmp_path), supervised_run=False)
    msg = str(e.value)
    assert "SupervisedBaselineTrainer__" in msg and "nnUNetTrainer__" in msg and "checkpoint_final.pth" in msg
    assert "nnUNetv2_train" in msg and "or use MeanTeacherTrainer (nnU-Net's random initialisation)" in msg


def test_a_run_whose_supervised_run_is_gone_resumes_from_its_own_checkpoint(tmp_path):
    """Only a new training needs the supervised run: with it deleted, a run that has a checkpoint of its own builds
    (what --c / --val do before loading it), the checkpoint restores its weights and the checkpoint path it started
    from, and a training that starts without loading one is refused with the paths looked at."""
    root = str(tmp_path)
    t = make_trainer(MeanTeacherTrainer_fromSupervised, seed=0, root=root)   # a stand-in supervised run beside it
    started_from = t.network_init_checkpoint
    with torch.no_grad():
        for p in t.network.parameters():
            p.add_(1.0)
    own = os.path.join(t.output_folder, "checkpoint_latest.pth")
    t.save_checkpoint(own)
    os.remove(started_from)
    again = make_trainer(MeanTeacherTrainer_fromSupervised, seed=0, root=root, supervised_run=False)
    assert again._supervised_run_missing is not None and started_from in again._supervised_run_missing
    assert again.network_init_checkpoint is None
    log = open(again.log_file).read()
    assert "checkpoint_latest.pth is in" in log and "a new training is refused" in log
    again.load_checkpoint(own)
    assert again._supervised_run_missing is None and again.network_init_checkpoint == started_from
    assert all(torch.equal(v, t.network.state_dict()[k]) for k, v in again.network.state_dict().items())
    # without loading it (no --c): the new training is refused before anything is trained or written
    fresh = make_trainer(MeanTeacherTrainer_fromSupervised, seed=0, root=root, supervised_run=False)
    with pytest.raises(RuntimeError, match="looked for .*SupervisedBaselineTrainer__"):
        fresh.on_train_start()
    # and with no checkpoint of its own either, it is refused as it is built
    os.remove(own)
    with pytest.raises(RuntimeError, match="nnUNetv2_train"):
        make_trainer(MeanTeacherTrainer_fromSupervised, seed=0, root=root, supervised_run=False)
