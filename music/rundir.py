"""The run directory: where MUSIC writes a run's own files, whichever logger logs it.

Lightning's ``Trainer.log_dir`` is the logger's folder for TensorBoard and CSV but falls back to
a shared ``save_dir`` for MLflow or W&B; MUSIC's files (snapshots, ``phase_metrics.json``, the
split manifest, the accuracy matrix, ``config.yaml``) go to ``run_dir(trainer)`` instead.
"""

from __future__ import annotations

import fcntl
import os
import re

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class RunDirectory(Callback):
    """Fixes the run directory: where MUSIC writes a run's own files (phase snapshots,
    ``phase_metrics.json``, accuracy matrix, split manifest) and, unless it has a ``dirpath``,
    where ``ModelCheckpoint`` saves.

    Without it the run directory follows the logger (``run_dir``). With it the logger only
    logs: any Lightning logger (TensorBoard, CSV, MLflow, W&B) can be used, and runs that log
    to one tracking server still write their files into folders of their own.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(self.path, "checkpoints")


def run_dir(trainer: Trainer) -> str:
    """The directory of the run's files: a ``RunDirectory`` callback's path if there is one,
    else where Lightning's ``ModelCheckpoint`` puts ``checkpoints/`` for this logger
    (``<save_dir>/<name>/<version>``, e.g. TensorBoard's ``version_N`` folder), else
    ``default_root_dir``. Unlike ``trainer.log_dir`` it is one folder per run for every logger."""
    fixed = next((c.path for c in trainer.callbacks if isinstance(c, RunDirectory)), None)
    if fixed is not None:
        return fixed
    logger = trainer.logger
    if logger is None:
        return trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


class RunDirInUse(ValueError):
    """Another live process holds the run directory."""


def make_dir(path: str, what: str) -> None:
    """``os.makedirs`` with a failure named in the user's terms (the setting and the path in
    the way), since an output folder that cannot be made is bad input, not a bug."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        blocker = path
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker.rstrip(os.sep)) or ""
        why = (f"{blocker!r} is a file, not a folder" if blocker and not os.path.isdir(blocker)
               else err.strerror or type(err).__name__)
        raise ValueError(f"{what}={path!r} cannot be created: {why}. Give a folder that can be written.") from None


class RunLock:
    """An exclusive ``flock`` on a run directory, held for the life of a run.

    Two runs in one folder would interleave their checkpoints and metrics into a folder that
    belongs to neither; the lock makes the second one fail before it writes anything. It is
    taken on the directory itself, so it leaves no file behind and the kernel drops it when
    the process dies, however it dies."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise RunDirInUse(f"{what} {path!r} is in use by another running music process: wait for it to end, "
                              "or give another folder.") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _numbered(root: str) -> list[int]:
    names = os.listdir(root) if os.path.isdir(root) else []
    return [int(n.split("_", 1)[1]) for n in names if re.fullmatch(r"version_\d+", n)]


def reserve_version(root: str, what: str) -> tuple[int, RunLock]:
    """The next free ``version_N`` under ``root``, created with an exclusive ``mkdir`` and
    locked, so two runs started at once never share one: the loser of the race takes the
    next number. Listing and creating are separate steps; only ``mkdir`` decides."""
    make_dir(root, what)
    version = max(_numbered(root), default=-1) + 1
    while True:
        path = os.path.join(root, f"version_{version}")
        try:
            os.mkdir(path)
        except FileExistsError:
            version += 1
            continue
        except OSError as err:
            raise ValueError(f"{what}: {path!r} cannot be created: {err.strerror}.") from None
        return version, RunLock(path, what)


def latest_resumable(root: str) -> int | None:
    """The newest ``version_N`` under ``root`` that holds ``checkpoints/last.ckpt``."""
    resumable = [v for v in _numbered(root) if os.path.exists(os.path.join(root, f"version_{v}", "checkpoints", "last.ckpt"))]
    return max(resumable, default=None)
