"""A tiny MNIST-shaped dataset made in memory, so unit tests need no files.

``MusicDataModule(dataset="synthetic.SyntheticDigits")`` loads it like a torchvision dataset:
28x28 grey images, ten classes, each class a dim square at its own (jittered) place in noise,
so a model learns it in a few steps, not perfectly, and forgets it as it does MNIST's digits.
"""

from __future__ import annotations

import torch

TRAIN_PER_CLASS, TEST_PER_CLASS = 340, 50


class SyntheticDigits:
    classes = [str(c) for c in range(10)]

    def __init__(self, root: str, train: bool = True, download: bool = False, **_: object) -> None:
        per_class = TRAIN_PER_CLASS if train else TEST_PER_CLASS
        generator = torch.Generator().manual_seed(0 if train else 1)
        labels = torch.arange(10).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=generator)]
        images = torch.randint(0, 150, (len(labels), 28, 28), generator=generator, dtype=torch.uint8)
        shifts = torch.randint(-2, 3, (len(labels), 2), generator=generator)
        for i, (c, (dy, dx)) in enumerate(zip(labels.tolist(), shifts.tolist())):
            row, col = divmod(c, 4)  # each class a dim square at its own place, jittered
            top, left = 4 + 7 * row + dy, 3 + 6 * col + dx
            images[i, top: top + 5, left: left + 5] = images[i, top: top + 5, left: left + 5].clamp(min=120)
        self.data, self.targets = images, labels
