import subprocess
import sys

import pytest
from conftest import CONFIG_DIR, REPO, run

from music.experiments import EXPERIMENTS

# deltas that need a base besides base.yaml
NEEDS = {"lora": ["seq_finetune"], "head_only": ["seq_finetune"], "vit_lora": ["vit_full"]}
LIGHTNING_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
                           if "schedule" in p.read_text() or p.stem in NEEDS or p.stem == "pretrain")


@pytest.mark.parametrize("config", LIGHTNING_CONFIGS)
def test_every_shipped_lightning_config_parses(config: str, capsys):
    args = [a for name in [*NEEDS.get(config, []), config] for a in ("--config", name)]
    with pytest.raises(SystemExit) as exit_:
        run("fit", *args, "--print_config")
    assert exit_.value.code == 0
    assert "class_path" in capsys.readouterr().out


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
