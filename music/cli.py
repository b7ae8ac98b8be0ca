"""``music``: one command for training, evaluation and every experiment.

``music fit | validate | test | predict`` is LightningCLI over ``Classifier`` and
``MusicDataModule``; ``music <experiment>`` runs one of ``music.experiments``. Both read the same
config language: YAML through jsonargparse, ``--config`` repeatable (a shipped config by name,
e.g. ``--config seq``, or any path), dotted overrides, ``--print_config``, ``--help``. The
Lightning subcommands start from ``configs/base.yaml``, so a shipped config holds only what
differs from it.

Bad input ends in one line, ``error: ...`` on stderr, exit code 2; ``--debug`` (or
``MUSIC_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from music.callbacks import SequentialFineTuning
from music.rundir import RunDirectory, run_dir
from music.checkpoint import AtomicCheckpointIO
from music.data import MusicDataModule
from music.evaluation import PhaseEvaluation
from music.module import Classifier
from music.speed import check_blocks

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Errors that mean "the input is wrong", reported in one line; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, MisconfigurationException)
# Steps between progress-bar redraws: Lightning's default bar redraws every step, which costs
# more than a SimpleNN step itself.
PROGRESS_BAR_REFRESH_RATE = 50

# Upstream deprecations MUSIC cannot act on, silenced where they are raised: Lightning 2.6's
# own use of torch's LeafSpec, and LightningCLI's use of jsonargparse APIs deprecated in 4.49.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        module=r"lightning\.pytorch\.utilities\._pytree")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli")
# Splits are tensors in memory: loader worker processes would only add start-up cost.
warnings.filterwarnings("ignore", message=r".*does not have many workers", module=r"lightning\.pytorch")
# The phase schedule sets the number of epochs when fitting starts (the sum of its phases');
# Lightning warns before that, when the Trainer's own max_epochs is unset.
warnings.filterwarnings("ignore", message=r"`max_epochs` was not set", module=r"lightning\.pytorch")
# Lightning logs an advertisement for its cloud logger on every Trainer that has none.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud logging"))


class UsageError(Exception):
    """Raised instead of exiting, so callers in-process (tests, experiments) can catch it."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def shipped_config(name: str) -> Path:
    """``seq`` -> ``music/configs/seq.yaml``; a name that is no shipped config is refused."""
    path = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"--config {name!r} is neither a file nor a shipped config: shipped are {names}.")
    return path


def resolve_configs(args: list[str]) -> list[str]:
    """Every ``--config X`` that names no existing file becomes the shipped config ``X``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += [arg, _config_path(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _config_path(arg.removeprefix("--config="))
        out.append(arg)
        i += 1
    return out


def _config_path(value: str) -> str:
    if os.path.exists(value) or "\n" in value or ":" in value:  # a file, or inline YAML
        return value
    return str(shipped_config(value))


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
    phases without repeating the callback list."""

    @classmethod
    def only(cls, subcommand: str) -> type[MusicCLI]:
        """The CLI with the parser of ``subcommand`` alone: building all four costs a few
        tenths of a second more on every run (docs/speed.md)."""
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
        check_blocks(config.get("data.batches_per_block", 1), config.get("trainer.gradient_clip_val"),
                     config.get("trainer.accumulate_grad_batches"), config.get("lr_scheduler"))
        _size_trainer(config, self.subcommand)
        if config.get("run_dir") is not None:
            if config.get("checkpoint") is not None and config.checkpoint.get("dirpath") is None:
                config.checkpoint.dirpath = os.path.join(config.run_dir, "checkpoints")  # --ckpt_path last looks there
        elif self.subcommand == "fit" and config.get("ckpt_path") == "last":
            _resume_in_latest_version(config.trainer.logger)


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
    from jsonargparse import ArgumentError

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
            parser_kwargs={"exit_on_error": False, **{sub: dict(base) for sub in subcommands}} if run else base,
            args=resolve_configs(args),
            run=run,
        )
    except ArgumentError as err:  # the parser's own errors: unknown keys, wrong types, bad class paths
        raise UsageError(f"{err} (see `music {args[0] if args else 'fit'} --help`)") from err


def usage() -> str:
    from music.experiments import EXPERIMENTS

    lines = ["usage: music <subcommand> [--config NAME|PATH ...] [--key value ...] [--print_config] [--help]", "",
             "Training and evaluation (LightningCLI; configs start from configs/base.yaml):",
             "  fit        train through the phases of `schedule`, with a snapshot and test evaluation after each",
             "  validate   evaluate on the validation split",
             "  test       evaluate on the test set (--ckpt_path or --model.init_from)",
             "  predict    predict on the test set", "", "Experiments:"]
    lines += [f"  {name:<18} {experiment.summary}" for name, experiment in EXPERIMENTS.items()]
    lines += ["", f"Shipped configs ({CONFIG_DIR}): " + ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))),
              "`music <subcommand> --help` lists every setting with its documentation."]
    return "\n".join(lines)


def dispatch(args: list[str]) -> Any:
    """Run one subcommand; raises ``UsageError`` and the ``USER_ERRORS`` instead of exiting."""
    from music.experiments import EXPERIMENTS, run_experiment

    if not args or args[0] in ("-h", "--help"):
        print(usage())
        if not args:
            raise UsageError("no subcommand given", code=2)
        return None
    if args[0] in EXPERIMENTS:
        return run_experiment(args[0], resolve_configs(args[1:]))
    if args[0] in LIGHTNING_SUBCOMMANDS or args[0].startswith("-"):
        return lightning(args)
    known = [*LIGHTNING_SUBCOMMANDS, *EXPERIMENTS]
    raise UsageError(f"unknown subcommand {args[0]!r}: choose one of {', '.join(known)}")


def main(args: list[str] | None = None) -> None:
    """The ``music`` entry point: errors from bad input are one line on stderr, exit code 2."""
    args = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get("MUSIC_DEBUG", "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    if debug:
        dispatch(args)
        return
    try:
        dispatch(args)
    except UsageError as err:
        _fail(str(err), err.code)
    except USER_ERRORS as err:
        _fail(str(err), 2)


def _fail(message: str, code: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)
