"""Data statistics of a fine-tuned model that some merge methods weight its task vector by.

- ``fisher``: the diagonal Fisher of every trainable parameter, the mean over samples of the
  squared per-sample gradient of ``log p(y | x)`` (Fisher merging, Matena & Raffel 2022), by
  default in expectation over y ~ p(y | x), summed exactly over the classes as the paper's code
  does. The squared gradients are EWC's (``music.fisher``).
- ``gram``: each ``nn.Linear`` layer's input Gram matrix ``XᵀX / n`` over the ``n`` input rows
  the data gives it (RegMean, Jin et al. 2023); token or spatial positions count as rows.

Both are means, so a model's weight in the merge does not depend on how many samples it was
measured on (the reference RegMean code divides by the count the same way). Keys are
``<kind>/<state_dict key>`` (``fisher/fc1.bias``, ``gram/fc1.weight``), so one file can hold both
kinds and a method looks a tensor's statistics up by the key it merges. Files are safetensors:
loading one never runs code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import safetensors
import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from music.checkpoint import write_atomically
from music.fisher import gradient_magnitudes
from music.merging.checks import TaskVectorError

KINDS = ("fisher", "gram")


def compute_statistics(model: nn.Module, loader: Iterable, kinds: set[str], *,
                       labels: Literal["expected", "predicted", "true"] = "expected") -> dict[str, Tensor]:
    """``kinds`` of statistics of ``model`` (the network whose ``state_dict`` keys the merge
    reads, its output the logits of a softmax classifier) over the ``(x, y)`` batches of
    ``loader``, in eval mode.

    Args:
        labels: the Fisher's labels: every class weighted by the model's probability of it
            (``expected``: the Fisher itself, one backward pass per class), the model's
            prediction (``predicted``: EWC's one-pass estimate) or the batch's (``true``: the
            empirical Fisher).
    """
    kinds = set(kinds)
    if unknown := sorted(kinds - set(KINDS)):
        raise TaskVectorError(f"statistics kinds {unknown} are not allowed: choose from {list(KINDS)}.")
    if labels not in ("expected", "predicted", "true"):
        raise TaskVectorError(f"labels={labels!r} is not allowed: choose 'expected', 'predicted' or 'true'.")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    fisher = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
             for name, m in layers.items()}
    rows = dict.fromkeys(layers, 0)
    samples = 0

    def accumulate(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach().reshape(-1, module.in_features).to(torch.float64)
            grams[name] += x.T @ x
            rows[name] += x.shape[0]
        return hook

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            samples += len(y)
            if "gram" in kinds:
                handles = [m.register_forward_hook(accumulate(name)) for name, m in layers.items()]
                try:
                    with torch.no_grad():
                        logits = model(x)
                finally:
                    for handle in handles:
                        handle.remove()
            if "fisher" in kinds:
                if labels != "true":
                    with torch.no_grad():
                        probabilities = torch.softmax(logits if "gram" in kinds else model(x), dim=1)
                if labels == "expected":
                    draws = [(torch.full_like(y, c), probabilities[:, c].sqrt()) for c in range(probabilities.shape[1])]
                else:
                    draws = [(probabilities.argmax(1) if labels == "predicted" else y, None)]
                for label, scale in draws:
                    for name, square in gradient_magnitudes(model, params, x, label, scale=scale).items():
                        fisher[name] += square.to(torch.float64)
    finally:
        model.train(was_training)
    if not samples:
        raise TaskVectorError("the loader gave no samples: statistics need at least one batch.")
    out = {}
    if "fisher" in kinds:
        out |= {f"fisher/{name}": (f / samples).float() for name, f in fisher.items()}
    if "gram" in kinds:
        out |= {f"gram/{name}.weight": (g / max(rows[name], 1)).float() for name, g in grams.items() if rows[name]}
    return out


def save_statistics(path: str | Path, statistics: dict[str, Tensor]) -> None:
    """Write ``statistics`` as a safetensors file (complete, or not at all)."""
    check_keys(statistics, str(path))
    write_atomically(path, save({k: t.detach().cpu().contiguous() for k, t in statistics.items()},
                                metadata={"kinds": ",".join(sorted({k.split("/", 1)[0] for k in statistics}))}))


def load_statistics(path: str | Path) -> dict[str, Tensor]:
    """A file written by ``save_statistics``; refused in one line if it is not one."""
    try:
        statistics = load_file(str(path))
    except (OSError, safetensors.SafetensorError) as err:
        raise TaskVectorError(f"statistics file {str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None
    check_keys(statistics, str(path))
    return statistics


def check_keys(statistics: dict[str, Tensor], where: str) -> None:
    bad = sorted(k for k in statistics if k.split("/", 1)[0] not in KINDS or "/" not in k)
    if bad:
        raise TaskVectorError(f"statistics {where!r} hold keys {bad[:5]} that are not '<kind>/<key>' with a kind "
                              f"in {list(KINDS)}.")


def of_kind(statistics: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """The ``kind`` statistics by state_dict key."""
    prefix = f"{kind}/"
    return {k[len(prefix):]: t for k, t in statistics.items() if k.startswith(prefix)}
