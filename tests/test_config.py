"""``--config`` names: every spelling of a shipped name finds the same file from any directory,
a local file never silently stands in for a shipped one, and a wrong name lists what ships."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

import music.config
from music.cli import main
from music.config import CONFIG_DIR, GROUPS, SEARCH, config_path, resolve_configs, shipped_config, shipped_names
from music.experiments import EXPERIMENTS


@pytest.mark.parametrize("name, file", [
    ("seq", "seq.yaml"), ("seq.yaml", "seq.yaml"), ("methods/ewc", "methods/ewc.yaml"),
    ("methods/ewc.yaml", "methods/ewc.yaml"), ("ewc", "methods/ewc.yaml"), ("negation_3", "merge/negation_3.yaml"),
    ("experiments/table1", "experiments/table1.yaml"),
])
def test_every_spelling_of_a_shipped_name_finds_its_file(name, file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_path(name) == str(CONFIG_DIR / file)
    assert resolve_configs(["fit", "--config", name, f"--config={name}"]) == [
        "fit", "--config", str(CONFIG_DIR / file), f"--config={CONFIG_DIR / file}"]


def test_the_configs_sit_in_their_groups():
    names = shipped_names()
    assert {"base", "seq", "seq_finetune", "lora", "methods/ewc", "merge/negation_3", "merge/evaluate",
            "experiments/continual", "experiments/taskvectors"} <= set(names)
    assert all(n.count("/") <= 1 for n in names)


def test_every_group_is_resolved_and_packaged():
    """A folder of ``configs/`` that ``GROUPS`` or the wheel's package list leaves out would be
    missing from group-less names or from an installed ``music``."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    folders = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {*GROUPS, SEARCH}
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["music.configs"] == "configs"
    for package in ["music.configs", *(f"music.configs.{g}" for g in (*GROUPS, SEARCH))]:
        assert package in setuptools["packages"] and setuptools["package-data"][package] == ["*.yaml"]


def test_each_experiment_reads_the_config_named_after_its_command():
    for name, experiment in EXPERIMENTS.items():
        if experiment.default_config is not None:
            assert experiment.default_config == f"experiments/{name.replace('-', '_')}"
            assert shipped_config(experiment.default_config).is_file()


def test_an_unknown_name_is_refused_listing_the_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'seqq' is neither a file nor a shipped config") as err:
        config_path("seqq")
    assert all(repr(n) in str(err.value) for n in ("seq", "methods/ewc", "merge/negation_3", "experiments/study"))


def test_a_stray_file_of_a_shipped_name_in_the_working_directory_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seq.yaml").write_text("model: {lr: 0.5}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "seq.yaml", "--print_config"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert str(CONFIG_DIR / "seq.yaml") in err and str(tmp_path / "seq.yaml") in err and "./seq.yaml" in err


@pytest.mark.parametrize("spelling", ["./seq.yaml", "ABSOLUTE"])
def test_an_explicit_path_is_the_file_even_beside_a_shipped_name(spelling, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seq.yaml").write_text("model: {lr: 0.5}\n")
    spelling = str(tmp_path / "seq.yaml") if spelling == "ABSOLUTE" else spelling
    assert config_path(spelling) == spelling
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "seq", "--config", spelling, "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "name: class_7" in out  # the local delta over the shipped seq


def test_a_relative_path_outside_the_groups_is_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "seq.yaml").write_text("model: {lr: 0.5}\n")
    assert config_path("mine/seq.yaml") == "mine/seq.yaml"
    assert config_path("ewc.yaml") == str(CONFIG_DIR / "methods" / "ewc.yaml")


def test_the_shipped_file_itself_is_no_ambiguity(monkeypatch):
    monkeypatch.chdir(CONFIG_DIR)
    assert config_path("seq.yaml") == str(CONFIG_DIR / "seq.yaml")


def test_a_group_less_name_two_groups_hold_is_refused(tmp_path, monkeypatch):
    for group in ("methods", "merge"):
        (tmp_path / group).mkdir()
        (tmp_path / group / "twice.yaml").write_text("{}\n")
    monkeypatch.setattr(music.config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"'twice' is ambiguous.*'merge/twice', 'methods/twice'"):
        config_path("twice")
    assert config_path("merge/twice") == str(tmp_path / "merge" / "twice.yaml")


def test_python_m_music_finds_the_shipped_config_from_another_directory(tmp_path):
    """The checkout's ``music`` run from elsewhere: ``seq.yaml`` is the shipped file, not a path."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "music", "fit", "--config", "seq.yaml", "--print_config"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: class_7" in result.stdout


def test_the_config_module_imports_nothing_of_music_above_it():
    code = "import sys, music.config; print(sorted(m for m in sys.modules if m.startswith('music')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['music', 'music.config']"


def test_help_lists_the_shipped_configs_by_group(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert str(CONFIG_DIR) in out
    assert "  methods/: agem, derpp, er_ace, ewc, lwf, mas, online_ewc, replay, si" in out
    assert all(f"{n.split('/')[-1]}" in out for n in shipped_names())
