"""Sequential merging: task vectors absorbed one at a time, in a given order, so that a merge
has the shape of a sequential fine-tuning run (one model after each absorbed task).

The definition is that of continual model merging as MagMax (Marczak et al., ECCV 2024)
evaluates it with independently fine-tuned models: after the k-th task arrives, the model is
the base plus the method's merge of every task vector seen so far,

    θ_k = θ_0 + λ_k · merge(τ_{order[1]}, …, τ_{order[k]}),

with the same method at every step. For task arithmetic this is θ_k = θ_{k−1} + λ·τ_{order[k]}
(at one λ); for methods that combine several vectors (TIES' sign election, DARE's rescaled
drops, and any ``MergeMethod``) it is the merge of the first k vectors, not a merge of the
previous merge with the new vector, so the last step equals the all-at-once merge of every
task and each step stays one call of the method on task vectors of the same base. Each step
is one ``Merger`` over the engine's key-by-key loop; λ_k is the caller's (e.g. chosen on a
validation split per step).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from music.merging.engine import Entry, Merger
from music.merging.methods import MergeMethod


@dataclass
class Step:
    """The k-th step of a sequential merge: the entries absorbed so far, in order, and the open
    ``Merger`` of them with its update computed once, so ``state(λ)`` is cheap at many λ."""

    absorbed: tuple[Entry, ...]
    merger: Merger
    updates: dict[str, Tensor]

    def state(self, coef: float) -> dict[str, Tensor]:
        """θ_0 + coef · merge(τ_1..τ_k), in memory."""
        return self.merger.state(coef, self.updates)


def sequential_merge(base: Path, entries: Sequence[Entry], method: MergeMethod, order: Sequence[int] | None = None,
                     statistics: Sequence[dict[str, Tensor]] | None = None, **merger_args: Any) -> Iterator[Step]:
    """One ``Step`` per absorbed entry, in ``order`` (indices into ``entries``; None: as given).
    A step's ``Merger`` is closed when the next step is drawn; ``merger_args`` go to every
    ``Merger`` (``readers`` opened once serve every step). ``statistics``: one dict per entry,
    for a method that ``needs`` data statistics; each step gives it those of the entries it
    absorbs."""
    order = list(range(len(entries))) if order is None else list(order)
    if sorted(order) != list(range(len(entries))):
        raise ValueError(f"order={order} is not a permutation of the {len(entries)} entries' indices.")
    readers: Mapping | None = merger_args.pop("readers", None)
    for k in range(1, len(order) + 1):
        absorbed = tuple(entries[i] for i in order[:k])
        if method.needs:
            if statistics is None or len(statistics) != len(entries):
                raise ValueError(f"{type(method).__name__} needs statistics of each of the {len(entries)} entries.")
            method.provide([statistics[i] for i in order[:k]])
        with Merger(base, absorbed, method, readers=readers, **merger_args) as merger:
            yield Step(absorbed, merger, merger.updates())
