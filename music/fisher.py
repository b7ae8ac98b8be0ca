"""Per-sample gradient magnitudes, summed over a batch: the diagonal Fisher (squared gradients
of a log-likelihood) that EWC's penalty and Fisher merging weight parameters by, and MAS's
importance (absolute gradients of the output's squared norm), computed one way for all three.

A network of ``nn.Linear`` layers on flat inputs (the MLPs) gets them in closed form: a
sample's weight gradient is the outer product ``g a^T`` of the layer's output gradient and
input, so the sum over samples of its square (absolute value) is ``m(g)^T m(a)`` with ``m`` the
square (absolute value), one backward per batch; any other network goes through ``torch.func``
(vmap of grad), much slower on a CPU (docs/continual.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

#: a per-sample quantity summed over a batch, from the network's logits and the labels
#: (``log p(y | x)`` for the Fisher).
Objective = Callable[[Tensor, Tensor], Tensor]
Magnitude = Literal["square", "abs"]
MAGNITUDES = {"square": torch.square, "abs": torch.abs}


def log_likelihood(logits: Tensor, y: Tensor) -> Tensor:
    """The plain classifier's: log-softmax of the logits at each sample's label, summed."""
    return F.log_softmax(logits, dim=1).gather(1, y.view(-1, 1)).sum()


def gradient_magnitudes(network: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor,
                        objective: Objective = log_likelihood, magnitude: Magnitude = "square",
                        scale: Tensor | None = None) -> dict[str, Tensor]:
    """Σ over the batch of the square (or absolute value) of each sample's gradient of
    ``objective(network(x), y)`` with respect to ``params`` (the network's parameters by name),
    each sample's gradient times its ``scale`` first (√p(y | x) makes the sum over labels y the
    expected Fisher)."""
    layers = linear_layers(network, params)
    sums = _closed_form(network, layers, x, y, objective, magnitude, scale) if layers is not None else None
    return sums if sums is not None else per_sample_gradient_magnitudes(network, params, x, y, objective, magnitude,
                                                                          scale=scale)


def linear_layers(network: nn.Module, params: dict[str, Tensor]) -> dict[str, nn.Linear] | None:
    """The network's linear layers by name, if they hold every parameter in ``params``."""
    layers = {name: m for name, m in network.named_modules() if type(m) is nn.Linear}
    covered = {f"{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters(recurse=False)}
    return layers if set(params) <= covered else None


def _closed_form(network: nn.Module, layers: dict[str, nn.Linear], x: Tensor, y: Tensor,
                 objective: Objective, magnitude: Magnitude, scale: Tensor | None) -> dict[str, Tensor] | None:
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            seen[name] = (inputs[0].detach(), output)
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        with torch.enable_grad():
            logits = network(x)
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
        if scale is not None:
            g = g * scale.view(-1, 1)
        layer = layers[name]
        if layer.weight.requires_grad:
            sums[f"{name}.weight"] = m(g).T @ m(a)
        if layer.bias is not None and layer.bias.requires_grad:
            sums[f"{name}.bias"] = m(g).sum(0)
    return sums


def per_sample_gradient_magnitudes(network: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor,
                                   objective: Objective = log_likelihood, magnitude: Magnitude = "square",
                                   chunk: int = 32, scale: Tensor | None = None) -> dict[str, Tensor]:
    """The same sum for any network, one sample's gradient at a time (``vmap`` of ``grad``)."""
    weights = {name: p.detach() for name, p in params.items()}
    frozen = {name: p.detach() for name, p in network.named_parameters() if name not in weights}
    buffers = dict(network.named_buffers())

    def one(weights: dict[str, Tensor], x: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(network, (weights | frozen, buffers), (x.unsqueeze(0),))
        return objective(logits, label.unsqueeze(0))

    m = MAGNITUDES[magnitude]
    out: dict[str, Tensor] = {}
    for start in range(0, len(y), chunk):
        grads = vmap(grad(one), in_dims=(None, 0, 0))(weights, x[start:start + chunk], y[start:start + chunk])
        for name, g in grads.items():
            if scale is not None:
                g = g * scale[start:start + chunk].view(-1, *[1] * (g.ndim - 1))
            out[name] = out.get(name, 0) + m(g).sum(0)
    return out
