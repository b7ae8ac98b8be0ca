"""Merge methods: how the task vectors of one tensor become one update, as plug-ins.

A method is a class (subclass ``MergeMethod``) whose constructor arguments are its settings, so a
recipe names it by class path, exactly like a continual-learning method:
``method: {class_path: music.merging.TIES, init_args: {density: 0.2}}``. The merge calls
``merge`` once per edited key, in sorted key order, with that key's task vectors τ_i (computed
wide, float64 in ``music merge``) and the entries' weights w_i; the result is the update that λ
scales and adds to the base. A method that needs statistics over the whole model first (global
TIES trimming) sets ``observes`` and receives every key through ``observe`` before any ``merge``;
one that needs data statistics of each entry (Fisher, RegMean) names them in ``needs`` and
receives them through ``provide``. The methods of later papers sit beside this file, one per
family: ``spectral`` (TSV-M, Iso-C, Iso-CTS), ``masks`` (Consensus, Breadcrumbs), ``weighted``
(Fisher, RegMean).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Sequence
from functools import reduce
from typing import Any, Literal

import torch
from torch import Tensor

from music.merging.checks import TaskVectorError, fraction


def wide(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32: half-precision differences lose the small updates that matter."""
    return reduce(torch.promote_types, dtypes, torch.float32)


class MergeMethod:
    """Combines the task vectors of one tensor into one update.

    Subclasses implement ``merge``; ``base`` is the base model's tensor (None when vectors are
    merged without a model, ``music.task_vector.merge_vectors``). The per-entry order of ``task_vectors`` and ``weights`` is
    the recipe's (``models`` first, then ``vectors``). Settings given per entry (a list) are
    checked against the number of entries by ``check_entries``.
    """

    #: True when ``observe`` must see every key before the first ``merge`` (whole-model statistics;
    #: such a method cannot stream in one tensor's memory).
    observes: bool = False

    #: The data statistics each entry must bring (``music.merging.statistics``: ``fisher``,
    #: ``gram``); they arrive through ``provide`` before the first ``merge``.
    needs: frozenset[str] = frozenset()

    def provide(self, statistics: list[dict[str, Tensor]]) -> None:
        """One statistics dict per entry, in the entries' order (only when ``needs``)."""

    def reset(self) -> None:
        """Forget what ``observe`` gathered: a merge starts from here."""

    def observe(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> None:
        """First pass over every edited key (only when ``observes``)."""

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        raise NotImplementedError

    def check_entries(self, count: int) -> None:
        """Raise if a per-entry setting does not give one value per entry."""

    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}``: what a recipe says to build this method again."""
        args = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name != "self" and hasattr(self, name):
                value = getattr(self, name)
                args[name] = value.config() if isinstance(value, MergeMethod) else value
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def __repr__(self) -> str:
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self" and hasattr(self, n)]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


def _per_entry(value: float | Sequence[float], count: int, owner: str, name: str) -> list[float]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise TaskVectorError(f"{owner} {name}={list(value)} gives {len(value)} values for {count} entries: "
                                  "give one number, or one per entry.")
        return [float(v) for v in value]
    return [float(value)] * count


def _fractions(value: float | Sequence[float], owner: str, name: str, *, low_open: bool) -> None:
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    for v in values:
        fraction(f"{owner} {name}", v, low_open=low_open)


class TaskArithmetic(MergeMethod):
    """Σ w_i τ_i (Ilharco et al., *Editing Models with Task Arithmetic*)."""

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        if len(task_vectors) == 1 and weights[0] == 1.0:
            return task_vectors[0]  # no pass over memory for the plain apply of one vector
        weighted = [t * w for t, w in zip(task_vectors, weights)]
        return sum(weighted[1:], weighted[0])


def kth_largest_abs(values: Sequence[Tensor], density: float) -> Tensor:
    """The magnitude of the ceil(density · n)-th largest entry: keeping ``|t| >= it`` keeps at
    least that share (ties with it are all kept)."""
    flat = torch.cat([t.abs().flatten() for t in values])
    if not flat.numel():
        return flat.new_zeros(())
    k = min(flat.numel(), max(1, math.ceil(round(density * flat.numel(), 9))))
    return flat.kthvalue(flat.numel() - k + 1).values


class TIES(MergeMethod):
    """TIES-merging (Yadav et al., NeurIPS 2023) of the w_i τ_i: trim, elect sign, disjoint mean.

    Each weighted vector keeps its ceil(density · n) largest magnitudes (ties with the k-th are
    all kept); each coordinate's sign is that of the sum of trimmed values; the result is the
    mean over vectors whose trimmed value is nonzero with that sign. Where the trimmed values
    sum to exactly 0 the result is 0 (the reference code takes the model-wide majority sign).

    Args:
        density: the share of each vector's largest-magnitude entries kept, in (0, 1]; one
            number, or one per entry (``models`` first, then ``vectors``).
        scope: ``global`` trims each vector over the whole model, as the paper's code does (so
            tensors with small updates, biases and norms, can be zeroed entirely; this needs
            every tensor before the first is merged, so it cannot stream); ``per_tensor`` keeps
            ``density`` of every tensor, as libraries that merge tensor by tensor do. The two
            give different merges at the same density.
    """

    def __init__(self, density: float | list[float] = 0.2, scope: Literal["global", "per_tensor"] = "global") -> None:
        _fractions(density, "TIES", "density", low_open=True)
        if scope not in ("global", "per_tensor"):
            raise TaskVectorError(f"TIES scope={scope!r} is not allowed: choose 'global' or 'per_tensor'.")
        self.density, self.scope = density, scope
        self._magnitudes: list[list[Tensor]] = []
        self._cuts: list[Tensor | None] | None = None

    @property
    def observes(self) -> bool:
        densities = self.density if isinstance(self.density, Sequence) else [self.density]
        return self.scope == "global" and any(d < 1 for d in densities)

    def check_entries(self, count: int) -> None:
        _per_entry(self.density, count, "TIES", "density")

    def reset(self) -> None:
        self._magnitudes, self._cuts = [], None

    def observe(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> None:
        if not self._magnitudes:
            self._magnitudes = [[] for _ in task_vectors]
        for seen, t, w in zip(self._magnitudes, self._weighted(task_vectors, weights), weights):
            seen.append(t.abs().flatten())

    def _weighted(self, task_vectors: list[Tensor], weights: list[float]) -> list[Tensor]:
        dtype = wide(*(t.dtype for t in task_vectors))
        return [(t * w).to(dtype) for t, w in zip(task_vectors, weights)]

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        densities = _per_entry(self.density, len(task_vectors), "TIES", "density")
        if self.observes and self._cuts is None:
            if len(self._magnitudes) != len(task_vectors):
                raise RuntimeError("TIES with scope 'global' merged a key before observing the model")
            self._cuts = [kth_largest_abs(m, d) if d < 1 else None for m, d in zip(self._magnitudes, densities)]
            self._magnitudes = []
        trimmed = []
        for i, (t, d) in enumerate(zip(self._weighted(task_vectors, weights), densities)):
            if d == 1:  # nothing trimmed; saves the k-th value search
                trimmed.append(t)
                continue
            cut = self._cuts[i] if self.scope == "global" else kth_largest_abs([t], d)
            trimmed.append(torch.where(t.abs() >= cut, t, 0))
        stacked = torch.stack(trimmed)
        agree = torch.sign(stacked) == torch.sign(stacked.sum(0))  # zeros agree only with 0
        return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare_mask(key: str, shape: Sequence[int], drop_rate: float, seed: int) -> Tensor:
    """Which entries DARE keeps: a CPU generator seeded by sha256(f"{seed}:{key}"), so the mask
    depends only on (seed, key, shape), not on dict order, device or the other keys."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(tuple(shape), generator=gen) >= drop_rate


class DARE(MergeMethod):
    """DARE (Yu et al., ICML 2024): drop each entry of τ_i with probability p, rescale the
    survivors by 1/(1 − p), then combine the sparsified vectors with another method.

    Args:
        drop_rate: p, in [0, 1); one number, or one per entry.
        seed: entry i's masks come from ``seed + i`` and the tensor's key.
        combine: the method applied to the sparsified vectors: ``TaskArithmetic`` (DARE-linear)
            or ``TIES`` (DARE-TIES; density 1 is usual, as DARE has already sparsified).
    """

    def __init__(self, drop_rate: float | list[float] = 0.5, seed: int = 0,
                 combine: MergeMethod = TaskArithmetic()) -> None:
        _fractions(drop_rate, "DARE", "drop_rate", low_open=False)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TaskVectorError(f"DARE seed={seed!r} is not allowed: it must be an integer.")
        self.drop_rate, self.seed = drop_rate, seed
        self.combine = combine  # the shared default is stateless

    @property
    def observes(self) -> bool:
        return self.combine.observes

    def check_entries(self, count: int) -> None:
        _per_entry(self.drop_rate, count, "DARE", "drop_rate")
        self.combine.check_entries(count)

    def reset(self) -> None:
        self.combine.reset()

    def sparsify(self, key: str, task_vectors: list[Tensor]) -> list[Tensor]:
        rates = _per_entry(self.drop_rate, len(task_vectors), "DARE", "drop_rate")
        return [torch.where(dare_mask(key, t.shape, p, self.seed + i).to(t.device), t / (1 - p), 0)
                for i, (t, p) in enumerate(zip(task_vectors, rates))]

    def observe(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> None:
        self.combine.observe(key, base, self.sparsify(key, task_vectors), weights)

    def merge(self, key: str, base: Tensor | None, task_vectors: list[Tensor], weights: list[float]) -> Tensor:
        return self.combine.merge(key, base, self.sparsify(key, task_vectors), weights)
