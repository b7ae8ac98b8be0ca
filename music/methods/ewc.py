"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) and its online variant
(Schwarz et al., ICML 2018): a quadratic penalty that holds each parameter near its value at
the end of earlier tasks, in proportion to the diagonal of the Fisher information there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from music.methods.base import Method, Model, Task, trainable


Objective = Callable[[Tensor, Tensor], Tensor]  # (logits, labels) -> sum over the samples
MAGNITUDES = {"square": torch.square, "abs": torch.abs}


def mean_per_sample_gradients(model: Model, task: Task, samples: int | None, objective: Objective,
                              magnitude: Literal["square", "abs"], chunk: int = 256,
                              generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Mean over the task's samples (``samples`` of them drawn by ``generator``, or all) of
    the square or absolute value of each sample's gradient of ``objective``, per trainable
    parameter, with the model in eval mode: the importance estimates of EWC (the Fisher) and
    MAS.

    A network of ``nn.Linear`` layers on flat inputs (the MLPs) gets it in closed form: a
    sample's weight gradient is the outer product ``g a^T`` of the layer's output gradient and
    input, so the sum over samples of its square (absolute value) is ``m(g)^T m(a)`` with ``m``
    the square (absolute value), one backward per chunk; any other network goes through
    ``torch.func`` (vmap of grad), much slower on a CPU (docs/continual.md)."""
    images, targets = task.dataset.images, task.dataset.labels
    if samples is not None and samples < len(targets):
        pick = torch.randperm(len(targets), generator=generator)[:samples].to(targets.device)
        images, targets = images[pick], targets[pick]
    params = trainable(model)
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    linear = _linear_layers(model, params)
    was_training = model.training
    model.eval()
    device = next(iter(params.values())).device
    for start in range(0, len(targets), chunk):
        x = images[start:start + chunk].to(device)
        y = targets[start:start + chunk].to(device)
        sums = _closed_form(model, linear, x, y, objective, magnitude) if linear is not None else None
        if sums is None:
            sums = _per_sample(model, params, x, y, objective, magnitude)
        for name, value in sums.items():
            totals[name] += value
    model.train(was_training)
    return {name: total / len(targets) for name, total in totals.items()}


def diagonal_fisher(model: Model, task: Task, samples: int | None, labels: str, chunk: int = 256,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Mean over the task's samples of the squared per-sample gradient of ``log p(label | x)``,
    the label being the model's prediction (``predicted``: the usual estimate of the Fisher)
    or the sample's own (``true``: the empirical Fisher)."""

    def log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
        if labels == "predicted":
            y = model.scenario_logits(logits.detach(), y).argmax(1)
        return F.log_softmax(model.scenario_logits(logits, y), dim=1).gather(1, y.view(-1, 1)).sum()

    return mean_per_sample_gradients(model, task, samples, log_likelihood, "square", chunk, generator)


def _linear_layers(model: Model, params: dict[str, Tensor]) -> dict[str, nn.Linear] | None:
    """The backbone's linear layers by name, if they hold every trainable parameter."""
    layers = {name: m for name, m in model.backbone.named_modules() if type(m) is nn.Linear}
    covered = {f"{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)}
    return layers if set(params) <= covered else None


def _closed_form(model: Model, layers: dict[str, nn.Linear], x: Tensor, y: Tensor, objective: Objective,
                 magnitude: str) -> dict[str, Tensor] | None:
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            seen[name] = (inputs[0].detach(), output)
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if any(a.ndim != 2 for a, _ in seen.values()):
        return None  # e.g. tokens: a sample's gradient sums over positions, no closed form
    names = list(seen)
    grads = torch.autograd.grad(objective(logits, y), [seen[n][1] for n in names], allow_unused=True)
    m = MAGNITUDES[magnitude]
    sums = {}
    for name, g in zip(names, grads):
        a = seen[name][0]
        g = torch.zeros_like(seen[name][1]) if g is None else g
        layer = layers[name]
        if layer.weight.requires_grad:
            sums[f"{name}.weight"] = m(g).T @ m(a)
        if layer.bias is not None and layer.bias.requires_grad:
            sums[f"{name}.bias"] = m(g).sum(0)
    return sums


def _per_sample(model: Model, params: dict[str, Tensor], x: Tensor, y: Tensor, objective: Objective,
                magnitude: str) -> dict[str, Tensor]:
    weights = {name: p.detach() for name, p in params.items()}
    frozen = {name: p.detach() for name, p in model.backbone.named_parameters() if name not in weights}
    buffers = dict(model.backbone.named_buffers())

    def one(weights: dict[str, Tensor], x: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model.backbone, (weights | frozen, buffers), (x.unsqueeze(0),))
        return objective(logits, label.unsqueeze(0))

    m = MAGNITUDES[magnitude]
    out = {}
    for start in range(0, len(y), 32):
        grads = vmap(grad(one), in_dims=(None, 0, 0))(weights, x[start:start + 32], y[start:start + 32])
        for name, g in grads.items():
            out[name] = out.get(name, 0) + m(g).sum(0)
    return out


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
