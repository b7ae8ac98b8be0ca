"""The fast paths keep behaviour: the default progress bar and profiler, cached splits."""

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.profilers import SimpleProfiler

from music.cli import PROGRESS_BAR_REFRESH_RATE, lightning


def progress_bars(trainer):
    return [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]


def test_default_progress_bar_refreshes_every_n_steps_and_config_wins(shrink):
    config = shrink("pretrain")
    trainer = lightning(["--config", str(config), "--trainer.enable_progress_bar", "true"], run=False).trainer
    (bar,) = progress_bars(trainer)
    assert bar.refresh_rate == PROGRESS_BAR_REFRESH_RATE
    own = lightning(["--config", str(config), "--trainer.enable_progress_bar", "true", "--trainer.callbacks+",
                "lightning.pytorch.callbacks.TQDMProgressBar", "--trainer.callbacks.refresh_rate", "1",
                "--trainer.profiler", "simple"], run=False).trainer
    assert [b.refresh_rate for b in progress_bars(own)] == [1] and isinstance(own.profiler, SimpleProfiler)
    assert progress_bars(lightning(["--config", str(config)], run=False).trainer) == []  # shrink disables the bar


def test_split_datasets_are_gathered_once(mnist):
    assert mnist.dataset("remaining") is mnist.dataset("remaining")
    assert len(mnist.dataset("class_3")) == 1000 and mnist.dataset("test") is mnist.dataset("test")
