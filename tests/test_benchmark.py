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
