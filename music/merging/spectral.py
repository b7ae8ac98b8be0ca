"""Merges in the singular-vector bases of each layer's update: TSV-M, Iso-C, Iso-CTS.

Task arithmetic's sum of layer updates is dominated by a few singular directions that the
tasks share, and tasks interfere where their singular directions overlap. These methods act on
each 2-D tensor (a linear layer's weight) through SVDs; every other tensor (biases, norms) is
the mean of the weighted task vectors, as the papers' code does. The weights w_i scale each
τ_i before anything else; λ scales the result, as for every method.
"""

from __future__ import annotations

import torch
from torch import Tensor

from music.merging.checks import fraction
from music.merging.methods import MergeMethod


def weighted(task_vectors: list[Tensor], weights: list[float]) -> list[Tensor]:
    return [t * w for t, w in zip(task_vectors, weights)]


def mean(tensors: list[Tensor]) -> Tensor:
    return sum(tensors[1:], tensors[0]) / len(tensors)


def polar(matrix: Tensor) -> Tensor:
    """The matrix with orthonormal columns (or rows, if wide) nearest to ``matrix``: P Qᵀ from
    its SVD P Σ Qᵀ. It whitens the concatenated bases of several tasks, so their subspaces no
    longer overlap, while moving each basis vector as little as possible."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_factors(matrices: list[Tensor], rank_fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """TSV-M's U⊥, Σ and V⊥ᵀ of one layer: each task's top ``max(1, floor(rank_fraction · r))``
    singular triplets (r = min of the layer's shape), concatenated across tasks, U and Vᵀ
    orthogonalised (``polar``); the singular values are the tasks' own. U⊥'s columns (and V⊥ᵀ's
    rows) are orthonormal when the tasks' ranks sum to at most r, which ``rank_fraction`` ≤ 1/T
    guarantees."""
    r = min(matrices[0].shape)
    keep = max(1, int(r * rank_fraction))
    us, ss, vhs = [], [], []
    for m in matrices:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    return polar(torch.cat(us, 1)), torch.cat(ss), polar(torch.cat(vhs, 0))


class TSVM(MergeMethod):
    """TSV-M, Task Singular Vectors: Merging (Gargiulo et al., CVPR 2025).

    Per 2-D tensor: the SVD of each w_i τ_i, its top singular components kept (the task's
    low-rank approximation), the kept U's and V's of all tasks concatenated and orthogonalised
    (so no two tasks' directions interfere), and the layer rebuilt as U⊥ Σ V⊥ᵀ from the tasks'
    singular values. Other tensors: the mean of the w_i τ_i.

    Args:
        rank_fraction: the share of each task's singular components kept, in (0, 1]; null:
            1/T for T entries, the paper's choice, which fills the layer's rank exactly.
    """

    def __init__(self, rank_fraction: float | None = None) -> None:
        if rank_fraction is not None:
            fraction("TSVM rank_fraction", rank_fraction, low_open=True)
        self.rank_fraction = rank_fraction

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        taus = weighted(task_vectors, weights)
        if taus[0].ndim != 2:
            return mean(taus)
        u, s, vh = tsv_factors(taus, self.rank_fraction or 1 / len(taus))
        return (u * s) @ vh


class IsoC(MergeMethod):
    """Iso-C, isotropic merging in the common subspace (Marczak et al., *No Task Left Behind*,
    ICML 2025).

    Per 2-D tensor: the SVD U Σ Vᵀ of the task-arithmetic sum Σ w_i τ_i, its singular values
    replaced by their mean σ̄ (a flat spectrum: the directions that few tasks use count as much
    as the dominant shared ones), giving σ̄ U Vᵀ; λ is the paper's scaling α. Other tensors:
    the mean of the w_i τ_i.
    """

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        taus = weighted(task_vectors, weights)
        if taus[0].ndim != 2:
            return mean(taus)
        u, s, vh = torch.linalg.svd(sum(taus[1:], taus[0]), full_matrices=False)
        return s.mean() * (u @ vh)


def iso_cts_factors(matrices: list[Tensor], common_fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """Iso-CTS's orthonormal U, flat spectrum and Vᵀ of one layer.

    The common subspace: the top k singular directions of the sum, k = r − T·round((r − ⌊f·r⌋)/T)
    (so the remaining r − k split evenly among the T tasks). Each task's residual outside it,
    (I − U_k U_kᵀ) τ_i, gives its top (r − k)/T directions; all are concatenated with the common
    ones, orthogonalised (``polar``) and given the mean of their singular values."""
    r = min(matrices[0].shape)
    tasks = len(matrices)
    specific = min(round((r - int(r * common_fraction)) / tasks), r // tasks) * tasks  # never beyond the rank
    common = r - specific
    per_task = specific // tasks
    u, s, vh = torch.linalg.svd(sum(matrices[1:], matrices[0]), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for m in matrices:
        residual = m - us[0] @ (us[0].T @ m)
        ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    spectrum = torch.cat(ss)
    return polar(torch.cat(us, 1)), torch.full_like(spectrum, spectrum.mean()), polar(torch.cat(vhs, 0))


class IsoCTS(MergeMethod):
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al.,
    ICML 2025).

    Per 2-D tensor: the top singular directions of the task-arithmetic sum (the common
    subspace) completed by each task's top directions outside it (so a task the sum drowns out
    keeps its own), orthogonalised, with a flat spectrum at the mean of the kept singular
    values (``iso_cts_factors``). Other tensors: the mean of the w_i τ_i.

    Args:
        common_fraction: the share f of the layer's rank given to the common subspace, in
            (0, 1] (the paper's default 0.8); the rest is split evenly among the tasks.
    """

    def __init__(self, common_fraction: float = 0.8) -> None:
        fraction("IsoCTS common_fraction", common_fraction, low_open=True)
        self.common_fraction = common_fraction

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        taus = weighted(task_vectors, weights)
        if taus[0].ndim != 2:
            return mean(taus)
        u, s, vh = iso_cts_factors(taus, self.common_fraction)
        return (u * s) @ vh

