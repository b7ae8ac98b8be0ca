"""Shared fixtures: the real MNIST copy beside the repo and the shipped configs, shrunk.

Tests run the configs users run, with fewer epochs and batches and logs under ``tmp_path``,
rather than test-only configs that could drift from what ships.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from music.cli import main
from music.data import MusicDataModule

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def torch_threads():
    """The scripts pin torch's thread count for their whole process; a test that runs one
    in-process must not change the numerics of the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST is expected at {DATA_DIR}/MNIST/raw (the shared copy beside the repo).")
    return str(DATA_DIR)


@pytest.fixture(scope="session")
def mnist(data_dir: str) -> MusicDataModule:
    """The default data module, set up once (loading MNIST takes a second)."""
    datamodule = MusicDataModule(data_dir=data_dir, download=False)
    datamodule.setup()
    return datamodule


@pytest.fixture
def shrink(tmp_path: Path, data_dir: str):
    """``shrink("seq", epochs=1)`` writes a copy of ``configs/seq.yaml`` that runs in seconds:
    every phase ``epochs`` long (or ``phases`` instead of the shipped ones), logs under
    ``tmp_path``, MNIST from the shared copy, data arguments overridden by ``data``."""

    def shrink_config(name: str, epochs: int = 1, phases: list[dict] | None = None, **data: object) -> Path:
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        # EDA figures (1-2 s of matplotlib) only where a test asks for them
        config["data"] |= {"data_dir": data_dir, "download": False, "log_eda": False, **data}
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
        config["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False}
        for callback in config["trainer"]["callbacks"]:
            if "phases" in callback.get("init_args", {}):
                callback["init_args"]["phases"] = phases or [
                    p | {"epochs": epochs} for p in callback["init_args"]["phases"]
                ]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return shrink_config


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package), to call in-process."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str):
    """Run ``python -m music`` in-process; returns the CLI (``.trainer``, ``.model``, ...)."""
    return main(args=[str(a) for a in args])
