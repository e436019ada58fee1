"""Helpers for tests that drive nnU-Net's real commands in subprocesses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Sequence

from helpers import REPO


# An audit hook installed in every Python process of a run (PYTHONPATH sitecustomize): it records each
# Python-level open of a path containing one of the watched folder names. C++ readers (SimpleITK) are
# invisible to it, so the tests also watch the files' access times at the kernel level.
SITECUSTOMIZE = '''
import os, sys
_pat = [p for p in os.environ.get("NNUNET_SEMI_AUDIT_PATTERNS", "").split(os.pathsep) if p]
_log = os.environ.get("NNUNET_SEMI_AUDIT_LOG")
if _pat and _log:
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = os.fsdecode(args[0])
            if any(x in p for x in _pat):
                fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, (p + "\\n").encode())
                os.close(fd)
    sys.addaudithook(_hook)
'''


def make_env(root: str, audit_patterns: Sequence[str] = (), **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pre"),
               nnUNet_results=os.path.join(root, "res"), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2",
               # nnU-Net's validation after training (a worker pool, a sliding window per case) took 13-24 s of
               # the 60-73 s of a short A&D 3d training here; the tests that check it turn it back on with "0"
               nnUNet_semi_skip_final_validation="1")
    for k in ("raw", "pre", "res"):
        os.makedirs(os.path.join(root, k), exist_ok=True)
    sys.path.insert(0, REPO)
    from nnunet_semi.env import ensure_ext_trainer
    ensure_ext_trainer(env)
    if audit_patterns:
        site = os.path.join(root, "audit_site")
        os.makedirs(site, exist_ok=True)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join([site] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["NNUNET_SEMI_AUDIT_PATTERNS"] = os.pathsep.join(audit_patterns)
        env["NNUNET_SEMI_AUDIT_LOG"] = os.path.join(root, "audit.log")
    env.update(extra)
    return env


def run(cmd: List[str], env: Dict[str, str], timeout: int = 900, check: bool = True,
        log: str = None) -> subprocess.CompletedProcess:
    t0 = time.time()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if log:
        with open(log, "w") as f:
            f.write(p.stdout)
    print(f"$ {' '.join(cmd)}  [{time.time() - t0:.0f} s, rc {p.returncode}]")
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-6000:]}")
    return p


def set_old_atime(paths: Sequence[str]) -> None:
    """atime = 1970 with mtime now: under relatime the next read of the file updates its atime."""
    now = time.time()
    for p in paths:
        os.utime(p, (0, now))


def atime_changed(paths: Sequence[str]) -> List[str]:
    return [p for p in paths if os.stat(p).st_atime > 1]


def python() -> str:
    return sys.executable


def which(cmd: str) -> str:
    found = shutil.which(cmd)
    assert found, f"{cmd} not on PATH: install the plugin with the README's command"
    return found
