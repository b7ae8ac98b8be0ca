"""Experience replay with asymmetric cross-entropy, ER-ACE (Caccia et al., ICLR 2022, "New
Insights on Reducing Abrupt Representation Change in Online Continual Learning"): the incoming
batch is scored only among its own classes, so learning new classes does not push the earlier
classes' logits down; the replayed batch is scored among all classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from music.methods.base import Model
from music.methods.memory import Rehearsal


class ERACE(Rehearsal):
    """ER-ACE: ``L = CE(f(x)[:, C_batch], y) + weight * CE(f(x_mem), y_mem)``, ``C_batch`` the
    classes present in the training batch (``batch_logits`` masks every other logit to
    ``-inf``), the memory a reservoir that every training batch streams past after its step's
    replay, as in the paper's online setting.

    The mask follows the paper's formula from the first batch on; the authors' code (and
    Mammoth's) applies it from the second task and also leaves the classes above the largest
    seen so far unmasked, which only differs for classes not seen yet.

    Args:
        budget: samples kept in the reservoir (500, as DER++'s and A-GEM's shipped configs).
        batch_size: replayed samples per training batch (``None``: as many as the batch has).
        weight: weight of the replayed batch's cross-entropy (1 in the paper).
    """

    def __init__(self, budget: int = 500, batch_size: int | None = None, weight: float = 1.0) -> None:
        super().__init__(budget=budget, selection="reservoir", batch_size=batch_size)
        if not weight >= 0:
            raise ValueError(f"weight={weight} is not allowed: the replay weight must be >= 0.")
        self.weight = weight

    def batch_logits(self, model: Model, logits: Tensor, y: Tensor) -> Tensor:
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[y] = True
        return logits.masked_fill(~present, float("-inf"))

    def loss(self, model: Model, x: Tensor, y: Tensor, logits: Tensor) -> Tensor | None:
        if not model.training:
            return None
        term = None
        if len(self) and self.weight:
            pick = self.draw(len(y))
            replay_x, replay_y = self.images[pick].to(x.device), self.labels[pick].to(x.device)
            term = self.weight * F.cross_entropy(model.scenario_logits(model(replay_x), replay_y), replay_y)
        self.remember_batch(images=x, labels=y)
        return term
