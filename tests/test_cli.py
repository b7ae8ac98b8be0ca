import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run

from music.cli import main
from music.config import CONFIG_DIR, shipped_config, shipped_names
from music.experiments import EXPERIMENTS, parser_for

TESTS = Path(__file__).parent

# deltas that need a base besides base.yaml
NEEDS = {"lora": ["seq_finetune"], "head_only": ["seq_finetune"], "vit_lora": ["vit_full"],
         "split_mnist_domain": ["split_mnist"]}
LIGHTNING_KEYS = {"seed_everything", "trainer", "model", "data", "schedule", "evaluation", "checkpoint", "optimizer", "lr_scheduler"}
SHIPPED = {name: set(yaml.safe_load(shipped_config(name).read_text()) or {}) for name in shipped_names()}
LIGHTNING_CONFIGS = sorted(name for name, keys in SHIPPED.items() if keys <= LIGHTNING_KEYS)
EXPERIMENT_CONFIGS = sorted(set(SHIPPED) - set(LIGHTNING_CONFIGS))


@pytest.mark.parametrize("config", LIGHTNING_CONFIGS)
def test_every_shipped_lightning_config_parses(config: str, capsys):
    args = [a for name in [*NEEDS.get(config, []), config] for a in ("--config", name)]
    with pytest.raises(SystemExit) as exit_:
        run("fit", *args, "--print_config")
    assert exit_.value.code == 0
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("config", EXPERIMENT_CONFIGS)
def test_every_shipped_experiment_config_parses_for_an_experiment(config: str):
    """Each experiment config (and merge recipe) is read by some ``music <experiment>``."""
    from jsonargparse import ArgumentError

    parsed_by = []
    for name in EXPERIMENTS:
        parser, _ = parser_for(name)
        try:
            parser.parse_args(["--config", str(CONFIG_DIR / f"{config}.yaml")])
        except (ArgumentError, SystemExit):
            continue
        parsed_by.append(name)
    assert parsed_by, f"{config}.yaml parses for no experiment"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_prints_its_config(name: str, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--print_config"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip()


def test_help_imports_nothing_optional_from_music():
    """``music --help`` stays light: no music module imports an optional package.
    (torchmetrics itself imports matplotlib, and transformers when installed; that is not ours,
    so only imports made by ``music.*`` modules are checked.)"""
    code = """
import builtins, runpy, sys
importers = set()
original = builtins.__import__
def record(name, globals=None, *args, **kwargs):
    if name.split(".")[0] in ("timm", "peft", "transformers", "matplotlib"):
        importers.add(((globals or {}).get("__name__", "?"), name.split(".")[0]))
    return original(name, globals, *args, **kwargs)
builtins.__import__ = record
sys.argv = ["music", "--help"]
try:
    runpy.run_module("music", run_name="__main__")
except SystemExit:
    pass
print(sorted(i for i in importers if i[0].startswith("music")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    for name in ("fit", "test", *EXPERIMENTS):
        assert f"  {name} " in out


def music(*args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "music", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_a_short_fit_prints_no_warning_the_framework_could_avoid(shrink, tmp_path):
    env = os.environ | {"PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = music("fit", "--config", shrink("seq"), "--trainer.limit_train_batches", 5, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if re.search(r"\.py:\d+: |Warning", line)]
    assert warnings == []
    assert "Tip: For seamless cloud logging" not in output  # Lightning's advertisement, filtered


def test_commands_work_from_any_directory_and_a_non_editable_install(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(REPO)], check=True, capture_output=True, timeout=600)
    env = os.environ | {"PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (["--help"], ["fit", "--config", "seq", "--config", "lora", "--print_config"],
                 *([name, "--print_config"] for name in EXPERIMENTS)):
        result = music(*args, cwd=elsewhere, env=env)
        assert result.returncode == 0, (args, result.stderr[-2000:])
    shown = music("fit", "--config", "seq", "--print_config", cwd=elsewhere, env=env).stdout
    assert "name: class_7" in shown and "class_path: music.models.SimpleNN" in shown
