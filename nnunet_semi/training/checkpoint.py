"""Checkpoint helpers of the trainers: atomic writes and the RNG states saved with the extra state."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def atomic_torch_save(obj, filename: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``filename``: a
    kill during saving leaves the previous checkpoint intact, never a truncated one."""
    tmp = f"{filename}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # different number of GPUs than when saved
            pass
