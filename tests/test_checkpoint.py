"""Checkpoint I/O: safe loading (never runs pickled code) and atomic writes."""

import re

import pytest
import torch
from safetensors.torch import save_file

from music.checkpoint import (AtomicCheckpointIO, CheckpointError, check_fits, load_state_dict, read_checkpoint,
                              write_atomically)
from music.task_vector import TaskVector


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _CreatesFileWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _CreatesFileWhenUnpickled(str(marker))},
               evil)
    torch.save({"w": torch.zeros(1)}, tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"refused to load {evil}: not a plain weights file")):
        load_state_dict(evil)
    with pytest.raises(CheckpointError, match="refused"):
        TaskVector.from_checkpoints(tmp_path / "ok.pt", evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)["x"].close()  # control: the payload is real
    assert marker.exists()


def test_checkpoint_formats_and_backbone_prefix(tmp_path):
    w, b = torch.randn(3, 4), torch.randn(3)
    torch.save({"state_dict": {"backbone.fc1.weight": w, "backbone.fc1.bias": b},
                "epoch": 3, "hyper_parameters": {"lr": 0.1}}, tmp_path / "m.ckpt")
    assert_same(load_state_dict(tmp_path / "m.ckpt"), {"fc1.weight": w, "fc1.bias": b})
    torch.save({"backbone.fc1.weight": w, "head.weight": b}, tmp_path / "mixed.pt")
    assert set(load_state_dict(tmp_path / "mixed.pt")) == {"backbone.fc1.weight", "head.weight"}
    torch.save({"state_dict": {"fc1.weight": w}}, tmp_path / "wrapped.pth")
    assert_same(load_state_dict(tmp_path / "wrapped.pth"), {"fc1.weight": w})
    save_file({"fc1.weight": w}, str(tmp_path / "m.safetensors"))
    assert_same(load_state_dict(tmp_path / "m.safetensors"), {"fc1.weight": w})
    torch.save({"state_dict": {"backbone.fc1.weight": w + 1, "backbone.fc1.bias": b}},
               tmp_path / "ft.ckpt")
    tv = TaskVector.from_checkpoints(tmp_path / "m.ckpt", tmp_path / "ft.ckpt")
    assert set(tv.tensors) == {"fc1.weight", "fc1.bias"}
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_state_dict(tmp_path / "nothing.pt")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_state_dict(tmp_path / "nope.ckpt")


def test_atomic_writes_leave_no_temporary_file_and_replace_whole(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_atomically(path, "old")
    write_atomically(path, "new")
    assert path.read_text() == "new"
    write_atomically(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(Exception):
        io.save_checkpoint({"state_dict": {"w": lambda: None}}, path)  # unpicklable: fails mid-save
    assert torch.equal(load_state_dict(path)["w"], torch.ones(1))


def test_unreadable_files_are_named_with_what_is_wrong(tmp_path):
    """Each is a ``CheckpointError`` (one line at the CLI), never the reader's own exception."""
    save_file({"fc1.weight": torch.randn(3, 4)}, str(tmp_path / "m.safetensors"))
    whole = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) - 8])
    (tmp_path / "header.safetensors").write_bytes(b"\xff" * 8 + whole[8:])
    torch.save({"w": torch.randn(100)}, tmp_path / "m.pt")
    pt = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(pt[: len(pt) // 2])
    (tmp_path / "notes.ckpt").write_text("epoch: 3\n")
    cases = {"cut.safetensors": "as a safetensors file", "header.safetensors": "as a safetensors file",
             "cut.pt": "as a torch file", "notes.ckpt": "as a torch file"}
    for name, what in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(f"could not read {tmp_path / name} {what}")):
            load_state_dict(tmp_path / name)
    with pytest.raises(CheckpointError, match="as a torch file"):
        read_checkpoint(tmp_path / "notes.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(tmp_path / "m.pt")


def test_weights_of_another_shape_or_architecture_are_refused_before_loading():
    model = {"fc1.weight": torch.zeros(128, 784), "fc1.bias": torch.zeros(128)}
    check_fits("same.pt", {"fc1.weight": torch.ones(128, 784)}, model)
    with pytest.raises(CheckpointError, match=re.escape("fc1.weight is [32, 784] in the file but [128, 784]")):
        check_fits("small.pt", {"fc1.weight": torch.ones(32, 784)}, model)
    with pytest.raises(CheckpointError, match="none of its 1 tensors"):
        check_fits("vit.pt", {"blocks.0.attn.qkv.weight": torch.ones(3, 3)}, model)
    check_fits("lora.ckpt", {"blocks.0.lora_A": torch.ones(3, 3)}, model, require_common=False)
