import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(config: Path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("fit", "--config", config, "--print_config")
    assert exit_.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_help_imports_nothing_optional_from_music():
    """``python -m music --help`` stays light: no music module imports an optional package.
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
