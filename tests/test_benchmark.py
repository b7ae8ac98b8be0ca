"""The benchmark's smoke mode runs end to end (timings are printed, never asserted)."""

import pytest
import yaml
from conftest import CONFIG_DIR, load_script


def test_quick_mode_runs_both_sides_and_prints_the_ratio(data_dir, capsys):
    result = load_script("benchmark").run(["--quick", "--data-dir", data_dir, "--", "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "ratio framework/plain" in out and "Table I study" in out
    blocks = yaml.safe_load((CONFIG_DIR / "seq.yaml").read_text())["data"].get("batches_per_block", 1)
    assert result["steps"] == 5 * blocks  # 1 epoch x 5 loader steps; the run checks both sides took them
    for key in ("framework_wall_s", "plain_wall_s", "ratio", "study_framework_wall_s", "study_plain_wall_s"):
        assert result[key] > 0, key


def test_bad_arguments_fail_naming_the_value():
    with pytest.raises(SystemExit):
        load_script("benchmark").parse(["--repeats", "0"])
