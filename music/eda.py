"""Exploratory data analysis, as the paper's data section does: how many samples of each
class every split holds, and what random samples of each split look like.

The figures come from the data module itself (its manifest and its splits), so they show
exactly what a run trains and tests on. ``scripts/eda.py`` writes them as PNG; a data module
with ``log_eda: true`` logs them to TensorBoard when fitting starts.
"""

from __future__ import annotations

import torch

from music.data import MusicDataModule
from music.plots import pyplot


def class_counts(datamodule: MusicDataModule) -> dict[str, list[int]]:
    """Samples per class for train, test, every named split and the replay buffer (if any)."""
    datamodule.setup()
    splits = datamodule.manifest()["splits"]
    order = ["train", "test", *(n for n in splits if n not in ("train", "test"))]
    return {name: splits[name]["class_counts"] for name in order}


def class_counts_figure(counts: dict[str, list[int]]):
    """Grouped bars on a linear axis from 0: one group per class, one bar per split, so bar
    heights compare as counts do (the splits' totals are in the legend)."""
    plt = pyplot()
    num_classes = max(len(c) for c in counts.values())
    fig, ax = plt.subplots(figsize=(8, 4.8))
    width = 0.8 / len(counts)
    for i, (name, values) in enumerate(counts.items()):
        ax.bar([c + (i - len(counts) / 2 + 0.5) * width for c in range(len(values))], values, width,
               label=f"{name} ({sum(values):,})")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("class", fontsize=12)
    ax.set_ylabel("samples", fontsize=12)
    ax.set_xticks(range(num_classes))
    ax.tick_params(labelsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Class counts per split", fontsize=13)
    ax.legend(fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


def sample_grid_figure(datamodule: MusicDataModule, split: str, rows: int = 4, cols: int = 8, seed: int = 0):
    """``rows x cols`` random samples of ``split`` (seeded), each titled with its label."""
    plt = pyplot()
    datamodule.setup()
    dataset = datamodule.dataset(split)
    count = min(rows * cols, len(dataset))
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    images, labels = dataset.__getitems__(picks.tolist())
    images = images.add(1).div(2).clamp(0, 1).mean(1)  # [-1, 1] -> [0, 1], grey
    size = images.shape[-1] + 2
    canvas = torch.ones(rows * size, cols * size)  # one image, one axes: fast to draw
    fig, ax = plt.subplots(figsize=(cols * 1.1, rows * 1.15))
    for i, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, cols)
        canvas[r * size + 1 : r * size + 1 + image.shape[0], c * size + 1 : c * size + 1 + image.shape[1]] = image
        ax.text(c * size + 1.5, r * size + 1.5, str(int(label)), color="yellow", fontsize=11, fontweight="bold",
                va="top", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    fig.suptitle(f"Random samples of '{split}' ({len(dataset):,} samples)")
    fig.tight_layout()
    return fig


def grid_splits(datamodule: MusicDataModule) -> list[str]:
    return ["train", "test", *(n for n in datamodule.split_names if n != "train")]


def figures(datamodule: MusicDataModule):
    """``(name, figure)``: ``class_counts``, then ``samples/<split>`` for every split; each
    figure is drawn when asked for and closed after it is used."""
    plt = pyplot()
    drawers = [("class_counts", lambda: class_counts_figure(class_counts(datamodule)))]
    drawers += [(f"samples/{split}", lambda split=split: sample_grid_figure(datamodule, split))
                for split in grid_splits(datamodule)]
    for name, draw in drawers:
        fig = draw()
        yield name, fig
        plt.close(fig)


def log_to_tensorboard(datamodule: MusicDataModule, logger) -> None:
    """Class counts and a sample grid per split in the Images tab, under ``eda/``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger):
        return
    for name, fig in figures(datamodule):
        logger.experiment.add_figure(f"eda/{name}", fig, global_step=0)


def write_pngs(datamodule: MusicDataModule, out_dir: str) -> list[str]:
    """The same figures as PNG files in ``out_dir`` (``samples_<split>.png``); returns their paths."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures(datamodule):
        paths.append(os.path.join(out_dir, name.replace("/", "_") + ".png"))
        fig.savefig(paths[-1], dpi=90)
    return paths
