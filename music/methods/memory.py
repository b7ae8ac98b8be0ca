"""The episodic memory of the rehearsal methods (replay, DER++, ER-ACE, A-GEM): samples of the
tasks seen so far, chosen per class or by reservoir sampling, and drawn from by the method's
own generator."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from music.methods.base import Method, Task


SELECTIONS = ("class_balanced", "reservoir")


class Rehearsal(Method):
    """A method with a memory: ``remember_task`` stores some of a finished task's samples,
    ``remember_batch`` streams a training batch past a reservoir (for methods that store as
    they train, as DER++ and ER-ACE do), and ``draw`` picks a replay batch.

    Draws (which samples enter the memory, which are replayed) come from a generator of the
    method's own, seeded from torch's initial seed, so a run is reproducible and the rest of
    training draws exactly what it would without the method. Its state, the memory and the
    generator's, travels in checkpoints.

    Args:
        budget_per_class: samples kept per class (``class_balanced`` only).
        budget: samples kept in all; ``class_balanced`` then shares it equally among the
            classes seen so far (older classes give up samples as new ones arrive).
        selection: ``class_balanced`` (a random draw per class) or ``reservoir`` (reservoir
            sampling over the stream of all samples seen, a uniform draw of them).
        batch_size: replayed samples per training batch (``None``: as many as the batch has).
    """

    _state = ("images", "labels", "seen", "generator_state")
    _stored: tuple[str, ...] = ("images", "labels")  # the tensors kept per sample, in the same order

    def __init__(self, budget_per_class: int | None = None, budget: int | None = None,
                 selection: Literal["class_balanced", "reservoir"] = "class_balanced",
                 batch_size: int | None = None) -> None:
        for name, value in (("budget_per_class", budget_per_class), ("budget", budget)):
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} is not allowed: a memory budget must be >= 0.")
        if (budget_per_class is None) == (budget is None):
            raise ValueError(f"budget_per_class={budget_per_class}, budget={budget}: give exactly one of them.")
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is not allowed: choose one of {list(SELECTIONS)}.")
        if selection == "reservoir" and budget is None:
            raise ValueError("selection=reservoir needs a total `budget`, not budget_per_class.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is not allowed: an integer >= 1, or null for the training batch's.")
        self.budget_per_class = budget_per_class
        self.budget = budget
        self.selection = selection
        self.batch_size = batch_size
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

    def draw(self, batch: int) -> Tensor:
        """Indices of a replay batch: ``batch_size`` (or ``batch``) memory samples, without repeats."""
        size = min(self.batch_size or batch, len(self))
        return torch.randperm(len(self), generator=self.generator)[:size].to(self.labels.device)

    def remember_task(self, task: Task) -> None:
        """Store some of a finished task's samples: a random draw per class, or the task's
        samples in a random order streamed past the reservoir."""
        images, labels = task.dataset.images, task.dataset.labels
        if self.selection == "reservoir":
            order = torch.randperm(len(labels), generator=self.generator).to(labels.device)
            self._reservoir({"images": images[order], "labels": labels[order]})
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

    def remember_batch(self, **samples: Tensor) -> None:
        """Stream a training batch past the reservoir, in its order (``samples``: one tensor per
        name of ``_stored``)."""
        self._reservoir({name: samples[name].detach() for name in self._stored})

    def _reservoir(self, samples: dict[str, Tensor]) -> None:
        """Algorithm R (Vitter 1985): the k-th sample of the stream fills a free slot while
        there is one, else replaces slot ``floor(u * k)`` if that is below the budget."""
        n = len(samples["labels"])
        if n == 0 or not self.budget:
            self.seen += n
            return
        position = self.seen + 1 + torch.arange(n)  # 1-based place in the stream
        draws = (torch.rand(n, generator=self.generator, dtype=torch.float64) * position).long()
        self.seen += n
        free = position <= self.budget
        if free.any():
            index = free.nonzero().flatten().to(samples["labels"].device)
            for name in self._stored:
                new = samples[name][index]
                old = getattr(self, name)
                setattr(self, name, new.clone() if old is None else torch.cat([old, new.to(old.device)]))
        replace = (~free & (draws < self.budget)).nonzero().flatten().tolist()
        if replace:
            last = {}  # slot -> the latest sample streamed into it
            for i in replace:
                last[int(draws[i])] = i
            slots = torch.tensor(list(last), device=self.labels.device)
            index = torch.tensor(list(last.values()), device=samples["labels"].device)
            for name in self._stored:
                memory = getattr(self, name)
                memory[slots] = samples[name][index].to(memory.device)
