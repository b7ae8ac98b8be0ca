"""Checkpoint I/O: reading weights without running code, and writing files whole or not at all.

Every file MUSIC reads weights from (``init_from``, ``--ckpt_path``, task vectors, merge
recipes) goes through ``load_state_dict``: torch files with ``weights_only=True`` only, or
safetensors. Every file it writes that a crash could leave half-written (checkpoints, metrics,
tables, markers) goes through a temporary name and an atomic rename.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file
from torch import Tensor

PathLike = str | os.PathLike
# Classifier keeps its network under ``backbone``; files saved from either side load alike.
_PREFIX = "backbone."


class CheckpointError(ValueError):
    """A weights file that is refused or holds no state_dict."""


def load_state_dict(path: PathLike) -> dict[str, Tensor]:
    """A plain network state_dict from ``.safetensors``, ``.pt``/``.pth`` or a Lightning ``.ckpt``.

    Torch files are loaded with ``weights_only=True`` only: a file whose unpickling would run
    code is refused, never retried unsafely. A dict with a ``"state_dict"`` key (Lightning)
    is unwrapped, and a ``backbone.`` prefix is stripped when *every* key has it, so the
    result is the plain network's state_dict whichever way it was saved.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {str(path)!r}: give a .ckpt, .pt/.pth or .safetensors file.")
    if path.suffix == ".safetensors":
        raw: object = load_file(str(path))
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refused to load {path}: not a plain weights file (its pickle needs objects "
                "that torch.load(weights_only=True) does not allow, and unpickling them could "
                "run code)") from e
        except (RuntimeError, EOFError) as e:
            raise CheckpointError(f"could not read {path} as a torch file ({e}); is it truncated?") from e
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} holds no state_dict (str -> Tensor), nor a dict with a 'state_dict' key")
    if raw and all(k.startswith(_PREFIX) for k in raw):
        return {k.removeprefix(_PREFIX): v for k, v in raw.items()}
    return dict(raw)


def write_atomically(path: PathLike, data: str | bytes) -> None:
    """Temporary file, then rename: a reader (or a run killed mid-write) never sees half a file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else {"newline": ""})) as f:
        f.write(data)
    os.replace(temporary, path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, with every file (``last.ckpt``, phase snapshots)
    written under a temporary name and renamed into place, so a run killed while saving still
    resumes from the previous complete checkpoint. The CLI installs it unless the config brings
    its own ``CheckpointIO``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        temporary = os.fspath(path) + ".tmp"
        super().save_checkpoint(checkpoint, temporary, storage_options)
        os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one
