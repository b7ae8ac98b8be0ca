"""Merges weighted by data statistics of each fine-tuned model: Fisher merging and RegMean.

Each entry brings a statistics file (``music.merging.statistics``; a recipe's ``statistics``
field), given to the method through ``provide`` before the merge. Both are weighted means of
the models, written as an update over the base: the mean of θ_i under weights that sum to one
minus θ_0 is the same mean of the τ_i. The entries' weights w_i scale each model's statistics
(the paper's model coefficients), so they must be positive; λ = 1 gives the paper's merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from music.merging.checks import TaskVectorError, finite
from music.merging.methods import MergeMethod
from music.merging.statistics import of_kind


def positive(owner: str, weights: list[float]) -> None:
    if bad := [w for w in weights if w <= 0]:
        raise TaskVectorError(f"{owner} weights {bad} are not allowed: each weights its model's statistics, so "
                              "every weight must be > 0 (negation is task arithmetic's).")


def weighted_mean(task_vectors: list[Tensor], weights: list[float]) -> Tensor:
    total = sum(t * w for t, w in zip(task_vectors, weights))
    return total / sum(weights)


class _StatisticsMethod(MergeMethod):
    kind = ""

    def __init__(self) -> None:
        self._statistics: list[dict[str, Tensor]] | None = None

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({self.kind})

    def provide(self, statistics: list[dict[str, Tensor]]) -> None:
        self._statistics = [of_kind(s, self.kind) for s in statistics]
        if empty := [i for i, s in enumerate(self._statistics) if not s]:
            raise TaskVectorError(f"{type(self).__name__} needs '{self.kind}' statistics, but entries {empty} hold "
                                  f"none: compute them with music.merging.statistics (kinds {{'{self.kind}'}}).")

    def statistics(self, key: str, count: int) -> list[Tensor] | None:
        """Each entry's statistics of ``key``, or None when no entry has any (e.g. a buffer)."""
        if self._statistics is None:
            raise TaskVectorError(f"{type(self).__name__} needs each entry's '{self.kind}' statistics: give every "
                                  "recipe entry a `statistics` file (or call provide() first).")
        if len(self._statistics) != count:
            raise TaskVectorError(f"{type(self).__name__} was given statistics for {len(self._statistics)} entries "
                                  f"but merges {count}.")
        found = [s.get(key) for s in self._statistics]
        if all(f is None for f in found):
            return None
        if missing := [i for i, f in enumerate(found) if f is None]:
            raise TaskVectorError(f"{type(self).__name__}: entries {missing} have no '{self.kind}' statistics for "
                                  f"{key!r} while others do: compute every entry's on the same network.")
        return found


class Fisher(_StatisticsMethod):
    """Fisher merging (Matena & Raffel, *Merging Models with Fisher-Weighted Averaging*,
    NeurIPS 2022): per parameter, Σ_i w_i F_i τ_i / Σ_i w_i F_i with each model's diagonal
    Fisher F_i (``statistics`` kind ``fisher``), i.e. the Fisher-weighted mean of the models.
    Tensors without Fishers (buffers) get the weighted mean of the τ_i.

    Args:
        floor: every Fisher value below it is raised to it (> 0): parameters no model's data
            moves get the plain mean instead of 0/0.
    """

    kind = "fisher"

    def __init__(self, floor: float = 1e-6) -> None:
        super().__init__()
        if finite("Fisher floor", floor) <= 0:
            raise TaskVectorError(f"Fisher floor={floor!r} is not allowed: it must be > 0.")
        self.floor = floor

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        positive("Fisher", weights)
        fishers = self.statistics(key, len(task_vectors))
        if fishers is None:
            return weighted_mean(task_vectors, weights)
        scaled = []
        for i, (f, t, w) in enumerate(zip(fishers, task_vectors, weights)):
            if f.shape != t.shape:
                raise TaskVectorError(f"Fisher: entry {i}'s Fisher of {key!r} has shape {tuple(f.shape)}, the tensor "
                                      f"{tuple(t.shape)}.")
            scaled.append(w * f.to(t.device, t.dtype).clamp(min=self.floor))
        return sum(s * t for s, t in zip(scaled, task_vectors)) / sum(scaled)


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G with its off-diagonal entries times α (the diagonal kept): RegMean's shrinkage toward
    the diagonal, between α = 0 (each input on its own: a variance-weighted mean) and α = 1."""
    scale = torch.full_like(gram, alpha)
    scale.diagonal().fill_(1.0)
    return gram * scale


class RegMean(_StatisticsMethod):
    """RegMean (Jin et al., *Dataless Knowledge Fusion by Merging Weights of Language Models*,
    ICLR 2023): each linear layer's merged weight solves the regression that matches every
    model's outputs on its own inputs, W = (Σ_i w_i W_i G_i)(Σ_i w_i G_i)⁻¹ with G_i the Gram
    matrix XᵀX of the layer's inputs (``statistics`` kind ``gram``; W is ``nn.Linear``'s
    (out, in) weight, so G multiplies on the right). Other tensors (biases, norms) get the
    weighted mean of the τ_i. Inputs that are zero in every model's data (e.g. MNIST's border
    pixels) constrain nothing; their columns get the weighted mean too.

    Args:
        alpha: the scale of the Grams' off-diagonal entries, in [0, 1] (``reduce_off_diagonal``);
            0.9 here, FusionBench's shipped configs use 0.6.
    """

    kind = "gram"

    def __init__(self, alpha: float = 0.9) -> None:
        super().__init__()
        if not 0 <= finite("RegMean alpha", alpha) <= 1:
            raise TaskVectorError(f"RegMean alpha={alpha!r} is not allowed: it must be in [0, 1].")
        self.alpha = alpha

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        positive("RegMean", weights)
        grams = self.statistics(key, len(task_vectors))
        if grams is None or task_vectors[0].ndim != 2:
            return weighted_mean(task_vectors, weights)
        inputs = task_vectors[0].shape[1]
        if bad := [i for i, g in enumerate(grams) if tuple(g.shape) != (inputs, inputs)]:
            raise TaskVectorError(f"RegMean: the Gram matrices of {key!r} of entries {bad} are not {inputs}x{inputs} "
                                  "(the layer's inputs).")
        t0 = task_vectors[0]
        grams = [w * reduce_off_diagonal(g.to(t0.device, t0.dtype), self.alpha) for g, w in zip(grams, weights)]
        total = sum(grams)
        numerator = sum(t @ g for t, g in zip(task_vectors, grams))
        dead = total.diagonal() == 0  # a zero diagonal entry of a sum of PSD matrices: a zero row and column
        if dead.any():
            total = total.clone()
            total[dead, dead] = 1.0
            numerator[:, dead] = weighted_mean([t[:, dead] for t in task_vectors], weights)
        try:
            return torch.linalg.solve(total, numerator.T).T  # total is symmetric: X total = numerator
        except torch.linalg.LinAlgError:  # collinear inputs: the least-norm solution
            return numerator @ torch.linalg.pinv(total, hermitian=True)
