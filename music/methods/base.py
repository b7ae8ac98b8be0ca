"""The interface every continual-learning method implements, and the task it is told about."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from lightning.pytorch import Trainer
from torch import Tensor, nn
from torch.utils.data import Dataset


class Model(Protocol):
    """What a method uses of the model that holds it (``music.module.Classifier``)."""

    backbone: nn.Module
    training: bool
    pretrained_on: str | None

    def __call__(self, x: Tensor) -> Tensor: ...

    def scenario_logits(self, logits: Tensor, y: Tensor) -> Tensor: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


class Schedule(Protocol):
    """What a method uses of the phase schedule (``music.callbacks.SequentialFineTuning``)."""

    phases: list  # each with a training ``split``
    online: bool  # a task-free stream: no task boundaries for the methods


@dataclass
class Task:
    """One task of a sequence: its position, training split, classes and training data."""

    index: int
    split: str
    classes: list[int]
    dataset: Dataset  # ``InMemoryDataset``: ``.images``, ``.labels``


class Method:
    """A continual-learning method. A task is a run of phases on one training split: when a
    phase starts on another split than the running task's, the method hears ``end_task`` of
    that task and ``start_task`` of the next (with ``model.pretrained_on``, a finished task 0
    on that split comes first). ``loss`` is called on every batch (its return value is added
    to the training loss; ``None`` adds nothing). ``state_dict`` holds what must survive a
    checkpoint: tensors, lists and dicts only, so checkpoints load with ``weights_only=True``.

    A new method subclasses this and overrides ``start_task``, ``end_task`` and ``loss`` (and,
    if it reshapes the batch's own loss or edits gradients, ``batch_logits`` or
    ``on_before_optimizer_step``); the model and the schedule tell it the rest. A method that
    overrides neither ``start_task`` nor ``end_task`` learns from the stream alone, so it also
    runs where no task boundaries are given (``schedule.online: true``)."""

    _state: tuple[str, ...] = ()  # the attributes ``state_dict`` saves, besides the running task

    task: Task | None = None  # the running task
    _restored_task: list | None = None  # [index, split] of the task a checkpoint was on

    def start_task(self, model: Model, task: Task) -> None:
        pass

    def end_task(self, model: Model, task: Task) -> None:
        pass

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        return None

    def batch_logits(self, model: Model, logits: Tensor, y: Tensor) -> Tensor:
        """The logits the training batch's own cross-entropy scores (after the scenario's
        masking): unchanged, unless a method reshapes that loss (ER-ACE's asymmetric one)."""
        return logits

    def on_before_optimizer_step(self, model: Model) -> None:
        """Called after backward and before every optimizer step, with the step's gradients on
        the parameters (A-GEM projects them). Blocks of batches call it for each step too."""

    def on_phase_start(self, trainer: Trainer, model: Model, schedule: Schedule, index: int) -> None:
        """Close the running task and open the next when the phase trains on another split."""
        if schedule.online and self.needs_task_boundaries():
            raise ValueError(f"model.methods: {type(self).__name__} acts at task boundaries, which schedule.online: "
                             "true does not give: use a method that learns from the stream alone (DER++, ER-ACE) "
                             "or a schedule of tasks.")
        datamodule = trainer.datamodule
        split = schedule.phases[index].split

        def task(number: int, name: str) -> Task:
            return Task(number, name, datamodule.task_classes(name), datamodule.dataset(name))

        if self.task is None and self._restored_task is not None:  # resumed: the same task, with its data
            self.task = task(*self._restored_task)
            self._restored_task = None
        if self.task is not None and self.task.split == split:
            return
        if self.task is not None:
            self.end_task(model, self.task)
        elif model.pretrained_on is not None:
            self.task = task(0, model.pretrained_on)
            self.start_task(model, self.task)
            self.end_task(model, self.task)
        self.task = task(0 if self.task is None else self.task.index + 1, split)
        self.start_task(model, self.task)

    @classmethod
    def needs_task_boundaries(cls) -> bool:
        return cls.start_task is not Method.start_task or cls.end_task is not Method.end_task

    def state_dict(self) -> dict[str, Any]:
        task = None if self.task is None else [self.task.index, self.task.split]
        return {name: getattr(self, name) for name in self._state} | {"task": task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._state:
            setattr(self, name, state[name])
        self.task, self._restored_task = None, state.get("task")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "task")
        return f"{type(self).__name__}({settings})"


def trainable(model: Model) -> dict[str, nn.Parameter]:
    """The parameters a method protects: the backbone's trainable ones, by name."""
    return {name: p for name, p in model.backbone.named_parameters() if p.requires_grad}
