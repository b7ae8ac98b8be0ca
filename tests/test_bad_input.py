"""Every bad input fails early, with one line naming the value and what is allowed.

One table: each row is what a user types after ``music fit --config seq`` (on the synthetic
dataset) and the words the one-line ``error: ...`` on stderr must contain; the command exits
with code 2, prints no traceback, and leaves files already written untouched.
"""

import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from music.cli import main
from music.speed import Block
from music.module import Classifier

PHASE = "[{name: a, split: remaining, epochs: %s%s}]"

CASES = [
    ("held-out class not in dataset", ["--data.held_out_classes", "[3,11]"], r"\[11\].*allowed are 0\.\.9"),
    ("duplicate held-out class", ["--data.held_out_classes", "[3,4,3]"], r"repeats \[3\]"),
    ("training on merged with no held-out class",
     ["--data.held_out_classes", "[]", "--schedule.phases", "[{name: a, split: merged, epochs: 1}]"], "Split 'merged' is empty"),
    ("samples_per_class <= 0", ["--data.samples_per_class", "0"], r"samples_per_class=0.*>= 1"),
    ("samples_per_class > class size", ["--data.samples_per_class", "400"],
     "samples_per_class=400 is too large: class 3 has only 340"),
    ("val_size leaves nothing", ["--data.val_size", "4000"], "val_size=4000 leaves no training data"),
    ("unknown train split", ["--data.train_split", "class_5"], r"Unknown split 'class_5'.*\['remaining'"),
    ("unknown dataset class", ["--data.dataset", "torchvision.datasets.MNSIT"],
     "Unknown dataset class path 'torchvision.datasets.MNSIT'"),
    ("data missing, no download", ["--data.dataset", "torchvision.datasets.MNIST", "--data.data_dir", "/nonexistent/data"],
     r"data_dir='/nonexistent/data'.*--data.data_dir"),
    ("empty phase list", ["--schedule.phases", "[]"], "phases is empty"),
    ("epochs < 1", ["--schedule.phases", PHASE % (0, "")], r"epochs=0: it must be an integer >= 1"),
    ("phase lr <= 0", ["--schedule.phases", PHASE % (1, ", lr: -0.1")], "lr=-0.1"),
    ("duplicate phase name", ["--schedule.phases", "[{name: a, split: remaining, epochs: 1}, {name: a, split: merged, epochs: 1}]"],
     "used twice"),
    ("unknown split in a phase", ["--schedule.phases", "[{name: a, split: class_5, epochs: 1}]"],
     r"Unknown split 'class_5'.*serves \['remaining', 'class_3', 'class_4', 'class_7', 'merged', 'train'\]"),
    ("task class outside the dataset", ["--schedule.phases", "[{name: a, classes: [2, 12], epochs: 1}]"],
     r"Split 'classes_2_12' names classes \[12\].*allowed are 0\.\.9"),
    ("task asks remaining for a class held out entirely",
     ["--data.samples_per_class", "all", "--schedule.phases", "[{name: a, classes: [2, 3], epochs: 1}]"],
     r"Split 'classes_2_3' asks `remaining` for classes \[3\], but samples_per_class=all"),
    ("model lr <= 0", ["--model.lr", "-1"], r"lr=-1.0.*must be > 0"),
    ("init_from file missing", ["--model.init_from", "nope.ckpt"], "nope.ckpt"),
    ("batches_per_block < 1", ["--data.batches_per_block", "0"], r"batches_per_block=0.*>= 1"),
    ("gradient clipping with blocks", ["--trainer.gradient_clip_val", "1.0"],
     r"trainer.gradient_clip_val=1.0 is not allowed with data.batches_per_block=32.*--data.batches_per_block 1"),
    ("unknown config key", ["--data.held_out_clases", "[1]"], "held_out_clases"),
    ("unknown model class path", ["--model.backbone.class_path", "music.models.SimpleCNN"], "music.models.SimpleCNN"),
    ("wrong type", ["--data.samples_per_class", "many"], "samples_per_class"),
    ("unknown shipped config", ["--config", "seqq"], r"'seqq' is neither a file nor a shipped config"),
    ("validate without a val split", ["validate"], r"music validate needs a validation split: set data.val_size > 0"),
]


def fails_in_one_line(args: list, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_naming_the_value(args, message, shrink, tmp_path, capsys):
    config = shrink("seq")
    earlier = tmp_path / "logs" / "seq" / "version_0"  # a run already written must stay as it was
    earlier.mkdir(parents=True)
    (earlier / "phase_metrics.json").write_text("{}")
    subcommand, args = (args[0], args[1:]) if args[0] == "validate" else ("fit", args)
    line = fails_in_one_line([subcommand, "--config", config, *args], capsys)
    assert re.search(message, line), line
    assert sorted(p.name for p in earlier.iterdir()) == ["phase_metrics.json"]
    assert (earlier / "phase_metrics.json").read_text() == "{}"


def test_truncated_dataset_file_is_named(shrink_mnist, tmp_path, data_dir, capsys):
    root = tmp_path / "data"
    shutil.copytree(Path(data_dir) / "MNIST", root / "MNIST")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100_000])
    line = fails_in_one_line(["fit", "--config", shrink_mnist("seq"), "--data.data_dir", root], capsys)
    assert "truncated or corrupted" in line


def test_download_without_network_says_where_to_put_the_files(shrink, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    line = fails_in_one_line(["fit", "--config", shrink("seq"), "--data.dataset", "torchvision.datasets.MNIST",
                              "--data.data_dir", tmp_path / "empty", "--data.download", "true"], capsys)
    assert "Could not download torchvision.datasets.MNIST" in line and "<data_dir>/MNIST/raw" in line
    assert "--data.download false" in line


def test_debug_shows_the_traceback(shrink, monkeypatch):
    monkeypatch.setenv("MUSIC_DEBUG", "1")
    with pytest.raises(ValueError, match="lr=-1.0"):
        main(["fit", "--config", str(shrink("seq")), "--model.lr", "-1"])


def test_a_block_given_to_a_model_built_without_blocks_is_named():
    with pytest.raises(ValueError, match=r"block of 3 batches but the model has batches_per_block=1"):
        Classifier().training_step(Block(torch.zeros(5, 784), torch.zeros(5, dtype=torch.long), 2), 0)
