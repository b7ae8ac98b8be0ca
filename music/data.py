"""Data: one MNIST-style dataset, split into the study's named training splits.

The study needs several training sets drawn from one training set: ``remaining`` (what the
model is pretrained on), one split per held-out class (``class_3`` ...) and ``merged`` (all
held-out samples at once), optionally a ``val`` split for choosing hyperparameters.  They are
computed once from ``split_seed`` so every run, process and rank sees identical index lists.
``domains`` adds domain tasks: ``<split>@<domain>`` is a split's samples under a fixed input
transform (a rotation, a pixel permutation), for rotated or permuted variants of any dataset;
``<split>@<a>+<b>`` pools them (joint training on every domain, the scenario's upper bound).
Images are scaled to [-1, 1] once and kept in memory; batches are gathered by index, which
keeps the per-step cost at a single tensor ``index_select`` instead of per-sample Python work.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from music.imagefolder import ImageFolderSource
from music.rundir import run_dir
from music.speed import as_block


# The dataset last read by ``MusicDataModule._load`` in this process: ``"source"`` (its class,
# root and files) and, per ``train`` flag, its images and labels.
_LOADED: dict[Any, Any] = {}


def _files_stamp(root: str, dataset_class: type) -> tuple:
    """Size and modification time of every file under ``<root>/<class name>`` (torchvision's
    layout), so a dataset rewritten on disk is read again."""
    folder = os.path.join(root, dataset_class.__name__)
    return tuple(sorted((os.path.join(path, name), st.st_size, st.st_mtime_ns)
                        for path, _, names in os.walk(folder) for name in names
                        for st in [os.stat(os.path.join(path, name))]))


def import_class(path: str, what: str) -> type:
    """Resolve ``package.module.Class`` with an error that names the bad path."""
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Unknown {what} class path {path!r}: expected an importable 'package.module.Class'.") from err


class InMemoryDataset(Dataset):
    """Tensors in memory, fetched a whole batch at a time through ``__getitems__``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for ``__getitems__`` batches, which arrive already stacked."""
    return batch


def split_hash(indices: Tensor) -> str:
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()


BLACK = -1.0  # the darkest pixel once images are scaled to [-1, 1]: what a rotation uncovers
ROTATION_CHUNK = 4096  # images rotated at once: grid_sample's temporaries stay tens of MB


@dataclass
class Domain:
    """One input distribution of a domain-incremental protocol (Rotated MNIST, Permuted MNIST):
    every image of the dataset under one fixed transform, the labels unchanged. A domain with
    neither transform is the dataset itself (e.g. ``rot_0``, the first task of a sequence).

    Args:
        name: what split names call it: ``train@<name>``, ``classes_2_3@<name>``.
        rotate: degrees to rotate every image, counter-clockwise (bilinear; the corners the
            rotation uncovers are black).
        permute_seed: shuffle the pixels by the permutation ``torch.randperm`` draws from this
            seed: the same for every image, train and test, and for all channels, so the task
            stays learnable while no spatial structure is shared with the other domains.
    """

    name: str
    rotate: float = 0.0
    permute_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"Domain name {self.name!r} is not allowed: use letters, digits, '_', '.', '-'.")
        if not math.isfinite(self.rotate):
            raise ValueError(f"Domain {self.name!r} has rotate={self.rotate}: an angle in degrees must be finite.")
        if self.permute_seed is not None and self.permute_seed < 0:
            raise ValueError(f"Domain {self.name!r} has permute_seed={self.permute_seed}: a seed must be >= 0.")
        if self.rotate and self.permute_seed is not None:
            raise ValueError(f"Domain {self.name!r} sets both rotate={self.rotate} and permute_seed="
                             f"{self.permute_seed}: a domain is one transform; define two domains.")

    def permutation(self, pixels: int) -> Tensor | None:
        """The pixel order of ``permute_seed`` for images of ``pixels`` pixels (None: no permutation)."""
        if self.permute_seed is None:
            return None
        return torch.randperm(pixels, generator=torch.Generator().manual_seed(self.permute_seed))

    def apply(self, images: Tensor) -> Tensor:
        """``images`` (N, C, H, W), transformed (the input is never modified in place)."""
        if self.permute_seed is not None:
            order = self.permutation(images.shape[-2] * images.shape[-1])
            return images.flatten(-2)[..., order].reshape(images.shape)
        if self.rotate:
            from torchvision.transforms.functional import InterpolationMode, rotate  # torchvision: only when used

            # rotated with black at 0: grid_sample's zero padding then blends the border into black
            # exactly (torchvision's `fill` blends it through an interpolated mask, leaving grey seams)
            return torch.cat([rotate(chunk - BLACK, float(self.rotate), interpolation=InterpolationMode.BILINEAR) + BLACK
                              for chunk in images.split(ROTATION_CHUNK)]) if len(images) else images
        return images


class MusicDataModule(LightningDataModule):
    """Serves the study's training splits by name and the full official test set.

    Args:
        data_dir: root folder of the torchvision dataset (``<data_dir>/MNIST/raw/...``).
        dataset: import path of a torchvision MNIST-style dataset class; FashionMNIST or KMNIST
            need no code, only this argument.
        download: fetch the dataset if it is missing (needs internet).
        held_out_classes: classes whose samples are held out for fine-tuning (may be empty:
            a protocol of ``classes_*`` tasks, such as Split-MNIST, holds nothing out).
        samples_per_class: how many training samples of each held-out class are held out;
            ``all`` holds out every one, so ``remaining`` has none of those classes and a
            fine-tuning task on one of them is a class the model has never seen.
        split_seed: chooses which samples are held out; same seed, same splits.
        val_size: samples carved from the non-held-out data for a ``val`` split (0: none).
            The test set is never used to choose anything.
        train_split: the split ``train_dataloader`` serves; phases switch it. Besides the fixed
            names, ``classes_<a>_<b>...`` is a task of several classes: every ``remaining``
            sample of those classes (so it never overlaps a held-out split).
        iterations_per_epoch: batches per training epoch, cycling through reshuffled passes of
            the split (a protocol counted in iterations, not epochs); ``None``: one pass.
        batch_size: training batch size.
        batches_per_block: training batches the loader hands over at once, as one ``Block``; the
            model still takes one optimizer step per batch, in the same order, so training is
            unchanged sample for sample. Lightning's loop then runs once per block: for a small
            model on a CPU, its per-step work costs a large share of a plain SimpleNN step
            (docs/speed.md). What
            Lightning counts as a batch (``limit_train_batches``, the progress bar,
            ``val_check_interval``, ``on_train_batch_*`` hooks) is then a block. 1 under DDP.
        eval_batch_size: batch size for validation and test (no gradients, so larger is faster).
        num_workers: loader workers; 0 is fastest for in-memory tensors.
        log_eda: log class counts per split and sample grids (TensorBoard, MLflow, W&B) when fitting starts
            (``music.eda.LogEDA``, which ``music fit`` installs), so a run documents the data it saw.
        image_folder: read a class-per-folder image dataset under ``data_dir`` instead of
            ``dataset`` (see ``music.imagefolder``); the splits work the same.
        domains: input domains (``Domain``: a fixed rotation or pixel permutation) that split
            names may add: ``train@rot_45`` is ``train``'s samples rotated by that domain's 45
            degrees, the same samples and labels; ``train@rot_0+rot_45`` pools both domains'
            (joint training). Transformed once per split and kept, like every split. Phase
            evaluation then also scores each domain task on its own test set.
        label_map: ``label_map[c]`` is the label every sample of class ``c`` is trained and
            tested with, e.g. ``[0, 1, 0, 1, ...]`` for domain-incremental Split-MNIST (the
            position of the digit in its task, a two-output head). Splits still select samples by
            their dataset class (``classes_2_3`` is digits 2 and 3, labelled 0 and 1);
            ``num_classes`` is the number of mapped labels. ``None``: the dataset's labels.
    """

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "torchvision.datasets.MNIST",
        download: bool = True,
        held_out_classes: list[int] = [3, 4, 7],
        samples_per_class: int | Literal["all"] = 1000,
        split_seed: int = 0,
        val_size: int = 0,
        train_split: str = "remaining",
        iterations_per_epoch: int | None = None,
        batch_size: int = 32,
        batches_per_block: int = 1,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        log_eda: bool = False,
        image_folder: ImageFolderSource | None = None,
        domains: list[Domain] = [],
        label_map: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        domains = [d if isinstance(d, Domain) else Domain(**d) for d in domains]  # dicts: from a checkpoint
        # plain dicts: checkpoints stay loadable with weights_only=True
        self.hparams["image_folder"] = asdict(image_folder) if image_folder is not None else None
        self.hparams["domains"] = [asdict(d) for d in domains]
        self.dataset_class = import_class(dataset, "dataset")
        classes = getattr(self.dataset_class, "classes", None)
        self._declared_num_classes = len(classes) if classes and image_folder is None else None
        self.image_folder = image_folder
        _check_held_out(held_out_classes, self._declared_num_classes, dataset)
        names = [d.name for d in domains]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"domains names {repeated} more than once: each domain name must be unique {names}.")
        if image_folder is not None and (domains or label_map is not None):
            raise ValueError("domains and label_map transform in-memory images and labels; image_folder datasets "
                             "are read per batch: use them without domains and label_map.")
        _check_label_map(label_map, self._declared_num_classes, dataset)
        self.domains = {d.name: d for d in domains}
        self.label_map = list(label_map) if label_map is not None else None
        if isinstance(samples_per_class, str) and samples_per_class != "all":
            raise ValueError(f"samples_per_class={samples_per_class!r} is not allowed: an integer >= 1 or 'all'.")
        for name, value, low in (("samples_per_class", 1 if samples_per_class == "all" else samples_per_class, 1),
                                 ("batch_size", batch_size, 1), ("iterations_per_epoch", 1 if iterations_per_epoch is None else iterations_per_epoch, 1),
                                 ("batches_per_block", batches_per_block, 1),
                                 ("eval_batch_size", eval_batch_size, 1), ("val_size", val_size, 0),
                                 ("num_workers", num_workers, 0)):
            if value < low:
                raise ValueError(f"{name}={value} is not allowed: it must be an integer >= {low}.")
        self.data_dir = data_dir
        self.download = download
        self.held_out_classes = list(held_out_classes)
        self.samples_per_class = samples_per_class
        self.iterations_per_epoch = iterations_per_epoch
        self.split_seed = split_seed
        self.val_size = val_size
        self.batch_size = batch_size
        self.batches_per_block = batches_per_block
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.log_eda = log_eda
        self.train_split = train_split
        self.splits: dict[str, Tensor] = {}
        self._datasets: dict[tuple[str, str], Dataset] = {}
        self._device = torch.device("cpu")
        self._manifest_written: str | None = None

    # -- names -------------------------------------------------------------------------------

    @property
    def split_names(self) -> list[str]:
        names = ["remaining", *self.held_out_split_names]
        # "train" is the whole training set (held-out samples included): the joint upper bound
        return names + (["val"] if self.val_size else []) + ["train"]

    def check_split(self, name: str) -> str:
        base, domain = split_domain(name)
        if domain is not None:
            self._check_domain(name, domain)
            self.check_split(base)
            return name
        if name in self.split_names:
            return name
        classes = task_split_classes(name)
        if classes is None:
            domains = f", and any of them on a domain, <split>@{{{','.join(self.domains)}}}" if self.domains else ""
            raise ValueError(f"Unknown split {name!r}: the data module serves {self.split_names} "
                             f"and tasks of several classes, classes_<a>_<b>...{domains}")
        num_classes = self._declared_num_classes or (int(self.train_labels.max()) + 1 if self.splits else None)
        outside = [c for c in classes if num_classes is not None and not 0 <= c < num_classes]
        if outside:
            raise ValueError(f"Split {name!r} names classes {outside}, not classes of {self.hparams.dataset}: "
                             f"allowed are 0..{num_classes - 1}.")
        if self.samples_per_class == "all":
            unseen = [c for c in classes if c in self.held_out_classes]
            if unseen:
                raise ValueError(f"Split {name!r} asks `remaining` for classes {unseen}, but samples_per_class=all holds "
                                 f"out every sample of them: train on class_{unseen[0]} instead, or hold out fewer.")
        return name

    def _check_domain(self, split: str, domain: str) -> None:
        names = domain.split("+")
        unknown = [d for d in names if d not in self.domains]
        if unknown:
            defined = f"data.domains defines {list(self.domains)}" if self.domains else "data.domains is empty"
            raise ValueError(f"Split {split!r} names the domain {unknown[0]!r}, but {defined}.")
        if len(set(names)) < len(names):
            raise ValueError(f"Split {split!r} pools a domain twice: name each domain of {domain!r} once.")

    def task_classes(self, split: str) -> list[int]:
        """The labels a training split holds, as the model sees them (through ``label_map``):
        a phase's task, e.g. for task-incremental masking. A domain does not change them."""
        classes = self._dataset_classes(split_domain(self.check_split(split))[0])
        return classes if self.label_map is None else sorted({self.label_map[c] for c in classes})

    def _dataset_classes(self, split: str) -> list[int]:
        """The dataset classes of a split without a domain (before ``label_map``)."""
        classes = split_classes(split, self.held_out_classes)
        if classes is not None:
            return classes
        self.setup()
        labels = self.train_labels if split == "train" else self.train_labels[self.splits[split]]
        return labels.unique().tolist()

    @property
    def separate_task_tests(self) -> bool:
        """Whether a task's test accuracy needs its own test set (``dataloader(split, test=True)``):
        a domain's test images are transformed, and with ``label_map`` the plain confusion matrix
        no longer tells one task's classes from another's."""
        return bool(self.domains) or self.label_map is not None

    @property
    def train_split(self) -> str:
        return self._train_split

    @train_split.setter
    def train_split(self, name: str) -> None:
        self._train_split = self.check_split(name)

    @property
    def num_classes(self) -> int:
        """The size of the model's label space: the dataset's classes, or ``label_map``'s labels."""
        if self.label_map is not None:
            return max(self.label_map) + 1
        if self._declared_num_classes is not None:
            return self._declared_num_classes
        self.setup()
        return int(self.train_labels.max()) + 1

    # -- loading -----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.download and self.image_folder is None:
            for train in (True, False):
                try:
                    self.dataset_class(self.data_dir, train=train, download=True)
                except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
                    name = self.dataset_class.__name__
                    raise FileNotFoundError(
                        f"Could not download {self.hparams.dataset} into data_dir={os.path.abspath(self.data_dir)!r} "
                        f"({type(err).__name__}: {err}). Without internet, put the files at "
                        f"<data_dir>/{name}/raw (torchvision's layout) or point --data.data_dir at a copy, and set "
                        "--data.download false."
                    ) from err

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.train_images, self.train_labels = self._load(train=True)
            self.test_images, self.test_labels = self._load(train=False)
            _check_label_map(self.label_map, int(self.train_labels.max()) + 1, self.hparams.dataset)
            self.splits = self._make_splits()
        if self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            self._device = self.trainer.strategy.root_device  # batches are then gathered on the GPU
        if self.trainer is not None:
            manifest = os.path.join(run_dir(self.trainer), "split_manifest.json")
            if manifest != self._manifest_written:  # setup runs once per stage, and the EDA figures call it
                self.write_manifest(manifest)
                self._manifest_written = manifest

    def _load(self, train: bool) -> tuple[Tensor | None, Tensor]:
        """Images scaled to [-1, 1] and labels, read once per process: a Dask worker runs many
        study cells on the same files, and reading and scaling MNIST again costs every cell
        (docs/speed.md). Cells only index these tensors, never write into them."""
        if self.image_folder is not None:  # labels only; images are read per split in dataset()
            return None, self.image_folder.labels(self.data_dir, train)
        source = (self.dataset_class, os.path.abspath(self.data_dir), _files_stamp(self.data_dir, self.dataset_class))
        if _LOADED.get("source") != source:  # one dataset at a time: a process that switches keeps no stale copy
            _LOADED.clear()
            _LOADED["source"] = source
        if train not in _LOADED:
            _LOADED[train] = self._read(train)
        return _LOADED[train]

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            raw = self.dataset_class(self.data_dir, train=train, download=False)
        except Exception as err:  # torchvision fails deep inside on missing or truncated files
            where = f"data_dir={os.path.abspath(self.data_dir)!r}"
            if "not found" in str(err).lower():
                raise FileNotFoundError(
                    f"{self.hparams.dataset} not found under {where} and download=False. Point "
                    f"--data.data_dir at a folder holding '{self.dataset_class.__name__}/raw/' "
                    "(torchvision's layout), or set --data.download true."
                ) from err
            raise ValueError(
                f"Could not read {self.hparams.dataset} from {where} ({type(err).__name__}: {err}). "
                "The files may be truncated or corrupted; delete them and download again."
            ) from err
        images = torch.as_tensor(raw.data)
        if images.ndim == 3:  # (N, H, W) grey images
            images = images.unsqueeze(1)
        elif images.ndim == 4 and images.shape[-1] in (1, 3):  # (N, H, W, C)
            images = images.permute(0, 3, 1, 2)
        images = images.float().div_(127.5).sub_(1.0).contiguous()
        return images, torch.as_tensor(raw.targets, dtype=torch.long)

    def _make_splits(self) -> dict[str, Tensor]:
        labels = self.train_labels
        num_classes = int(labels.max()) + 1
        _check_held_out(self.held_out_classes, num_classes, self.hparams.dataset)
        generator = torch.Generator().manual_seed(self.split_seed)
        is_held_out = torch.zeros(len(labels), dtype=torch.bool)
        splits: dict[str, Tensor] = {}
        for c in self.held_out_classes:
            candidates = (labels == c).nonzero().flatten()
            if self.samples_per_class == "all":
                chosen = candidates
            elif self.samples_per_class > len(candidates):
                raise ValueError(
                    f"samples_per_class={self.samples_per_class} is too large: class {c} has only "
                    f"{len(candidates)} training samples, so at most {len(candidates)} can be held out."
                )
            else:
                chosen = candidates[torch.randperm(len(candidates), generator=generator)[: self.samples_per_class]]
            splits[f"class_{c}"] = chosen.sort().values
            is_held_out[chosen] = True
        remaining = (~is_held_out).nonzero().flatten()
        if self.val_size:
            if self.val_size >= len(remaining):
                raise ValueError(f"val_size={self.val_size} leaves no training data: at most {len(remaining) - 1}.")
            order = torch.randperm(len(remaining), generator=generator)
            splits["val"] = remaining[order[: self.val_size]].sort().values
            remaining = remaining[order[self.val_size :]].sort().values
        splits["merged"] = is_held_out.nonzero().flatten()
        splits["remaining"] = remaining
        return {name: splits[name] for name in self.split_names if name in splits}

    # -- loaders -----------------------------------------------------------------------------

    def dataset(self, split: str, *, test: bool = False, val: bool = False) -> Dataset:
        """A training split by name, or ``"test"`` for the full official test set (``test@<domain>``:
        under a domain). ``test=True``: the test set of the training split's task instead, the
        test samples of its classes under its domain (``classes_2_3@perm_1``: test digits 2
        and 3, permuted), labelled as the split is. ``val=True``: the same from the validation
        split (``data.val_size``), so a task can be scored without the test set.

        Each split is gathered (and transformed) once and kept: phases reload the training
        loader every epoch, and copying the ``remaining`` images again each time would add to
        every epoch (docs/speed.md). When training on a GPU the split is kept there, so no
        batch is copied from the host."""
        if test and val:
            raise ValueError(f"dataset({split!r}): test=True and val=True ask for two sets: give one of them.")
        key = (split, str(self._device), test, val)
        if key not in self._datasets:
            self._datasets[key] = self._gather(split, test, val)
        return self._datasets[key]

    def _gather(self, split: str, test: bool = False, val: bool = False) -> Dataset:
        base, domain = split_domain(split)
        if base != "test":
            self.check_split(split)
        elif domain is not None:
            self._check_domain(split, domain)
        index = None  # None: the whole train or test set
        if base == "test":
            test = True
        elif test:
            classes = self._dataset_classes(base)
            if set(classes) != set(self.test_labels.unique().tolist()):
                index = torch.isin(self.test_labels, torch.tensor(classes)).nonzero().flatten()
        elif val:
            if "val" not in self.splits:
                raise ValueError(f"Split {split!r}: its validation samples need a validation split: set data.val_size > 0.")
            index = self.splits["val"]
            index = index[torch.isin(self.train_labels[index], torch.tensor(self._dataset_classes(base)))]
        elif base != "train":
            index = self.splits[base] if base in self.splits else self._task_index(base)
        if self.image_folder is not None:
            return self.image_folder.dataset(self.data_dir, train=not test, index=index)
        images, labels = (self.test_images, self.test_labels) if test else (self.train_images, self.train_labels)
        if index is not None:
            images, labels = images[index], labels[index]
        if domain is not None:  # one domain, or several pooled (a+b: the samples under each)
            names = domain.split("+")
            images = torch.cat([self.domains[d].apply(images) for d in names])
            labels = labels.repeat(len(names))
        if self.label_map is not None:
            labels = torch.tensor(self.label_map)[labels]
        return InMemoryDataset(images.to(self._device), labels.to(self._device))

    def _task_index(self, split: str) -> Tensor:
        classes = task_split_classes(split)
        remaining = self.splits["remaining"]
        index = remaining[torch.isin(self.train_labels[remaining], torch.tensor(classes))]
        missing = [c for c in classes if not (self.train_labels[index] == c).any()]
        if missing:
            raise ValueError(f"Split {split!r}: `remaining` holds no sample of classes {missing}.")
        return index

    @property
    def held_out_split_names(self) -> list[str]:
        return [f"class_{c}" for c in self.held_out_classes] + ["merged"]

    def dataloader(self, split: str, *, shuffle: bool = False, batch_size: int | None = None,
                   distributed: bool = False, batches_per_block: int = 1,
                   iterations: int | None = None, test: bool = False, val: bool = False) -> DataLoader:
        """Any split as a loader (``test``, ``val``: its task's test or validation set, see
        ``dataset``); ``distributed``
        shards it over the ranks (for evaluation run
        outside Lightning's loops, where no sampler is injected). With ``batches_per_block``
        > 1 it yields ``Block``s of that many batches, in the order a batch loader would (the
        shuffled order does not depend on the batch size). ``iterations``: a shuffled loader
        serves that many batches, through as many reshuffled passes as it takes."""
        dataset = self.dataset(split, test=test, val=val)
        if shuffle and len(dataset) == 0:
            raise ValueError(f"Split {split!r} is empty: there is nothing to train on.")
        sampler = DistributedSampler(dataset, shuffle=shuffle) if distributed else None
        batch_size = batch_size or (self.batch_size if shuffle else self.eval_batch_size)
        if shuffle and sampler is None and iterations:
            # passes of fresh permutations, cut at `iterations` batches (RandomSampler's num_samples)
            sampler = RandomSampler(dataset, num_samples=iterations * batch_size)
        return DataLoader(
            dataset,
            batch_size=batch_size * batches_per_block,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=keep_batch if batches_per_block == 1 else partial(as_block, batch_size=batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Under DDP every batch must pass the DDP wrapper's forward: one batch per loop step.
        blocks = self.batches_per_block if self.trainer is None or self.trainer.world_size == 1 else 1
        return self.dataloader(self.train_split, shuffle=True, batches_per_block=blocks,
                               iterations=self.iterations_per_epoch)

    def val_dataloader(self) -> DataLoader | list:
        return self.dataloader("val") if self.val_size else []

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    # -- provenance --------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """Class counts and index hashes: two runs used the same data iff their manifests match."""
        def describe(labels: Tensor, index: Tensor | None = None) -> dict[str, Any]:
            counts = torch.bincount(labels, minlength=int(self.train_labels.max()) + 1)
            entry = {"size": len(labels), "class_counts": counts.tolist()}
            return entry | ({"sha256": split_hash(index)} if index is not None else {})

        splits = {n: describe(self.train_labels[i], i) for n, i in self.splits.items()}
        manifest = {
            "dataset": self.hparams.dataset if self.image_folder is None else os.path.abspath(self.data_dir),
            "held_out_classes": self.held_out_classes,
            "samples_per_class": self.samples_per_class,
            "split_seed": self.split_seed,
            "splits": splits | {"train": describe(self.train_labels), "test": describe(self.test_labels)},
        }
        if self.domains:  # a domain split <split>@<domain> holds <split>'s samples (same sha256), transformed so
            pixels = self.train_images.shape[-2] * self.train_images.shape[-1]
            manifest["domains"] = {name: asdict(d) | ({"permutation_sha256": split_hash(d.permutation(pixels))}
                                                     if d.permute_seed is not None else {})
                                   for name, d in self.domains.items()}
        if self.label_map is not None:  # class_counts count dataset classes; the model sees these labels
            manifest["label_map"] = self.label_map
        return manifest

    @rank_zero_only
    def write_manifest(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.manifest(), f, indent=2)


def split_domain(name: str) -> tuple[str, str | None]:
    """``train@rot_45`` -> ``("train", "rot_45")``; ``("train", None)`` for a split on no domain."""
    base, at, domain = name.partition("@")
    return (base, domain) if at else (name, None)


def split_classes(name: str, held_out_classes: Sequence[int]) -> list[int] | None:
    """The classes that define a split: ``class_3`` -> ``[3]``, ``merged`` -> the held-out
    classes, ``classes_2_3`` -> ``[2, 3]``: a task of the study. ``None`` for a split defined
    otherwise (``remaining``, ``train``, ``val``: whatever classes their samples have)."""
    if name == "merged":
        return list(held_out_classes)
    if re.fullmatch(r"class_\d+", name):
        return [int(name.removeprefix("class_"))]
    return task_split_classes(name)


def task_split_classes(name: str) -> list[int] | None:
    """``classes_2_3`` -> ``[2, 3]``; ``None`` for a name of another form."""
    if not re.fullmatch(r"classes(_\d+)+", name):
        return None
    classes = [int(c) for c in name.split("_")[1:]]
    if len(set(classes)) < len(classes):
        raise ValueError(f"Split {name!r} repeats a class: each class of a task is named once.")
    return classes


def _check_label_map(label_map: Sequence[int] | None, num_classes: int | None, dataset: str) -> None:
    if label_map is None:
        return
    if len(label_map) < 1 or any(not isinstance(v, int) or v < 0 for v in label_map):
        raise ValueError(f"label_map={list(label_map)} is not allowed: one integer label >= 0 per dataset class.")
    unused = sorted(set(range(max(label_map) + 1)) - set(label_map))
    if unused or max(label_map) < 1:
        raise ValueError(f"label_map={list(label_map)} is not allowed: its labels must be 0..K-1 with K >= 2, every "
                         f"one used{f' (unused: {unused})' if unused else ''}.")
    if num_classes is not None and len(label_map) != num_classes:
        raise ValueError(f"label_map={list(label_map)} has {len(label_map)} entries but {dataset} has {num_classes} "
                         "classes: give one label per class.")


def _check_held_out(classes: Sequence[int], num_classes: int | None, dataset: str) -> None:
    duplicates = sorted({c for c in classes if list(classes).count(c) > 1})
    if duplicates:
        raise ValueError(f"held_out_classes={list(classes)} repeats {duplicates}: each class may be held out once.")
    if num_classes is not None:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(
                f"held_out_classes contains {bad}, not a class of {dataset}: allowed are 0..{num_classes - 1}."
            )
