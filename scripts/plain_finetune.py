"""Study fine-tuning cells as a plain PyTorch script, with no framework: the other side of
``scripts/benchmark_cells.py``, which runs it as a fresh process of its own.

The same work as the study's sequential cells (``music study``, ``seq_<order>_lr<lr>``): from one
pretrained SimpleNN (the weights of a ``.ckpt``), for each ordering of the held-out classes, the
test set evaluated, then per class a fresh Adam and ``--epochs`` shuffled epochs of batch 32 on
that class's held-out samples (drawn as ``MusicDataModule`` draws them with ``split_seed`` =
``--seed``), the test set evaluated after each phase. MNIST is read once for all cells, as a
warm process would. It imports torch and torchvision only, and prints one JSON line: per cell
its wall and CPU seconds, optimizer steps and final test accuracy.

    python scripts/plain_finetune.py --data-dir D --pretrained phase-0-pretrain.ckpt --orderings 3-4-7 3-7-4
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision
from plain_pretrain import held_out_splits
from torch import nn


class SimpleNN(nn.Module):
    """784-128-64-10, named as ``music.models.SimpleNN`` so its weights load as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def per_class_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(images[i : i + 1000]).argmax(1) for i in range(0, len(labels), 1000)])
    model.train()
    correct = torch.bincount(labels[predicted == labels], minlength=10)
    return (correct / torch.bincount(labels, minlength=10)).tolist()


def run_cell(data: dict, pretrained: dict, ordering: list[int], args: argparse.Namespace) -> dict:
    """One sequential cell: the accuracy matrix (per-class test accuracy before and after each phase)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(args.seed)
    model = SimpleNN()
    model.load_state_dict(pretrained)
    rows, steps = [per_class_accuracy(model, data["test_images"], data["test_labels"])], 0
    for c in ordering:
        index = data["splits"][c]
        images, labels = data["images"][index], data["labels"][index]
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        for _ in range(args.epochs):
            order = torch.randperm(len(labels))
            for i in range(0, len(labels), 32)[: args.batches]:
                batch = order[i : i + 32]
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
        rows.append(per_class_accuracy(model, data["test_images"], data["test_labels"]))
    counts = torch.bincount(data["test_labels"], minlength=10).float()
    final = float((torch.tensor(rows[-1]) * counts).sum() / counts.sum())
    return {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu_start, "steps": steps,
            "final_acc": final, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--pretrained", required=True, help="a .ckpt (or .pt) holding the pretrained SimpleNN's weights")
    parser.add_argument("--orderings", nargs="+", default=["3-4-7"], help="one cell per ordering, e.g. 3-4-7")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per phase")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="the cell's seed, which is also its split seed")
    parser.add_argument("--batches", type=int, default=None, help="stop each epoch after this many batches")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torchvision.datasets.MNIST(args.data_dir, train=train, download=False)
        return raw.data.unsqueeze(1).float().div_(127.5).sub_(1.0), raw.targets

    images, labels = load(train=True)
    test_images, test_labels = load(train=False)
    orderings = [[int(c) for c in o.split("-")] for o in args.orderings]
    data = {"images": images, "labels": labels, "test_images": test_images, "test_labels": test_labels,
            "splits": held_out_splits(labels, held_out=sorted(orderings[0]), seed=args.seed)}
    state = torch.load(args.pretrained, map_location="cpu", weights_only=True)
    state = {k.removeprefix("backbone."): v for k, v in state.get("state_dict", state).items()}
    load_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    cells = [run_cell(data, state, ordering, args) for ordering in orderings]
    print(json.dumps({"load": load_seconds[0], "load_cpu": load_seconds[1], "cells": cells}))


if __name__ == "__main__":
    main()
