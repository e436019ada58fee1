"""Who carries out what a benchmark decides (:class:`~nnunet_semi.benchmark.orchestration.Benchmark`).

The orchestration decides, from the state of the benchmark folder, which steps each (trainer, seed) run needs
and builds nnU-Net's commands; it hands every step with an effect to an executor, through two methods:

- ``run(cmd, env, log_file, progress, echo, creates)``: one of nnU-Net's commands;
- ``apply(fn, *args, **kwargs)``: a change the harness makes itself (folders, symlinks, the plans variant,
  ``settings.json``, ``runs.json``, curves, the report). ``fn`` does the change and returns its result.

:class:`Executor` runs the commands and applies the changes. :class:`DryRunExecutor` prints each command as a
shell line and changes nothing, so ``--dry-run`` walks the same code and shows the same commands a real run would
run (resumed runs with ``--c``, finished ones skipped). Both record the commands they were given in ``commands``.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, List, Mapping, Optional, Sequence

from nnunet_semi.benchmark.commands import CommandError, EpochProgress, run_command, shell_line


class Executor:
    """Runs nnU-Net's commands (:func:`~nnunet_semi.benchmark.commands.run_command`) and applies the harness'
    own changes."""

    def __init__(self, verbose_commands: bool = True):
        self.verbose_commands = verbose_commands
        #: every command given to :meth:`run`, in order (argument lists)
        self.commands: List[List[str]] = []

    def run(self, cmd: Sequence, env: Mapping[str, str], log_file: str, progress: Optional[EpochProgress] = None,
            echo: Optional[Mapping[str, str]] = None, creates: Optional[str] = None) -> Optional[float]:
        """Run ``cmd`` (``echo``: the variables printed in front of it); returns its wall time. ``creates``: a
        path the command must have made."""
        cmd = [str(c) for c in cmd]
        self.commands.append(cmd)
        seconds = run_command(cmd, env, log_file, progress, echo, quiet=not self.verbose_commands)
        if creates is not None and not os.path.exists(creates):
            raise CommandError(f"{shell_line(cmd)} succeeded but did not create {creates}; see {log_file}")
        return seconds

    def apply(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


class DryRunExecutor(Executor):
    """Prints the commands, runs nothing and changes no file (``--dry-run``)."""

    def run(self, cmd: Sequence, env: Mapping[str, str], log_file: str, progress: Optional[EpochProgress] = None,
            echo: Optional[Mapping[str, str]] = None, creates: Optional[str] = None) -> Optional[float]:
        cmd = [str(c) for c in cmd]
        self.commands.append(cmd)
        print(shell_line(cmd, echo), flush=True)
        return None

    def apply(self, fn: Callable, *args, **kwargs):
        return None


# --------------------------------------------------------------------------------------------
# the harness' own changes (what it hands to Executor.apply)
# --------------------------------------------------------------------------------------------
def remove_folders(*paths: str) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)


def link_files(folder: str, files: Sequence[str]) -> str:
    """``folder`` (emptied first) with a symlink to each file (a copy where symlinks fail)."""
    remove_folders(folder)
    os.makedirs(folder)
    for src in files:
        dst = os.path.join(folder, os.path.basename(src))
        try:
            os.symlink(os.path.abspath(src), dst)
        except OSError:
            shutil.copy2(src, dst)
    return folder
