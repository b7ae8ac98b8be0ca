"""Faults injected into real runs by the reliability tests (importable by subprocesses)."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch import Callback
from torch import nn

from music.models import SimpleNN


class KillAt(Callback):
    """SIGKILLs the process: mid-epoch (``batch``), after the phase callback's epoch-end work
    but before ``last.ckpt`` (``epoch_end``), or inside a checkpoint save (``save``)."""

    def __init__(self, point: str, epoch: int, batch: int = 1) -> None:
        self.point, self.epoch, self.batch = point, epoch, batch

    def _kill(self, trainer, point: str) -> None:
        if point == self.point and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            self._kill(trainer, "batch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._kill(trainer, "epoch_end")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._kill(trainer, "save")


class NaNAfter(SimpleNN):
    """SimpleNN whose training outputs turn NaN after ``steps`` forward passes."""

    def __init__(self, steps: int = 5) -> None:
        super().__init__()
        self.steps = steps
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = super().forward(x)
        return out * float("nan") if self.training and self.calls > self.steps else out


class Evil:
    """Unpickling this creates ``path``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_checkpoint(path: str, marker: str) -> str:
    torch.save({"state_dict": {"backbone.fc1.weight": Evil(marker)}, "epoch": 0}, path)
    return path


__all__ = ["KillAt", "NaNAfter", "Evil", "evil_checkpoint", "nn"]
