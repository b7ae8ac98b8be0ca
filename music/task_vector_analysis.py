"""How a set of task vectors relate: the quantities merging methods are designed around.

- cosine similarity of the whole flattened vectors (Ilharco et al. 2023: vectors of different
  tasks are close to orthogonal, which is why adding them interferes little);
- sign conflicts per layer (Yadav et al. 2023, TIES-merging: entries where the tasks pull a
  weight in opposite directions, which averaging cancels);
- L2 norm per layer and vector (which layers a fine-tune moved, and how much);
- effective rank per 2-D layer (Roy & Vetterli 2007, exp of the Shannon entropy of the
  singular values normalised to sum 1; Gargiulo et al. 2025, TSV-Merge, use that task matrices
  are low-rank).

Everything is computed in float64 from the vectors' tensors, key by key, so no flattened copy
of a whole model is held.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from music.merging.checks import TaskVectorError, check_keys
from music.plots import pyplot, save_figure
from music.task_vector import TaskVector


def _checked(vectors: Sequence[TaskVector]) -> list[str]:
    """The keys every vector shares (same keys and shapes required, as for adding them)."""
    if not vectors or not all(isinstance(v, TaskVector) for v in vectors):
        raise TaskVectorError("the analysis needs a non-empty sequence of TaskVectors")
    shapes = [{k: tuple(t.shape) for k, t in v.tensors.items()} for v in vectors]
    for i, other in enumerate(shapes[1:], 1):
        check_keys(shapes[0], other, "vector 0", f"vector {i}")
    return list(vectors[0].tensors)


def _rows(vectors: Sequence[TaskVector], key: str) -> Tensor:
    """One layer of every vector as the rows of a (vectors x entries) float64 matrix."""
    return torch.stack([v.tensors[key].detach().to(torch.float64).flatten() for v in vectors])


def cosine_matrix(vectors: Sequence[TaskVector]) -> np.ndarray:
    """Cosine similarity of every pair of whole vectors, flattened over all keys; NaN in the
    row and column of a zero vector (its direction is undefined)."""
    gram = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for key in _checked(vectors):
        rows = _rows(vectors, key)
        gram += rows @ rows.T
    norms = gram.diagonal().sqrt()
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (gram / torch.outer(norms, norms)).numpy()
    cosine[(norms == 0).numpy(), :] = math.nan
    cosine[:, (norms == 0).numpy()] = math.nan
    return np.clip(cosine, -1.0, 1.0)


def sign_conflict_rates(vectors: Sequence[TaskVector]) -> dict[str, float]:
    """Per key: the share of its entries, among those where at least two vectors are nonzero,
    whose nonzero values disagree in sign (TIES-merging's conflicts); NaN where no entry has two
    nonzero values (e.g. a single vector)."""
    rates = {}
    for key in _checked(vectors):
        rows = _rows(vectors, key)
        positive, negative = (rows > 0).sum(0), (rows < 0).sum(0)
        eligible = (positive + negative) >= 2
        conflicts = (positive > 0) & (negative > 0)
        rates[key] = float(conflicts.sum()) / float(eligible.sum()) if eligible.any() else math.nan
    return rates


def layer_norms(vectors: Sequence[TaskVector]) -> dict[str, list[float]]:
    """Per key: the L2 norm of that layer of each vector."""
    return {key: [float(n) for n in torch.linalg.vector_norm(_rows(vectors, key), dim=1)] for key in _checked(vectors)}


def effective_rank(matrix: Tensor) -> float:
    """Roy & Vetterli's effective rank, exp(-sum p_k log p_k) with p_k = s_k / sum(s) over the
    singular values s: n for an n x n identity, 1 for a rank-1 matrix, between the two as the
    spectrum concentrates. NaN for a zero matrix (no spectrum to normalise)."""
    if matrix.dim() != 2:
        raise ValueError(f"effective_rank needs a 2-D matrix, got shape {tuple(matrix.shape)}.")
    singular = torch.linalg.svdvals(matrix.detach().to(torch.float64))
    total = float(singular.sum())
    if total == 0:
        return math.nan
    p = singular[singular > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def effective_ranks(vectors: Sequence[TaskVector]) -> dict[str, list[float]]:
    """Per 2-D key (a linear layer's weight): the effective rank of each vector's update of it."""
    return {key: [effective_rank(v.tensors[key]) for v in vectors]
            for key in _checked(vectors) if vectors[0].tensors[key].dim() == 2}


@dataclass(frozen=True)
class VectorAnalysis:
    """The analysis of named task vectors: ``cosine`` (vectors x vectors), ``norms`` (vectors x
    layers, in the order of ``layers``), ``sign_conflict`` (per layer), ``effective_rank``
    (per 2-D layer, one value per vector)."""

    names: tuple[str, ...]
    layers: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    cosine: np.ndarray
    norms: np.ndarray
    sign_conflict: np.ndarray
    effective_rank: Mapping[str, list[float]]


def analyse(vectors: Mapping[str, TaskVector]) -> VectorAnalysis:
    """Every quantity of this module for the named vectors."""
    names, values = list(vectors), list(vectors.values())
    layers = _checked(values)
    norms, conflicts = layer_norms(values), sign_conflict_rates(values)
    return VectorAnalysis(tuple(names), tuple(layers), tuple(tuple(values[0].tensors[k].shape) for k in layers),
                          cosine_matrix(values), np.array([norms[k] for k in layers]).T.reshape(len(values), len(layers)),
                          np.array([conflicts[k] for k in layers]), effective_ranks(values))


def plot_analysis(analysis: VectorAnalysis, path, dpi: int = 110) -> None:
    """The cosine heatmap, each layer's norm per vector, and each layer's sign-conflict rate."""
    plt = pyplot()
    names, layers = analysis.names, analysis.layers
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1, 1.4, 1]})
    image = axes[0].imshow(analysis.cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            if not math.isnan(analysis.cosine[i, j]):
                axes[0].text(j, i, f"{analysis.cosine[i, j]:.2f}", ha="center", va="center", fontsize=8,
                             color="white" if abs(analysis.cosine[i, j]) > 0.6 else "black")
    axes[0].set(title="cosine similarity (whole vectors)", xticks=range(len(names)), yticks=range(len(names)))
    axes[0].set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axes[0].set_yticklabels(names, fontsize=8)
    fig.colorbar(image, ax=axes[0], fraction=0.046)
    x = np.arange(len(layers))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        axes[1].bar(x + (i - (len(names) - 1) / 2) * width, analysis.norms[i], width, label=name)
    axes[1].set(title="L2 norm per layer", xticks=x, ylabel="‖τ‖ of the layer")
    axes[1].set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    axes[1].legend(fontsize=7)
    axes[2].bar(x, np.nan_to_num(analysis.sign_conflict), color="tab:red")
    axes[2].set(title="sign conflicts per layer", xticks=x, ylim=(0, 1),
                ylabel="share of entries (≥ 2 nonzero) with opposite signs")
    axes[2].set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    for ax in axes[1:]:
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path, dpi)
