"""scripts/reproduce_table1.py: the README's main command, as a smoke run (5 loader steps an epoch)."""

import csv

import pytest
import torch
from conftest import load_script

from music.cli import parse_script_args, script_parser


@pytest.fixture
def script():
    return load_script("reproduce_table1")


def test_quick_table1_writes_every_stage_from_one_pretrained_model(tmp_path, data_dir, script):
    table = script.run(["--quick", "--data-dir", data_dir, "--log-dir", str(tmp_path / "logs"),
                        "--out", str(tmp_path / "results")])

    stages = ["pretrained", "merged", "sequential (after 3)", "sequential (after 4)", "sequential (after 7)"]
    assert list(table) == stages
    rows = list(csv.DictReader(open(tmp_path / "results" / "table1.csv")))
    assert [r["stage"] for r in rows] == stages
    for row in rows:
        assert 0.0 <= float(row["acc_mean"]) <= 1.0 and float(row["loss_mean"]) > 0
    # both fine-tuning runs started from the pretrain run's snapshot, not from scratch
    for name in ("seq", "merged"):
        config = (tmp_path / "logs" / "table1" / "seed_0" / name / "version_0" / "config.yaml").read_text()
        assert "phase-0-pretrain.ckpt" in config
    markdown = (tmp_path / "results" / "table1.md").read_text()
    assert "paper acc / loss (reference)" in markdown
    assert "Torch threads: 1." in markdown and torch.get_num_threads() == 1  # reproducible by default


def test_thread_count_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_script_args(script_parser(None), ["--threads", "0"])
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
