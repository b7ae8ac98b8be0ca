"""Merges that mask entries of the task vectors before or after combining them: Consensus
(TALL masks) and Model Breadcrumbs. Both act entry by entry within a tensor, so they merge
key by key like task arithmetic (Consensus over global TIES observes the model first, as
TIES does)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from music.merging.checks import TaskVectorError, finite, fraction
from music.merging.methods import MergeMethod, TaskArithmetic, _per_entry
from music.merging.spectral import weighted


def tall_masks(task_vectors: list[Tensor], multi_task: Tensor, lambdas: Sequence[float]) -> list[Tensor]:
    """Task t's TALL mask m_t = |τ_t| ≥ λ_t · |τ_MTL − τ_t|: the entries where the multi-task
    vector stays closer to task t's fine-tuned weights than the base is, i.e. where the merge
    keeps what task t needs."""
    return [t.abs() >= lam * (multi_task - t).abs() for t, lam in zip(task_vectors, lambdas)]


def consensus_mask(masks: list[Tensor], min_tasks: int) -> Tensor:
    """The entries at least ``min_tasks`` of the TALL masks mark."""
    return torch.stack(masks).sum(0) >= min_tasks


class Consensus(MergeMethod):
    """Consensus merging with TALL masks (Wang et al., *Localizing Task Information for
    Improved Model Merging and Compression*, ICML 2024).

    The multi-task vector τ_MTL (``combine`` of the w_i τ_i) keeps only the entries that at
    least ``min_tasks`` tasks' TALL masks mark (``tall_masks``): entries no task needs
    (catastrophic) or only one task needs (selfish, with the default 2) are dropped.

    Args:
        min_tasks: k, the number of tasks that must mark an entry for it to be kept (≥ 0;
            0 keeps everything, i.e. ``combine`` alone). With fewer entries than k (the first
            steps of a sequential merge) an entry is kept when every task marks it.
        mask_lambda: λ_t of the masks, > 0; one number or one per entry (the paper picks
            each in [0.2, 0.6] on validation data; 0.4 as FusionBench's default).
        combine: how τ_MTL is formed: ``TaskArithmetic`` (the sum) or ``TIES``.
    """

    def __init__(self, min_tasks: int = 2, mask_lambda: float | list[float] = 0.4,
                 combine: MergeMethod = TaskArithmetic()) -> None:
        if isinstance(min_tasks, bool) or not isinstance(min_tasks, int) or min_tasks < 0:
            raise TaskVectorError(f"Consensus min_tasks={min_tasks!r} is not allowed: it must be an integer >= 0.")
        lambdas = mask_lambda if isinstance(mask_lambda, Sequence) and not isinstance(mask_lambda, str) else [mask_lambda]
        for value in lambdas:
            if finite("Consensus mask_lambda", value) <= 0:
                raise TaskVectorError(f"Consensus mask_lambda={value!r} is not allowed: it must be > 0.")
        if not isinstance(combine, MergeMethod) or combine.needs:
            raise TaskVectorError(f"Consensus combine={combine!r} is not allowed: give a MergeMethod that needs no "
                                  "statistics, e.g. TaskArithmetic or TIES.")
        self.min_tasks, self.mask_lambda, self.combine = min_tasks, mask_lambda, combine

    @property
    def observes(self) -> bool:
        return self.combine.observes

    def check_entries(self, count: int) -> None:
        _per_entry(self.mask_lambda, count, "Consensus", "mask_lambda")
        self.combine.check_entries(count)

    def reset(self) -> None:
        self.combine.reset()

    def observe(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> None:
        self.combine.observe(key, base, task_vectors, weights)

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        multi = self.combine.merge(key, base, task_vectors, weights)
        lambdas = _per_entry(self.mask_lambda, len(task_vectors), "Consensus", "mask_lambda")
        keep = consensus_mask(tall_masks(weighted(task_vectors, weights), multi, lambdas),
                              min(self.min_tasks, len(task_vectors)))
        return torch.where(keep, multi, 0)


def breadcrumbs_mask(t: Tensor, beta: float, gamma: float) -> Tensor:
    """Which entries of ``t`` survive: all but its round(β·n) largest and round(γ·n) smallest
    magnitudes (ties broken by position, so exactly those counts are dropped)."""
    n = t.numel()
    top, bottom = math.floor(beta * n + 0.5), math.floor(gamma * n + 0.5)
    rank = torch.empty(n, dtype=torch.long, device=t.device)
    rank[torch.argsort(t.abs().flatten(), stable=True)] = torch.arange(n, device=t.device)
    return ((rank >= bottom) & (rank < n - top)).reshape(t.shape)


class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): each τ_i, tensor by tensor, loses its
    largest-magnitude entries (outliers, share β) and its smallest (negligible perturbations,
    share γ); the masked vectors are then added, Σ w_i (m_i ⊙ τ_i).

    Args:
        beta: the share of each tensor's largest magnitudes masked, in [0, 1) (0.01 drops the
            top 1 %).
        gamma: the share of each tensor's smallest magnitudes masked, in [0, 1); β + γ < 1.
    """

    def __init__(self, beta: float = 0.01, gamma: float = 0.85) -> None:
        fraction("Breadcrumbs beta", beta, low_open=False)
        fraction("Breadcrumbs gamma", gamma, low_open=False)
        if beta + gamma >= 1:
            raise TaskVectorError(f"Breadcrumbs beta={beta!r} with gamma={gamma!r} is not allowed: beta + gamma must "
                                  "be < 1, or every entry is masked.")
        self.beta, self.gamma = beta, gamma

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        masked = [torch.where(breadcrumbs_mask(t, self.beta, self.gamma), t * w, 0)
                  for t, w in zip(task_vectors, weights)]
        return sum(masked[1:], masked[0])
