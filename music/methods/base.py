"""The interface every continual-learning method implements, and the task it is told about."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from music.module import Classifier


@dataclass
class Task:
    """One task of a sequence: its position, training split, classes and training data."""

    index: int
    split: str
    classes: list[int]
    dataset: Dataset  # ``InMemoryDataset``: ``.images``, ``.labels``


class Method:
    """A continual-learning method. The model calls ``start_task`` before the first batch of a
    task, ``loss`` on every batch (its return value is added to the training loss; ``None``
    adds nothing) and ``end_task`` when the next task starts. ``state_dict`` holds what must
    survive a checkpoint: tensors, lists and dicts only, so checkpoints load with
    ``weights_only=True``."""

    _state: tuple[str, ...] = ()  # the attributes ``state_dict`` saves

    def start_task(self, model: Classifier, task: Task) -> None:
        pass

    def end_task(self, model: Classifier, task: Task) -> None:
        pass

    def loss(self, model: Classifier, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._state:
            setattr(self, name, state[name])

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a method protects: the backbone's trainable ones, by name."""
    return {name: p for name, p in model.backbone.named_parameters() if p.requires_grad}
