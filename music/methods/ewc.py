"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) and its online variant
(Schwarz et al., ICML 2018): a quadratic penalty that holds each parameter near its value at
the end of earlier tasks, in proportion to the diagonal of the Fisher information there."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from music.fisher import log_likelihood, squared_gradients
from music.methods.base import Method, Model, Task, trainable


def diagonal_fisher(model: Model, task: Task, samples: int | None, labels: str, chunk: int = 256,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Mean over the task's samples of the squared per-sample gradient of ``log p(label | x)``,
    the label being the model's prediction (``predicted``: the usual estimate of the Fisher)
    or the sample's own (``true``: the empirical Fisher), the logits as the scenario scores
    them (``music.fisher`` computes the squares)."""
    images, targets = task.dataset.images, task.dataset.labels
    if samples is not None and samples < len(targets):
        pick = torch.randperm(len(targets), generator=generator)[:samples].to(targets.device)
        images, targets = images[pick], targets[pick]
    params = trainable(model)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}

    def likelihood(logits: Tensor, y: Tensor) -> Tensor:
        return log_likelihood(model.scenario_logits(logits, y), y)

    was_training = model.training
    model.eval()
    device = next(iter(params.values())).device
    for start in range(0, len(targets), chunk):
        x = images[start:start + chunk].to(device)
        y = targets[start:start + chunk].to(device)
        if labels == "predicted":
            with torch.no_grad():
                y = model.scenario_logits(model(x), y).argmax(1)
        for name, square in squared_gradients(model.backbone, params, x, y, likelihood).items():
            fisher[name] += square
    model.train(was_training)
    return {name: f / len(targets) for name, f in fisher.items()}


class EWC(Method):
    """EWC: after each task, store the weights and their diagonal Fisher; while training later
    tasks add ``lambda_ / 2 * sum_tasks sum_i F_i (theta_i - theta*_i)^2``.

    Args:
        lambda_: strength of the penalty (0: naive fine-tuning).
        fisher_samples: samples of each task the Fisher is estimated on (``None``: all).
        fisher_labels: ``predicted`` (labels drawn as the model's prediction) or ``true``
            (the empirical Fisher).
    """

    _state = ("anchors", "fishers")

    def __init__(self, lambda_: float = 100.0, fisher_samples: int | None = None,
                 fisher_labels: Literal["predicted", "true"] = "predicted") -> None:
        if lambda_ < 0:
            raise ValueError(f"lambda_={lambda_} is not allowed: the EWC strength must be >= 0.")
        if fisher_samples is not None and fisher_samples < 1:
            raise ValueError(f"fisher_samples={fisher_samples} is not allowed: an integer >= 1, or null for all.")
        if fisher_labels not in ("predicted", "true"):
            raise ValueError(f"fisher_labels={fisher_labels!r} is not allowed: choose 'predicted' or 'true'.")
        self.lambda_ = lambda_
        self.fisher_samples = fisher_samples
        self.fisher_labels = fisher_labels
        self.anchors: list[dict[str, Tensor]] = []  # one per consolidated task
        self.fishers: list[dict[str, Tensor]] = []

    def end_task(self, model: Model, task: Task) -> None:
        generator = torch.Generator().manual_seed(torch.initial_seed() + task.index)
        fisher = diagonal_fisher(model, task, self.fisher_samples, self.fisher_labels, generator=generator)
        self.consolidate({name: p.detach().clone() for name, p in trainable(model).items()}, fisher)

    def consolidate(self, anchor: dict[str, Tensor], fisher: dict[str, Tensor]) -> None:
        self.anchors.append(anchor)
        self.fishers.append(fisher)

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if not self.fishers or self.lambda_ == 0:
            return None
        params = trainable(model)
        penalty = sum((fisher[name] * (p - anchor[name]).pow(2)).sum()
                      for anchor, fisher in zip(self.anchors, self.fishers) for name, p in params.items())
        return self.lambda_ / 2 * penalty


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

    def consolidate(self, anchor: dict[str, Tensor], fisher: dict[str, Tensor]) -> None:
        if self.fishers:
            fisher = {name: self.gamma * old + fisher[name] for name, old in self.fishers[0].items()}
        self.anchors, self.fishers = [anchor], [fisher]
