"""The trainers' machine-readable progress file, ``progress.jsonl`` beside nnU-Net's training log (the
fold's output folder), written by every plugin trainer (:class:`~nnunet_semi.training.plugin.PluginTrainerMixin`).

One JSON object per line:

- one line per finished epoch: ``{"epoch": E, <every term nnU-Net's logger holds for epoch E, under its
  own key>, "epoch_time_s": ..., "unlabeled_wait_s": ...}``. nnU-Net's keys are ``mean_fg_dice``,
  ``ema_fg_dice``, ``dice_per_class_or_region`` (the pseudo Dice per class, a list), ``train_losses``,
  ``val_losses``, ``lrs``, ``epoch_start_timestamps`` and ``epoch_end_timestamps``; the plugin's terms
  (``loss_sup``, ``loss_unsup``, ``pl_confidence``, ``mask_ratio``, ``unsup_weight_factor``, ``grad_norm``,
  ``clip_ratio``, ...) follow under their names. ``epoch`` counts from 0 as nnU-Net's log does;
  ``epoch_time_s`` is end minus start timestamp; ``unlabeled_wait_s`` (semi-supervised trainers only) is the
  time the epoch's training steps waited for unlabeled batches. A NaN or infinite value is written as ``null``.
- event lines, ``{"event": NAME, "time": unix time}``; today only ``final_validation_skipped``
  (``nnUNet_semi_skip_final_validation=1``).

Each line is appended with a single write to a file opened for appending and synced, so a reader never
sees half a line (a line cut short by a crash is ignored by :func:`read_progress`). When a training starts
at epoch E (0 for a new training; with ``--c`` the epoch after checkpoint_latest, which may be older than the
file's last lines), the file is first rewritten, atomically, to its epochs before E, with any of them that
the file lacks taken from the checkpoint's logging; event lines are dropped. The file therefore holds every
epoch once, and it agrees with the logging saved in the checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

PROGRESS_FILE = "progress.jsonl"
#: keys of an epoch line that are not terms of nnU-Net's logger
RECORD_KEYS = ("epoch", "epoch_time_s", "unlabeled_wait_s")
TIMESTAMP_KEYS = ("epoch_start_timestamps", "epoch_end_timestamps")
FINAL_VALIDATION_SKIPPED = "final_validation_skipped"


def _to_json(value):
    if isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and getattr(value, "ndim", 0) > 0):
        return [_to_json(v) for v in value]
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _from_json(value):
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return float("nan") if value is None else float(value)


def epoch_record(logging: Mapping[str, Sequence], epoch: int, **extra) -> dict:
    """The line of ``epoch`` from nnU-Net's logging dict (``logger.get_checkpoint()``), plus ``extra``."""
    record = {"epoch": int(epoch)}
    for key, values in logging.items():
        if len(values) > epoch:
            record[key] = _to_json(values[epoch])
    start, end = record.get("epoch_start_timestamps"), record.get("epoch_end_timestamps")
    if start is not None and end is not None:
        record["epoch_time_s"] = end - start
    record.update({k: _to_json(v) for k, v in extra.items()})
    return record


def _line(record: Mapping) -> bytes:
    return (json.dumps(record, allow_nan=False) + "\n").encode()


def read_progress(path: str) -> List[dict]:
    """Every complete line of a progress file (events included), in file order; [] if there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    out = []
    for raw in data.split(b"\n")[:-1]:   # the part after the last newline is a line still being written
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def epoch_records(records: Iterable[Mapping]) -> List[dict]:
    """The epoch lines (the last one of each epoch), by epoch."""
    by_epoch = {int(r["epoch"]): dict(r) for r in records if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def curves_from_progress(path: str, n_epochs: Optional[int] = None) -> Optional[Dict[str, list]]:
    """Per-epoch curves of a run from its progress file, in the form the benchmark report uses: every logged
    term (without the timestamps) as one value per epoch (a list for the pseudo Dice per class; NaN where an
    epoch lacks the term, and a term's trailing epochs without it left out, as in nnU-Net's logging), plus
    ``epoch_time_s``. None unless the file holds exactly epochs 0 .. ``n_epochs`` - 1 (any count if None)."""
    records = epoch_records(read_progress(path))
    if not records or [r["epoch"] for r in records] != list(range(len(records))) or \
            (n_epochs is not None and len(records) != n_epochs):
        return None
    keys = list(dict.fromkeys(k for r in records for k in r if k not in RECORD_KEYS and k not in TIMESTAMP_KEYS))
    curves = {}
    for key in keys:
        last = max(i for i, r in enumerate(records) if key in r)
        curves[key] = [_from_json(r[key]) if key in r else float("nan") for r in records[:last + 1]]
    curves["epoch_time_s"] = [_from_json(r.get("epoch_time_s")) for r in records]
    return curves


class ProgressFileWriter:
    """Writes one trainer's progress file (only the process that writes nnU-Net's log should have one)."""

    def __init__(self, path: str):
        self.path = path

    def restart(self, logging: Mapping[str, Sequence], first_epoch: int) -> None:
        """Before training from ``first_epoch``: keep the file's epochs before it, fill those it lacks from
        ``logging`` (the checkpoint's), drop everything else."""
        old = {r["epoch"]: r for r in epoch_records(read_progress(self.path))}
        lines = [old.get(e) or epoch_record(logging, e) for e in range(int(first_epoch))]
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(_line(r) for r in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, record: Mapping) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, _line(record))
            os.fsync(fd)
        finally:
            os.close(fd)

    def epoch(self, logging: Mapping[str, Sequence], epoch: int, **extra) -> None:
        self.append(epoch_record(logging, epoch, **extra))

    def event(self, name: str) -> None:
        self.append({"event": name, "time": time.time()})
