"""Task arithmetic over state_dicts (Ilharco et al., "Editing Models with Task Arithmetic").

tau = theta_finetuned - theta_pretrained. Vectors are immutable and applying one returns a new
state_dict, so an experiment cannot corrupt the weights it started from. Files are read only
through ``load_state_dict`` (never runs pickled code) or safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import numbers
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from types import MappingProxyType
from typing import Collection, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from music.checkpoint import load_state_dict

StateDict = Mapping[str, Tensor]
PathLike = str | os.PathLike
_LISTED = 5
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
           "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


class TaskVectorError(ValueError):
    """Bad input to task arithmetic: mismatched keys or shapes, bad arguments, refused files."""


class BaseMismatchWarning(UserWarning):
    """A vector was applied to weights other than its base: allowed (transfer), but noticed."""


@dataclass(frozen=True)
class ApplyReport:
    """What ``apply_to`` did, so a silent partial application is impossible to miss."""

    applied: tuple[str, ...]
    skipped: tuple[str, ...]  # in the target but not in the vector; copied unchanged
    cast: tuple[str, ...]  # target dtype differed from the vector's; computed wider, cast back
    base_matches: bool | None  # None when the vector does not know its base (mixed-base sum)


def _listing(items: Sequence[str]) -> str:
    more = len(items) - _LISTED
    return ", ".join(items[:_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def _shapes(state: StateDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_keys(a: Mapping[str, tuple], b: Mapping[str, tuple], a_name: str, b_name: str,
                *, allow_extra_b: bool = False) -> None:
    """Raise one error naming every offending key (truncated), not just the first one hit."""
    problems = []
    if missing := sorted(set(a) - set(b)):
        problems.append(f"keys missing from {b_name}: {_listing(missing)}")
    if (extra := sorted(set(b) - set(a))) and not allow_extra_b:
        problems.append(f"keys missing from {a_name}: {_listing(extra)}")
    if shapes := [f"{k} {a[k]} vs {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]:
        problems.append(f"shape mismatch ({a_name} vs {b_name}): {_listing(shapes)}")
    if problems:
        raise TaskVectorError("; ".join(problems))


def _same_layout(a: TaskVector, b: TaskVector, a_name: str = "left vector",
                 b_name: str = "right vector") -> None:
    _check_keys(_shapes(a.tensors), _shapes(b.tensors), a_name, b_name)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TaskVectorError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32: half-precision differences lose the small updates that matter."""
    return reduce(torch.promote_types, dtypes, torch.float32)


def _raw(t: Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _hash_tensor(h: "hashlib._Hash", key: str, t: Tensor) -> None:
    h.update(json.dumps([key, list(t.shape), str(t.dtype), t.numel() * t.element_size()]).encode())
    h.update(_raw(t))


def fingerprint(state_dict: StateDict) -> str:
    """sha256 over sorted (key, shape, dtype, value bytes) of every tensor, buffers included.

    Identifies the exact weights a vector was computed from, so applying it elsewhere is
    noticed rather than forbidden (transfer is a legitimate experiment).
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        _hash_tensor(h, key, state_dict[key])
    return h.hexdigest()


def _check_base(expected: str | None, actual: str) -> bool | None:
    if expected is None:
        return None
    if expected != actual:
        warnings.warn(f"task vector applied to weights other than its base (fingerprint "
                      f"{actual[:12]} != {expected[:12]}); fine for transfer, else check the "
                      "checkpoint", BaseMismatchWarning, stacklevel=3)
    return expected == actual


def _apply_tensor(base: Tensor, tau: Tensor, coef: float, key: str) -> Tensor:
    """theta + coef * tau computed wide and cast back; the one kernel both apply paths share."""
    if not base.is_floating_point():
        raise TaskVectorError(f"target tensor {key!r} has non-floating dtype {base.dtype}")
    dtype = _wide(base.dtype, tau.dtype)
    out = torch.add(base.detach().to(dtype), tau.to(base.device, dtype), alpha=coef)
    return out.to(base.dtype)


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
            raise TaskVectorError(f"task vectors hold floating tensors only; got {_listing(bad)}")
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
        _check_keys(_shapes(pretrained), _shapes(finetuned), "pretrained", "finetuned")
        names = set(parameter_names) if parameter_names is not None else set(pretrained)
        if unknown := sorted(names - set(pretrained)):
            raise TaskVectorError(f"parameter_names not in the state_dict: {_listing(unknown)}")
        tensors, skipped = {}, {}
        for key in sorted(pretrained):
            pre, ft = pretrained[key].detach(), finetuned[key].detach()
            if not (pre.is_floating_point() and ft.is_floating_point()):
                skipped[key] = f"non-floating dtype {pre.dtype}/{ft.dtype}"
            elif not include_buffers and key not in names:
                skipped[key] = "buffer (include_buffers=False)"
            else:
                wide = _wide(pre.dtype, ft.dtype, *([dtype] if dtype is not None else []))
                tensors[key] = ft.to(wide) - pre.to(wide)
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
        coef = _finite("scalar", scalar)
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
        coef = _finite("scaling_coef", scaling_coef)
        state = target.state_dict() if isinstance(target, nn.Module) else target
        _check_keys(_shapes(self.tensors), _shapes(state), "task vector", "target",
                    allow_extra_b=True)
        out = {k: _apply_tensor(v, self.tensors[k], coef, k) if k in self.tensors
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
        """Inverse of ``save``; a plain safetensors file loads with no metadata."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors, json.loads(meta.get("base_fingerprint", "null")),
                   json.loads(meta.get("skipped", "{}")), json.loads(meta.get("sources", "{}")))


def _kth_largest_abs(values: Iterable[Tensor], density: float) -> Tensor:
    flat = torch.cat([t.abs().flatten() for t in values])
    if not flat.numel():
        return flat.new_zeros(())
    k = min(flat.numel(), max(1, math.ceil(round(density * flat.numel(), 9))))
    return flat.kthvalue(flat.numel() - k + 1).values


def ties_merge(vectors: Sequence[TaskVector], *, density: float | Sequence[float] = 0.2,
               scope: Literal["global", "per_tensor"] = "global") -> TaskVector:
    """TIES-merging (Yadav et al.): trim, elect sign, disjoint mean.

    Each vector keeps its ceil(density * n) largest magnitudes (ties with the k-th are all
    kept); each coordinate's sign is that of the sum of trimmed values; the result is the
    mean over vectors whose trimmed value is nonzero with that sign. Where the trimmed values
    sum to exactly 0 the result is 0 (the reference code takes the model-wide majority sign).

    Scope matters: the reference code flattens the whole model and trims *globally*, so
    tensors with small updates (biases, norms) can be zeroed entirely; libraries that merge
    tensor by tensor trim *per tensor*, keeping density of every tensor. The two give
    different merges at the same density. Default "global", to reproduce the paper.
    ``density`` may be one value per vector (as merge recipes give it per model).
    """
    if not vectors or not all(isinstance(v, TaskVector) for v in vectors):
        raise TaskVectorError("ties_merge needs a non-empty sequence of TaskVectors")
    densities = list(density) if isinstance(density, Sequence) else [density] * len(vectors)
    if len(densities) != len(vectors):
        raise TaskVectorError(f"density gives {len(densities)} values for {len(vectors)} vectors")
    for d in densities:
        if not 0 < _finite("density", d) <= 1:
            raise TaskVectorError(f"density must be in (0, 1], got {d!r}")
    if scope not in ("global", "per_tensor"):
        raise TaskVectorError(f"scope must be 'global' or 'per_tensor', got {scope!r}")
    for v in vectors[1:]:
        _same_layout(vectors[0], v, "first vector", "other vector")
    dtype = _wide(*(t.dtype for v in vectors for t in v.tensors.values()))
    trimmed = []
    for v, d in zip(vectors, densities):
        tensors = {k: t.to(dtype) for k, t in v.tensors.items()}
        if d == 1:  # nothing trimmed; saves the k-th value search
            trimmed.append(tensors)
            continue
        cut = _kth_largest_abs(tensors.values(), d) if scope == "global" else None
        trimmed.append({k: torch.where(t.abs() >= (_kth_largest_abs([t], d) if cut is None
                                                   else cut), t, 0) for k, t in tensors.items()})
    merged = {}
    for key in vectors[0].tensors:
        stacked = torch.stack([tr[key] for tr in trimmed])
        agree = torch.sign(stacked) == torch.sign(stacked.sum(0))  # zeros agree only with 0
        merged[key] = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    bases = {v.base_fingerprint for v in vectors}
    skipped = reduce(lambda acc, v: {**acc, **v.skipped}, vectors, {})
    return TaskVector(merged, bases.pop() if len(bases) == 1 else None, skipped)


def dare(vector: TaskVector, *, drop_rate: float, seed: int) -> TaskVector:
    """DARE (Yu et al.): drop each coordinate with probability p, rescale survivors by 1/(1-p).

    The mask for each tensor comes from a CPU generator seeded by sha256(f"{seed}:{key}"), so
    the result depends only on (seed, key, shape): not on dict order, device, or other keys.
    """
    p = _finite("drop_rate", drop_rate)
    if not 0 <= p < 1:
        raise TaskVectorError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskVectorError(f"seed must be an int, got {seed!r}")
    out = {}
    for key, t in vector.tensors.items():
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        keep = torch.rand(t.shape, generator=gen) >= p
        out[key] = torch.where(keep.to(t.device), t / (1 - p), 0)
    return TaskVector(out, vector.base_fingerprint, vector.skipped, vector.sources)


class SafetensorsReader:
    """Tensors of a safetensors file as zero-copy views of a read-only mmap, one at a time.

    A mapped page read stays in the process's RSS (as RssFile) until it is unmapped, so a file
    streamed through ``safe_open`` ends with all of it resident. ``release`` drops a tensor's
    pages from this process (``MADV_DONTNEED``; the page cache keeps them, so a re-read costs
    no disk access): streaming then holds about one tensor per file, and reads cost no copy.
    Assumes a little-endian host, as the format does.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = str(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
            except ValueError:
                header = None
            if not isinstance(header, dict):
                raise TaskVectorError(f"{self.path}: not a safetensors file (bad header)")
            self._file = open(self.path, "rb")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._start = 8 + size
        length = os.fstat(self._file.fileno()).st_size
        if unknown := sorted(k for k, e in header.items() if e.get("dtype") not in _DTYPES):
            raise TaskVectorError(f"{self.path}: unsupported safetensors dtype for {_listing(unknown)}")
        for key, e in header.items():
            begin, end = e["data_offsets"]
            if end - begin != math.prod(e["shape"]) * _DTYPES[e["dtype"]].itemsize or self._start + end > length:
                raise TaskVectorError(f"{self.path}: entry {key!r} is truncated or inconsistent")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if length else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e["shape"]) for k, e in self.entries.items()}

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self.entries[key]["dtype"]]

    def tensor(self, key: str) -> Tensor:
        """A read-only view (do not modify it); copied only if the file misaligns it."""
        entry = self.entries[key]
        dtype, shape, (begin, end) = self.dtype(key), entry["shape"], entry["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        offset = self._start + begin
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": views are read only
            if offset % dtype.itemsize:
                return torch.frombuffer(bytearray(self._map[offset:offset + end - begin]), dtype=dtype).reshape(shape)
            return torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)

    def release(self, key: str) -> None:
        """Drop ``key``'s pages from this process's memory (they stay in the page cache)."""
        begin, end = self.entries[key]["data_offsets"]
        if self._map is None or end == begin or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = (self._start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, first, self._start + end - first)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still alive keeps the map until it goes
                self._map.close()
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def write_safetensors(path: PathLike, layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                      tensors: Iterable[tuple[str, Tensor]], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file from tensors produced one at a time, in sorted key order.

    ``save_file`` needs every tensor at once; the format (8-byte little-endian header size,
    JSON header of dtype/shape/data_offsets, raw bytes) needs only shapes and dtypes up front.
    ``tensors`` must yield exactly ``sorted(layout)``, in that order, with the announced dtypes
    and shapes; each is written from its own memory (no second copy). The file appears only
    once complete: written to ``<path>.partial``, then renamed.
    """
    order, offset, header = sorted(layout), 0, {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for key in order:
        dtype, shape = layout[key]
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned, as safetensors does
    out_path, tmp = Path(path), Path(f"{path}.partial")
    try:
        with open(tmp, "wb") as out:
            if hasattr(os, "posix_fallocate") and offset:
                # Reserving the blocks up front lets the writes below fill them at page-cache
                # speed (measured 0.29 s against 0.42-1.9 s per GB for growing the file).
                with contextlib.suppress(OSError):
                    os.posix_fallocate(out.fileno(), 0, 8 + len(blob) + offset)
            out.write(len(blob).to_bytes(8, "little") + blob)
            produced = iter(tensors)
            for key in order:
                got, t = next(produced, (None, None))
                if got != key or t is None or t.dtype != layout[key][0] or tuple(t.shape) != tuple(layout[key][1]):
                    raise TaskVectorError(f"write_safetensors: expected {key!r} {layout[key]}, got {got!r}")
                if t.numel():
                    out.write(_raw(t))
                del t
            if next(produced, None) is not None:
                raise TaskVectorError("write_safetensors: more tensors than the layout announced")
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Hasher:
    """``fingerprint`` computed tensor by tensor on a background thread (sha256 releases the
    GIL), so hashing overlaps reading, computing and writing. Feed keys in sorted order, and
    keep each tensor unchanged until its ``update`` future is done."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._last: Future | None = None

    def update(self, key: str, t: Tensor) -> Future:
        self._last = self._pool.submit(_hash_tensor, self._h, key, t)
        return self._last

    def hexdigest(self) -> str:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        return self._h.hexdigest()


HASH_LAG = 4  # base tensors the fingerprint may trail the writes by


@contextlib.contextmanager
def hashing_beside() -> Iterator[None]:
    """One intra-op thread while a ``Hasher`` runs: the element-wise arithmetic of a stream
    gains nothing from a second core, and sha256 (the stream's slowest part) needs one. On
    2 cores this took a 1 GB apply from 1.6-2.3 s to 0.8-0.9 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def apply_safetensors(base_path: PathLike, vector_path: PathLike, out_path: PathLike,
                      scaling_coef: float = 1.0, check_base: bool = True) -> ApplyReport:
    """Write base + scaling_coef * vector tensor by tensor, holding about one tensor at a time.

    Reads are mmap views (``SafetensorsReader``), each output tensor is written from the one
    buffer the kernel computes it into, and the base's fingerprint is hashed on a second
    thread. Same kernel as ``apply_to``, so the result is bit-identical; the file appears
    only once complete (written aside, then renamed). The fingerprint (one sha256 stream over
    the base, 0.75-0.9 s per GB here) is the slowest part; ``check_base=False`` skips it when
    the base is known to be the vector's, and ``base_matches`` is then ``None``.
    """
    coef = _finite("scaling_coef", scaling_coef)
    with SafetensorsReader(base_path) as base, SafetensorsReader(vector_path) as vec, hashing_beside():
        _check_keys(vec.shapes(), base.shapes(), "task vector", "base", allow_extra_b=True)
        shapes = base.shapes()
        layout = {k: (base.dtype(k), shapes[k]) for k in base.entries}
        hasher, cast = Hasher() if check_base else None, []

        def edited() -> Iterator[tuple[str, Tensor]]:
            # The hash may lag a few tensors behind the writes: waiting for it tensor by
            # tensor left both threads idle in turn. Each base tensor is released once hashed,
            # so memory stays a few tensors.
            hashing: deque[tuple[str, Future]] = deque()
            unhashed: Future = Future()  # check_base=False: every tensor is "hashed" at once
            unhashed.set_result(None)
            for k in sorted(layout):
                t = base.tensor(k)
                hashing.append((k, hasher.update(k, t) if hasher else unhashed))
                if k in vec.entries:
                    tau = vec.tensor(k)
                    cast.extend([k] if tau.dtype != t.dtype else [])
                    yield k, _apply_tensor(t, tau, coef, k)
                    del tau
                    vec.release(k)
                else:
                    yield k, t
                del t
                while len(hashing) > HASH_LAG or (hashing and hashing[0][1].done()):
                    key, future = hashing.popleft()
                    future.result()  # re-raises an error of the hashing thread
                    base.release(key)
            for key, future in hashing:
                future.result()
                base.release(key)

        write_safetensors(out_path, layout, edited(), base.metadata)
        expected = json.loads(vec.metadata.get("base_fingerprint", "null")) if hasher else None
        base_fingerprint = hasher.hexdigest() if hasher else ""
        applied, keys = tuple(sorted(vec.entries)), sorted(layout)
    return ApplyReport(applied=applied, skipped=tuple(k for k in keys if k not in applied),
                       cast=tuple(sorted(cast)), base_matches=_check_base(expected, base_fingerprint))
