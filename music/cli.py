"""``python -m music``: LightningCLI over ``Classifier`` and ``MusicDataModule``.

Everything is configured in YAML (``configs/``) and flows into constructor arguments; the
only additions to the stock CLI are the link that sizes the model from the data and the
resumption of ``--ckpt_path last`` inside the run directory it came from.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

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

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config.get("weights_only", False) is None:
            config.weights_only = True  # --ckpt_path never unpickles code (pass false to trust a file)
        if self.subcommand == "fit" and config.get("ckpt_path") == "last":
            _resume_in_latest_version(config.trainer.logger)


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
