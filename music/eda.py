"""Exploratory data analysis, as the paper's data section does: how many samples of each
class every split holds, and what random samples of each split look like.

The figures come from the data module itself (its manifest and its splits), so they show
exactly what a run trains and tests on. ``music eda`` writes them as PNG; for a data module
with ``log_eda: true`` the ``LogEDA`` callback (which ``music fit`` installs) logs them to
TensorBoard when fitting starts. The data module only says that it wants them, so it does not
depend on the figures drawn from it.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from music.data import MusicDataModule
from music.plots import image_loggers, labelled_grid, log_figure, pyplot, titled


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


def sample_grid(datamodule: MusicDataModule, split: str, rows: int = 4, cols: int = 8, seed: int = 0):
    """``rows x cols`` random samples of ``split`` (seeded), each labelled, as a PIL image
    (drawn with PIL rather than matplotlib, far cheaper per split: docs/speed.md)."""
    datamodule.setup()
    size = len(_split_index(datamodule, split)) if datamodule.train_images is not None else len(datamodule.dataset(split))
    count = min(rows * cols, size)
    picks = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count]
    if datamodule.train_images is not None:  # in memory: index the few samples, gather no split
        images = datamodule.test_images if split == "test" else datamodule.train_images
        labels = datamodule.test_labels if split == "test" else datamodule.train_labels
        index = _split_index(datamodule, split)[picks]
        images, labels = images[index], labels[index]
    else:
        images, labels = datamodule.dataset(split).__getitems__(picks.tolist())
    images = images.cpu().add(1).div(2).mean(1)  # [-1, 1] -> [0, 1], grey
    return titled(labelled_grid(images, labels.tolist(), cols), f"Random samples of '{split}' ({size:,} samples)")


def _split_index(datamodule: MusicDataModule, split: str) -> torch.Tensor:
    """Indices of ``split`` into the train (or, for ``test``, the test) tensors, in the
    order ``datamodule.dataset(split)`` holds them."""
    if split in ("train", "test"):
        return torch.arange(len(datamodule.train_labels if split == "train" else datamodule.test_labels))
    return datamodule.splits[datamodule.check_split(split)]


def grid_splits(datamodule: MusicDataModule) -> list[str]:
    return ["train", "test", *(n for n in datamodule.split_names if n != "train")]


def figures(datamodule: MusicDataModule):
    """``(name, image)``: ``class_counts`` (a matplotlib figure, closed after use), then
    ``samples/<split>`` (PIL images) for every split, each drawn when asked for."""
    plt = pyplot()
    fig = class_counts_figure(class_counts(datamodule))
    yield "class_counts", fig
    plt.close(fig)
    for split in grid_splits(datamodule):
        yield f"samples/{split}", sample_grid(datamodule, split)


EDA_GROUP = "z_eda"


def log_eda(datamodule: MusicDataModule, loggers) -> None:
    """Class counts and a sample grid per split, under ``z_eda/``, to every logger that takes
    images (``music.plots.log_figure``: TensorBoard's Images tab, MLflow, W&B). TensorBoard
    orders groups by name: the ``z_`` puts the data after the results a run is opened for."""
    loggers = image_loggers(loggers)
    if loggers:  # nothing is drawn for a run whose loggers take no images
        for name, image in figures(datamodule):
            log_figure(loggers, f"{EDA_GROUP}/{name}", image, step=0)


def write_pngs(datamodule: MusicDataModule, out_dir: str) -> list[str]:
    """The same figures as PNG files in ``out_dir`` (``samples_<split>.png``); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures(datamodule):
        paths.append(os.path.join(out_dir, name.replace("/", "_") + ".png"))
        if hasattr(fig, "savefig"):
            fig.savefig(paths[-1], dpi=90)
        else:
            fig.save(paths[-1])
    return paths


class LogEDA(Callback):
    """``log_eda`` for a data module that asks for it (``data.log_eda: true``), once, when
    fitting starts, on the main process."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "log_eda", False) and trainer.is_global_zero:
            log_eda(datamodule, trainer.loggers)
