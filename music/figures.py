"""The figures of one run, drawn to be read at TensorBoard's card size and as PNG files.

Each figure says what it shows in its title (run, phase, step), colours by a share (0 to 1)
so that runs with different test-set sizes compare, and writes the numbers into the cells,
because a colour alone cannot be read off. They are drawn once per evaluation, so they are kept
to one axes each, with text only where there is something to read (no "0" in empty cells),
and fixed margins.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np

from music.plots import pyplot

# TensorBoard scales a figure down to its card: a small figure with 9-point text keeps the
# text large relative to the card (4.6 x 3.9 inches at 100 dpi: 460 x 390 pixels).
CARD_SIZE = (4.6, 3.9)
DPI = 100
# Fixed margins: tight_layout draws the figure once more to measure it, half of a figure's cost.
MARGINS = {"left": 0.11, "right": 0.86, "bottom": 0.13, "top": 0.87}  # top: a two-line title


def confusion_matrix_figure(confusion: Sequence[Sequence[int]], title: str):
    """Rows normalised by the true class (the colour is the share of that class predicted as
    each column; the diagonal is the per-class accuracy), the raw counts written in each
    non-empty cell, a colour bar, and the title naming the run and the evaluation."""
    plt = pyplot()
    counts = np.asarray(confusion, dtype=np.int64)
    support = counts.sum(1, keepdims=True)
    shares = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    n = len(counts)
    fig, ax = plt.subplots(figsize=CARD_SIZE, dpi=DPI)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    font = 9 if n <= 10 else max(5, 90 // n)
    for i, j in zip(*np.nonzero(counts)):
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font,
                color="white" if shares[i, j] > 0.55 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("share of the true class")
    fig.subplots_adjust(**MARGINS)
    return fig


def accuracy_matrix_figure(rows: Sequence[str], matrix: Sequence[Sequence[float]], title: str):
    """Test accuracy per class (columns) after each evaluation (rows, in order): the accuracy
    matrix of continual learning as a heat map, each cell with its value in percent (two or
    three digits stay legible in a cell at card size, where "0.95" does not)."""
    plt = pyplot()
    values = np.asarray(matrix, dtype=float)
    height = 1.3 + 0.5 * len(rows)
    fig, ax = plt.subplots(figsize=(CARD_SIZE[0], max(2.6, height)), dpi=DPI)
    image = ax.imshow(values * 100, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    font = 9 if values.shape[1] <= 10 else max(5, 90 // values.shape[1])
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=font,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel("class")
    ax.set_ylabel("after")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).set_label("test accuracy (%)")
    inches = fig.get_figheight()  # margins in inches: the height grows with the rows
    fig.subplots_adjust(left=0.2, right=0.84, bottom=0.6 / inches, top=1 - 0.5 / inches)
    return fig


def phase_figure(rows: Sequence[str], acc: Sequence[float], title: str):
    """Test accuracy after each evaluation (``rows``, in order), one point each with its value
    in percent: the phase-by-phase story as an image, which TensorBoard neither smooths nor
    rescales. Small, with large text: TensorBoard shows it at about 200 pixels wide."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 2.5), dpi=DPI)
    x = np.arange(len(rows))
    values = 100 * np.asarray(acc, dtype=float)
    ax.plot(x, values, "o-", markersize=5)
    for i, value in enumerate(values):
        ax.annotate(f"{value:.1f}", (i, value), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=10, fontweight="bold")
    ax.set_xticks(x, labels=[f"{i}\n{name}" for i, name in enumerate(rows)], fontsize=8)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 25))
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.2, top=0.84)
    return fig


def save_run_figures(run_dir: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None) -> list[str]:
    """The run's figures as PNG files, from what it wrote (``phase_metrics.json``,
    ``accuracy_matrix.csv``): ``<name>_confusion_<phase>.png`` per evaluated phase and
    ``<name>_accuracy_matrix.png``. ``name`` defaults to the run directory's name."""
    run_dir = os.fspath(run_dir)
    name = name or os.path.basename(os.path.normpath(run_dir))
    os.makedirs(out_dir, exist_ok=True)
    plt = pyplot()
    paths = []

    def save(fig, filename: str) -> None:
        paths.append(os.path.join(out_dir, filename))
        fig.savefig(paths[-1], dpi=DPI)
        plt.close(fig)

    phases_file = os.path.join(run_dir, "phase_metrics.json")
    if not os.path.exists(phases_file):
        raise FileNotFoundError(f"No phase_metrics.json in {run_dir!r}: give the directory of a finished `music fit` run.")
    with open(phases_file) as f:
        phases = json.load(f)
    for phase, record in sorted(phases.items(), key=lambda item: item[1]["index"]):
        title = f"{name}\nafter {phase} (acc {record['acc']:.3f})"
        save(confusion_matrix_figure(record["confusion_matrix"], title), f"{name}_confusion_{phase}.png")
    matrix_file = os.path.join(run_dir, "accuracy_matrix.csv")
    if os.path.exists(matrix_file):
        with open(matrix_file, newline="") as f:
            table = list(csv.DictReader(f))
        columns = [k for k in table[0] if k.startswith("acc_")]
        matrix = [[float(r[c]) if r[c] not in ("", "nan") else np.nan for c in columns] for r in table]
        save(accuracy_matrix_figure([r["phase"] for r in table], matrix, f"{name}\ntest accuracy per class"),
             f"{name}_accuracy_matrix.png")
    return paths
