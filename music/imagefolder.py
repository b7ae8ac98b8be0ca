"""Class-per-folder image datasets (ImageWoof, ...) as a source of ``MusicDataModule``.

The split logic (held-out classes, ``remaining``, ``class_<c>``, ``merged``, ``val``) is the
data module's and needs only the labels, which a folder scan gives without decoding a single
image. This file supplies the images: decoded lazily per batch, or once into memory
(``cache``) for small datasets. Resizing and normalisation follow the backbone's timm data
config (``timm_model``), so a pretrained ViT sees inputs like those it was trained on.

    data:
      data_dir: /data/imagewoof2          # holds train/<class>/*.JPEG and val/<class>/*.JPEG
      download: false
      image_folder: {timm_model: vit_tiny_patch16_224, cache: false}
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class ImageFolderSource:
    """Where the images are and how they are prepared.

    Args:
        train_dir: sub-folder of ``data_dir`` with the training images, one folder per class.
        test_dir: sub-folder with the test images (ImageWoof calls it ``val``); same classes.
        timm_model: take input size, interpolation, crop fraction, mean and std from this timm
            model's pretrained data config (e.g. ``vit_tiny_patch16_224``).
        image_size: square input size (overrides the timm config; required without it).
        mean, std: per-channel normalisation (override the timm config; default 0.5, i.e. [-1, 1]).
        crop_pct: resize the short side to ``image_size / crop_pct``, then centre-crop.
        cache: decode every image once into memory (uint8) instead of once per batch.
    """

    train_dir: str = "train"
    test_dir: str = "val"
    timm_model: str | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_pct: float | None = None
    cache: bool = False

    def __post_init__(self) -> None:
        config = {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 1.0,
                  "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        if self.timm_model is not None:
            import timm
            from timm.data import resolve_data_config

            config |= resolve_data_config({}, model=timm.create_model(self.timm_model, pretrained=False))
        elif self.image_size is None:
            raise ValueError("ImageFolderSource needs image_size or timm_model (whose data config gives the size).")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size={self.image_size} is not allowed: it must be >= 1.")
        self.size = self.image_size or config["input_size"][-1]
        self.crop = self.crop_pct or config["crop_pct"]
        if not 0 < self.crop <= 1:
            raise ValueError(f"crop_pct={self.crop} is not allowed: it must be in (0, 1].")
        self.interpolation = config["interpolation"]
        self.norm_mean = torch.tensor(self.mean or config["mean"]).view(1, -1, 1, 1)
        self.norm_std = torch.tensor(self.std or config["std"]).view(1, -1, 1, 1)
        self._folders: dict[str, object] = {}
        self._cached: dict[str, Tensor] = {}

    def folder(self, root: str, train: bool):
        """torchvision's ImageFolder (a scan: paths and labels, nothing decoded)."""
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        path = os.path.join(root, self.train_dir if train else self.test_dir)
        if path not in self._folders:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"Image folder {os.path.abspath(path)!r} not found: data_dir={root!r} must "
                                        f"hold '{self.train_dir}/' and '{self.test_dir}/', one sub-folder per class.")
            mode = transforms.InterpolationMode(self.interpolation)
            prepare = transforms.Compose([transforms.Resize(int(self.size / self.crop), interpolation=mode),
                                          transforms.CenterCrop(self.size), transforms.PILToTensor()])
            self._folders[path] = ImageFolder(path, transform=prepare)
        return self._folders[path]

    def labels(self, root: str, train: bool) -> Tensor:
        folder = self.folder(root, train)
        if not train:
            classes = self.folder(root, True).classes
            if folder.classes != classes:
                raise ValueError(f"The test folder's classes {folder.classes} differ from the training folder's {classes}.")
        return torch.as_tensor(folder.targets, dtype=torch.long)

    def dataset(self, root: str, train: bool, index: Tensor | None) -> "FolderDataset":
        folder = self.folder(root, train)
        index = torch.arange(len(folder)) if index is None else index
        images = None
        if self.cache:
            key = folder.root
            if key not in self._cached:
                self._cached[key] = torch.stack([folder[i][0] for i in range(len(folder))])
            images = self._cached[key][index]
        return FolderDataset(folder, index, self, images)

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() / 255 - self.norm_mean) / self.norm_std


class FolderDataset(Dataset):
    """Samples ``index`` of an ImageFolder; whole batches through ``__getitems__`` (stacked and
    normalised), like the MNIST data module's in-memory datasets."""

    def __init__(self, folder, index: Tensor, source: ImageFolderSource, images: Tensor | None = None) -> None:
        self.folder, self.index, self.source, self.images = folder, index, source, images
        self.labels = torch.as_tensor(folder.targets, dtype=torch.long)[index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([i])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        if self.images is not None:
            raw = self.images[torch.as_tensor(indices)]
        else:
            raw = torch.stack([self.folder[int(self.index[i])][0] for i in indices])
        return self.source.normalize(raw), self.labels[torch.as_tensor(indices)]
