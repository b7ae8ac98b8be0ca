"""Memory aware synapses, MAS (Aljundi et al., ECCV 2018): a parameter's importance is how much
the network's output moves when it changes, measured without labels, and a quadratic penalty
holds important parameters near their value after the earlier tasks."""

from __future__ import annotations

import torch
from torch import Tensor

from music.methods.base import Model, Task
from music.methods.ewc import QuadraticPenalty, mean_per_sample_gradients


def squared_output_norm(logits: Tensor, y: Tensor) -> Tensor:
    """``sum_k ||f(x_k)||_2^2`` over the samples: MAS's objective (the labels play no part)."""
    return logits.pow(2).sum()


class MAS(QuadraticPenalty):
    """MAS: at each task's end ``Omega_i += mean_k |d ||f(x_k)||_2^2 / d theta_i|`` over the
    task's samples (``f``: the network's raw outputs, the logits); later tasks add
    ``lambda_ * sum_i Omega_i (theta_i - theta*_i)^2``, ``theta*`` the weights after the latest
    task, as the paper accumulates the importance over tasks. The penalty is EWC's
    (``QuadraticPenalty``) with the importance summed into one term.

    Args:
        lambda_: strength of the penalty (1 in the paper and Avalanche; 0: naive fine-tuning).
        samples: samples of each task the importance is estimated on (``None``: all).
    """

    def __init__(self, lambda_: float = 1.0, samples: int | None = None) -> None:
        super().__init__(lambda_, decay=1.0)
        if samples is not None and samples < 1:
            raise ValueError(f"samples={samples} is not allowed: an integer >= 1, or null for all.")
        self.samples = samples

    def importance(self, model: Model, task: Task) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(torch.initial_seed() + task.index)
        return mean_per_sample_gradients(model, task, self.samples, squared_output_norm, "abs", generator=generator)
