"""Class-per-folder images through MusicDataModule: the same split semantics, batches, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from music.data import MusicDataModule
from music.imagefolder import ImageFolderSource

CLASSES, TRAIN, TEST = 4, 7, 2


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("val", TEST)):
        for c in range(CLASSES):
            (root / split / f"breed_{c}").mkdir(parents=True)
            for i in range(n):
                size = (rng.integers(12, 40), rng.integers(12, 40), 3)
                Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / split / f"breed_{c}" / f"{i}.png")
    return str(root)


def module(tree, **kwargs):
    source = kwargs.pop("source", ImageFolderSource(image_size=16))
    dm = MusicDataModule(data_dir=tree, download=False, image_folder=source, held_out_classes=[1, 3],
                         samples_per_class=3, batch_size=5, **kwargs)
    dm.setup()
    return dm


def test_splits_are_disjoint_and_cover_the_training_folder(tree):
    dm = module(tree, val_size=4)
    assert dm.num_classes == CLASSES
    parts = [dm.splits[s] for s in ("remaining", "class_1", "class_3", "val")]
    everything = torch.cat(parts)
    assert len(everything) == len(set(everything.tolist())) == CLASSES * TRAIN
    assert torch.equal(dm.splits["merged"], torch.cat(parts[1:3]).sort().values)
    for c in (1, 3):
        assert set(dm.dataset(f"class_{c}").labels.tolist()) == {c}
    assert len(dm.dataset("test")) == CLASSES * TEST


@pytest.mark.parametrize("cache", [False, True])
def test_batches_are_resized_normalised_tensors(tree, cache):
    dm = module(tree, source=ImageFolderSource(image_size=16, cache=cache))
    x, y = next(iter(dm.dataloader("remaining", shuffle=True)))
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert -1 <= x.min() and x.max() <= 1  # mean = std = 0.5 maps [0, 1] to [-1, 1]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (CLASSES * TEST, 3, 16, 16) and y.tolist() == sorted(y.tolist())


def test_cached_and_lazy_batches_are_identical(tree):
    lazy, cached = (module(tree, source=ImageFolderSource(image_size=16, cache=c)) for c in (False, True))
    a, b = lazy.dataset("merged"), cached.dataset("merged")
    assert torch.equal(a.__getitems__([0, 2, 4])[0], b.__getitems__([0, 2, 4])[0])


def test_timm_data_config_sets_size_and_normalisation(tree):
    pytest.importorskip("timm")
    dm = MusicDataModule(tree, download=False, image_folder=ImageFolderSource(timm_model="vit_tiny_patch16_224"),
                         held_out_classes=[0], samples_per_class=1)
    dm.setup()
    assert dm.dataset("test")[0][0].shape == (3, 224, 224)


def test_missing_folder_and_missing_size_fail_clearly(tree, tmp_path):
    with pytest.raises(ValueError, match="needs image_size or timm_model"):
        ImageFolderSource()
    with pytest.raises(FileNotFoundError, match="must hold 'train/' and 'val/'"):
        module(str(tmp_path))
