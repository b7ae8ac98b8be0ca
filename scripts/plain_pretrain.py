"""Pretraining as a plain PyTorch script, with no framework: the other side of
``scripts/benchmark.py``, run there as a fresh process of its own.

The same work as ``music fit --config pretrain``: MNIST minus 1,000 training samples of each of
3, 4 and 7 (the ``remaining`` split, drawn as ``MusicDataModule`` draws it), SimpleNN
784-128-64-10, Adam (lr 1e-3), batch 32, shuffled, one optimizer step per batch, and a test-set
accuracy at the end. It imports torch and torchvision only, and prints one JSON line: the
wall-clock and CPU time at which each epoch starts and the loop ends, and the optimizer steps taken.

    python scripts/plain_pretrain.py --data-dir /path/to/data --epochs 3 [--fused] [--threads 1]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def held_out_splits(labels: torch.Tensor, held_out=(3, 4, 7), per_class: int = 1000, seed: int = 0) -> dict[int, torch.Tensor]:
    """The training samples held out of each class, sorted, drawn as ``MusicDataModule`` draws them."""
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for c in held_out:
        candidates = (labels == c).nonzero().flatten()
        splits[c] = candidates[torch.randperm(len(candidates), generator=generator)[:per_class]].sort().values
    return splits


def remaining_split(labels: torch.Tensor, held_out=(3, 4, 7), per_class: int = 1000, seed: int = 0) -> torch.Tensor:
    held = torch.zeros(len(labels), dtype=torch.bool)
    for index in held_out_splits(labels, held_out, per_class, seed).values():
        held[index] = True
    return (~held).nonzero().flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=None, help="stop each epoch after this many batches")
    parser.add_argument("--fused", action="store_true", help="torch.optim.Adam(fused=True)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torchvision.datasets.MNIST(args.data_dir, train=train, download=False)
        return raw.data.unsqueeze(1).float().div_(127.5).sub_(1.0), raw.targets

    images, labels = load(train=True)
    test_images, test_labels = load(train=False)
    index = remaining_split(labels)
    images, labels = images[index], labels[index]

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=args.fused or None)
    starts, cpu_starts, steps = [], [], 0
    model.train()
    for _ in range(args.epochs):
        starts.append(time.time())
        cpu_starts.append(time.process_time())
        order = torch.randperm(len(labels))
        for i in range(0, len(labels), 32)[: args.batches]:
            batch = order[i : i + 32]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    end, cpu_end = time.time(), time.process_time()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(test_images[i : i + 1000]).argmax(1) == test_labels[i : i + 1000]).sum())
                      for i in range(0, len(test_labels), 1000))
    print(json.dumps({"epoch_starts": starts, "epoch_cpu_starts": cpu_starts, "train_end": end,
                      "train_end_cpu": cpu_end, "steps": steps, "test_acc": correct / len(test_labels)}))


if __name__ == "__main__":
    main()
