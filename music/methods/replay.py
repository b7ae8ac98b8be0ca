"""Experience replay: a small memory of earlier tasks' training samples, a batch of which is
replayed alongside every training batch (Chaudhry et al. 2019's "tiny episodic memories";
van de Ven et al.'s "experience replay")."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from music.methods.base import Method, Model, Task


SELECTIONS = ("class_balanced", "reservoir")


class Replay(Method):
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

    Draws (which samples enter the memory, which are replayed) come from a generator of the
    method's own, seeded from torch's initial seed, so a run is reproducible and the rest of
    training draws exactly what it would without replay. A memory of 0 samples replays nothing.
    """

    _state = ("images", "labels", "seen", "generator_state")

    def __init__(self, budget_per_class: int | None = None, budget: int | None = None,
                 selection: Literal["class_balanced", "reservoir"] = "class_balanced",
                 batch_size: int | None = None, weight: float = 1.0) -> None:
        for name, value in (("budget_per_class", budget_per_class), ("budget", budget)):
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} is not allowed: a replay budget must be >= 0.")
        if (budget_per_class is None) == (budget is None):
            raise ValueError(f"budget_per_class={budget_per_class}, budget={budget}: give exactly one of them.")
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is not allowed: choose one of {list(SELECTIONS)}.")
        if selection == "reservoir" and budget is None:
            raise ValueError("selection=reservoir needs a total `budget`, not budget_per_class.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is not allowed: an integer >= 1, or null for the training batch's.")
        if weight < 0:
            raise ValueError(f"weight={weight} is not allowed: the replay weight must be >= 0.")
        self.budget_per_class = budget_per_class
        self.budget = budget
        self.selection = selection
        self.batch_size = batch_size
        self.weight = weight
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        self.seen = 0  # samples streamed past the reservoir
        self.generator_state: Tensor | None = None
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator()
            if self.generator_state is not None:
                self._generator.set_state(self.generator_state)
            else:
                self._generator.manual_seed(torch.initial_seed() + 1)
        return self._generator

    def state_dict(self) -> dict:
        self.generator_state = self.generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._generator = None

    def __len__(self) -> int:
        return 0 if self.labels is None else len(self.labels)

    def end_task(self, model: Model, task: Task) -> None:
        images, labels = task.dataset.images, task.dataset.labels
        if self.selection == "reservoir":
            self._reservoir(images, labels)
            return
        kept_images, kept_labels = [], []
        old = [] if self.labels is None else self.labels.unique().tolist()
        classes = sorted(set(old) | set(labels.unique().tolist()))
        per_class = self.budget_per_class if self.budget is None else self.budget // max(len(classes), 1)
        for c in classes:
            if c in old:  # keep the first `per_class` of its (already random) memory
                index = (self.labels == c).nonzero().flatten()[:per_class]
                kept_images.append(self.images[index])
                kept_labels.append(self.labels[index])
            if c in labels:
                candidates = (labels == c).nonzero().flatten().cpu()
                chosen = candidates[torch.randperm(len(candidates), generator=self.generator)[:per_class]]
                chosen = chosen.to(labels.device)
                kept_images.append(images[chosen])
                kept_labels.append(labels[chosen])
        self.images, self.labels = torch.cat(kept_images), torch.cat(kept_labels)

    def _reservoir(self, images: Tensor, labels: Tensor) -> None:
        """Algorithm R over the task's samples in a random order."""
        order = torch.randperm(len(labels), generator=self.generator).tolist()
        memory_images = [] if self.images is None else list(self.images)
        memory_labels = [] if self.labels is None else list(self.labels)
        for i in order:
            self.seen += 1
            if len(memory_labels) < self.budget:
                memory_images.append(images[i])
                memory_labels.append(labels[i])
            else:
                slot = int(torch.randint(self.seen, (1,), generator=self.generator))
                if slot < self.budget:
                    memory_images[slot], memory_labels[slot] = images[i], labels[i]
        if memory_labels:
            self.images, self.labels = torch.stack(memory_images), torch.stack(memory_labels)

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if not len(self) or self.weight == 0 or not model.training:
            return None
        size = min(self.batch_size or len(y), len(self))
        pick = torch.randperm(len(self), generator=self.generator)[:size].to(self.labels.device)
        replay_x, replay_y = self.images[pick].to(x.device), self.labels[pick].to(x.device)
        return self.weight * F.cross_entropy(model.scenario_logits(model(replay_x), replay_y), replay_y)
