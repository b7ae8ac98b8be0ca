"""The run directory: where MUSIC writes a run's own files, whichever logger logs it.

Lightning's ``Trainer.log_dir`` is the logger's folder for TensorBoard and CSV but falls back to
a shared ``save_dir`` for MLflow or W&B; MUSIC's files (snapshots, ``phase_metrics.json``, the
split manifest, the accuracy matrix, ``config.yaml``) go to ``run_dir(trainer)`` instead.
"""

from __future__ import annotations

import os

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
