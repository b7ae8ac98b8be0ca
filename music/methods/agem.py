"""Averaged gradient episodic memory, A-GEM (Chaudhry et al., ICLR 2019): each step's gradient
is projected so that, to first order, it does not increase the loss on a batch of the memory
of earlier tasks."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from music.methods.base import Model, Task, trainable
from music.methods.memory import Rehearsal


class AGEM(Rehearsal):
    """A-GEM: between backward and the optimizer step (``on_before_optimizer_step``), with
    ``g`` the step's gradient and ``g_ref`` the gradient of the cross-entropy of a batch drawn
    from the memory, ``g <- g - (g.g_ref / g_ref.g_ref) g_ref`` when ``g.g_ref < 0``. The
    memory takes samples of each finished task, as the paper's episodic memory.

    ``g`` is the gradient of the whole training loss (other methods' terms included), over the
    backbone's trainable parameters.

    Args:
        budget_per_class: samples kept per class (``class_balanced`` only).
        budget: samples kept in all (``class_balanced``: shared equally among the classes seen).
        selection: ``class_balanced`` or ``reservoir`` (see ``music.methods.memory.Rehearsal``).
        batch_size: samples of the reference batch (``None``: the whole memory; Mammoth's
            Split-MNIST setting: 128).
    """

    def __init__(self, budget_per_class: int | None = None, budget: int | None = 500,
                 selection: Literal["class_balanced", "reservoir"] = "class_balanced",
                 batch_size: int | None = 128) -> None:
        super().__init__(budget_per_class, budget, selection, batch_size)

    def end_task(self, model: Model, task: Task) -> None:
        self.remember_task(task)

    def on_before_optimizer_step(self, model: Model) -> None:
        if not len(self) or not model.training:
            return
        params = [p for p in trainable(model).values() if p.grad is not None]
        if not params:
            return
        pick = self.draw(self.batch_size or len(self))
        device = params[0].device
        x, y = self.images[pick].to(device), self.labels[pick].to(device)
        with torch.enable_grad():  # the optimizer step Lightning calls this from runs without grad
            reference = torch.autograd.grad(F.cross_entropy(model.scenario_logits(model(x), y), y), params,
                                            allow_unused=True)
        g = torch.cat([p.grad.flatten() for p in params])
        g_ref = torch.cat([torch.zeros_like(p).flatten() if r is None else r.flatten()
                           for p, r in zip(params, reference)])
        dot, ref_square = torch.dot(g, g_ref), torch.dot(g_ref, g_ref)
        if dot < 0 and ref_square > 0:  # a memory loss saturated to a vanishing gradient leaves g as it is
            g = g - dot / ref_square * g_ref
            for p, new in zip(params, g.split([p.numel() for p in params])):
                p.grad.copy_(new.view_as(p.grad))
