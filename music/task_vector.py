"""Task arithmetic over state_dicts (Ilharco et al., "Editing Models with Task Arithmetic").

tau = theta_finetuned - theta_pretrained. Vectors are immutable and applying one returns a new
state_dict, so an experiment cannot corrupt the weights it started from. Files are read only
through ``load_state_dict`` (never runs pickled code) or safetensors. Combining vectors with
TIES or DARE is ``merge_vectors`` with a method of ``music.merging``; applying a saved vector
to a model on disk is ``apply_safetensors``, the merge engine's streaming loop.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Collection, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from music.checkpoint import load_state_dict
from music.merging.checks import TaskVectorError, check_keys, finite, listing
from music.merging.engine import Entry, Merger, apply_update
from music.merging.io import SafetensorsReader, fingerprint
from music.merging.methods import MergeMethod, TaskArithmetic, wide

StateDict = Mapping[str, Tensor]
PathLike = str | os.PathLike


class BaseMismatchWarning(UserWarning):
    """A vector was applied to weights other than its base: allowed (transfer), but noticed."""


@dataclass(frozen=True)
class ApplyReport:
    """What ``apply_to`` did, so a silent partial application is impossible to miss."""

    applied: tuple[str, ...]
    skipped: tuple[str, ...]  # in the target but not in the vector; copied unchanged
    cast: tuple[str, ...]  # target dtype differed from the vector's; computed wider, cast back
    base_matches: bool | None  # None when the vector does not know its base (mixed-base sum)


def _shapes(state: StateDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _same_layout(a: TaskVector, b: TaskVector, a_name: str = "left vector",
                 b_name: str = "right vector") -> None:
    check_keys(_shapes(a.tensors), _shapes(b.tensors), a_name, b_name)


def _check_base(expected: str | None, actual: str) -> bool | None:
    if expected is None:
        return None
    if expected != actual:
        warnings.warn(f"task vector applied to weights other than its base (fingerprint "
                      f"{actual[:12]} != {expected[:12]}); fine for transfer, else check the "
                      "checkpoint", BaseMismatchWarning, stacklevel=3)
    return expected == actual


@dataclass(frozen=True, eq=False)
class TaskVector:
    """tau = theta_ft - theta_pre over floating tensors; an immutable value.

    ``tensors`` is a read-only mapping (do not modify its tensors in place either).
    ``skipped`` maps keys left out to the reason; ``base_fingerprint`` identifies the
    pretrained weights; ``sources`` records where the weights came from (unary operations
    keep it, combinations drop it). Differences are stored in at least float32.
    """

    tensors: Mapping[str, Tensor]
    base_fingerprint: str | None = None
    skipped: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bad := sorted(k for k, t in self.tensors.items() if not t.is_floating_point()):
            raise TaskVectorError(f"task vectors hold floating tensors only; got {listing(bad)}")
        object.__setattr__(self, "tensors", MappingProxyType(dict(sorted(self.tensors.items()))))
        object.__setattr__(self, "skipped", MappingProxyType(dict(self.skipped)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    @classmethod
    def from_state_dicts(cls, pretrained: StateDict, finetuned: StateDict, *,
                         include_buffers: bool = True,
                         parameter_names: Collection[str] | None = None,
                         sources: Mapping[str, str] | None = None,
                         dtype: torch.dtype | None = None) -> TaskVector:
        """Vector from two state_dicts with identical keys and shapes.

        Buffer policy: a state_dict cannot tell parameters from buffers, so the default
        (``include_buffers=True``) covers every floating tensor, as the reference code does.
        For parameters only, pass ``include_buffers=False`` with ``parameter_names`` (or use
        ``from_modules``); asking for it without names is an error rather than a guess.
        Integer/bool tensors (e.g. ``num_batches_tracked``) are always skipped, listed in
        ``skipped``. ``dtype`` widens the differences further (float64 keeps
        ``pre + (ft - pre) == ft`` exact for float32 weights, which float32 arithmetic does not).
        """
        if not include_buffers and parameter_names is None:
            raise TaskVectorError("include_buffers=False needs parameter_names: a state_dict "
                                  "cannot tell parameters from buffers (or use from_modules)")
        check_keys(_shapes(pretrained), _shapes(finetuned), "pretrained", "finetuned")
        names = set(parameter_names) if parameter_names is not None else set(pretrained)
        if unknown := sorted(names - set(pretrained)):
            raise TaskVectorError(f"parameter_names not in the state_dict: {listing(unknown)}")
        tensors, skipped = {}, {}
        for key in sorted(pretrained):
            pre, ft = pretrained[key].detach(), finetuned[key].detach()
            if not (pre.is_floating_point() and ft.is_floating_point()):
                skipped[key] = f"non-floating dtype {pre.dtype}/{ft.dtype}"
            elif not include_buffers and key not in names:
                skipped[key] = "buffer (include_buffers=False)"
            else:
                dtype_ = wide(pre.dtype, ft.dtype, *([dtype] if dtype is not None else []))
                tensors[key] = ft.to(dtype_) - pre.to(dtype_)
        return cls(tensors, fingerprint(pretrained), skipped, sources or {})

    @classmethod
    def from_modules(cls, pretrained: nn.Module, finetuned: nn.Module, *,
                     include_buffers: bool = False) -> TaskVector:
        """Vector from two modules; parameters only by default.

        A module knows which tensors are learned. BatchNorm running statistics are not, and
        scaling their difference (e.g. negation, lambda < 0) can drive running_var negative,
        so buffers are opt-in here (and listed in ``skipped`` when left out).
        """
        names = {n for n, _ in pretrained.named_parameters(remove_duplicate=False)}
        return cls.from_state_dicts(pretrained.state_dict(), finetuned.state_dict(),
                                    include_buffers=include_buffers, parameter_names=names)

    @classmethod
    def from_checkpoints(cls, pretrained_path: PathLike, finetuned_path: PathLike, *,
                         include_buffers: bool = True,
                         parameter_names: Collection[str] | None = None) -> TaskVector:
        """Vector from two files (see ``load_state_dict``); same buffer policy as state_dicts."""
        return cls.from_state_dicts(
            load_state_dict(pretrained_path), load_state_dict(finetuned_path),
            include_buffers=include_buffers, parameter_names=parameter_names,
            sources={"pretrained": str(pretrained_path), "finetuned": str(finetuned_path)})

    def _map(self, fn) -> TaskVector:
        return TaskVector({k: fn(t) for k, t in self.tensors.items()}, self.base_fingerprint,
                          self.skipped, self.sources)

    def _combine(self, other: TaskVector, fn) -> TaskVector:
        _same_layout(self, other)
        base = self.base_fingerprint if self.base_fingerprint == other.base_fingerprint else None
        return TaskVector({k: fn(t, other.tensors[k]) for k, t in self.tensors.items()}, base,
                          {**self.skipped, **other.skipped})

    def __add__(self, other: object) -> TaskVector:
        return self._combine(other, torch.add) if isinstance(other, TaskVector) else NotImplemented

    def __radd__(self, other: object) -> TaskVector:
        """Only ``0 + tv`` (``sum``'s start value), so that ``sum(vectors)`` works."""
        return self if type(other) is int and other == 0 else NotImplemented

    def __sub__(self, other: object) -> TaskVector:
        return self._combine(other, torch.sub) if isinstance(other, TaskVector) else NotImplemented

    def __neg__(self) -> TaskVector:
        return self._map(torch.neg)

    def __mul__(self, scalar: object) -> TaskVector:
        if not isinstance(scalar, numbers.Real):
            return NotImplemented
        coef = finite("scalar", scalar)
        return self._map(lambda t: t * coef)

    __rmul__ = __mul__

    def norm(self) -> float:
        """Global L2 norm over all tensors (accumulated in float64)."""
        return math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
                             for t in self.tensors.values()))

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity of the flattened vectors; undefined (error) for a zero vector."""
        _same_layout(self, other)
        dot = sum(float(torch.sum(t.double() * other.tensors[k].double()))
                  for k, t in self.tensors.items())
        if (denom := self.norm() * other.norm()) == 0:
            raise TaskVectorError("cosine similarity is undefined for a zero task vector")
        return max(-1.0, min(1.0, dot / denom))

    def apply_to(self, target: StateDict | nn.Module, scaling_coef: float = 1.0, *,
                 report: bool = False) -> dict[str, Tensor] | tuple[dict[str, Tensor], ApplyReport]:
        """New state_dict theta + scaling_coef * tau; the target is never modified.

        Every vector key must be in the target with the same shape; extra target keys are
        copied unchanged (reported as skipped). Dtype and device of each target tensor are
        kept. A target that is not the vector's base works but warns (BaseMismatchWarning).
        """
        coef = finite("scaling_coef", scaling_coef)
        state = target.state_dict() if isinstance(target, nn.Module) else target
        check_keys(_shapes(self.tensors), _shapes(state), "task vector", "target",
                    allow_extra_b=True)
        out = {k: apply_update(v, self.tensors[k], coef, k) if k in self.tensors
               else v.detach().clone() for k, v in state.items()}
        result = ApplyReport(
            applied=tuple(self.tensors),
            skipped=tuple(sorted(set(state) - set(self.tensors))),
            cast=tuple(k for k, t in self.tensors.items() if state[k].dtype != t.dtype),
            base_matches=(_check_base(self.base_fingerprint, fingerprint(state))
                          if self.base_fingerprint is not None else None))  # hashing costs a pass
        return (out, result) if report else out

    def save(self, path: PathLike) -> None:
        """Safetensors file; metadata (sources, base fingerprint, skipped) as JSON strings."""
        meta = {"format": "pt", "sources": json.dumps(dict(self.sources)),
                "base_fingerprint": json.dumps(self.base_fingerprint),
                "skipped": json.dumps(dict(self.skipped))}
        save_file({k: t.detach().cpu().contiguous() for k, t in self.tensors.items()},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: PathLike) -> TaskVector:
        """Inverse of ``save``; a plain safetensors file loads with no metadata. Read by the
        merge's own reader, so a corrupt file fails the same way everywhere."""
        with SafetensorsReader(path) as reader:
            meta = reader.metadata
            tensors = {k: reader.tensor(k).clone() for k in reader.entries}
        return cls(tensors, json.loads(meta.get("base_fingerprint", "null")),
                   json.loads(meta.get("skipped", "{}")), json.loads(meta.get("sources", "{}")))


def merge_vectors(method: MergeMethod, vectors: Sequence[TaskVector],
                  weights: Sequence[float] | None = None) -> TaskVector:
    """``method``'s combination of ``vectors`` (weights default to 1), key by key, as a vector.

    The same per-tensor maths as ``music merge``: e.g. ``merge_vectors(TIES(density=0.2), vs)``
    is TIES-merging, ``merge_vectors(DARE(drop_rate=0.5), [v])`` is DARE of one vector. The base
    fingerprint is kept only when every vector shares it.
    """
    if not vectors or not all(isinstance(v, TaskVector) for v in vectors):
        raise TaskVectorError("merge_vectors needs a non-empty sequence of TaskVectors")
    weights = [finite(f"weights[{i}]", w) for i, w in enumerate(weights)] if weights is not None else [1.0] * len(vectors)
    if len(weights) != len(vectors):
        raise TaskVectorError(f"merge_vectors: {len(weights)} weights for {len(vectors)} vectors")
    for v in vectors[1:]:
        _same_layout(vectors[0], v, "first vector", "other vector")
    method.check_entries(len(vectors))
    method.reset()
    if method.observes:
        for key in vectors[0].tensors:
            method.observe(key, None, [v.tensors[key] for v in vectors], weights)
    merged = {key: method.merge(key, None, [v.tensors[key] for v in vectors], weights) for key in vectors[0].tensors}
    bases = {v.base_fingerprint for v in vectors}
    skipped = {k: r for v in vectors for k, r in v.skipped.items()}
    sources = vectors[0].sources if len(vectors) == 1 else {}
    return TaskVector(merged, bases.pop() if len(bases) == 1 else None, skipped, sources)


def apply_safetensors(base_path: PathLike, vector_path: PathLike, out_path: PathLike,
                      scaling_coef: float = 1.0, check_base: bool = True) -> ApplyReport:
    """Write base + scaling_coef * vector tensor by tensor, holding about one tensor at a time.

    The merge engine's loop (``music.merging.Merger``) with one saved vector: reads are mmap
    views, each output tensor is written from the one buffer the kernel computes it into, and
    the base's fingerprint is hashed on a second thread. Same kernel as ``apply_to``, so the
    result is bit-identical; the file appears only once complete (written aside, then renamed).
    The fingerprint (one sha256 stream over the base; docs/task_vectors.md) is the slowest
    part; ``check_base=False`` skips it when the base is known to be the vector's, and
    ``base_matches`` is then ``None``.
    """
    coef = finite("scaling_coef", scaling_coef)
    base = Path(base_path)
    with Merger(base, [Entry("task vector", Path(vector_path))], TaskArithmetic(), compute_dtype=None,
                hash_inputs=check_base) as merger:
        report = merger.write(Path(out_path), coef, merger.metadata)
        expected = merger.sources({})[0]["base_fingerprint"] if check_base else None
    return ApplyReport(applied=report.applied, skipped=report.skipped, cast=report.cast,
                       base_matches=_check_base(expected, report.fingerprints.get(base, "")))
