"""Experience replay: a small memory of earlier tasks' training samples, a batch of which is
replayed alongside every training batch (Chaudhry et al. 2019's "tiny episodic memories";
van de Ven et al.'s "experience replay")."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from music.methods.base import Model, Task
from music.methods.memory import Rehearsal


class Replay(Rehearsal):
    """Replay: when a task ends, some of its samples enter the memory; every later training
    batch adds ``weight * cross_entropy`` of a batch drawn from the memory, so replay is mixed
    per batch (blocks of batches included) without a second loader.

    Args:
        budget_per_class: samples kept per class (``class_balanced`` only).
        budget: samples kept in all; ``class_balanced`` then shares it equally among the
            classes seen so far (older classes give up samples as new ones arrive).
        selection: ``class_balanced`` (a random draw per class) or ``reservoir`` (reservoir
            sampling over the stream of all samples seen, a uniform draw of them).
        batch_size: replayed samples per training batch (``None``: as many as the batch has).
        weight: weight of the replayed batch's loss (1: as if the two batches were one, up to
            the normalisation of the mean).

    The memory and its draws are ``music.methods.memory.Rehearsal``'s: a memory of 0 samples
    replays nothing.
    """

    def __init__(self, budget_per_class: int | None = None, budget: int | None = None,
                 selection: Literal["class_balanced", "reservoir"] = "class_balanced",
                 batch_size: int | None = None, weight: float = 1.0) -> None:
        super().__init__(budget_per_class, budget, selection, batch_size)
        if weight < 0:
            raise ValueError(f"weight={weight} is not allowed: the replay weight must be >= 0.")
        self.weight = weight

    def end_task(self, model: Model, task: Task) -> None:
        self.remember_task(task)

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if not len(self) or self.weight == 0 or not model.training:
            return None
        pick = self.draw(len(y))
        replay_x, replay_y = self.images[pick].to(x.device), self.labels[pick].to(x.device)
        return self.weight * F.cross_entropy(model.scenario_logits(model(replay_x), replay_y), replay_y)
