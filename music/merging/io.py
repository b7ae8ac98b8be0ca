"""Reading, writing and fingerprinting weights key by key, so a merge never needs a whole model.

Every input is a ``Reader``: a safetensors file is read through zero-copy views of an mmap
(``SafetensorsReader``), anything else (``.pt``/``.pth``, Lightning ``.ckpt``, a state_dict
already in memory) through a ``StateDictReader`` over the loaded dict. The merge reads both the
same way, so in-memory and streamed merges are one code path. Files are read only through
``load_state_dict`` (never runs pickled code) or by parsing the safetensors header.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from music.checkpoint import load_state_dict
from music.merging.checks import TaskVectorError, listing

StateDict = Mapping[str, Tensor]
PathLike = str | os.PathLike
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HASH_LAG = 4  # base tensors the fingerprint may trail the writes by


def raw(t: Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def hash_tensor(h: "hashlib._Hash", key: str, t: Tensor) -> None:
    h.update(json.dumps([key, list(t.shape), str(t.dtype), t.numel() * t.element_size()]).encode())
    h.update(raw(t))


def fingerprint(state_dict: StateDict) -> str:
    """sha256 over sorted (key, shape, dtype, value bytes) of every tensor, buffers included.

    Identifies the exact weights a vector was computed from, so applying it elsewhere is
    noticed rather than forbidden (transfer is a legitimate experiment).
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        hash_tensor(h, key, state_dict[key])
    return h.hexdigest()


class Reader(Protocol):
    """What a merge needs of an input: its layout, one tensor at a time, and a way to let go."""

    path: str
    metadata: dict[str, str]
    entries: Mapping[str, object]

    def shapes(self) -> dict[str, tuple[int, ...]]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def tensor(self, key: str) -> Tensor: ...
    def release(self, key: str) -> None: ...
    def close(self) -> None: ...


class StateDictReader:
    """A state_dict held in memory, read like a file (``release`` has nothing to give back)."""

    def __init__(self, state: StateDict, path: PathLike = "<memory>", metadata: Mapping[str, str] | None = None) -> None:
        self.path, self.metadata = str(path), dict(metadata or {})
        self.entries: dict[str, Tensor] = {k: v.detach() for k, v in state.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.entries.items()}

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def tensor(self, key: str) -> Tensor:
        return self.entries[key]

    def release(self, key: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> StateDictReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsReader:
    """Tensors of a safetensors file as zero-copy views of a read-only mmap, one at a time.

    A mapped page read stays in the process's RSS (as RssFile) until it is unmapped, so a file
    streamed through ``safe_open`` ends with all of it resident. ``release`` drops a tensor's
    pages from this process (``MADV_DONTNEED``; the page cache keeps them, so a re-read costs
    no disk access): streaming then holds about one tensor per file, and reads cost no copy.
    Assumes a little-endian host, as the format does. A header that does not parse, or entries
    that do not fit the file (a truncated download), fail here in one line naming the file.
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
            length = os.fstat(f.fileno()).st_size
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise TaskVectorError(f"{self.path}: not a safetensors file (bad __metadata__)")
        self.metadata: dict[str, str] = metadata
        self.entries: dict[str, dict] = header
        self._start = 8 + size
        if unknown := sorted(k for k, e in header.items() if not isinstance(e, dict) or e.get("dtype") not in DTYPES):
            raise TaskVectorError(f"{self.path}: unsupported safetensors dtype for {listing(unknown)}")
        for key, e in header.items():
            try:
                shape, (begin, end) = e["shape"], e["data_offsets"]
                consistent = (all(isinstance(n, int) and n >= 0 for n in shape) and 0 <= begin <= end
                              and end - begin == math.prod(shape) * DTYPES[e["dtype"]].itemsize)
            except (KeyError, TypeError, ValueError):
                consistent = False
            if not consistent or self._start + end > length:
                raise TaskVectorError(f"{self.path}: entry {key!r} is truncated or inconsistent")
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if length else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e["shape"]) for k, e in self.entries.items()}

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

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


def open_reader(path: PathLike) -> Reader:
    """A safetensors file is mapped; other formats can only be loaded whole (safely)."""
    if Path(path).suffix == ".safetensors":
        return SafetensorsReader(path)
    return StateDictReader(load_state_dict(path), path)


def write_safetensors(path: PathLike, layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                      tensors: Iterable[tuple[str, Tensor]], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file from tensors produced one at a time, in sorted key order.

    ``save_file`` needs every tensor at once; the format (8-byte little-endian header size,
    JSON header of dtype/shape/data_offsets, raw bytes) needs only shapes and dtypes up front.
    ``tensors`` must yield exactly ``sorted(layout)``, in that order, with the announced dtypes
    and shapes; each is written from its own memory (no second copy). The file appears only
    once complete: written to ``<path>.partial``, then renamed, so an error raised while the
    tensors are produced leaves no file and never destroys an existing one.
    """
    order, offset, header = sorted(layout), 0, {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for key in order:
        dtype, shape = layout[key]
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned, as safetensors does
    out_path, tmp = Path(path), Path(f"{path}.partial")
    try:
        with open(tmp, "wb") as out:
            if hasattr(os, "posix_fallocate") and offset:
                # Reserving the blocks up front lets the writes below fill them at page-cache
                # speed, faster than growing the file (measured in docs/task_vectors.md).
                with contextlib.suppress(OSError):
                    os.posix_fallocate(out.fileno(), 0, 8 + len(blob) + offset)
            out.write(len(blob).to_bytes(8, "little") + blob)
            produced = iter(tensors)
            for key in order:
                got, t = next(produced, (None, None))
                if got != key or t is None or t.dtype != layout[key][0] or tuple(t.shape) != tuple(layout[key][1]):
                    raise TaskVectorError(f"write_safetensors: expected {key!r} {layout[key]}, got {got!r}")
                if t.numel():
                    out.write(raw(t))
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
        self._last = self._pool.submit(hash_tensor, self._h, key, t)
        return self._last

    def hexdigest(self) -> str:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        return self._h.hexdigest()

    def abandon(self) -> None:
        """Stop without a digest (a failed merge): the thread must not outlive the readers."""
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def hashing_beside() -> Iterator[None]:
    """One intra-op thread while a ``Hasher`` runs: the element-wise arithmetic of a stream
    gains nothing from a second core, and sha256 (the stream's slowest part) needs one
    (measured in docs/task_vectors.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
