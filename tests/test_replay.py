"""The data module's additions for the study: the `train` split (joint upper bound) and replay."""

import pytest
import torch

from music.data import MusicDataModule


@pytest.fixture(scope="module")
def with_replay(data_dir) -> MusicDataModule:
    datamodule = MusicDataModule(data_dir=data_dir, download=False, replay_size=300)
    datamodule.setup()
    return datamodule


def test_train_split_is_the_whole_training_set(mnist):
    dataset = mnist.dataset("train")
    assert len(dataset) == 60_000 and torch.equal(dataset.labels, mnist.train_labels)
    mnist.check_split("train")  # a phase may train on it


def test_replay_buffer_is_a_seeded_subset_of_remaining_and_changes_no_split(with_replay, mnist):
    buffer = with_replay.replay_index
    assert len(buffer) == 300 == len(buffer.unique())
    assert set(buffer.tolist()) <= set(mnist.splits["remaining"].tolist())
    assert all(torch.equal(with_replay.splits[n], mnist.splits[n]) for n in mnist.splits)  # other splits untouched
    again = MusicDataModule(data_dir=with_replay.data_dir, download=False, replay_size=300)
    again.setup()
    assert torch.equal(again.replay_index, buffer)
    assert with_replay.manifest()["splits"]["replay"]["size"] == 300


def test_replay_is_mixed_into_held_out_training_loaders_only(with_replay):
    for split, size in (("class_3", 1300), ("merged", 3300), ("remaining", 57_000)):
        with_replay.train_split = split
        assert len(with_replay.train_dataloader().dataset) == size, split
    assert len(with_replay.dataset("class_3")) == 1000  # evaluation and direct access: no replay
    with_replay.train_split = "class_3"
    labels = with_replay.train_dataloader().dataset.labels
    assert (labels == 3).sum() >= 1000 and (labels != 3).sum() > 200  # the buffer holds the other classes


@pytest.mark.parametrize("size, message", [(-1, "replay_size=-1"), (57_001, "replay_size=57001 is too large")])
def test_bad_replay_size(data_dir, size, message):
    with pytest.raises(ValueError, match=message):
        MusicDataModule(data_dir=data_dir, download=False, replay_size=size).setup()
