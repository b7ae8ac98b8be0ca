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
from faults import evil_checkpoint
from safetensors.torch import save_file
from test_study_db import write_with_retired_column

from music.cli import LIGHTNING_SUBCOMMANDS, main
from music.speed import Block
from music.models import SimpleNN
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
    ("unknown domain in a split", ["--schedule.phases", "[{name: a, split: train@rot_45, epochs: 1}]"],
     r"Split 'train@rot_45' names the domain 'rot_45', but data.domains is empty"),
    ("duplicate domain names", ["--data.domains", "[{name: r}, {name: r, rotate: 45}]"], r"domains names \['r'\] more than once"),
    ("domain with two transforms", ["--data.domains", "[{name: r, rotate: 45, permute_seed: 1}]"],
     r"Domain 'r' sets both rotate=45.* and permute_seed=1"),
    ("label_map of the wrong length", ["--data.label_map", "[0, 1]"], r"label_map=\[0, 1\] has 2 entries but .* has 10 classes"),
    ("model lr <= 0", ["--model.lr", "-1"], r"lr=-1.0.*must be a finite number > 0"),
    ("init_from file missing", ["--model.init_from", "nope.ckpt"], "nope.ckpt"),
    ("batches_per_block < 1", ["--data.batches_per_block", "0"], r"batches_per_block=0.*>= 1"),
    ("gradient clipping with blocks", ["--trainer.gradient_clip_val", "1.0"],
     r"trainer.gradient_clip_val=1.0 is not allowed with data.batches_per_block=32.*--data.batches_per_block 1"),
    ("online stream with a phase of 2 epochs", ["--schedule.online", "true", "--schedule.phases", PHASE % (2, "")],
     r"epochs=2, which schedule.online: true does not allow"),
    ("online stream with a phase's own lr", ["--schedule.online", "true", "--schedule.phases", PHASE % (1, ", lr: 0.1")],
     r"lr=0.1, which schedule.online: true does not allow"),
    ("online stream with repeated iterations", ["--schedule.online", "true", "--schedule.phases", PHASE % (1, ""),
                                                "--data.iterations_per_epoch", "5"],
     r"data.iterations_per_epoch=5 is not allowed with schedule.online: true"),
    ("online stream with early stopping", ["--schedule.online", "true", "--schedule.phases", PHASE % (1, ""),
                                           "--schedule.early_stopping.patience", "1"],
     r"schedule.early_stopping is not allowed with schedule.online: true"),
    ("online stream with a method acting at task ends",
     ["--schedule.online", "true", "--schedule.phases", PHASE % (1, ""), "--model.methods",
      "[{class_path: music.methods.EWC}]"], r"EWC acts at task boundaries, which schedule.online: true does not give"),
    ("online stream with active outputs", ["--schedule.online", "true", "--schedule.phases", PHASE % (1, ""),
                                           "--model.active_outputs", "true"],
     r"active_outputs=true is not allowed with schedule.online: true"),
    ("unknown config key", ["--data.held_out_clases", "[1]"], "held_out_clases"),
    ("unknown model class path", ["--model.backbone.class_path", "music.models.SimpleCNN"], "music.models.SimpleCNN"),
    ("wrong type", ["--data.samples_per_class", "many"], "samples_per_class"),
    ("unknown shipped config", ["--config", "seqq"], r"'seqq' is neither a file nor a shipped config: shipped are \[.*'methods/ewc'.*'seq'"),
    ("validate without a val split", ["validate"], r"music validate needs a validation split: set data.val_size > 0"),
    ("early stopping with patience < 1", ["--schedule.early_stopping.patience", "0"],
     r"early_stopping.patience=0 is not allowed: it must be an integer >= 1"),
    ("early stopping on val without a val split", ["--schedule.early_stopping.patience", "1"],
     r"monitor='val/loss' needs a validation split: set data.val_size > 0"),
    ("early stopping on a metric not logged", ["--data.val_size", "100", "--schedule.early_stopping.monitor", "val/accuracy"],
     r"monitor='val/accuracy' is not a metric of this run \(logged: .*val/acc"),
    ("val evaluation without a val split", ["--evaluation.evaluate_val", "true"],
     r"evaluation.evaluate_val=true needs a validation split: set data.val_size > 0"),
    # weights and checkpoints ({tmp}: the files of the `files` fixture)
    ("test without weights", ["test"], r"music test needs weights: give --ckpt_path .* or --untrained true"),
    ("test --ckpt_path last without a resumable run", ["test", "--ckpt_path", "last"],
     r"--ckpt_path last: no run under '.*/logs/seq' has checkpoints/last.ckpt"),
    ("truncated checkpoint to test", ["test", "--ckpt_path", "{tmp}/truncated.ckpt"],
     r"could not read {tmp}/truncated.ckpt as a torch file .*truncated"),
    ("truncated checkpoint to fit", ["--ckpt_path", "{tmp}/truncated.ckpt"], r"could not read {tmp}/truncated.ckpt"),
    ("text file named .ckpt", ["--ckpt_path", "{tmp}/text.ckpt"], r"could not read {tmp}/text.ckpt as a torch file"),
    ("text file named .ckpt as init_from", ["--model.init_from", "{tmp}/text.ckpt"], r"could not read {tmp}/text.ckpt"),
    ("code-running pickle to test", ["test", "--ckpt_path", "{tmp}/evil.ckpt"],
     r"refused to load {tmp}/evil.ckpt: not a plain weights file"),
    *((f"another architecture's {name} as init_from", ["--model.init_from", f"{{tmp}}/other.{name}"],
       rf"{{tmp}}/other.{name} does not fit the model: fc1\.\w+ is \[32(, 784)?\] in the file but \[128(, 784)?\]")
      for name in ("pt", "safetensors", "ckpt")),
    ("another architecture's .ckpt as ckpt_path", ["test", "--ckpt_path", "{tmp}/other.ckpt"],
     r"{tmp}/other.ckpt does not fit the model: backbone.fc1.weight is \[32, 784\] in the file"),
    ("safetensors with a corrupt header", ["--model.init_from", "{tmp}/corrupt.safetensors"],
     r"could not read {tmp}/corrupt.safetensors as a safetensors file"),
    ("truncated safetensors", ["--model.init_from", "{tmp}/truncated.safetensors"],
     r"could not read {tmp}/truncated.safetensors as a safetensors file"),
    # output folders
    ("logger save_dir under a file", ["--trainer.logger.init_args.save_dir", "{tmp}/a_file/logs"],
     r"save_dir='{tmp}/a_file/logs' cannot be created: '{tmp}/a_file' is a file"),
    ("run_dir under a file", ["--run_dir", "{tmp}/a_file/run"], r"--run_dir='{tmp}/a_file/run' cannot be created"),
    # model
    ("head narrower than the dataset", ["--model.backbone.init_args.num_classes", "5"],
     r"model.backbone outputs 5 classes but the dataset has 10: set --model.backbone.init_args.num_classes 10"),
    ("lr that overflows the optimizer", ["--model.lr", "1e38"], r"lr=1e\+38 is not allowed: .*finite number > 0 and <= 1e\+34"),
    ("lr nan", ["--model.lr", "nan"], r"model.lr=nan is not allowed: the learning rate must be a finite number > 0"),
    ("lr inf", ["--model.lr", ".inf"], r"lr=inf is not allowed: the learning rate must be a finite number > 0"),
    ("layer width 0", ["--model.backbone.init_args.hidden", "[0, 64]"],
     r"hidden=\[0, 64\].*every width must be an integer >= 1"),
    # config files
    ("empty config file", ["--config", "{tmp}/empty.yaml"], r"--config {tmp}/empty.yaml is empty"),
    ("config file that is not YAML", ["--config", "{tmp}/broken.yaml"],
     r"--config {tmp}/broken.yaml is not valid YAML: .* at line 3"),
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


@pytest.fixture
def files(tmp_path) -> Path:
    """The bad files the table names: checkpoints cut short, of another architecture, of
    text, of code; configs empty or broken; a file where a folder is asked for."""
    state = SimpleNN().state_dict()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "good.ckpt")
    good = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.ckpt").write_text("epoch: 3\nthese are notes, not weights\n")
    evil_checkpoint(str(tmp_path / "evil.ckpt"), str(tmp_path / "pwned"))
    other = SimpleNN(hidden=(32, 16)).state_dict()
    torch.save(other, tmp_path / "other.pt")
    save_file(other, str(tmp_path / "other.safetensors"))
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in other.items()}, "epoch": 0}, tmp_path / "other.ckpt")
    save_file(state, str(tmp_path / "good.safetensors"))
    whole = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "corrupt.safetensors").write_bytes(whole[:8] + b"{not json" + whole[17:])
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("model:\n  lr: [0.1\n")
    (tmp_path / "a_file").write_text("a file, not a folder")
    return tmp_path


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_naming_the_value(args, message, shrink, files, tmp_path, capsys):
    config = shrink("seq")
    earlier = tmp_path / "logs" / "seq" / "version_0"  # a run already written must stay as it was
    earlier.mkdir(parents=True)
    (earlier / "phase_metrics.json").write_text("{}")
    args = [a.replace("{tmp}", str(files)) for a in args]
    subcommand, args = (args[0], args[1:]) if args[0] in LIGHTNING_SUBCOMMANDS else ("fit", args)
    line = fails_in_one_line([subcommand, "--config", config, *args], capsys)
    assert re.search(message.replace("{tmp}", re.escape(str(files))), line), line
    assert sorted(p.name for p in earlier.iterdir()) == ["phase_metrics.json"]
    assert (earlier / "phase_metrics.json").read_text() == "{}"
    assert not (files / "pwned").exists()


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


STUDY_CASES = [
    ("query on a missing database", ["--query", "SELECT 1", "--study.db", "sqlite:///{tmp}/missing.db"],
     r"no database at '{tmp}/missing.db'; run the grid first"),
    ("query on a database music did not make", ["--query", "SELECT 1", "--study.db", "sqlite:///{tmp}/other.db"],
     r"study.db='sqlite:///{tmp}/other.db' is not a MUSIC study database \(it has cells, and no music_schema"),
    ("report on a database music did not make", ["--report_only", "true", "--study.db", "sqlite:///{tmp}/other.db",
                                                 "--output.root", "{tmp}/runs"], r"other.db' is not a MUSIC study database"),
    ("grid on a database whose cells require a retired column", ["--study.db", "sqlite:///{tmp}/retired.db",
                                                                 "--output.root", "{tmp}/runs"],
     r"retired.db': its cells table requires a column '\w+' that this release does not write.*give a new study.db"),
]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in STUDY_CASES], ids=[c[0] for c in STUDY_CASES])
def test_study_database_refusals_are_one_line_and_change_nothing(args, message, tmp_path, capsys):
    import sqlite3

    with sqlite3.connect(tmp_path / "other.db") as conn:  # someone else's file with a `cells` table
        conn.execute("CREATE TABLE cells (id INTEGER PRIMARY KEY, sheet TEXT)")
    write_with_retired_column(f"sqlite:///{tmp_path / 'retired.db'}", [])  # a MUSIC database no grid can write to
    before = {name: (tmp_path / name).read_bytes() for name in ("other.db", "retired.db")}
    line = fails_in_one_line(["study", *(a.replace("{tmp}", str(tmp_path)) for a in args)], capsys)
    assert re.search(message.replace("{tmp}", re.escape(str(tmp_path))), line), line
    assert {name: (tmp_path / name).read_bytes() for name in before} == before and not (tmp_path / "missing.db").exists()
