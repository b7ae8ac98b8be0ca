"""Synaptic intelligence (Zenke, Poole & Ganguli, ICML 2017): each parameter's importance is
its contribution to the fall of the loss along the training path of a task, and a quadratic
penalty holds important parameters near their value at the end of the earlier tasks."""

from __future__ import annotations

from torch import Tensor

from music.methods.base import Method, Model, Task, trainable


class SI(Method):
    """SI: along a task, ``W_i += -g_i * delta_i`` for each optimizer step (``g``: the gradient
    the step used, ``delta``: the change it made); at the task's end ``omega_i += W_i /
    (Delta_i^2 + xi)`` with ``Delta`` the task's total change. Later tasks add
    ``c * sum_i omega_i (theta_i - theta*_i)^2``.

    The model calls ``loss`` before each step's backward, when the parameters hold the previous
    step's result and ``.grad`` its gradient (zeroing comes later, right before backward), so
    the path integral needs no hook between backward and step; the gradient is the training
    loss's, penalty included, as in van de Ven's reference code.

    Args:
        c: strength of the penalty (0: naive fine-tuning).
        xi: damping of the importance, so parameters that barely moved do not blow it up.
    """

    # ``previous`` and ``grads``: the last step's weights before it and its gradients, whose
    # product enters ``path`` at the next step: a checkpoint between the two keeps both, so a
    # resumed run adds the same term (gradients are not in a Lightning checkpoint).
    _state = ("omega", "anchor", "path", "start", "previous", "grads")

    def __init__(self, c: float = 1.0, xi: float = 0.1) -> None:
        if c < 0:
            raise ValueError(f"c={c} is not allowed: the SI strength must be >= 0.")
        if not xi > 0:
            raise ValueError(f"xi={xi} is not allowed: the SI damping must be > 0.")
        self.c = c
        self.xi = xi
        self.omega: dict[str, Tensor] = {}  # importance, summed over the consolidated tasks
        self.anchor: dict[str, Tensor] = {}  # weights at the end of the last consolidated task
        self.path: dict[str, Tensor] = {}  # W of the running task
        self.start: dict[str, Tensor] = {}  # weights when the running task started
        self.previous: dict[str, Tensor] | None = None  # weights before the latest step
        self.grads: dict[str, Tensor] = {}  # its gradients, when they are not on the parameters
        self._params: dict[str, Tensor] = {}

    def start_task(self, model: Model, task: Task) -> None:
        params = trainable(model)
        self.start = {name: p.detach().clone() for name, p in params.items()}
        self.path = {name: p.detach().new_zeros(p.shape) for name, p in params.items()}
        self.previous = None  # the next ``loss`` call only records where the task starts

    def _accumulate(self, model: Model) -> None:
        params = trainable(model)
        if self.previous is not None:
            for name, p in params.items():
                grad = p.grad if p.grad is not None else self.grads.get(name)
                if grad is not None:
                    self.path[name] -= grad * (p.detach() - self.previous[name])
        self.previous = {name: p.detach().clone() for name, p in params.items()}
        self.grads, self._params = {}, params

    def end_task(self, model: Model, task: Task) -> None:
        self._accumulate(model)  # the task's last step
        for name, p in trainable(model).items():
            importance = self.path[name] / ((p.detach() - self.start[name]).pow(2) + self.xi)
            self.omega[name] = self.omega[name] + importance if name in self.omega else importance
            self.anchor[name] = p.detach().clone()
        self.previous, self.grads = None, {}

    def state_dict(self) -> dict:
        if self.previous is not None:
            self.grads = {n: p.grad.detach().clone() for n, p in self._params.items() if p.grad is not None}
        return super().state_dict()

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if model.training:
            self._accumulate(model)
        if not self.omega or self.c == 0:
            return None
        penalty = sum((self.omega[name] * (p - self.anchor[name]).pow(2)).sum() for name, p in trainable(model).items())
        return self.c * penalty
