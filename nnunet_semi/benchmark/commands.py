"""Running nnU-Net's commands for the harness: console output with the elapsed time, the shell form of a
command, the environment nnU-Net's commands get, a subprocess runner that writes the output to a log file,
and one progress line per training epoch, read from the trainer's progress file
(:mod:`nnunet_semi.training.progress_file`)."""
from __future__ import annotations

import multiprocessing
import os
import re
import shlex
import subprocess
import time
from collections import deque
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_semi.reporting import fmt_seconds
from nnunet_semi.training.progress_file import FINAL_VALIDATION_SKIPPED, read_progress


class BenchmarkError(RuntimeError):
    """A problem the user can fix; the message says how."""


class CommandError(BenchmarkError):
    pass


# --------------------------------------------------------------------------------------------
# console output
# --------------------------------------------------------------------------------------------
_T0 = [time.time()]


def reset_clock() -> None:
    _T0[0] = time.time()


def elapsed() -> str:
    s = int(time.time() - _T0[0])
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def say(msg: str = "") -> None:
    print(f"[{elapsed()}] {msg}", flush=True)


def shell_line(cmd: Sequence[str], env_changes: Optional[Mapping[str, str]] = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (env_changes or {}).items())
    return (prefix + " " if prefix else "") + shlex.join([str(c) for c in cmd])


# --------------------------------------------------------------------------------------------
# per-epoch progress of a training
# --------------------------------------------------------------------------------------------
_NUM_RE = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|(?<![\w.])nan\b")
_TS_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?: ?")


def _number(value, decimals: Optional[int] = None) -> float:
    """A progress-file value as a float (null: NaN), rounded as nnU-Net rounds what it prints."""
    x = float("nan") if value is None else float(value)
    return float(np.round(x, decimals)) if decimals is not None else x


class EpochProgress:
    """One progress line per epoch of a running ``nnUNetv2_train``. The epochs come from the trainer's progress
    file, re-read whenever the training prints a line (and once when it ends); only lines written by this
    training count, not those already in the file when it started (a ``--c`` resume). nnU-Net's own
    "Training done." and final-validation lines come from its output."""

    def __init__(self, label: str, total_epochs: Optional[int] = None, progress_file: Optional[str] = None):
        self.label, self.total, self.path = label, total_epochs, progress_file
        self.t_start = time.time()
        self._seen = {self._key(r) for r in read_progress(progress_file)} if progress_file else set()
        self._signature = None

    @staticmethod
    def _key(record: Mapping) -> tuple:
        return record.get("epoch"), record.get("event"), record.get("epoch_end_timestamps", record.get("time"))

    def _poll(self) -> Tuple[List[str], List[str]]:
        """Lines for the epochs and for the events the progress file gained since the last call."""
        epochs: List[str] = []
        events: List[str] = []
        if not self.path:
            return epochs, events
        try:
            st = os.stat(self.path)
        except OSError:
            return epochs, events
        if (st.st_ino, st.st_size, st.st_mtime_ns) == self._signature:
            return epochs, events
        self._signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        for record in read_progress(self.path):
            key = self._key(record)
            if key in self._seen:
                continue
            self._seen.add(key)
            if "epoch" in record:
                epochs.append(self.epoch_line(record))
            elif self.event_line(record):
                events.append(self.event_line(record))
        return epochs, events

    def poll(self) -> List[str]:
        """Lines for what the progress file gained since the last call."""
        epochs, events = self._poll()
        return epochs + events

    def epoch_line(self, record: Mapping) -> str:
        total = f"/{self.total}" if self.total else ""
        parts = [f"epoch {int(record['epoch']) + 1}{total}"]
        if "train_losses" in record:
            parts.append(f"train_loss {_number(record['train_losses'], 4):.4f}")
        unsup = [k for k in record if k == "loss_unsup"] or \
            [k for k in record if k.startswith("loss_") and k != "loss_sup"]
        if unsup:
            parts.append(f"{unsup[0]} {_number(record[unsup[0]]):.4f}")
        dice = record.get("dice_per_class_or_region")
        if dice:
            parts.append(f"pseudo Dice {np.nanmean([_number(d, 4) for d in dice]):.3f}")
        parts.append(f"{_number(record.get('epoch_time_s'), 2):.1f} s/epoch")
        return f"    {self.label}: " + ", ".join(parts)

    def event_line(self, record: Mapping) -> Optional[str]:
        if record.get("event") == FINAL_VALIDATION_SKIPPED:
            return f"    {self.label}: nnU-Net's validation after training skipped (nnUNet_semi_skip_final_validation)"
        return None

    def feed(self, line: str) -> List[str]:
        """The progress lines due after the training printed ``line``: new epochs (written before the line was
        printed), the line's own (nnU-Net's end of training and final validation), then new events (written after
        the end of training, possibly before its line reached us)."""
        out, events = self._poll()
        text = _TS_RE.sub("", line.strip())
        if text.startswith("Training done."):
            out.append(f"    {self.label}: training done ({fmt_seconds(time.time() - self.t_start)})")
        elif text.startswith("Mean Validation Dice"):
            nums = [float(x) for x in _NUM_RE.findall(text[len("Mean Validation Dice"):])]
            out.append(f"    {self.label}: nnU-Net's final validation Dice (training fold) "
                       + (f"{nums[0]:.3f}" if nums else "?"))
        return out + events

    def finish(self) -> List[str]:
        """The progress lines due when the training has ended."""
        return self.poll()


# --------------------------------------------------------------------------------------------
# running a command
# --------------------------------------------------------------------------------------------
def run_command(cmd: Sequence[str], env: Mapping[str, str], log_file: str, progress: Optional[EpochProgress] = None,
                echo: Optional[Mapping[str, str]] = None, quiet: bool = False) -> float:
    """Run ``cmd`` with ``env``, all output to ``log_file``; with ``progress``, print one line per epoch.
    Returns the wall time. Raises :class:`CommandError` (with the log's tail) on a non-zero exit. An
    interrupt (Ctrl-C) terminates the child first, so a training leaves its last checkpoint behind."""
    cmd = [str(c) for c in cmd]
    if not quiet:
        say("$ " + shell_line(cmd, echo))
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    t0 = time.time()
    tail: deque = deque(maxlen=60)

    def show(messages: List[str]) -> None:
        for msg in messages:
            print(f"[{elapsed()}] {msg}", flush=True)

    with open(log_file, "w", buffering=1) as log:  # line-buffered: the log can be followed with tail -f
        try:
            proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, errors="replace")
        except FileNotFoundError as e:
            raise CommandError(f"cannot run {cmd[0]}: {e}. Is the plugin installed (pip install -e .) and its "
                               f"console scripts on PATH?") from e
        try:
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if progress is not None:
                    show(progress.feed(line))
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if progress is not None:
        show(progress.finish())
    if rc != 0:
        raise CommandError(f"command failed with exit code {rc}: {shell_line(cmd)}\nlog: {log_file}\n--- last lines "
                           f"---\n{''.join(tail)}")
    return time.time() - t0


def nnunet_env(raw: str, preprocessed: str, results: str, device: str = "cpu", n_proc_da: Optional[int] = None,
               def_n_proc: Optional[int] = None, base: Optional[Mapping[str, str]] = None,
               training: bool = False) -> Dict[str, str]:
    """Environment for nnU-Net's commands: paths, the plugin's trainers folder on nnUNet_extTrainer, and on
    small CPU machines (when the user has not set them) at most 2 worker processes (nnUNet_def_n_proc also
    caps the threads nnUNetv2_predict uses) and, for training only, in-process augmentation
    (nnUNet_n_proc_DA=0: DA workers compete with torch's threads on few cores; planning must not get 0, it
    calls torch.set_num_threads with it)."""
    from nnunet_semi.env import ensure_ext_trainer
    env = dict(os.environ if base is None else base)
    env.update(nnUNet_raw=raw, nnUNet_preprocessed=preprocessed, nnUNet_results=results, PYTHONUNBUFFERED="1")
    ensure_ext_trainer(env)
    ncpu = multiprocessing.cpu_count()
    if training:
        if n_proc_da is not None:
            env["nnUNet_n_proc_DA"] = str(n_proc_da)
        elif "nnUNet_n_proc_DA" not in env and device == "cpu" and ncpu <= 4:
            env["nnUNet_n_proc_DA"] = "0"
    if def_n_proc is not None:
        env["nnUNet_def_n_proc"] = str(def_n_proc)
    elif "nnUNet_def_n_proc" not in env and device == "cpu":
        # training: sizes the spawn pools of nnU-Net's final validation (each worker imports torch);
        # elsewhere it also caps nnUNetv2_predict's torch threads, so keep it at the core count there
        env["nnUNet_def_n_proc"] = "1" if training and ncpu <= 4 else str(max(1, min(ncpu, 2)))
    return env
