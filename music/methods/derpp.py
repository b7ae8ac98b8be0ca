"""Dark experience replay++ (Buzzega et al., NeurIPS 2020): a reservoir memory of training
samples with the logits the network gave them when they were stored; replay matches the
current logits on memory samples to the stored ones (MSE) and fits their labels (CE)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from music.methods.base import Model
from music.methods.memory import Rehearsal


class DERPP(Rehearsal):
    """DER++: every training batch adds ``alpha * MSE(f(x'), z')`` on one batch drawn from the
    memory and ``beta * CE(f(x''), y'')`` on a second, independent draw, then streams its own
    samples, labels and (detached) logits past a reservoir of ``budget`` samples. Stored logits
    are those of the step that stored them and never change: the network is pulled towards its
    own past outputs, sampled along the whole training trajectory.

    The MSE compares all outputs (the raw logits, as stored); the CE scores the scenario's
    logits, as the training batch's does. A method of the ``music.methods.memory`` family: its
    draws come from its own generator.

    Args:
        budget: samples kept in the reservoir (Mammoth's Split-MNIST setting: 500).
        alpha: weight of the logit-matching term (Mammoth, seq-mnist, 500 samples: 1.0).
        beta: weight of the memory labels' cross-entropy (same: 0.5; 0 gives DER).
        batch_size: samples per replay draw (``None``: as many as the training batch has).
    """

    _state = Rehearsal._state + ("logits",)
    _stored = ("images", "labels", "logits")

    def __init__(self, budget: int = 500, alpha: float = 1.0, beta: float = 0.5, batch_size: int | None = None) -> None:
        super().__init__(budget=budget, selection="reservoir", batch_size=batch_size)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"{name}={value} is not allowed: a DER++ weight must be >= 0.")
        self.alpha = alpha
        self.beta = beta
        self.logits: Tensor | None = None  # the stored samples' logits at insertion

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if not model.training:
            return None
        term = None
        if len(self):
            term = 0.0
            if self.alpha:
                pick = self.draw(len(y))
                replayed = model(self.images[pick].to(x.device))
                term = term + self.alpha * F.mse_loss(replayed, self.logits[pick].to(replayed))
            if self.beta:
                pick = self.draw(len(y))
                replay_y = self.labels[pick].to(x.device)
                term = term + self.beta * F.cross_entropy(
                    model.scenario_logits(model(self.images[pick].to(x.device)), replay_y), replay_y)
        self.remember_batch(images=x, labels=y, logits=logits)
        return term if isinstance(term, Tensor) else None
