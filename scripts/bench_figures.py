"""What the per-evaluation figures cost: a baseline confusion matrix (counts only, laid out
with ``tight_layout``) against ``confusion_matrix_figure``, and the
accuracy-matrix heat map, each rendered into a TensorBoard event file as a fit does.

    python scripts/bench_figures.py --rounds 7

Interleaved rounds, medians; prints the machine, the torch threads and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from music.figures import accuracy_matrix_figure, confusion_matrix_figure
from music.plots import pyplot


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    plt = pyplot()
    generator = torch.Generator().manual_seed(0)
    confusion = torch.eye(10, dtype=torch.long) * 950 + torch.randint(0, 8, (10, 10), generator=generator)
    confusion[confusion < 4] = 0  # a trained model's matrix: about half the cells empty
    rows = ["start", "pretrain", "class_3", "class_4", "class_7"]
    matrix = torch.rand(len(rows), 10, generator=generator).tolist()

    def baseline(writer: SummaryWriter, step: int) -> None:
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(confusion, cmap="Blues")
        half = int(confusion.max()) / 2
        for i, row in enumerate(confusion.tolist()):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if count > half else "black")
        ax.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10))
        fig.tight_layout()
        writer.add_figure("baseline", fig, global_step=step)

    def confusion_figure(writer: SummaryWriter, step: int) -> None:
        title = "seq/version_0: after class_3, step 90060 (acc 0.951)"
        writer.add_figure("confusion", confusion_matrix_figure(confusion.tolist(), title), global_step=step)

    def accuracy_figure(writer: SummaryWriter, step: int) -> None:
        writer.add_figure("accuracy", accuracy_matrix_figure(rows, matrix, "seq/version_0: test accuracy per class"),
                          global_step=step)

    drawers = [baseline, confusion_figure, accuracy_figure]
    times: dict[str, list[float]] = {d.__name__: [] for d in drawers}
    with tempfile.TemporaryDirectory() as log_dir:
        writer = SummaryWriter(log_dir)
        for draw in drawers:
            draw(writer, 0)  # warm-up: font cache, imports
        for step in range(1, args.rounds + 1):
            for draw in drawers:
                start = time.perf_counter()
                draw(writer, step)
                times[draw.__name__].append(time.perf_counter() - start)
        writer.close()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads 1, "
          f"load average {os.getloadavg()[0]:.1f}, {args.rounds} interleaved rounds")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name}: median {medians[name] * 1000:.0f} ms (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})")
    return medians


if __name__ == "__main__":
    main()
