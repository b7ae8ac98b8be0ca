"""``python -m music``: LightningCLI over ``Classifier`` and ``MusicDataModule``.

Everything is configured in YAML (``configs/``) and flows into constructor arguments; the
only additions to the stock CLI are the link that sizes the model from the data and the
resumption of ``--ckpt_path last`` inside the run directory it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.profilers import PassThroughProfiler

from music.data import MusicDataModule
from music.module import Classifier


# Steps between progress-bar redraws. Lightning's default bar redraws every step (Rich's, when
# rich is installed, also from a second thread), which cost more than a SimpleNN step itself.
PROGRESS_BAR_REFRESH_RATE = 50


class NullProfiler(PassThroughProfiler):
    """Lightning's default no-op profiler, minus the cost: the Trainer enters ``profile()``
    ~50 times a training step, and the stock one builds a generator-based context manager each
    time (~20% of the Python calls Lightning makes per step). This hands back one shared
    ``nullcontext``. Any configured profiler (``--trainer.profiler simple``) replaces it."""

    _null = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext:
        return self._null


class MusicCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """A TQDM bar redrawn every ``PROGRESS_BAR_REFRESH_RATE`` steps, unless the config
        disables the bar or brings its own (e.g. ``TQDMProgressBar`` with ``refresh_rate: 1``),
        and the ``NullProfiler`` unless a profiler is configured."""
        config = self._get(self.config_init, "trainer", default={})
        if config.get("profiler") is None:
            kwargs.setdefault("profiler", NullProfiler())
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_RATE)])
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        with warnings.catch_warnings():
            # Scripts pass the fit arguments themselves; sys.argv then holds the script's own
            # options, which LightningCLI would otherwise warn about on every call.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.batches_per_block", "model.batches_per_block")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.get("weights_only", False) is None:
            config.weights_only = True  # --ckpt_path never unpickles code (pass false to trust a file)
        _check_blocks(config)
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
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


def _resume_in_latest_version(logger) -> None:
    """Point a TensorBoard logger without a fixed version at the newest ``version_N`` that holds
    ``checkpoints/last.ckpt``, so "last" finds it and the run keeps writing where it was."""
    init_args = getattr(logger, "init_args", None)
    if init_args is None or init_args.get("version") is not None:
        return
    root = os.path.join(init_args.get("save_dir") or "lightning_logs", init_args.get("name") or "lightning_logs")
    versions = [d for d in os.listdir(root) if re.fullmatch(r"version_\d+", d)] if os.path.isdir(root) else []
    resumable = [d for d in versions if os.path.exists(os.path.join(root, d, "checkpoints", "last.ckpt"))]
    if resumable:
        init_args.version = max(resumable, key=lambda d: int(d.split("_")[1]))


def main(args: list[str] | None = None, run: bool = True) -> MusicCLI:
    return MusicCLI(
        Classifier,
        MusicDataModule,
        save_config_kwargs={"overwrite": True},  # a resumed run writes into its own directory again
        args=args,
        run=run,
    )


# -- what the study scripts (scripts/*.py) share --------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def script_parser(description: str | None) -> argparse.ArgumentParser:
    """Options of every script that drives ``python -m music fit``: data, logs, results,
    ``--quick`` and extra ``fit`` arguments after ``--``. Parse with ``parse_script_args``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="MNIST root (torchvision layout); downloaded there if missing")
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true",
                        help="5 loader steps an epoch: 5 blocks where the config sets data.batches_per_block (a smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as the committed results were made: metrics are "
                             "bitwise-reproducible only at the same thread count)")
    parser.add_argument("extra", nargs="*", help="arguments after -- go to every `python -m music fit` call")
    return parser


def parse_script_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.extra = ["--trainer.limit_train_batches", "5", *args.extra]
    return args


def fit_config(config: str, name: str, args: argparse.Namespace, *extra: str) -> Path:
    """``python -m music fit --config configs/<config>`` logging to ``<log_dir>/<name>``, quietly;
    returns the run directory."""
    cli = main(["fit", "--config", str(CONFIGS / config), "--data.data_dir", args.data_dir,
                "--trainer.logger.init_args.save_dir", args.log_dir, "--trainer.logger.init_args.name", name,
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                *extra, *args.extra])
    return Path(cli.trainer.log_dir)
