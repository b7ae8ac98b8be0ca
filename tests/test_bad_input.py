"""Every bad input fails early, with a message naming the value and what is allowed.

One table: each row builds the bad input the way a user would (a constructor argument, a
config value, a file) and names the error and the words its message must contain.
"""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run

from music.callbacks import Phase, SequentialFineTuning
from music.data import Block, MusicDataModule
from music.module import Classifier


def data(**kwargs):
    return lambda ctx: MusicDataModule(**kwargs)


def data_setup(**kwargs):
    return lambda ctx: MusicDataModule(**({"data_dir": ctx["data_dir"], "download": False} | kwargs)).setup()


def phases(*items):
    return lambda ctx: SequentialFineTuning(list(items))


def cli(name, *args, phases=None):
    return lambda ctx: run("fit", "--config", ctx["shrink"](name, phases=phases), *args)


def truncated_mnist(ctx):
    root = ctx["tmp_path"] / "data"
    shutil.copytree(Path(ctx["data_dir"]) / "MNIST", root / "MNIST")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100_000])
    MusicDataModule(data_dir=str(root), download=False).setup()


def empty_merged(ctx):
    datamodule = MusicDataModule(data_dir=ctx["data_dir"], download=False, held_out_classes=[])
    datamodule.setup()
    datamodule.dataloader("merged", shuffle=True)


def missing_init_from(ctx):
    Classifier(init_from=str(ctx["tmp_path"] / "nope.ckpt")).setup("fit")


CASES = [
    ("held-out class not in dataset", data(held_out_classes=[3, 11]), ValueError, r"\[11\].*allowed are 0\.\.9"),
    ("duplicate held-out class", data(held_out_classes=[3, 4, 3]), ValueError, r"repeats \[3\]"),
    ("training on merged with no held-out class",
     lambda ctx: empty_merged(ctx),
     ValueError, "Split 'merged' is empty"),
    ("samples_per_class <= 0", data(samples_per_class=0), ValueError, r"samples_per_class=0.*>= 1"),
    ("samples_per_class > class size", data_setup(samples_per_class=6000), ValueError,
     "samples_per_class=6000 is too large: class 4 has only 5842"),
    ("val_size leaves nothing", data_setup(val_size=57_000), ValueError, "val_size=57000 leaves no training data"),
    ("unknown train split", data(train_split="class_5"), ValueError, r"Unknown split 'class_5'.*\['remaining'"),
    ("unknown dataset class", data(dataset="torchvision.datasets.MNSIT"), ValueError,
     "Unknown dataset class path 'torchvision.datasets.MNSIT'"),
    ("data missing, no download", data_setup(data_dir="/nonexistent/data"), FileNotFoundError,
     r"data_dir='/nonexistent/data'.*--data.data_dir"),
    ("truncated dataset file", truncated_mnist, ValueError, "truncated or corrupted"),
    ("empty phase list", phases(), ValueError, "phases is empty"),
    ("epochs < 1", phases(Phase("pretrain", "remaining", 0)), ValueError, r"epochs=0: it must be an integer >= 1"),
    ("phase lr <= 0", phases(Phase("pretrain", "remaining", 1, lr=-0.1)), ValueError, "lr=-0.1"),
    ("duplicate phase name", phases(Phase("a", "remaining", 1), Phase("a", "merged", 1)), ValueError, "used twice"),
    ("unknown split in a phase", cli("merged", phases=[{"name": "a", "split": "class_5", "epochs": 1}]), ValueError,
     r"Unknown split 'class_5'.*serves \['remaining', 'class_3', 'class_4', 'class_7', 'merged', 'train'\]"),
    ("model lr <= 0", lambda ctx: Classifier(lr=0.0), ValueError, r"lr=0.0.*must be > 0"),
    ("model lr <= 0 from the config", cli("seq", "--model.lr", "-1"), ValueError, r"lr=-1.0.*must be > 0"),
    ("init_from file missing", missing_init_from, FileNotFoundError, "nope.ckpt"),
    ("batches_per_block < 1", data(batches_per_block=0), ValueError, r"batches_per_block=0.*>= 1"),
    ("gradient clipping with blocks", cli("seq", "--trainer.gradient_clip_val", "1.0"), ValueError,
     r"trainer.gradient_clip_val=1.0 is not allowed with data.batches_per_block=32.*--data.batches_per_block 1"),
    ("blocks for a model built without them",
     lambda ctx: Classifier().training_step(Block(torch.zeros(5, 784), torch.zeros(5, dtype=torch.long), 2), 0),
     ValueError, r"block of 3 batches but the model has batches_per_block=1"),
]


@pytest.mark.parametrize(("make", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_early_with_a_clear_message(make, error, message, tmp_path, shrink, data_dir):
    with pytest.raises(error, match=message):
        make({"tmp_path": tmp_path, "shrink": shrink, "data_dir": data_dir})


PARSER_CASES = [
    ("unknown config key", ["--data.held_out_clases", "[1]"], "held_out_clases"),
    ("unknown model class path", ["--model.backbone.class_path", "music.models.SimpleCNN"], "music.models.SimpleCNN"),
    ("wrong type", ["--data.samples_per_class", "many"], "samples_per_class"),
]


@pytest.mark.parametrize(("args", "named"), [c[1:] for c in PARSER_CASES], ids=[c[0] for c in PARSER_CASES])
def test_bad_config_is_refused_by_the_parser_naming_the_key(args, named, shrink, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("fit", "--config", shrink("seq"), *args)
    assert exit_.value.code != 0
    assert named in capsys.readouterr().err
