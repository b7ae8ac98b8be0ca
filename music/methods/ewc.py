"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) and its online variant
(Schwarz et al., ICML 2018): a quadratic penalty that holds each parameter near its value at
the end of earlier tasks, in proportion to the diagonal of the Fisher information there."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from music.methods.base import Method, Model, Task, trainable


def diagonal_fisher(model: Model, task: Task, samples: int | None, labels: str, chunk: int = 256,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Mean over the task's samples of the squared per-sample gradient of ``log p(label | x)``,
    the label being the model's prediction (``predicted``: the usual estimate of the Fisher)
    or the sample's own (``true``: the empirical Fisher).

    A network of ``nn.Linear`` layers on flat inputs (the MLPs) gets its per-sample squared
    gradients in closed form, ``(g^2)^T (a^2)`` from each layer's input ``a`` and output
    gradient ``g``, one backward per chunk; any other network goes through ``torch.func``
    (vmap of grad), much slower on a CPU (docs/continual.md)."""
    images, targets = task.dataset.images, task.dataset.labels
    if samples is not None and samples < len(targets):
        pick = torch.randperm(len(targets), generator=generator)[:samples].to(targets.device)
        images, targets = images[pick], targets[pick]
    params = trainable(model)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    linear = _linear_layers(model, params)
    was_training = model.training
    model.eval()
    device = next(iter(params.values())).device
    for start in range(0, len(targets), chunk):
        x = images[start:start + chunk].to(device)
        y = targets[start:start + chunk].to(device)
        if labels == "predicted":
            with torch.no_grad():
                y = model.scenario_logits(model(x), y).argmax(1)
        squares = _closed_form(model, linear, x, y) if linear is not None else None
        if squares is None:
            squares = _per_sample(model, params, x, y)
        for name, square in squares.items():
            fisher[name] += square
    model.train(was_training)
    return {name: f / len(targets) for name, f in fisher.items()}


def _log_likelihood(model: Model, logits: Tensor, y: Tensor) -> Tensor:
    return F.log_softmax(model.scenario_logits(logits, y), dim=1).gather(1, y.view(-1, 1)).sum()


def _linear_layers(model: Model, params: dict[str, Tensor]) -> dict[str, nn.Linear] | None:
    """The backbone's linear layers by name, if they hold every trainable parameter."""
    layers = {name: m for name, m in model.backbone.named_modules() if type(m) is nn.Linear}
    covered = {f"{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)}
    return layers if set(params) <= covered else None


def _closed_form(model: Model, layers: dict[str, nn.Linear], x: Tensor, y: Tensor) -> dict[str, Tensor] | None:
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
    grads = torch.autograd.grad(_log_likelihood(model, logits, y), [seen[n][1] for n in names], allow_unused=True)
    squares = {}
    for name, g in zip(names, grads):
        a = seen[name][0]
        g = torch.zeros_like(seen[name][1]) if g is None else g
        layer = layers[name]
        if layer.weight.requires_grad:
            squares[f"{name}.weight"] = g.pow(2).T @ a.pow(2)
        if layer.bias is not None and layer.bias.requires_grad:
            squares[f"{name}.bias"] = g.pow(2).sum(0)
    return squares


def _per_sample(model: Model, params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    weights = {name: p.detach() for name, p in params.items()}
    frozen = {name: p.detach() for name, p in model.backbone.named_parameters() if name not in weights}
    buffers = dict(model.backbone.named_buffers())

    def log_likelihood(weights: dict[str, Tensor], x: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model.backbone, (weights | frozen, buffers), (x.unsqueeze(0),))
        return _log_likelihood(model, logits, label.unsqueeze(0))

    out = {}
    for start in range(0, len(y), 32):
        grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0))(weights, x[start:start + 32], y[start:start + 32])
        for name, g in grads.items():
            out[name] = out.get(name, 0) + g.pow(2).sum(0)
    return out


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
