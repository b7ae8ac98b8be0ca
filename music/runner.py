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
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentError
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch import nn

from music.callbacks import SequentialFineTuning
from music.checkpoint import AtomicCheckpointIO, CheckpointError, check_fits, load_state_dict, read_checkpoint
from music.config import BASE_CONFIG, resolve_configs
from music.data import MusicDataModule
from music.eda import LogEDA
from music.evaluation import PhaseEvaluation
from music.module import MAX_LR, Classifier
from music.rundir import RunDirectory, RunLock, latest_resumable, make_dir, reserve_version, run_dir
from music.speed import check_blocks

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
EVALUATIONS = ("validate", "test", "predict")
# --ckpt_path values Lightning resolves itself rather than as a file
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# The shell's convention for a process ended by a signal: 128 + its number.
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
# What a value refused by the parser's type check must be, in the user's terms.
ALLOWED = {"model.lr": f"the learning rate must be a finite number > 0 and <= {MAX_LR:g}"}
# Errors that mean "the input is wrong", reported in one line; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, MisconfigurationException)
# Steps between progress-bar redraws: Lightning's default bar redraws every step, which costs
# more than a SimpleNN step itself.
PROGRESS_BAR_REFRESH_RATE = 50


# Per thread (a Dask worker may run cells in threads): the run directories held (``RunLock``)
# for the run under way and the version folders created for it; released when ``lightning`` returns.
_runs = threading.local()


def _run_state() -> threading.local:
    if not hasattr(_runs, "held"):
        _runs.held, _runs.created = [], []
    return _runs


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
    """LightningCLI with the phase schedule, its evaluation and checkpointing as config sections
    of their own (``schedule``, ``evaluation``, ``checkpoint``), so a config delta can change the
    phases without repeating the callback list.

    A run stopped by SIGTERM or SIGINT exits with the shell's code for it, so
    ``music fit ... && music test ...`` does not go on as if it had finished."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._checkpoint: tuple[str, dict] | None = None  # --ckpt_path and its state_dict, read once
        self._running = False  # True once the objects are built and checked: what is raised then comes from the run
        try:
            super().__init__(*args, **kwargs)
        except SIGTERMException:  # Lightning stops at the end of a batch and exits 0 by itself
            if not self._running:
                raise
            _stopped("SIGTERM", self.subcommand)
            raise SystemExit(EXIT_SIGTERM) from None
        except SystemExit as exit_:
            if self._running and exit_.code == 1 and self.trainer.state.status == TrainerStatus.INTERRUPTED:
                _stopped("SIGINT", self.subcommand)  # Lightning's Ctrl-C
                raise SystemExit(EXIT_SIGINT) from None
            raise
        except RuntimeError as err:  # strict loading of a --ckpt_path the shape check could not see into
            if self._running and isinstance(err.__context__, KeyboardInterrupt):
                # Ctrl-C while a loader was being rebuilt: Lightning's teardown then fails before its sys.exit(1)
                _stopped("SIGINT", self.subcommand)
                raise SystemExit(EXIT_SIGINT) from None
            if not self._running or "Error(s) in loading state_dict" not in str(err):
                raise
            path = self.config[self.subcommand].get("ckpt_path")
            detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
            raise CheckpointError(f"{path} does not fit the model: {detail} "
                                  "(saved from another architecture? see --model.backbone)") from None

    @classmethod
    def only(cls, subcommand: str) -> type[MusicCLI]:
        """The CLI with the parser of ``subcommand`` alone: building all four would add to the
        start-up of every run (measured in docs/speed.md)."""
        chosen = {subcommand: LightningCLI.subcommands()[subcommand]}
        return type(cls.__name__, (cls,), {"subcommands": staticmethod(lambda: chosen)})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SequentialFineTuning, "schedule")
        parser.add_lightning_class_args(PhaseEvaluation, "evaluation")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="The run's folder for MUSIC's files (phase snapshots, phase_metrics.json, accuracy "
                                 "matrix, split manifest) and checkpoints/ (music.rundir.RunDirectory). Default: "
                                 "the folder Lightning's ModelCheckpoint picks for the logger, e.g. TensorBoard's version_N.")
        parser.add_argument("--untrained", type=bool, default=False,
                            help="validate/test/predict a model that was never trained (no --ckpt_path or "
                                 "--model.init_from): refused unless set, so a forgotten checkpoint is not scored "
                                 "as if it were one.")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.batches_per_block", "model.batches_per_block")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """A TQDM bar redrawn every ``PROGRESS_BAR_REFRESH_RATE`` steps unless the config brings
        or disables one, and atomic checkpoint files unless it brings its own ``CheckpointIO``."""
        settings = _of_run(self.config_init, self.subcommand)
        config = settings.get("trainer", {})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE)])
        run_dir = settings.get("run_dir")
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
        # LightningCLI reads --ckpt_path's hyperparameters next, and a file it cannot read ends
        # there in a traceback: read it the safe way first, naming what is wrong.
        config = self.config.get(self.config.get("subcommand") or "") or {}
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES and config.get("weights_only") is not False:
            self._checkpoint = (ckpt_path, read_checkpoint(ckpt_path))  # kept for the shape check

    def before_instantiate_classes(self) -> None:
        config = _of_run(self.config, self.subcommand)
        if config.get("weights_only", False) is None:
            config.weights_only = True  # --ckpt_path never unpickles code (pass false to trust a file)
        check_blocks(config.get("data.batches_per_block", 1), config.get("trainer.gradient_clip_val"),
                     config.get("trainer.accumulate_grad_batches"), config.get("lr_scheduler"))
        _size_trainer(config, self.subcommand)
        if config.get("run_dir") is not None:
            if config.get("checkpoint") is not None and config.checkpoint.get("dirpath") is None:
                config.checkpoint.dirpath = os.path.join(config.run_dir, "checkpoints")  # --ckpt_path last looks there
        if self.subcommand in EVALUATIONS and not (config.get("ckpt_path") or config.get("model.init_from")
                                                   or config.get("untrained")):
            raise ValueError(f"music {self.subcommand} needs weights: give --ckpt_path <file.ckpt|last> or "
                             "--model.init_from <.ckpt/.pt/.safetensors>, or --untrained true to evaluate an "
                             "untrained model on purpose.")
        if self.subcommand is not None:  # a run, not objects built for a caller to drive
            _own_run_directories(config, self.subcommand)

    def after_instantiate_classes(self) -> None:
        """Checks that need the built model, before a run starts."""
        if self.subcommand is not None:
            _check_model(self.model, self.config[self.subcommand], self._checkpoint)
            self._checkpoint = None  # the shape check was its one use
            self._running = True


def _of_run(config, subcommand: str | None):
    """The settings of the run: the subcommand's section, or the whole config when the CLI
    was built without one (``run=False``)."""
    return config.get(subcommand) if subcommand else config


def _stopped(signal_name: str, subcommand: str) -> None:
    resume = " Resume with --ckpt_path last (last.ckpt holds the last finished epoch)." if subcommand == "fit" else ""
    print(f"music {subcommand} stopped by {signal_name} before it finished.{resume}", file=sys.stderr)


def _check_model(model: Classifier, config, checkpoint: tuple[str, dict] | None) -> None:
    """Weights and head that cannot fit the model, named before Lightning trips over them
    mid-run: a size mismatch on loading, or a target index out of the head's range."""
    head = model.backbone.get_classifier() if hasattr(model.backbone, "get_classifier") else \
        next((m for m in reversed(list(model.backbone.modules())) if isinstance(m, nn.Linear)), None)
    if isinstance(head, nn.Linear) and head.out_features != model.num_classes:
        raise ValueError(f"model.backbone outputs {head.out_features} classes but the dataset has "
                         f"{model.num_classes}: set --model.backbone.init_args.num_classes {model.num_classes}.")
    if model.init_from:
        check_fits(model.init_from, load_state_dict(model.init_from), model.backbone.state_dict())
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES and config.get("weights_only") is not False:
        read = checkpoint[1] if checkpoint and checkpoint[0] == ckpt_path else read_checkpoint(ckpt_path)
        check_fits(ckpt_path, read, model.state_dict(), require_common=False)


def _rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def _hold(path: str, what: str) -> None:
    _run_state().held.append(RunLock(path, what))


def _own_run_directories(config, subcommand: str) -> None:
    """Every folder the run writes into is its own for as long as it runs: ``--run_dir``
    and a pinned logger version are locked, and a logger with numbered versions gets a
    ``version_N`` created for this run alone (``music.rundir.reserve_version``), so two runs
    started at once never share one. ``--ckpt_path last`` resumes the newest version with a
    ``last.ckpt`` (fit) or evaluates it (validate, test, predict)."""
    resume = config.get("ckpt_path") == "last"
    if config.get("run_dir") is not None:
        make_dir(config.run_dir, "--run_dir")
        if _rank() == 0:
            _hold(config.run_dir, "--run_dir")
        if resume and subcommand != "fit":
            config.ckpt_path = _last_checkpoint(os.path.join(config.run_dir, "checkpoints"), f"--run_dir {config.run_dir}")
    logger = config.get("trainer.logger")
    init_args = getattr(logger, "init_args", None)
    if init_args is None or "version" not in init_args or not init_args.get("save_dir"):
        if resume and subcommand != "fit" and config.get("run_dir") is None:
            raise ValueError("--ckpt_path last needs --run_dir or a logger with numbered versions (TensorBoard, CSV) "
                             "to find the run: give --ckpt_path <file.ckpt>.")
        return  # a logger without version folders (MLflow, W&B): its runs are told apart by the server
    save_dir = str(init_args.save_dir)
    make_dir(save_dir, "trainer.logger.init_args.save_dir")
    name = init_args.get("name", "lightning_logs")
    root = os.path.join(save_dir, name) if name else save_dir
    if _rank() != 0:  # a DDP process started by rank zero: rank zero's version, passed down
        if init_args.get("version") is None and os.environ.get("MUSIC_RUN_VERSION"):
            init_args.version = int(os.environ["MUSIC_RUN_VERSION"])
        return
    if init_args.get("version") is not None:
        version = init_args.version
        path = os.path.join(root, version if isinstance(version, str) else f"version_{version}")
        make_dir(path, "trainer.logger.init_args.version")
        _hold(path, "trainer.logger.init_args.version")
        return
    if resume and config.get("run_dir") is None:
        latest = latest_resumable(root)
        if subcommand != "fit":
            if latest is None:
                raise ValueError(f"--ckpt_path last: no run under {root!r} has checkpoints/last.ckpt; "
                                 "give --ckpt_path <file.ckpt>.")
            config.ckpt_path = os.path.join(root, f"version_{latest}", "checkpoints", "last.ckpt")
        elif latest is not None:  # keep writing where the run was
            _hold(os.path.join(root, f"version_{latest}"), "--ckpt_path last: the run")
            init_args.version = latest
            os.environ["MUSIC_RUN_VERSION"] = str(latest)
            return
    version, lock = reserve_version(root, "trainer.logger.init_args.save_dir")
    _run_state().held.append(lock)
    _run_state().created.append(lock.path)
    init_args.version = version
    os.environ["MUSIC_RUN_VERSION"] = str(version)


def _last_checkpoint(folder: str, where: str) -> str:
    path = os.path.join(folder, "last.ckpt")
    if not os.path.isfile(path):
        raise ValueError(f"--ckpt_path last: {where} has no checkpoints/last.ckpt; give --ckpt_path <file.ckpt>.")
    return path


def _size_trainer(config, subcommand: str | None) -> None:
    """Without a ``val`` split there is no validation loop to run: say so to Lightning, which
    would otherwise run an empty one and warn (the schedule sets the number of epochs)."""
    if not config.get("data.val_size"):
        if subcommand == "validate":
            raise ValueError("music validate needs a validation split: set data.val_size > 0 (samples carved from "
                             "the training data; the test set is `music test`).")
        if config.get("trainer.limit_val_batches") is None:
            config.trainer.limit_val_batches = 0
            config.trainer.num_sanity_val_steps = 0


def lightning(args: list[str], run: bool = True, callbacks: Sequence[Callback] = ()) -> MusicCLI:
    """``music fit|validate|test|predict ...`` in-process; returns the CLI (``.trainer``, ...).
    With ``run=False`` nothing runs and the subcommand may be left out: the objects are built
    from the configs, for code that drives them itself. ``callbacks``: objects a caller adds to
    the trainer's, after the config's (a ``PhaseListener`` among them hears each phase after the
    evaluation has run)."""
    base = {"default_config_files": [str(BASE_CONFIG)], "exit_on_error": False}
    if not run and args and args[0] in LIGHTNING_SUBCOMMANDS:
        args = args[1:]
    asked = args[0] if run and args and args[0] in LIGHTNING_SUBCOMMANDS else None
    subcommands = [asked] if asked else list(LIGHTNING_SUBCOMMANDS)
    cli = MusicCLI.only(asked) if asked else MusicCLI
    held, created = len(_run_state().held), len(_run_state().created)
    failed = True
    try:
        built = cli(
            Classifier,
            MusicDataModule,
            save_config_callback=SaveConfigToRunDir,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},  # a resumed run writes its config again
            trainer_defaults={"callbacks": [LogEDA(), *callbacks]},  # LogEDA: the data module's figures, when data.log_eda asks
            parser_kwargs={"exit_on_error": False, **{sub: dict(base) for sub in subcommands}} if run else base,
            args=resolve_configs(args),
            run=run,
        )
        failed = False
        return built
    except ArgumentError as err:  # the parser's own errors: unknown keys, wrong types, bad class paths
        raise UsageError(f"{user_message(str(err))} (see `music {args[0] if args else 'fit'} --help`)") from err
    finally:
        for lock in _run_state().held[held:]:
            lock.release()
        for path in _run_state().created[created:]:
            if failed and os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)  # reserved for a run that never wrote anything
        del _run_state().held[held:], _run_state().created[created:]
        os.environ.pop("MUSIC_RUN_VERSION", None)


def user_message(message: str) -> str:
    """The parser's "Expected a <class 'float'>" for a key with a rule of its own, said as the rule."""
    match = re.search(r'Parser key "([\w.]+)":.*Got value: (\S+)', message, re.S)
    if match and match.group(1) in ALLOWED:
        return f"{match.group(1)}={match.group(2)} is not allowed: {ALLOWED[match.group(1)]}."
    # a class's own ValueError, raised while the parser tries the types of a Union (e.g. a backbone)
    refused = re.search(r"Errors:\s*- (.+? is not allowed: .+?\.)\s*(?:- |$)", message, re.S)
    return refused.group(1) if refused else message



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
        user_args: Sequence[str] = (), callbacks: Sequence[Callback] = ()) -> RunResult:
    """``music <subcommand> --config <configs...>`` with ``overrides`` (``{"data.download": False,
    "seed_everything": 3}``), in this process. ``user_args``: command-line arguments a user gave
    as such (an experiment's ``output.trainer_args``), applied last; ``callbacks``: more trainer
    callbacks (``lightning``)."""
    if subcommand not in LIGHTNING_SUBCOMMANDS:
        raise ValueError(f"subcommand={subcommand!r} is not allowed: choose one of {', '.join(LIGHTNING_SUBCOMMANDS)}.")
    cli = lightning([subcommand, *as_args(configs, overrides or {}), *map(str, user_args)], callbacks=callbacks)
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
