"""Runs of the Lightning subcommands in-process: ``MusicCLI`` (LightningCLI with MUSIC's
sections), the settings it fills in before anything runs, and ``run``, the typed entry the
experiments use, so that they pass Python values rather than building argument strings.

The command line (``music.cli``) is one caller; the experiments are the others. Nothing here
installs warning or logging filters: that is the command line's business.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from music.callbacks import SequentialFineTuning
from music.checkpoint import AtomicCheckpointIO
from music.config import BASE_CONFIG, resolve_configs
from music.data import MusicDataModule
from music.eda import LogEDA
from music.module import Classifier
from music.rundir import RunDirectory, run_dir

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Errors that mean "the input is wrong", reported in one line; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, MisconfigurationException)
# Steps between progress-bar redraws: Lightning's default bar redraws every step, which costs
# more than a SimpleNN step itself.
PROGRESS_BAR_REFRESH_RATE = 50


class UsageError(Exception):
    """Raised instead of exiting, so callers in-process (tests, experiments) can catch it."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class SaveConfigToRunDir(SaveConfigCallback):
    """``config.yaml`` in the run directory (``music.rundir.run_dir``) rather than in
    ``trainer.log_dir``, which every run of an MLflow or W&B logger shares."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        path = os.path.join(run_dir(trainer), self.config_filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.parser.save(self.config, path, skip_unset=False, overwrite=self.overwrite, multifile=self.multifile)


class MusicCLI(LightningCLI):
    """LightningCLI with the phase schedule and checkpointing as config sections of their own
    (``schedule``, ``checkpoint``), so a config delta can change the phases without repeating
    the callback list."""

    @classmethod
    def only(cls, subcommand: str) -> type[MusicCLI]:
        """The CLI with the parser of ``subcommand`` alone: building all four costs a few
        tenths of a second more on every run (docs/speed.md)."""
        chosen = {subcommand: LightningCLI.subcommands()[subcommand]}
        return type(cls.__name__, (cls,), {"subcommands": staticmethod(lambda: chosen)})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SequentialFineTuning, "schedule")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="The run's folder for MUSIC's files (phase snapshots, phase_metrics.json, accuracy "
                                 "matrix, split manifest) and checkpoints/ (music.rundir.RunDirectory). Default: "
                                 "the folder Lightning's ModelCheckpoint picks for the logger, e.g. TensorBoard's version_N.")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.batches_per_block", "model.batches_per_block")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """A TQDM bar redrawn every ``PROGRESS_BAR_REFRESH_RATE`` steps unless the config brings
        or disables one, and atomic checkpoint files unless it brings its own ``CheckpointIO``."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE)])
        run_dir = self._get(self.config_init, "run_dir")
        if run_dir is not None:
            kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), RunDirectory(run_dir)]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        with warnings.catch_warnings():
            # in-process callers pass their arguments; sys.argv then holds their own options
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.get("weights_only", False) is None:
            config.weights_only = True  # --ckpt_path never unpickles code (pass false to trust a file)
        _check_blocks(config)
        _size_trainer(config, self.subcommand)
        if config.get("run_dir") is not None:
            if config.get("checkpoint") is not None and config.checkpoint.get("dirpath") is None:
                config.checkpoint.dirpath = os.path.join(config.run_dir, "checkpoints")  # --ckpt_path last looks there
        elif self.subcommand == "fit" and config.get("ckpt_path") == "last":
            _resume_in_latest_version(config.trainer.logger)


def _check_blocks(config) -> None:
    """Blocks train through manual optimization, where Lightning refuses or ignores these;
    say so in the user's terms, before anything runs."""
    blocks = config.get("data.batches_per_block", 1)
    if blocks == 1:
        return
    in_use = {"trainer.gradient_clip_val": bool(config.get("trainer.gradient_clip_val")),
              "trainer.accumulate_grad_batches": (config.get("trainer.accumulate_grad_batches") or 1) != 1,
              "lr_scheduler": bool(config.get("lr_scheduler"))}
    refused = [key for key, used in in_use.items() if used]
    if refused:
        key = refused[0]
        raise ValueError(f"{key}={config.get(key)} is not allowed with data.batches_per_block={blocks}: blocks are "
                         "trained batch by batch through manual optimization. Set --data.batches_per_block 1.")


def _size_trainer(config, subcommand: str | None) -> None:
    """Settings Lightning would otherwise guess and warn about: the number of epochs is the
    phases' sum, and without a ``val`` split there is no validation loop to run."""
    phases = config.get("schedule.phases") or []
    if config.get("trainer.max_epochs") is None and phases:
        config.trainer.max_epochs = sum(p.epochs if hasattr(p, "epochs") else p["epochs"] for p in phases)
    if not config.get("data.val_size"):
        if subcommand == "validate":
            raise ValueError("music validate needs a validation split: set data.val_size > 0 (samples carved from "
                             "the training data; the test set is `music test`).")
        if config.get("trainer.limit_val_batches") is None:
            config.trainer.limit_val_batches = 0
            config.trainer.num_sanity_val_steps = 0


def _resume_in_latest_version(logger) -> None:
    """Point a logger with numbered versions (TensorBoard, CSV) and no fixed version at the
    newest ``version_N`` that holds ``checkpoints/last.ckpt``, so "last" finds it and the run
    keeps writing where it was. Runs with ``--run_dir`` resume from ``<run_dir>/checkpoints``."""
    init_args = getattr(logger, "init_args", None)
    if init_args is None or init_args.get("version") is not None:
        return
    root = os.path.join(init_args.get("save_dir") or "lightning_logs", init_args.get("name") or "lightning_logs")
    versions = [d for d in os.listdir(root) if re.fullmatch(r"version_\d+", d)] if os.path.isdir(root) else []
    resumable = [d for d in versions if os.path.exists(os.path.join(root, d, "checkpoints", "last.ckpt"))]
    if resumable:
        init_args.version = max(resumable, key=lambda d: int(d.split("_")[1]))


def lightning(args: list[str], run: bool = True) -> MusicCLI:
    """``music fit|validate|test|predict ...`` in-process; returns the CLI (``.trainer``, ...).
    With ``run=False`` nothing runs and the subcommand may be left out: the objects are built
    from the configs, for code that drives them itself."""
    base = {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False}
    if not run and args and args[0] in LIGHTNING_SUBCOMMANDS:
        args = args[1:]
    asked = args[0] if run and args and args[0] in LIGHTNING_SUBCOMMANDS else None
    subcommands = [asked] if asked else list(LIGHTNING_SUBCOMMANDS)
    cli = MusicCLI.only(asked) if asked else MusicCLI
    try:
        return cli(
            Classifier,
            MusicDataModule,
            save_config_callback=SaveConfigToRunDir,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # a resumed run writes its config again
            trainer_defaults={"callbacks": [LogEDA()]},  # the data module's figures, when data.log_eda asks for them
            parser_kwargs={"exit_on_error": False, **{sub: dict(base) for sub in subcommands}} if run else base,
            args=resolve_configs(args),
            run=run,
        )
    except ArgumentError as err:  # the parser's own errors: unknown keys, wrong types, bad class paths
        raise UsageError(f"{err} (see `music {args[0] if args else 'fit'} --help`)") from err


@dataclass
class RunResult:
    """A finished run: its folder, the objects that ran it, and its test metrics after every
    phase (``phase_metrics.json``, in phase order; empty for a subcommand that writes none)."""

    run_dir: Path
    trainer: Trainer
    model: LightningModule
    datamodule: LightningDataModule
    phases: dict[str, dict]


def as_args(configs: list[str], overrides: dict[str, Any]) -> list[str]:
    """``--config`` per config, then ``--key value`` per override. A value that is not a string
    is written as JSON, which the parser reads back as the same YAML value (``False`` ->
    ``false``, ``None`` -> ``null``, lists and dicts as they are)."""
    if isinstance(configs, str):
        raise ValueError(f"configs={configs!r} is not allowed: give a list of config names or paths.")
    args = [a for c in configs for a in ("--config", str(c))]
    for key, value in overrides.items():
        if not key or key.startswith("-"):
            raise ValueError(f"override key {key!r} is not allowed: give a dotted setting such as 'data.data_dir'.")
        args += [f"--{key}", value if isinstance(value, str) else str(value) if isinstance(value, Path) else json.dumps(value)]
    return args


def run(subcommand: str, configs: list[str], overrides: dict[str, Any] | None = None,
        user_args: Sequence[str] = ()) -> RunResult:
    """``music <subcommand> --config <configs...>`` with ``overrides`` (``{"data.download": False,
    "seed_everything": 3}``), in this process. ``user_args``: command-line arguments a user gave
    as such (an experiment's ``output.trainer_args``), applied last."""
    if subcommand not in LIGHTNING_SUBCOMMANDS:
        raise ValueError(f"subcommand={subcommand!r} is not allowed: choose one of {', '.join(LIGHTNING_SUBCOMMANDS)}.")
    cli = lightning([subcommand, *as_args(configs, overrides or {}), *map(str, user_args)])
    folder = Path(run_dir(cli.trainer))
    phases = phase_metrics(folder) if (folder / "phase_metrics.json").exists() else {}
    return RunResult(folder, cli.trainer, cli.model, cli.datamodule, phases)


def phase_metrics(folder: str | Path) -> dict[str, dict]:
    """A run's ``phase_metrics.json``, in phase order."""
    records = json.loads((Path(folder) / "phase_metrics.json").read_text())
    return dict(sorted(records.items(), key=lambda item: item[1]["index"]))


def build(configs: list[str], overrides: dict[str, Any] | None = None) -> MusicCLI:
    """The model, data module and trainer the configs describe, built and not run, for code
    that drives them itself (figures, evaluation)."""
    return lightning(as_args(configs, overrides or {}), run=False)
