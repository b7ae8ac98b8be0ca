"""Attention maps of a ViT's last block: where the CLS token looks, per image.

timm computes attention with fused SDPA by default, which never materialises the attention
matrix; build the model with ``TimmViT(fused_attention=False)`` and read the softmax output
with ``timm.utils.AttentionExtract``. A LoRA-wrapped model has the same attention node
(PEFT wraps only the linear layers), so full and LoRA fine-tunes compare side by side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from music.plots import pyplot


@torch.no_grad()
def cls_attention(model: nn.Module, images: Tensor, block: int = -1) -> Tensor:
    """Per image, the CLS token's attention to every patch in ``block`` (the last by default),
    averaged over heads and shaped as the patch grid: ``(N, grid_h, grid_w)``, rows summing
    (over patches and the CLS/prefix tokens left out) to at most 1."""
    from timm.utils import AttentionExtract

    names = [n for n, _ in model.named_modules()]
    blocks = sorted({int(n.split("blocks.")[1].split(".")[0]) for n in names if "blocks." in n})
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no 'blocks.N' modules: attention maps need a timm ViT.")
    index = blocks[block]
    hint = "build the ViT with fused_attention=False (timm.layers.set_fused_attn(False) before create_model)"
    if any(getattr(m, "fused_attn", False) for m in model.modules()):
        raise RuntimeError(f"The model computes attention with fused SDPA, which never materialises it: {hint}.")
    was_training = model.training
    try:
        found = AttentionExtract(model, names=[f"*blocks.{index}.attn.softmax"])(images)
    except Exception as err:
        raise RuntimeError(f"Could not read the attention matrix of block {index}: {hint}.") from err
    finally:
        model.train(was_training)
    attention = next(iter(found.values()))  # (N, heads, tokens, tokens)
    tokens = attention.shape[-1]
    grid = math.isqrt(tokens - 1)
    prefix = tokens - grid * grid  # CLS (and register) tokens before the patches
    cls_row = attention[:, :, 0, prefix:].mean(1)
    return cls_row.reshape(len(images), grid, grid)


def attention_figure(images: Tensor, maps: dict[str, Tensor], labels: Tensor | None = None,
                     predictions: dict[str, Tensor] | None = None):
    """A matplotlib figure: one row per image; the image, then each model's map over it."""
    plt = pyplot()

    n, columns = len(images), 1 + len(maps)
    fig, axes = plt.subplots(n, columns, figsize=(2.2 * columns, 2.2 * n), squeeze=False)
    shown = images.float()
    shown = (shown - shown.amin((1, 2, 3), keepdim=True)) / (shown.amax((1, 2, 3), keepdim=True)
                                                            - shown.amin((1, 2, 3), keepdim=True) + 1e-8)
    for i in range(n):
        picture = shown[i].permute(1, 2, 0).squeeze(-1)
        axes[i, 0].imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        axes[i, 0].set_title(f"label {int(labels[i])}" if labels is not None else "image", fontsize=8)
        for j, (name, attention) in enumerate(maps.items(), start=1):
            up = F.interpolate(attention[i][None, None], size=images.shape[-2:], mode="bilinear")[0, 0]
            axes[i, j].imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            axes[i, j].imshow(up, cmap="jet", alpha=0.5)
            title = name if predictions is None else f"{name}: pred {int(predictions[name][i])}"
            axes[i, j].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
