import json

import torch

from music.data import MusicDataModule, split_classes


def test_split_sizes(mnist):
    sizes = {name: len(index) for name, index in mnist.splits.items()}
    assert sizes == {"remaining": 57_000, "class_3": 1000, "class_4": 1000, "class_7": 1000, "merged": 3000}
    assert len(mnist.dataset("test")) == 10_000


def test_splits_are_disjoint_and_cover_the_training_set(mnist):
    parts = [mnist.splits[name] for name in ("remaining", "class_3", "class_4", "class_7")]
    together = torch.cat(parts)
    assert len(together.unique()) == len(together) == 60_000
    assert torch.equal(mnist.splits["merged"], torch.cat(parts[1:]).sort().values)


def test_held_out_splits_hold_only_their_class(mnist):
    for c in (3, 4, 7):
        assert set(mnist.train_labels[mnist.splits[f"class_{c}"]].tolist()) == {c}


def test_pixels_are_scaled_to_minus_one_one(mnist):
    images, labels = mnist.dataset("class_3").__getitems__([0, 1, 2])
    assert images.shape == (3, 1, 28, 28) and labels.tolist() == [3, 3, 3]
    assert mnist.train_images.min() == -1 and mnist.train_images.max() == 1


def test_same_seed_same_splits_other_seed_other_splits(data_dir, mnist):
    same = MusicDataModule(data_dir=data_dir, download=False)
    same.setup()
    other = MusicDataModule(data_dir=data_dir, download=False, split_seed=1)
    other.setup()
    hashes = lambda dm: {n: s["sha256"] for n, s in dm.manifest()["splits"].items() if "sha256" in s}
    assert hashes(same) == hashes(mnist)
    assert hashes(other)["class_3"] != hashes(mnist)["class_3"]


def test_val_split_is_carved_from_remaining(data_dir):
    dm = MusicDataModule(data_dir=data_dir, download=False, val_size=5000)
    dm.setup()
    assert len(dm.splits["val"]) == 5000 and len(dm.splits["remaining"]) == 52_000
    assert not set(dm.splits["val"].tolist()) & set(dm.splits["merged"].tolist())


def test_batches_are_fetched_whole_and_shuffled(mnist):
    x, y = next(iter(mnist.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    assert not torch.equal(y, mnist.train_labels[mnist.splits["remaining"][:32]])


def test_blocks_are_the_batches_a_batch_loader_serves_in_the_same_order(data_dir):
    def batches(blocks: int) -> list[torch.Tensor]:
        dm = MusicDataModule(data_dir=data_dir, download=False, train_split="class_3", batches_per_block=blocks)
        dm.setup()
        torch.manual_seed(0)  # the shuffle's seed comes from torch's generator
        loaded = list(dm.train_dataloader())
        return [y for block in loaded for _, y in block.batches()] if blocks > 1 else [y for _, y in loaded]

    single, blocked = batches(1), batches(5)
    assert [len(y) for y in blocked] == [32] * 31 + [8]  # 1,000 samples: the last batch is short
    assert all(torch.equal(a, b) for a, b in zip(single, blocked, strict=True))


def test_manifest_is_written_as_json(mnist, tmp_path):
    mnist.write_manifest(str(tmp_path / "m.json"))
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["splits"]["class_7"]["class_counts"][7] == 1000
    assert manifest["splits"]["test"]["size"] == 10_000


def test_train_split_is_the_whole_training_set(mnist):
    """The joint upper bound of the study trains on every training sample, held-out ones included."""
    dataset = mnist.dataset("train")
    assert len(dataset) == 60_000 and torch.equal(dataset.labels, mnist.train_labels)
    mnist.check_split("train")  # a phase may train on it


def test_a_split_is_a_task_of_the_classes_that_define_it():
    from_names = {name: split_classes(name, [3, 4, 7]) for name in ("class_3", "merged", "classes_2_5", "remaining", "train")}
    assert from_names == {"class_3": [3], "merged": [3, 4, 7], "classes_2_5": [2, 5], "remaining": None, "train": None}
