"""The benchmark's smoke mode runs both sides as fresh processes (timings are printed, never asserted)."""

import pytest
from conftest import load_script


def test_quick_mode_runs_both_sides_and_checks_they_take_the_same_steps(data_dir, capsys):
    result = load_script("benchmark").run(["--quick", "--data-dir", data_dir, "--threads", "1"])
    out = capsys.readouterr().out
    assert "torch threads" in out and "framework/plain" in out and "fixed cost above the plain script" in out
    assert result["steps"] == 2 * 32  # 2 loader steps of 32-batch blocks; the run checks both sides took them
    for key in ("framework_wall_s", "plain_wall_s", "framework_cpu_epoch_s", "plain_cpu_epoch_s", "framework/plain_epoch"):
        assert result[key] > 0, key


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--epochs", "0"], ["--threads", "-1"]])
def test_bad_arguments_fail_naming_the_value(argv, capsys):
    with pytest.raises(SystemExit):
        load_script("benchmark").parse(argv)
    assert argv[0] in capsys.readouterr().err


def test_tricks_mode_measures_every_shortcut_and_leaves_the_module_as_shipped(data_dir):
    from music.module import Classifier

    benchmark = load_script("benchmark")
    result = benchmark.run(["--tricks", "--quick", "--data-dir", data_dir])
    assert {f"{trick}_{kind}" for trick in benchmark.TRICKS for kind in ("wall", "cpu")} == set(result)
    assert all(value > 0 for value in result.values())
    assert "__setattr__" not in Classifier.__dict__


def test_cells_benchmark_quick_mode_runs_both_sides_and_dask(data_dir, capsys):
    """Both sides of the cells benchmark take the same optimizer steps (the run checks it), the
    framework's parts add up to its cell, and the Dask part reports (the fresh-process part,
    four more processes, is left to the import-time test below)."""
    result = load_script("benchmark_cells").run(["--quick", "--data-dir", data_dir, "--parts", "cells", "dask", "--workers", "1",
                                                 "--noops", "2"])
    out = capsys.readouterr().out
    assert "framework/plain, steady cell" in out and "no-op task" in out
    assert result["framework_cells_per_hour"] > 0 and result["plain_cells_per_hour"] > 0
    parts = sum(value for key, value in result.items() if key.startswith("framework_part_"))
    assert 0.9 * result["framework_cell_s"] < parts <= 1.01 * result["framework_cell_s"]
    assert result["dask_roundtrip_s"] > 0 and result["dask_1_workers_cells_per_hour"] > 0


def test_import_times_read_python_importtime():
    import os

    from conftest import REPO

    times = load_script("benchmark_cells").import_times("import music.cli", dict(os.environ, PYTHONPATH=str(REPO)))
    assert times["total"] >= times["music.cli"] >= times["lightning"] > 0 and "transformers" not in times


@pytest.mark.parametrize("argv", [["--cells", "0"], ["--workers", "0"], ["--compare", "/nonexistent"]])
def test_cells_benchmark_bad_arguments_fail_naming_the_value(argv, capsys):
    with pytest.raises(SystemExit):
        load_script("benchmark_cells").parse(argv)
    assert argv[0] in capsys.readouterr().err


def test_plain_finetune_draws_the_data_modules_held_out_samples(mnist):
    import torch

    splits = load_script("plain_pretrain").held_out_splits(mnist.train_labels)
    assert all(torch.equal(splits[c], mnist.splits[f"class_{c}"]) for c in (3, 4, 7))
