"""Backbones: plain ``nn.Module`` networks that the Lightning module wraps.

Keeping the backbone free of Lightning means the same network can be built from a
checkpoint, edited with task vectors or wrapped with LoRA without training code.
"""

from __future__ import annotations

from torch import Tensor, nn


class SimpleNN(nn.Module):
    """The study's MLP: 784 -> 128 -> 64 -> 10 with ReLU (109,386 parameters by default).

    Sizes are arguments so other datasets (another resolution or number of classes) fit.
    Images of any shape are flattened, so it takes the data module's ``(N, 1, 28, 28)`` batches.
    """

    def __init__(self, in_features: int = 784, hidden: tuple[int, int] = (128, 64), num_classes: int = 10) -> None:
        super().__init__()
        sizes = {"in_features": in_features, "hidden": list(hidden), "num_classes": num_classes}
        if len(hidden) != 2 or not all(isinstance(n, int) and n >= 1 for n in (in_features, *hidden, num_classes)):
            raise ValueError(f"SimpleNN({', '.join(f'{k}={v}' for k, v in sizes.items())}) is not allowed: "
                             "hidden is two layer widths, and every width must be an integer >= 1.")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.fc1(self.flatten(x)))
        x = self.relu(self.fc2(x))
        return self.fc3(x)
