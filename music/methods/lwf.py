"""Learning without forgetting (Li & Hoiem, ECCV 2016): while learning a task, keep the
model's outputs on the earlier tasks' classes close to those of the model as it was at the
task boundary, by distillation on the new task's own inputs (no stored samples)."""

from __future__ import annotations

import copy


import torch
import torch.nn.functional as F
from torch import Tensor

from music.methods.base import Method, Model, Task


class LwF(Method):
    """LwF: at the start of every task after the first, a frozen copy of the network becomes
    the teacher; each batch adds ``weight * T^2 * KL(teacher || student)`` of the softened
    (``temperature`` T) outputs over the classes of the earlier tasks.

    Args:
        weight: weight of the distillation term (0: naive fine-tuning).
        temperature: softening of both outputs (Hinton et al.'s T; 2 in LwF).
    """

    _state = ("teacher_state", "old_classes", "current_classes")

    def __init__(self, weight: float = 1.0, temperature: float = 2.0) -> None:
        if weight < 0:
            raise ValueError(f"weight={weight} is not allowed: the distillation weight must be >= 0.")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} is not allowed: it must be > 0.")
        self.weight = weight
        self.temperature = temperature
        self.old_classes: list[int] = []  # classes of the tasks before the running one
        self.teacher_state: dict[str, Tensor] | None = None
        self._teacher: torch.nn.Module | None = None
        self.current_classes: list[int] = []  # classes of the running task

    def start_task(self, model: Model, task: Task) -> None:
        if task.index > 0 and self.current_classes:
            self.old_classes = sorted(set(self.old_classes) | set(self.current_classes))
            self.teacher_state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
            self._teacher = None
        self.current_classes = list(task.classes)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._teacher = None

    def teacher(self, model: Model) -> torch.nn.Module:
        if self._teacher is None:
            self._teacher = copy.deepcopy(model.backbone).requires_grad_(False).eval()
            self._teacher.load_state_dict(self.teacher_state)
        return self._teacher

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if self.teacher_state is None or self.weight == 0 or not model.training:
            return None
        with torch.no_grad():
            target = self.teacher(model)(x)[:, self.old_classes]
        t = self.temperature
        return self.weight * t * t * F.kl_div(F.log_softmax(logits[:, self.old_classes] / t, dim=1),
                                              F.log_softmax(target / t, dim=1), log_target=True, reduction="batchmean")
