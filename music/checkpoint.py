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
        try:
            raw: object = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type, or OSError, for a bad header
            raise CheckpointError(f"could not read {path} as a safetensors file ({_first_line(e)}): "
                                  "its header is corrupt or the file is truncated") from None
    else:
        raw = _torch_load(path)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} holds no state_dict (str -> Tensor), nor a dict with a 'state_dict' key")
    if raw and all(k.startswith(_PREFIX) for k in raw):
        return {k.removeprefix(_PREFIX): v for k, v in raw.items()}
    return dict(raw)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` with every way a file can be wrong said in one line:
    code in its pickle (refused, never retried unsafely), or no torch file at all."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # not a pickle at all: text, or another format
            raise CheckpointError(f"could not read {path} as a torch file ({_first_line(e)}): it is not a "
                                  "checkpoint saved by torch.save, or it is truncated") from None
        raise CheckpointError(
            f"refused to load {path}: not a plain weights file (its pickle needs objects "
            "that torch.load(weights_only=True) does not allow, and unpickling them could "
            "run code)") from None
    except Exception as e:  # zip reader errors (truncated), EOFError, KeyError from a stray byte...
        raise CheckpointError(f"could not read {path} as a torch file ({type(e).__name__}: {_first_line(e)}): "
                              "is it truncated, or not a checkpoint?") from None


def read_checkpoint(path: PathLike) -> dict[str, Tensor]:
    """The ``state_dict`` of a Lightning checkpoint given as ``--ckpt_path``, read the safe way
    before Lightning reads it, so a bad file is named in one line rather than a traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {str(path)!r} does not exist: give a .ckpt file written by music fit, "
                                "or `last`.")
    raw = _torch_load(path)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("state_dict"), Mapping):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' in it): --ckpt_path takes a "
                              ".ckpt written by music fit; plain weights go to --model.init_from.")
    return dict(raw["state_dict"])


def check_fits(path: PathLike, weights: Mapping[str, Tensor], model: Mapping[str, Tensor],
               require_common: bool = True) -> None:
    """Refuse weights of another architecture before they are loaded: every tensor the file
    and the model both name must have the model's shape, and (``require_common``) they must
    share a name at all -- not asked of a training checkpoint, whose LoRA keys the model only
    has once ``configure_model`` has run."""
    common = [k for k in weights if k in model]
    if require_common and weights and not common:
        raise CheckpointError(f"{path} does not fit the model: none of its {len(weights)} tensors (e.g. "
                              f"{next(iter(weights))!r}) is one of the model's (e.g. {next(iter(model), None)!r}); "
                              "it was saved from another architecture (see --model.backbone)")
    for key in common:
        if tuple(weights[key].shape) != tuple(model[key].shape):
            raise CheckpointError(f"{path} does not fit the model: {key} is {list(weights[key].shape)} in the file "
                                  f"but {list(model[key].shape)} in the model; it was saved from another "
                                  "architecture or size (see --model.backbone)")


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
