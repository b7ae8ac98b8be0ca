"""Shared fixtures: the shipped configs, shrunk, on a synthetic dataset or the real MNIST copy.

Tests run the configs users run, with fewer epochs and batches and logs under ``tmp_path``,
rather than test-only configs that could drift from what ships. Unit tests use the synthetic
dataset (``tests/synthetic.py``) and need no files; tests that use the real MNIST copy beside
the repo (the ``data_dir``, ``mnist`` and ``shrink_mnist`` fixtures) are marked ``mnist``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from music.cli import quiet_upstream
from music.config import CONFIG_DIR, shipped_config  # noqa: F401  (for the tests)
from music.runner import lightning
from music.data import MusicDataModule

REPO = Path(__file__).resolve().parents[1]
quiet_upstream()  # what `music` silences for its process; pytest's own filters (pyproject) come on top
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


def merged_config(*names: str) -> dict:
    """``base.yaml`` with the shipped configs ``names`` laid over it, as ``--config`` does."""
    def merge(into: dict, delta: dict) -> dict:
        for key, value in delta.items():
            into[key] = merge(into.get(key) or {}, value) if isinstance(value, dict) and isinstance(into.get(key), dict) else value
        return into

    config: dict = {}
    for name in ("base", *names):
        merge(config, yaml.safe_load(shipped_config(name).read_text()) or {})
    return config


def shrinker(tmp_path: Path, data: dict):
    def shrink_config(*names: str, epochs: int = 1, phases: list[dict] | None = None, **overrides: object) -> Path:
        config = merged_config(*names)
        # EDA figures (1-2 s of matplotlib) only where a test asks for them
        config["data"] |= {"download": False, "log_eda": False, **data, **overrides}
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
        config["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False}
        config["schedule"]["phases"] = phases or [p | {"epochs": epochs} for p in config["schedule"]["phases"]]
        path = tmp_path / f"{'_'.join(names)}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return shrink_config


# The synthetic dataset (tests/synthetic.py): 340 training images a class, 40 of them held out.
SYNTHETIC = {"dataset": "synthetic.SyntheticDigits", "samples_per_class": 40}


@pytest.fixture
def shrink(tmp_path: Path):
    """``shrink("seq", epochs=1)`` writes the shipped ``seq`` config (over ``base``; more names
    are more deltas) as one file that runs in seconds on the synthetic dataset: every phase
    ``epochs`` long (or ``phases`` instead of the shipped ones), logs under ``tmp_path``, data
    arguments overridden by keyword."""
    return shrinker(tmp_path, SYNTHETIC | {"data_dir": str(tmp_path / "data")})


@pytest.fixture
def shrink_mnist(tmp_path: Path, data_dir: str):
    """``shrink`` on the real MNIST copy (the test is then marked ``mnist``)."""
    return shrinker(tmp_path, {"data_dir": data_dir})


@pytest.fixture
def tiny(tmp_path: Path) -> MusicDataModule:
    """The synthetic data module with the shipped held-out classes, set up."""
    datamodule = MusicDataModule(data_dir=str(tmp_path / "data"), download=False, **SYNTHETIC)
    datamodule.setup()
    return datamodule


MNIST_FIXTURES = {"data_dir", "mnist", "shrink_mnist"}


def pytest_collection_modifyitems(items) -> None:
    """Tests that read the real MNIST copy are integration tests: marked ``mnist``, so
    ``pytest -m "not mnist"`` runs everywhere."""
    for item in items:
        if MNIST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mnist)


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package), to call in-process."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str):
    """Run ``music fit|validate|test|predict`` in-process; returns the CLI (``.trainer``, ...)."""
    return lightning([str(a) for a in args])


# -- no avoidable warning: a warning raised from music's own code, or one of Lightning's that
# the framework is meant to prevent, fails the run (a test that expects one uses pytest.warns).
MUSIC_DIR = str(Path(__file__).resolve().parents[1] / "music")
AVOIDABLE = ("`max_epochs` was not set", "smaller than the logging interval", "Total length of `list` across ranks",
             "isinstance(treespec, LeafSpec)", "`weights_only` was not set")
_avoidable: list[str] = []


def pytest_warning_recorded(warning_message, when, nodeid, location) -> None:
    text = str(warning_message.message)
    if warning_message.filename.startswith(MUSIC_DIR) or any(a in text for a in AVOIDABLE):
        _avoidable.append(f"{nodeid}: {warning_message.category.__name__}: {text.splitlines()[0] if text else ''}")


def pytest_terminal_summary(terminalreporter) -> None:
    if _avoidable:
        terminalreporter.section("avoidable warnings (fail the run)")
        for line in dict.fromkeys(_avoidable):
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _avoidable and exitstatus == 0:
        session.exitstatus = 1
