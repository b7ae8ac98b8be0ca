"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) and its online variant
(Schwarz et al., ICML 2018): a quadratic penalty that holds each parameter near its value at
the end of earlier tasks, in proportion to the diagonal of the Fisher information there."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from music.fisher import Objective, gradient_magnitudes, log_likelihood
from music.methods.base import Method, Model, Task, trainable


def mean_per_sample_gradients(model: Model, task: Task, samples: int | None, objective: Objective,
                              magnitude: Literal["square", "abs"], chunk: int = 256,
                              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Mean over the task's samples (``samples`` of them drawn by ``generator``, or all) of
    the square or absolute value of each sample's gradient of ``objective``, per trainable
    parameter, with the model in eval mode: the importance estimates of EWC (the Fisher) and
    MAS (``music.fisher`` computes the magnitudes)."""
    images, targets = task.dataset.images, task.dataset.labels
    if samples is not None and samples < len(targets):
        pick = torch.randperm(len(targets), generator=generator)[:samples].to(targets.device)
        images, targets = images[pick], targets[pick]
    params = trainable(model)
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    device = next(iter(params.values())).device
    for start in range(0, len(targets), chunk):
        x = images[start:start + chunk].to(device)
        y = targets[start:start + chunk].to(device)
        for name, value in gradient_magnitudes(model.backbone, params, x, y, objective, magnitude).items():
            totals[name] += value
    model.train(was_training)
    return {name: total / len(targets) for name, total in totals.items()}


def diagonal_fisher(model: Model, task: Task, samples: int | None, labels: str, chunk: int = 256,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Mean over the task's samples of the squared per-sample gradient of ``log p(label | x)``,
    the label being the model's prediction (``predicted``: the usual estimate of the Fisher)
    or the sample's own (``true``: the empirical Fisher)."""

    def likelihood(logits: Tensor, y: Tensor) -> Tensor:
        if labels == "predicted":
            y = model.scenario_logits(logits.detach(), y).argmax(1)
        return log_likelihood(model.scenario_logits(logits, y), y)

    return mean_per_sample_gradients(model, task, samples, likelihood, "square", chunk, generator)


class QuadraticPenalty(Method):
    """A quadratic penalty that holds each parameter near its value after earlier tasks, in
    proportion to an importance estimated at each task's end (``importance``):
    ``lambda_ * scale * sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2`` over the consolidated
    terms ``k``. With ``decay`` ``None`` every task keeps a term of its own; otherwise one
    running importance, ``Omega <- decay * Omega + Omega_task``, anchored at the latest task.
    EWC, online EWC and MAS differ only in ``importance``, ``scale`` and ``decay``."""

    _state = ("anchors", "importances")
    scale = 1.0  # the penalty's factor besides lambda_

    def __init__(self, lambda_: float, decay: float | None = None) -> None:
        if not lambda_ >= 0:
            raise ValueError(f"lambda_={lambda_} is not allowed: the {type(self).__name__} strength must be >= 0.")
        self.lambda_ = lambda_
        self._decay = decay
        self.anchors: list[dict[str, Tensor]] = []  # one per consolidated term
        self.importances: list[dict[str, Tensor]] = []

    def importance(self, model: Model, task: Task) -> dict[str, Tensor]:
        raise NotImplementedError

    def end_task(self, model: Model, task: Task) -> None:
        importance = self.importance(model, task)
        self.consolidate({name: p.detach().clone() for name, p in trainable(model).items()}, importance)

    def consolidate(self, anchor: dict[str, Tensor], importance: dict[str, Tensor]) -> None:
        if self._decay is None:
            self.anchors.append(anchor)
            self.importances.append(importance)
            return
        if self.importances:
            importance = {name: self._decay * old + importance[name] for name, old in self.importances[0].items()}
        self.anchors, self.importances = [anchor], [importance]

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if not self.importances or self.lambda_ == 0:
            return None
        params = trainable(model)
        penalty = sum((importance[name] * (p - anchor[name]).pow(2)).sum()
                      for anchor, importance in zip(self.anchors, self.importances) for name, p in params.items())
        return self.lambda_ * self.scale * penalty


class EWC(QuadraticPenalty):
    """EWC: after each task, store the weights and their diagonal Fisher; while training later
    tasks add ``lambda_ / 2 * sum_tasks sum_i F_i (theta_i - theta*_i)^2``.

    Args:
        lambda_: strength of the penalty (0: naive fine-tuning).
        fisher_samples: samples of each task the Fisher is estimated on (``None``: all).
        fisher_labels: ``predicted`` (labels drawn as the model's prediction) or ``true``
            (the empirical Fisher).
    """

    _state = ("anchors", "fishers")
    scale = 0.5

    def __init__(self, lambda_: float = 100.0, fisher_samples: int | None = None,
                 fisher_labels: Literal["predicted", "true"] = "predicted") -> None:
        super().__init__(lambda_)
        if fisher_samples is not None and fisher_samples < 1:
            raise ValueError(f"fisher_samples={fisher_samples} is not allowed: an integer >= 1, or null for all.")
        if fisher_labels not in ("predicted", "true"):
            raise ValueError(f"fisher_labels={fisher_labels!r} is not allowed: choose 'predicted' or 'true'.")
        self.fisher_samples = fisher_samples
        self.fisher_labels = fisher_labels

    @property
    def fishers(self) -> list[dict[str, Tensor]]:
        """The importances under EWC's name (and its checkpoints' key)."""
        return self.importances

    @fishers.setter
    def fishers(self, value: list[dict[str, Tensor]]) -> None:
        self.importances = value

    def importance(self, model: Model, task: Task) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(torch.initial_seed() + task.index)
        return diagonal_fisher(model, task, self.fisher_samples, self.fisher_labels, generator=generator)


class OnlineEWC(EWC):
    """Online EWC: one running Fisher, ``F <- gamma * F + F_task``, anchored at the weights after
    the latest task, so memory and cost do not grow with the number of tasks.

    Args:
        lambda_: strength of the penalty.
        gamma: decay of the earlier tasks' Fisher (1: no decay).
        fisher_samples: samples of each task the Fisher is estimated on (``None``: all).
        fisher_labels: ``predicted`` or ``true`` (see ``EWC``).
    """

    def __init__(self, lambda_: float = 100.0, gamma: float = 1.0, fisher_samples: int | None = None,
                 fisher_labels: Literal["predicted", "true"] = "predicted") -> None:
        super().__init__(lambda_, fisher_samples, fisher_labels)
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma={gamma} is not allowed: the Fisher decay must be in [0, 1].")
        self.gamma = gamma
        self._decay = gamma
