import json

import pytest
import torch
from conftest import SYNTHETIC

from music.data import Domain, MusicDataModule, split_classes, split_domain
from music.imagefolder import ImageFolderSource


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


# -- domains: rotated and permuted variants of a dataset (synthetic data) -----------------------

DOMAINS = [{"name": "rot_0"}, {"name": "rot_90", "rotate": 90}, {"name": "perm_1", "permute_seed": 1},
           {"name": "perm_2", "permute_seed": 2}]


def synthetic(tmp_path, **kwargs) -> MusicDataModule:
    datamodule = MusicDataModule(data_dir=str(tmp_path / "data"), download=False, **SYNTHETIC, **kwargs)
    datamodule.setup()
    return datamodule


def test_a_domain_split_is_its_split_transformed_with_the_same_labels(tmp_path):
    dm = synthetic(tmp_path, domains=DOMAINS)
    for split in ("class_3", "remaining", "classes_2_5", "train"):
        plain = dm.dataset(split)
        for domain in ("rot_90", "perm_1"):
            moved = dm.dataset(f"{split}@{domain}")
            assert torch.equal(moved.labels, plain.labels) and moved.images.shape == plain.images.shape
            assert not torch.equal(moved.images, plain.images)
    assert torch.equal(dm.dataset("train@rot_0").images, dm.train_images)  # no transform: the dataset itself
    assert dm.dataset("train@perm_1") is dm.dataset("train@perm_1")  # transformed once, then kept


def test_rotation_turns_the_images_counter_clockwise_the_same_in_train_and_test(tmp_path):
    dm = synthetic(tmp_path, domains=DOMAINS)
    for split, images in (("train@rot_90", dm.train_images), ("test@rot_90", dm.test_images)):
        assert torch.allclose(dm.dataset(split).images, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-5)
    again = synthetic(tmp_path, domains=[{"name": "r", "rotate": 30}])
    assert torch.equal(again.dataset("class_3@r").images, synthetic(tmp_path, domains=[{"name": "r", "rotate": 30}])
                       .dataset("class_3@r").images)  # deterministic
    assert again.dataset("class_3@r").images.min() == -1  # the uncovered corners are black
    black = torch.full((2, 1, 28, 28), -1.0)
    assert torch.equal(Domain("r", rotate=30).apply(black), black)  # no grey seam where the corners meet the image


def test_a_permutation_is_fixed_by_its_seed_and_shared_by_train_and_test(tmp_path):
    dm = synthetic(tmp_path, domains=DOMAINS)
    order = Domain("p", permute_seed=1).permutation(28 * 28)
    assert sorted(order.tolist()) == list(range(784)) and order.tolist() != list(range(784))
    assert torch.equal(dm.dataset("train@perm_1").images.flatten(1), dm.train_images.flatten(1)[:, order])
    assert torch.equal(dm.dataset("test@perm_1").images.flatten(1), dm.test_images.flatten(1)[:, order])
    assert not torch.equal(dm.dataset("train@perm_2").images, dm.dataset("train@perm_1").images)
    other = synthetic(tmp_path, domains=DOMAINS, split_seed=3)  # other splits, the same permutation
    assert torch.equal(other.dataset("train@perm_1").images, dm.dataset("train@perm_1").images)
    assert dm.manifest()["domains"]["perm_1"]["permutation_sha256"] == other.manifest()["domains"]["perm_1"][
        "permutation_sha256"] != dm.manifest()["domains"]["perm_2"]["permutation_sha256"]
    assert "domains" not in synthetic(tmp_path).manifest()


def test_a_task_test_set_is_the_test_samples_of_its_classes_under_its_domain(tmp_path):
    dm = synthetic(tmp_path, domains=DOMAINS)
    task = dm.dataset("classes_2_5@perm_1", test=True)
    keep = (dm.test_labels == 2) | (dm.test_labels == 5)
    assert torch.equal(task.labels, dm.test_labels[keep]) and len(task) == 100
    assert torch.equal(task.images, dm.dataset("test@perm_1").images[keep])
    assert torch.equal(dm.dataset("train@rot_90", test=True).images, dm.dataset("test@rot_90").images)
    assert len(dm.dataset("class_3", test=True)) == 50


def test_pooled_domains_hold_each_domains_samples_once_in_train_and_test(tmp_path):
    dm = synthetic(tmp_path, domains=DOMAINS)
    for split in ("train", "classes_2_5", "test"):
        pooled = dm.dataset(f"{split}@perm_1+rot_90")
        one, other = dm.dataset(f"{split}@perm_1"), dm.dataset(f"{split}@rot_90")
        assert torch.equal(pooled.images, torch.cat([one.images, other.images]))
        assert torch.equal(pooled.labels, torch.cat([one.labels, other.labels]))
    assert torch.equal(dm.dataset("classes_2_5@perm_1+perm_2", test=True).images,
                       torch.cat([dm.dataset("classes_2_5@perm_1", test=True).images,
                                  dm.dataset("classes_2_5@perm_2", test=True).images]))
    assert dm.task_classes("train@perm_1+perm_2") == list(range(10))


def test_domain_split_names_are_parsed(tmp_path):
    assert split_domain("classes_0_1@perm_2") == ("classes_0_1", "perm_2") and split_domain("train") == ("train", None)
    dm = synthetic(tmp_path, domains=DOMAINS)
    assert dm.check_split("remaining@perm_1") == "remaining@perm_1"
    assert dm.task_classes("classes_2_5@perm_1") == [2, 5] and dm.task_classes("class_3@rot_90") == [3]
    dm.train_split = "merged@rot_90"  # a phase may train on it
    assert torch.equal(next(iter(dm.dataloader("merged@rot_90")))[1], dm.dataset("merged").labels[:1000])


@pytest.mark.parametrize(("kwargs", "split", "message"), [
    ({"domains": DOMAINS}, "train@rot_45", r"Split 'train@rot_45' names the domain 'rot_45', but data.domains "
                                           r"defines \['rot_0', 'rot_90', 'perm_1', 'perm_2'\]"),
    ({}, "train@rot_45", "names the domain 'rot_45', but data.domains is empty"),
    ({"domains": DOMAINS}, "class_5@perm_1", r"Unknown split 'class_5'.*<split>@\{rot_0,rot_90,perm_1,perm_2\}"),
    ({"domains": DOMAINS}, "test@perm_3", "Split 'test@perm_3' names the domain 'perm_3'"),
    ({"domains": DOMAINS}, "train@perm_1+perm_3", "Split 'train@perm_1\\+perm_3' names the domain 'perm_3'"),
    ({"domains": DOMAINS}, "train@perm_1+perm_1", "pools a domain twice: name each domain of 'perm_1\\+perm_1' once"),
])
def test_bad_domain_split_names_are_refused_in_one_line(tmp_path, kwargs, split, message):
    dm = synthetic(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=message):
        dm.dataset(split)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"domains": [{"name": "r"}, {"name": "r", "rotate": 45}]}, r"domains names \['r'\] more than once"),
    ({"domains": [{"name": "r", "rotate": 45, "permute_seed": 1}]}, "sets both rotate=45 and permute_seed=1"),
    ({"domains": [{"name": "r@1"}]}, "Domain name 'r@1' is not allowed"),
    ({"domains": [{"name": "r+1"}]}, r"Domain name 'r\+1' is not allowed"),
    ({"domains": [{"name": "r", "rotate": float("nan")}]}, "must be finite"),
    ({"domains": [{"name": "p", "permute_seed": -1}]}, "permute_seed=-1: a seed must be >= 0"),
    ({"label_map": [0, 1]}, r"label_map=\[0, 1\] has 2 entries but synthetic.SyntheticDigits has 10 classes"),
    ({"label_map": [0, 2] * 5}, r"every one used \(unused: \[1\]\)"),
    ({"label_map": [0] * 10}, "K >= 2"),
    ({"label_map": [0, -1] * 5}, "one integer label >= 0 per dataset class"),
    ({"domains": DOMAINS, "image_folder": ImageFolderSource(image_size=8)}, "image_folder datasets are read per batch"),
])
def test_bad_domains_and_label_maps_are_refused_in_one_line(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic(tmp_path, **kwargs)


def test_label_map_labels_every_split_and_the_test_set_by_position_in_the_task(tmp_path):
    plain = synthetic(tmp_path, held_out_classes=[])
    dm = synthetic(tmp_path, held_out_classes=[], label_map=[0, 1] * 5)
    assert dm.num_classes == 2 and dm.task_classes("classes_2_3") == [0, 1] and dm.task_classes("train") == [0, 1]
    for split in ("classes_2_3", "classes_8_9", "train"):
        assert torch.equal(dm.dataset(split).labels, plain.dataset(split).labels % 2)
        assert torch.equal(dm.dataset(split).images, plain.dataset(split).images)
    assert torch.equal(dm.dataset("test").labels, dm.test_labels % 2)
    task = dm.dataset("classes_4_5", test=True)  # the task's own test digits, labelled by position
    assert torch.equal(task.labels, plain.dataset("classes_4_5", test=True).labels - 4)
    assert dm.manifest()["label_map"] == [0, 1] * 5 and dm.separate_task_tests and not plain.separate_task_tests
