"""The one way a merge is computed: key by key over readers, whatever the inputs' format.

For every key of the base, in sorted order: read the base tensor and each entry's tensors,
form the entries' task vectors (a fine-tuned model minus its base, or a saved vector), let the
method combine them into one update, add λ times it to the base, cast, check it is finite,
write it, hash the inputs on a second thread, and let their pages go. A merge of files held in
memory, a streamed merge of models larger than RAM and ``apply_safetensors`` all run this loop,
so their outputs are byte-identical by construction.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from music.merging.checks import TaskVectorError, check_keys
from music.merging.io import HASH_LAG, Hasher, Reader, hashing_beside, open_reader, write_safetensors
from music.merging.methods import MergeMethod, wide


def _finite(t: Tensor) -> bool:
    """A sum is finite only if every entry is (inf and nan propagate), and it allocates
    nothing; only a sum that overflows needs the element-wise check (``isfinite`` allocated a
    mask per tensor and tripled the time of an in-memory apply)."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def apply_update(base: Tensor, update: Tensor, coef: float, key: str) -> Tensor:
    """θ + coef · update computed wide and cast back to the base's dtype; refused when the
    result is not finite (an overflowing λ must not become a model of inf weights)."""
    if not base.is_floating_point():
        raise TaskVectorError(f"target tensor {key!r} has non-floating dtype {base.dtype}")
    dtype = wide(base.dtype, update.dtype)
    try:
        out = torch.add(base.detach().to(dtype), update.to(base.device, dtype), alpha=coef).to(base.dtype)
    except RuntimeError as err:  # the coefficient itself overflows the computing dtype
        if "overflow" not in str(err):
            raise
        out = None
    if out is None or not _finite(out):
        raise TaskVectorError(f"coefficient {coef:g} makes {key!r} non-finite (inf or nan in {base.dtype}): "
                              "refused; choose a smaller coefficient or check the inputs.")
    return out


@dataclass(frozen=True)
class Entry:
    """One task vector of a merge: ``path`` minus ``base`` (a fine-tuned model), or ``path``
    alone when ``base`` is None (a saved vector), counted ``weight`` times."""

    name: str
    path: Path
    weight: float = 1.0
    base: Path | None = None


@dataclass(frozen=True)
class MergeReport:
    """What a merge wrote: so a silent partial application is impossible to miss."""

    applied: tuple[str, ...]
    skipped: tuple[str, ...]  # base keys copied unchanged (not in the vectors, or not selected)
    cast: tuple[str, ...]  # an input's or the output's dtype differs from the base's
    fingerprints: dict[Path, str] = field(default_factory=dict)  # every hashed input


def selected(key: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in include) and not any(fnmatch.fnmatchcase(key, p) for p in exclude)


class Merger:
    """The inputs of one merge, opened and checked; ``updates``, ``state`` and ``write`` run it.

    Args:
        base: the model edited.
        entries: the task vectors, in the method's order.
        method: how one key's task vectors become one update.
        include, exclude: glob patterns of the keys edited; the others are copied from the base.
        dtype: the output dtype of floating tensors (None: each base tensor's).
        compute_dtype: the task vectors' dtype (None: at least float32, as each input's).
        hash_inputs: fingerprint the base and every model (not saved vectors, which carry
            their base's fingerprint) while writing.
        readers: inputs already open, by path (e.g. a ``StateDictReader`` over a state_dict in
            memory); the caller closes them. Every other path is opened here.

    Every layout problem is found here, before anything is written.
    """

    def __init__(self, base: Path, entries: Sequence[Entry], method: MergeMethod, *, include: Sequence[str] = ("*",),
                 exclude: Sequence[str] = (), dtype: torch.dtype | None = None,
                 compute_dtype: torch.dtype | None = torch.float64, hash_inputs: bool = True,
                 readers: Mapping[Path, Reader] | None = None) -> None:
        self.base_path, self.entries, self.method = Path(base), list(entries), method
        self.dtype, self.compute_dtype, self.hash_inputs = dtype, compute_dtype, hash_inputs
        self.weights = [e.weight for e in self.entries]
        method.check_entries(len(self.entries))
        self._stack = ExitStack()
        try:
            paths = [self.base_path, *(p for e in self.entries for p in (e.path, e.base) if p is not None)]
            self.readers: dict[Path, Reader] = {Path(p): r for p, r in (readers or {}).items()}
            for path in paths:
                if path not in self.readers:
                    self.readers[path] = reader = open_reader(path)
                    self._stack.callback(reader.close)
            self._check(include, exclude)
        except BaseException:
            self._stack.close()
            raise

    def _check(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        base = self.readers[self.base_path]
        self.shapes = base.shapes()
        layouts = []
        for e in self.entries:
            reader = self.readers[e.path]
            if e.base is not None:
                pre = self.readers[e.base]
                check_keys(pre.shapes(), reader.shapes(), e.base.name, e.path.name,
                           context=f"{e.name} ({e.path}) is another architecture than {e.base}: ")
                tau = {k: s for k, s in reader.shapes().items()
                       if pre.dtype(k).is_floating_point and reader.dtype(k).is_floating_point}
            else:
                tau = {k: s for k, s in reader.shapes().items() if reader.dtype(k).is_floating_point}
            check_keys(tau, self.shapes, e.name, "base", allow_extra_b=True,
                       context=f"{e.name} ({e.path}) does not fit the base {self.base_path}: ")
            layouts.append((e.name, tau))
        first, shapes = layouts[0]
        for name, other in layouts[1:]:
            check_keys(shapes, other, first, name, context=f"{name} is another architecture than {first}: ")
        self.edited = sorted(k for k in shapes if selected(k, include, exclude))
        self.layout = {k: (self.dtype if self.dtype is not None and base.dtype(k).is_floating_point else base.dtype(k),
                           self.shapes[k]) for k in self.shapes}
        self.cast = tuple(k for k in self.edited if (self.dtype is not None and self.dtype != base.dtype(k))
                          or any(self.readers[e.path].dtype(k) != base.dtype(k) for e in self.entries))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Merger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metadata(self) -> Mapping[str, str]:
        """The base file's own safetensors metadata."""
        return self.readers[self.base_path].metadata

    # -- the loop -----------------------------------------------------------------------------

    def _task_vectors(self, key: str, views: Mapping[Path, Tensor]) -> list[Tensor]:
        taus = []
        for e in self.entries:
            t = views[e.path]
            if e.base is None:
                taus.append(t.to(self.compute_dtype or wide(t.dtype)))
            else:
                pre = views[e.base]
                dtype = self.compute_dtype or wide(pre.dtype, t.dtype)
                taus.append(t.to(dtype) - pre.to(dtype))
        return taus

    def _views(self, key: str, readers: Mapping[Path, Reader]) -> dict[Path, Tensor]:
        return {p: r.tensor(key) for p, r in readers.items() if key in r.entries}

    def _release(self, key: str) -> None:
        for r in self.readers.values():
            if key in r.entries:
                r.release(key)

    def _observe(self) -> None:
        """The method's first pass, when it needs the whole model (global TIES)."""
        self.method.reset()
        if not self.method.observes:
            return
        for key in self.edited:
            views = self._views(key, self.readers)
            self.method.observe(key, views[self.base_path], self._task_vectors(key, views), self.weights)
            del views
            self._release(key)

    def _walk(self, coef: float, updates: Mapping[str, Tensor] | None,
              hashers: Mapping[Path, Hasher]) -> Iterator[tuple[str, Tensor]]:
        """Every output tensor in key order. The hashes may lag a few keys behind the writes
        (waiting for them key by key left both threads idle in turn); a key's pages are let
        go once it is hashed, so memory stays a few tensors."""
        edited, hashing = set(self.edited), deque()
        for key in sorted(self.layout):
            views = self._views(key, self.readers)
            hashing.append((key, [h.update(key, views[p]) for p, h in hashers.items() if p in views]))
            t = views[self.base_path]
            if key in edited:
                update = (updates[key] if updates is not None
                          else self.method.merge(key, t, self._task_vectors(key, views), self.weights))
                out = apply_update(t, update, coef, key)
                del update
            else:
                out = t
            yield key, out.to(self.dtype) if self.dtype is not None and out.is_floating_point() else out
            del views, t, out
            while len(hashing) > HASH_LAG or (hashing and all(f.done() for f in hashing[0][1])):
                self._settle(*hashing.popleft())
        for item in hashing:
            self._settle(*item)

    def _settle(self, key: str, futures: list[Future]) -> None:
        for f in futures:
            f.result()  # re-raises an error of the hashing thread
        self._release(key)

    # -- running ------------------------------------------------------------------------------

    def updates(self) -> dict[str, Tensor]:
        """The method's update of every edited key, in memory: computed once, applied at many λ."""
        self._observe()
        out = {}
        for key in self.edited:
            views = self._views(key, self.readers)
            out[key] = self.method.merge(key, views[self.base_path], self._task_vectors(key, views), self.weights)
        return out

    def base_state(self) -> dict[str, Tensor]:
        """A copy of the base, as the merge reads it."""
        base = self.readers[self.base_path]
        return {k: base.tensor(k).clone() for k in sorted(self.layout)}

    def state(self, coef: float, updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The edited model at ``coef`` in memory (to evaluate it), exactly what ``write`` writes."""
        return {k: t.clone() for k, t in self._walk(coef, updates, {})}

    def write(self, output: Path, coef: float, metadata: Mapping[str, str] | None = None,
              updates: Mapping[str, Tensor] | None = None) -> MergeReport:
        """Write the edit at ``coef`` to ``output`` (complete, or not at all), fingerprinting the inputs."""
        if updates is None:
            self._observe()
        hashed = {self.base_path, *(p for e in self.entries if e.base is not None for p in (e.path, e.base))}
        hashers = {p: Hasher() for p in sorted(hashed)} if self.hash_inputs else {}
        try:
            with hashing_beside():
                write_safetensors(output, self.layout, self._walk(coef, updates, hashers), metadata)
        except BaseException:
            for h in hashers.values():
                h.abandon()
            raise
        fingerprints = {p: h.hexdigest() for p, h in hashers.items()}
        edited = set(self.edited)
        return MergeReport(applied=tuple(self.edited), skipped=tuple(k for k in sorted(self.layout) if k not in edited),
                           cast=self.cast, fingerprints=fingerprints)

    def sources(self, fingerprints: Mapping[Path, str]) -> list[dict[str, Any]]:
        """Where every entry came from: a model's and its base's fingerprints, or a saved
        vector's own record of its base."""
        sources = []
        for e in self.entries:
            if e.base is None:
                meta = self.readers[e.path].metadata
                sources.append({"entry": e.name, "path": str(e.path),
                                "base_fingerprint": json.loads(meta.get("base_fingerprint", "null")),
                                "sources": json.loads(meta.get("sources", "{}"))})
            else:
                sources.append({"entry": e.name, "path": str(e.path), "fingerprint": fingerprints.get(e.path),
                                "base": str(e.base), "base_fingerprint": fingerprints.get(e.base)})
        return sources
